"""AAPA anchor: a fixed, lightweight discriminator, its staged weight, its plug-ins (methods.md §11, arXiv 2509.25148).

The paper states only that a *fixed, lightweight* discriminator compares policy rollouts with *offline,
pre-collected expert responses*, with no online teacher and no co-training (§11.1). Everything below is
our design (§11.2), chosen as the simplest thing that can work on a CPU testbed:

**Features.** A response's character n-grams (n = 1..4 by default), hashed into ``num_buckets`` buckets
with a fixed 64-bit hash (identical across processes and runs, unlike Python's salted ``hash``), counted,
damped with log(1 + count) and L2-normalised per response, so the score reflects *how* a response is
written, not how long it is. Only the first ``max_chars`` characters are read. The prompt is not used: the
training set pairs every prompt with both an expert and a student response, so prompt features carry no
label information for a linear model (capturing prompt–response interactions would need a much larger
model).

**Model.** Logistic regression D(y) = σ(w·φ(y) + b), trained once, full batch, with L-BFGS on the
class-balanced binary cross-entropy (each class weighs one half, whatever the counts) plus an L2 penalty
on w, from w = 0; label 1 = expert response, label 0 = a response sampled from the *initial* student on
the same prompts. A ``validation_fraction`` of each class (split by ``seed``) is held out and its accuracy
reported, because training accuracy of a hashed n-gram model is close to 1 whatever it learned. Training
is deterministic given the data and the seed (zero initialisation, full batch, CPU).

**Anchor score.** s(y) = clip(logit D(y), −c, c), c = ``score_clip`` = 5 (§11.2): the log-odds that the
response is expert-written, clipped so the policy cannot farm unbounded reward. :func:`anchor_reward`
returns s(y) with TRL's reward-function signature; combine it with the task reward through
``reward_funcs`` / ``reward_weights`` (weight λ ≈ 0.1), so GRPO's group normalisation applies unchanged.
Watch the discriminator probability of policy samples: a rise toward 1 with flat task accuracy means the
policy is gaming the discriminator.

**Plug-ins** (§11.3). :class:`AnchorSchedule` stages the weight (0 before a start step, then a linear ramp);
``RLADTrainer`` applies it to the anchor reward. For a trainer without rewards (``OPDTrainer``),
:func:`leave_one_out_advantages` centres the scores of the student's rollouts and :func:`anchor_policy_loss` is the
sequence-level REINFORCE term on them (value 0, gradient only), added by ``trl_opd.objective.AnchorTerm``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_FORMAT = "trl_opd.anchor/1"
_HASH_MULTIPLIER = np.uint64(
    0x100000001B3
)  # FNV-1a 64-bit prime, a good odd multiplier for a polynomial hash


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """Bijective 64-bit mixer (SplitMix64 finaliser): spreads polynomial hashes evenly over the buckets."""
    values = values ^ (values >> np.uint64(30))
    values = values * np.uint64(0xBF58476D1CE4E5B9)
    values = values ^ (values >> np.uint64(27))
    values = values * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def _ngram_buckets(codes: np.ndarray, n: int, num_buckets: int) -> np.ndarray:
    """Bucket of every length-n window of ``codes`` (uint64 code points); the hash also depends on n."""
    windows = len(codes) - n + 1
    if windows <= 0:
        return np.zeros(0, dtype=np.int64)
    hashes = np.full(windows, n, dtype=np.uint64)
    for offset in range(n):  # h ← h·P + c, for each character of the window; uint64 arithmetic wraps mod 2^64
        hashes = hashes * _HASH_MULTIPLIER + codes[offset : offset + windows]
    return (_splitmix64(hashes) % np.uint64(num_buckets)).astype(np.int64)


class SparseRows(NamedTuple):
    """A ``[num_rows, num_buckets]`` sparse matrix in coordinate form: X[rows[i], columns[i]] = values[i]."""

    rows: Tensor
    columns: Tensor
    values: Tensor
    num_rows: int

    def linear(self, weight: Tensor, bias: Tensor) -> Tensor:
        """``[num_rows]`` logits X·w + b (differentiable in w and b)."""
        products = weight[self.columns] * self.values.to(weight.dtype)
        return torch.zeros(self.num_rows, dtype=weight.dtype).index_add(0, self.rows, products) + bias


class AnchorDiscriminator:
    """Frozen expert-vs-student discriminator on hashed character n-grams (see the module docstring).

    Args:
        ngram_range: smallest and largest n-gram length, in characters.
        num_buckets: size of the hashed feature space (the number of weights).
        max_chars: only the first ``max_chars`` characters of a response are read (``aapa_max_length``).
        score_clip: c in s = clip(logit, −c, c).
    """

    def __init__(
        self,
        *,
        ngram_range: tuple[int, int] = (1, 4),
        num_buckets: int = 2**18,
        max_chars: int = 8192,
        score_clip: float = 5.0,
    ):
        low, high = ngram_range
        if not 1 <= low <= high:
            raise ValueError(f"ngram_range={ngram_range} must be (low, high) with 1 ≤ low ≤ high.")
        for name, value in (("num_buckets", num_buckets), ("max_chars", max_chars)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if not score_clip > 0:
            raise ValueError(f"score_clip={score_clip} must be > 0.")
        self.ngram_range = (int(low), int(high))
        self.num_buckets = num_buckets
        self.max_chars = max_chars
        self.score_clip = float(score_clip)
        self.weight = torch.zeros(num_buckets, dtype=torch.float64)
        self.bias = torch.zeros((), dtype=torch.float64)
        self.fitted = False
        self.metrics: dict[str, float] = {}

    # ---------------------------------------------------------------------------------------------- features

    def _text_features(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        codes = np.frombuffer(text[: self.max_chars].encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        low, high = self.ngram_range
        buckets = np.concatenate([_ngram_buckets(codes, n, self.num_buckets) for n in range(low, high + 1)])
        ids, counts = np.unique(buckets, return_counts=True)
        values = np.log1p(counts.astype(np.float64))
        norm = np.linalg.norm(values)
        return ids, (values / norm if norm > 0 else values)

    def _features(self, texts: Sequence[str]) -> SparseRows:
        """The responses' feature vectors φ(y) as one sparse matrix in coordinate form (float64 values)."""
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise ValueError("texts must be a list of strings.")
        per_text = [self._text_features(text) for text in texts]
        lengths = torch.tensor([len(ids) for ids, _ in per_text], dtype=torch.long)
        return SparseRows(
            rows=torch.repeat_interleave(torch.arange(len(per_text)), lengths),
            columns=torch.from_numpy(np.concatenate([ids for ids, _ in per_text] or [np.zeros(0, np.int64)])),
            values=torch.from_numpy(np.concatenate([values for _, values in per_text] or [np.zeros(0)])),
            num_rows=len(per_text),
        )

    # ---------------------------------------------------------------------------------------------- training

    def fit(
        self,
        expert_texts: Sequence[str],
        negative_texts: Sequence[str],
        *,
        steps: int = 200,
        weight_decay: float = 1e-3,
        validation_fraction: float = 0.1,
        seed: int = 0,
    ) -> dict[str, float]:
        """Train once on expert (label 1) vs initial-student (label 0) responses; then the model is frozen.

        Minimises the class-balanced, L2-regularised logistic loss (convex; strictly so in w)

            ½·mean_expert softplus(−z) + ½·mean_negative softplus(z) + ``weight_decay``·‖w‖²,   z = w·φ(y) + b

        with full-batch L-BFGS (strong-Wolfe line search, at most ``steps`` iterations) in float64 from
        w = 0, b = 0: deterministic, and far less sensitive to round-off than Adam, whose per-coordinate
        scaling turns near-zero gradients into full-size steps. The L2 term keeps w finite on separable
        data. Returns (and stores in ``metrics``) the training loss and accuracy and, when
        ``validation_fraction`` > 0, the held-out accuracy (``seed`` picks the held-out split; each
        class keeps at least one training example).
        """
        if len(expert_texts) == 0 or len(negative_texts) == 0:
            raise ValueError("fit needs at least one expert and one negative (initial-student) response.")
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction={validation_fraction} must lie in [0, 1).")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r} must be a positive integer.")
        if not weight_decay > 0:
            raise ValueError(f"weight_decay={weight_decay} must be > 0 (it keeps the weights finite).")
        generator = torch.Generator().manual_seed(seed)
        expert_train, expert_val = _split(list(expert_texts), validation_fraction, generator)
        negative_train, negative_val = _split(list(negative_texts), validation_fraction, generator)

        features = self._features(expert_train + negative_train)
        # Only buckets seen in training can get a non-zero weight (elsewhere the loss gradient is 0 and
        # the L2 term keeps w at its start, 0), so optimise over those columns alone: same minimiser,
        # smaller problem.
        seen_buckets, compact_columns = torch.unique(features.columns, return_inverse=True)
        compact = features._replace(columns=compact_columns)
        labels = torch.cat([torch.ones(len(expert_train)), torch.zeros(len(negative_train))]).double()
        class_weights = torch.where(labels > 0, 0.5 / len(expert_train), 0.5 / len(negative_train))
        weight = torch.zeros(len(seen_buckets), dtype=torch.float64, requires_grad=True)
        bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias],
            max_iter=steps,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
        )

        def closure():
            optimizer.zero_grad()
            logits = compact.linear(weight, bias)
            objective = (
                _balanced_logistic_loss(logits, labels, class_weights) + weight_decay * weight.pow(2).sum()
            )
            objective.backward()
            return objective

        optimizer.step(closure)
        self.weight = torch.zeros(self.num_buckets, dtype=torch.float64).index_copy(
            0, seen_buckets, weight.detach()
        )
        self.bias, self.fitted = bias.detach(), True
        with torch.no_grad():
            train_logits = features.linear(self.weight, self.bias)
            train_loss = _balanced_logistic_loss(train_logits, labels, class_weights)
        self.metrics = {"train_loss": float(train_loss), "train_accuracy": _accuracy(train_logits, labels)}
        if expert_val or negative_val:
            val_logits = self.logits(expert_val + negative_val)
            val_labels = torch.cat([torch.ones(len(expert_val)), torch.zeros(len(negative_val))])
            self.metrics["validation_accuracy"] = _accuracy(val_logits, val_labels)
        return dict(self.metrics)

    # ---------------------------------------------------------------------------------------------- scoring

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise ValueError(
                "AnchorDiscriminator is not trained: call fit(expert_texts, negative_texts) or load()."
            )

    @torch.no_grad()
    def logits(self, texts: Sequence[str]) -> Tensor:
        """``[N]`` unclipped log-odds that each response is expert-written."""
        self._check_fitted()
        return self._features(texts).linear(self.weight, self.bias)

    def probability(self, texts: Sequence[str]) -> list[float]:
        """D(y) ∈ (0, 1) per response (log it for policy samples to watch for discriminator hacking)."""
        return torch.sigmoid(self.logits(texts)).tolist()

    def score(self, texts: Sequence[str]) -> list[float]:
        """Anchor score s(y) = clip(logit D(y), −c, c) per response."""
        return self.logits(texts).clamp(-self.score_clip, self.score_clip).tolist()

    # ------------------------------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> None:
        """Write the frozen discriminator (configuration, weights, fit metrics) to one file."""
        self._check_fitted()
        torch.save(
            {
                "format": _FORMAT,
                "ngram_range": list(self.ngram_range),
                "num_buckets": self.num_buckets,
                "max_chars": self.max_chars,
                "score_clip": self.score_clip,
                "weight": self.weight,
                "bias": self.bias,
                "metrics": self.metrics,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path) -> AnchorDiscriminator:
        """Read a discriminator written by :meth:`save` (loaded with ``weights_only=True``)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"{path} is not an AnchorDiscriminator file (expected format {_FORMAT!r}).")
        discriminator = cls(
            ngram_range=tuple(state["ngram_range"]),
            num_buckets=state["num_buckets"],
            max_chars=state["max_chars"],
            score_clip=state["score_clip"],
        )
        discriminator.weight, discriminator.bias = state["weight"], state["bias"]
        discriminator.metrics, discriminator.fitted = dict(state["metrics"]), True
        return discriminator


def _split(texts: list[str], fraction: float, generator: torch.Generator) -> tuple[list[str], list[str]]:
    order = torch.randperm(len(texts), generator=generator).tolist()
    held_out = min(int(len(texts) * fraction), len(texts) - 1)
    return [texts[i] for i in order[held_out:]], [texts[i] for i in order[:held_out]]


def _balanced_logistic_loss(logits: Tensor, labels: Tensor, class_weights: Tensor) -> Tensor:
    return (class_weights * F.binary_cross_entropy_with_logits(logits, labels, reduction="none")).sum()


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return float(((logits > 0).float() == labels).float().mean())


# ---------------------------------------------------------------------------------------------- the plug-in


@dataclass(frozen=True)
class AnchorSchedule:
    """Staged anchor weight (methods.md §11.3): w(t) = 0 before step t0, then a linear ramp to λ over R steps.

        w(t) = 0                          t < t0
        w(t) = λ · min(1, (t − t0) / R)   t ≥ t0, R > 0   (w(t0) = 0, w(t0 + R) = λ)
        w(t) = λ                          t ≥ t0, R = 0

    t is the trainer's optimizer step (``state.global_step``, 0 during the first step); λ = ``aapa_weight``,
    t0 = ``aapa_start_step``, R = ``aapa_ramp_steps``. The defaults (t0 = R = 0) give the constant λ.
    """

    weight: float = 0.1
    start_step: int = 0
    ramp_steps: int = 0

    def __post_init__(self):
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(
            self.weight
        ):
            raise ValueError(f"`aapa_weight` must be a finite number, got {self.weight!r}.")
        for name, value in (("aapa_start_step", self.start_step), ("aapa_ramp_steps", self.ramp_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0 (optimizer steps), got {value!r}.")

    @classmethod
    def from_config(cls, args) -> AnchorSchedule:
        return cls(args.aapa_weight, args.aapa_start_step, args.aapa_ramp_steps)

    def weight_at(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        if self.ramp_steps == 0:
            return float(self.weight)
        return float(self.weight) * min(1.0, (step - self.start_step) / self.ramp_steps)


def leave_one_out_advantages(scores: Tensor, rows: Tensor | None = None) -> Tensor:
    """``[B]`` advantages s_b − mean_{j ≠ b} s_j over the rows taken (methods.md §11.3), 0 for the others.

    The baseline of a sequence is the mean anchor score of the *other* sequences, so it does not depend on that
    sequence and the REINFORCE gradient stays unbiased. ``rows`` (``[B]`` bool, default all) picks the student's
    own samples; with fewer than two of them there is no baseline and every advantage is 0. Detached, float32.
    """
    scores = scores.detach().float()
    rows = torch.ones_like(scores, dtype=torch.bool) if rows is None else rows.to(scores.device).bool()
    count = int(rows.sum())
    if count < 2:
        return torch.zeros_like(scores)
    taken = torch.where(rows, scores, torch.zeros_like(scores))
    others_mean = (taken.sum() - taken) / (count - 1)
    return torch.where(rows, scores - others_mean, torch.zeros_like(scores))


def anchor_policy_loss(
    token_logprobs: Tensor, advantages: Tensor, coefficients: Tensor, *, weight: float
) -> Tensor:
    """The AAPA term for a sampling trainer (methods.md §11.3): zero in value, gradient −w Σ_{b,t} c_bt A_b ∇log π_θ.

        L = −w · Σ_{b,t} c_bt · sg(A_b) · (log π_θ(ŷ_bt) − sg(log π_θ(ŷ_bt)))

    i.e. REINFORCE on the sequence-level anchor advantage A_b (:func:`leave_one_out_advantages`), spread over the
    sequence's tokens with the token term's reduction coefficients c (0 off the supervised tokens). Its value is 0,
    so the logged loss stays the distillation loss.

    Args:
        token_logprobs: ``[B, T]`` log π_θ of the sampled tokens (differentiable).
        advantages: ``[B]`` anchor advantages (detached).
        coefficients: ``[B, T]`` detached reduction coefficients.
        weight: w(t), the scheduled weight.
    """
    if token_logprobs.shape != coefficients.shape or advantages.shape != token_logprobs.shape[:1]:
        raise ValueError(
            f"token_logprobs {tuple(token_logprobs.shape)} and coefficients {tuple(coefficients.shape)} must be "
            f"[B, T] and advantages {tuple(advantages.shape)} [B]."
        )
    centred = token_logprobs - token_logprobs.detach()
    per_token = coefficients.detach() * advantages.detach().unsqueeze(1).to(token_logprobs.dtype) * centred
    return -weight * per_token.sum()


def completion_text(completion) -> str:
    """Text of a TRL completion: a string, or a conversational list of messages (their contents joined)."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content", "") if isinstance(message, dict) else message
        if isinstance(content, list):  # multimodal content blocks: keep the text ones
            content = "".join(block.get("text", "") for block in content if isinstance(block, dict))
        parts.append(str(content))
    return "\n".join(parts)


def anchor_reward(prompts, completions, *, discriminator: AnchorDiscriminator, **kwargs) -> list[float]:
    """AAPA anchor reward: s(y) = clip(logit D(y), −c, c) for each completion (prompts are not used).

    TRL reward-function signature; bind the discriminator with :func:`make_anchor_reward`.
    """
    return discriminator.score([completion_text(completion) for completion in completions])


def make_anchor_reward(discriminator: AnchorDiscriminator | str | Path):
    """A picklable TRL reward function ``(prompts, completions, **kwargs) -> list[float]``.

    Pass it in ``reward_funcs``. Accepts a trained :class:`AnchorDiscriminator` or the path of a saved one;
    TRL logs it as ``anchor_reward``.
    """
    if not isinstance(discriminator, AnchorDiscriminator):
        discriminator = AnchorDiscriminator.load(discriminator)
    discriminator._check_fitted()
    return functools.partial(anchor_reward, discriminator=discriminator)
