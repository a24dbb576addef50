"""No silent switch (issue 14): every field that `OPDConfig`, `SimCTConfig` and `RLADConfig` add to their TRL parents
changes what one training step computes or logs, or is refused when the config is built, with a message that names
a trainer that runs it; and every pair of OPDTrainer's method components trains 2 steps or is refused.

The registry that decides the refusals is `trl_opd.trainers.support`; these tests check it against real runs on
tiny models (tests/tiny.py), each against the same run (same seed) with the field left off.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import pytest
import torch
from datasets import Dataset
from safetensors.torch import save_file
from trl import DistillationConfig, GRPOConfig

from tiny import cpu_args, prompt_dataset, save_anchor, tiny_model, tiny_tokenizer
from trl_opd import OPDConfig, OPDTrainer, RLADConfig, RLADTrainer, SimCTConfig, SimCTTrainer
from trl_opd.representation import BridgeProjector
from trl_opd.testbed.models import tiny_model as char_level_model
from trl_opd.testbed.tokenizers import char_tokenizer
from trl_opd.trainers.support import OPD_COMBINATIONS, TRAINERS, combination_pairs, own_fields

BRIDGE, ANCHOR = "<bridge file>", "<anchor file>"  # replaced by files the module fixtures write
THINK_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if think %}think\n{% endif %}"


@dataclass(frozen=True)
class Case:
    """`on`: the settings that switch the field on; `off`: the same run with the field at its default (a tuning
    field is set together with the switch that enables it, in both runs); `data`: "plain" or "chat" (conversational
    prompts and a chat template that reads the argument `think`); `teacher`: OPDTrainer's teacher, "teacher" (as
    deep as the student) or "deep_teacher" (one layer more)."""

    on: dict
    off: dict = field(default_factory=dict)
    data: str = "plain"
    teacher: str = "teacher"


def case(on: dict, off: dict | None = None, data: str = "plain", teacher: str = "teacher") -> Case:
    return Case(on, {} if off is None else off, data, teacher)


TIP, POSITION, PRIVILEGED = {"token_selection": "tip_soft_or"}, {"position_weighting": "increasing"}, \
    {"use_teacher_context": True}
OPRD, BRIDGED = {"representation_weight": 0.1}, {"representation_weight": 0.1, "projector": "bridge"}
RANDOM_BRIDGE = {**BRIDGED, "allow_random_projector": True}

# The AAPA fields of OPDConfig (the anchor term) and RLADConfig (the anchor reward); SimCTTrainer refuses them.
ANCHORED = {"aapa_discriminator_path": ANCHOR}
AAPA_CASES = {
    "aapa_discriminator_path": case(ANCHORED),
    "aapa_weight": case({**ANCHORED, "aapa_weight": 0.5}, ANCHORED),
    "aapa_start_step": case({**ANCHORED, "aapa_start_step": 1}, ANCHORED),
    "aapa_ramp_steps": case({**ANCHORED, "aapa_ramp_steps": 2}, ANCHORED),
}
# Every field OPDConfig adds to (or re-defaults in) DistillationConfig, also run by SimCTTrainer.
OPD_CASES = {
    "divergence": case({"divergence": "forward_kl"}),
    "beta": case({"divergence": "jsd", "beta": 0.2}, {"divergence": "jsd"}),
    "alpha": case({"divergence": "skew_forward_kl", "alpha": 0.5}, {"divergence": "skew_forward_kl"}),
    "distillation_temperature": case({"distillation_temperature": 2.0}),
    "estimator": case({"estimator": "k3"}),
    "loss_top_k": case({"loss_top_k": 4}),
    "loss_top_k_source": case({"loss_top_k": 4, "loss_top_k_source": "teacher"}, {"loss_top_k": 4}),
    "loss_top_k_tail": case({"loss_top_k": 4, "loss_top_k_tail": True}, {"loss_top_k": 4}),
    "clip": case({"clip": 0.001}),
    "loss_reduction": case({**POSITION, "loss_reduction": "weighted_mean"}, POSITION),
    "lmbda": case({"lmbda": 0.0}),
    "seq_kd": case({"lmbda": 0.0, "seq_kd": True}, {"lmbda": 0.0}),
    "token_selection": case(TIP),
    "token_ratio": case({**TIP, "token_ratio": 1.0}, TIP),
    "token_selection_scope": case({**TIP, "token_selection_scope": "batch"}, TIP),
    "token_importance_weighting": case({"token_selection": "tip_entropy_sample", "token_importance_weighting": True},
                                       {"token_selection": "tip_entropy_sample"}),
    "position_weighting": case(POSITION),
    "position_w_min": case({**POSITION, "position_w_min": 0.9}, POSITION),
    "position_tau": case({**POSITION, "position_tau": 0.8}, POSITION),
    "position_slope": case({**POSITION, "position_slope": 0.5}, POSITION),
    "evidence_mode": case({"evidence_mode": "quantile"}),
    "evidence_threshold": case({"evidence_mode": "threshold", "evidence_threshold": -100.0},
                               {"evidence_mode": "threshold"}),
    "evidence_quantile": case({"evidence_mode": "quantile", "evidence_quantile": 0.8}, {"evidence_mode": "quantile"}),
    "use_teacher_context": case(PRIVILEGED),
    "teacher_context_column": case({**PRIVILEGED, "teacher_context_column": "completion"}, PRIVILEGED),
    "teacher_problem_column": case({**PRIVILEGED, "teacher_problem_column": "problem"}, PRIVILEGED),
    "teacher_prompt_template": case({**PRIVILEGED, "teacher_prompt_template": "opsd_v1"}, PRIVILEGED),
    "student_chat_template_kwargs": case({"student_chat_template_kwargs": {"think": True}}, data="chat"),
    "teacher_chat_template_kwargs": case({"teacher_chat_template_kwargs": {"think": True}}, data="chat"),
    "guided_fraction": case({**PRIVILEGED, "guided_fraction": 1.0}, PRIVILEGED),
    "aligned_prompt_template": case({"aligned_prompt_template": "boxed"}),
    "aligned_prompt_ratio": case({"aligned_prompt_template": "boxed", "aligned_prompt_ratio": 1.0},
                                 {"aligned_prompt_template": "boxed"}),
    "diagnostics_steps": case({"diagnostics_steps": 1}),
    "diagnostics_top_k": case({"diagnostics_steps": 1, "diagnostics_top_k": 2}, {"diagnostics_steps": 1}),
    "representation_weight": case(OPRD),
    "logit_weight": case({"logit_weight": 0.5}),
    "representation_layers": case({**OPRD, "representation_layers": "last"}, OPRD),
    "representation_positions": case({**OPRD, "representation_last_k": 2, "representation_positions": "all"},
                                     {**OPRD, "representation_last_k": 2}),
    "representation_last_k": case({**OPRD, "representation_last_k": 2}, OPRD),
    "representation_position_convention": case({**OPRD, "representation_position_convention": "at_token"}, OPRD),
    # 2 → 3 layers, "odd": the student's [2] pairs with the teacher's 3 by depth, with its last odd layer 2 in the
    # reference code's map over each side's list.
    "representation_layer_map": case({**OPRD, "representation_layers": "odd", "representation_layer_map": "selected"},
                                     {**OPRD, "representation_layers": "odd"}, teacher="deep_teacher"),
    "representation_normalize": case({**OPRD, "representation_normalize": True}, OPRD),
    "projector": case(RANDOM_BRIDGE, OPRD),
    "bridge_rank": case({**RANDOM_BRIDGE, "bridge_rank": 2}, RANDOM_BRIDGE),
    "bridge_path": case({**BRIDGED, "bridge_path": BRIDGE}, RANDOM_BRIDGE),
    "bridge_fit_prompts": case({**BRIDGED, "bridge_fit_prompts": 2}, BRIDGED),
    "allow_random_projector": case(RANDOM_BRIDGE, BRIDGED),
    **AAPA_CASES,
}
# The dataset's completions (" 0+1=1. \\boxed{1}"): BPE merges such as "Ġ\\" "boxed" against the teacher's
# characters make 1:n spans (the random student's samples are mostly stray bytes); "decoded" puts the space, the
# first teacher token of these spans, in V∩.
SPANS = {"lmbda": 0.0, "max_completion_length": 12, "shared_vocabulary_mode": "decoded"}
ULD = {"cross_tokenizer_loss": "uld"}
SIMCT_CASES = {
    **OPD_CASES,
    "cross_tokenizer_loss": case(ULD),
    "simct_span_score": case({**SPANS, "simct_span_score": "logprob_mean"}, SPANS),
    "shared_vocabulary_mode": case({"shared_vocabulary_mode": "decoded"}),
    "uld_merge": case({**SPANS, **ULD, "uld_merge": "bayesian"}, {**SPANS, **ULD}),
    "simct_exclusive_spans": case({**SPANS, "simct_exclusive_spans": True}, SPANS),
    "simct_min_teacher_coverage": case({"simct_min_teacher_coverage": 0.5}),
}
RLAD_CASES = {
    "rlad_alpha": case({"rlad_alpha": 0.5}, {"rlad_alpha": 1.0}),
    "rlad_teacher_clamp": case({"rlad_teacher_clamp": 0.01}),
    "rlad_teacher_clamp_mode": case({"rlad_teacher_clamp": 0.3, "rlad_teacher_clamp_mode": "literal"},
                                    {"rlad_teacher_clamp": 0.3}),
    "rlad_log_teacher_stats": case({"rlad_alpha": 1.0, "rlad_log_teacher_stats": True}, {"rlad_alpha": 1.0}),
    **AAPA_CASES,
}
CASES = {"OPDTrainer": OPD_CASES, "SimCTTrainer": SIMCT_CASES, "RLADTrainer": RLAD_CASES}

# Fields whose value need not change what a step computes: a trainer that runs them must accept any valid value,
# one that does not must refuse a non-default one. Value to try, and why the step is the same.
IMPLEMENTATION_FIELDS = {
    "loss_chunk_size": (3, "memory only: the same loss, 3 tokens of logits at a time (test_loss_chunking.py)"),
    "loss_implementation": ("checkpointed", "speed only: the same values and gradients (test_opd_trainer.py parity)"),
    "token_scoring_chunk_size": (2, "memory only: TIP's scores, 2 tokens at a time (test_tip.py)"),
    "explicit_position_ids": (False, "the same positions up to RoPE's relative invariance (test_self_distillation.py)"),
}
# Where a served teacher is and how it is asked: need a running server, so covered where serving is tested
# (tests/test_served_teacher.py: same losses as the local teacher per backend, refusals, faults; SimCTTrainer
# refuses them there).
SERVED_FIELDS = {name: "the teacher server (test_served_teacher.py, test_vllm_teacher.py)" for name in (
    "teacher_model_server_url", "teacher_server_backend", "teacher_server_top_k", "teacher_server_model",
    "teacher_server_timeout", "teacher_server_retry_seconds", "teacher_server_wait_seconds")}
ROUTING_FIELDS = {name: "the teachers to load or ask, by row (test_teachers.py)"
                  for name in ("teachers", "teacher_id_column")}
# Fields that say which model or tokenizer to load: covered where loading is tested.
LOADING_FIELDS = {
    "OPDTrainer": {**SERVED_FIELDS, **ROUTING_FIELDS},
    "SimCTTrainer": {"teacher_tokenizer_name_or_path": "the teacher's tokenizer files (test_simct_trainer.py)",
                     **SERVED_FIELDS, **ROUTING_FIELDS},
    "RLADTrainer": {
        **SERVED_FIELDS,
        "teacher_model_name_or_path": "the teacher to load (test_rlad_trainer.py, a teacher given by path)",
        "teacher_model_revision": "the revision of the teacher to load",
        "teacher_model_init_kwargs": "from_pretrained arguments of the teacher to load (test_rlad_trainer.py)",
    },
}
CONFIGS = {"OPDTrainer": (OPDConfig, DistillationConfig), "SimCTTrainer": (SimCTConfig, DistillationConfig),
           "RLADTrainer": (RLADConfig, GRPOConfig)}
IMPLEMENTATION_CASES = {"OPDTrainer": IMPLEMENTATION_FIELDS, "SimCTTrainer": IMPLEMENTATION_FIELDS, "RLADTrainer": {}}
VOLATILE = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def char_variety_reward(prompts, completions, **kwargs):
    """Differs between completions of random models, so GRPO's advantages are not all zero."""
    return [float(len(set(text))) for text in completions]


# ---------------------------------------------------------------- models, data and runs (built once per module)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizers, models and data of all three trainers, and the files some fields point to."""
    files = tmp_path_factory.mktemp("switch-files")
    # 300 entries: byte-level BPE with merges ("boxed", "Compute"), so SimCT aligns 1:n spans with the character-level
    # teacher (tiny_tokenizer's default 120 leaves only the 259 single bytes and specials).
    tokenizer, teacher_tokenizer = tiny_tokenizer(vocab_size=300), char_tokenizer()
    flagged, teacher_flagged = copy.deepcopy(tokenizer), copy.deepcopy(teacher_tokenizer)
    flagged.chat_template = teacher_flagged.chat_template = THINK_TEMPLATE
    rlad_teacher = tiny_model(tokenizer, hidden=48, seed=1)
    with torch.no_grad():
        rlad_teacher.lm_head.weight.mul_(3.0)  # confident, far from the near-uniform student: the clamp matters

    bridge = BridgeProjector(32, 48, 2, 8)
    generator = torch.Generator().manual_seed(0)
    teacher_states = [torch.randn(40, 48, generator=generator) for _ in range(2)]
    bridge.fit_teacher(teacher_states)
    bridge.fit_student([torch.randn(40, 32, generator=generator) for _ in range(2)], teacher_states)
    save_file(dict(bridge.state_dict()), files / "bridge.safetensors")
    save_anchor(files / "anchor.pt")

    plain = prompt_dataset(8)
    plain = plain.add_column("solution", [f"[{i}]" + text for i, text in enumerate(plain["completion"])])
    plain = plain.add_column("problem", [f"Add {i} and {i + 1}." for i in range(8)])
    chat = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Compute {i}+1."}] for i in range(8)],
                              "completion": [f" {i}+1={i + 1}." for i in range(8)],
                              "solution": [f"{i + 1}" for i in range(8)]})
    return {
        "tokenizer": {"plain": tokenizer, "chat": flagged},
        "teacher_tokenizer": {"plain": teacher_tokenizer, "chat": teacher_flagged},
        "student": tiny_model(tokenizer, hidden=32, seed=0),
        "teacher": tiny_model(tokenizer, hidden=48, seed=1),
        "deep_teacher": tiny_model(tokenizer, hidden=48, layers=3, seed=1),
        "char_teacher": char_level_model(teacher_tokenizer, hidden=32, layers=1, heads=2, seed=1),
        "rlad_teacher": rlad_teacher,
        "data": {"plain": plain, "chat": chat},
        "files": {BRIDGE: str(files / "bridge.safetensors"), ANCHOR: str(files / "anchor.pt")},
        "output_dir": str(files / "out"),
    }


def config(world, trainer: str, settings: dict, **overrides):
    """The trainer's config for `settings` on tiny CPU runs (files substituted)."""
    settings = {key: world["files"].get(value, value) if isinstance(value, str) else value
                for key, value in settings.items()}
    common = cpu_args(**{"max_steps": 1, "max_completion_length": 6, **overrides})
    if trainer == "RLADTrainer":
        common.update(num_generations=4, temperature=0.7)
    return CONFIGS[trainer][0](output_dir=world["output_dir"], **{**common, **settings})


def build(world, trainer: str, args, data: str = "plain", teacher: str = "teacher"):
    tokenizer, dataset = world["tokenizer"][data], world["data"][data]
    student = copy.deepcopy(world["student"])
    if trainer == "OPDTrainer":
        teacher = None if args.uses_self_teacher() else copy.deepcopy(world[teacher])
        return OPDTrainer(student, teacher, args=args, train_dataset=dataset, processing_class=tokenizer)
    if trainer == "SimCTTrainer":
        return SimCTTrainer(student, copy.deepcopy(world["char_teacher"]), args=args, train_dataset=dataset,
                            processing_class=tokenizer, teacher_processing_class=world["teacher_tokenizer"][data])
    return RLADTrainer(student, char_variety_reward, args=args, train_dataset=dataset, processing_class=tokenizer,
                       teacher_model=copy.deepcopy(world["rlad_teacher"]))


@pytest.fixture(scope="module")
def first_step(world):
    """`first_step(trainer, settings, data)`: the first logged step of a 1-step run, timings left out (cached)."""
    done = {}

    def run(trainer: str, settings: dict, data: str = "plain", teacher: str = "teacher") -> dict:
        key = (trainer, data, teacher, repr(sorted(settings.items())))
        if key not in done:
            run_trainer = build(world, trainer, config(world, trainer, settings), data, teacher)
            run_trainer.train()
            logged = run_trainer.state.log_history[0]
            done[key] = {name: value for name, value in logged.items() if name not in VOLATILE}
        return done[key]

    return run


def refusal(make) -> str | None:
    """The ValueError message of `make()`, or None when it raises nothing."""
    try:
        make()
    except ValueError as error:
        return str(error)
    return None


def check_refusal(world, trainer: str, name: str, message: str) -> None:
    """The message names the field and another trainer, and that trainer accepts the field."""
    assert name in message, message
    supporters = [other for other in TRAINERS if other != trainer and other in message]
    assert supporters, f"the refusal names no trainer that runs `{name}`: {message}"
    for other in supporters:
        if name in CASES[other]:
            assert refusal(lambda: config(world, other, CASES[other][name].on)) is None, (other, name)


# ---------------------------------------------------------------- every field is listed


@pytest.mark.parametrize("trainer", list(CONFIGS))
def test_every_added_field_has_a_case(trainer):
    """A new config field without an entry here fails: give it a case (or a reason why a step need not change)."""
    config_class, parent = CONFIGS[trainer]
    added = {f.name for f in own_fields(config_class, parent)}
    listed = set(CASES[trainer]) | set(IMPLEMENTATION_CASES[trainer]) | set(LOADING_FIELDS.get(trainer, {}))
    assert added - listed == set(), f"fields of {config_class.__name__} without a case"
    assert listed - added == set(), f"cases for fields {config_class.__name__} does not add"


def test_runs_are_reproducible(first_step, world):
    """The comparison below is sound: the same settings give the same logged step."""
    for trainer in CONFIGS:
        first = first_step(trainer, {})
        again = build(world, trainer, config(world, trainer, {}))
        again.train()
        assert {k: v for k, v in again.state.log_history[0].items() if k not in VOLATILE} == first, trainer


# ---------------------------------------------------------------- one switch at a time


SWITCHES = [(trainer, name) for trainer, cases in CASES.items() for name in cases]


@pytest.mark.parametrize(("trainer", "name"), SWITCHES, ids=[f"{t}-{n}" for t, n in SWITCHES])
def test_switch_changes_the_step_or_is_refused(first_step, world, trainer, name):
    switch = CASES[trainer][name]
    message = refusal(lambda: config(world, trainer, switch.on))
    if message is not None:  # a tuning field is refused on its own too, not only with the switch that enables it
        alone = refusal(lambda: config(world, trainer, {name: switch.on[name]}))
        assert alone is not None, f"{trainer} refuses {switch.on} but accepts {name} alone: {message}"
        check_refusal(world, trainer, name, alone)
        return
    on = first_step(trainer, switch.on, switch.data, switch.teacher)
    off = first_step(trainer, switch.off, switch.data, switch.teacher)
    changed = sorted(key for key in on.keys() | off.keys() if on.get(key) != off.get(key))
    assert changed, f"{trainer} accepted {switch.on} and logged exactly what it logs with {switch.off}: {on}"


IMPLEMENTATIONS = [(trainer, name) for trainer, fields in IMPLEMENTATION_CASES.items() for name in fields]


@pytest.mark.parametrize(("trainer", "name"), IMPLEMENTATIONS, ids=[f"{t}-{n}" for t, n in IMPLEMENTATIONS])
def test_implementation_field_is_run_or_refused(world, trainer, name):
    value, _ = IMPLEMENTATION_CASES[trainer][name]
    message = refusal(lambda: config(world, trainer, {name: value}))
    if message is not None:
        check_refusal(world, trainer, name, message)
        return
    run_trainer = build(world, trainer, config(world, trainer, {name: value}))
    run_trainer.train()
    assert math.isfinite(run_trainer.state.log_history[0]["loss"])


def test_simct_refuses_what_its_loss_never_runs(world):
    """The known bug: SimCTConfig accepted OPRD, logit_weight and diagnostics, and SimCTTrainer never ran them."""
    for settings in ({"representation_weight": 0.1}, {"logit_weight": 0.5}, {"diagnostics_steps": 1}):
        with pytest.raises(ValueError, match="SimCTTrainer does not run.*Supported by OPDTrainer"):
            config(world, "SimCTTrainer", settings)


# ---------------------------------------------------------------- every pair of OPDTrainer's components


PAIRS = combination_pairs()


@pytest.mark.parametrize(("first", "second", "settings"), PAIRS, ids=[f"{a}+{b}" for a, b, _ in PAIRS])
def test_pair_trains_or_is_refused(world, first, second, settings):
    message = refusal(lambda: config(world, "OPDTrainer", settings, max_steps=2, per_device_train_batch_size=2,
                                     max_completion_length=4))
    if message is not None:
        assert any(key in message for key in settings), message
        return
    trainer = build(world, "OPDTrainer", config(world, "OPDTrainer", settings, max_steps=2,
                                                per_device_train_batch_size=2, max_completion_length=4))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses


def test_pairs_cover_every_component_setting():
    assert {name for pair in PAIRS for name in pair[:2]} == set(OPD_COMBINATIONS)
