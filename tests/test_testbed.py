"""Tests of trl_opd.testbed: task correctness, tokenizers, tiny models, SFT, the checkpoint cache, evaluation."""

import itertools
import json
import random
import re

import pytest
import torch
from transformers import AutoTokenizer

from trl_opd.eval.grading import extract_boxed
from trl_opd.testbed import evaluation, training
from trl_opd.testbed.evaluation import accuracy, analyse_answer, grade_answer, strategy_summary
from trl_opd.testbed.models import ModelSpec, tiny_config, tiny_model
from trl_opd.testbed.task import (
    TaskConfig,
    heldout_problems,
    iter_problems,
    make_dataset,
    make_problem,
    parse_prompt,
    strategy_pairs,
    task_stream,
    validation_problems,
)
from trl_opd.testbed.tokenizers import bpe_tokenizer, char_tokenizer, task_tokenizer
from trl_opd.testbed.training import (
    SETTINGS,
    AccuracyStopCallback,
    TrainSpec,
    build_student,
    build_teacher,
    cache_key,
    load_pretrained,
    prepare,
    read_metadata,
    sft,
)

@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine it spins idle."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


MAIN = TaskConfig()
MULTI = TaskConfig(allow_subtraction=False, num_strategies=6)
STEP = re.compile(r"(\d+)([+\-])(\d+)=(\d+)\.")


def check_worked_solution(problem):
    """Independent re-derivation: the steps combine the prompt's terms left to right, each sum/difference is
    right and non-negative, each step starts from the previous result, and the boxed number is the answer."""
    terms, operators = parse_prompt(problem["prompt"])
    steps = STEP.findall(problem["completion"])
    assert len(steps) == len(operators)
    value = terms[0]
    for (left, operator, right, result), expected_operator, term in zip(steps, operators, terms[1:]):
        assert (int(left), operator, int(right)) == (value, expected_operator, term)
        value = value + term if operator == "+" else value - term
        assert int(result) == value >= 0
    assert extract_boxed(problem["completion"]) == problem["answer"] == str(value)


# ---------------------------------------------------------------------------------------------------- task


def test_example_problem_format():
    problem = make_problem(random.Random(0), MAIN)
    assert re.fullmatch(r"Compute \d\d[+\-]\d\d[+\-]\d\d\.\n", problem["prompt"])
    assert re.fullmatch(r"\d+[+\-]\d+=\d+\. \d+[+\-]\d+=\d+\. \\boxed\{\d+\}", problem["completion"])
    assert problem["solution"] == problem["completion"]


@pytest.mark.parametrize(
    "cfg", [MAIN, TaskConfig(num_operations=4, digits=3), TaskConfig(num_operations=3, digits=1)], ids=str
)
def test_chain_arithmetic_and_no_negative_values(cfg):
    rng = random.Random(1)
    problems = [make_problem(rng, cfg) for _ in range(500)]
    for problem in problems:
        check_worked_solution(problem)
    subtractions = sum(problem["prompt"].count("-") for problem in problems)
    assert subtractions > 0.25 * 500 * cfg.num_operations  # subtraction is drawn, not just never chosen


def test_additions_only_has_no_subtraction():
    rng = random.Random(2)
    assert all("-" not in make_problem(rng, TaskConfig(allow_subtraction=False))["prompt"] for _ in range(200))


def test_operand_digits():
    rng = random.Random(0)
    terms = [t for _ in range(300) for t in parse_prompt(make_problem(rng, TaskConfig(digits=3))["prompt"])[0]]
    assert min(terms) >= 100 and max(terms) <= 999


def test_strategies_are_distinct_valid_and_cover_the_mix():
    pairs = strategy_pairs(3)
    assert pairs[0] == (0, 1) and len(set(pairs)) == 6 and set(pairs) == {(i, j) for i in range(3) for j in range(3) if i != j}
    for seed in range(50):
        variants = [make_problem(random.Random(seed), MULTI, strategy=s) for s in range(6)]
        assert len({v["prompt"] for v in variants}) == 1  # same problem drawn
        assert len({v["completion"] for v in variants}) == 6
        assert len({v["answer"] for v in variants}) == 1
        terms, _ = parse_prompt(variants[0]["prompt"])
        assert len(set(terms)) == 3
        for index, variant in enumerate(variants):
            steps = STEP.findall(variant["completion"])
            i, j = pairs[index]
            remaining = ({0, 1, 2} - {i, j}).pop()
            assert (int(steps[0][0]), int(steps[0][2])) == (terms[i], terms[j])
            assert int(steps[1][0]) == int(steps[0][3]) and int(steps[1][2]) == terms[remaining]
            assert int(steps[1][3]) == sum(terms) == int(variant["answer"])
            assert extract_boxed(variant["completion"]) == variant["answer"]
    drawn = {make_problem(random.Random(seed), MULTI)["strategy"] for seed in range(300)}
    assert drawn == set(range(6))
    k3 = TaskConfig(allow_subtraction=False, num_strategies=3)
    assert {make_problem(random.Random(seed), k3)["strategy"] for seed in range(200)} == {0, 1, 2}


def test_fixed_strategy_and_bad_strategy():
    assert {make_problem(random.Random(s), MULTI, strategy=0)["strategy"] for s in range(50)} == {0}
    with pytest.raises(ValueError, match="strategy"):
        make_problem(random.Random(0), MULTI, strategy=6)
    with pytest.raises(ValueError, match="strategy"):
        make_problem(random.Random(0), MAIN, strategy=1)


def test_config_validation():
    with pytest.raises(ValueError, match="allow_subtraction=False"):
        TaskConfig(num_strategies=6)
    with pytest.raises(ValueError, match="num_strategies"):
        TaskConfig(allow_subtraction=False, num_strategies=7)
    with pytest.raises(ValueError, match="too few"):
        TaskConfig(num_operations=1, digits=1)
    with pytest.raises(ValueError, match="num_operations"):
        TaskConfig(num_operations=0)


def test_harder_variant():
    harder = MAIN.harder(extra_operations=1, extra_digits=1)
    assert (harder.num_operations, harder.digits) == (3, 3)
    problem = make_problem(random.Random(0), harder)
    assert len(parse_prompt(problem["prompt"])[0]) == 4
    check_worked_solution(problem)
    multi_harder = MULTI.harder()
    assert multi_harder.num_strategies == len(strategy_pairs(4)) == 12
    assert heldout_problems(harder) != heldout_problems(MAIN)


def test_heldout_set_is_fixed_distinct_and_excluded_from_training():
    heldout = heldout_problems(MAIN)
    assert len(heldout) == 300 and len({p["prompt"] for p in heldout}) == 300
    assert heldout == heldout_problems(MAIN)
    validation = validation_problems(MAIN)
    assert len(validation) == 300 and not {p["prompt"] for p in validation} & {p["prompt"] for p in heldout}
    # A task small enough that the stream would hit reserved prompts often (~52k prompts, 600 reserved).
    small = TaskConfig(num_operations=3, digits=1)
    reserved = {p["prompt"] for p in heldout_problems(small) + validation_problems(small)}
    drawn = {p["prompt"] for p in itertools.islice(iter_problems(small, seed=0), 5000)}
    assert not reserved & drawn
    unfiltered = {p["prompt"] for p in itertools.islice(iter_problems(small, seed=0, exclude=()), 5000)}
    assert reserved & unfiltered  # ~57 hits expected: the check above can fail


def test_dataset_and_stream():
    data = make_dataset(10, MAIN, seed=3)
    assert set(data.column_names) == {"prompt", "completion", "answer", "solution", "strategy"}
    assert all(isinstance(p, str) for p in data["prompt"])
    streamed = [row for _, row in zip(range(10), task_stream(MAIN, seed=3))]
    assert [r["prompt"] for r in streamed] == data["prompt"]
    assert make_dataset(10, MAIN, seed=4)["prompt"] != data["prompt"]
    assert set(make_dataset(40, MULTI, seed=0, strategy=2)["strategy"]) == {2}


# ---------------------------------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def tokenizers():
    return {"char": char_tokenizer(), "bpe": task_tokenizer("bpe", MAIN)}


TEXTS = [p["prompt"] + p["completion"] for p in heldout_problems(MAIN)[:50] + heldout_problems(MULTI)[:50]]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizer_round_trip_and_save_load(tokenizers, kind, tmp_path):
    tokenizer = tokenizers[kind]
    for text in TEXTS + ["a\n\nb  c", "<|im_start|>user\nx<|im_end|>"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.decode(tokenizer(TEXTS[0] + "<eos>")["input_ids"][-1:]) == "<eos>"
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS[:10]:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.eos_token, loaded.pad_token, loaded.bos_token, loaded.padding_side) == ("<eos>", "<pad>", None, "left")
    chat = loaded.apply_chat_template([{"role": "user", "content": "Compute 1+2."}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"


def test_char_tokenizer_is_one_token_per_character(tokenizers):
    char = tokenizers["char"]
    for text in TEXTS:
        ids = char(text)["input_ids"]
        assert len(ids) == len(text) and char.unk_token_id not in ids
    assert char("Compute")["input_ids"] == [char.convert_tokens_to_ids(c) for c in "Compute"]


def test_bpe_tokenises_differently(tokenizers):
    char, bpe = tokenizers["char"], tokenizers["bpe"]
    assert sum(len(bpe(t)["input_ids"]) for t in TEXTS) < 0.8 * sum(len(char(t)["input_ids"]) for t in TEXTS)
    assert bpe_tokenizer(TEXTS, vocab_size=300).get_vocab() == bpe_tokenizer(TEXTS, vocab_size=300).get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        bpe_tokenizer(TEXTS, vocab_size=100)


def test_left_padding(tokenizers):
    batch = tokenizers["char"](["Compute 1+2.\n", "Compute 10+20.\n"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0] == tokenizers["char"].pad_token_id and batch["attention_mask"][0, :2].sum() == 0


# ---------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_tiny_configs(tokenizers, arch):
    teacher = tiny_config(tokenizers["char"], role="teacher", arch=arch)
    student = tiny_config(tokenizers["char"], role="student", arch=arch)
    assert (teacher.num_hidden_layers, teacher.hidden_size, teacher.num_attention_heads) == (2, 96, 4)
    assert (student.num_hidden_layers, student.hidden_size, student.num_attention_heads) == (2, 64, 2)
    assert teacher.intermediate_size == 384 and teacher.tie_word_embeddings and teacher.head_dim == 24
    assert teacher.vocab_size == len(tokenizers["char"])
    model = tiny_model(tokenizers["bpe"], role="student", arch=arch, hidden=32)
    assert model.generation_config.eos_token_id == tokenizers["bpe"].eos_token_id
    assert model.generation_config.pad_token_id == tokenizers["bpe"].pad_token_id
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(tokenizers["char"], hidden=30, heads=4)


def test_model_spec_validation():
    assert ModelSpec.for_role("student", arch="llama") == ModelSpec(arch="llama", hidden=64, layers=2, heads=2)
    with pytest.raises(ValueError, match="role"):
        ModelSpec.for_role("assistant")
    with pytest.raises(ValueError, match="tokenizer"):
        ModelSpec(tokenizer="word")


# ---------------------------------------------------------------------------------------------------- training


def test_sft_lowers_the_completion_loss(tokenizers):
    model = tiny_model(tokenizers["char"], role="student", hidden=32, layers=1, heads=2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = sft(model, tokenizers["char"], task_stream(MAIN), steps=20, batch_size=8, learning_rate=1e-2,
                 warmup_steps=2, logging_steps=1, show_progress=False)
    assert result.steps == 20 and len(result.losses) == 20
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < 0.8 * first
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters())


def test_training_stops_at_target_accuracy(tokenizers, monkeypatch):
    scores = iter([0.05, 0.30, 0.60])
    monkeypatch.setattr(training, "accuracy", lambda *args, **kwargs: next(scores))
    model = tiny_model(tokenizers["char"], role="student", hidden=16, layers=1, heads=2)
    result = sft(model, tokenizers["char"], task_stream(MAIN), steps=50, batch_size=4, eval_problems=[{}],
                 eval_every=3, target_accuracy=0.25, show_progress=False)
    assert result.evaluations == [(3, 0.05), (6, 0.30)]
    assert result.steps == 6 and result.reached_target


def test_stop_callback_only_evaluates_on_schedule(monkeypatch):
    monkeypatch.setattr(training, "accuracy", lambda *args, **kwargs: 0.9)
    callback = AccuracyStopCallback(None, None, [{}], every=5, target=0.95, verbose=False)

    class State:
        global_step = 0

    class Control:
        should_training_stop = False

    for step in range(1, 11):
        State.global_step = step
        callback.on_step_end(None, State, Control)
    assert callback.evaluations == [(5, 0.9), (10, 0.9)] and not Control.should_training_stop


def test_sft_argument_errors(tokenizers):
    model = tiny_model(tokenizers["char"], role="student", hidden=16, layers=1, heads=2)
    with pytest.raises(ValueError, match="eval_problems"):
        sft(model, tokenizers["char"], task_stream(MAIN), steps=1, eval_every=5)
    with pytest.raises(ValueError, match="eval_every"):
        sft(model, tokenizers["char"], task_stream(MAIN), steps=1, target_accuracy=0.5)
    with pytest.raises(ValueError, match="target_accuracy"):
        TrainSpec(eval_every=0)


# ---------------------------------------------------------------------------------------------------- cache

TINY_MODEL = ModelSpec(hidden=16, layers=1, heads=2)
TINY_TRAINING = TrainSpec(steps=2, batch_size=4, warmup_steps=0, eval_every=0, target_accuracy=None)


def test_cache_key_depends_on_every_input():
    base = ("teacher", MAIN, TINY_MODEL, TINY_TRAINING, 0)
    variants = [
        ("student", MAIN, TINY_MODEL, TINY_TRAINING, 0),
        ("teacher", MULTI, TINY_MODEL, TINY_TRAINING, 0),
        ("teacher", MAIN, ModelSpec(hidden=16, layers=1, heads=2, tokenizer="bpe"), TINY_TRAINING, 0),
        ("teacher", MAIN, ModelSpec(hidden=16, layers=1, heads=2, arch="llama"), TINY_TRAINING, 0),
        ("teacher", MAIN, TINY_MODEL, TrainSpec(steps=3, batch_size=4, warmup_steps=0, eval_every=0, target_accuracy=None), 0),
        ("teacher", MAIN, TINY_MODEL, TINY_TRAINING, 1),
    ]
    keys = {cache_key(*base)} | {cache_key(*v) for v in variants}
    assert len(keys) == 1 + len(variants)
    assert cache_key(*base) == cache_key("teacher", TaskConfig(), ModelSpec(hidden=16, layers=1, heads=2), TINY_TRAINING, 0)


def test_build_caches_and_reuses(tmp_path, monkeypatch):
    path = build_teacher(MAIN, TINY_MODEL, seed=0, cache_dir=tmp_path, training=TINY_TRAINING, show_progress=False)
    metadata = read_metadata(path)
    assert metadata["steps"] == 2 and metadata["key"] == cache_key("teacher", MAIN, TINY_MODEL, TINY_TRAINING, 0)
    assert 0.0 <= metadata["heldout_accuracy"] <= 1.0
    model, tokenizer = load_pretrained(path)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert accuracy(model, tokenizer, heldout_problems(MAIN)[:4], max_new_tokens=4) == 0.0  # untrained

    def no_training(*args, **kwargs):
        raise AssertionError("a cached checkpoint was retrained")

    monkeypatch.setattr(training, "_train_and_save", no_training)
    assert build_teacher(MAIN, TINY_MODEL, seed=0, cache_dir=tmp_path, training=TINY_TRAINING) == path
    with pytest.raises(AssertionError, match="retrained"):  # another seed is another entry
        build_teacher(MAIN, TINY_MODEL, seed=1, cache_dir=tmp_path, training=TINY_TRAINING)
    assert [p.name for p in tmp_path.iterdir()] == [path.split("/")[-1]]  # no staging directory left behind


def test_partial_entry_is_rebuilt_and_failed_build_leaves_nothing(tmp_path, monkeypatch):
    spec = ModelSpec(hidden=16, layers=1, heads=2, tokenizer="bpe")
    entry = tmp_path / f"student-{cache_key('student', MAIN, spec, TINY_TRAINING, 0)}"
    entry.mkdir()
    (entry / "config.json").write_text("{}")  # what an interrupted copy could leave
    path = build_student(MAIN, spec, seed=0, cache_dir=tmp_path, training=TINY_TRAINING, show_progress=False)
    assert path == str(entry) and read_metadata(path)["role"] == "student"
    assert json.loads((entry / "config.json").read_text())["hidden_size"] == 16

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "sft", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_student(MAIN, spec, seed=5, cache_dir=tmp_path, training=TINY_TRAINING, show_progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]


def test_prepare_builds_each_role_with_its_setting_recipe(monkeypatch, tmp_path):
    calls = {}

    def fake_build(role, task, model, seed, cache_dir, training_spec, show_progress):
        calls[role] = (task, model, seed, cache_dir, training_spec)
        return f"/cache/{role}"

    monkeypatch.setattr(training, "build_model", fake_build)
    assert prepare("multistrategy", seed=3, cache_dir=tmp_path) == {
        "task": MULTI, "teacher": "/cache/teacher", "student": "/cache/student"
    }
    teacher, student = calls["teacher"], calls["student"]
    assert teacher[:4] == (MULTI, ModelSpec(hidden=96, layers=2, heads=4), 3, tmp_path)
    assert (teacher[4].strategy, teacher[4].target_accuracy) == (None, 0.97)  # uniform mix of the 6 strategies
    assert student[:4] == (MULTI, ModelSpec(hidden=64, layers=2, heads=2), 3, tmp_path)
    assert (student[4].strategy, student[4].target_accuracy, student[4].eval_every) == (0, 0.12, 20)
    assert SETTINGS["main"].task == MAIN
    with pytest.raises(ValueError, match="setting"):
        prepare("nonexistent")


# ---------------------------------------------------------------------------------------------------- evaluation


class ScriptedModel:
    """Stands in for a causal LM: "generates" a scripted completion for each prompt, then EOS and padding."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers = tokenizer, answers
        self.training, self.device = True, torch.device("cpu")

    def eval(self):
        self.training = False
        return self

    def train(self, mode=True):
        self.training = mode
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        assert not self.training and kwargs["do_sample"] is False
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        new = [self.tokenizer(self.answers[p])["input_ids"] + [self.tokenizer.eos_token_id] for p in prompts]
        width = max(map(len, new))
        new = [ids + [self.tokenizer.pad_token_id] * (width - len(ids)) for ids in new]
        return torch.cat([input_ids, torch.tensor(new)[:, :max_new_tokens]], dim=1)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_accuracy_grades_boxed_answers(tokenizers, kind):
    problems = heldout_problems(MAIN)[:10]
    scripted = {p["prompt"]: p["completion"] for p in problems[:6]}
    scripted.update({p["prompt"]: p["completion"].replace("boxed{", "boxed{1") for p in problems[6:]})
    model = ScriptedModel(tokenizers[kind], scripted)
    score, records = accuracy(model, tokenizers[kind], problems, batch_size=4, return_records=True)
    assert score == pytest.approx(0.6)
    assert [r["correct"] for r in records] == [True] * 6 + [False] * 4
    assert records[0]["completion"] == problems[0]["completion"] and model.training  # mode restored
    assert records[7]["predicted"] == "1" + problems[7]["answer"]


def test_grade_answer():
    for problem in heldout_problems(MAIN)[:50] + heldout_problems(MULTI)[:50]:
        assert grade_answer(problem["completion"], problem["answer"])
        assert not grade_answer(problem["completion"], str(int(problem["answer"]) + 1))
    assert not grade_answer("59+63=122.", "122")  # no box, no credit
    assert not grade_answer(r"\boxed{107.0}", "107")  # exact match of the number as written


def test_analyse_answer_reads_strategies_and_mixing():
    for seed in range(20):
        for strategy in range(6):
            problem = make_problem(random.Random(seed), MULTI, strategy=strategy)
            analysis = analyse_answer(problem["prompt"], problem["completion"])
            assert analysis["strategy"] == strategy and analysis["consistent"] and analysis["arithmetic_ok"]
            assert not analysis["wrong_remaining_term"]
    prompt = "Compute 12+34+56.\n"
    mixed = analyse_answer(prompt, r"12+34=46. 46+34=80. \boxed{80}")  # adds 34 twice: mixed strategies
    assert mixed["strategy"] == 0 and mixed["wrong_remaining_term"] and not mixed["consistent"]
    wrong_sum = analyse_answer(prompt, r"56+12=68. 68+34=101. \boxed{101}")
    assert wrong_sum["strategy"] == 4 and wrong_sum["consistent"] and not wrong_sum["arithmetic_ok"]
    assert analyse_answer(prompt, r"\boxed{102}")["strategy"] is None
    with pytest.raises(ValueError, match="additions-only"):
        analyse_answer("Compute 12-3+4.\n", "12-3=9.")
    summary = strategy_summary(
        [{"prompt": prompt, "completion": c} for c in (r"12+34=46. 46+56=102.", r"34+12=46. 46+56=102.",
                                                       r"12+34=46. 46+34=80.", r"12+34=46. 46+56=102.")]
    )
    assert summary["strategy_shares"] == {0: 0.75, 3: 0.25}
    assert summary["wrong_remaining_term"] == 0.25 and summary["consistent"] == 0.75


def test_generation_needs_left_padding(tokenizers):
    tokenizer = char_tokenizer()
    tokenizer.padding_side = "right"
    with pytest.raises(ValueError, match="left"):
        evaluation.generate_completions(ScriptedModel(tokenizer, {}), tokenizer, ["Compute 1+2.\n"])


# ---------------------------------------------------------------------------------------------------- shipped pair


def shipped_paths() -> dict:
    """The README toy's pair (multistrategy, seed 0) as `prepare` finds it: the checkpoints shipped with the package."""
    return prepare("multistrategy", seed=0, show_progress=False)


def test_the_toy_pair_ships_with_the_package_and_trains_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_OPD_CACHE", str(tmp_path))  # an empty cache: a fresh machine

    def refuse(*args, **kwargs):
        raise AssertionError("the shipped toy pair was retrained")

    monkeypatch.setattr(training, "sft", refuse)
    paths = shipped_paths()
    for role in ("teacher", "student"):
        assert paths[role].startswith(str(training.SHIPPED_DIR)), paths[role]
        assert read_metadata(paths[role])["key"] in paths[role]
    assert not any(tmp_path.iterdir())


def test_builds_are_reproducible_bit_for_bit(tmp_path):
    """Two cache-miss builds of the same entry (on one thread, whatever the caller's thread count) are equal."""
    torch.set_num_threads(2)
    try:
        first = build_teacher(MAIN, TINY_MODEL, seed=0, cache_dir=tmp_path / "a", training=TINY_TRAINING,
                              show_progress=False)
    finally:
        torch.set_num_threads(1)
    second = build_teacher(MAIN, TINY_MODEL, seed=0, cache_dir=tmp_path / "b", training=TINY_TRAINING,
                           show_progress=False)
    assert_same_weights(first, second)


def assert_same_weights(first: str, second: str) -> None:
    from safetensors.torch import load_file

    a, b = load_file(f"{first}/model.safetensors"), load_file(f"{second}/model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_a_cache_miss_build_gives_the_shipped_pair_and_its_figures(monkeypatch, tmp_path):
    """Rebuilding the toy pair from scratch (minutes) gives the shipped weights bit for bit, so the same before/after
    figures; on another kind of CPU (another SIMD width) a build may differ in the last bits, which is why the pair
    ships."""
    shipped_with = read_metadata(shipped_paths()["teacher"])["built_with"]
    if shipped_with != training.build_conditions():
        pytest.skip(f"the shipped pair was built with {shipped_with}, this machine builds with "
                    f"{training.build_conditions()}: a rebuild may differ in the last bits")
    monkeypatch.setenv("TRL_OPD_BUILD_TESTBED", "1")
    built = prepare("multistrategy", seed=0, cache_dir=tmp_path, show_progress=False)
    monkeypatch.delenv("TRL_OPD_BUILD_TESTBED")
    shipped = shipped_paths()
    for role in ("teacher", "student"):
        assert_same_weights(built[role], shipped[role])
        assert read_metadata(built[role])["heldout_accuracy"] == read_metadata(shipped[role])["heldout_accuracy"]
