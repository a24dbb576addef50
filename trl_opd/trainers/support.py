"""Which method components each trainer runs: one registry, and the one check every config calls at construction.

PEFT decides in one place (`resolve_lora_variant`) which LoRA variant a config asks for and refuses what it cannot
run; this module does the same for the trainers of `trl_opd`:

* a **component** is a method feature (TIP, OPRD, the top-k support, ...) with the config fields that switch it on
  and the fields that only tune it;
* each **trainer** lists the components it runs;
* a **mode** is a setting under which a trainer leaves some of its components out (`logit_weight=0`: no logit
  loss, so no top-k support, no TIP, ...).

`refuse_unsupported(config)`, called by `OPDConfig`, `SimCTConfig` and `RLADConfig` when they are constructed
(before any model is loaded), raises a ValueError for a field that would switch on or tune a component that the
config's trainer does not run, naming the field, the trainer and the trainers that do run it. A tuning field of a
component the trainer runs but that is off (`position_tau` with `position_weighting="none"`) is not refused: the
docstrings say such fields are ignored then.

`README.md`'s "Supported combinations" section is rendered from this module (`scripts/config_table.py`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

_DEFAULT = object()  # "the field's dataclass default"


@dataclass(frozen=True)
class Switch:
    """A field that turns a component on: any value other than `off` (default: the field's default), or, with
    `on`, only those values."""

    field: str
    off: Any = _DEFAULT
    on: tuple | None = None

    def is_on(self, config) -> bool:
        value = getattr(config, self.field)
        if self.on is not None:
            return value in self.on
        return value != (field_default(config, self.field) if self.off is _DEFAULT else self.off)


@dataclass(frozen=True)
class Component:
    """A method feature: `switches` turn it on, `knobs` only tune it (each is set when it leaves its default)."""

    name: str
    title: str
    switches: tuple[Switch, ...] = ()
    knobs: tuple[str, ...] = ()
    owner: str = "OPDConfig"  # the config class that declares these fields (and its subclasses)

    def applies_to(self, config) -> bool:
        return any(cls.__name__ == self.owner for cls in type(config).__mro__)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(switch.field for switch in self.switches) + self.knobs

    def set_fields(self, config) -> list[tuple[str, str]]:
        """(field, "switches on" | "tunes") for each field of this component that `config` sets."""
        if not self.applies_to(config):
            return []
        found = [(s.field, "switches on") for s in self.switches if s.is_on(config)]
        found += [(name, "tunes") for name in self.knobs if getattr(config, name) != field_default(config, name)]
        return found


def _component(name, title, switches=(), knobs=(), owner="OPDConfig") -> Component:
    switches = tuple(s if isinstance(s, Switch) else Switch(s) for s in switches)
    return Component(name, title, switches, tuple(knobs), owner)


COMPONENTS = {c.name: c for c in (
    # the logit loss of OPDTrainer (methods.md §0.3–§0.7, §1)
    _component("divergence", "a divergence other than the reverse KL", ["divergence"], ["beta", "alpha"]),
    _component("loss_temperature", "a loss temperature of its own", ["distillation_temperature"]),
    _component("estimator", "a sampled-token estimator", ["estimator"]),
    _component("top_k", "the top-k support of the divergence", ["loss_top_k"],
               ["loss_top_k_source", "loss_top_k_tail"]),
    _component("clip", "OPSD's per-entry clip", ["clip"]),
    _component("reduction", "a loss reduction other than token_mean", ["loss_reduction"]),
    _component("chunked_head", "the chunked LM-head pass of the loss (memory and speed settings)",
               knobs=["loss_chunk_size", "loss_implementation"]),
    # token weighting (methods.md §3–§5)
    _component("tip", "TIP token selection", ["token_selection"], ["token_ratio", "token_selection_scope"]),
    _component("tip_q3", "TIP's Q3 score (a forward KL over one shared vocabulary)",
               [Switch("token_selection", on=("tip_q3",))]),
    _component("tip_importance", "TIP's importance weights", ["token_importance_weighting"]),
    _component("tip_scoring_pass", "TIP's separate no-grad scoring pass", knobs=["token_scoring_chunk_size"]),
    _component("position", "PW-OPSD position weights", ["position_weighting"],
               ["position_w_min", "position_tau", "position_slope"]),
    _component("evidence", "the EDGE-OPD evidence mask", ["evidence_mode"],
               ["evidence_threshold", "evidence_quantile"]),
    # rollouts and prompts (GKD, OPSD, EDGE-OPD, methods.md §0.9, §2, §5, §7.3)
    _component("off_policy", "off-policy batches (GKD's lmbda < 1)", [Switch("lmbda", off=1.0)]),
    _component("seq_kd", "teacher-generated off-policy batches (seq_kd)", ["seq_kd"]),
    _component("self_teacher", "the student's own initial weights as teacher (teacher_model='self')",
               [Switch("teacher_model_name_or_path", on=("self",))]),
    _component("privileged", "the teacher's privileged prompt", [Switch("use_teacher_context", on=(True,))],
               ["teacher_context_column", "teacher_problem_column", "teacher_prompt_template"]),
    _component("chat_kwargs", "per-role chat-template arguments",
               knobs=["student_chat_template_kwargs", "teacher_chat_template_kwargs"]),
    _component("guided", "EDGE-OPD guided rollouts", ["guided_fraction"]),
    _component("aligned_prompts", "teacher-aligned prompts", ["aligned_prompt_template"], ["aligned_prompt_ratio"]),
    _component("diagnostics", "the top-k overlap diagnostics", ["diagnostics_steps"], ["diagnostics_top_k"]),
    # the AAPA anchor as a loss term (methods.md §11.3)
    _component("aapa_term", "the AAPA anchor term (REINFORCE on the anchor score)", ["aapa_discriminator_path"],
               ["aapa_weight", "aapa_start_step", "aapa_ramp_steps"]),
    # hidden states (methods.md §6)
    _component("oprd", "OPRD hidden-state distillation", ["representation_weight"],
               ["logit_weight", "representation_layers", "representation_positions", "representation_last_k",
                "representation_position_convention", "representation_layer_map", "representation_normalize",
                "projector", "bridge_rank", "bridge_path", "bridge_fit_prompts", "allow_random_projector"]),
    _component("teachers", "several teachers routed by a dataset column (MOPD)", ["teachers"], ["teacher_id_column"]),
    # a teacher served by another process (methods.md §0.9)
    _component("served_teacher", "a teacher served by another process (vLLM or trl_opd's server)",
               ["teacher_model_server_url"],
               ["teacher_server_backend", "teacher_server_top_k", "teacher_server_model", "teacher_server_timeout",
                "teacher_server_retry_seconds", "teacher_server_wait_seconds"], owner="ServedTeacherArguments"),
    # another tokenizer (methods.md §8)
    _component("cross_tokenizer", "the cross-tokenizer segment losses (SimCT, ULD)", ["cross_tokenizer_loss"],
               ["teacher_tokenizer_name_or_path", "simct_span_score", "shared_vocabulary_mode", "uld_merge",
                "simct_exclusive_spans", "simct_min_teacher_coverage"], owner="SimCTConfig"),
    # RLAD (methods.md §10–§11)
    _component("trrd", "RLAD's teacher-anchored trust-region ratio", [Switch("rlad_alpha", off=1.0)],
               ["rlad_teacher_clamp", "rlad_teacher_clamp_mode"], owner="RLADConfig"),
    _component("teacher_stats", "the teacher log-ratio statistics", ["rlad_log_teacher_stats"], owner="RLADConfig"),
    _component("aapa", "the AAPA anchor reward", ["aapa_discriminator_path"],
               ["aapa_weight", "aapa_start_step", "aapa_ramp_steps"], owner="RLADConfig"),
)}

_OPD_ONLY = ("divergence", "estimator", "top_k", "clip", "chunked_head", "tip_q3", "tip_importance",
             "tip_scoring_pass", "evidence", "seq_kd", "self_teacher", "guided", "diagnostics", "oprd", "aapa_term",
             "teachers")
_OPD_FAMILY = tuple(name for name, component in COMPONENTS.items() if component.owner == "OPDConfig") + (
    "served_teacher",)


@dataclass(frozen=True)
class Trainer:
    """A trainer, its config class, what it needs, the components it runs and why it leaves the others out."""

    name: str
    config: str
    needs: str
    components: tuple[str, ...]
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)


TRAINERS = {t.name: t for t in (
    Trainer("OPDTrainer", "OPDConfig", "a teacher with the student's tokenizer", _OPD_FAMILY),
    Trainer(
        "SimCTTrainer", "SimCTConfig", "a teacher with another tokenizer",
        tuple(name for name in _OPD_FAMILY if name not in _OPD_ONLY) + ("cross_tokenizer",),
        reasons={
            "divergence": "SimCT's loss is the reverse KL of its segment rows",
            "estimator": "the segment rows are compared exactly",
            "top_k": "rows already cover only V∩ plus the span column",
            "clip": "no per-entry clip on segment rows",
            "chunked_head": "it materialises both models' completion logits in full",
            "tip_q3": "segment rows have no forward KL over one shared vocabulary",
            "tip_importance": "importance weights are not implemented per segment",
            "tip_scoring_pass": "TIP scores segments with the loss values themselves, in no separate pass",
            "evidence": "the evidence compares both models' log-probs of one token id",
            "seq_kd": "the teacher cannot generate in the student's token ids",
            "self_teacher": "the student's own weights share its tokenizer",
            "guided": "guided rollouts feed the teacher's prompt ids to the student",
            "diagnostics": "the overlap statistics compare both models' top-k over one vocabulary",
            "oprd": "its loss never captures hidden states, so the OPRD term and projector would not train",
            "aapa_term": "its segment objective has no anchor term",
            "teachers": "it distils one teacher with its own tokenizer",
        },
    ),
    Trainer("RLADTrainer", "RLADConfig", "GRPO rewards and a teacher with the student's tokenizer",
            ("trrd", "teacher_stats", "aapa", "served_teacher")),
)}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


@dataclass(frozen=True)
class Mode:
    """A setting (`setting`, true when `applies(config)`) under which `trainer` leaves out `leaves_out`."""

    trainer: str
    setting: str
    applies: Callable[[Any], bool]
    leaves_out: tuple[str, ...]
    reason: str
    remedy: str


MODES = (
    Mode("OPDTrainer", "logit_weight=0 (representation-only OPRD)",
         lambda c: _number(c.logit_weight) and c.logit_weight == 0 and _number(c.representation_weight)
         and c.representation_weight > 0,
         ("divergence", "loss_temperature", "estimator", "top_k", "clip", "reduction", "chunked_head", "tip",
          "tip_q3", "tip_importance", "tip_scoring_pass", "position", "evidence", "diagnostics", "aapa_term"),
         "there is no logit loss and no LM-head pass", "logit_weight > 0"),
    Mode("OPDTrainer", "lmbda=0 (every batch off-policy)", lambda c: _number(c.lmbda) and c.lmbda == 0,
         ("guided",), "guided rollouts are student rollouts, and there are none", "lmbda > 0"),
    Mode("OPDTrainer", "lmbda=0 (every batch off-policy)", lambda c: _number(c.lmbda) and c.lmbda == 0,
         ("aapa_term",), "the anchor term rewards the student's own rollouts, and there are none", "lmbda > 0"),
    Mode("OPDTrainer", "lmbda=1 (every batch on-policy)", lambda c: _number(c.lmbda) and c.lmbda == 1,
         ("seq_kd",), "seq_kd only says who writes the off-policy batches, and there are none", "lmbda < 1"),
)


def field_default(config, name: str):
    """The dataclass default of `config`'s field `name`."""
    spec = type(config).__dataclass_fields__[name]
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


def trainer_of(config) -> Trainer:
    """The trainer a config is for (`trainer_name`, a class attribute of each config class)."""
    return TRAINERS[type(config).trainer_name]


def supporters(component: str) -> list[str]:
    """Where `component` runs: each trainer that runs it, with the modes that leave it out."""
    found = []
    for trainer in TRAINERS.values():
        if component in trainer.components:
            remedies = [mode.remedy for mode in MODES if mode.trainer == trainer.name and component in mode.leaves_out]
            found.append(f"{trainer.name} ({trainer.needs}" + "".join(f", {r}" for r in remedies) + ")")
    return found


def refuse_unsupported(config) -> None:
    """Raise a ValueError for the first field of `config` that switches on or tunes a component its trainer does
    not run (in general, or under a mode the config is in). Called from each config's `__post_init__`."""
    trainer = trainer_of(config)
    modes = [mode for mode in MODES if mode.trainer == trainer.name and mode.applies(config)]
    for component in COMPONENTS.values():
        set_fields = component.set_fields(config)
        if not set_fields:
            continue
        name, verb = set_fields[0]
        value, default = getattr(config, name), field_default(config, name)
        head = f"{type(config).__name__}: {name}={value!r} {verb} {component.title}"
        where = f"Supported by {' and '.join(supporters(component.name))}"
        if component.name not in trainer.components:
            reason = trainer.reasons.get(component.name)
            raise ValueError(
                f"{head}, which {trainer.name} does not run{f' ({reason})' if reason else ''}. {where}. "
                f"Leave {name} at its default {default!r}."
            )
        for mode in modes:
            if component.name in mode.leaves_out:
                raise ValueError(
                    f"{head}, which {trainer.name} does not run with {mode.setting}: {mode.reason}. {where}. "
                    f"Leave {name} at its default {default!r}, or set {mode.remedy}."
                )


# ------------------------------------------------------------------ the README's tables

# One representative setting per OPDTrainer method component: the pairwise test trains every pair of them, and the
# README lists the pairs that `OPDConfig` refuses (with its own message). Self-distillation rows need a
# `solution` column.
OPD_COMBINATIONS = {
    "tip": {"token_selection": "tip_soft_or"},
    "position_weights": {"position_weighting": "increasing"},
    "oprd": {"representation_weight": 0.1},
    "oprd_only": {"representation_weight": 1.0, "logit_weight": 0.0},
    "opsd": {"teacher_model_name_or_path": "self"},
    "edge": {"teacher_model_name_or_path": "self", "guided_fraction": 0.5, "evidence_mode": "quantile"},
    "mixed_policy": {"lmbda": 0.5},
    "off_policy": {"lmbda": 0.0},
    "seq_kd": {"lmbda": 0.0, "seq_kd": True},
    "k2": {"estimator": "k2"},
    "k3": {"estimator": "k3"},
    "k3_plus": {"estimator": "k3_plus"},
    "sampled_pg": {"estimator": "sampled_pg"},
    "top_k": {"loss_top_k": 4},
    "diagnostics": {"diagnostics_steps": 1, "diagnostics_top_k": 4},
    "aligned_prompts": {"aligned_prompt_template": "boxed", "aligned_prompt_ratio": 1.0},
}


def combination_pairs() -> list[tuple[str, str, dict]]:
    """Every pair of `OPD_COMBINATIONS` that is a real combination: not two values of one field, and neither
    setting contained in the other."""
    names, pairs = list(OPD_COMBINATIONS), []
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            a, b = OPD_COMBINATIONS[first], OPD_COMBINATIONS[second]
            if any(a[key] != b[key] for key in a.keys() & b.keys()):
                continue
            if a.items() <= b.items() or b.items() <= a.items():
                continue
            pairs.append((first, second, {**a, **b}))
    return pairs


def refused_pairs(output_dir: str) -> list[tuple[str, str, str]]:
    """(first, second, OPDConfig's message) for each pair of `combination_pairs` that `OPDConfig` refuses."""
    from .opd_config import OPDConfig

    refused = []
    for first, second, settings in combination_pairs():
        try:
            OPDConfig(output_dir=output_dir, use_cpu=True, report_to="none", **settings)
        except ValueError as error:
            refused.append((first, second, str(error)))
    return refused


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_support_table(output_dir: str = "support-table-unused") -> str:
    """Markdown: components × trainers, the modes, and the refused OPDTrainer pairs."""
    from .opd_config import OPDConfig
    from .rlad_config import RLADConfig
    from .simct_config import SimCTConfig

    declared = {cls.trainer_name: {base.__name__ for base in cls.__mro__} for cls in (OPDConfig, SimCTConfig, RLADConfig)}
    trainers = list(TRAINERS.values())
    lines = ["| component | fields | " + " | ".join(f"`{t.name}`" for t in trainers) + " |",
             "|---|---|" + "---|" * len(trainers)]
    for component in COMPONENTS.values():
        cells = []
        for trainer in trainers:
            if component.name in trainer.components:
                cells.append("yes")
            elif component.owner not in declared[trainer.name]:  # not a field of this trainer's config
                cells.append("")
            else:
                cells.append("refused" + (f": {trainer.reasons[component.name]}" if component.name in trainer.reasons
                                          else ""))
        fields = ", ".join(f"`{name}`" for name in component.fields)
        lines.append(f"| {_cell(component.title)} | {fields} | " + " | ".join(map(_cell, cells)) + " |")
    lines += ["", "Modes that leave components out (refused at construction too):", "",
              "| trainer | setting | leaves out | why |", "|---|---|---|---|"]
    for mode in MODES:
        left_out = ", ".join(COMPONENTS[name].title for name in mode.leaves_out)
        lines.append(f"| `{mode.trainer}` | `{mode.setting}` | {_cell(left_out)} | {_cell(mode.reason)} |")
    lines += ["", "`OPDTrainer` pairs of these settings: "
              + ", ".join(f"{name} `{_settings(settings)}`" for name, settings in OPD_COMBINATIONS.items())
              + ". Each pair not listed below trains 2 steps with finite losses (`tests/test_switches.py`); these are "
              "refused:", "", "| pair | refused at construction with |", "|---|---|"]
    for first, second, message in refused_pairs(output_dir):
        lines.append(f"| {first} × {second} | {_cell(message.split(' Supported by')[0])} |")
    return "\n".join(lines) + "\n"


def _settings(settings: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in settings.items())


def own_fields(cls, parent) -> list[dataclasses.Field]:
    """The fields `cls` adds to its TRL `parent`, or re-declares with another default or help text."""
    inherited = {f.name: f for f in dataclasses.fields(parent)} if parent is not None else {}
    own = []
    for f in dataclasses.fields(cls):
        base = inherited.get(f.name)
        if base is None or base.default != f.default or base.metadata.get("help") != f.metadata.get("help"):
            own.append(f)
    return own
