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

from ..cross_tokenizer import align_texts, shared_vocabulary, simct_segments, stack_segments, token_table
from ..segment_objective import SegmentBatch, SegmentObjective
from ..serving.backends import TeacherRows
from .dataset_checks import check_teacher_argument
from .lm_head import output_head
from .opd_trainer import OPDTrainer
from .served_teacher import probe_text
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
        if not args.served_teacher:
            check_teacher_argument(teacher_model)
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

    def _served_vocab_size(self, model, student_tokenizer, train_dataset, args) -> None:
        """A served teacher's tokenizer must be the one the alignment uses (`teacher_tokenizer_name_or_path`)."""
        self._served_teacher.check_tokenizer(self.teacher_tokenizer, probe_text(train_dataset))
        return None

    @staticmethod
    def _load_teacher_tokenizer(teacher_model, args: SimCTConfig):
        path = args.teacher_tokenizer_name_or_path
        if path is None and args.served_teacher:
            raise ValueError(
                "A served SimCT teacher needs its tokenizer here for the alignment: set `teacher_tokenizer_name_or_path` "
                "(the served model's tokenizer) or pass `teacher_processing_class=`."
            )
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
            if self._served_teacher is not None:  # trl_opd's server: its hidden states and its head
                rows = TeacherRows(prompt_ids, prompt_mask, ids, mask)
                teacher = self._served_teacher.signal(rows, vocab_size=None)
                return teacher.head.logits(teacher.hidden).float()
            hidden = self._teacher_hidden_state(teacher_inputs, ids.size(1))
            with torch.no_grad():
                return output_head(self._unwrapped_teacher()).logits(hidden).float()
        input_ids, attention_mask = torch.cat([prompt_ids, ids], 1), torch.cat([prompt_mask, mask], 1)
        hidden = self._hidden_states(unwrapped_model, input_ids, attention_mask, ids.size(1))
        return output_head(unwrapped_model).logits(hidden).float()

    def _build_objective(self) -> SegmentObjective:
        return SegmentObjective.from_config(self.args, temperature=self.distillation_temperature)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """Re-tokenise and align, run both sides on their own tokenisation, then the segment objective.
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
        segment_batch = SegmentBatch(
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            student_ids=batch.student_ids,
            teacher_ids=batch.teacher_ids,
            student_mask=batch.student_mask,
            segments=batch.segments.to(student_logits.device),
            shared_ids=self._shared_ids,
        )
        output = self.objective(segment_batch, self._step_normalisers(inputs, num_items_in_batch),
                                selection_seed=self._selection_seed())
        self._loss_stats.update(output.stats)
        return output.loss, output.entropy_sum, output.num_tokens
