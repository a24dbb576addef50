"""The OPD objective: built once from the config, called once per micro-batch, no trainer inside.

    objective = OPDObjective.from_config(args)                       # what the switches ask for
    output = objective(batch, normalisers, selection_seed=..., diagnostics=...)
    output.loss.backward(); log(output.stats)

One call is, in order (methods.md §0.2):

1. **Weight factors** (no gradient), each a `[B, C]` tensor over the completion tokens, multiplied together
   (`reduction.combine_factors`): TIP selection or importance weights (§3; scored in a no-grad chunked pass, so only
   the selected tokens reach the LM head with gradients), PW-OPSD position weights (§4), the EDGE-OPD evidence mask
   (§5.2). A factor of 0 drops the token from the gradient pass.
2. **One reduction** over units (`reduction.step_coefficients`, §0.7): per-token coefficients c with the step's
   normalisers (generated tokens, sequences, or the cross-process Σ w for `weighted_mean`) passed in by the trainer.
3. **Loss terms**: the token term, either the analytic (full-vocabulary or top-k) divergence through both LM heads,
   chunked or fused (§0.5, §1), or a sampled-token estimator (§0.6); times `logit_weight`; plus μ · L_OPRD (§6) when
   the trainer captured hidden states; plus the AAPA anchor term (§11.3) when the trainer scored the rollouts.
   Optional no-grad **diagnostics** (§7.1) read the same hidden states.

Inputs are plain tensors (`CompletionBatch`): the student's last hidden states and `OutputHead`, and a teacher signal.
`LocalTeacher` is a teacher whose last hidden states and head are in this process (run here, or its hidden states
returned by trl_opd's teacher server). `ServedTeacher` is what a log-prob server returned (vLLM's top-k). The objective
reads either in two ways only: `hidden`/`head` for the passes over a distribution (analytic loss, TIP scoring,
diagnostics), and `token_logprobs` for the sampled-token passes (estimators, evidence).

`stats` maps metric names to (sum, count) pairs over this micro-batch; the trainer gathers them over processes.
Names: `opd/…` (the loss), `tip/…`, `evidence/…`, `oprd/…`, `aapa/…`, `diagnostics/…`; a share (a fraction of
tokens, rows or segments) always ends in `_share` (`opd/selected_share`, `tip/q1_share`, `evidence/kept_share`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .anchor import AnchorSchedule, anchor_policy_loss
from .diagnostics import OverlapAccumulator
from .losses import (
    OutputHead,
    SparseTeacherLogits,
    TeacherLogits,
    check_served_temperature,
    chunked_entropy,
    chunked_token_divergence,
    chunked_token_logprobs,
    fused_divergence_loss,
    per_token_divergence,
    sampled_token_kl,
    sampled_token_loss,
    score_tokens,
    top_k_mass,
)
from .reduction import StepNormalisers, combine_factors, step_coefficients, token_units
from .representation import (
    BridgeProjector,
    RepresentationStates,
    module_device,
    representation_loss_per_layer,
)
from .weighting import evidence_mask, position_weights, tip_importance_sample, tip_mask, tip_quadrants

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]
MAX_LOGGED_LAYERS = 8  # per-layer OPRD losses are logged for up to this many layers


# ------------------------------------------------------------------ inputs


@dataclass
class LocalTeacher:
    """A teacher that runs in this process: its last hidden states at the completion positions and its head."""

    hidden: torch.Tensor  # [B, C, d_T], no gradient
    head: OutputHead

    def rows(self, valid: torch.Tensor) -> LocalTeacher:
        return LocalTeacher(self.hidden[valid], self.head)

    def token_logprobs(self, token_ids: torch.Tensor, *, temperature: float, chunk_size: int) -> torch.Tensor:
        """log p_T(token) at T_d for every row, [N] (the rows of `rows(valid)`)."""
        with torch.no_grad():
            return chunked_token_logprobs(
                self.hidden, self.head, token_ids, temperature=temperature, chunk_size=chunk_size
            )


@dataclass
class ServedTeacher:
    """A teacher served elsewhere, known by what its server returned at the completion positions (methods.md §0.9):
    the log-prob of each sampled token and/or log-probs at a few ids per token (vLLM's top-k, or trl_opd's server at
    the student's top-k ids), all at one temperature. Shapes `[B, C]` / `[B, C, m]` before `rows`, `[N]` / `[N, m]`
    after. It stands where `LocalTeacher` stands: `hidden`/`head` for the passes over a distribution (the support's
    log-probs as `losses.SparseTeacherLogits`), `token_logprobs` for the sampled-token passes."""

    completion_ids: torch.Tensor  # the tokens `sampled_logprobs` score
    vocab_size: int
    temperature: float = 1.0
    sampled_logprobs: torch.Tensor | None = None
    support_ids: torch.Tensor | None = None  # −1 = padding
    support_logprobs: torch.Tensor | None = None

    def rows(self, valid: torch.Tensor) -> ServedTeacher:
        def pick(tensor):
            return None if tensor is None else tensor.to(valid.device)[valid]

        return ServedTeacher(pick(self.completion_ids), self.vocab_size, self.temperature,
                             pick(self.sampled_logprobs), pick(self.support_ids), pick(self.support_logprobs))

    @property
    def head(self) -> SparseTeacherLogits:
        if self.support_ids is None:
            raise ValueError("This objective reads the teacher's distribution, but the served teacher returned only "
                             "the sampled tokens' log-probs (a config check should have refused it).")
        return SparseTeacherLogits(self.support_ids, self.support_logprobs, self.vocab_size, self.temperature)

    @property
    def hidden(self) -> torch.Tensor:
        return self.head.row_indices()

    def token_logprobs(self, token_ids: torch.Tensor, *, temperature: float, chunk_size: int) -> torch.Tensor:
        """log p_T(token) as served; the tokens must be the ones the server scored, at its temperature."""
        if self.sampled_logprobs is None:
            raise ValueError("The served teacher returned no sampled-token log-probs.")
        check_served_temperature(self.temperature, temperature)
        if not torch.equal(token_ids.to(self.completion_ids.device), self.completion_ids):
            raise ValueError("The tokens asked for are not the ones the served teacher scored (a misalignment).")
        return self.sampled_logprobs.to(token_ids.device).float()


@dataclass
class RoutedTeacher:
    """Several teachers, one per row (MOPD, methods.md §0.9): `owner[b]` indexes the teacher of row b in `signals`,
    each signal (`LocalTeacher` or `ServedTeacher`, None for a teacher without rows) covering only its own rows, in
    batch order. Read like one teacher: `rows(valid)` flattens the tokens in batch order and remembers, for each, its
    teacher and its place among that teacher's tokens."""

    owner: torch.Tensor  # [B] long
    signals: list
    names: tuple[str, ...] = ()  # for the per-teacher metrics `teachers/<name>/...`

    def rows(self, valid: torch.Tensor) -> _RoutedRows:
        owner = self.owner.to(valid.device)
        token_owner = owner.unsqueeze(1).expand_as(valid)[valid]
        local = torch.zeros_like(token_owner)
        parts = []
        for index, signal in enumerate(self.signals):
            mine = token_owner == index
            local[mine] = torch.arange(int(mine.sum()), device=valid.device)
            parts.append(None if signal is None else signal.rows(valid[owner == index]))
        return _RoutedRows(token_owner, local, parts)


@dataclass
class _RoutedRows:
    """A `RoutedTeacher` at the flattened tokens: `[N]` owner and place among its owner's tokens, each owner's rows."""

    owner: torch.Tensor
    local: torch.Tensor
    parts: list

    @property
    def hidden(self) -> torch.Tensor:
        return torch.arange(len(self.owner), device=self.owner.device)

    @property
    def head(self) -> _RoutedLogits:
        widths = {part.head.width for part in self.parts if part is not None}
        if len(widths) > 1:
            raise ValueError(f"The routed teachers' logits have different widths {sorted(widths)}.")
        return _RoutedLogits(self, widths.pop() if widths else 0)

    def token_logprobs(self, token_ids: torch.Tensor, *, temperature: float, chunk_size: int) -> torch.Tensor:
        out = torch.zeros(len(self.owner), device=token_ids.device)
        for index, part in enumerate(self.parts):
            mine = self.owner == index  # this owner's tokens, already in its own order
            if part is not None and bool(mine.any()):
                out[mine] = part.token_logprobs(token_ids[mine], temperature=temperature,
                                                chunk_size=chunk_size).to(out.device)
        return out


@dataclass(frozen=True)
class _RoutedLogits(TeacherLogits):
    """Each row's logits from its own teacher (`_RoutedRows.head`)."""

    routed: _RoutedRows
    vocab_size: int

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        pieces = []
        for index, part in enumerate(self.routed.parts):
            mine = self.routed.owner[rows] == index
            if part is None or not bool(mine.any()):
                continue
            own_rows = self.routed.local[rows[mine]]
            head = part.head
            logits = head.logits(own_rows) if isinstance(head, TeacherLogits) else head.logits(part.hidden[own_rows])
            pieces.append((mine, logits))
        out = torch.empty(len(rows), self.vocab_size, device=rows.device,
                          dtype=pieces[0][1].dtype if pieces else torch.float32)
        for mine, logits in pieces:
            out[mine] = logits.to(out.dtype)
        return out

    def check_temperature(self, temperature: float) -> None:
        for part in self.routed.parts:
            if part is not None and isinstance(part.head, TeacherLogits):
                part.head.check_temperature(temperature)


@dataclass
class CompletionBatch:
    """One micro-batch of completion tokens as the objective reads it.

    Attributes:
        valid: `[B, C]` bool, the supervised completion tokens.
        completion_ids: `[B, C]` the sampled tokens (what the sampled-token passes score).
        student_hidden: `[B, C, d_S]` the student's last hidden states predicting each completion token (gradient).
        student_head: the student's head (`vocab_size` set to the compared vocabulary).
        teacher: the teacher's signal at the same positions (`LocalTeacher`, `ServedTeacher` or, one teacher per row,
            `RoutedTeacher`).
        is_guided: optional `[B]` bool, the EDGE-OPD guided rows (for the evidence statistics).
        representation: OPRD's captured states, when the trainer captured them.
        anchor_advantages: optional `[B]` AAPA advantages (0 for rows without the term), when the trainer scored
            the rollouts.
    """

    valid: torch.Tensor
    completion_ids: torch.Tensor
    student_hidden: torch.Tensor
    student_head: OutputHead
    teacher: LocalTeacher | ServedTeacher | RoutedTeacher
    is_guided: torch.Tensor | None = None
    representation: RepresentationStates | None = None
    anchor_advantages: torch.Tensor | None = None


@dataclass
class ObjectiveOutput:
    """(loss, entropy sum, trained token count) as `trl.DistillationTrainer._compute_loss` returns them, and stats."""

    loss: torch.Tensor
    entropy_sum: torch.Tensor
    num_tokens: torch.Tensor
    stats: Stats = field(default_factory=dict)


def stash(stats: Stats, name: str, total, count) -> None:
    stats[name] = (torch.as_tensor(total).float(), torch.as_tensor(count).float())


def scatter(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[N] values at the valid positions -> [B, C] (zeros elsewhere)."""
    full = values.new_zeros(valid.shape)
    full[valid] = values
    return full


def _stash_per_teacher(stats: Stats, teacher: RoutedTeacher, rows: torch.Tensor, per_token: torch.Tensor,
                       key: str) -> None:
    """Per routed teacher: its mean per-token value `teachers/<name>/<key>` and its share of the trained tokens."""
    owner = teacher.owner.to(rows.device).unsqueeze(1).expand_as(rows)[rows]
    for index, name in enumerate(teacher.names):
        mine = owner == index
        stash(stats, f"teachers/{name}/{key}", per_token[mine].sum(), mine.sum())
        stash(stats, f"teachers/{name}/token_share", mine.sum(), rows.sum())


# ------------------------------------------------------------------ pieces built from the config


@dataclass(frozen=True)
class Divergence:
    """The per-token divergence of the loss (methods.md §0.3–§0.5, §1) and its temperature T_d."""

    divergence: str = "reverse_kl"
    beta: float = 0.5
    alpha: float = 0.1
    temperature: float = 1.0
    top_k: int | None = None
    top_k_source: str = "student"
    top_k_tail: bool = False
    clip: float | None = None

    def kwargs(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ChunkPolicy:
    """How many completion tokens each pass over the LM heads takes at a time."""

    loss_chunk_size: int = 1024
    token_scoring_chunk_size: int | None = None
    token_ratio: float = 1.0

    def loss_tokens(self, num_tokens: int, vocab: int) -> int:
        """Tokens per chunk of every pass over the heads at the completion tokens (loss, entropy, sampled-token and
        evidence log-probs, diagnostics): at most `loss_chunk_size`, and few enough that one chunk's [tokens, V]
        logits hold no more entries than the vocabulary tile TRL's `ChunkedDivergenceFunction` holds for the same
        batch, min(N, 4,096) × min(V, 32,768). The full-vocabulary softmax of the fused loss cannot tile the
        vocabulary, so above 32,768 entries it splits the N tokens about V / 32,768 ways instead. Unchanged for
        V ≤ 32,768 (bench/README.md: at V = 151,936 the peak fell from 0.64 to 0.18 GB)."""
        budget = min(num_tokens, 4096) * min(vocab, 32768)
        return max(1, min(self.loss_chunk_size, budget // vocab))

    def scoring_tokens(self, num_tokens: int, vocab: int) -> int:
        """Tokens per chunk of TIP's no-grad scoring pass: `token_scoring_chunk_size`, else ⌈ρ·c⌉ with c the loss's
        chunk on all tokens, so neither pass holds more than ρ times the all-token loss's logits
        (bench/results/tip_memory_cpu.md)."""
        if self.token_scoring_chunk_size is not None:
            return self.token_scoring_chunk_size
        return max(1, math.ceil(self.token_ratio * self.loss_tokens(num_tokens, vocab)))


def _kernel_arguments(student_hidden, student_head: OutputHead, teacher) -> tuple[tuple, dict]:
    """Positional and keyword arguments of the chunked kernels in `losses` for these rows and heads."""
    teacher_head = teacher.head
    positional = (
        student_head.scaled_hidden(student_hidden),
        student_head.weight,
        teacher_head.scaled_hidden(teacher.hidden),
        teacher_head if isinstance(teacher_head, TeacherLogits) else teacher_head.weight,  # row-indexed: whole
    )
    keywords = {
        "student_bias": student_head.bias,
        "teacher_bias": teacher_head.bias,
        "softcap": student_head.softcap,
        "teacher_softcap": teacher_head.softcap,
        "vocab_size": student_head.vocab_size,
    }
    return positional, keywords


@dataclass(frozen=True)
class TIPSelection:
    """TIP (methods.md §3): score every completion token at T_d, keep a share ρ (or weight by 1/π)."""

    strategy: str  # soft_or | entropy_sample | divergence_only | q3 | ...
    ratio: float
    scope: str
    importance_weighting: bool

    def __call__(self, batch: CompletionBatch, context: _CallContext) -> torch.Tensor:
        valid = batch.valid
        chunk = context.chunks.scoring_tokens(int(valid.sum()), batch.student_head.width)
        positional, keywords = _kernel_arguments(
            batch.student_hidden[valid], batch.student_head, batch.teacher.rows(valid)
        )
        scores = score_tokens(
            *positional, **keywords, **context.divergence.kwargs(), chunk_size=chunk,
            with_forward_kl=self.strategy == "q3",
        )
        entropy, divergence = scatter(scores.student_entropy, valid), scatter(scores.divergence, valid)
        count = valid.sum()
        for quadrant, share in tip_quadrants(entropy, divergence, valid).items():
            stash(context.stats, f"tip/{quadrant}_share", count * share, count)
        selection = {"ratio": self.ratio, "scope": self.scope}
        if self.strategy == "entropy_sample":
            selection["generator"] = context.generator(valid.device)
        if self.importance_weighting:
            return tip_importance_sample(entropy, valid, **selection)[1]
        forward_kl = None if scores.forward_kl is None else scatter(scores.forward_kl, valid)
        return tip_mask(entropy, divergence, valid, strategy=self.strategy, forward_divergence=forward_kl,
                        **selection)


@dataclass(frozen=True)
class PositionWeights:
    """PW-OPSD / IW-OPD position weights (methods.md §4), relative to the whole completion."""

    direction: str
    w_min: float
    tau: float
    slope: float

    def __call__(self, batch: CompletionBatch, context: _CallContext) -> torch.Tensor:
        return position_weights(batch.valid, w_min=self.w_min, tau=self.tau, slope=self.slope,
                                direction=self.direction)


@dataclass(frozen=True)
class EvidenceMask:
    """EDGE-OPD evidence mask (methods.md §5.2) from both models' log-probs of the sampled tokens at T_d."""

    mode: str
    threshold: float
    quantile: float

    def __call__(self, batch: CompletionBatch, context: _CallContext) -> torch.Tensor:
        valid = batch.valid
        student_logprobs, teacher_logprobs = context.sampled_logprobs(batch, valid)
        student_logprobs, teacher_logprobs = scatter(student_logprobs, valid), scatter(teacher_logprobs, valid)
        kept = evidence_mask(teacher_logprobs, student_logprobs, valid, mode=self.mode, threshold=self.threshold,
                             quantile=self.quantile)
        self._stash(context.stats, teacher_logprobs - student_logprobs, kept, valid, batch.is_guided)
        return kept

    @staticmethod
    def _stash(stats: Stats, evidence, kept, valid, is_guided) -> None:
        """Mean evidence and kept share, overall and (with guided rollouts) for guided and plain rows apart."""
        stash(stats, "evidence/mean", evidence[valid].sum(), valid.sum())
        stash(stats, "evidence/kept_share", kept.sum(), valid.sum())
        if is_guided is None:
            return
        for name, rows in (("guided", is_guided.bool()), ("unguided", ~is_guided.bool())):
            rows_valid = valid & rows.to(valid.device).unsqueeze(1)
            stash(stats, f"evidence/kept_share_{name}", (kept & rows_valid).sum(), rows_valid.sum())


@dataclass(frozen=True)
class Diagnostics:
    """OPD-dynamics diagnostics (methods.md §7.1) of the valid tokens in one no-grad chunked pass at T_d: top-k
    overlap statistics, TIP's quadrant shares (when TIP is off; otherwise its own pass logs them) and, with a top-k
    loss support, both sides' support masses."""

    top_k: int

    @torch.no_grad()
    def __call__(self, batch: CompletionBatch, context: _CallContext) -> None:
        valid, divergence = batch.valid, context.divergence
        overlap = OverlapAccumulator(k=self.top_k, temperature=divergence.temperature)
        student_rows, teacher = batch.student_hidden[valid].detach(), batch.teacher.rows(valid)
        entropy, per_token, support_mass = [], [], ([], [])
        chunk = context.chunks.loss_tokens(student_rows.shape[0], batch.student_head.width)
        for start in range(0, student_rows.shape[0], chunk):
            rows = slice(start, start + chunk)
            student_logits = batch.student_head.logits(student_rows[rows]).float()
            teacher_logits = teacher.head.logits(teacher.hidden[rows]).float()
            student_entropy = overlap.update(student_logits, teacher_logits)  # H(p_S) at T_d, as TIP scores it
            if not context.tip_on:
                entropy.append(student_entropy.float())
                per_token.append(per_token_divergence(student_logits, teacher_logits, **divergence.kwargs()))
            if divergence.top_k is not None:
                masses = top_k_mass(student_logits, teacher_logits, top_k=divergence.top_k,
                                    top_k_source=divergence.top_k_source, temperature=divergence.temperature)
                for pieces, mass in zip(support_mass, masses):
                    pieces.append(mass)
        stats, count = context.stats, valid.sum()
        for key, (total, key_count) in overlap.sums_and_counts(student_rows.device).items():
            stash(stats, f"diagnostics/{key}", total, key_count)
        if not context.tip_on:
            if not entropy:  # no valid token on this process: the shares are 0 with count 0
                entropy = per_token = [student_rows.new_zeros(0, dtype=torch.float32)]
            shares = tip_quadrants(scatter(torch.cat(entropy), valid), scatter(torch.cat(per_token), valid), valid)
            for quadrant, share in shares.items():
                stash(stats, f"tip/{quadrant}_share", count * share, count)
        if divergence.top_k is not None:
            for side, pieces in zip(("student", "teacher"), support_mass):
                total = torch.cat(pieces).sum() if pieces else count.new_zeros((), dtype=torch.float32)
                stash(stats, f"diagnostics/loss_support_{side}_mass", total, count)


@dataclass(frozen=True)
class RepresentationTerm:
    """μ · L_OPRD (methods.md §6): mean over the selected layers of the per-layer representation loss, after the
    projector. `layer_names` are the student layer indices the per-layer losses are logged under."""

    weight: float
    normalize: bool
    layer_names: tuple[int, ...] = ()

    def __call__(self, states: RepresentationStates, stats: Stats) -> torch.Tensor:
        projector = states.projector
        device = states.position_mask.device if projector is None else module_device(projector)
        student = [state.to(device) for state in states.student]
        teacher = [state.to(device) for state in states.teacher]
        position_mask = states.position_mask.to(device)
        if isinstance(projector, BridgeProjector):
            student, teacher = projector(student, teacher)
        elif projector is not None:
            student = projector(student)
        per_layer = representation_loss_per_layer(student, teacher, position_mask, normalize=self.normalize)
        self._stash(per_layer.detach(), stats)
        return per_layer.mean()

    def _stash(self, per_layer: torch.Tensor, stats: Stats) -> None:
        one = torch.ones((), device=per_layer.device)
        stash(stats, "oprd/loss", per_layer.mean(), one)
        if len(per_layer) <= MAX_LOGGED_LAYERS:
            for index, value in zip(self.layer_names, per_layer):
                stash(stats, f"oprd/loss_layer{index}", value, one)


@dataclass(frozen=True)
class AnchorTerm:
    """AAPA's anchor term (methods.md §11.3): value 0, gradient −w(t) Σ_{b,t} c_bt A_b ∇log π_θ(ŷ_bt), with the
    staged weight w(t), the batch's advantages A, the token term's reduction c (no weight factors) and log π_θ at the
    sampling temperature. Training micro-batches only (it adds no value, only a gradient)."""

    schedule: AnchorSchedule
    temperature: float

    def __call__(self, batch: CompletionBatch, reduction: str, normalisers: StepNormalisers, step: int,
                 context: _CallContext) -> torch.Tensor | None:
        weight = self.schedule.weight_at(step)
        stash(context.stats, "aapa/weight", weight, 1)
        advantages = batch.anchor_advantages
        if weight == 0 or advantages is None or not normalisers.training:
            return None
        valid = batch.valid
        # Before any early return: `weighted_mean` gathers over processes here.
        coefficients = step_coefficients(reduction, *token_units(valid.float()), None, normalisers)
        advantages = advantages.to(valid.device)
        rows = valid & (advantages != 0).unsqueeze(1)
        if not bool(rows.any()):
            return None
        chunk = context.chunks.loss_tokens(int(rows.sum()), batch.student_head.width)
        logprobs = chunked_token_logprobs(batch.student_hidden[rows], batch.student_head,
                                          batch.completion_ids.to(valid.device)[rows], temperature=self.temperature,
                                          chunk_size=chunk)
        return anchor_policy_loss(scatter(logprobs, rows), advantages, coefficients.reshape(valid.shape),
                                  weight=weight)


@dataclass
class _CallContext:
    """What the pieces of one call share: the options, the stats being filled, the seeded generator."""

    divergence: Divergence
    chunks: ChunkPolicy
    tip_on: bool
    selection_seed: int | None
    stats: Stats = field(default_factory=dict)

    def generator(self, device) -> torch.Generator:
        """Same seed on every process (the trainer derives it from the seed, the step and the micro-step)."""
        return torch.Generator(device=device).manual_seed(int(self.selection_seed or 0))

    def sampled_logprobs(self, batch: CompletionBatch, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) log-probs of the sampled tokens at T_d at the given rows; the student's keeps its graph
        when its hidden states have one."""
        token_ids = batch.completion_ids.to(rows.device)[rows]
        student_hidden = batch.student_hidden[rows]
        kwargs = {
            "temperature": self.divergence.temperature,
            "chunk_size": self.chunks.loss_tokens(len(token_ids), batch.student_head.width),
        }
        student = chunked_token_logprobs(student_hidden, batch.student_head, token_ids, **kwargs)
        teacher = batch.teacher.rows(rows).token_logprobs(token_ids, **kwargs)
        return student, teacher


# ------------------------------------------------------------------ the objective


@dataclass(frozen=True)
class OPDObjective:
    """Weight factors, one reduction and the loss terms of OPDTrainer (see the module docstring).

    Attributes:
        divergence: the per-token divergence and T_d.
        estimator: "analytic" (the divergence through both heads) or a sampled-token estimator (§0.6).
        reduction: one of `reduction.REDUCTIONS`.
        implementation: "fused" or "checkpointed" (analytic estimator only).
        factors: the enabled weight factors, in order.
        logit_weight: multiplies the token term (0 with OPRD: representation only, no LM-head pass).
        representation: the OPRD term, or None.
        diagnostics: the diagnostics pass, or None.
        anchor: the AAPA anchor term, or None.
    """

    divergence: Divergence = Divergence()
    estimator: str = "analytic"
    reduction: str = "token_mean"
    implementation: str = "fused"
    chunks: ChunkPolicy = ChunkPolicy()
    factors: tuple = ()
    logit_weight: float = 1.0
    representation: RepresentationTerm | None = None
    diagnostics: Diagnostics | None = None
    anchor: AnchorTerm | None = None

    @classmethod
    def from_config(cls, args, *, temperature: float | None = None, representation_layers=()) -> OPDObjective:
        """The objective an `OPDConfig` asks for. `temperature`: T_d (default the config's effective one);
        `representation_layers`: the student layers OPRD captures (logged names), when OPRD is on."""
        divergence = Divergence(
            divergence=args.divergence, beta=args.beta, alpha=args.alpha,
            temperature=args.effective_distillation_temperature if temperature is None else temperature,
            top_k=args.loss_top_k, top_k_source=args.loss_top_k_source, top_k_tail=args.loss_top_k_tail,
            clip=args.clip,
        )
        factors = []
        if args.token_selection != "none":
            factors.append(TIPSelection(args.token_selection.removeprefix("tip_"), args.token_ratio,
                                        args.token_selection_scope, args.token_importance_weighting))
        if args.position_weighting != "none":
            factors.append(PositionWeights(args.position_weighting, args.position_w_min, args.position_tau,
                                           args.position_slope))
        if args.evidence_mode != "none":
            factors.append(EvidenceMask(args.evidence_mode, args.evidence_threshold, args.evidence_quantile))
        representation = None
        if args.representation_weight > 0:
            representation = RepresentationTerm(args.representation_weight, args.effective_representation_normalize,
                                                tuple(representation_layers))
        return cls(
            divergence=divergence,
            estimator=args.estimator,
            reduction=args.loss_reduction,
            implementation=args.loss_implementation,
            chunks=ChunkPolicy(args.loss_chunk_size, args.token_scoring_chunk_size, args.token_ratio),
            factors=tuple(factors),
            logit_weight=args.logit_weight,
            representation=representation,
            diagnostics=Diagnostics(args.diagnostics_top_k) if args.diagnostics_steps > 0 else None,
            anchor=AnchorTerm(AnchorSchedule.from_config(args), args.temperature)
            if args.aapa_discriminator_path else None,
        )

    @property
    def uses_heads(self) -> bool:
        """False for representation-only OPRD (logit_weight = 0): no LM-head pass at all."""
        return not (self.representation is not None and self.logit_weight == 0)

    def __call__(
        self,
        batch: CompletionBatch,
        normalisers: StepNormalisers,
        *,
        selection_seed: int | None = None,
        diagnostics: bool = False,
        step: int = 0,
    ) -> ObjectiveOutput:
        """The micro-batch loss Σ c·ℓ (+ μ·L_OPRD, + the AAPA term), entropy sum, trained tokens and stats.

        `diagnostics`: run the diagnostics pass on this micro-batch (the trainer decides when it is due).
        `step`: the optimizer step, for the AAPA schedule.
        """
        context = self._context(selection_seed)
        if self.uses_heads:
            output = self._token_term(batch, normalisers, context, diagnostics)
            output.loss = self.logit_weight * output.loss
        else:
            zero = torch.zeros((), device=batch.valid.device)
            output = ObjectiveOutput(zero, zero, zero)
        if self.representation is not None:
            scale = self.representation.weight
            if normalisers.training:  # the token term is already divided over the accumulation window
                scale = scale / normalisers.accumulation_steps
            output.loss = output.loss + scale * self.representation(batch.representation, context.stats)
        if self.anchor is not None:
            anchor_loss = self.anchor(batch, self.reduction, normalisers, step, context)
            output.loss = output.loss if anchor_loss is None else output.loss + anchor_loss
        output.stats = context.stats
        return output

    @torch.no_grad()
    def token_weights(self, batch: CompletionBatch, *, selection_seed: int | None = None) -> torch.Tensor | None:
        """Only the weight factors: the `[B, C]` product the loss would use (None: uniform weights)."""
        return self._weights(batch, self._context(selection_seed))

    def _context(self, selection_seed: int | None) -> _CallContext:
        tip_on = any(isinstance(factor, TIPSelection) for factor in self.factors)
        return _CallContext(self.divergence, self.chunks, tip_on, selection_seed)

    def _weights(self, batch: CompletionBatch, context: _CallContext) -> torch.Tensor | None:
        return combine_factors([factor(batch, context) for factor in self.factors])

    def diagnose(self, batch: CompletionBatch) -> Stats:
        """Only the diagnostics pass (no loss): its stats, e.g. for a benchmark or an offline analysis."""
        if self.diagnostics is None:
            raise ValueError("This objective has no diagnostics pass: build it with diagnostics=Diagnostics(top_k).")
        context = _CallContext(self.divergence, self.chunks, tip_on=False, selection_seed=None)
        self.diagnostics(batch, context)
        return context.stats

    def _token_term(self, batch, normalisers, context: _CallContext, diagnostics: bool) -> ObjectiveOutput:
        valid = batch.valid
        with torch.no_grad():
            weights = self._weights(batch, context)
            if diagnostics and self.diagnostics is not None:
                self.diagnostics(batch, context)
        rows_of, unit_tokens, row_tokens = token_units(valid.float())
        coefficients = step_coefficients(
            self.reduction, rows_of, unit_tokens, row_tokens, None if weights is None else weights.reshape(-1),
            normalisers,
        ).reshape(valid.shape)
        rows = valid & (coefficients != 0)
        if self.estimator == "analytic":
            loss, per_token, entropy = self._analytic(batch, rows, coefficients[rows], context)
            key = "divergence"
        else:
            loss, per_token, entropy = self._sampled(batch, rows, coefficients[rows], context)
            key = "kl_k1"
        stash(context.stats, f"opd/{key}", per_token.sum(), rows.sum())
        if isinstance(batch.teacher, RoutedTeacher):
            _stash_per_teacher(context.stats, batch.teacher, rows, per_token, key)
        if weights is not None:
            stash(context.stats, "opd/token_weight", weights[valid].float().sum(), valid.sum())
            stash(context.stats, "opd/selected_share", rows.sum(), valid.sum())
        return ObjectiveOutput(loss, entropy.sum().detach(), rows.sum())

    def _analytic(self, batch: CompletionBatch, rows, coefficients, context: _CallContext):
        """Σ c·ℓ over the rows, with ℓ the exact (or top-k) divergence; returns (loss, ℓ detached, entropy)."""
        student_hidden = batch.student_hidden[rows]
        positional, keywords = _kernel_arguments(student_hidden, batch.student_head, batch.teacher.rows(rows))
        chunk = self.chunks.loss_tokens(student_hidden.shape[0], batch.student_head.width)
        keywords.update(self.divergence.kwargs(), chunk_size=chunk)
        if self.implementation == "fused":
            return fused_divergence_loss(*positional, coefficients, **keywords)
        per_token = chunked_token_divergence(*positional, **keywords)
        entropy = chunked_entropy(student_hidden.detach(), batch.student_head,
                                  temperature=self.divergence.temperature, chunk_size=chunk)
        return (coefficients * per_token).sum(), per_token.detach(), entropy

    def _sampled(self, batch: CompletionBatch, rows, coefficients, context: _CallContext):
        """Sampled-token estimators (methods.md §0.6): only log p(ŷ_t) of both models is needed."""
        student_logprobs, teacher_logprobs = context.sampled_logprobs(batch, rows)
        chunk = self.chunks.loss_tokens(int(rows.sum()), batch.student_head.width)
        entropy = chunked_entropy(batch.student_hidden[rows].detach(), batch.student_head,
                                  temperature=self.divergence.temperature, chunk_size=chunk)
        per_token = sampled_token_loss(student_logprobs, teacher_logprobs, self.estimator)
        k1 = sampled_token_kl(student_logprobs.detach(), teacher_logprobs, "k1")
        return (coefficients * per_token).sum(), k1, entropy
