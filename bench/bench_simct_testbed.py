r"""Cross-tokenizer on-policy distillation on the testbed: SimCT vs ULD, held-out accuracy over seeds.

Settings (trl_opd.testbed), both on the multi-strategy task ("Compute a+b+c.", six valid orders of the additions),
teacher 2 layers / width 96 on the uniform strategy mix, student 2 layers / width 64 cold-started on one strategy:

* `multistrategy_bpe_student` (default, results in simct_testbed.json/.md): the character-level teacher of the
  `multistrategy` setting and a student with a byte-level BPE (`bpe_words`: 270 pieces, digits and spaces single
  tokens, words merged: " \boxed{" is Ġ \ boxed {).
* `multistrategy_bpe_teacher` (simct_testbed_multistrategy_bpe_teacher.json/.md): the reverse, a `bpe_words` teacher
  and the character-level student of `multistrategy`.

The two models share no token ids: only SimCTTrainer can distil here. The shared vocabulary is matched on decoded
text (`shared_vocabulary_mode="decoded"`): the character tokenizer writes " " where the byte-level BPE writes Ġ.

Methods (same prompts, steps, batch 32, lr 1e-3 constant, T = 1, completions of at most 40 student tokens; the
distillation seed varies, the checkpoints are fixed, as testbed.md recommends for method comparisons):

* `simct`   SimCTTrainer, `cross_tokenizer_loss="simct"` (reverse KL over V∩ plus a span column per segment)
* `simple`  SimCTTrainer, `cross_tokenizer_loss="simple"` (the same rows on 1:1 anchors only; SimCT's ablation)
* `uld`     SimCTTrainer, `cross_tokenizer_loss="uld"` (ULD / TRL GOLD: sorted-probability L1 per segment)
* `simct_cov`, `simple_cov`  the same with `simct_min_teacher_coverage=0.5` (our addition: segments whose row holds
            less than half of the teacher's next-token probability are dropped)
* `simct_excl`, `simct_excl_cov`  SimCT with `simct_exclusive_spans=True` (our fix of the double counting: a span's
            first tokens lose their V∩ columns in its row), without and with the coverage filter
* `opd_same_tokenizer`  control: plain OPDTrainer, the same student and a teacher with the student's own tokenizer (the
            teacher of the other setting), so no tokenizer mismatch at all

`--lr`, `--temperature` and `--set KEY=VALUE` (SimCTConfig fields) change the defaults; such runs are stored under a
variant label (`--tag`, default built from those options) and get their own table.

    python bench/bench_simct_testbed.py --methods simct uld --seeds 0 1 2 --steps 200

Runs one at a time (`--workers 1`, the default) with one torch thread each. Each call merges its runs into
bench/results/simct_testbed.json and rewrites bench/results/simct_testbed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SETTING = "multistrategy_bpe_student"
SETTINGS = ("multistrategy_bpe_student", "multistrategy_bpe_teacher")


def stem(setting: str) -> Path:
    return RESULTS / ("simct_testbed" if setting == DEFAULT_SETTING else f"simct_testbed_{setting}")
METHODS = ("simct", "simple", "uld", "simct_cov", "simple_cov", "simct_excl", "simct_excl_cov", "opd_same_tokenizer")
COVERAGE = 0.5
METHOD_CONFIGS = {
    "simct": {"cross_tokenizer_loss": "simct"},
    "simple": {"cross_tokenizer_loss": "simple"},
    "uld": {"cross_tokenizer_loss": "uld"},
    "simct_cov": {"cross_tokenizer_loss": "simct", "simct_min_teacher_coverage": COVERAGE},
    "simple_cov": {"cross_tokenizer_loss": "simple", "simct_min_teacher_coverage": COVERAGE},
    "simct_excl": {"cross_tokenizer_loss": "simct", "simct_exclusive_spans": True},
    "simct_excl_cov": {"cross_tokenizer_loss": "simct", "simct_exclusive_spans": True,
                       "simct_min_teacher_coverage": COVERAGE},
    "opd_same_tokenizer": {},
}
SHARED_VOCABULARY_MODE = "decoded"
# The control `opd_same_tokenizer`: plain OPDTrainer, the same student distilled by the teacher of the other setting,
# which has the student's tokenizer (the `bpe_words` teacher for the BPE student, the character-level teacher for the
# character-level student).
SAME_TOKENIZER_TEACHER = {"multistrategy_bpe_student": "multistrategy_bpe_teacher",
                          "multistrategy_bpe_teacher": "multistrategy_bpe_student"}


def training_args(output_dir: str, seed: int, steps: int, lr: float = 1e-3, temperature: float = 1.0) -> dict:
    """The testbed's OPD settings (`trl_opd.testbed.distillation_args`) with this run's lr and temperature."""
    from trl_opd.testbed import distillation_args

    return distillation_args(output_dir, seed, steps, learning_rate=lr, temperature=temperature)


def run_one(job: dict) -> dict:
    """One (method, seed): a fresh copy of the cached student, train, held-out accuracy."""
    import torch

    torch.set_num_threads(1)
    from trl_opd import SimCTConfig, SimCTTrainer, testbed
    from trl_opd.testbed.training import load_pretrained

    paths = testbed.prepare(job["setting"], seed=job["testbed_seed"], show_progress=False)
    student, tokenizer = load_pretrained(paths["student"])
    teacher, teacher_tokenizer = load_pretrained(paths["teacher"])
    student.train()
    data = testbed.make_dataset(job["steps"] * 32, paths["task"], seed=job["seed"])
    if job["method"] == "opd_same_tokenizer":
        from trl_opd import OPDConfig, OPDTrainer

        if job["setting"] not in SAME_TOKENIZER_TEACHER:
            raise ValueError(f"opd_same_tokenizer has no same-tokenizer teacher for {job['setting']}.")
        other = testbed.prepare(SAME_TOKENIZER_TEACHER[job["setting"]], seed=job["testbed_seed"], show_progress=False)
        teacher, teacher_tokenizer = load_pretrained(other["teacher"])
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError("the same-tokenizer teacher does not share the student's tokenizer")
    with tempfile.TemporaryDirectory() as output_dir:
        config = {
            **training_args(output_dir, job["seed"], job["steps"], job.get("lr", 1e-3), job.get("temperature", 1.0)),
            **METHOD_CONFIGS[job["method"]],
            "shared_vocabulary_mode": SHARED_VOCABULARY_MODE,
        }
        config.update(job.get("overrides", {}))
        if job["method"] == "opd_same_tokenizer":
            config = {k: v for k, v in config.items() if k not in SimCTConfig.__dataclass_fields__
                      or k in OPDConfig.__dataclass_fields__}
            trainer = OPDTrainer(student, teacher, args=OPDConfig(**config), train_dataset=data,
                                 processing_class=tokenizer)
        else:
            trainer = SimCTTrainer(
                student, teacher, args=SimCTConfig(**config), train_dataset=data, processing_class=tokenizer,
                teacher_processing_class=teacher_tokenizer,
            )
        start = time.perf_counter()
        cpu_start = time.process_time()
        trainer.train()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {
        **job,
        "accuracy": testbed.accuracy(trainer.model, tokenizer, testbed.heldout_problems(paths["task"])),
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,
        "first_log": logs[0] if logs else None,
        "last_log": logs[-1] if logs else None,
    }
    print(json.dumps({k: result.get(k) for k in ("method", "variant", "seed", "accuracy", "train_seconds")}),
          flush=True)
    return result


def baselines(setting: str, testbed_seed: int) -> dict:
    """Held-out accuracy of the teacher and of the student before distillation, and the tokenisations."""
    from trl_opd import testbed
    from trl_opd.testbed.training import load_pretrained

    paths = testbed.prepare(setting, seed=testbed_seed, show_progress=False)
    heldout = testbed.heldout_problems(paths["task"])
    scores = {}
    for name in ("teacher", "student"):
        model, tokenizer = load_pretrained(paths[name])
        scores[name] = testbed.accuracy(model, tokenizer, heldout)
        scores[f"{name}_vocab"] = len(tokenizer)
        example = heldout[0]["prompt"] + heldout[0]["completion"]
        scores[f"{name}_tokens_example"] = len(tokenizer(example)["input_ids"])
    scores["example"] = heldout[0]["prompt"] + heldout[0]["completion"]
    return scores


def summarise(results: list[dict], baseline: dict) -> str:
    gap = baseline["teacher"] - baseline["student"]
    lines = [
        "| method | seeds | accuracy per seed (%) | mean ± sd | change vs student | gap recovered | train s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])
        if not rows:
            continue
        scores = [100 * r["accuracy"] for r in rows]
        mean, sd = statistics.mean(scores), statistics.stdev(scores) if len(scores) > 1 else 0.0
        lines.append(
            f"| {method} | {', '.join(str(r['seed']) for r in rows)} | "
            + ", ".join(f"{s:.1f}" for s in scores)
            + f" | {mean:.1f} ± {sd:.1f} | {mean - 100 * baseline['student']:+.1f} | "
            f"{(mean / 100 - baseline['student']) / gap:.2f} | "
            f"{statistics.mean(r['train_seconds'] for r in rows):.0f} |"
        )
    return "\n".join(lines) + "\n"


FINDINGS = """\
Learning rate (second session; the tables with a variant; `opd_same_tokenizer` is plain OPDTrainer with the
character-level teacher of `multistrategy_bpe_student`, i.e. the same student taught with no tokenizer mismatch):

* **lr 3e-4, 100 steps, 3 seeds: SimCT with `simct_exclusive_spans` 48.7, 56.0, 0.0% (from 17.0%); the same-tokenizer
  OPD control 48.0, 56.3, 47.0%; faithful SimCT 0, 0, 0%; ULD 0.0, 1.3, 0.0%.** On two seeds SimCT with exclusive
  spans does what OPD does, to within a point (the coverage filter, `simct_excl_cov`, gives the same numbers); on the
  third it collapses, as every method did at lr 1e-3. Faithful SimCT collapses on every seed: the double counting of
  the span's first character (below) is decisive in this direction.
* It does not last: at 200 steps (lr 3e-4, seed 0) SimCT with exclusive spans, faithful SimCT and ULD are all at 0%
  while OPD is at 64.0%. The cross-tokenizer rows first carry the same signal as OPD, then the student drifts onto
  non-canonical segmentations (`\\` then `b`, see below) and the teacher's noise there takes over.
* **lr 1e-4, 100 steps, 3 seeds (the setting where SimCT works): SimCT with exclusive spans 45.3 ± 1.9% and with
  exclusive spans + coverage filter 45.6 ± 1.8% (from 17.0%, 0.36 of the gap, no seed collapsed), the same-tokenizer
  OPD control 44.4 ± 2.2%, ULD 2.0 ± 0.9%, faithful SimCT 0.0 ± 0.0% (the double counting).** SimCT with our fixes tracks plain OPD
  seed for seed (43.7 / 47.3 / 45.7 vs 43.3 / 47.0 / 43.0); ULD, which ignores token identity, drives the student
  down in every setting tried.

How this pair was chosen (measured while building it, seed 0):

* A teacher with the plain byte-level BPE (`bpe`: numbers merged, "92" one token in one place and "9" + "2" in
  another) learns the arithmetic far more slowly: 6.3% validation accuracy after 500 of its 1,200 steps, where the
  character-level teacher is at 90%. Isolating digits (as Qwen's and Mistral's tokenizers do) fixes that: 96.3%.
* With digits isolated but spaces still merged into the next piece (" \\boxed" = `Ġ\\` `boxed`, while before a
  digit the space is a lone `Ġ`; `shared_vocabulary_mode="raw"`), SimCT and ULD both drove the student to **0%**
  within 200 steps (seed 0): it
  stopped writing ` \\boxed{` and chained further additions until the length limit. The 1:1 anchor " " ↔ `Ġ`
  scores the teacher on a lone `Ġ`, after which it has only ever seen a digit; so after every ". " the teacher
  says "digit", and the decision to box the answer, which the teacher makes at the space (`Ġ` vs `Ġ\\`), never
  reaches the student. This is a limit of any alignment that pairs tokens at shared text boundaries (SimCT's anchors
  and GOLD's groups alike) when one tokenizer merges a prefix that the other writes alone. The `bpe_words`
  tokenizer isolates spaces too, so both sides make that decision at the same place.
* With `bpe_words` (the table above) every method still ends at 0%: the student writes ` \\` and then digits or
  more backslashes instead of `boxed{`. Per-segment inspection on the student's own samples shows sane rows
  everywhere except inside `boxed`: (1) SimCT's span row counts the student's `b` twice (V∩ column and span
  column, methods.md §8.4.2) and the teacher, which writes `boxed` as one token, gives a lone `b` almost no
  probability, so the student is pushed off `b`; (2) once a sample leaves `boxed` (`\\5`, `\\b1`), the teacher is
  scored on segmentations it never saw in training (`\\` then `b`), where its predictions are noise, and its
  leftover mass renormalised over V∩ becomes the target. `simct_exclusive_spans` fixes (1) and
  `simct_min_teacher_coverage` drops the rows of (2) whose teacher mass lies outside V∩, but the students still
  collapsed in 60-step probes (seed 0): a 2-layer teacher trained on canonical tokenisations only is not robust to
  non-canonical ones, which large pretrained teachers are. Hence the default setting puts the character-level
  model on the teacher side: every segmentation of a text is canonical for it.
"""


DEFAULT_NOTES = """\
Learning rate, span score, and a same-tokenizer control (second session; the tables with a variant):

* Screen (seed 0, 100 steps): no variant moved the student past 13.3% (lr 3e-4: SimCT 12.7, SimCT exclusive spans
  12.7, `simple` 13.3, ULD 0.3; lr 1e-4: SimCT 12.7; `simct_span_score="logprob_mean"` at lr 1e-3: 7.0 and 5.7 with
  exclusive spans, at lr 3e-4: 12.7). At lr 1e-3 the run is already at the edge (one seed of the 200-step table
  collapsed), so the 3-seed runs use lr 3e-4 and 300 steps.
* **300 steps, lr 3e-4, 3 seeds: SimCT 16.1 ± 0.8% and SimCT with exclusive spans 15.3 ± 0.6% (from 9.3%, every
  seed up 5.7 to 7.7 points), ULD 0.4 ± 0.2% (collapses, as at lr 1e-3).** So SimCT does move the BPE student toward
  the teacher here, but slowly: 0.08 of the gap in 300 steps.
* Why slowly: the same BPE student distilled by plain OPDTrainer from a teacher *with its own tokenizer* (the 97.0%
  `bpe_words` teacher of `multistrategy_bpe_teacher`; method `opd_same_tokenizer`, same lr / steps / seeds) does not
  move at all: 8.2 ± 0.7%. With no tokenizer mismatch at all, reverse-KL OPD does not lift this student in 300 steps,
  so the slow progress is this student's (2 layers, width 64, cold-started at 9.3%), not SimCT's cross-tokenizer
  signal. Per-segment inspection on its greedy samples agrees: the SimCT loss sits on the digits (1:1 anchors, where a
  SimCT row is the reverse KL over V∩, which holds every digit), i.e. on arithmetic errors; `=`, `+`, `.`, spaces and
  EOS contribute ~0.
* The loss is exact where the alignment is 1:1: `tests/test_simct_trainer.py::
  test_renumbered_vocabulary_trains_step_for_step_like_opd` trains SimCTTrainer (`simct` and `simple`) with the
  character tokenizer renumbered against OPDTrainer with the original one and gets the same losses and the same
  weights after every step (rel. 1e-4). No sign or direction bug.
* The other direction is where lr matters: with the BPE teacher and the character-level student
  (bench/results/simct_testbed_multistrategy_bpe_teacher.md), lr 1e-3 collapsed every method to 0% but lr 3e-4
  lifts it: at lr 1e-4, 100 steps, SimCT with exclusive spans (+ coverage filter) 45.6 ± 1.8% from 17.0%, the
  same-tokenizer OPD control 44.4 ± 2.2%, ULD 2.0 ± 0.9% (3 seeds each); faithful SimCT 0.0% on every seed (the double counting of a span's first character).

Reading of the first session (lr 1e-3; seed-level numbers above; 200 steps is what the time box allowed):

* Neither loss moves the student toward the teacher in 200 steps. ULD (sorted probabilities, no token identity)
  drives the student to 0% on every seed: it only asks the student to be as peaked as the teacher, on any token.
  Faithful SimCT keeps the student near its start on two seeds and collapses it on the third; with
  `simct_exclusive_spans=True` (our fix of the double counting, methods.md §8.4.2) all three seeds stay at the start
  (10.4 ± 0.7% vs 9.3%). In this direction the double counting sits on the teacher's side: in the row of the span
  `boxed` ↔ `b o x e d`, the teacher's mass appears both in the V∩ column of `b` and in the span column, so the
  student is pushed to write a lone `b`, a segmentation it never learned.
* Sanity check of the trainer itself (a 60-step probe, seed 0, not in the table): SimCTTrainer with the
  character-level teacher and the character-level student of `multistrategy` (the teacher's tokenizer given one extra
  token, so that the vocabularies differ and every segment is 1:1) raises the student from 17.0% to 44.3%, as
  OPDTrainer does; the slow progress here comes from the tokenizer mismatch, not from the trainer's plumbing.
* The reverse direction (BPE teacher, character-level student) collapses every method to 0%:
  bench/results/simct_testbed_multistrategy_bpe_teacher.md explains why.
"""


def write_report(record: dict) -> str:
    baseline = record["baseline"]
    groups = sorted({(r.get("variant", ""), r["steps"]) for r in record["results"]})
    tables = [
        f"## {n} steps{f', variant `{variant}`' if variant else ''}\n\n"
        + summarise([r for r in record["results"] if r["steps"] == n and r.get("variant", "") == variant], baseline)
        for variant, n in groups
    ]
    text = (
        "# Cross-tokenizer OPD on the testbed: SimCT vs ULD\n\n"
        f"Setting `{record['setting']}`: teacher vocabulary {baseline['teacher_vocab']} "
        f"({baseline['teacher_tokens_example']} tokens for the example below), student vocabulary "
        f"{baseline['student_vocab']} ({baseline['student_tokens_example']} tokens for it); example "
        f"`{baseline['example']!r}`. The character-level tokenizer has 101 entries, the `bpe_words` BPE 270.\n\n"
        f"Starting points (300 held-out problems, greedy): teacher {100 * baseline['teacher']:.1f}%, student "
        f"{100 * baseline['student']:.1f}%. Batch 32, lr 1e-3 constant unless a table's variant says otherwise "
        "(`lr0.0003`: 3e-4), T = 1, at most 40 completion tokens; the "
        "distillation seed varies, the checkpoints are fixed. sd is the sample standard deviation over seeds.\n\n"
        + "\n".join(f"`{command}`" for command in record["commands"])
        + f"\n\nDevice: {record['hardware']}.\n\n"
        + "\n".join(tables)
        + "\n"
        + (FINDINGS if record["setting"] == "multistrategy_bpe_teacher" else DEFAULT_NOTES)
    )
    stem(record["setting"]).with_suffix(".md").write_text(text)
    return text


def save(results: list[dict], command: str, hardware: str, baseline: dict, setting: str) -> dict:
    """Merge `results` into bench/results/simct_testbed.json (a (method, seed, steps) run replaces its old one)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = stem(setting).with_suffix(".json")
    previous = json.loads(path.read_text()) if path.exists() else {}
    key = lambda r: (r["method"], r["seed"], r["steps"], r.get("variant", ""))  # noqa: E731
    replaced = {key(r) for r in results}
    kept = [r for r in previous.get("results", []) if key(r) not in replaced]
    record = {
        "commands": sorted(set(previous.get("commands", [])) | {command}),
        "hardware": hardware,
        "setting": setting,
        "baseline": baseline,
        "results": sorted(kept + results, key=lambda r: (r.get("variant", ""), r["steps"], r["method"], r["seed"])),
    }
    path.write_text(json.dumps(record, indent=2))
    write_report(record)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default=DEFAULT_SETTING, choices=SETTINGS)
    parser.add_argument("--testbed-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--methods", nargs="+", default=["simct", "uld"], choices=METHODS)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-save", action="store_true", help="print the results, do not write bench/results")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (constant schedule)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling and distillation temperature")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="SimCTConfig overrides, e.g. simct_span_score=logprob_mean (values parsed as JSON "
                             "when they parse, else kept as strings)")
    parser.add_argument("--tag", default=None,
                        help="variant label keying the results (default: built from --lr/--temperature/--set; "
                             "empty for the defaults)")
    options = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    previous = stem(options.setting).with_suffix(".json")
    previous = json.loads(previous.read_text()) if previous.exists() else {}
    if previous.get("baseline") and options.testbed_seed == 0:  # the checkpoints are cached: so are their scores
        baseline = previous["baseline"]
    else:
        baseline = baselines(options.setting, options.testbed_seed)
    print(json.dumps(baseline), flush=True)
    overrides = {}
    for item in options.overrides:
        name, _, value = item.partition("=")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name] = value
    variant = options.tag
    if variant is None:
        parts = [f"lr{options.lr:g}"] if options.lr != 1e-3 else []
        parts += [f"T{options.temperature:g}"] if options.temperature != 1.0 else []
        parts += [f"{k}={v}" for k, v in sorted(overrides.items())]
        variant = " ".join(parts)
    jobs = [
        dict(setting=options.setting, testbed_seed=options.testbed_seed, seed=seed, steps=options.steps,
             method=method, lr=options.lr, temperature=options.temperature, overrides=overrides, variant=variant)
        for seed in options.seeds
        for method in options.methods
    ]
    command = "python bench/" + " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    hardware = (f"{os.cpu_count()}-core CPU ({platform.machine()}) shared with other jobs, torch {torch.__version__}, "
                "1 thread, runs one after another")
    if options.no_save:
        for job in jobs:
            run_one(job)
        return 0
    if options.workers == 1:  # each finished run is saved at once, so an interrupted call keeps what it did
        for job in jobs:
            record = save([run_one(job)], command, hardware, baseline, options.setting)
    else:
        with ProcessPoolExecutor(options.workers) as pool:
            record = save(list(pool.map(run_one, jobs)), command, hardware, baseline, options.setting)
    print(write_report(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
