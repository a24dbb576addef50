"""OPRD: on-policy representation distillation (methods.md §6, arXiv 2606.06021).

Pieces a trainer composes in its ``_compute_loss``:

* layer bookkeeping: :func:`resolve_layers` (config forms ``"last" | "all" | "even" | "odd" | [i, ...]``),
  :func:`layer_map` (proportional depth map, Eq. 11), :func:`map_layers` (student → teacher indices),
  :func:`selected_layer_map` (the reference code's map over each side's selected list) and :func:`pair_layers`
  (both sides' indices for a specification, by either map, §6.5 item 9);
* positions: :func:`select_positions` (all supervised positions, or the last k per row, as a compact
  ``[B, K]`` index plus mask);
* capture: :func:`find_decoder_layers` (decoder layer list and final norm, through PEFT / DDP / FSDP /
  ``torch.compile`` wrappers), :class:`HiddenStateCapture` (forward hooks on the selected layers only,
  gathering the selected positions inside the hook) and :func:`capture_hidden_states` (runs the backbone
  without the LM head);
* projection: :class:`RepresentationProjector` (trainable ``Linear(d_S, d_T)`` per layer) and
  :class:`BridgeProjector` / :func:`fit_bridge` (frozen low-rank bridge, §6.2);
* the loss: :func:`representation_loss` and :func:`representation_loss_per_layer` (Eq. 6).

Layer indices follow HF ``hidden_states`` (§6.5 item 2): for a model with L decoder layers, index
i ∈ 1..L−1 is the raw residual-stream output of decoder layer i−1 (0-indexed) and index L is the output
of the final norm (post-final-norm, as ``output_hidden_states=True`` gives it). Index 0 (the embeddings)
is not supported: it carries no computation of the student to distil.

Typical use in a trainer (representation-only mode, the student's LM head is never computed)::

    layers_s, layers_t = pair_layers(args.representation_layers, num_student_layers, num_teacher_layers,
                                     args.representation_layer_map)
    positions, position_mask = select_positions(completion_mask_full, last_k=args.representation_last_k)
    with torch.no_grad():
        teacher_states = capture_hidden_states(teacher, layers_t, positions=positions, grad=False,
                                               input_ids=t_ids, attention_mask=t_mask)
    student_states = capture_hidden_states(student, layers_s, positions=positions,
                                           input_ids=s_ids, attention_mask=s_mask)
    loss = representation_loss(projector(student_states), teacher_states, position_mask)

In the combined mode (OPD + μ·OPRD) wrap the ordinary student forward in ``HiddenStateCapture`` instead, so
the logits and the states come from one forward.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from typing_extensions import Self

LAYER_SPECS = ("last", "all", "even", "odd")
LAYER_MAPS = ("depth", "selected")  # how a student layer finds its teacher layer (pair_layers, §6.5 item 9)

# Attributes under which wrappers keep the wrapped model: DDP / FSDP1 / torch.compile / PEFT / HF heads /
# multimodal models. Searched breadth-first, direct children only.
_WRAPPER_ATTRIBUTES = (
    "module",
    "_fsdp_wrapped_module",
    "_orig_mod",
    "base_model",
    "model",
    "language_model",
    "text_model",
    "transformer",
    "decoder",
)
_LAYER_LIST_ATTRIBUTES = ("layers", "h", "blocks")
_FINAL_NORM_ATTRIBUTES = ("norm", "final_layernorm", "ln_f", "final_norm")


# ---------------------------------------------------------------------------------------------------------
# Layer bookkeeping
# ---------------------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")


def layer_map(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Proportional depth map from student decoder layers to teacher decoder layers (Eq. 11, 0-indexed).

    ``result[l_S]`` is the teacher layer paired with student layer ``l_S``:
    ``torch.linspace(0, L_T − 1, L_S).round()``, i.e. round((l_S)/(L_S − 1) · (L_T − 1)) with round half to
    even, exactly as the reference code computes it (float32 ``linspace`` on the CPU). At exact ties the
    float32 grid can land a hair off the half (e.g. (23, 14)), so the result there follows the reference code
    rather than exact-arithmetic Eq. 11; the two agree wherever the ratio is not an exact half. The first
    layer maps to the first and the last to the last; with ``L_S == 1`` the single layer maps to layer 0.
    """
    _check_positive_int("num_student_layers", num_student_layers)
    _check_positive_int("num_teacher_layers", num_teacher_layers)
    grid = torch.linspace(0, num_teacher_layers - 1, steps=num_student_layers, device="cpu")
    return grid.round().long().tolist()


def resolve_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """Turn a layer specification into HF ``hidden_states`` indices in 1..L (``num_layers`` = L).

    ``"last"`` → [L] (post-final-norm); ``"all"`` → 1..L; ``"even"`` → 1, 3, 5, ... (even 0-indexed decoder
    layers, the reference code's naming); ``"odd"`` → 2, 4, 6, ...; a list of ints (or a comma-separated
    string such as ``"4,8,12"``) is validated and returned in the given order.
    """
    _check_positive_int("num_layers", num_layers)
    if isinstance(spec, str) and spec in LAYER_SPECS:
        first = {"last": num_layers, "all": 1, "even": 1, "odd": 2}[spec]
        step = 1 if spec in ("last", "all") else 2
        return list(range(first, num_layers + 1, step))
    if isinstance(spec, str):
        try:
            spec = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"Unknown layer specification {spec!r}; use one of {LAYER_SPECS} or a list of indices in "
                f"1..{num_layers}."
            ) from None
    layers = list(spec)
    if not layers:
        raise ValueError("The layer list is empty; give at least one index in 1..L, or 'last'.")
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= num_layers:
            raise ValueError(
                f"Layer index {index!r} is out of range: indices follow HF hidden_states, 1..{num_layers} "
                f"for this {num_layers}-layer model ({num_layers} = output of the final norm; 0, the "
                "embeddings, is not distilled)."
            )
    if len(set(layers)) != len(layers):
        raise ValueError(f"Layer list {layers} repeats an index; list each layer once.")
    return layers


def map_layers(student_layers: Sequence[int], num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Teacher ``hidden_states`` index paired with each student index (both 1-indexed, Eq. 11).

    Student index s ∈ 1..L_S pairs with teacher index ``layer_map(L_S, L_T)[s − 1] + 1``; the student's
    post-final-norm index L_S pairs with the teacher's L_T. Equal depths give the identity.
    """
    mapping = layer_map(num_student_layers, num_teacher_layers)
    student_layers = resolve_layers(list(student_layers), num_student_layers)
    return [mapping[index - 1] + 1 for index in student_layers]


def selected_layer_map(num_student_selected: int, num_teacher_selected: int) -> list[int]:
    """Position in the teacher's selected list of each position in the student's (0-indexed): the reference code's
    proportional map over the two selected lists (`get_proportional_layer_indices`).

    Equal lengths: the identity; one student layer: the teacher's last; one teacher layer: all to it; otherwise
    ``torch.linspace(0, n_T − 1, n_S).round()`` (float32 grid, round half to even), i.e. the i-th selected student
    layer pairs with the teacher's layer at the same relative rank i/(n_S − 1) in the teacher's own list.
    """
    _check_positive_int("num_student_selected", num_student_selected)
    _check_positive_int("num_teacher_selected", num_teacher_selected)
    if num_student_selected == num_teacher_selected:
        return list(range(num_student_selected))
    if num_student_selected == 1:
        return [num_teacher_selected - 1]
    return layer_map(num_student_selected, num_teacher_selected)  # one teacher layer: linspace(0, 0, n) = zeros


def pair_layers(
    spec: str | Sequence[int], num_student_layers: int, num_teacher_layers: int, convention: str = "depth"
) -> tuple[list[int], list[int]]:
    """(student indices, teacher indices) distilled for a layer specification (HF ``hidden_states``, 1-indexed).

    ``convention="depth"`` (trl_opd's default): the student's layers of ``spec`` and, for each, the teacher layer
    at the same relative depth over all layers (:func:`map_layers`, Eq. 11). ``"selected"`` (the reference code):
    each side resolves ``spec`` on its own depth (``"even"`` → the teacher's own 1, 3, 5, ...) and the i-th student
    layer pairs with the teacher's layer at the same relative rank in that list (:func:`selected_layer_map`); only
    for the named specifications, since an explicit list of student indices gives the teacher no list. The two
    agree for ``"all"`` and ``"last"`` (and at equal depths) except with a one-layer student, and differ for
    ``"even"``/``"odd"`` across depths (§6.5 item 9).
    """
    if convention not in LAYER_MAPS:
        raise ValueError(f"Unknown layer map {convention!r}; choose one of {LAYER_MAPS}.")
    student_layers = resolve_layers(spec, num_student_layers)
    if convention == "depth":
        return student_layers, map_layers(student_layers, num_student_layers, num_teacher_layers)
    if not (isinstance(spec, str) and spec in LAYER_SPECS):
        raise ValueError(
            f"The 'selected' layer map pairs each side's own {LAYER_SPECS} list; the explicit student layers "
            f"{student_layers} give the teacher no list. Use the 'depth' map (Eq. 11) for explicit indices."
        )
    teacher_list = resolve_layers(spec, num_teacher_layers)
    ranks = selected_layer_map(len(student_layers), len(teacher_list))
    return student_layers, [teacher_list[rank] for rank in ranks]


# ---------------------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------------------


def select_positions(mask: Tensor, *, last_k: int | None = None) -> tuple[Tensor, Tensor]:
    """Compact index of the positions the loss uses: all supervised positions, or the last k per row.

    Args:
        mask: ``[B, T]`` bool or 0/1 mask over the forward's sequence positions (e.g. the completion mask
            padded on the left with zeros for the prompt).
        last_k: keep only each row's last ``min(k, L_b)`` supervised positions (OPRD's ``last_k``); ``None``
            keeps all.

    Returns:
        ``(positions [B, K], position_mask [B, K])`` with K = the largest kept count: row b's kept positions
        in increasing order, then padding (index 0, mask False). Gathering ``h[b, positions[b]]`` gives the
        compact states the loss consumes with ``position_mask``. Rows with the same completion mask select
        the same completion tokens whatever their prompt length, which pairs student and teacher positions
        when the teacher sees a longer (privileged) prompt (§6.5 item 5).
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T]; got shape {tuple(mask.shape)}.")
    if last_k is not None:
        _check_positive_int("last_k", last_k)
    keep = mask.bool()
    if last_k is not None:
        rank_from_end = keep.sum(dim=1, keepdim=True) - keep.long().cumsum(dim=1)  # 0 at each row's last one
        keep = keep & (rank_from_end < last_k)
    counts = keep.sum(dim=1)
    width = int(counts.max().item()) if counts.numel() else 0
    # A stable sort on "not kept" moves the kept positions to the front, in their original order.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    position_mask = torch.arange(width, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return order.masked_fill(~position_mask, 0), position_mask


# ---------------------------------------------------------------------------------------------------------
# Locating the decoder stack
# ---------------------------------------------------------------------------------------------------------


@dataclass
class DecoderStack:
    """The parts of a causal LM that OPRD hooks.

    Attributes:
        backbone: the module that runs embeddings → decoder layers → final norm and stops there (e.g.
            ``Qwen3Model``); calling it never computes the LM head.
        layers: the decoder layers, in order (``hidden_states`` index i ∈ 1..L−1 is the output of
            ``layers[i − 1]``).
        final_norm: the final norm (``hidden_states`` index L is its output).
    """

    backbone: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _as_decoder_stack(module: nn.Module) -> DecoderStack | None:
    children = module._modules
    layers = next(
        (children[name] for name in _LAYER_LIST_ATTRIBUTES if isinstance(children.get(name), nn.ModuleList)),
        None,
    )
    norm = next(
        (children[name] for name in _FINAL_NORM_ATTRIBUTES if isinstance(children.get(name), nn.Module)), None
    )
    if layers is None or norm is None or len(layers) == 0:
        return None
    return DecoderStack(backbone=module, layers=layers, final_norm=norm)


def find_decoder_layers(model: nn.Module) -> DecoderStack:
    """Locate the decoder layer list and final norm of a causal LM, through any wrappers.

    Searches breadth-first from ``model`` through PEFT's ``get_base_model()`` and the usual wrapper attributes
    (``module``, ``base_model``, ``model``, ``language_model``, ``transformer``, ...) for the first module
    that directly owns a non-empty ``nn.ModuleList`` named ``layers`` / ``h`` / ``blocks`` and a final norm
    named ``norm`` / ``final_layernorm`` / ``ln_f`` / ``final_norm``. Covers Qwen2/Qwen3/Llama/Mistral/Gemma
    (``model.model``), GPT-2 (``transformer``), multimodal wrappers (``language_model``), ``PeftModel``
    (LoRA), DDP, FSDP1 and ``torch.compile``.
    """
    queue, seen = [model], set()
    while queue:
        module = queue.pop(0)
        if id(module) in seen:
            continue
        seen.add(id(module))
        stack = _as_decoder_stack(module)
        if stack is not None:
            return stack
        get_base_model = getattr(module, "get_base_model", None)
        if callable(get_base_model):
            queue.append(get_base_model())
        queue.extend(
            module._modules[name]
            for name in _WRAPPER_ATTRIBUTES
            if isinstance(module._modules.get(name), nn.Module)
        )
    raise ValueError(
        f"Cannot find the decoder layers of {type(model).__name__}: expected a submodule (reachable through "
        f"{', '.join(_WRAPPER_ATTRIBUTES)}) that owns a ModuleList named one of {_LAYER_LIST_ATTRIBUTES} "
        f"and a final norm named one of {_FINAL_NORM_ATTRIBUTES}. Representation distillation needs a "
        "decoder-only transformer with accessible layers."
    )


# ---------------------------------------------------------------------------------------------------------
# Hidden-state capture
# ---------------------------------------------------------------------------------------------------------


class HiddenStateCapture:
    """Context manager that records the hidden states of selected layers with forward hooks.

    Hooks go on the selected decoder layers only (and on the final norm for index L), so the states of the
    other layers are freed as usual. With ``positions`` each hook gathers the requested positions at once and
    keeps only ``[B, K, d]``; the full ``[B, T, d]`` output of a hooked layer lives no longer than the forward
    needs it. The captured tensors stay in the autograd graph: gradients reach the student through them (the
    hooks run outside transformers' activation checkpoints, so this holds with gradient checkpointing too);
    run the teacher's forward under ``torch.no_grad()`` so nothing is recorded for it.

    Args:
        model: a causal LM or any wrapper :func:`find_decoder_layers` understands.
        layers: HF ``hidden_states`` indices in 1..L (see :func:`resolve_layers`), in the order ``states``
            returns them.
        positions: ``None`` (keep all positions), a ``[B, K]`` integer index into the sequence dimension (from
            :func:`select_positions`), or a ``[B, T]`` bool mask (converted with :func:`select_positions`; its
            compact mask is then in ``position_mask``).

    Each forward overwrites the states of the previous one; remove the hooks (leave the ``with`` block) before
    running the model for anything else. Example::

        with HiddenStateCapture(student, [7, 14, 28], positions=positions) as capture:
            logits = student(input_ids=ids, attention_mask=mask).logits
        states = capture.states          # list of [B, K, d], in the order of `layers`
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], positions: Tensor | None = None):
        self.stack = find_decoder_layers(model)
        self.layers = resolve_layers(list(layers), self.stack.num_layers)
        self.position_mask: Tensor | None = None
        if positions is not None and positions.dtype == torch.bool:
            positions, self.position_mask = select_positions(positions)
        if positions is not None and (positions.dim() != 2 or positions.dtype.is_floating_point):
            raise ValueError(
                "positions must be a [B, K] integer index or a [B, T] bool mask; got "
                f"{tuple(positions.shape)} of dtype {positions.dtype}."
            )
        self.positions = positions
        self._largest_position: int | None = None
        self._captured: dict[int, Tensor] = {}
        self._handles: list = []

    def _module_for(self, index: int) -> nn.Module:
        return self.stack.final_norm if index == self.stack.num_layers else self.stack.layers[index - 1]

    def _keep(self, hidden: Tensor) -> Tensor:
        if self.positions is None:
            return hidden
        batch, length, width = hidden.shape
        if self.positions.size(0) != batch:
            raise ValueError(
                f"positions has {self.positions.size(0)} rows but the forward has batch size {batch}."
            )
        if self._largest_position is None:  # checked once, not once per hooked layer (a device sync each)
            self._largest_position = int(self.positions.max()) if self.positions.numel() else -1
        if self._largest_position >= length:
            raise ValueError(
                f"positions index up to {self._largest_position} but the forward has only {length} positions."
            )
        index = self.positions.to(hidden.device).unsqueeze(-1).expand(-1, -1, width)
        return hidden.gather(1, index)

    def _hook_for(self, index: int):
        def hook(module, args, output):
            # Decoder layers return a tensor in transformers ≥ 5 and a tuple (hidden, ...) in older versions.
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            self._captured[index] = self._keep(hidden)

        return hook

    def __enter__(self) -> Self:
        self._captured.clear()
        self._handles = [
            self._module_for(index).register_forward_hook(self._hook_for(index)) for index in self.layers
        ]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def states(self) -> list[Tensor]:
        """Captured states, one ``[B, K, d]`` (or ``[B, T, d]``) tensor per requested layer, in order."""
        missing = [index for index in self.layers if index not in self._captured]
        if missing:
            raise RuntimeError(
                f"No hidden states captured for layers {missing}: run the model's forward inside the `with` "
                "block."
            )
        return [self._captured[index] for index in self.layers]


@dataclass
class RepresentationStates:
    """OPRD's captured states: per selected layer `[B, K, d_S]` / `[B, K, d_T]`, a `[B, K]` mask, the projector."""

    student: list[Tensor]
    teacher: list[Tensor]
    position_mask: Tensor
    projector: nn.Module | None = None


@dataclass
class CaptureRequest:
    """Hidden states a trainer wants captured during one micro-batch: a capture to arm around the student's forward,
    one around the teacher's, and the `[B, K]` mask of the captured positions. The default captures nothing (its
    context managers do nothing and `states()` is None); the trainer enters each around that model's forward, so with
    a PEFT self-teacher (the same modules for both roles) only one capture is armed at a time."""

    student_capture: HiddenStateCapture | None = None
    teacher_capture: HiddenStateCapture | None = None
    position_mask: Tensor | None = None
    projector: nn.Module | None = None

    @property
    def student(self):
        return self.student_capture if self.student_capture is not None else contextlib.nullcontext()

    @property
    def teacher(self):
        return self.teacher_capture if self.teacher_capture is not None else contextlib.nullcontext()

    def states(self):
        """The captured states as the objective's `RepresentationStates`, or None when nothing was requested."""
        if self.student_capture is None:
            return None
        return RepresentationStates(
            self.student_capture.states, self.teacher_capture.states, self.position_mask, self.projector
        )


def capture_hidden_states(
    model: nn.Module,
    layers: Sequence[int],
    *,
    positions: Tensor | None = None,
    grad: bool = True,
    **forward_kwargs,
) -> list[Tensor]:
    """Run only the backbone of ``model`` (no LM head) and return the states of ``layers``.

    This is the representation-only path (§6.6 item 1): the forward stops at the final norm, so no
    vocabulary-sized tensor is ever computed. ``grad=False`` runs under ``torch.no_grad()`` (the teacher).
    ``forward_kwargs`` go to the backbone (``input_ids``, ``attention_mask``, ``position_ids``, ...);
    ``use_cache`` defaults to False. Returns a list of ``[B, K, d]`` tensors in the order of ``layers``.
    """
    capture = HiddenStateCapture(model, layers, positions=positions)
    forward_kwargs.setdefault("use_cache", False)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()), capture:
        capture.stack.backbone(**forward_kwargs)
    return capture.states


# ---------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------


def _check_hidden_lists(
    student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], mask: Tensor
) -> None:
    if len(student_hidden) == 0 or len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            "Need one teacher state per student state and at least one layer; got "
            f"{len(student_hidden)} student and {len(teacher_hidden)} teacher layers."
        )
    for layer, (student, teacher) in enumerate(zip(student_hidden, teacher_hidden)):
        if student.dim() != 3:
            raise ValueError(f"Layer {layer}: hidden states must be [B, T, d]; got {tuple(student.shape)}.")
        if student.shape[-1] != teacher.shape[-1]:
            raise ValueError(
                f"Layer {layer}: student width {student.shape[-1]} != teacher width {teacher.shape[-1]}. "
                "Project the student states first (RepresentationProjector, or BridgeProjector for a frozen "
                "low-rank map)."
            )
        if student.shape != teacher.shape:
            raise ValueError(
                f"Layer {layer}: student states {tuple(student.shape)} and teacher states "
                f"{tuple(teacher.shape)} must have the same shape (select the same positions on both sides)."
            )
        if mask.shape != student.shape[:2]:
            raise ValueError(f"mask {tuple(mask.shape)} must be [B, T] = {tuple(student.shape[:2])}.")


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer."""
    return next(itertools.chain(module.parameters(), module.buffers())).device


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    # bf16 / fp16 states are upcast; fp64 (tests) stays fp64.
    return torch.promote_types(tensor.dtype, torch.float32)


def representation_loss_per_layer(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    mask: Tensor,
    *,
    normalize: bool = False,
) -> Tensor:
    """OPRD loss of each layer: the masked token mean of the per-dimension squared error (Eq. 6).

    ℓ_l = Σ_{b,t} m_{b,t} · (1/d) ‖h^(l)_S,b,t − sg(h^(l)_T,b,t)‖² / Σ_{b,t} m_{b,t}

    (0 when the mask is empty).

    Args:
        student_hidden: list of ``[B, T, d]`` student states (projected to the teacher width if needed).
        teacher_hidden: list of ``[B, T, d]`` teacher states; detached here: gradients reach the student only.
        mask: ``[B, T]`` 0/1 (or bool) mask of the positions that count.
        normalize: L2-normalise both states over d first (the OPRD-Bridge loss, Eq. 15, with the reference
            code's 1/d per-dimension mean; the loss is then tiny: raise the coefficient ~10–1000×).

    Returns:
        ``[num_layers]`` tensor, computed in (at least) float32.
    """
    _check_hidden_lists(student_hidden, teacher_hidden, mask)
    losses = []
    for student, teacher in zip(student_hidden, teacher_hidden):
        dtype = _compute_dtype(student)
        student, teacher = student.to(dtype), teacher.detach().to(device=student.device, dtype=dtype)
        if normalize:
            student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
        weights = mask.to(device=student.device, dtype=dtype)
        per_token = (student - teacher).pow(2).mean(dim=-1)
        losses.append((per_token * weights).sum() / weights.sum().clamp(min=1.0))
    return torch.stack(losses)


def representation_loss(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    mask: Tensor,
    *,
    normalize: bool = False,
) -> Tensor:
    """OPRD loss (Eq. 6): :func:`representation_loss_per_layer` averaged over layers; a scalar.

    Shapes: lists of ``[B, T, d]`` and a ``[B, T]`` mask; see :func:`representation_loss_per_layer`.
    The reduction is the reference code's: a masked token mean over the micro-batch per layer (§6.5 item 4).
    """
    return representation_loss_per_layer(student_hidden, teacher_hidden, mask, normalize=normalize).mean()


# ---------------------------------------------------------------------------------------------------------
# Projectors
# ---------------------------------------------------------------------------------------------------------


class RepresentationProjector(nn.Module):
    """Trainable per-layer ``Linear(d_S → d_T, bias=False)`` for students narrower or wider than the teacher.

    The reference code's ``rep_projector_mode=full`` (§6.1). Attach it as a submodule of the student model
    (``student.add_module("oprd_projector", projector)``) so the optimizer, DDP/FSDP gradient synchronisation,
    gradient clipping and checkpoints all include it (§6.5 item 7). Weights follow PyTorch's default ``Linear``
    initialisation, drawn from a generator seeded with ``seed`` rather than the global RNG (§6.5 item 10): every
    process builds the same projector whatever its RNG state (TRL reseeds per process before a subclass builds it,
    and FSDP2, unlike DDP, keeps each rank's shard of its own weights). ``forward`` takes and returns a list of
    ``[..., d]`` tensors, one per mapped layer; inputs are cast to the projector's dtype.
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_layers: int, seed: int = 0):
        super().__init__()
        for name, value in (
            ("student_dim", student_dim),
            ("teacher_dim", teacher_dim),
            ("num_layers", num_layers),
        ):
            _check_positive_int(name, value)
        self.projections = nn.ModuleList(
            nn.Linear(student_dim, teacher_dim, bias=False, device="meta") for _ in range(num_layers)
        )
        generator = torch.Generator().manual_seed(seed)
        for projection in self.projections:
            weight = torch.empty(teacher_dim, student_dim)
            # nn.Linear.reset_parameters' distribution: U(-1/sqrt(d_S), 1/sqrt(d_S)).
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            projection.weight = nn.Parameter(weight)

    def forward(self, student_hidden: Sequence[Tensor]) -> list[Tensor]:
        if len(student_hidden) != len(self.projections):
            raise ValueError(
                f"Got {len(student_hidden)} layers of states for a projector built for "
                f"{len(self.projections)}."
            )
        return [proj(hidden.to(proj.weight.dtype)) for proj, hidden in zip(self.projections, student_hidden)]


def _as_float64_rows(states: Tensor, name: str, width: int) -> Tensor:
    if states.dim() != 2 or states.shape[1] != width:
        raise ValueError(
            f"{name} must be [N, {width}] (flatten the supervised positions: h[mask]); got "
            f"{tuple(states.shape)}."
        )
    return states.detach().to(device="cpu", dtype=torch.float64)


def _top_eigenvectors(centred: Tensor, rank: int) -> Tensor:
    """Top-``rank`` eigenvectors (rows, by decreasing eigenvalue) of the covariance of centred rows."""
    covariance = centred.T @ centred / centred.shape[0]
    _, eigenvectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    top = eigenvectors[:, -rank:].flip(-1).T
    # Eigenvectors are defined up to sign: make each one's largest-magnitude entry positive (reproducible).
    pivot = top.gather(1, top.abs().argmax(dim=1, keepdim=True))
    return top * torch.sign(pivot)


class BridgeProjector(nn.Module):
    """Frozen low-rank bridge between student and teacher states (OPRD-Bridge, §6.2, Eq. 12–15).

    Per mapped layer l: ``P_T[l] ∈ ℝ^{r×d_T}`` holds the top-r principal directions of the teacher's centred
    states, ``mean[l] = μ_T``, and ``P_S[l] ∈ ℝ^{r×d_S}`` maps raw (uncentred) student states into the same
    r-dimensional coordinates. All are buffers (saved in ``state_dict``, never trained, moved with ``.to``).

    Fit it with :func:`fit_bridge` (or :meth:`fit_teacher` then :meth:`fit_student`). Using it unfitted
    raises, unless ``allow_random_projector=True``: then ``P_S`` is a fixed seeded Gaussian (entries
    N(0, 1/d_S)), the reference code's behaviour without a Stage-1 checkpoint (§6.5 item 8); the teacher
    PCA must still be fitted.

    ``forward(student_hidden, teacher_hidden)`` returns ``(P_S h_S, P_T (h_T − μ_T))`` per layer, ready for
    ``representation_loss(..., normalize=True)`` (Eq. 15).
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        num_layers: int,
        rank: int,
        *,
        allow_random_projector: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        for name, value in (
            ("student_dim", student_dim),
            ("teacher_dim", teacher_dim),
            ("num_layers", num_layers),
            ("rank", rank),
        ):
            _check_positive_int(name, value)
        if rank > teacher_dim:
            raise ValueError(f"rank={rank} cannot exceed the teacher width {teacher_dim}.")
        self.allow_random_projector = allow_random_projector
        generator = torch.Generator().manual_seed(seed)
        random_student = torch.randn(num_layers, rank, student_dim, generator=generator) / student_dim**0.5
        self.register_buffer("student_projection", random_student)
        self.register_buffer("teacher_projection", torch.zeros(num_layers, rank, teacher_dim))
        self.register_buffer("teacher_mean", torch.zeros(num_layers, teacher_dim))
        self.register_buffer("teacher_fitted", torch.tensor(False))
        self.register_buffer("student_fitted", torch.tensor(False))

    @property
    def rank(self) -> int:
        return self.teacher_projection.shape[1]

    def _check_layer_count(self, states: Sequence[Tensor]) -> None:
        if len(states) != self.teacher_projection.shape[0]:
            raise ValueError(
                f"Got {len(states)} layers of states for a bridge built for "
                f"{self.teacher_projection.shape[0]}."
            )

    @torch.no_grad()
    def fit_teacher(self, teacher_states: Sequence[Tensor], *, max_rows: int = 16384) -> None:
        """Teacher PCA (Eq. 12): μ_T and the top-r eigenvectors of the covariance of the centred states.

        ``teacher_states``: one ``[N, d_T]`` tensor per layer (supervised positions, flattened); only the
        first ``max_rows`` rows are used (the paper's ≤ 16,384). Computed in float64.
        """
        self._check_layer_count(teacher_states)
        for layer, states in enumerate(teacher_states):
            width = self.teacher_projection.shape[2]
            rows = _as_float64_rows(states[:max_rows], f"teacher_states[{layer}]", width)
            if rows.shape[0] <= self.rank:
                raise ValueError(
                    f"teacher_states[{layer}] has {rows.shape[0]} rows; PCA of rank {self.rank} needs "
                    "more rows than the rank."
                )
            mean = rows.mean(dim=0)
            self.teacher_mean[layer] = mean.to(self.teacher_mean)
            self.teacher_projection[layer] = _top_eigenvectors(rows - mean, self.rank).to(
                self.teacher_projection
            )
        self.teacher_fitted.fill_(True)

    @torch.no_grad()
    def fit_student(self, student_states: Sequence[Tensor], teacher_states: Sequence[Tensor]) -> None:
        """Stage 1 (Eq. 13) in closed form: P_S = argmin Σ_t ‖P_S h_S,t − P_T (h_T,t − μ_T)‖².

        Eq. 13 is a linear least-squares problem, separable over layers, so instead of the paper's 20
        epochs of AdamW we solve it exactly: P_Sᵀ = lstsq(H_S, Z_T) with Z_T = (H_T − μ_T) P_Tᵀ, in
        float64 (``gelsd``, the minimum-norm solution when H_S is rank-deficient). Student states are
        not centred, as in Eq. 14. Rows of ``student_states[l]`` and ``teacher_states[l]`` (``[N, d]``
        each) are the same positions.
        """
        if not bool(self.teacher_fitted):
            raise ValueError("Fit the teacher PCA first (fit_teacher), or use fit_bridge to fit both.")
        self._check_layer_count(student_states)
        self._check_layer_count(teacher_states)
        for layer, (student, teacher) in enumerate(zip(student_states, teacher_states)):
            student = _as_float64_rows(student, f"student_states[{layer}]", self.student_projection.shape[2])
            targets = self._teacher_coordinates(
                layer, _as_float64_rows(teacher, f"teacher_states[{layer}]", self.teacher_projection.shape[2])
            )
            if student.shape[0] != targets.shape[0]:
                raise ValueError(
                    f"Layer {layer}: {student.shape[0]} student rows but {targets.shape[0]} teacher "
                    "rows; pass the same positions on both sides."
                )
            solution = torch.linalg.lstsq(student, targets, driver="gelsd").solution  # [d_S, r]
            self.student_projection[layer] = solution.T.to(self.student_projection)
        self.student_fitted.fill_(True)

    def _teacher_coordinates(self, layer: int, teacher: Tensor) -> Tensor:
        projection = self.teacher_projection[layer].to(device=teacher.device, dtype=teacher.dtype)
        mean = self.teacher_mean[layer].to(device=teacher.device, dtype=teacher.dtype)
        return (teacher - mean) @ projection.T

    def _check_ready(self) -> None:
        if not bool(self.teacher_fitted):
            raise ValueError(
                "BridgeProjector is not fitted: call fit_bridge (or fit_teacher) on captured states, or "
                "load a fitted state_dict."
            )
        if not bool(self.student_fitted) and not self.allow_random_projector:
            raise ValueError(
                "BridgeProjector's student projection P_S is not fitted, so it would stay random while "
                "frozen. Fit it (fit_bridge / fit_student, Stage 1), load a Stage-1 state_dict, or pass "
                "allow_random_projector=True to accept a random P_S."
            )

    def project_student(self, student_hidden: Sequence[Tensor]) -> list[Tensor]:
        """``P_S h`` per layer: ``[..., d_S]`` → ``[..., r]`` (differentiable in h, P_S frozen)."""
        self._check_ready()
        self._check_layer_count(student_hidden)
        return [
            hidden.to(proj.dtype) @ proj.T for proj, hidden in zip(self.student_projection, student_hidden)
        ]

    def project_teacher(self, teacher_hidden: Sequence[Tensor]) -> list[Tensor]:
        """``P_T (h − μ_T)`` per layer: ``[..., d_T]`` → ``[..., r]``."""
        self._check_ready()
        self._check_layer_count(teacher_hidden)
        return [
            self._teacher_coordinates(layer, hidden.to(self.teacher_projection.dtype))
            for layer, hidden in enumerate(teacher_hidden)
        ]

    def forward(self, student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor]):
        return self.project_student(student_hidden), self.project_teacher(teacher_hidden)

    @torch.no_grad()
    def alignment_cosine(self, student_states: Sequence[Tensor], teacher_states: Sequence[Tensor]) -> Tensor:
        """Mean cosine between ``P_S h_S`` and ``P_T (h_T − μ_T)`` per layer (the paper's "subspace cosine",
        Stage-1 validation metric). Inputs ``[N, d]`` per layer; returns ``[num_layers]``."""
        pairs = zip(self.project_student(student_states), self.project_teacher(teacher_states))
        return torch.stack([F.cosine_similarity(s.float(), t.float(), dim=-1).mean() for s, t in pairs])


def fit_bridge(
    student_states: Sequence[Tensor],
    teacher_states: Sequence[Tensor],
    rank: int,
    *,
    max_rows: int = 16384,
) -> BridgeProjector:
    """Fit a :class:`BridgeProjector` on captured states: teacher PCA (Eq. 12), P_S by least squares (Eq. 13).

    ``student_states[l]`` ``[N, d_S]`` and ``teacher_states[l]`` ``[N, d_T]`` hold the same N supervised
    positions of mapped layer pair l (flatten captured ``[B, K, d]`` states with the position mask). PCA uses
    the first ``max_rows`` rows; the least squares uses all of them. Returns a frozen, fitted module.
    """
    if len(student_states) == 0 or len(student_states) != len(teacher_states):
        raise ValueError(
            f"Need the same number (≥ 1) of student and teacher layers; got {len(student_states)} and "
            f"{len(teacher_states)}."
        )
    bridge = BridgeProjector(
        student_states[0].shape[-1], teacher_states[0].shape[-1], len(student_states), rank
    )
    bridge.fit_teacher(teacher_states, max_rows=max_rows)
    bridge.fit_student(student_states, teacher_states)
    return bridge
