"""SimCT's objective (methods.md §8): the same weighting and reduction as `objective.OPDObjective`, over segments.

A SimCT micro-batch is a set of aligned segments (b, s0, s1, t0, t1), each one loss row ℓ_g comparing the student's
and the teacher's next-token distributions across tokenizers (`cross_tokenizer.simct_loss`, or ULD's sorted-probability
distance `uld_loss`). A segment is a reduction unit that stands for its s1 − s0 student tokens
(`reduction.segment_units`), so `token_mean` still divides by student tokens. The weight factors are OPDTrainer's,
one segment in place of one token, plus SimCT's teacher-coverage filter:

* `simct_min_teacher_coverage`: keep a segment only if its row covers that share of the teacher's probability;
* TIP selection per segment (`cross_tokenizer.segment_tip_mask`);
* PW-OPSD position weights, the mean over the segment's student tokens (`cross_tokenizer.segment_position_weights`).

Inputs are plain tensors (`SegmentBatch`): both sides' completion logits, re-tokenised ids and the segments. Stats
(`simct/…`) are (sum, count) pairs like the token objective's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cross_tokenizer import (
    segment_position_weights,
    segment_teacher_coverage,
    segment_tip_mask,
    simct_loss,
    uld_loss,
)
from .losses import entropy_from_logits
from .objective import ObjectiveOutput, PositionWeights, Stats, TIPSelection, stash
from .reduction import StepNormalisers, combine_factors, segment_units, step_coefficients


@dataclass
class SegmentBatch:
    """One micro-batch re-tokenised by both sides and aligned.

    Attributes:
        student_logits: `[B, T_S, V_S]` (gradient), position k predicting `student_ids[:, k]`.
        teacher_logits: `[B, T_T, V_T]` (no gradient), position k predicting `teacher_ids[:, k]`.
        student_ids / teacher_ids: `[B, T_S]` / `[B, T_T]` right-padded re-tokenised completions.
        student_mask: `[B, T_S]` the real student tokens.
        segments: `int64 [G, 5]` rows (b, s0, s1, t0, t1), grouped by b.
        shared_ids: (student ids, teacher ids) of the shared vocabulary V∩.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_mask: torch.Tensor
    segments: torch.Tensor
    shared_ids: tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class SegmentObjective:
    """Segment rows, weight factors and one reduction (see the module docstring)."""

    loss: str = "simct"  # simct | simple | uld
    temperature: float = 1.0
    span_score: str = "mean"
    exclusive_spans: bool = False
    uld_merge: bool = False
    reduction: str = "token_mean"
    min_teacher_coverage: float = 0.0
    tip: TIPSelection | None = None
    position: PositionWeights | None = None

    @classmethod
    def from_config(cls, args, *, temperature: float | None = None) -> SegmentObjective:
        tip = None
        if args.token_selection != "none":
            tip = TIPSelection(args.token_selection.removeprefix("tip_"), args.token_ratio,
                               args.token_selection_scope, args.token_importance_weighting)
        position = None
        if args.position_weighting != "none":
            position = PositionWeights(args.position_weighting, args.position_w_min, args.position_tau,
                                       args.position_slope)
        return cls(
            loss=args.cross_tokenizer_loss,
            temperature=args.effective_distillation_temperature if temperature is None else temperature,
            span_score=args.simct_span_score,
            exclusive_spans=args.simct_exclusive_spans,
            uld_merge=args.uld_merge,
            reduction=args.loss_reduction,
            min_teacher_coverage=args.simct_min_teacher_coverage,
            tip=tip,
            position=position,
        )

    def __call__(
        self, batch: SegmentBatch, normalisers: StepNormalisers, *, selection_seed: int | None = None
    ) -> ObjectiveOutput:
        """Σ over segments of c·ℓ (by default c = 1 / `num_items`, the step's generated tokens per process, so the
        sum over micro-batches and processes is the token mean of the step). Returns the loss, the student's entropy
        summed over its re-tokenised tokens, their count, and the stats."""
        student_logits, segments = batch.student_logits, batch.segments
        student_entropy = entropy_from_logits(student_logits.detach(), self.temperature)  # 0·log 0 = 0 at −inf
        stats: Stats = {}
        weights = None
        if len(segments) == 0:  # nothing aligned (no anchor): a zero loss that still touches the graph
            loss = student_logits.sum() * 0.0
            loss_sum = loss.detach()
        else:
            per_segment = self.segment_losses(batch)
            weights = self._weights(batch, per_segment, student_entropy, selection_seed)
            rows, tokens = segment_units(segments)
            coefficients = step_coefficients(
                self.reduction, rows, tokens, batch.student_mask.sum(dim=1), weights, normalisers
            )
            loss = (coefficients.to(per_segment.dtype) * per_segment).sum().to(student_logits.dtype)
            loss_sum = per_segment.detach().sum()
        self._stash(stats, batch, loss_sum, weights)
        entropy_sum = (student_entropy * batch.student_mask).sum()
        return ObjectiveOutput(loss, entropy_sum, batch.student_mask.sum(), stats)

    def segment_losses(self, batch: SegmentBatch) -> torch.Tensor:
        """`[G]` loss of every compared segment (gradient to the student logits)."""
        arguments = (batch.student_logits, batch.teacher_logits, batch.student_ids, batch.teacher_ids, batch.segments)
        common = {"temperature": self.temperature, "reduction": "none"}
        if self.loss == "uld":
            return uld_loss(*arguments, merge=self.uld_merge, **common)
        return simct_loss(*arguments, batch.shared_ids, span_score=self.span_score,
                          exclusive_spans=self.exclusive_spans, **common)

    @torch.no_grad()
    def _weights(self, batch: SegmentBatch, per_segment, student_entropy, selection_seed) -> torch.Tensor | None:
        """The product of the enabled factors, `[G]`, or None (uniform)."""
        factors = []
        if self.min_teacher_coverage > 0:
            coverage = segment_teacher_coverage(batch.teacher_logits, batch.teacher_ids, batch.segments,
                                                batch.shared_ids[1], self.temperature)
            factors.append((coverage >= self.min_teacher_coverage).float())
        if self.tip is not None:
            generator = torch.Generator(device=per_segment.device).manual_seed(int(selection_seed or 0))
            kept = segment_tip_mask(
                batch.segments, student_entropy, per_segment.detach(), batch.student_ids.size(0),
                ratio=self.tip.ratio, strategy=self.tip.strategy, scope=self.tip.scope, generator=generator,
            )
            factors.append(kept.float())
        if self.position is not None:
            position = self.position
            factors.append(segment_position_weights(batch.segments, batch.student_mask, w_min=position.w_min,
                                                    tau=position.tau, slope=position.slope,
                                                    direction=position.direction))
        return combine_factors(factors)

    @staticmethod
    def _stash(stats: Stats, batch: SegmentBatch, loss_sum: torch.Tensor, weights) -> None:
        """`simct/aligned_share`: share of student tokens inside a compared segment; `simct/segment_loss`: mean loss
        per segment; `simct/shared_vocab_size`: |V∩|; with token weighting, `simct/selected_share` (segments with a
        non-zero weight) and `simct/segment_weight` (mean weight per segment)."""
        device = batch.student_mask.device
        segments = batch.segments
        num_segments = torch.tensor(float(len(segments)), device=device)
        covered = (segments[:, 2] - segments[:, 1]).sum().float().to(device)
        stash(stats, "simct/aligned_share", covered, batch.student_mask.sum())
        stash(stats, "simct/segment_loss", loss_sum.float().to(device), num_segments)
        stash(stats, "simct/shared_vocab_size", float(len(batch.shared_ids[0])), 1.0)
        if weights is not None:
            stash(stats, "simct/selected_share", (weights != 0).sum().float().to(device), num_segments)
            stash(stats, "simct/segment_weight", weights.sum().float().to(device), num_segments)
