"""`OPDTrainer`: `trl.DistillationTrainer` with the OPD method family, as an orchestrator around `OPDObjective`.

The parent generates on-policy completions once per gradient-accumulation window and hands micro-batches to
`compute_loss`, which routes `_compute_loss` through the DDP/FSDP wrapper. We keep that machinery and override:

* `_generate_and_score_completions` / `_generate_single_turn`: GKD's on/off-policy mix (`lmbda`, `seq_kd`), with
  one coin per generation batch shared by every process, teacher-aligned prompts (methods.md §7.3), privileged
  teacher prompts and EDGE-OPD guided rows (§2, §5), and the per-step sequence count for `sequence_mean`;
* `_compute_loss`: the student's and the teacher's forwards (with the capture request armed around each, for
  OPRD), then one call of `self.objective` (`trl_opd.objective.OPDObjective`, built from the config): weight
  factors, one reduction, the loss terms, the diagnostics. Its statistics are gathered over processes and logged.
* with an AAPA discriminator, `_generate_and_score_completions` also scores the student's rollouts and passes their
  leave-one-out advantages (`trl_opd.anchor`, methods.md §11.3) to the objective's anchor term.

What is trained lives in `trl_opd/objective.py` (pure, tested without a trainer); this module decides which
tensors it gets, on which device, with which step-level normalisers (`_step_normalisers`) and seed.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
from accelerate.utils import is_peft_model
from transformers.utils import logging as hf_logging
from trl import DistillationTrainer
from trl.trainer.utils import pad

from ..anchor import AnchorDiscriminator, leave_one_out_advantages
from ..losses import OutputHead
from ..objective import CompletionBatch, LocalTeacher, OPDObjective, RoutedTeacher
from ..reduction import StepNormalisers
from ..representation import CaptureRequest
from ..serving.backends import TeacherRows, TrlOpdTeacher
from .aligned_prompts import aligned_prompt
from .dataset_checks import (
    check_dataset_size,
    check_datasets,
    check_output_dir,
    check_teacher_argument,
    check_teacher_context,
)
from .engines import check_launch
from .gkd_migration import conversations_to_prompts
from .lm_head import keep_head_whole_in_forward, output_head
from .opd_config import OPDConfig
from .oprd import RepresentationDistillationMixin
from .prompt_checks import check_prompts, text_tokenizer
from .resume import resolve_resume_from_checkpoint
from .routing import TeacherRoutes
from .rows import ALIGNED_STREAM, GUIDED_STREAM, seeded_rows
from .self_distillation import teacher_prompt
from .served_teacher import ServedCapture, connect_served_teacher, served_vocab_size
from .teacher import (
    check_teacher_init_kwargs,
    load_teacher,
    model_config,
    prepare_teacher,
    same_tokenizer_files,
    student_processing_class,
    try_tokenizer,
    warn_if_teacher_smaller,
)

ROLLOUT_SOURCES = ("student", "teacher", "dataset")
# What one of several teachers needs of a batch, cut to its own rows.
_TEACHER_INPUTS = ("prompt_ids", "prompt_mask", "teacher_prompt_ids", "teacher_prompt_mask", "completion_ids",
                   "completion_mask")
logger = hf_logging.get_logger(__name__)


def _trl_vocab_words(student_vocab: int, teacher_vocab: int) -> str:
    """TRL's own sentence for a vocabulary-size mismatch, so scripts that match DistillationTrainer's error still do."""
    if student_vocab == teacher_vocab:
        return ""
    return f"The student model has vocab_size {student_vocab} but the teacher model has vocab_size {teacher_vocab}. "


class _OPDTrainerCore(DistillationTrainer):
    """On-policy distillation trainer. See `OPDConfig` for every option.

    Args:
        model: the student, a model id/path or a `PreTrainedModel` (PEFT through `peft_config`, as in TRL).
        teacher_model: the teacher, a model id/path or a `PreTrainedModel` sharing the student's tokenizer. Defaults to
            `args.teacher_model_name_or_path`. For a teacher with another tokenizer use `SimCTTrainer`. `"self"`: the
            student's own frozen initial weights (OPSD; with PEFT the adapter is disabled for the teacher's forward,
            otherwise a frozen copy of the student is made before training).
        args: an `OPDConfig`.
        train_dataset: rows with a `prompt` column (plain text or conversational); a `completion` column is needed for
            off-policy batches when `lmbda < 1` and `seq_kd=False`; the privileged-context column
            (`args.teacher_context_column`) when the teacher gets a privileged prompt.
            A `messages` column of whole conversations (GKDTrainer's format, no `prompt` column) is split into
            `prompt` = the messages before the last and `completion` = the last, an assistant message
            (`trl_opd.trainers.gkd_migration`).
        The other arguments are those of `trl.DistillationTrainer`.
    """

    _tag_names = ["trl", "trl_opd", "opd"]
    _name = "OPD"

    def __init__(
        self,
        model,
        teacher_model=None,
        args: OPDConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
    ):
        args = args if args is not None else OPDConfig(output_dir="opd-output")
        if not isinstance(args, OPDConfig):
            raise TypeError(f"{type(self).__name__} needs an OPDConfig, got {type(args).__name__}.")
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        # GKD's `messages` datasets: split each conversation into prompt/completion (checked, before any load).
        train_dataset, eval_dataset = conversations_to_prompts(train_dataset, eval_dataset)
        processing_class = processing_class or student_processing_class(model, args)  # TRL's own load, done once
        self._check_before_loading(model, teacher_model, train_dataset, eval_dataset, processing_class, args)
        self._anchor = AnchorDiscriminator.load(args.aapa_discriminator_path) if args.aapa_discriminator_path else None

        super().__init__(
            model=model,
            teacher_model=None,  # loaded and prepared below, without the parent's strict vocabulary-size guard
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
        )
        self.teacher_model = self._build_teacher(teacher_model)
        self.distillation_temperature = args.effective_distillation_temperature
        self._rollout_source = "student"
        self._rollout_rows = None
        self._guided_prompt_ids = {}
        self._loss_stats = {}
        self.objective = self._build_objective()
        self._set_chat_template_kwargs(args)
        self._check_diagnostics_top_k(args)
        if self._dist.is_zero3:  # TRL's DistributedBackend
            keep_head_whole_in_forward(self.model)  # the loss reads the head inside the student's forward
        self._output_heads(self.accelerator.unwrap_model(self.model))  # both heads on one device
        self._suppress_padded_ids()

    def _check_before_loading(self, model, teacher_model, train_dataset, eval_dataset, processing_class, args) -> None:
        """Every check that needs no weights, so bad input fails before anything is loaded; sets what they decide
        (`_served_teacher`, `_self_teacher`, `_privileged`, `_loss_vocab_size`). A served teacher is asked first: a
        server that is down fails here, with its URL."""
        check_launch(args, type(self).__name__)
        self._routes = TeacherRoutes.connect(args)  # several teachers (MOPD): their servers are asked here
        self._served_teacher = None if self._routes else connect_served_teacher(teacher_model, args)
        if self._routes is not None and teacher_model is not None:
            raise ValueError("`teachers` names every teacher of the run: pass no `teacher_model`.")
        if self._routes is None and self._served_teacher is None:
            check_teacher_argument(teacher_model)
            check_teacher_init_kwargs(teacher_model, args)
        self._self_teacher = args.uses_self_teacher(teacher_model)
        self._privileged = args.uses_teacher_context(teacher_model)
        check_datasets(train_dataset, eval_dataset, args)
        check_teacher_context(train_dataset, args, self._privileged)
        # Loaded once for both checks (a real tokenizer takes about a second); the parent loads its own as before.
        student_tokenizer = text_tokenizer(processing_class)
        if self._routes is not None:
            for dataset, split in ((train_dataset, "training"), (eval_dataset, "evaluation")):
                self._routes.check_dataset(dataset, split)
            self._loss_vocab_size = self._routed_vocab_size(model, student_tokenizer, train_dataset, args)
        elif self._served_teacher is not None:
            self._loss_vocab_size = self._served_vocab_size(model, student_tokenizer, train_dataset, args)
        else:
            self._loss_vocab_size = None if self._self_teacher else self._shared_vocab_size(
                model, teacher_model, student_tokenizer, args
            )
        self._check_prompts(train_dataset, model, teacher_model, student_tokenizer, args)
        check_output_dir(args)
        if not self._self_teacher and self._served_teacher is None and self._routes is None:
            warn_if_teacher_smaller(model, teacher_model, args, args.teacher_model_revision)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`trainer.train`; `resume_from_checkpoint=True` skips a checkpoint left half-written by a killed run. A
        training set smaller than one batch fails here (a trainer built only to evaluate or inspect may have one)."""
        check_dataset_size(self.train_dataset, self.args.per_device_train_batch_size * self.args.world_size
                           * self.args.gradient_accumulation_steps, "per_device_train_batch_size x processes x "
                           "gradient_accumulation_steps")
        resume_from_checkpoint = resolve_resume_from_checkpoint(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ------------------------------------------------------------------ validation (before any model is loaded)

    def _shared_vocab_size(self, model, teacher_model, student_tokenizer, args: OPDConfig) -> int | None:
        """None when both LM heads have the same width; the tokenizer's length when the heads are padded differently
        around the same tokenizer (methods.md §0.8); otherwise a ValueError that points to SimCTTrainer."""
        student_vocab = model_config(model, args).get_text_config().vocab_size
        teacher_config = model_config(teacher_model, args, args.teacher_model_revision)
        teacher_vocab = teacher_config.get_text_config().vocab_size
        teacher_tokenizer = student_tokenizer if same_tokenizer_files(model, teacher_model) else \
            text_tokenizer(try_tokenizer(teacher_model, args))
        if student_tokenizer is not None and teacher_tokenizer not in (None, student_tokenizer):
            if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
                raise ValueError(
                    _trl_vocab_words(student_vocab, teacher_vocab)
                    + f"The student's and the teacher's tokenizers differ (vocabularies of {len(student_tokenizer)} and "
                    f"{len(teacher_tokenizer)} tokens; LM heads of {student_vocab} and {teacher_vocab} entries). "
                    "OPDTrainer compares next-token distributions entry by entry, which needs one shared tokenizer. "
                    "Pick a teacher from the student's model family, or use `trl_opd.SimCTTrainer` for a teacher "
                    "with another tokenizer."
                )
        if student_vocab == teacher_vocab:
            return None  # padded or not, both heads describe the same ids: the loss uses every entry
        if teacher_tokenizer is None and student_tokenizer is not None and not isinstance(teacher_model, str):
            # An in-memory teacher without a loadable tokenizer: the documented contract is a shared tokenizer.
            logger.warning(
                "The teacher's tokenizer could not be loaded (an in-memory model without a path); assuming it is the "
                "student's, as OPDTrainer requires. Its LM head has %d entries, the student's %d: the loss uses the "
                "first %d (the tokenizer's length).", teacher_vocab, student_vocab, len(student_tokenizer),
            )
            teacher_tokenizer = student_tokenizer
        same_tokenizer = (
            student_tokenizer is not None
            and teacher_tokenizer is not None
            and len(student_tokenizer) <= min(student_vocab, teacher_vocab)
        )
        if not same_tokenizer:
            raise ValueError(
                _trl_vocab_words(student_vocab, teacher_vocab)
                + f"The student's vocabulary has {student_vocab} entries and the teacher's {teacher_vocab}, and their "
                "tokenizers are not identical (or the teacher's tokenizer could not be loaded). OPDTrainer compares "
                "next-token distributions entry by entry, which needs one shared tokenizer. For a teacher with another "
                "tokenizer use `trl_opd.SimCTTrainer`."
            )
        return len(student_tokenizer)

    def _served_vocab_size(self, model, student_tokenizer, train_dataset, args: OPDConfig) -> int | None:
        """The compared vocabulary with a served teacher, after checking that its tokenizer is the student's."""
        return served_vocab_size(self._served_teacher, model, student_tokenizer, train_dataset, args)

    def _routed_vocab_size(self, model, student_tokenizer, train_dataset, args: OPDConfig) -> int | None:
        """One compared vocabulary for every routed teacher: the whole heads when all match the student's, else the
        tokenizer's length (each teacher checked as the single teacher is)."""
        sizes = [served_vocab_size(route.served, model, student_tokenizer, train_dataset, args)
                 if route.served is not None else self._shared_vocab_size(model, route.path, student_tokenizer, args)
                 for route in self._routes.routes]
        return None if all(size is None for size in sizes) else len(student_tokenizer)

    def _check_prompts(self, train_dataset, model, teacher_model, student_tokenizer, args: OPDConfig) -> None:
        """Every training prompt is well formed and leaves room for `max_completion_length` tokens in both models'
        context (see `check_prompts`); the student's chat-template arguments apply."""
        models = [(model, None)]
        if self._routes is not None:
            models += [(route.path, None) for route in self._routes.routes if route.path is not None]
        elif not self._self_teacher and self._served_teacher is None:
            models.append((teacher_model, args.teacher_model_revision))
        check_prompts(train_dataset, models, student_tokenizer, args,
                      {**(args.chat_template_kwargs or {}), **(args.student_chat_template_kwargs or {})})

    def _output_heads(self, unwrapped_student) -> tuple[OutputHead, OutputHead]:
        """Both LM heads, sliced to the compared vocabulary. The loss reads them chunk by chunk on one device, which
        `__init__` checks once (so a misplaced head fails before training, not at the first step)."""
        student_head = output_head(unwrapped_student, self._loss_vocab_size)
        if self._served_teacher is not None or self._routes is not None:  # the teachers' signals bring their heads
            return student_head, None
        teacher_head = output_head(self._unwrapped_teacher(), self._loss_vocab_size)
        if student_head.weight.device != teacher_head.weight.device:
            raise ValueError(
                f"The student's lm_head is on {student_head.weight.device} and the teacher's on "
                f"{teacher_head.weight.device}; place both heads on the same device (see their `device_map`, e.g. "
                "`teacher_model_init_kwargs={'device_map': ...}`)."
            )
        return student_head, teacher_head

    def _suppress_padded_ids(self) -> None:
        """With heads padded differently around one tokenizer the loss covers the tokenizer's ids only, so the student
        must never sample a padding id (the teacher could not score it): suppress them in generation."""
        if self._loss_vocab_size is None:
            return
        width = output_head(self.accelerator.unwrap_model(self.model)).weight.shape[0]
        padded = list(range(self._loss_vocab_size, width))
        if not padded:
            return
        suppressed = sorted(set(self.generation_kwargs.get("suppress_tokens") or []) | set(padded))
        self.generation_kwargs["suppress_tokens"] = suppressed
        self.generation_config.suppress_tokens = suppressed

    # ------------------------------------------------------------------ teacher

    def _build_teacher(self, teacher_model):
        """The prepared teacher module; for `"self"`, a frozen copy of the student or None (PEFT: adapter disabled);
        None for a served teacher (`self._served_teacher`)."""
        if self._served_teacher is not None:
            return None
        if self._routes is not None:
            for route in self._routes.routes:
                if route.path is not None:
                    route.module = prepare_teacher(self, load_teacher(route.path, self.args))
            return None
        if not self._self_teacher:
            return prepare_teacher(self, load_teacher(teacher_model, self.args))
        if is_peft_model(self.model):
            return None  # `_teacher_forward_context` disables the adapter: the base weights are the initial policy
        return prepare_teacher(self, copy.deepcopy(self.accelerator.unwrap_model(self.model)))

    def _unwrapped_teacher(self):
        if self.teacher_model is None:  # PEFT self-teacher: the student's module, adapter disabled at forward time
            return self.accelerator.unwrap_model(self.model)
        return self.accelerator.unwrap_model(self.teacher_model)

    @contextlib.contextmanager
    def _teacher_forward_context(self, teacher_model=None):
        """No gradients; for the PEFT self-teacher also the adapter off and dropout off for the forward."""
        if teacher_model is not None or self.teacher_model is not None:
            with torch.no_grad():
                yield
            return
        student = self.accelerator.unwrap_model(self.model)
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad(), student.disable_adapter():
                yield
        finally:
            student.train(was_training)

    # ------------------------------------------------------------------ rollouts: on/off-policy mix

    def _draw_rollout_source(self) -> str:
        """One coin per generation batch, derived from (seed, step) so every process draws the same value."""
        if self.args.lmbda >= 1.0:
            return "student"
        coin = np.random.default_rng([self.args.seed, self.state.global_step]).random()
        if coin < self.args.lmbda:
            return "student"
        return "teacher" if self.args.seq_kd else "dataset"

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        self._rollout_source = self._draw_rollout_source() if mode == "train" else "student"
        if mode == "train" and self.args.aligned_prompt_template is not None:
            inputs = self._align_prompts(inputs)
        self._rollout_rows = inputs
        teacher_prompt_ids = self._teacher_prompt_ids(inputs) if self._separate_teacher_prompt else None
        guided = self._draw_guided_rows(len(inputs)) if mode == "train" else [False] * len(inputs)
        self._guided_prompt_ids = {row: teacher_prompt_ids[row] for row, is_guided in enumerate(guided) if is_guided}
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._rollout_rows = None
            self._guided_prompt_ids = {}
        if teacher_prompt_ids is not None:
            output["teacher_prompt_ids"], output["teacher_prompt_mask"] = self._left_pad(teacher_prompt_ids)
        if self.args.guided_fraction > 0:
            output["is_guided"] = torch.tensor(guided, device=self.accelerator.device)
            share = self.accelerator.gather(output["is_guided"].float()).mean().item()
            self._metrics[mode]["rollout/guided_share"].append(share)
        loss_mask = self._loss_mask(output)
        output["num_sequences_in_batch"] = self.accelerator.gather((loss_mask.sum(dim=1) > 0).sum()).sum()
        self._metrics[mode]["rollout/on_policy"].append(float(self._rollout_source == "student"))
        if self._routes is not None:
            output["teacher_index"] = torch.tensor(self._routes.index_of(inputs), device=self.accelerator.device)
        if self._anchor is not None:
            own_rollouts = [self._rollout_source == "student" and not is_guided for is_guided in guided]
            output["aapa_advantages"] = self._anchor_advantages(output, own_rollouts, mode)
        return output

    def _anchor_advantages(self, output, own_rollouts: list[bool], mode: str) -> torch.Tensor:
        """AAPA (methods.md §11.3): the discriminator's score of each completion, and the leave-one-out advantages of
        the student's own rollouts (0 for the other rows); logs the mean score, probability and |advantage| of those
        rollouts."""
        texts = [self._tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
                 for ids, mask in zip(output["completion_ids"].cpu(), output["completion_mask"].cpu())]
        logits = self._anchor.logits(texts).float()
        scores = logits.clamp(-self._anchor.score_clip, self._anchor.score_clip)
        rows = torch.tensor(own_rollouts, dtype=torch.bool)
        advantages = leave_one_out_advantages(scores, rows)
        local = torch.stack([scores * rows, torch.sigmoid(logits) * rows, advantages.abs(), rows.float()]).sum(1)
        gathered = self.accelerator.gather(local.to(self.accelerator.device).reshape(1, 4)).sum(0).tolist()
        if gathered[-1] > 0:
            for name, total in zip(("score", "probability", "advantage_abs"), gathered):
                self._metrics[mode][f"aapa/{name}"].append(total / gathered[-1])
        return advantages.to(self.accelerator.device)

    def _align_prompts(self, inputs) -> list:
        """Teacher-aligned prompts (methods.md §7.3): this process's rows, a share `aligned_prompt_ratio` of them with
        `aligned_prompt_template` applied (student and teacher see the same formatted prompt); logs the share."""
        chosen = seeded_rows(
            self.args.aligned_prompt_ratio,
            seed=self.args.seed,
            step=self.state.global_step,
            first_row=self.accelerator.process_index * len(inputs),
            num_rows=len(inputs),
            stream=ALIGNED_STREAM,
        )
        template = self.args.aligned_prompt_template
        rows = [{**row, "prompt": aligned_prompt(row["prompt"], template)} if aligned else row
                for row, aligned in zip(inputs, chosen)]
        share = self.accelerator.gather(torch.tensor(chosen, dtype=torch.float32, device=self.accelerator.device))
        self._metrics["train"]["rollout/aligned_share"].append(share.mean().item())
        return rows

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        if self._rollout_source == "dataset":
            return self._dataset_completion_ids()
        if self._rollout_source == "teacher":
            return self._teacher_completion_ids(prompt_ids)
        if self._guided_prompt_ids:  # EDGE-OPD: these rows are generated from the privileged prompt
            prompt_ids = [self._guided_prompt_ids.get(row, ids) for row, ids in enumerate(prompt_ids)]
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)

    # ------------------------------------------------------------------ privileged teacher prompts (OPSD, EDGE-OPD)

    def _set_chat_template_kwargs(self, args: OPDConfig) -> None:
        """Per-role chat-template arguments over the shared ones; the parent tokenises the student's prompts with
        `self.chat_template_kwargs`. The teacher's prompt is tokenised on its own when it can differ."""
        shared = dict(args.chat_template_kwargs or {})
        self.chat_template_kwargs = {**shared, **(args.student_chat_template_kwargs or {})}
        self._teacher_chat_template_kwargs = {**shared, **(args.teacher_chat_template_kwargs or {})}
        self._separate_teacher_prompt = self._privileged or (
            self._teacher_chat_template_kwargs != self.chat_template_kwargs
        )

    def _teacher_prompts(self, rows) -> list:
        """Each row's teacher prompt: the student's prompt, plus the privileged context when it is on."""
        if not self._privileged:
            return [row["prompt"] for row in rows]
        args = self.args
        prompts = []
        for row in rows:
            context = row.get(args.teacher_context_column)
            if context is None:
                raise ValueError(
                    f"A training row has no privileged context in column {args.teacher_context_column!r} "
                    f"(`teacher_context_column`); row keys: {sorted(row)}."
                )
            problem = None if args.teacher_problem_column is None else str(row[args.teacher_problem_column])
            prompts.append(teacher_prompt(row["prompt"], str(context), args.teacher_prompt_template, problem))
        return prompts

    def _teacher_prompt_ids(self, rows) -> list[list[int]]:
        """Token ids of the teacher prompts, tokenised by the parent's code with the teacher's chat arguments."""
        student_kwargs = self.chat_template_kwargs
        self.chat_template_kwargs = self._teacher_chat_template_kwargs
        try:
            prompt_ids, _, _ = self._tokenize_prompts(self._teacher_prompts(rows))
        finally:
            self.chat_template_kwargs = student_kwargs
        return [list(ids) for ids in prompt_ids]

    def _left_pad(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) left-padded like the parent's `prompt_ids` / `prompt_mask`."""
        tensors = [torch.tensor(row, dtype=torch.long) for row in ids]
        padded = pad(tensors, padding_value=self._tokenizer.pad_token_id, padding_side="left",
                     pad_to_multiple_of=self.pad_to_multiple_of)
        mask = pad([torch.ones_like(row) for row in tensors], padding_value=0, padding_side="left",
                   pad_to_multiple_of=self.pad_to_multiple_of)
        return padded.to(self.accelerator.device), mask.to(self.accelerator.device)

    def _draw_guided_rows(self, num_rows: int) -> list[bool]:
        """EDGE-OPD: which of this process's rows are generated from the privileged prompt (student rollouts only)."""
        if self._rollout_source != "student":
            return [False] * num_rows
        return seeded_rows(
            self.args.guided_fraction,
            seed=self.args.seed,
            step=self.state.global_step,
            first_row=self.accelerator.process_index * num_rows,
            num_rows=num_rows,
            stream=GUIDED_STREAM,
        )

    def _dataset_completion_ids(self) -> list[list[int]]:
        """Tokenised `completion` column of the current rows, EOS appended, cut at `max_completion_length`."""
        completions = []
        for row in self._rollout_rows:
            text = row["completion"]
            if isinstance(text, list):  # conversational: [{"role": "assistant", "content": ...}]
                text = "".join(message["content"] for message in text)
            ids = self._tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_token_ids[0]]
            completions.append(ids[: self.max_completion_length])
        return completions

    @torch.no_grad()
    def _teacher_completion_ids(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """Sequence-level KD (GKD `seq_kd`): the teacher samples the completions with the student's sampling settings."""
        device = self.accelerator.device
        width = max(len(ids) for ids in prompt_ids)
        pad_id = self._tokenizer.pad_token_id
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompt_ids], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        generated = teacher.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=self.generation_config
        )
        return [self._cut_after_eos(row) for row in generated[:, width:].tolist()]

    def _cut_after_eos(self, ids: list[int]) -> list[int]:
        for position, token in enumerate(ids):
            if token in self.eos_token_ids:
                return ids[: position + 1]
        return ids

    # ------------------------------------------------------------------ loss

    @staticmethod
    def _loss_mask(inputs) -> torch.Tensor:
        mask = inputs["completion_mask"]
        return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._loss_stats = {}
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._log_loss_stats()
        return result

    def _log_loss_stats(self) -> None:
        """Gather the sums `_compute_loss` stashed and log their means (outside the wrapped forward, as TRL does)."""
        mode = "train" if self.model.training else "eval"
        for name, (total, count) in self._loss_stats.items():
            total = self.accelerator.gather_for_metrics(total.detach().reshape(1)).sum()
            count = self.accelerator.gather_for_metrics(count.detach().reshape(1).float()).sum()
            if count > 0:
                self._metrics[mode][name].append((total / count).item())

    def _student_sequence(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        return input_ids, attention_mask

    def _teacher_sequence(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher scores the same completion tokens after its own prompt when it has one (privileged context or
        its own chat-template arguments). Both prompts are left-padded and the completions right-padded to the same
        width, so the last C hidden states of either side predict the same completion tokens (methods.md §0.8)."""
        if "teacher_prompt_ids" not in inputs:
            return self._student_sequence(inputs)
        input_ids = torch.cat([inputs["teacher_prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["teacher_prompt_mask"], inputs["completion_mask"]], dim=1)
        return input_ids, attention_mask

    def _hidden_states(self, unwrapped_model, input_ids, attention_mask, logits_to_keep: int) -> torch.Tensor:
        """Last hidden states predicting the final `logits_to_keep` tokens, [B, logits_to_keep, d].

        With `explicit_position_ids` the positions are cumsum(attention_mask) − 1 (what `generate` used), so left
        padding of any width leaves them unchanged; otherwise TRL's `_get_last_hidden_state` (positions counted
        from the padded start).
        """
        if not self.args.explicit_position_ids:
            return self._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep)
        model = unwrapped_model.base_model.model if is_peft_model(unwrapped_model) else unwrapped_model
        position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
        hidden = model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return hidden[:, :-1][:, -logits_to_keep:]

    def _teacher_hidden_state(self, inputs, logits_to_keep: int, teacher_model=None) -> torch.Tensor:
        """The teacher's last hidden states at the completion positions; `teacher_model`: one of several teachers
        (default: the run's teacher)."""
        teacher_model = self.teacher_model if teacher_model is None else teacher_model
        unwrapped_teacher = self._unwrapped_teacher() if teacher_model is None else \
            self.accelerator.unwrap_model(teacher_model)
        input_ids, attention_mask = self._teacher_sequence(inputs)
        with self._teacher_forward_context(teacher_model):
            if teacher_model is None:  # PEFT self-teacher: no separate wrapper to route through
                return self._hidden_states(unwrapped_teacher, input_ids, attention_mask, logits_to_keep)
            return self._forward_redirection(
                teacher_model,
                unwrapped_teacher,
                self._hidden_states,
                unwrapped_teacher,
                input_ids,
                attention_mask,
                logits_to_keep,
            )

    # ------------------------------------------------------------------ the objective's inputs

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """The step's forwards (with the capture request armed around each), then the objective on their outputs.
        Returns (loss, entropy sum, trained tokens) like `trl.DistillationTrainer._compute_loss`."""
        width = inputs["completion_ids"].size(1)
        captures = self._capture_request(unwrapped_student, inputs)
        with captures.student:
            student_hidden = self._hidden_states(unwrapped_student, *self._student_sequence(inputs), width)
        with captures.teacher:
            teacher = self._teacher_signal(inputs, width, captures)
        batch = self._completion_batch(unwrapped_student, inputs, student_hidden, teacher)
        batch.representation = captures.states()
        output = self.objective(
            batch, self._step_normalisers(inputs, num_items_in_batch),
            selection_seed=self._selection_seed(), diagnostics=self._diagnostics_due(), step=self.state.global_step,
        )
        self._loss_stats.update(output.stats)
        self._check_finite_loss(output.loss)
        return output.loss, output.entropy_sum, output.num_tokens

    def _build_objective(self) -> OPDObjective:
        return OPDObjective.from_config(self.args, temperature=self.distillation_temperature)

    def _capture_request(self, unwrapped_student, inputs) -> CaptureRequest:
        """Hidden states to capture during this micro-batch's forwards: none here (OPRD's mixin asks for some)."""
        return CaptureRequest()

    def _teacher_signal(self, inputs, width: int, captures: CaptureRequest):
        """What the objective reads of the teacher: its last hidden states (a local teacher's forward), or what its
        server returns (`trl_opd.serving.backends`). Representation-only OPRD reads only the captured layers."""
        if self._routes is not None:
            return self._routed_signal(inputs, width)
        if self._served_teacher is None:
            return self._teacher_hidden_state(inputs, width)
        return self._served_signal(self._served_teacher, inputs, width, captures)

    def _routed_signal(self, inputs, width: int) -> RoutedTeacher:
        """Several teachers: each one's signal on its own rows (`teacher_index`), read by the objective as one."""
        owner, signals = inputs["teacher_index"], []
        for index, route in enumerate(self._routes.routes):
            rows = (owner == index).nonzero().squeeze(1)
            if len(rows) == 0:
                signals.append(None)
                continue
            own = {key: inputs[key][rows] for key in _TEACHER_INPUTS if key in inputs}
            if route.served is not None:
                signals.append(self._served_signal(route.served, own, width, CaptureRequest()))
            else:
                head = output_head(self.accelerator.unwrap_model(route.module), self._loss_vocab_size)
                signals.append(LocalTeacher(self._teacher_hidden_state(own, width, route.module), head))
        return RoutedTeacher(owner, signals, self._routes.names)

    def _served_signal(self, served, inputs, width: int, captures: CaptureRequest):
        """What a served teacher returns for these rows (and OPRD's layer states into the capture)."""
        rows = self._teacher_rows(inputs)
        wants_layers = isinstance(captures.teacher, ServedCapture)
        if isinstance(served, TrlOpdTeacher):
            fetched = served.fetch(rows, **(captures.teacher.request() if wants_layers else {}))
            if wants_layers:
                captures.teacher.fill(fetched)
            return served.signal(rows, vocab_size=self._loss_vocab_size, fetched=fetched) \
                if self.objective.uses_heads else None
        vocab = self._loss_vocab_size or output_head(self.accelerator.unwrap_model(self.model)).width
        return served.signal(rows, temperature=self.distillation_temperature, vocab_size=vocab)

    def _teacher_rows(self, inputs) -> TeacherRows:
        """The teacher's prompt (its own when it has one) and the completion, as the served teacher gets them."""
        prompt = "teacher_prompt" if "teacher_prompt_ids" in inputs else "prompt"
        return TeacherRows(inputs[f"{prompt}_ids"], inputs[f"{prompt}_mask"], inputs["completion_ids"],
                           inputs["completion_mask"])

    def _completion_batch(self, unwrapped_student, inputs, student_hidden, teacher) -> CompletionBatch:
        """Both models' last hidden states and heads on one device, as the objective reads them (`teacher`: the local
        teacher's last hidden states, or a served teacher's signal). Representation-only OPRD reads no head at all
        (the states stay where the models left them)."""
        if not self.objective.uses_heads:
            valid = self._loss_mask(inputs).bool()
            return CompletionBatch(valid, inputs["completion_ids"], student_hidden, None, None)
        student_head, teacher_head = self._output_heads(unwrapped_student)
        device = student_head.weight.device
        valid = self._loss_mask(inputs).to(device).bool()
        student_hidden = student_hidden.to(device)
        if isinstance(teacher, torch.Tensor):  # a local teacher's last hidden states
            teacher = LocalTeacher(teacher, teacher_head)
        if isinstance(teacher, LocalTeacher):
            teacher = LocalTeacher(teacher.hidden.to(device), teacher.head)
            self._check_finite_hidden_states(student_hidden, teacher.hidden, valid)
        return CompletionBatch(
            valid=valid,
            completion_ids=inputs["completion_ids"].to(device),
            student_hidden=student_hidden,
            student_head=student_head,
            teacher=teacher,
            is_guided=inputs.get("is_guided"),
            anchor_advantages=inputs.get("aapa_advantages"),
        )

    def _step_normalisers(self, inputs, num_items_in_batch) -> StepNormalisers:
        """The step-level normalisers of the reductions (methods.md §0.7): TRL's `num_items_in_batch` (the step's
        generated tokens per process), the step's sequences per process, the cross-process weighted sum."""
        if not self.model.training:
            return StepNormalisers(training=False, num_items=num_items_in_batch)
        num_sequences = None
        if "num_sequences_in_batch" in inputs:
            num_sequences = inputs["num_sequences_in_batch"].clamp(min=1) / self.accelerator.num_processes
        return StepNormalisers(
            training=True,
            num_items=num_items_in_batch,
            num_sequences=num_sequences,
            mean_over_processes=self._mean_over_processes,
            accumulation_steps=self._accumulation_steps(),
        )

    def _accumulation_steps(self) -> int:
        """Set by `Trainer.train`; a bare `compute_loss` in training mode falls back to the configured window."""
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def _selection_seed(self) -> int:
        """Same seed on every process: from (seed, optimizer step, micro-step within the accumulation window)."""
        micro_step = self._step % self.args.gradient_accumulation_steps if self.model.training else 0
        return int(np.random.SeedSequence([self.args.seed, self.state.global_step, micro_step]).generate_state(1)[0])

    def _mean_over_processes(self, local: torch.Tensor) -> torch.Tensor:
        """(Σ over processes of `local`) / num_processes, at least the smallest positive float32: the per-process
        normaliser that makes DDP's gradient average a mean over the tokens (or segments) of every process."""
        total = self.accelerator.gather(local.detach().reshape(1)).sum()
        return (total / self.accelerator.num_processes).clamp(min=torch.finfo(torch.float32).tiny)

    def _check_finite_hidden_states(self, student_hidden, teacher_hidden, valid) -> None:
        """NaN/inf in either model's last hidden states (hence logits) at completion tokens: a clear error before the
        update, instead of a NaN loss that `logging_nan_inf_filter` hides while the weights become NaN."""
        for name, hidden in (("teacher", teacher_hidden), ("student", student_hidden)):
            finite = torch.isfinite(hidden[valid]).all(dim=-1)
            if not finite.all():
                raise FloatingPointError(
                    f"The {name}'s hidden states (and so its logits) are NaN or inf at {(~finite).sum().item()} of "
                    f"{finite.numel()} completion tokens at step {self.state.global_step}. Likely causes: fp16 "
                    f"overflow (load the {name} in bfloat16 or float32, e.g. "
                    f"`{'teacher_' if name == 'teacher' else ''}model_init_kwargs={{'dtype': 'bfloat16'}}`) or "
                    "corrupted weights. Stopped before the update corrupts the student."
                )

    def _check_finite_loss(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"The distillation loss is {loss.item()} at step {self.state.global_step} although both models' hidden "
                "states are finite: an LM head holds NaN/inf weights, or the logits overflow their dtype (load the "
                "models in bfloat16 or float32). Stopped before the update corrupts the student."
            )

    # ------------------------------------------------------------------ dynamics diagnostics (methods.md §7.1)

    def _check_diagnostics_top_k(self, args: OPDConfig) -> None:
        if args.diagnostics_steps == 0:
            return
        vocab = output_head(self.accelerator.unwrap_model(self.model), self._loss_vocab_size).width
        if args.diagnostics_top_k > vocab:
            raise ValueError(
                f"`diagnostics_top_k`={args.diagnostics_top_k} exceeds the vocabulary compared in the loss ({vocab} "
                "entries); lower it."
            )

    def _diagnostics_due(self) -> bool:
        """On every micro-batch of the steps `global_step % diagnostics_steps == 0`, and on every evaluation batch."""
        steps = self.args.diagnostics_steps
        if steps == 0:
            return False
        return not self.model.training or self.state.global_step % steps == 0


class OPDTrainer(RepresentationDistillationMixin, _OPDTrainerCore):
    # The OPRD mixin answers the core's capture request and owns the projector, so it comes first in the MRO.
    __doc__ = _OPDTrainerCore.__doc__
