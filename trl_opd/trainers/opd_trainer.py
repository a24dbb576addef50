"""`OPDTrainer`: `trl.DistillationTrainer` with the OPD divergence family, estimators, reductions and hook points.

The parent generates on-policy completions once per gradient-accumulation window and hands micro-batches to
`compute_loss`, which routes `_compute_loss` through the DDP/FSDP wrapper. We keep that machinery and override:

* `_generate_and_score_completions` / `_generate_single_turn`: GKD's on/off-policy mix (`lmbda`, `seq_kd`), with
  one coin per generation batch shared by every process, and the per-step sequence count for `sequence_mean`;
* `_compute_loss`: student and teacher hidden states, then one chunked pass through both LM heads that computes
  the per-token divergence, weights it (`_token_weights`, the entry point for token selection and weighting) and
  reduces it (`loss_reduction`) without ever holding `[B, T, V]` logits.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate.utils import is_peft_model
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel
from trl import DistillationTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import prepare_fsdp
from trl.trainer.utils import create_model_from_path

from ..losses import (
    chunked_token_divergence,
    fused_divergence_loss,
    sampled_token_kl,
    sampled_token_loss,
    token_loss_coefficients,
)
from .lm_head import OutputHead, chunked_token_logprobs, head_logits, output_head
from .opd_config import OPDConfig

ROLLOUT_SOURCES = ("student", "teacher", "dataset")


class OPDTrainer(DistillationTrainer):
    """On-policy distillation trainer. See `OPDConfig` for every option.

    Args:
        model: the student, a model id/path or a `PreTrainedModel` (PEFT through `peft_config`, as in TRL).
        teacher_model: the teacher, a model id/path or a `PreTrainedModel` sharing the student's tokenizer. Defaults to
            `args.teacher_model_name_or_path`. For a teacher with another tokenizer use `SimCTTrainer`.
        args: an `OPDConfig`.
        train_dataset: rows with a `prompt` column (plain text or conversational); a `completion` column is needed for
            off-policy batches when `lmbda < 1` and `seq_kd=False`.
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
        # Every check that needs no weights runs first, so bad input fails before anything is loaded.
        self._check_datasets(train_dataset, eval_dataset, args)
        self._check_teacher_argument(teacher_model)
        self._loss_vocab_size = self._shared_vocab_size(model, teacher_model, processing_class, args)

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
        self.teacher_model = self._prepare_teacher(self._load_teacher(teacher_model))
        self.distillation_temperature = args.effective_distillation_temperature
        self._rollout_source = "student"
        self._rollout_rows = None
        self._loss_stats = {}

    # ------------------------------------------------------------------ validation (before any model is loaded)

    @staticmethod
    def _check_datasets(train_dataset, eval_dataset, args: OPDConfig) -> None:
        datasets = {"train_dataset": train_dataset}
        if isinstance(eval_dataset, dict):
            datasets.update({f"eval_dataset[{name!r}]": data for name, data in eval_dataset.items()})
        else:
            datasets["eval_dataset"] = eval_dataset
        for name, data in datasets.items():
            columns = getattr(data, "column_names", None)
            if data is None or columns is None:  # iterable datasets may not know their columns
                continue
            if "prompt" not in columns:
                raise ValueError(
                    f"`{name}` has no 'prompt' column (columns: {columns}). OPDTrainer generates from a 'prompt' "
                    "column of plain strings or conversations; rename your prompt column, e.g. "
                    "`dataset.rename_column('question', 'prompt')`."
                )
            if name == "train_dataset" and len(data) == 0:
                raise ValueError("`train_dataset` is empty.")
        needs_completions = args.lmbda < 1.0 and not args.seq_kd
        train_columns = getattr(train_dataset, "column_names", None)
        if needs_completions and train_columns is not None and "completion" not in train_columns:
            raise ValueError(
                f"lmbda={args.lmbda} makes some batches off-policy, which read the dataset's 'completion' column, but "
                f"`train_dataset` has none (columns: {train_columns}). Add a 'completion' column, set seq_kd=True to "
                "let the teacher generate them, or set lmbda=1.0 for pure on-policy training."
            )

    @staticmethod
    def _check_teacher_argument(teacher_model) -> None:
        if teacher_model is None:
            raise ValueError(
                "OPDTrainer needs a teacher: pass `teacher_model=` (a model id/path or a PreTrainedModel) or set "
                "`teacher_model_name_or_path` in the OPDConfig."
            )
        if not isinstance(teacher_model, (str, PreTrainedModel)):
            raise TypeError(f"`teacher_model` must be a model id/path or a PreTrainedModel, got {type(teacher_model)}.")

    @staticmethod
    def _model_config(model, args: OPDConfig, revision: str | None = None):
        if isinstance(model, str):
            return AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=args.trust_remote_code)
        return model.config

    def _shared_vocab_size(self, model, teacher_model, processing_class, args: OPDConfig) -> int | None:
        """None when both LM heads have the same width; the tokenizer's length when the heads are padded differently
        around the same tokenizer (methods.md §0.8); otherwise a ValueError that points to SimCTTrainer."""
        student_vocab = self._model_config(model, args).get_text_config().vocab_size
        teacher_config = self._model_config(teacher_model, args, args.teacher_model_revision)
        teacher_vocab = teacher_config.get_text_config().vocab_size
        if student_vocab == teacher_vocab:
            return None
        student_tokenizer = processing_class or self._try_tokenizer(model, args)
        teacher_tokenizer = self._try_tokenizer(teacher_model, args)
        same_tokenizer = (
            student_tokenizer is not None
            and teacher_tokenizer is not None
            and student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()
            and len(student_tokenizer) <= min(student_vocab, teacher_vocab)
        )
        if not same_tokenizer:
            raise ValueError(
                f"The student's vocabulary has {student_vocab} entries and the teacher's {teacher_vocab}, and their "
                "tokenizers are not identical (or the teacher's tokenizer could not be loaded). OPDTrainer compares "
                "next-token distributions entry by entry, which needs one shared tokenizer. For a teacher with another "
                "tokenizer use `trl_opd.SimCTTrainer`."
            )
        return len(student_tokenizer)

    @staticmethod
    def _try_tokenizer(model, args: OPDConfig):
        path = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
        if not path:
            return None
        try:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------ teacher

    def _load_teacher(self, teacher_model):
        if not isinstance(teacher_model, str):
            if self.args.teacher_model_init_kwargs is not None:
                raise ValueError(
                    "You passed `teacher_model_init_kwargs` but the teacher is already instantiated; remove them or "
                    "pass the teacher as a model id/path."
                )
            return teacher_model
        init_kwargs = dict(self.args.teacher_model_init_kwargs or {})
        if self.args.teacher_model_revision is not None:
            init_kwargs.setdefault("revision", self.args.teacher_model_revision)
        if self.args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
            init_kwargs["device_map"] = None  # distributed training needs device_map=None
        init_kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
        return create_model_from_path(teacher_model, **init_kwargs)

    def _prepare_teacher(self, teacher):
        teacher.eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:  # TRL leaves the teacher unsharded under FSDP (its PR #6573); we shard it
            return prepare_fsdp(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

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
        self._rollout_rows = inputs
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._rollout_rows = None
        loss_mask = self._loss_mask(output)
        output["num_sequences_in_batch"] = self.accelerator.gather((loss_mask.sum(dim=1) > 0).sum()).sum()
        self._metrics[mode]["rollout/on_policy"].append(float(self._rollout_source == "student"))
        return output

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        if self._rollout_source == "dataset":
            return self._dataset_completion_ids()
        if self._rollout_source == "teacher":
            return self._teacher_completion_ids(prompt_ids)
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)

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

    def _stash_stat(self, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
        self._loss_stats[name] = (total.float(), count.float())

    def _student_sequence(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        return input_ids, attention_mask

    def _teacher_sequence(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher scores the same completion tokens; subclasses give it another prompt (privileged context)."""
        return self._student_sequence(inputs)

    def _teacher_hidden_state(self, inputs, logits_to_keep: int) -> torch.Tensor:
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        input_ids, attention_mask = self._teacher_sequence(inputs)
        with torch.no_grad():
            return self._forward_redirection(
                self.teacher_model,
                unwrapped_teacher,
                self._get_last_hidden_state,
                unwrapped_teacher,
                input_ids,
                attention_mask,
                logits_to_keep,
            )

    def _token_weights(self, inputs, loss_mask, student_hidden, teacher_hidden, student_head, teacher_head):
        """Entry point for token selection and weighting: a detached `[B, C]` tensor of weights (0 drops a token
        from the gradient pass entirely), or None for uniform weights. Computed before the loss, under no_grad."""
        return None

    def _loss_coefficients(self, loss_mask, weights, inputs, num_items_in_batch) -> torch.Tensor:
        """Per-token coefficients c with loss = Σ c·ℓ, already scaled for gradient accumulation and DDP averaging."""
        reduction = self.args.loss_reduction
        training = self.model.training
        if reduction == "token_mean":
            return token_loss_coefficients(loss_mask, weights, reduction=reduction, num_items=num_items_in_batch)
        if reduction == "sequence_mean":
            num_sequences = None
            if training:
                num_sequences = inputs["num_sequences_in_batch"].clamp(min=1) / self.accelerator.num_processes
            return token_loss_coefficients(loss_mask, weights, reduction=reduction, num_sequences=num_sequences)
        coefficients = token_loss_coefficients(loss_mask, weights, reduction=reduction)
        # Micro-batch means are averaged over the accumulation window (the loss is reported GA-scaled).
        return coefficients / self.current_gradient_accumulation_steps if training else coefficients

    def _divergence_kwargs(self) -> dict:
        args = self.args
        return {
            "divergence": args.divergence,
            "beta": args.beta,
            "alpha": args.alpha,
            "temperature": self.distillation_temperature,
            "top_k": args.loss_top_k,
            "top_k_source": args.loss_top_k_source,
            "top_k_tail": args.loss_top_k_tail,
            "clip": args.clip,
        }

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        completion_ids = inputs["completion_ids"]
        loss_mask = self._loss_mask(inputs)
        logits_to_keep = completion_ids.size(1)
        student_hidden = self._get_last_hidden_state(
            unwrapped_student, *self._student_sequence(inputs), logits_to_keep
        )
        teacher_hidden = self._teacher_hidden_state(inputs, logits_to_keep)
        student_head = output_head(unwrapped_student)
        teacher_head = output_head(self.accelerator.unwrap_model(self.teacher_model))
        if student_head.weight.device != teacher_head.weight.device:
            raise ValueError(
                f"The student's lm_head is on {student_head.weight.device} and the teacher's on "
                f"{teacher_head.weight.device}; place both heads on the same device (see their `device_map`)."
            )
        device = student_head.weight.device
        student_hidden, teacher_hidden = student_hidden.to(device), teacher_hidden.to(device)
        loss_mask = loss_mask.to(device)

        with torch.no_grad():
            weights = self._token_weights(
                inputs, loss_mask, student_hidden.detach(), teacher_hidden, student_head, teacher_head
            )
        coefficients = self._loss_coefficients(loss_mask, weights, inputs, num_items_in_batch)
        rows = loss_mask.bool() & (coefficients != 0)
        per_row = (student_hidden[rows], teacher_hidden[rows], coefficients[rows], completion_ids.to(device)[rows])
        if self.args.estimator == "analytic":
            loss, per_token, entropy = self._analytic_loss(*per_row[:3], student_head, teacher_head)
            self._stash_stat("divergence", per_token.sum(), rows.sum())
        else:
            loss, per_token, entropy = self._sampled_token_loss(*per_row, student_head, teacher_head)
            self._stash_stat("kl_k1", per_token.sum(), rows.sum())
        if weights is not None:
            self._stash_stat("token_weight", weights[loss_mask.bool()].float().sum(), loss_mask.sum())
            self._stash_stat("selected_ratio", rows.sum(), loss_mask.sum())
        return loss, entropy.sum().detach(), rows.sum()

    def _head_kwargs(self, student_head: OutputHead, teacher_head: OutputHead) -> dict:
        return {
            "student_bias": student_head.bias,
            "teacher_bias": teacher_head.bias,
            "softcap": student_head.softcap,
            "teacher_softcap": teacher_head.softcap,
            "vocab_size": self._loss_vocab_size,
            "chunk_size": self.args.loss_chunk_size,
        }

    def _analytic_loss(self, student_hidden, teacher_hidden, coefficients, student_head, teacher_head):
        """Σ c·ℓ over the rows, with ℓ the exact (or top-k) divergence; returns (loss, ℓ detached, entropy)."""
        arguments = (
            student_head.scaled_hidden(student_hidden),
            student_head.weight,
            teacher_head.scaled_hidden(teacher_hidden),
            teacher_head.weight,
        )
        kwargs = {**self._head_kwargs(student_head, teacher_head), **self._divergence_kwargs()}
        if self.args.loss_implementation == "fused":
            return fused_divergence_loss(*arguments, coefficients, **kwargs)
        per_token = chunked_token_divergence(*arguments, **kwargs)
        with torch.no_grad():
            entropy = self._student_entropy(student_hidden, student_head)
        return (coefficients * per_token).sum(), per_token.detach(), entropy

    @torch.no_grad()
    def _student_entropy(self, student_hidden, student_head) -> torch.Tensor:
        pieces = []
        for start in range(0, student_hidden.shape[0], self.args.loss_chunk_size):
            logits = head_logits(student_hidden[start : start + self.args.loss_chunk_size], student_head,
                                 self._loss_vocab_size) / self.distillation_temperature
            log_probs = torch.log_softmax(logits, dim=-1)
            pieces.append(-(log_probs.exp() * log_probs).sum(-1))
        return torch.cat(pieces) if pieces else student_hidden.new_zeros(0, dtype=torch.float32)

    def _sampled_token_loss(self, student_hidden, teacher_hidden, coefficients, token_ids, student_head, teacher_head):
        """Sampled-token estimators (methods.md §0.6): only log p(ŷ_t) of both models is needed."""
        logprob_kwargs = {
            "temperature": self.distillation_temperature,
            "vocab_size": self._loss_vocab_size,
            "chunk_size": self.args.loss_chunk_size,
        }
        student_logprobs = chunked_token_logprobs(student_hidden, student_head, token_ids, **logprob_kwargs)
        with torch.no_grad():
            teacher_logprobs = chunked_token_logprobs(teacher_hidden, teacher_head, token_ids, **logprob_kwargs)
            entropy = self._student_entropy(student_hidden.detach(), student_head)
        per_token = sampled_token_loss(student_logprobs, teacher_logprobs, self.args.estimator)
        k1 = sampled_token_kl(student_logprobs.detach(), teacher_logprobs, "k1")
        return (coefficients * per_token).sum(), k1, entropy
