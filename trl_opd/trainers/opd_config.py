"""`OPDConfig`: `trl.DistillationConfig` plus the knobs of the OPD method family."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DistillationConfig

from ..losses import DIVERGENCES, ESTIMATORS

LOSS_REDUCTIONS = ("token_mean", "token_mean_microbatch", "sequence_mean", "weighted_mean")
TOP_K_SOURCES = ("student", "teacher", "union")
LOSS_IMPLEMENTATIONS = ("fused", "checkpointed")


def _require_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}.")


def _require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown `{name}`={value!r}. Choose one of {', '.join(map(repr, choices))}.")


@dataclass
class OPDConfig(DistillationConfig):
    r"""
    Configuration for [`OPDTrainer`]: every field of `trl.DistillationConfig` plus the fields below.

    With the defaults (`divergence="reverse_kl"`, full vocabulary, analytic estimator, `token_mean`, `lmbda=1`),
    OPDTrainer trains exactly like `trl.DistillationTrainer` with `beta=1.0`.

    Parameters:
        > Divergence (methods.md §0.3–§0.6, §1)

        divergence (`str`, defaults to `"reverse_kl"`):
            Per-token divergence between the student's and the teacher's next-token distributions:
            `"forward_kl"` = KL(teacher ‖ student), `"reverse_kl"` = KL(student ‖ teacher), `"jsd"` (generalized JSD,
            `beta` weights the teacher in the mixture), `"tvd"`, `"skew_forward_kl"`, `"skew_reverse_kl"` (`alpha`).
            This is the single source of truth: unlike `DistillationConfig`, `beta` does not pick the divergence.
        beta (`float`, defaults to `0.5`):
            Teacher weight in the mixture of `divergence="jsd"` (TRL/GKD convention). Ignored otherwise. GKD's default.
        alpha (`float`, defaults to `0.1`):
            Skew of `skew_forward_kl` / `skew_reverse_kl` (DistiLLM). Ignored otherwise.
        distillation_temperature (`float` or `None`, defaults to `None`):
            Temperature applied to both models' logits in the loss. `None` means "equal to `temperature`", the sampling
            temperature (DistillationTrainer and OPSD behaviour). No T² factor is applied.
        estimator (`str`, defaults to `"analytic"`):
            `"analytic"`: the exact divergence over the vocabulary (or over the `loss_top_k` support). Sampled-token
            estimators use only the sampled token and need `divergence="reverse_kl"`: `"sampled_pg"` (advantage form
            −sg(log p_T − log p_S)·log p_S, OPSD Eq. 9), `"k2"`, `"k3"` (gradient of the forward KL), `"k3_plus"`
            (value of k3, gradient of k2).
        loss_top_k (`int` or `None`, defaults to `None`):
            Restrict the analytic divergence to the top-k tokens of `loss_top_k_source` and renormalise both
            distributions there. `None` uses the full vocabulary. (Named `loss_top_k` because `top_k` is the sampling
            parameter inherited from `DistillationConfig`.)
        loss_top_k_source (`str`, defaults to `"student"`):
            `"student"`, `"teacher"` or `"union"` (the union of both top-k sets).
        loss_top_k_tail (`bool`, defaults to `False`):
            Instead of renormalising on the top-k support, add one tail class holding each side's leftover mass.
        clip (`float` or `None`, defaults to `None`):
            OPSD per-vocabulary-element clip τ: each entry's contribution to the divergence is capped at τ before the
            vocabulary sum (the OPSD paper uses 0.05 with forward KL). The clipped loss can be negative.

        > Reduction (methods.md §0.7)

        loss_reduction (`str`, defaults to `"token_mean"`):
            `"token_mean"`: Σ w·ℓ over the optimizer step divided by the number of generated tokens in the step
            (all gradient-accumulation micro-batches and processes; TRL's behaviour). `"token_mean_microbatch"`:
            per micro-batch Σ w·ℓ / Σ m, averaged over micro-batches (OPSD/TIP reference code).
            `"sequence_mean"`: mean over sequences of the per-sequence token mean (PW-OPSD, GRPO `grpo`), over the
            whole step. `"weighted_mean"`: per micro-batch Σ w·ℓ / Σ w·m (mean over selected tokens, TIP Eq. 9),
            averaged over micro-batches.
        loss_chunk_size (`int`, defaults to `1024`):
            Tokens per chunk in the loss: only `[loss_chunk_size, V]` logits exist at any time.
        loss_implementation (`str`, defaults to `"fused"`):
            `"fused"`: one autograd function computes the loss and its gradient chunk by chunk in the forward pass
            (Liger-Kernel pattern; no recomputation). `"checkpointed"`: recompute each chunk in backward (TRL's
            pattern). Both give the same values and gradients.

        > On/off-policy mix (GKD)

        lmbda (`float`, defaults to `1.0`):
            Probability that a generation batch is sampled from the student (on-policy). Otherwise the batch uses the
            teacher's generations (`seq_kd=True`) or the dataset's `completion` column. The coin is drawn once per
            generation batch from (`seed`, step), so every process makes the same choice. GKD's default is 0.5; ours is
            1.0 (pure on-policy, DistillationTrainer's behaviour).
        seq_kd (`bool`, defaults to `False`):
            When the coin says off-policy, generate the completions with the teacher instead of reading the dataset.
    """

    beta: float = field(
        default=0.5,
        metadata={"help": "Teacher weight in the mixture of divergence='jsd' (TRL/GKD convention); ignored otherwise."},
    )
    divergence: str = field(
        default="reverse_kl",
        metadata={"help": "Per-token divergence: " + ", ".join(DIVERGENCES) + "."},
    )
    alpha: float = field(default=0.1, metadata={"help": "Skew of skew_forward_kl / skew_reverse_kl."})
    distillation_temperature: float | None = field(
        default=None,
        metadata={"help": "Temperature of both models' logits in the loss; None = the sampling `temperature`."},
    )
    estimator: str = field(
        default="analytic",
        metadata={"help": "analytic | sampled_pg | k2 | k3 | k3_plus (sampled-token estimators need reverse_kl)."},
    )
    loss_top_k: int | None = field(
        default=None,
        metadata={"help": "Restrict the divergence to the top-k support (renormalised); None = full vocabulary."},
    )
    loss_top_k_source: str = field(
        default="student", metadata={"help": "Whose top-k defines the support: student | teacher | union."}
    )
    loss_top_k_tail: bool = field(
        default=False, metadata={"help": "Add a tail class with the leftover mass instead of renormalising."}
    )
    clip: float | None = field(
        default=None, metadata={"help": "OPSD per-vocabulary-element clip tau (e.g. 0.05); None = no clip."}
    )
    loss_reduction: str = field(
        default="token_mean",
        metadata={"help": "token_mean | token_mean_microbatch | sequence_mean | weighted_mean."},
    )
    loss_chunk_size: int = field(default=1024, metadata={"help": "Tokens per loss chunk."})
    loss_implementation: str = field(default="fused", metadata={"help": "fused | checkpointed."})
    lmbda: float = field(
        default=1.0, metadata={"help": "Probability of an on-policy generation batch (GKD's lmbda)."}
    )
    seq_kd: bool = field(
        default=False, metadata={"help": "Off-policy batches come from teacher generations instead of the dataset."}
    )

    def __post_init__(self):
        self._validate_opd_fields()
        super().__post_init__()

    @property
    def effective_distillation_temperature(self) -> float:
        """T_d actually used by the loss (`distillation_temperature`, or `temperature` when it is None)."""
        return self.temperature if self.distillation_temperature is None else self.distillation_temperature

    def _validate_opd_fields(self) -> None:
        """Checks that need no model: they run at construction, before anything expensive."""
        _require_choice("divergence", self.divergence, DIVERGENCES)
        _require_choice("estimator", self.estimator, ESTIMATORS)
        _require_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        _require_choice("loss_top_k_source", self.loss_top_k_source, TOP_K_SOURCES)
        _require_choice("loss_implementation", self.loss_implementation, LOSS_IMPLEMENTATIONS)
        _require_unit_interval("beta", self.beta)
        _require_unit_interval("alpha", self.alpha)
        _require_unit_interval("lmbda", self.lmbda)
        if self.temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}.")
        if self.distillation_temperature is not None and self.distillation_temperature <= 0:
            raise ValueError(
                f"`distillation_temperature` must be > 0 (or None to reuse `temperature`), "
                f"got {self.distillation_temperature}."
            )
        if self.loss_top_k is not None and self.loss_top_k < 1:
            raise ValueError(f"`loss_top_k` must be >= 1 (or None for the full vocabulary), got {self.loss_top_k}.")
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"`clip` must be > 0 (or None for no clip), got {self.clip}.")
        if self.loss_chunk_size < 1:
            raise ValueError(f"`loss_chunk_size` must be >= 1, got {self.loss_chunk_size}.")
        if self.estimator != "analytic":
            self._validate_sampled_estimator()

    def _validate_sampled_estimator(self) -> None:
        if self.divergence != "reverse_kl":
            raise ValueError(
                f"estimator={self.estimator!r} estimates the reverse KL from the sampled token only; set "
                f"divergence='reverse_kl' or use estimator='analytic' for divergence={self.divergence!r}."
            )
        if self.loss_top_k is not None or self.clip is not None:
            raise ValueError(
                f"estimator={self.estimator!r} uses only the sampled token: `loss_top_k` and `clip` apply to the "
                "analytic estimator. Unset them or use estimator='analytic'."
            )
