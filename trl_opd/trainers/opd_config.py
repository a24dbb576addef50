"""`OPDConfig`: `trl.DistillationConfig` plus the knobs of the OPD method family."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass, field

from trl import DistillationConfig

from ..anchor import AnchorSchedule
from ..losses import DIVERGENCES, ESTIMATORS, TOP_K_SOURCES
from ..reduction import REDUCTIONS as LOSS_REDUCTIONS
from ..serving.arguments import ServedTeacherArguments
from ..weighting import EVIDENCE_MODES, POSITION_DIRECTIONS, TIP_SCOPES, TIP_STRATEGIES
from .oprd import RepresentationArguments
from .routing import validate_teachers
from .aligned_prompts import resolve_aligned_prompt_template
from .self_distillation import SELF_TEACHER, resolve_teacher_prompt_template
from .support import refuse_unsupported

LOSS_IMPLEMENTATIONS = ("fused", "checkpointed")
TOKEN_SELECTIONS = ("none",) + tuple(f"tip_{strategy}" for strategy in TIP_STRATEGIES)
POSITION_WEIGHTINGS = ("none",) + POSITION_DIRECTIONS
EVIDENCE_MASKS = ("none",) + EVIDENCE_MODES


def _require_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}.")


_FIELD_TYPES = {
    "float": (numbers.Real,), "int": (numbers.Integral,), "bool": (bool,), "str": (str,), "dict": (dict, str),
    "list": (list, tuple),
}


def field_kinds(annotation) -> list[str] | None:
    """The simple kinds of a field's annotation (`float`, `int | None`, `Optional[str]`, `dict[str, Any] | str`,
    written as a string or as a type): names of `_FIELD_TYPES` and "None"; None for a richer annotation (an enum,
    a Literal, a dataclass), which its own validation checks."""
    if isinstance(annotation, str):
        text = re.sub(r"\[[^\[\]]*\]", "", annotation)  # dict[str, Any] -> dict (one level is all the configs use)
        text = re.sub(r"\[[^\[\]]*\]", "", text)
        if "Optional" in annotation or "Union" in annotation or "Literal" in annotation:
            return None  # typing spellings in string annotations: not used by the configs' own fields
        kinds = [kind.strip() for kind in text.split("|")]
    else:
        if annotation is type(None):
            return ["None"]
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            kinds = []
            for argument in typing.get_args(annotation):
                inner = field_kinds(argument)
                if inner is None:
                    return None
                kinds.extend(inner)
            return kinds
        annotation = origin or annotation
        kinds = [getattr(annotation, "__name__", "?")]
        if kinds == ["NoneType"]:
            kinds = ["None"]
    return kinds if all(kind in _FIELD_TYPES or kind == "None" for kind in kinds) else None


def declared_annotation(cls, name: str, fallback):
    """A field's annotation as its class declares it: `dataclasses.fields(...)[i].type` is not reliable, since
    transformers' HfArgumentParser rewrites it in place (e.g. `str | bool` becomes `bool`) when it builds a parser."""
    for klass in cls.__mro__:
        annotations = inspect.get_annotations(klass)
        if name in annotations:
            return annotations[name]
    return fallback


def check_field_types(config, owner=None) -> None:
    """A clear error for a value of the wrong type in any field of `config` (a config dataclass), its own and those
    it inherits from TRL and transformers (e.g. `learning_rate="1e-6"`, a YAML list or string where a number
    belongs); otherwise the first comparison fails with an obscure TypeError after the models load. `owner` is
    accepted for older callers and ignored: every field is checked."""
    for spec in dataclasses.fields(config):
        annotation = declared_annotation(type(config), spec.name, spec.type)
        kinds = field_kinds(annotation)
        if kinds is None:
            continue
        value = getattr(config, spec.name, None)
        if value is None:  # a None default, or the argument parser's "not given": TRL resolves those itself
            continue
        allowed = tuple(t for kind in kinds if kind in _FIELD_TYPES for t in _FIELD_TYPES[kind])
        numeric = "bool" not in kinds and isinstance(value, bool)  # True is an int, but not a number here
        if numeric or not isinstance(value, allowed):
            declared = annotation if isinstance(annotation, str) else " | ".join(kinds)
            raise ValueError(
                f"`{spec.name}` must be of type {declared}, got {value!r} ({type(value).__name__}). "
                + _type_fix(spec.name, kinds, value)
            )


def _type_fix(name: str, kinds, value) -> str:
    if isinstance(value, str) and any(kind in ("float", "int") for kind in kinds):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None:
            return f"Pass a number, not a string: `{name}={value.strip()}`."
    return f"In a YAML recipe write a plain value, e.g. `{name}: {_example(kinds)}`."


def _example(kinds) -> str:
    return {"float": "0.5", "int": "8", "bool": "true", "str": "name", "dict": "{key: value}", "list": "[a, b]"}[
        next(kind for kind in kinds if kind != "None")
    ]


def _require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown `{name}`={value!r}. Choose one of {', '.join(map(repr, choices))}.")


@dataclass
class OPDConfig(ServedTeacherArguments, RepresentationArguments, DistillationConfig):
    r"""
    Configuration for [`OPDTrainer`]: every field of `trl.DistillationConfig` plus the fields below, and the OPRD
    fields of `trl_opd.trainers.oprd.RepresentationArguments` (`representation_weight`, `logit_weight`, ...).

    With the defaults (`divergence="reverse_kl"`, full vocabulary, analytic estimator, `token_mean`, `lmbda=1`),
    OPDTrainer trains exactly like `trl.DistillationTrainer` with `beta=1.0`.

    Parameters:
        > Divergence (methods.md §0.3–§0.6, §1)

        divergence (`str`, defaults to `"reverse_kl"`):
            Per-token divergence between the student's and the teacher's next-token distributions:
            `"forward_kl"` = KL(teacher ‖ student), `"reverse_kl"` = KL(student ‖ teacher), `"jsd"` (generalized JSD,
            `beta` weights the teacher in the mixture), `"tvd"`, `"skew_forward_kl"`, `"skew_reverse_kl"` (`alpha`).
            This is the single source of truth: unlike `DistillationConfig`, `beta` does not pick the divergence.
        beta (`float`, defaults to `0.5`):
            Teacher weight in the mixture of `divergence="jsd"` (TRL/GKD convention). Ignored otherwise. GKD's default.
        alpha (`float`, defaults to `0.1`):
            Skew of `skew_forward_kl` / `skew_reverse_kl` (DistiLLM), in [0, 1) for them (`1` compares a distribution
            with itself: refused). Ignored otherwise.
        distillation_temperature (`float` or `None`, defaults to `None`):
            Temperature applied to both models' logits in the loss. `None` means "equal to `temperature`", the sampling
            temperature (DistillationTrainer and OPSD behaviour). No T² factor is applied.
        estimator (`str`, defaults to `"analytic"`):
            `"analytic"`: the exact divergence over the vocabulary (or over the `loss_top_k` support). Sampled-token
            estimators use only the sampled token and need `divergence="reverse_kl"`: `"sampled_pg"` (advantage form
            −sg(log p_T − log p_S)·log p_S, OPSD Eq. 9), `"k2"`, `"k3"` (gradient of the forward KL), `"k3_plus"`
            (value of k3, gradient of k2).
        loss_top_k (`int` or `None`, defaults to `None`):
            Restrict the analytic divergence to the top-k tokens of `loss_top_k_source` and renormalise both
            distributions there. `None` uses the full vocabulary. (Named `loss_top_k` because `top_k` is the sampling
            parameter inherited from `DistillationConfig`.) `1` is refused unless `loss_top_k_tail=True`:
            renormalised on one token both distributions are 1 and nothing trains (with `"union"`, wherever the two
            argmaxes agree). The papers' "OPD top-1" is the sampled-token reverse KL, `estimator="sampled_pg"`.
        loss_top_k_source (`str`, defaults to `"student"`):
            `"student"`, `"teacher"` or `"union"` (the union of both top-k sets).
        loss_top_k_tail (`bool`, defaults to `False`):
            Instead of renormalising on the top-k support, add one tail class holding each side's leftover mass.
        clip (`float` or `None`, defaults to `None`):
            OPSD per-vocabulary-element clip τ: each entry's contribution to the divergence is capped at τ before the
            vocabulary sum (the OPSD paper uses 0.05 with forward KL). The clipped loss can be negative. A position
            whose every entry exceeds τ gets no gradient: with `tvd` or `jsd` (entries ≥ 0) on a one- or two-token
            support that is any position where the two distributions differ by more than about 2τ.

        > Reduction (methods.md §0.7)

        loss_reduction (`str`, defaults to `"token_mean"`):
            `"token_mean"`: Σ w·ℓ over the optimizer step divided by the number of generated tokens in the step
            (all gradient-accumulation micro-batches and processes; TRL's behaviour). `"token_mean_microbatch"`:
            per micro-batch Σ w·ℓ / Σ m, averaged over micro-batches (OPSD/TIP reference code).
            `"sequence_mean"`: mean over sequences of the per-sequence token mean (PW-OPSD, GRPO `grpo`), over the
            whole step. `"weighted_mean"`: per micro-batch Σ w·ℓ / Σ w·m (mean over selected tokens, TIP Eq. 9),
            averaged over micro-batches.
        loss_chunk_size (`int`, defaults to `1024`):
            Tokens per chunk in the loss: only `[loss_chunk_size, V]` logits exist at any time.
        loss_implementation (`str`, defaults to `"fused"`):
            `"fused"`: one autograd function computes the loss and its gradient chunk by chunk in the forward pass
            (Liger-Kernel pattern; no recomputation). `"checkpointed"`: recompute each chunk in backward (TRL's
            pattern). Both give the same values and gradients.

        > On/off-policy mix (GKD)

        lmbda (`float`, defaults to `1.0`):
            Probability that a generation batch is sampled from the student (on-policy). Otherwise the batch uses the
            teacher's generations (`seq_kd=True`) or the dataset's `completion` column. The coin is drawn once per
            generation batch from (`seed`, step), so every process makes the same choice. GKD's default is 0.5; ours is
            1.0 (pure on-policy, DistillationTrainer's behaviour).
        seq_kd (`bool`, defaults to `False`):
            When the coin says off-policy, generate the completions with the teacher instead of reading the dataset.

        > Token selection: TIP (methods.md §3, arXiv 2604.14084)

        token_selection (`str`, defaults to `"none"`):
            `"none"` (every token), or a TIP selector applied to each micro-batch: `"tip_soft_or"` (top ρ by the
            Soft-OR of normalised student entropy and divergence), `"tip_entropy_sample"` (sample ρ without
            replacement with probability ∝ entropy), `"tip_q3"` (top ρ by forward KL × confidence: overconfident
            tokens the teacher disagrees with), `"tip_divergence_only"` (top ρ by divergence). Scores come from a
            no-grad chunked pass at the distillation temperature (entropy over the full vocabulary, the loss's own
            per-token divergence); only the selected tokens enter the LM head with gradients. TIP's paper normalises
            by the selected tokens: set `loss_reduction="weighted_mean"` to reproduce it.
        token_ratio (`float`, defaults to `0.5`):
            Retention ratio ρ ∈ (0, 1]: each sequence keeps max(1, ⌊ρ·L⌋) of its L completion tokens.
        token_selection_scope (`str`, defaults to `"sequence"`):
            `"sequence"`: the budget is per sequence; `"batch"`: max(1, ⌊ρ·ΣL⌋) over the micro-batch. The entropy
            clip and min-max statistics are always taken over the micro-batch on this process.
        token_importance_weighting (`bool`, defaults to `False`):
            With `"tip_entropy_sample"` only: Poisson sampling with inclusion probability π = min(1, k·h/Σh) and
            weights 1/π, an unbiased estimate of the all-token loss (use a reduction that counts all tokens, such
            as `"token_mean"`).
        token_scoring_chunk_size (`int` or `None`, defaults to `None`):
            Tokens per chunk of the no-grad scoring pass. `None` uses ⌈ρ·c⌉, with c the loss's chunk for all the
            completion tokens (`loss_chunk_size`, capped at TRL's vocabulary-tile size for large vocabularies), so
            that the scoring pass never holds more logits than the gradient pass does on its selected tokens.

        > Position weights: PW-OPSD (methods.md §4, arXiv 2605.21606)

        position_weighting (`str`, defaults to `"none"`):
            `"increasing"` (PW-OPSD: w = w_min + (1 − w_min)·σ((u − τ)/s) of the relative position u of a token in
            its own completion), `"decreasing"` (the mirror image, IW-OPD's direction) or `"none"`. The PW-OPSD
            paper pairs it with `loss_reduction="sequence_mean"`.
        position_w_min (`float`, defaults to `0.25`), position_tau (`float`, defaults to `0.30`),
        position_slope (`float`, defaults to `0.10`):
            w_min ∈ [0, 1], centre τ and width s > 0 of the sigmoid (the paper's "Moderate" schedule).

        > Evidence mask: EDGE-OPD (methods.md §5.2, our design: the paper gives no formula)

        evidence_mode (`str`, defaults to `"none"`):
            Train only where the teacher supports the sampled token more than the student does:
            e_t = log p_T(ŷ_t) − log p_S(ŷ_t) at the distillation temperature (teacher with its privileged prompt,
            student on the plain prompt). `"threshold"` keeps e_t > `evidence_threshold`; `"quantile"` keeps the top
            `evidence_quantile` share of e over the micro-batch's tokens; `"none"` keeps every token. EDGE-OPD pairs
            it with `loss_reduction="weighted_mean"`.
        evidence_threshold (`float`, defaults to `0.0`):
            Margin τ_e in nats for `"threshold"`.
        evidence_quantile (`float`, defaults to `0.2`):
            Share q ∈ (0, 1] kept by `"quantile"`.

        > Self-distillation and privileged context: OPSD, EDGE-OPD (methods.md §0.9, §2, §5)

        teacher_model_name_or_path (`str` or `None`):
            Inherited. `"self"` (here or as the trainer's `teacher_model=`) makes the teacher the student's own frozen
            initial weights: with PEFT the student with its adapter disabled, otherwise a frozen copy made before
            training.
        use_teacher_context (`bool` or `None`, defaults to `None`):
            Show the teacher a privileged prompt built from `teacher_prompt_template` and the row's
            `teacher_context_column`. `None` means "yes for `teacher_model="self"`, no for an external teacher".
        teacher_context_column (`str`, defaults to `"solution"`):
            Dataset column holding the privileged context (e.g. a reference solution).
        teacher_problem_column (`str` or `None`, defaults to `None`):
            Dataset column for the template's `{problem}`. `None` uses the student's prompt (its last user message
            for conversations).
        teacher_prompt_template (`str`, defaults to `"opsd_v2"`):
            A preset (`"opsd_v2"`, `"opsd_v1"`: the OPSD prompts of methods.md §2.3) or a template string with a
            `{problem}` placeholder and a `{solution}` or `{context}` placeholder; other braces are literal. For a
            conversational prompt the rendered text replaces the last user message.
        student_chat_template_kwargs (`dict` or `None`, defaults to `None`),
        teacher_chat_template_kwargs (`dict` or `None`, defaults to `None`):
            Per-role chat-template arguments, merged over the shared `chat_template_kwargs` (e.g. OPSD:
            `{enable_thinking: false}` for the student, `{enable_thinking: true}` for the teacher). When the
            teacher's differ from the student's, the teacher's prompt is tokenised separately even without
            privileged context.
        guided_fraction (`float`, defaults to `0.0`):
            EDGE-OPD guided rollouts: this share of training prompts is generated from the teacher's privileged
            prompt instead of the plain one; the loss still scores the completion after the plain student prompt.
            Each row's decision is drawn from (`seed`, step, global row index), so it is reproducible and
            independent of the process layout. Needs the privileged context. Guided rows are off-policy for the
            student; no importance correction is applied (methods.md §5.2).
        explicit_position_ids (`bool`, defaults to `True`):
            Pass position ids cumsum(attention_mask) − 1 to both models (methods.md §0.8), so that left-padded rows
            are scored at the positions they were generated at, whatever the padding of either side. `False` lets
            the model number positions from the padded start, as `trl.DistillationTrainer` does (identical with
            RoPE up to rounding).

        > Teacher-aligned prompts (methods.md §7.3, arXiv 2604.13016 §5)

        aligned_prompt_template (`str` or `None`, defaults to `None`):
            Format training prompts the way the teacher was trained (its RL template), for the student's rollout and
            the teacher's scoring alike: a preset (`"boxed"`: `{problem} Please reason step by step, and put your
            final answer within \boxed{}.`, the paper's template) or a template string with a `{problem}` placeholder
            (other braces are literal). For a conversational prompt the rendered text replaces the last user message.
            `None` leaves prompts as they are. Evaluation prompts are never changed. Content alignment (the teacher's
            own RL prompts) is a choice of dataset: see `trl_opd.trainers.aligned_prompts.mix_prompt_datasets`.
        aligned_prompt_ratio (`float`, defaults to `0.5`):
            Share of training prompts given `aligned_prompt_template`; the others stay as they are. Each row's
            decision is drawn from (`seed`, step, global row index), so every process agrees and it does not depend
            on the process layout. The paper recommends mixing aligned and other prompts without giving a ratio;
            0.5 is our untuned default, 1.0 formats every prompt.

        > Dynamics diagnostics (methods.md §7.1, arXiv 2604.13016)

        diagnostics_steps (`int`, defaults to `0`):
            Every this many optimizer steps (at `global_step % diagnostics_steps == 0`, on every micro-batch of that
            step), and on every evaluation batch, log `trl_opd.diagnostics.overlap_stats` of the batch's completion
            tokens under `diagnostics/` (`overlap_ratio`, `student_overlap_mass`, `teacher_overlap_mass`,
            `entropy_gap`, `overlap_advantage`, `overlap_advantage_pooled`; sums and counts gathered over processes, so a value is the mean over
            every process's tokens), TIP's quadrant shares `tip/q{1..4}_share` (student entropy and the
            loss's per-token divergence split at the medians of the micro-batch) and, with `loss_top_k`, the
            unrenormalised masses `diagnostics/loss_support_{student,teacher}_mass` of the loss support. A no-grad
            pass over the hidden states already computed for the loss, `loss_chunk_size` tokens at a time, at the
            distillation temperature; the loss is unchanged. `0` turns it off (no extra work, no extra keys).
            Plot the curves with `trl_opd.diagnostics.plot_diagnostics(trainer.state.log_history, out_dir)`.
        diagnostics_top_k (`int`, defaults to `16`):
            k of the top-k overlap (the paper's default 16); at most the vocabulary size.

        > AAPA anchor term (methods.md §11.3; our design, see `trl_opd.anchor`)

        aapa_discriminator_path (`str` or `None`, defaults to `None`):
            Path of a frozen `trl_opd.anchor.AnchorDiscriminator`. When set, each student rollout ŷ is scored
            s(ŷ) = clip(logit D(ŷ), ±5) and the loss gets a sequence-level REINFORCE term with value 0 and gradient
            −w(t) Σ_t c_t (s(ŷ) − b) ∇log π_θ(ŷ_t): b is the mean score of the other rollouts of the generation
            batch, c the token term's reduction coefficients, log π_θ at the sampling `temperature`. Only the
            student's own rollouts get it (not off-policy batches, not EDGE-OPD guided rows).
        aapa_weight (`float`, defaults to `0.1`):
            λ, the anchor term's weight once fully on.
        aapa_start_step (`int`, defaults to `0`), aapa_ramp_steps (`int`, defaults to `0`):
            Staged AAPA: weight 0 before optimizer step `aapa_start_step`, then a linear ramp to `aapa_weight` over
            `aapa_ramp_steps` steps (0: at once).

        > Several teachers (MOPD; `trl_opd.trainers.routing`)

        teachers (`dict` or `None`, defaults to `None`):
            Teachers by name, each `{"teacher_model_name_or_path": ...}` (loaded here) or
            `{"teacher_model_server_url": ..., "teacher_server_backend": ..., "teacher_server_top_k": ...}`
            (served); every teacher shares the student's tokenizer. Each row's `teacher_id_column` names its teacher.
            Logs `teachers/<name>/divergence` (or `kl_k1`) and `teachers/<name>/token_share`. Not with OPRD or
            `seq_kd`. A JSON object on the command line.
        teacher_id_column (`str`, defaults to `"teacher_id"`):
            The dataset column that names each row's teacher, with `teachers`.
    """

    beta: float = field(
        default=0.5,
        metadata={"help": "Teacher weight in the mixture of divergence='jsd' (TRL/GKD convention); ignored otherwise."},
    )
    divergence: str = field(
        default="reverse_kl",
        metadata={"help": "Per-token divergence: " + ", ".join(DIVERGENCES) + "."},
    )
    alpha: float = field(default=0.1, metadata={"help": "Skew of skew_forward_kl / skew_reverse_kl."})
    distillation_temperature: float | None = field(
        default=None,
        metadata={"help": "Temperature of both models' logits in the loss; None = the sampling `temperature`."},
    )
    estimator: str = field(
        default="analytic",
        metadata={"help": "analytic | sampled_pg | k2 | k3 | k3_plus (sampled-token estimators need reverse_kl)."},
    )
    loss_top_k: int | None = field(
        default=None,
        metadata={"help": "Restrict the divergence to the top-k support (renormalised); None = full vocabulary."},
    )
    loss_top_k_source: str = field(
        default="student", metadata={"help": "Whose top-k defines the support: student | teacher | union."}
    )
    loss_top_k_tail: bool = field(
        default=False, metadata={"help": "Add a tail class with the leftover mass instead of renormalising."}
    )
    clip: float | None = field(
        default=None, metadata={"help": "OPSD per-vocabulary-element clip tau (e.g. 0.05); None = no clip."}
    )
    loss_reduction: str = field(
        default="token_mean",
        metadata={"help": "token_mean | token_mean_microbatch | sequence_mean | weighted_mean."},
    )
    loss_chunk_size: int = field(default=1024, metadata={"help": "Tokens per loss chunk."})
    loss_implementation: str = field(default="fused", metadata={"help": "fused | checkpointed."})
    lmbda: float = field(
        default=1.0, metadata={"help": "Probability of an on-policy generation batch (GKD's lmbda)."}
    )
    seq_kd: bool = field(
        default=False, metadata={"help": "Off-policy batches come from teacher generations instead of the dataset."}
    )
    # token selection (TIP)
    token_selection: str = field(
        default="none", metadata={"help": "Token selection: " + ", ".join(TOKEN_SELECTIONS) + "."}
    )
    token_ratio: float = field(default=0.5, metadata={"help": "TIP retention ratio rho in (0, 1]."})
    token_selection_scope: str = field(
        default="sequence", metadata={"help": "TIP budget per 'sequence' or over the micro-'batch'."}
    )
    token_importance_weighting: bool = field(
        default=False, metadata={"help": "tip_entropy_sample only: Poisson sampling with 1/pi weights (unbiased)."}
    )
    token_scoring_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per chunk of the no-grad TIP scoring pass; None = ceil(rho * the loss's chunk)."},
    )
    # position weights (PW-OPSD)
    position_weighting: str = field(
        default="none", metadata={"help": "Position weights: " + ", ".join(POSITION_WEIGHTINGS) + "."}
    )
    position_w_min: float = field(default=0.25, metadata={"help": "PW-OPSD floor weight w_min in [0, 1]."})
    position_tau: float = field(default=0.30, metadata={"help": "PW-OPSD sigmoid centre (relative position)."})
    position_slope: float = field(default=0.10, metadata={"help": "PW-OPSD sigmoid width s > 0."})
    # evidence mask (EDGE-OPD)
    evidence_mode: str = field(
        default="none", metadata={"help": "Evidence mask: " + ", ".join(EVIDENCE_MASKS) + "."}
    )
    evidence_threshold: float = field(default=0.0, metadata={"help": "Evidence margin in nats ('threshold')."})
    evidence_quantile: float = field(default=0.2, metadata={"help": "Share of tokens kept by 'quantile', in (0, 1]."})
    # self-distillation and privileged context (OPSD, EDGE-OPD)
    use_teacher_context: bool | None = field(
        default=None,
        metadata={"help": "Privileged teacher prompt; None = on for teacher_model='self', off otherwise."},
    )
    teacher_context_column: str = field(
        default="solution", metadata={"help": "Dataset column with the privileged context."}
    )
    teacher_problem_column: str | None = field(
        default=None, metadata={"help": "Dataset column for {problem}; None = the student's prompt."}
    )
    teacher_prompt_template: str = field(
        default="opsd_v2",
        metadata={"help": "Preset (opsd_v2, opsd_v1) or template with {problem} and {solution}/{context}."},
    )
    student_chat_template_kwargs: dict | None = field(
        default=None, metadata={"help": "Chat-template kwargs for the student's prompt (over chat_template_kwargs)."}
    )
    teacher_chat_template_kwargs: dict | None = field(
        default=None, metadata={"help": "Chat-template kwargs for the teacher's prompt (over chat_template_kwargs)."}
    )
    guided_fraction: float = field(
        default=0.0, metadata={"help": "EDGE-OPD: share of prompts generated with the privileged prompt."}
    )
    explicit_position_ids: bool = field(
        default=True, metadata={"help": "Pass cumsum(attention_mask) - 1 as position ids to both models."}
    )
    # teacher-aligned prompts (dynamics paper, recovery recipe 2)
    aligned_prompt_template: str | None = field(
        default=None,
        metadata={"help": "Teacher's prompt template for training prompts: preset 'boxed' or text with {problem}."},
    )
    aligned_prompt_ratio: float = field(
        default=0.5, metadata={"help": "Share of training prompts given aligned_prompt_template, in [0, 1]."}
    )
    # dynamics diagnostics
    diagnostics_steps: int = field(
        default=0, metadata={"help": "Log top-k overlap diagnostics every N optimizer steps; 0 = off."}
    )
    diagnostics_top_k: int = field(default=16, metadata={"help": "k of the top-k overlap diagnostics."})
    # AAPA anchor term
    aapa_discriminator_path: str | None = field(
        default=None, metadata={"help": "Frozen AnchorDiscriminator file; adds a REINFORCE term on its score."}
    )
    aapa_weight: float = field(default=0.1, metadata={"help": "Weight λ of the AAPA anchor term."})
    aapa_start_step: int = field(default=0, metadata={"help": "Optimizer step at which the anchor weight starts."})
    aapa_ramp_steps: int = field(
        default=0, metadata={"help": "Steps of the linear ramp of the anchor weight from 0 to aapa_weight."}
    )
    teachers: dict | str | None = field(
        default=None, metadata={"help": "Several teachers by name (MOPD): name -> {teacher_model_name_or_path: ...} "
                                        "or {teacher_model_server_url: ..., teacher_server_backend: ...}."}
    )
    teacher_id_column: str = field(
        default="teacher_id", metadata={"help": "Dataset column naming each row's teacher (with `teachers`)."}
    )

    trainer_name = "OPDTrainer"  # not a field: the trainer `support.refuse_unsupported` checks this config against

    def __post_init__(self):
        self._validate_opd_fields()
        super().__post_init__()

    @property
    def effective_distillation_temperature(self) -> float:
        """T_d actually used by the loss (`distillation_temperature`, or `temperature` when it is None)."""
        return self.temperature if self.distillation_temperature is None else self.distillation_temperature

    def _validate_opd_fields(self) -> None:
        """Checks that need no model: they run at construction, before anything expensive."""
        check_field_types(self, OPDConfig)
        refuse_unsupported(self)  # a field this trainer (or this mode) would ignore: trainers/support.py
        self.validate_representation_arguments()
        _require_choice("divergence", self.divergence, DIVERGENCES)
        _require_choice("estimator", self.estimator, ESTIMATORS)
        _require_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        _require_choice("loss_top_k_source", self.loss_top_k_source, TOP_K_SOURCES)
        _require_choice("loss_implementation", self.loss_implementation, LOSS_IMPLEMENTATIONS)
        _require_unit_interval("beta", self.beta)
        _require_unit_interval("alpha", self.alpha)
        _require_unit_interval("lmbda", self.lmbda)
        if self.temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}.")
        if self.distillation_temperature is not None and self.distillation_temperature <= 0:
            raise ValueError(
                f"`distillation_temperature` must be > 0 (or None to reuse `temperature`), "
                f"got {self.distillation_temperature}."
            )
        if self.loss_top_k is not None and self.loss_top_k < 1:
            raise ValueError(f"`loss_top_k` must be >= 1 (or None for the full vocabulary), got {self.loss_top_k}.")
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"`clip` must be > 0 (or None for no clip), got {self.clip}.")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(
                f"`max_completion_length` must be >= 1 (the number of tokens generated per prompt), "
                f"got {self.max_completion_length}."
            )
        if self.loss_chunk_size < 1:
            raise ValueError(f"`loss_chunk_size` must be >= 1, got {self.loss_chunk_size}.")
        if self.estimator != "analytic":
            self._validate_sampled_estimator()
        self._validate_nonzero_divergence()
        self._validate_token_selection()
        self._validate_position_weighting()
        self._validate_evidence_mask()
        self._validate_teacher_context()
        self._validate_aligned_prompts()
        self._validate_diagnostics()
        AnchorSchedule.from_config(self)  # aapa_weight, aapa_start_step, aapa_ramp_steps
        self.validate_served_teacher_arguments()  # last: they read the method's validated fields
        validate_teachers(self)

    def _validate_aligned_prompts(self) -> None:
        _require_unit_interval("aligned_prompt_ratio", self.aligned_prompt_ratio)
        if self.aligned_prompt_template is not None:
            self.aligned_prompt_template = resolve_aligned_prompt_template(self.aligned_prompt_template)

    def _validate_diagnostics(self) -> None:
        if not (isinstance(self.diagnostics_steps, int) and self.diagnostics_steps >= 0):
            raise ValueError(
                f"`diagnostics_steps` must be an integer >= 0 (every how many steps to log the overlap diagnostics; "
                f"0 = off), got {self.diagnostics_steps!r}."
            )
        if not (isinstance(self.diagnostics_top_k, int) and self.diagnostics_top_k >= 1):
            raise ValueError(f"`diagnostics_top_k` must be an integer >= 1, got {self.diagnostics_top_k!r}.")

    def _validate_token_selection(self) -> None:
        _require_choice("token_selection", self.token_selection, TOKEN_SELECTIONS)
        _require_choice("token_selection_scope", self.token_selection_scope, TIP_SCOPES)
        if not 0.0 < self.token_ratio <= 1.0:
            raise ValueError(
                f"`token_ratio` must be in (0, 1] (the share of completion tokens TIP keeps), got {self.token_ratio}."
            )
        if self.token_importance_weighting and self.token_selection != "tip_entropy_sample":
            raise ValueError(
                "`token_importance_weighting=True` reweights entropy sampling; set "
                f"token_selection='tip_entropy_sample' (got {self.token_selection!r}) or turn it off."
            )
        if self.token_scoring_chunk_size is not None and self.token_scoring_chunk_size < 1:
            raise ValueError(
                "`token_scoring_chunk_size` must be >= 1 (or None for the default), "
                f"got {self.token_scoring_chunk_size}."
            )

    def _validate_position_weighting(self) -> None:
        _require_choice("position_weighting", self.position_weighting, POSITION_WEIGHTINGS)
        _require_unit_interval("position_w_min", self.position_w_min)
        if not self.position_slope > 0:
            raise ValueError(f"`position_slope` must be > 0 (the width of the sigmoid), got {self.position_slope}.")
        if not math.isfinite(self.position_tau):
            raise ValueError(f"`position_tau` must be a finite relative position, got {self.position_tau}.")

    def _validate_evidence_mask(self) -> None:
        _require_choice("evidence_mode", self.evidence_mode, EVIDENCE_MASKS)
        if not math.isfinite(self.evidence_threshold):
            raise ValueError(f"`evidence_threshold` must be a finite number of nats, got {self.evidence_threshold}.")
        if not 0.0 < self.evidence_quantile <= 1.0:
            raise ValueError(
                f"`evidence_quantile` must be in (0, 1] (the share of tokens kept), got {self.evidence_quantile}."
            )

    def _validate_teacher_context(self) -> None:
        self.teacher_prompt_template = resolve_teacher_prompt_template(self.teacher_prompt_template)
        _require_unit_interval("guided_fraction", self.guided_fraction)
        if self.guided_fraction > 0 and self.use_teacher_context is False:
            raise ValueError(
                f"guided_fraction={self.guided_fraction} generates from the teacher's privileged prompt, which "
                "use_teacher_context=False turns off; set use_teacher_context=True (or None with teacher_model='self') "
                "or guided_fraction=0."
            )
        for name in ("student_chat_template_kwargs", "teacher_chat_template_kwargs"):
            value = getattr(self, name)
            if isinstance(value, str):  # from the command line: a JSON object
                value = json.loads(value)
                setattr(self, name, value)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"`{name}` must be a mapping of chat-template arguments, got {value!r}.")

    def uses_self_teacher(self, teacher_model=None) -> bool:
        """True when the teacher is the student's own frozen initial weights (`"self"`)."""
        chosen = teacher_model if teacher_model is not None else self.teacher_model_name_or_path
        return isinstance(chosen, str) and chosen == SELF_TEACHER

    def uses_teacher_context(self, teacher_model=None) -> bool:
        """Whether the teacher gets a privileged prompt (`use_teacher_context`, resolved for this teacher)."""
        if self.use_teacher_context is not None:
            return self.use_teacher_context
        return self.uses_self_teacher(teacher_model)

    def _validate_nonzero_divergence(self) -> None:
        """Settings whose divergence is 0 with a zero gradient for every input (a top-1 union: wherever the argmaxes
        agree) are refused: they would train nothing. tests/test_zero_gradient.py checks that every accepted
        setting has a gradient (methods.md §0.5, §1.2)."""
        if self.loss_top_k == 1 and not self.loss_top_k_tail:
            if self.loss_top_k_source == "union":
                where = ("renormalises both distributions on {argmax p_S, argmax p_T}, one token wherever the two "
                         "argmaxes agree (most positions once the student follows its teacher): there the divergence "
                         "and its gradient are exactly 0, and with `clip` almost everywhere else too")
            else:
                where = ("renormalises both distributions on one token, where both are 1: the divergence and its "
                         "gradient are exactly 0 and nothing trains")
            raise ValueError(
                f"loss_top_k=1 with loss_top_k_source={self.loss_top_k_source!r} {where} (with representation_weight "
                "> 0, 'OPD + mu*OPRD' would silently be OPRD alone). The papers' 'OPD top-1' is the sampled-token "
                "reverse KL: set estimator='sampled_pg' (their advantage form; 'k2' has the same gradient) and leave "
                "loss_top_k unset. To keep a top-1 support instead, add loss_top_k_tail=True (the top token against "
                "the rest of the mass) or use loss_top_k >= 2 (methods.md §0.5)."
            )
        if self.divergence in ("skew_forward_kl", "skew_reverse_kl") and self.alpha == 1:
            raise ValueError(
                f"divergence={self.divergence!r} with alpha=1 compares a distribution with itself (the mixture is "
                "all of it): the divergence and its gradient are exactly 0. Use alpha in [0, 1) (DistiLLM: 0.1; "
                "alpha=0 is the plain KL)."
            )

    def _validate_sampled_estimator(self) -> None:
        if self.divergence != "reverse_kl":
            raise ValueError(
                f"estimator={self.estimator!r} estimates the reverse KL from the sampled token only; set "
                f"divergence='reverse_kl' or use estimator='analytic' for divergence={self.divergence!r}."
            )
        if self.loss_top_k is not None or self.clip is not None:
            raise ValueError(
                f"estimator={self.estimator!r} uses only the sampled token: `loss_top_k` and `clip` apply to the "
                "analytic estimator. Unset them or use estimator='analytic'."
            )
