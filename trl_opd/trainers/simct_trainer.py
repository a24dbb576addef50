"""`SimCTTrainer`: on-policy distillation from a teacher with another tokenizer (methods.md §8, arXiv 2605.07711).

Per micro-batch (`_compute_loss`):

1. the student's sampled completions are decoded to text once, without their EOS;
2. each text is re-tokenised by both tokenizers and aligned on byte offsets (`align_texts`); a completion that ended
   with EOS gets each side's EOS appended as a final anchor (SimCT's forced EOS pair), a truncated one gets none;
3. each side scores its own tokenisation after its own prompt (the teacher's prompt is tokenised by the teacher's
   tokenizer and chat template, with the privileged context when that is on);
4. the loss (`cross_tokenizer_loss`) compares one row per segment: `simct_loss` on SimCT segments (or on the 1:1
   anchors only for `"simple"`), or `uld_loss` on every finest segment.

Memory: unlike OPDTrainer's chunked head, both models' completion logits are materialised in full, `[B, T_S, V_S]`
for the student (with its autograd graph) and `[B, T_T, V_T]` for the teacher, in float32: 4·B·(T_S·V_S + T_T·V_T)
bytes plus the student's softmax buffers. With a 150k vocabulary and 4,096-token completions that is ≈2.5 GB per
sequence and side; keep `per_device_train_batch_size` small (the reference trains with micro-batch 1).

The student is scored on the canonical tokenisation of its sample, which may differ from the sampled ids (SimCT's own
choice, methods.md §8.4.7). OPDTrainer's token weighting applies per segment (one loss row = one "token"): PW-OPSD
position weights, TIP selection (soft-OR, entropy sampling, divergence only) and every `loss_reduction`; the
options that need one shared vocabulary are refused by `SimCTConfig` (its docstring lists both).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoTokenizer
from trl.data_utils import is_conversational

from ..cross_tokenizer import (
    align_texts,
    segment_loss_coefficients,
    segment_position_weights,
    segment_teacher_coverage,
    segment_tip_mask,
    shared_vocabulary,
    simct_loss,
    simct_segments,
    stack_segments,
    token_table,
    uld_loss,
)
from ..losses import entropy_from_logits
from .lm_head import head_logits, output_head
from .opd_trainer import OPDTrainer
from .simct_config import SimCTConfig


@dataclass
class CrossTokenizedBatch:
    """A micro-batch re-tokenised by both sides. Ids are right-padded; `segments` are `int64 [G, 5]` rows
    (b, s0, s1, t0, t1) into the completion positions; `student_tokens` counts the real student tokens."""

    student_ids: torch.Tensor
    student_mask: torch.Tensor
    teacher_ids: torch.Tensor
    teacher_mask: torch.Tensor
    segments: torch.Tensor
    student_tokens: int


class SimCTTrainer(OPDTrainer):
    """On-policy distillation across tokenizers. See `SimCTConfig` for every option.

    Args:
        model: the student, a model id/path or a `PreTrainedModel`.
        teacher_model: the teacher, a model id/path or a `PreTrainedModel` with another tokenizer. Defaults to
            `args.teacher_model_name_or_path`.
        args: a `SimCTConfig`.
        processing_class: the student's tokenizer (loaded from the student's path when None, as in TRL).
        teacher_processing_class: the teacher's tokenizer. When None, loaded from
            `args.teacher_tokenizer_name_or_path`, else from the teacher model's path.
        trainer_kwargs: the other arguments of `OPDTrainer` (callbacks, optimizers, peft_config, ...).
    """

    _tag_names = ["trl", "trl_opd", "simct"]
    _name = "SimCT"

    def __init__(
        self,
        model,
        teacher_model=None,
        args: SimCTConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        teacher_processing_class=None,
        **trainer_kwargs,
    ):
        args = args if args is not None else SimCTConfig(output_dir="simct-output")
        if not isinstance(args, SimCTConfig):
            raise TypeError(f"SimCTTrainer needs a SimCTConfig, got {type(args).__name__}.")
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        self._check_teacher_argument(teacher_model)
        if args.uses_self_teacher(teacher_model):
            raise ValueError("teacher_model='self' shares the student's tokenizer: use OPDTrainer for it.")
        # Loaded and checked before any model, so a missing tokenizer, or one without character offsets (a slow,
        # pure-Python tokenizer: there is no fallback, the alignment is built on offsets), fails fast.
        self.teacher_tokenizer = teacher_processing_class or self._load_teacher_tokenizer(teacher_model, args)
        token_table(self.teacher_tokenizer)
        if processing_class is not None:
            token_table(processing_class)
        super().__init__(model, teacher_model, args, train_dataset, eval_dataset, processing_class, **trainer_kwargs)
        self._check_tokenizers_differ()
        token_table(self._tokenizer)  # the student's, when the parent loaded it
        self._shared_ids = shared_vocabulary(
            self._tokenizer, self.teacher_tokenizer, mode=args.shared_vocabulary_mode
        )

    # ------------------------------------------------------------------ tokenizers

    def _shared_vocab_size(self, model, teacher_model, student_tokenizer, args) -> None:
        """The parent's vocabulary-size guard does not apply: the vocabularies are meant to differ."""
        return None

    @staticmethod
    def _load_teacher_tokenizer(teacher_model, args: SimCTConfig):
        path = args.teacher_tokenizer_name_or_path
        if path is None:
            path = teacher_model if isinstance(teacher_model, str) else teacher_model.config._name_or_path
        if not path:
            raise ValueError(
                "Cannot find the teacher's tokenizer: the teacher model has no `_name_or_path`. Set "
                "`teacher_tokenizer_name_or_path` in the SimCTConfig or pass `teacher_processing_class=`."
            )
        try:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Could not load the teacher's tokenizer from {path!r} ({error}). Set "
                "`teacher_tokenizer_name_or_path` to a tokenizer id or directory, or pass `teacher_processing_class=`."
            ) from error

    def _check_tokenizers_differ(self) -> None:
        if self._tokenizer.get_vocab() == self.teacher_tokenizer.get_vocab():
            raise ValueError(
                "The student and the teacher have the same tokenizer: use OPDTrainer, which compares full next-token "
                "distributions (SimCT would only approximate that)."
            )

    def _teacher_pad_id(self) -> int:
        tokenizer = self.teacher_tokenizer
        for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    # ------------------------------------------------------------------ teacher prompts in the teacher's tokens

    def _set_chat_template_kwargs(self, args) -> None:
        super()._set_chat_template_kwargs(args)
        self._separate_teacher_prompt = True  # the teacher's prompt is always in its own tokens

    def _teacher_prompt_ids(self, rows) -> list[list[int]]:
        """Each row's teacher prompt, tokenised by the teacher's tokenizer under its own chat template."""
        prompts = self._teacher_prompts(rows)
        if is_conversational({"prompt": prompts[0]}):
            tokenized = self.teacher_tokenizer.apply_chat_template(
                conversation=prompts,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                **self._teacher_chat_template_kwargs,
            )
            return [list(ids) for ids in tokenized["input_ids"]]
        return [list(ids) for ids in self.teacher_tokenizer(text=prompts)["input_ids"]]

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        # The parent pads with the student's pad id, which may not exist in the teacher's vocabulary.
        padding = output["teacher_prompt_mask"] == 0
        output["teacher_prompt_ids"] = output["teacher_prompt_ids"].masked_fill(padding, self._teacher_pad_id())
        return output

    # ------------------------------------------------------------------ re-tokenisation and alignment

    def _completion_texts(self, inputs) -> tuple[list[str], list[bool]]:
        """Each completion decoded once without its EOS, and whether it ended with EOS (not truncated)."""
        eos_ids = set(self.eos_token_ids)
        texts, ended = [], []
        for ids, mask in zip(inputs["completion_ids"].tolist(), self._loss_mask(inputs).tolist()):
            ids = [token for token, keep in zip(ids, mask) if keep]
            ended.append(bool(ids) and ids[-1] in eos_ids)
            texts.append(ids[:-1] if ended[-1] else ids)
        decoded = self._tokenizer.batch_decode(texts, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return decoded, ended

    def _align(self, texts: list[str], ended: list[bool]) -> list:
        """`align_texts` per row, with the EOS pair only for completions that ended with EOS."""
        alignments = [None] * len(texts)
        for append_eos in (True, False):
            rows = [row for row, flag in enumerate(ended) if flag == append_eos]
            if not rows:
                continue
            aligned = align_texts(
                [texts[row] for row in rows], self._tokenizer, self.teacher_tokenizer, append_eos=append_eos
            )
            for row, alignment in zip(rows, aligned):
                alignments[row] = alignment
        return alignments

    def _loss_segments(self, alignment) -> np.ndarray:
        """The segments the chosen loss compares (SimCT segments, 1:1 anchors, or every finest segment)."""
        loss = self.args.cross_tokenizer_loss
        if loss == "uld":
            return alignment.segments
        return simct_segments(alignment.segments, alignment.anchors, spans=loss == "simct")

    @staticmethod
    def _right_pad(ids: list[np.ndarray], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, max(T, 1)] ids and mask, right-padded (at least one column, so that an all-empty batch still runs)."""
        width = max(1, max(len(row) for row in ids))
        padded = torch.full((len(ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, row_ids in enumerate(ids):
            padded[row, : len(row_ids)] = torch.as_tensor(row_ids, dtype=torch.long)
            mask[row, : len(row_ids)] = 1
        return padded.to(device), mask.to(device)

    def _cross_tokenize(self, inputs) -> CrossTokenizedBatch:
        texts, ended = self._completion_texts(inputs)
        alignments = self._align(texts, ended)
        device = inputs["completion_ids"].device
        student_ids, student_mask = self._right_pad(
            [a.student_ids for a in alignments], self._tokenizer.pad_token_id, device
        )
        teacher_ids, teacher_mask = self._right_pad(
            [a.teacher_ids for a in alignments], self._teacher_pad_id(), device
        )
        segments = stack_segments([self._loss_segments(a) for a in alignments])
        return CrossTokenizedBatch(
            student_ids, student_mask, teacher_ids, teacher_mask, segments, int(student_mask.sum())
        )

    # ------------------------------------------------------------------ loss

    def _completion_logits(self, unwrapped_model, prompt_ids, prompt_mask, ids, mask, teacher: bool):
        """Float32 `[B, T, V]` logits where position k predicts `ids[:, k]`, after the given prompt."""
        if teacher:
            teacher_inputs = {
                "teacher_prompt_ids": prompt_ids,
                "teacher_prompt_mask": prompt_mask,
                "completion_ids": ids,
                "completion_mask": mask,
            }
            hidden = self._teacher_hidden_state(teacher_inputs, ids.size(1))
            with torch.no_grad():
                return head_logits(hidden, output_head(self._unwrapped_teacher()))
        input_ids, attention_mask = torch.cat([prompt_ids, ids], 1), torch.cat([prompt_mask, mask], 1)
        hidden = self._hidden_states(unwrapped_model, input_ids, attention_mask, ids.size(1))
        return head_logits(hidden, output_head(unwrapped_model))

    def _per_segment_loss(self, student_logits, teacher_logits, batch: CrossTokenizedBatch) -> torch.Tensor:
        """`[G]` loss of every compared segment (gradient to the student logits)."""
        args = self.args
        arguments = (student_logits, teacher_logits, batch.student_ids, batch.teacher_ids, batch.segments)
        common = {"temperature": self.distillation_temperature, "reduction": "none"}
        if args.cross_tokenizer_loss == "uld":
            return uld_loss(*arguments, merge=args.uld_merge, **common)
        return simct_loss(
            *arguments, self._shared_ids, span_score=args.simct_span_score, exclusive_spans=args.simct_exclusive_spans,
            **common,
        )

    @torch.no_grad()
    def _segment_weights(self, batch: CrossTokenizedBatch, per_segment, student_entropy, teacher_logits=None):
        """OPDTrainer's token weighting with one segment per token (see `SimCTConfig`), times the teacher-coverage
        filter: `[G]` weights or None."""
        args = self.args
        factors = []
        if args.simct_min_teacher_coverage > 0 and teacher_logits is not None:
            coverage = segment_teacher_coverage(
                teacher_logits, batch.teacher_ids, batch.segments, self._shared_ids[1], self.distillation_temperature
            )
            factors.append((coverage >= args.simct_min_teacher_coverage).float())
        if args.token_selection != "none":
            kept = segment_tip_mask(
                batch.segments, student_entropy, per_segment.detach(), batch.student_ids.size(0),
                ratio=args.token_ratio, strategy=args.token_selection.removeprefix("tip_"),
                scope=args.token_selection_scope, generator=self._selection_generator(per_segment.device),
            )
            factors.append(kept.float())
        if args.position_weighting != "none":
            factors.append(segment_position_weights(
                batch.segments, batch.student_mask, w_min=args.position_w_min, tau=args.position_tau,
                slope=args.position_slope, direction=args.position_weighting,
            ))
        if not factors:
            return None
        weights = factors[0]
        for factor in factors[1:]:
            weights = weights * factor
        return weights

    @torch.no_grad()
    def _segment_coefficients(self, batch: CrossTokenizedBatch, weights, inputs, num_items_in_batch):
        """`[G]` coefficients with loss = Σ c·ℓ, scaled for gradient accumulation and DDP averaging like
        `OPDTrainer._loss_coefficients` (token counts are the re-tokenised student tokens)."""
        reduction = self.args.loss_reduction
        training = self.model.training
        row_tokens = batch.student_mask.sum(dim=1)
        if reduction == "token_mean":  # the step's generated tokens; this micro-batch's student tokens in evaluation
            return segment_loss_coefficients(batch.segments, row_tokens, weights, num_items=num_items_in_batch)
        if reduction == "sequence_mean":
            num_sequences = None
            if training:
                num_sequences = inputs["num_sequences_in_batch"].clamp(min=1) / self.accelerator.num_processes
            return segment_loss_coefficients(
                batch.segments, row_tokens, weights, reduction=reduction, num_sequences=num_sequences
            )
        num_items = None
        if reduction == "weighted_mean" and training:  # Σ w·n over every process at this micro-step
            counts = (batch.segments[:, 2] - batch.segments[:, 1]).float()
            local = counts.sum() if weights is None else (counts * weights.float()).sum()
            num_items = self._mean_over_processes(local)
        coefficients = segment_loss_coefficients(
            batch.segments, row_tokens, weights, reduction=reduction, num_items=num_items
        )
        return coefficients / self.current_gradient_accumulation_steps if training else coefficients

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """Σ over segments of c·ℓ (`_segment_coefficients`; by default c = 1 / `num_items_in_batch`, the step's
        generated tokens per process, so the sum over micro-batches and processes is the token mean of the step;
        gradient-accumulation exact). Without it (evaluation), by this micro-batch's re-tokenised student tokens.
        Returns (loss, entropy sum, student token count) like `trl.DistillationTrainer._compute_loss`."""
        batch = self._cross_tokenize(inputs)
        student_logits = self._completion_logits(
            unwrapped_student, inputs["prompt_ids"], inputs["prompt_mask"],
            batch.student_ids, batch.student_mask, teacher=False,
        )
        teacher_logits = self._completion_logits(
            None, inputs["teacher_prompt_ids"], inputs["teacher_prompt_mask"],
            batch.teacher_ids, batch.teacher_mask, teacher=True,
        ).to(student_logits.device)
        batch.segments = batch.segments.to(student_logits.device)
        student_entropy = self._student_entropy(student_logits.detach())
        weights = None
        if len(batch.segments) == 0:  # nothing aligned (no anchor): a zero loss that still touches the graph
            loss = student_logits.sum() * 0.0
            loss_sum = loss.detach()
        else:
            per_segment = self._per_segment_loss(student_logits, teacher_logits, batch)
            weights = self._segment_weights(batch, per_segment, student_entropy, teacher_logits)
            coefficients = self._segment_coefficients(batch, weights, inputs, num_items_in_batch)
            loss = (coefficients.to(per_segment.dtype) * per_segment).sum().to(student_logits.dtype)
            loss_sum = per_segment.detach().sum()
        self._stash_alignment_stats(batch, loss_sum, weights)
        entropy_sum = (student_entropy * batch.student_mask).sum()
        return loss, entropy_sum, batch.student_mask.sum()

    def _student_entropy(self, student_logits) -> torch.Tensor:
        """`[B, T_S]` entropy of the student's next-token distribution at the distillation temperature."""
        return entropy_from_logits(student_logits, self.distillation_temperature)  # 0·log 0 = 0 at −inf logits

    def _stash_alignment_stats(self, batch: CrossTokenizedBatch, loss_sum: torch.Tensor, weights=None) -> None:
        """`simct/align_ratio`: share of student tokens inside a compared segment; `simct/segment_loss`: mean loss
        per segment; `simct/shared_vocab_size`: |V∩|; with token weighting, `simct/selected_ratio` (segments with a
        non-zero weight) and `simct/segment_weight` (mean weight per segment)."""
        device = batch.student_mask.device
        student_tokens = torch.tensor(float(batch.student_tokens), device=device)
        covered = (batch.segments[:, 2] - batch.segments[:, 1]).sum().float().to(device)
        segments = torch.tensor(float(len(batch.segments)), device=device)
        self._stash_stat("simct/align_ratio", covered, student_tokens)
        self._stash_stat("simct/segment_loss", loss_sum.float().to(device), segments)
        shared = torch.tensor(float(len(self._shared_ids[0])), device=device)
        self._stash_stat("simct/shared_vocab_size", shared, torch.ones((), device=device))
        if weights is not None:
            self._stash_stat("simct/selected_ratio", (weights != 0).sum().float().to(device), segments)
            self._stash_stat("simct/segment_weight", weights.sum().float().to(device), segments)

