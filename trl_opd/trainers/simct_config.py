"""`SimCTConfig`: `OPDConfig` plus the knobs of cross-tokenizer on-policy distillation (methods.md §8)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..cross_tokenizer import SHARED_VOCAB_MODES, SPAN_SCORES, ULD_MERGES
from .opd_config import OPDConfig, _require_choice, check_field_types

CROSS_TOKENIZER_LOSSES = ("simct", "simple", "uld")


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

    Refused at construction (each must keep its default; `trl_opd.trainers.support` is the registry, with the reason
    for each): what acts on one shared vocabulary, `divergence` (SimCT's rows are a reverse KL) with `beta` and
    `alpha`, `estimator`, `loss_top_k` with its source and tail, `clip`, `token_selection="tip_q3"`,
    `token_importance_weighting`, `evidence_mode` with its threshold and quantile, `diagnostics_steps` and
    `diagnostics_top_k`; what feeds one side's token ids to the other, `seq_kd`, `guided_fraction` and the teacher
    `"self"` (same tokenizer: use OPDTrainer); what SimCTTrainer's loss never runs, OPRD (`representation_weight`,
    `logit_weight` and the other OPRD fields) and the chunked LM-head settings (`loss_chunk_size`,
    `loss_implementation`, `token_scoring_chunk_size`: both models' logits are materialised in full). `lmbda < 1`
    (completions from the dataset), the privileged teacher prompt and teacher-aligned prompts work.

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

    trainer_name = "SimCTTrainer"  # not a field: the trainer `support.refuse_unsupported` checks this config against

    def __post_init__(self):
        self._validate_simct_fields()
        super().__post_init__()

    def _validate_simct_fields(self) -> None:
        check_field_types(self)  # before the comparisons below; OPDConfig's checks run after
        _require_choice("cross_tokenizer_loss", self.cross_tokenizer_loss, CROSS_TOKENIZER_LOSSES)
        _require_choice("simct_span_score", self.simct_span_score, SPAN_SCORES)
        _require_choice("shared_vocabulary_mode", self.shared_vocabulary_mode, SHARED_VOCAB_MODES)
        _require_choice("uld_merge", self.uld_merge, ULD_MERGES)
        if not 0.0 <= self.simct_min_teacher_coverage <= 1.0:
            raise ValueError(
                "`simct_min_teacher_coverage` must be in [0, 1] (a share of the teacher's probability), got "
                f"{self.simct_min_teacher_coverage}."
            )
        # The OPDConfig fields SimCTTrainer does not run (OPRD, the top-k support, diagnostics, ...) are refused by
        # `support.refuse_unsupported`, which OPDConfig's validation calls (the registry says which and why).
