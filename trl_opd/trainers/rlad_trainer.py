"""`RLADTrainer`: `trl.GRPOTrainer` with the trust-region ratio distillation (TRRD) of RLAD (methods.md §10).

GRPO's loss is kept whole. Once per generation batch, after GRPO has sampled and scored the completions, we score
them with the teacher and the behaviour policy (no gradient, TRL's chunked fused LM head, no `[B, T, V]` logits) and
replace GRPO's `old_per_token_logps` by the detached anchor of `trl_opd.rlad.trrd_anchor_logp`:

    a = α · log π_old + (1 − α) · (log π_old − clamp(log π_old − log π_T, −c, c))

so that GRPO's own `log_ratio = log π_θ − a` is the TRRD log-ratio of Eq. 3 (straight-through clamp) for every
`loss_type`, aggregation, `delta`, entropy mask and vLLM correction GRPO has, and GRPO's `clip_ratio/*` metrics
become the TRRD clip fractions. The teacher log-probs travel in the batch as `teacher_per_token_logps`, so GRPO's
shuffle and split keep them aligned with their completions.

`rlad_teacher_clamp_mode="literal"` (App. B as written) keeps that anchor and also sends the per-token factor
s = α on clamped tokens, 1 elsewhere (`trl_opd.rlad.trrd_logp_grad_scale`), as `rlad_logp_grad_scale`; while GRPO's
`_compute_loss` runs, its log π_θ becomes log π_θ + (s − 1)(log π_θ − sg(log π_θ)) (`scale_gradient`): the same
values, and the gradient α ∇ log π_θ where the clamp is active, which is the gradient of the literal clamp.

With an AAPA discriminator, its anchor reward is appended to the reward functions; its weight follows the staged
schedule `trl_opd.anchor.AnchorSchedule` (set before each generation batch is scored).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import add_fused_lm_head, get_callable_name

from ..anchor import AnchorSchedule, make_anchor_reward
from ..rlad import scale_gradient, teacher_clamp_mask, trrd_anchor_logp, trrd_logp_grad_scale
from ..serving.backends import TeacherRows
from .dataset_checks import check_dataset_size, check_output_dir, check_prompt_columns
from .engines import check_launch
from .prompt_checks import check_prompts, text_tokenizer
from .resume import resolve_resume_from_checkpoint
from .reward_checks import check_reward_functions
from .rlad_config import RLADConfig
from .served_teacher import connect_served_teacher, served_vocab_size
from .teacher import (
    check_teacher_init_kwargs,
    load_teacher,
    model_config,
    prepare_teacher,
    try_tokenizer,
    warn_if_teacher_smaller,
)


class RLADTrainer(GRPOTrainer):
    """GRPO whose importance ratio is anchored to a teacher/old-policy mixture (RLAD, arXiv 2602.22495).

    Args:
        model, reward_funcs, args, train_dataset, ...: as for `trl.GRPOTrainer` (same order); `args` is an
            `RLADConfig`. `reward_funcs` are the task rewards, e.g. `trl_opd.rewards.math_accuracy_reward`; with
            `args.aapa_discriminator_path` set, the AAPA anchor reward is appended with weight `args.aapa_weight`
            (staged by `aapa_start_step` and `aapa_ramp_steps`).
        teacher_model: the teacher, a model id/path or a `PreTrainedModel` with the student's tokenizer (pass it by
            keyword). Defaults to `args.teacher_model_name_or_path`.

    Logged (besides GRPO's metrics, whose `clip_ratio/*` are now the TRRD clip fractions):
        `rlad/teacher_log_ratio`: mean over completion tokens of log π_old − log π_T, the sampled-token (k1) estimate
            of KL(student ‖ teacher) on the student's own samples.
        `rlad/teacher_clamp_share`: share of completion tokens where |log π_old − log π_T| exceeds the clamp c.
    """

    _tag_names = ["trl", "trl_opd", "rlad"]
    _name = "RLAD"
    _anchor_schedule: AnchorSchedule | None = None  # the staged AAPA weight, with a discriminator
    _logp_grad_scale: torch.Tensor | None = None  # set while GRPO's `_compute_loss` runs, for the literal clamp

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: RLADConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
        teacher_model=None,
    ):
        args = args if args is not None else RLADConfig(output_dir="rlad-output")
        if not isinstance(args, RLADConfig):
            raise TypeError(f"{type(self).__name__} needs an RLADConfig, got {type(args).__name__}.")
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        # Every check that needs no weights runs first, so bad input fails before anything is loaded; a served
        # teacher is asked first (a server that is down fails here, with its URL).
        check_launch(args, type(self).__name__)
        self._served_teacher = connect_served_teacher(teacher_model, args)
        student_tokenizer = text_tokenizer(processing_class or try_tokenizer(model, args))  # loaded once, for both
        models = [(model, None)]
        if self._served_teacher is None:
            self._check_teacher_argument(teacher_model, args)
            self._check_teacher_vocabulary(model, teacher_model, student_tokenizer, args)
            models.append((teacher_model, args.teacher_model_revision))
        else:
            served_vocab_size(self._served_teacher, model, student_tokenizer, train_dataset, args)
        check_prompt_columns(train_dataset, eval_dataset, "RLADTrainer")
        check_prompts(train_dataset, models, student_tokenizer, args, args.chat_template_kwargs or {})
        check_output_dir(args)
        check_reward_functions(reward_funcs, train_dataset)
        if self._served_teacher is None:
            warn_if_teacher_smaller(model, teacher_model, args, args.teacher_model_revision)
        anchor_reward = make_anchor_reward(args.aapa_discriminator_path) if args.aapa_discriminator_path else None

        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )
        if anchor_reward is not None:
            self._anchor_schedule = AnchorSchedule.from_config(args)
            self._append_reward(anchor_reward, self._anchor_schedule.weight_at(0))
        self.teacher_model = None if self._served_teacher is not None else self._build_teacher(teacher_model)

    def _build_teacher(self, teacher_model):
        teacher = load_teacher(teacher_model, self.args)  # shared with OPDTrainer: same fields, same rules
        # The same chunked kernel and temperature as the student's log-probs, so a teacher equal to the student
        # gives log π_T = log π_old exactly.
        add_fused_lm_head(teacher, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        return prepare_teacher(self, teacher)

    # ------------------------------------------------------------------ validation (before any model is loaded)

    @staticmethod
    def _check_teacher_argument(teacher_model, args: RLADConfig) -> None:
        if teacher_model is None:
            raise ValueError(
                "RLADTrainer needs a teacher: pass `teacher_model=` (a model id/path or a PreTrainedModel) or set "
                "`teacher_model_name_or_path` in the RLADConfig. Without a teacher, use trl.GRPOTrainer."
            )
        if not isinstance(teacher_model, (str, PreTrainedModel)):
            raise TypeError(f"`teacher_model` must be a model id/path or a PreTrainedModel, got {type(teacher_model)}.")
        check_teacher_init_kwargs(teacher_model, args)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`trainer.train`; `resume_from_checkpoint=True` skips a checkpoint left half-written by a killed run. A
        training set with fewer prompts than one generation batch fails here."""
        check_dataset_size(self.train_dataset, self.args.generation_batch_size // self.args.num_generations,
                           "generation_batch_size / num_generations unique prompts")
        resume_from_checkpoint = resolve_resume_from_checkpoint(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    @staticmethod
    def _check_teacher_vocabulary(model, teacher_model, student_tokenizer, args: RLADConfig) -> None:
        """The teacher must score the student's token ids: same tokenizer, and an LM head at least as wide as the
        student's (a wider, padded head is fine; a narrower one could not score every id the student samples)."""
        student_vocab = model_config(model, args).get_text_config().vocab_size
        teacher_config = model_config(teacher_model, args, args.teacher_model_revision)
        teacher_vocab = teacher_config.get_text_config().vocab_size
        teacher_tokenizer = try_tokenizer(teacher_model, args)
        both_known = student_tokenizer is not None and teacher_tokenizer is not None
        same_tokenizer = both_known and student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()
        if student_vocab == teacher_vocab and (same_tokenizer or not both_known):
            return
        if teacher_vocab > student_vocab and same_tokenizer:
            return
        raise ValueError(
            f"The teacher cannot score the student's tokens: the student's LM head has {student_vocab} entries and "
            f"the teacher's {teacher_vocab}, and their tokenizers are "
            f"{'different' if both_known else 'not both known (the teacher has no loadable tokenizer)'}. RLAD "
            "compares log π_θ and log π_T on the same sampled token ids, which needs one shared tokenizer and a "
            "teacher head at least as wide as the student's. Pick a teacher from the student's model family; for "
            "a teacher with another tokenizer use trl_opd.SimCTTrainer."
        )

    # ------------------------------------------------------------------ rewards

    def _append_reward(self, reward_func, weight: float) -> None:
        """Add a reward function after GRPO's set-up, as GRPO itself adds environment rewards."""
        self.reward_funcs.append(reward_func)
        self.reward_func_names.append(get_callable_name(reward_func))
        self.reward_processing_classes.append(None)
        self.reward_weights = torch.cat([self.reward_weights, torch.tensor([weight], dtype=torch.float32)])

    # ------------------------------------------------------------------ the TRRD anchor, once per generation batch

    def _generate_and_score_completions(self, inputs):
        if self._anchor_schedule is not None and self.model.training:  # staged AAPA: the anchor's weight this step
            self.reward_weights[-1] = self._anchor_schedule.weight_at(self.state.global_step)
        output = super()._generate_and_score_completions(inputs)
        if "pixel_values" in output:
            raise NotImplementedError("RLADTrainer scores text completions only; multimodal prompts are not supported.")
        if not self.args.scores_teacher:  # α = 1 without teacher logs: exactly GRPO, at GRPO's cost
            return output
        behaviour_logps, teacher_logps = self._score_completions(output)
        output["teacher_per_token_logps"] = teacher_logps
        alpha, clamp = self.args.rlad_alpha, self.args.rlad_teacher_clamp
        if alpha < 1.0:  # α = 1 leaves GRPO's batch untouched, so it trains exactly like GRPOTrainer
            if self.off_policy_mask_threshold is not None:
                # GRPO's off-policy mask falls back to `old_per_token_logps` for the sampling policy: keep the real one.
                output.setdefault("sampling_per_token_logps", behaviour_logps)
            output["old_per_token_logps"] = trrd_anchor_logp(
                behaviour_logps, teacher_logps, alpha=alpha, teacher_clamp=clamp
            )
            if self.args.rlad_teacher_clamp_mode == "literal":
                output["rlad_logp_grad_scale"] = trrd_logp_grad_scale(
                    behaviour_logps, teacher_logps, alpha=alpha, teacher_clamp=clamp
                )
        if self.args.rlad_log_teacher_stats is not False:
            self._log_teacher_stats(output, behaviour_logps, teacher_logps)
        return output

    def _compute_loss(self, model, inputs):
        """GRPO's loss; with the literal clamp, its log π_θ carries the per-token gradient factor of the batch."""
        self._logp_grad_scale = inputs.get("rlad_logp_grad_scale")
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._logp_grad_scale = None

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        if self._logp_grad_scale is not None:  # only inside `_compute_loss`: the one forward of the trained policy
            logps = scale_gradient(logps, self._logp_grad_scale)
        return logps, entropies, aux_loss

    @torch.no_grad()
    def _score_completions(self, output) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, C]` log-probs of the completion tokens under the behaviour policy and under the teacher."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        logits_to_keep = output["completion_ids"].size(1)
        training = self.model.training
        batch_size = self.args.per_device_train_batch_size if training else self.args.per_device_eval_batch_size
        score = (input_ids, attention_mask, logits_to_keep, batch_size)
        behaviour_logps = output.get("old_per_token_logps")  # GRPO computes them only when it needs them itself
        if behaviour_logps is None:
            with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                behaviour_logps, _, _ = self._get_per_token_logps_and_entropies(self.model, *score)
        if self._served_teacher is not None:
            rows = TeacherRows(output["prompt_ids"], output["prompt_mask"], output["completion_ids"],
                               output["completion_mask"])
            vocab = self.accelerator.unwrap_model(self.model).get_output_embeddings().weight.shape[0]
            teacher_logps = self._served_teacher.sampled_logprobs(rows, temperature=self.temperature, vocab_size=vocab)
            return behaviour_logps, teacher_logps  # 0 on padding (masked like the local teacher's values)
        teacher_logps, _, _ = self._get_per_token_logps_and_entropies(self.teacher_model, *score)
        return behaviour_logps, teacher_logps

    def _log_teacher_stats(self, output, behaviour_logps: torch.Tensor, teacher_logps: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        clamped = teacher_clamp_mask(behaviour_logps, teacher_logps, teacher_clamp=self.args.rlad_teacher_clamp)
        local = torch.stack(
            [((behaviour_logps - teacher_logps) * mask).sum(), (clamped * mask).sum(), mask.sum()]
        ).float()
        log_ratio_sum, clamped_count, token_count = self.accelerator.reduce(local, reduction="sum").tolist()
        token_count = max(token_count, 1.0)
        self._metrics[mode]["rlad/teacher_log_ratio"].append(log_ratio_sum / token_count)
        self._metrics[mode]["rlad/teacher_clamp_share"].append(clamped_count / token_count)


__all__ = ["RLADTrainer"]
