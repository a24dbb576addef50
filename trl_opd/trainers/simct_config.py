"""`SimCTConfig`: `OPDConfig` plus the knobs of cross-tokenizer on-policy distillation (methods.md §8)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..cross_tokenizer import SHARED_VOCAB_MODES, SPAN_SCORES, ULD_MERGES
from .opd_config import OPDConfig, _require_choice

CROSS_TOKENIZER_LOSSES = ("simct", "simple", "uld")

# OPDConfig options that act on per-token distributions over one shared vocabulary. SimCT's rows are per segment
# over V∩ plus a span column, so these have no meaning here: each must keep its default.
_UNSUPPORTED_OPD_OPTIONS = {
    "divergence": ("reverse_kl", "SimCT's loss is the reverse KL of its segment rows"),
    "estimator": ("analytic", "the segment rows are compared exactly"),
    "loss_top_k": (None, "rows already cover only V∩ plus the span column"),
    "clip": (None, "no per-entry clip on segment rows"),
    "evidence_mode": ("none", "the evidence compares both models' log-probs of one token id"),
    "seq_kd": (False, "the teacher cannot generate in the student's token ids"),
    "guided_fraction": (0.0, "guided rollouts feed the teacher's prompt ids to the student"),
    "token_importance_weighting": (False, "importance weights are not implemented per segment"),
}
# TIP strategies that work per segment: their scores need only the student entropy at the segment's first position
# and the segment's own loss value. `tip_q3` scores by a forward KL over one shared vocabulary, which segment rows
# do not have.
SEGMENT_TOKEN_SELECTIONS = ("none", "tip_soft_or", "tip_entropy_sample", "tip_divergence_only")


@dataclass
class SimCTConfig(OPDConfig):
    r"""
    Configuration for [`SimCTTrainer`]: every field of [`OPDConfig`] plus the fields below.

    The student and the teacher have different tokenizers. Each student completion is decoded to text once, the text
    is re-tokenised by both tokenizers (each side after its own prompt and chat template), the two tokenisations are
    aligned on byte offsets, and the loss compares one row per aligned segment (methods.md §8.1–§8.2).

    OPDConfig's token weighting applies per segment: one segment (one loss row) takes the place of one token.

    * `position_weighting` (PW-OPSD `"increasing"`, IW-OPD `"decreasing"`): a segment's weight is the mean of the
      position weights of its student tokens, positions relative to the student's re-tokenised completion (a 1:1
      segment gets exactly its token's weight).
    * `token_selection` = `"tip_soft_or"`, `"tip_entropy_sample"`, `"tip_divergence_only"`: TIP selects segments.
      A segment's entropy is the student's entropy at its first position (full student vocabulary, at the
      distillation temperature: the distribution its row is read from); its divergence is its own loss value (the
      SimCT row's reverse KL; the ULD L1 with `cross_tokenizer_loss="uld"`). `token_ratio` ρ is the share of
      segments kept, max(1, ⌊ρ·G⌋) per sequence (`token_selection_scope="sequence"`) or per micro-batch
      (`"batch"`). The scores come from the loss values themselves (both models' logits are materialised anyway),
      so there is no separate scoring pass.
    * `loss_reduction`: a segment's row stands for its n student tokens. `"token_mean"` (default) Σ w·ℓ over the
      step divided by the step's generated tokens; `"token_mean_microbatch"` by the micro-batch's re-tokenised
      student tokens; `"sequence_mean"` each sequence's Σ w·ℓ over its student tokens, averaged over the step's
      sequences; `"weighted_mean"` Σ w·ℓ / Σ w·n (the mean over the selected student tokens, TIP Eq. 9), across
      processes.

    Not meaningful across tokenizers, so refused (each must keep its default): `divergence="reverse_kl"`,
    `estimator="analytic"`, `loss_top_k=None`, `clip=None` (all act on one shared vocabulary), `token_selection=
    "tip_q3"` (a forward KL over one vocabulary), `token_importance_weighting=False`, `evidence_mode="none"` (compares
    both models' log-probs of one token id), `seq_kd=False` and `guided_fraction=0` (the teacher's token ids cannot
    be fed to the student). The teacher cannot be `"self"` (same tokenizer: use OPDTrainer). `lmbda < 1`
    (completions from the dataset) and the privileged teacher prompt work.

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
        simct_exclusive_spans (`bool`, defaults to `False`):
            Our fix of SimCT's double counting (methods.md §8.4.2), off by default (faithful): in a span row the V∩
            columns of the span's first student token and first teacher token are removed on both sides, so the
            span's continuation is counted once, by the span column (`simct_loss(exclusive_spans=True)`).
        simct_min_teacher_coverage (`float`, defaults to `0.0`):
            Our addition (not in the paper): drop the segments whose row represents less than this share of the
            teacher's next-token probability at the segment's first position (mass on V∩, plus the span's first
            teacher token for a span row; `cross_tokenizer.segment_teacher_coverage`). Such a row compares the
            student with the teacher's leftovers renormalised over V∩, which is noise: on the testbed, after a
            student's stray `\\` the BPE teacher puts ~all its mass on `boxed`, outside V∩ of a character-level
            student. `0` keeps every segment (faithful). Combines with the token weighting below (a product).
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
    simct_exclusive_spans: bool = field(
        default=False,
        metadata={"help": "Count a span's continuation once (drop its first tokens' V∩ columns in span rows)."},
    )
    simct_min_teacher_coverage: float = field(
        default=0.0,
        metadata={"help": "Drop segments whose row covers less of the teacher's probability (0 = keep all)."},
    )

    def __post_init__(self):
        self._validate_simct_fields()
        super().__post_init__()

    def _validate_simct_fields(self) -> None:
        _require_choice("cross_tokenizer_loss", self.cross_tokenizer_loss, CROSS_TOKENIZER_LOSSES)
        _require_choice("simct_span_score", self.simct_span_score, SPAN_SCORES)
        _require_choice("shared_vocabulary_mode", self.shared_vocabulary_mode, SHARED_VOCAB_MODES)
        _require_choice("uld_merge", self.uld_merge, ULD_MERGES)
        if not 0.0 <= self.simct_min_teacher_coverage <= 1.0:
            raise ValueError(
                "`simct_min_teacher_coverage` must be in [0, 1] (a share of the teacher's probability), got "
                f"{self.simct_min_teacher_coverage}."
            )
        if self.uses_self_teacher():
            raise ValueError(
                "teacher_model_name_or_path='self' shares the student's tokenizer; SimCTTrainer is for a teacher "
                "with another tokenizer. Use OPDTrainer (OPDConfig) for self-distillation."
            )
        if self.token_selection not in SEGMENT_TOKEN_SELECTIONS:
            raise ValueError(
                f"SimCTConfig does not support token_selection={self.token_selection!r} (its score needs a forward KL "
                f"over one shared vocabulary); choose one of {SEGMENT_TOKEN_SELECTIONS}, applied per segment."
            )
        for name, (default, reason) in _UNSUPPORTED_OPD_OPTIONS.items():
            if getattr(self, name) != default:
                raise ValueError(
                    f"SimCTConfig does not support {name}={getattr(self, name)!r} ({reason}); leave it at "
                    f"{default!r}."
                )
