"""`RLADConfig`: `trl.GRPOConfig` plus the teacher, the TRRD ratio (methods.md §10) and the AAPA anchor (§11)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from ..anchor import AnchorSchedule
from ..rlad import TEACHER_CLAMP_MODES
from ..serving.arguments import ServedTeacherArguments
from .opd_config import check_field_types
from .support import refuse_unsupported

logger = logging.getLogger(__name__)


@dataclass
class RLADConfig(ServedTeacherArguments, GRPOConfig):
    r"""
    Configuration for [`RLADTrainer`]: every field of `trl.GRPOConfig` plus the fields below.

    RLAD (arXiv 2602.22495) keeps GRPO's outcome advantage and replaces GRPO's importance ratio π_θ / π_old by the
    trust-region ratio r = π_θ / (π_old^α · π_T^(1−α)), with the teacher log-ratio clamped to [−c, c] (Eq. 3). Every
    other GRPO option (reward functions, `loss_type`, `beta`, `scale_rewards`, vLLM, ...) works unchanged. With
    `rlad_alpha=1.0` RLADTrainer trains exactly like `trl.GRPOTrainer` (the teacher is then only scored for the logs).

    The asymmetric clip range of the surrogate is GRPO's own: `epsilon` (ε_low) and `epsilon_high` (ε_high; `None`
    means `epsilon`). The paper uses ε_low = 0.2, ε_high = 0.28, `loss_type="grpo"`, `beta=0.0`, 8 generations and
    α = 0.5; TRL's defaults are kept here (so the α = 1 config is a plain GRPOConfig) and `recipes/rlad.yaml` sets the
    paper's values.

    Parameters:
        > Teacher (same names as `trl.DistillationConfig`)

        teacher_model_name_or_path (`str` or `None`, defaults to `None`):
            Teacher model id or path, used when the trainer gets no `teacher_model`. It must share the student's
            tokenizer (its LM head may be wider, e.g. Qwen2.5-7B's 152,064 rows around the 151,936 of Qwen2.5-1.5B).
        teacher_model_revision (`str` or `None`, defaults to `None`):
            Revision of the teacher (branch, tag or commit).
        teacher_model_init_kwargs (`dict` or `None`, defaults to `None`):
            Keyword arguments for `AutoModelForCausalLM.from_pretrained` when the teacher is given as a string.

        > Trust-region ratio distillation (methods.md §10)

        rlad_alpha (`float`, defaults to `0.5`):
            α in [0, 1], the old policy's weight in the geometric mixture the ratio is taken against. 1 is plain GRPO,
            0 anchors the trust region to the teacher alone (Eq. 3; the opposite reading in the paper's §4.1 is a
            typo). The paper uses 0.5.
        rlad_teacher_clamp (`float`, defaults to `1.0`):
            c > 0: the teacher log-ratio log π_θ − log π_T is clamped to [−c, c] (App. B: suppresses outlier ratios
            from the early teacher–student mismatch). `inf` disables the clamp.
        rlad_teacher_clamp_mode (`str`, defaults to `"straight_through"`):
            Where the clamp acts (methods.md §10.4 item 2); both give the ratio the same value. `"straight_through"`
            clamps the value only: the gradient of the log-ratio stays ∇ log π_θ on every token, as in Eq. 3
            without the clamp. `"literal"` is App. B as written, clamp(log π_θ − log π_T) of the θ-dependent
            difference: on a token outside [−c, c] the teacher term passes no gradient and the log-ratio's gradient
            is α ∇ log π_θ. The literal form scales ∇ log π_θ by α on those tokens inside GRPO's loss, so it needs a
            loss that reads log π_θ only through the ratio: not `loss_type` "cispo" or "vespo", and `beta=0`.
        rlad_log_teacher_stats (`bool` or `None`, defaults to `None`):
            Log `rlad/teacher_log_ratio` and `rlad/teacher_clamp_share`. `None`: when α < 1, where the teacher is
            scored anyway. At α = 1 the teacher plays no part in training; `None` or `False` then skips scoring it (and
            the behaviour policy), so plain-GRPO runs cost what `trl.GRPOTrainer` costs, and `True` scores it for the
            logs only (a GRPO baseline that reports its distance to the teacher).

        > AAPA anchor reward (methods.md §11; our design, see `trl_opd.anchor`)

        aapa_discriminator_path (`str` or `None`, defaults to `None`):
            Path of a frozen `trl_opd.anchor.AnchorDiscriminator` (trained once offline on expert vs initial-policy
            responses). When set, its clipped log-odds s(y) is added to the reward functions as `anchor_reward`.
        aapa_weight (`float`, defaults to `0.1`):
            Weight λ of the anchor reward in GRPO's weighted reward sum (the other reward functions keep the weights
            of `reward_weights`, or 1).
        aapa_start_step (`int`, defaults to `0`), aapa_ramp_steps (`int`, defaults to `0`):
            Staged AAPA (methods.md §11.3): the anchor reward's weight is 0 before optimizer step `aapa_start_step`,
            then rises linearly to `aapa_weight` over `aapa_ramp_steps` steps (0: at once). The defaults keep λ
            from the first step.
    """

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher model id or path (same tokenizer as the student)."}
    )
    teacher_model_revision: str | None = field(
        default=None, metadata={"help": "Revision of the teacher (branch, tag or commit)."}
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "from_pretrained kwargs for a teacher given as a string."}
    )
    rlad_alpha: float = field(
        default=0.5,
        metadata={"help": "Old-policy weight α in [0, 1] of the ratio's anchor π_old^α·π_T^(1−α); 1 = plain GRPO."},
    )
    rlad_teacher_clamp: float = field(
        default=1.0,
        metadata={"help": "c > 0: clamp of the teacher log-ratio to [−c, c]; inf = no clamp."},
    )
    rlad_teacher_clamp_mode: str = field(
        default="straight_through",
        metadata={"help": "straight_through (clamp the value only) | literal (App. B: α∇log π_θ on clamped tokens)."},
    )
    rlad_log_teacher_stats: bool | None = field(
        default=None,
        metadata={"help": "Log the teacher log-ratio stats; None = only when rlad_alpha < 1 (at 1 the teacher is skipped)."},
    )
    aapa_discriminator_path: str | None = field(
        default=None, metadata={"help": "Frozen AnchorDiscriminator file; adds its score as a reward term."}
    )
    aapa_weight: float = field(default=0.1, metadata={"help": "Weight λ of the AAPA anchor reward."})
    aapa_start_step: int = field(default=0, metadata={"help": "Optimizer step at which the anchor weight starts."})
    aapa_ramp_steps: int = field(
        default=0, metadata={"help": "Steps of the linear ramp of the anchor weight from 0 to aapa_weight."}
    )

    trainer_name = "RLADTrainer"  # not a field: the trainer `support.refuse_unsupported` checks this config against

    def __post_init__(self):
        self._validate_rlad_fields()
        super().__post_init__()
        self._warn_if_clamp_is_evaluated_late()

    @property
    def scores_teacher(self) -> bool:
        """Whether the teacher is scored on each generation batch (for the anchor, the logs, or both)."""
        return self.rlad_alpha < 1.0 or bool(self.rlad_log_teacher_stats)

    def _validate_rlad_fields(self) -> None:
        """Checks that need no model: they run at construction, before anything is loaded."""
        check_field_types(self, RLADConfig)
        refuse_unsupported(self)  # a field RLADTrainer would ignore: trainers/support.py
        self.validate_served_teacher_arguments()
        if not 0.0 <= self.rlad_alpha <= 1.0:
            raise ValueError(
                f"`rlad_alpha` must be in [0, 1], got {self.rlad_alpha}: 1 is plain GRPO, 0 anchors the ratio to the "
                "teacher alone, the paper uses 0.5."
            )
        if not self.rlad_teacher_clamp > 0:  # also rejects NaN
            raise ValueError(
                f"`rlad_teacher_clamp` must be > 0, got {self.rlad_teacher_clamp}: it bounds |log π_θ − log π_T| "
                "(the paper uses 1.0; `inf` disables the clamp)."
            )
        AnchorSchedule.from_config(self)  # aapa_weight, aapa_start_step, aapa_ramp_steps
        self._validate_clamp_mode()
        if self.rlad_alpha < 1.0 and self.beta != 0.0 and self.use_bias_correction_kl:
            raise ValueError(
                "With beta > 0 GRPO multiplies the reference KL by its importance ratio (`use_bias_correction_kl`), "
                "and RLAD replaces that ratio by the teacher-anchored one, which would reweight the KL by "
                "(π_old/π_T)^(1−α). Set `use_bias_correction_kl=False`, or `beta=0.0` (the paper's setting)."
            )

    def _validate_clamp_mode(self) -> None:
        if self.rlad_teacher_clamp_mode not in TEACHER_CLAMP_MODES:
            raise ValueError(
                f"Unknown `rlad_teacher_clamp_mode`={self.rlad_teacher_clamp_mode!r}. Choose one of "
                f"{', '.join(map(repr, TEACHER_CLAMP_MODES))}."
            )
        if self.rlad_teacher_clamp_mode != "literal" or self.rlad_alpha == 1.0:
            return
        if self.loss_type in ("cispo", "vespo") or self.beta != 0.0:
            raise ValueError(
                f"rlad_teacher_clamp_mode='literal' scales ∇ log π_θ by α on clamped tokens inside GRPO's loss, which "
                f"is the literal clamp only when the loss reads log π_θ through the ratio alone; loss_type="
                f"{self.loss_type!r} (cispo and vespo multiply log π_θ itself) or beta={self.beta} (the reference KL "
                "reads log π_θ) would be rescaled too. Use another loss_type and beta=0.0, or "
                "rlad_teacher_clamp_mode='straight_through'."
            )

    def _warn_if_clamp_is_evaluated_late(self) -> None:
        # The anchor is fixed when the batch is generated; GRPO's ratio equals Eq. 3 only while π_θ = π_old in value,
        # i.e. while no optimizer step falls inside a generation batch (GRPO's own test for needing old log-probs).
        spans_optimizer_steps = self.gradient_accumulation_steps % (self.steps_per_generation * self.num_iterations)
        if self.rlad_alpha < 1.0 and spans_optimizer_steps:
            logger.warning(
                "RLAD with num_iterations=%d, steps_per_generation=%d and gradient_accumulation_steps=%d reuses a "
                "generation batch across optimizer steps: the teacher clamp is then evaluated at the behaviour policy "
                "instead of the current one (methods.md §10.4 item 4). For Eq. 3 exactly, use num_iterations=1 and a "
                "steps_per_generation that divides gradient_accumulation_steps.",
                self.num_iterations,
                self.steps_per_generation,
                self.gradient_accumulation_steps,
            )
