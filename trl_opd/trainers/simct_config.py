"""`SimCTConfig`: `OPDConfig` plus the knobs of cross-tokenizer on-policy distillation (methods.md §8)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..cross_tokenizer import SHARED_VOCAB_MODES, SPAN_SCORES, ULD_MERGES
from .opd_config import OPDConfig, _require_choice

CROSS_TOKENIZER_LOSSES = ("simct", "simple", "uld")

# OPDConfig options that act on per-token distributions over one shared vocabulary. SimCT's rows are per segment
# over V∩ plus a span column, so these have no meaning here (yet): each must keep its default.
_UNSUPPORTED_OPD_OPTIONS = {
    "divergence": ("reverse_kl", "SimCT's loss is the reverse KL of its segment rows"),
    "estimator": ("analytic", "the segment rows are compared exactly"),
    "loss_top_k": (None, "rows already cover only V∩ plus the span column"),
    "clip": (None, "no per-entry clip on segment rows"),
    "loss_reduction": ("token_mean", "only the token mean over the step is implemented"),
    "token_selection": ("none", "TIP scores tokens over one shared vocabulary"),
    "position_weighting": ("none", "not implemented per segment yet"),
    "evidence_mode": ("none", "the evidence compares both models' log-probs of one token id"),
    "seq_kd": (False, "the teacher cannot generate in the student's token ids"),
    "guided_fraction": (0.0, "guided rollouts feed the teacher's prompt ids to the student"),
    "diagnostics_steps": (0, "the top-k overlap compares both models' distributions over one shared vocabulary"),
}


@dataclass
class SimCTConfig(OPDConfig):
    r"""
    Configuration for [`SimCTTrainer`]: every field of [`OPDConfig`] plus the fields below.

    The student and the teacher have different tokenizers. Each student completion is decoded to text once, the text
    is re-tokenised by both tokenizers (each side after its own prompt and chat template), the two tokenisations are
    aligned on byte offsets, and the loss compares one row per aligned segment (methods.md §8.1–§8.2).

    OPDConfig options that assume one shared vocabulary must keep their defaults: `divergence="reverse_kl"`,
    `estimator="analytic"`, `loss_top_k=None`, `clip=None`, `loss_reduction="token_mean"`, `token_selection="none"`,
    `position_weighting="none"`, `evidence_mode="none"`, `seq_kd=False`, `guided_fraction=0`; the teacher cannot be
    `"self"`. `lmbda < 1` (completions from the dataset) and the privileged teacher prompt work.

    Parameters:
        teacher_tokenizer_name_or_path (`str` or `None`, defaults to `None`):
            Tokenizer of the teacher (a Hub id or a local directory). `None` loads it from the teacher model's path
            (`teacher_model_name_or_path`, or the `_name_or_path` of a teacher passed as a model).
        cross_tokenizer_loss (`str`, defaults to `"simct"`):
            `"simct"`: SimCT's reverse KL over V∩ plus a span column per segment (arXiv 2605.07711). `"simple"`: the
            same rows on 1:1 anchor segments only (the `simple_ctkd` ablation: spans are dropped). `"uld"`: the ULD /
            TRL GOLD baseline, sorted-probability L1 between merged distributions on every finest segment.
        simct_span_score (`str`, defaults to `"logit_mean"`):
            Score of a span column: `"logit_mean"` (faithful: mean raw logit of the span's tokens) or
            `"logprob_mean"` (mean log-probability, with the V∩ columns also as log-probabilities; methods.md §8.4.1).
        shared_vocabulary_mode (`str`, defaults to `"raw"`):
            How V∩ matches pieces: `"raw"` (faithful: equal piece strings once `Ġ` is mapped to `▁`) or `"decoded"`
            (equal decoded bytes; also matches byte-fallback pieces with byte-level ones; methods.md §8.4.5).
        uld_merge (`str`, defaults to `"observed"`):
            With `cross_tokenizer_loss="uld"`: how a multi-token segment's distribution is merged, `"observed"` (first
            position × probabilities of the later tokens) or `"bayesian"` (last position × earlier tokens).
    """

    teacher_tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher tokenizer (Hub id or directory); None = the teacher model's path."},
    )
    cross_tokenizer_loss: str = field(
        default="simct",
        metadata={"help": "Cross-tokenizer loss: " + ", ".join(CROSS_TOKENIZER_LOSSES) + "."},
    )
    simct_span_score: str = field(
        default="logit_mean", metadata={"help": "SimCT span column: " + ", ".join(SPAN_SCORES) + "."}
    )
    shared_vocabulary_mode: str = field(
        default="raw", metadata={"help": "Shared-vocabulary matching: " + ", ".join(SHARED_VOCAB_MODES) + "."}
    )
    uld_merge: str = field(
        default="observed", metadata={"help": "ULD segment merge: " + ", ".join(ULD_MERGES) + "."}
    )

    def __post_init__(self):
        self._validate_simct_fields()
        super().__post_init__()

    def _validate_simct_fields(self) -> None:
        _require_choice("cross_tokenizer_loss", self.cross_tokenizer_loss, CROSS_TOKENIZER_LOSSES)
        _require_choice("simct_span_score", self.simct_span_score, SPAN_SCORES)
        _require_choice("shared_vocabulary_mode", self.shared_vocabulary_mode, SHARED_VOCAB_MODES)
        _require_choice("uld_merge", self.uld_merge, ULD_MERGES)
        if self.uses_self_teacher():
            raise ValueError(
                "teacher_model_name_or_path='self' shares the student's tokenizer; SimCTTrainer is for a teacher "
                "with another tokenizer. Use OPDTrainer (OPDConfig) for self-distillation."
            )
        for name, (default, reason) in _UNSUPPORTED_OPD_OPTIONS.items():
            if getattr(self, name) != default:
                raise ValueError(
                    f"SimCTConfig does not support {name}={getattr(self, name)!r} ({reason}); leave it at "
                    f"{default!r}."
                )
