"""OPRD in the trainer: config fields and a trainer mixin for hidden-state distillation (methods.md §6).

Two pieces that compose with any `OPDTrainer` / `OPDConfig` without editing them:

* `RepresentationArguments`, a dataclass mixin with the OPRD fields (`representation_weight` μ, `logit_weight`,
  layers, positions, projector, bridge) and their validation;
* `RepresentationDistillationMixin`, the trainer side: projector, capture request, Bridge Stage 1, checkpoints.
  The loss `logit_weight · L_OPD + μ · L_OPRD` is `objective.OPDObjective`'s.

    @dataclass
    class OPDConfig(RepresentationArguments, DistillationConfig): ...
    class OPDTrainer(RepresentationDistillationMixin, _OPDTrainerCore): ...

**Which states are paired.** For completion token ŷ_t the loss pairs the student's and the teacher's hidden
states at the position that *predicts* ŷ_t, i.e. sequence index P − 1 + t for a prompt of (padded) width P —
exactly the positions whose logits the OPD loss compares (methods.md §0.8). Each side is sliced from its own
prompt width, so a teacher with a longer (privileged) prompt is paired by completion position (§6.5 item 5).
`representation_position_convention="at_token"` pairs the states *at* ŷ_t instead (index P + t, the reference
code's `hidden_states[:, -R:]`; §6.5 item 9). The positions are the supervised ones (completion mask × tool mask,
the generated EOS included), all of them or each row's last k (`representation_positions`). Layer indices follow
HF `hidden_states` (§6.5 item 2); the teacher's layer of each student layer is the one at the same relative depth
(Eq. 11), or with `representation_layer_map="selected"` the reference code's map over each side's own
`"even"`/`"odd"` list (`representation.pair_layers`).

**No extra forward.** The states are captured by forward hooks (`HiddenStateCapture`) on the selected decoder
layers only, gathering only the selected positions, during the forwards the step runs anyway: in the
combined mode (`logit_weight > 0`) the parent's own student and teacher forwards; in the representation-only
mode (`logit_weight == 0`) only the two backbones run and the student's LM head is never computed.

**Reduction** (§6.5 item 4): per layer, the masked token mean over the micro-batch; then the mean over layers.
The parent reports losses already scaled for gradient accumulation (`loss_is_scaled_for_ga`), so in training
the OPRD term is divided by the number of accumulation steps: the step's gradient is the mean of the
micro-batch means (the reference implementation's reduction), and DDP averages it over processes.

**Different widths.** A trainable `RepresentationProjector` (student → teacher width, one `Linear` per layer)
or a frozen `BridgeProjector` (§6.2) is registered as the submodule `oprd_projector` of the student before the
optimizer exists, so the optimizer updates it, DDP/FSDP synchronise its gradients, gradient clipping covers
it and resumed checkpoints restore it. It is kept out of the saved model weights: `save_model` writes it to
`oprd_projector.safetensors` next to them, so the output directory loads cleanly with
`AutoModelForCausalLM.from_pretrained`; resuming from a checkpoint loads that file back.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..objective import OPDObjective
from ..representation import (
    LAYER_MAPS,
    LAYER_SPECS,
    BridgeProjector,
    CaptureRequest,
    HiddenStateCapture,
    RepresentationProjector,
    RepresentationStates,
    find_decoder_layers,
    module_device,
    pair_layers,
    select_positions,
)
from .served_teacher import ServedCapture

PROJECTOR_NAME = "oprd_projector"
PROJECTOR_FILE = f"{PROJECTOR_NAME}.safetensors"
REPRESENTATION_POSITIONS = ("all", "last_k")
# Which state stands for completion token t: the one predicting it (P − 1 + t) or the one at it (P + t).
POSITION_CONVENTIONS = ("predicting", "at_token")
PROJECTORS = ("auto", "linear", "bridge", "none")


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


def _parse_layer_spec(spec) -> str | list[int]:
    """`"all" | "last" | "even" | "odd"`, or a list of ints (a list, or a comma-separated string)."""
    if isinstance(spec, str) and spec in LAYER_SPECS:
        return spec
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        layers = [int(part) for part in parts if not isinstance(part, str) or part.strip()]
    except (TypeError, ValueError):
        layers = None
    if not layers or any(isinstance(part, (bool, float)) for part in parts):
        raise ValueError(
            f"`representation_layers`={spec!r} is not a layer specification: use one of {LAYER_SPECS} or HF "
            "hidden_states indices of the student, as a list or a comma-separated string such as '7,14,28'."
        )
    return layers


@dataclass
class RepresentationArguments:
    r"""
    OPRD fields (methods.md §6, arXiv 2606.06021), mixed into `OPDConfig`.

    Parameters:
        > Representation distillation: OPRD (methods.md §6)

        representation_weight (`float`, defaults to `0.0`):
            μ, the weight of the OPRD hidden-state loss: the masked mean over completion positions of the
            per-dimension squared error between student and teacher hidden states, averaged over the distilled
            layers (Eq. 6). `0.0` turns OPRD off. The paper uses 1.0 on raw states, 10 with the normalised Bridge
            loss (the README suggests 100–1000 for normalised states). In the combined mode (`logit_weight > 0`)
            with a same-width teacher, keep μ small next to the OPD loss: on the toy testbed
            μ = 0.01 trains like OPD while μ ≥ 0.1 collapses after ~150–250 steps
            (`bench/results/oprd_combined_diagnosis.md`).
        logit_weight (`float`, defaults to `1.0`):
            Weight of the OPD logit loss; the total is `logit_weight · L_OPD + representation_weight · L_OPRD`.
            `0.0` is the representation-only mode of the paper's main results: only the two backbones run and the
            student's LM head is never computed (cheaper; the LM head then gets no gradient). It sets
            `ddp_find_unused_parameters=True` unless you set it, since the LM head (and any layer above the
            highest distilled one) gets no gradient.
        representation_layers (`str`, defaults to `"all"`):
            Distilled student layers as HF `hidden_states` indices (1..L; L = output of the final norm):
            `"all"` (1..L), `"last"` (L), `"even"` (1, 3, 5, ...: even 0-indexed decoder layers, the reference
            code's naming), `"odd"` (2, 4, 6, ...), or explicit indices `"7,14,28"` (a list of ints in Python or
            YAML). Teacher layers follow by `representation_layer_map`.
        representation_layer_map (`str`, defaults to `"depth"`):
            The teacher layer of each distilled student layer. `"depth"`: the one at the same relative depth over
            all layers (Eq. 11, `map_layers`), whatever specification selected the student layer. `"selected"`: the
            reference code's map, for `"all"`/`"last"`/`"even"`/`"odd"` only: the teacher resolves the same
            specification on its own depth and the i-th student layer pairs with the layer at the same relative
            rank in the teacher's list (differs from `"depth"` for `"even"`/`"odd"` across depths, e.g. 28 → 36
            layers; methods.md §6.5 item 9).
        representation_positions (`str`, defaults to `"last_k"`):
            Completion positions distilled: `"all"` supervised positions, or each row's last
            `representation_last_k` (the paper's default; student and teacher diverge most in the tail).
        representation_last_k (`int`, defaults to `2000`):
            k of `"last_k"`: each row keeps its last min(k, L_b) supervised positions.
        representation_position_convention (`str`, defaults to `"predicting"`):
            Which hidden state stands for completion token ŷ_t: `"predicting"`, the state that predicts it
            (index P − 1 + t after a prompt of width P, where the OPD loss reads its logits), or `"at_token"`, the
            state at ŷ_t itself (P + t, the reference code's `hidden_states[:, -R:]`, one position later: it drops
            the state predicting the first token and adds the one after the last; methods.md §6.5 item 9).
        representation_normalize (`bool` or `None`, defaults to `None`):
            L2-normalise both states before the squared error (the OPRD-Bridge loss, Eq. 15; the loss becomes
            much smaller, so raise `representation_weight`). `None` means "yes with `projector="bridge"`, no
            otherwise".
        projector (`str`, defaults to `"auto"`):
            How student states reach the teacher's space. `"linear"`: a trainable `Linear(d_S, d_T)` per layer,
            trained with the student (the reference code's `full` mode). `"bridge"`: the frozen low-rank
            OPRD-Bridge (teacher PCA + least-squares student projection, §6.2), fitted by `train()` (Stage 1, see
            `bridge_fit_prompts`) unless `bridge_path` gives a fitted one. `"none"`: compare
            raw states (widths must match). `"auto"`: `"linear"` when the widths differ, `"none"` otherwise.
        bridge_rank (`int`, defaults to `8`):
            Rank r of the bridge (paper: 8 across architectures, 4 across tokenizers).
        bridge_path (`str` or `None`, defaults to `None`):
            A fitted bridge: an `oprd_projector.safetensors` written by a run with `projector="bridge"` (or
            `BridgeProjector.state_dict()` saved with safetensors).
        bridge_fit_prompts (`int`, defaults to `2000`):
            Without `bridge_path`, `train()` first runs Stage 1 (`trainer.fit_bridge()`): rollouts of the initial
            student on up to this many training prompts (the paper: 2,000), stopping once 16,384 positions are
            captured (the paper's PCA row cap). `0` fits nothing: then an unfitted bridge is an error.
        allow_random_projector (`bool`, defaults to `False`):
            With `projector="bridge"` and no `bridge_path`: skip Stage 1, fit only the teacher PCA on the first
            micro-batch and keep a random, frozen student projection (the reference code's behaviour without a
            Stage-1 checkpoint, §6.5 item 8).
    """

    representation_weight: float = field(
        default=0.0, metadata={"help": "mu, weight of the OPRD hidden-state loss; 0 turns OPRD off."}
    )
    logit_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the OPD logit loss; 0 = representation-only (the student's LM head never runs)."},
    )
    representation_layers: str = field(
        default="all",
        metadata={"help": "Student HF hidden_states indices: all | last | even | odd | '7,14,28'."},
    )
    representation_positions: str = field(
        default="last_k", metadata={"help": "Distilled completion positions: all | last_k."}
    )
    representation_last_k: int = field(default=2000, metadata={"help": "k of representation_positions=last_k."})
    representation_position_convention: str = field(
        default="predicting",
        metadata={"help": "State of completion token t: predicting (index P-1+t, as OPD) | at_token (P+t, reference)."},
    )
    representation_layer_map: str = field(
        default="depth",
        metadata={"help": "Teacher layer per student layer: depth (Eq. 11) | selected (reference: within even/odd)."},
    )
    representation_normalize: bool | None = field(
        default=None,
        metadata={"help": "L2-normalise both states first (Bridge loss). None: True with projector=bridge."},
    )
    projector: str = field(
        default="auto", metadata={"help": "Student-to-teacher map: auto | linear | bridge | none."}
    )
    bridge_rank: int = field(default=8, metadata={"help": "Rank r of the OPRD-Bridge projections."})
    bridge_path: str | None = field(
        default=None, metadata={"help": "File of a fitted bridge (oprd_projector.safetensors)."}
    )
    bridge_fit_prompts: int = field(
        default=2000, metadata={"help": "Stage-1 prompts for fitting the bridge at train() start; 0 = no fit."}
    )
    allow_random_projector: bool = field(
        default=False,
        metadata={"help": "Unfitted bridge: teacher PCA on the first batch, random frozen student projection."},
    )

    def __post_init__(self):
        self.validate_representation_arguments()
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()

    @property
    def representation_only(self) -> bool:
        return self.logit_weight == 0

    @property
    def effective_representation_normalize(self) -> bool:
        if self.representation_normalize is None:
            return self.projector == "bridge"
        return self.representation_normalize

    def validate_representation_arguments(self) -> None:
        """Checks that need no model (layer ranges and widths are checked by the trainer). Idempotent."""
        for name in ("representation_weight", "logit_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if self.representation_weight == 0 and self.logit_weight == 0:
            raise ValueError(
                "`logit_weight=0` and `representation_weight=0` leave no loss: set representation_weight > 0 for "
                "representation-only OPRD, or logit_weight > 0."
            )
        self.representation_layers = _parse_layer_spec(self.representation_layers)
        if self.representation_positions not in REPRESENTATION_POSITIONS:
            raise ValueError(
                f"Unknown `representation_positions`={self.representation_positions!r}; choose 'all' or 'last_k'."
            )
        for name, choices in (("representation_position_convention", POSITION_CONVENTIONS),
                              ("representation_layer_map", LAYER_MAPS)):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"Unknown `{name}`={value!r}; choose one of {', '.join(map(repr, choices))}.")
        if self.representation_layer_map == "selected" and not isinstance(self.representation_layers, str):
            raise ValueError(
                f"representation_layer_map='selected' pairs each model's own {'/'.join(LAYER_SPECS)} list (the "
                f"reference code's map); the explicit student layers {self.representation_layers} give the teacher "
                "no list. Use representation_layer_map='depth' (Eq. 11) with explicit indices."
            )
        for name, smallest in (("representation_last_k", 1), ("bridge_rank", 1), ("bridge_fit_prompts", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
                raise ValueError(f"`{name}` must be an integer >= {smallest}, got {value!r}.")
        self._validate_projector_fields()
        if self.representation_only and self.representation_weight > 0:
            self._validate_representation_only()

    def _validate_projector_fields(self) -> None:
        if self.projector not in PROJECTORS:
            raise ValueError(f"Unknown `projector`={self.projector!r}; choose one of {', '.join(PROJECTORS)}.")
        for name in ("bridge_path", "allow_random_projector"):
            if getattr(self, name) and self.projector != "bridge":
                raise ValueError(f"`{name}` applies to projector='bridge' only; got projector={self.projector!r}.")
        if self.bridge_path is not None and not os.path.isfile(self.bridge_path):
            raise ValueError(
                f"`bridge_path`={self.bridge_path!r} is not a file. Point it to a fitted bridge "
                f"({PROJECTOR_FILE} from a bridge run), or leave it unset and call trainer.fit_bridge()."
            )

    def _validate_representation_only(self) -> None:
        # The logit-side switches that have nothing to act on are refused by `support.refuse_unsupported` (its
        # `logit_weight=0` mode), which every config calls first.
        if getattr(self, "ddp_find_unused_parameters", False) is None:
            # The LM head (and layers above the highest distilled one) get no gradient: DDP must expect that.
            self.ddp_find_unused_parameters = True


# ---------------------------------------------------------------------------------------------------------
# Trainer mixin
# ---------------------------------------------------------------------------------------------------------


def completion_positions(
    loss_mask: torch.Tensor, prompt_width: int, last_k: int | None = None, convention: str = "predicting"
):
    """Indices into a `[prompt ‖ completion]` forward of the states that stand for the supervised completion tokens.

    Args:
        loss_mask: `[B, C]` mask of supervised completion tokens (completions right-padded).
        prompt_width: P, the padded prompt width of this side's sequence (prompts left-padded).
        last_k: keep each row's last min(k, L_b) supervised positions; `None` keeps all.
        convention: `"predicting"`: completion token t is represented by the state that predicts it, at P − 1 + t;
            `"at_token"`: by the state at the token itself, at P + t (the reference code's `hidden_states[:, -R:]`).

    Returns:
        `(positions [B, K], position_mask [B, K])`. Padding entries point at the offset (a valid index) and are
        masked out.
    """
    if convention not in POSITION_CONVENTIONS:
        raise ValueError(f"Unknown position convention {convention!r}; choose one of {POSITION_CONVENTIONS}.")
    offset = prompt_width - 1 if convention == "predicting" else prompt_width
    if offset < 0:
        raise ValueError(f"The prompt width must be >= 1 to predict the first completion token, got {prompt_width}.")
    index, position_mask = select_positions(loss_mask, last_k=last_k)
    return index + offset, position_mask


@dataclass
class _RepresentationPlan:
    """What the trainer distils: set once from the models and the config."""

    student_layers: list[int]
    teacher_layers: list[int]
    last_k: int | None
    position_convention: str
    student_width: int
    teacher_width: int


class RepresentationDistillationMixin:
    """OPRD's part of `OPDTrainer` (methods.md §6): the projector, the capture request, OPRD-Bridge Stage 1 and the
    projector's own checkpoint file. The loss term itself is the objective's (`objective.RepresentationTerm`:
    `logit_weight · L_OPD + μ · L_OPRD`, logging `oprd/loss` and, for up to 8 layers, `oprd/loss_layer{i}` with i
    the student `hidden_states` index).

    It answers the hook points of `_OPDTrainerCore`: `_build_objective` (the layers' names) and `_capture_request`
    (which states to capture around the forwards the step runs anyway), and reads `_student_sequence`,
    `_teacher_sequence`, `_loss_mask`, `_unwrapped_teacher`, `_hidden_states` and `_teacher_hidden_state` for
    Stage 1. See the module docstring for the position pairing, reduction and projector handling.
    """

    # Class-level defaults, so the hook points work even if the parent's constructor already calls them.
    _representation_plan: _RepresentationPlan | None = None
    _representation_projector: nn.Module | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.representation_weight > 0:
            self._setup_representation()
            self.objective = self._build_objective()  # now with the distilled layers' names

    # ------------------------------------------------------------------ setup (before the optimizer exists)

    @property
    def representation_projector(self) -> nn.Module | None:
        """The student → teacher projector (`RepresentationProjector` / `BridgeProjector`), or None."""
        return self._representation_projector

    def _setup_representation(self) -> None:
        args = self.args
        student_stack = find_decoder_layers(self.model)
        teacher_depth, teacher_width = self._teacher_shape()
        student_layers, teacher_layers = pair_layers(args.representation_layers, student_stack.num_layers,
                                                     teacher_depth, args.representation_layer_map)
        self._representation_plan = _RepresentationPlan(
            student_layers=student_layers,
            teacher_layers=teacher_layers,
            last_k=args.representation_last_k if args.representation_positions == "last_k" else None,
            position_convention=args.representation_position_convention,
            student_width=self.model.config.get_text_config().hidden_size,
            teacher_width=teacher_width,
        )
        projector = self._build_projector()
        if projector is not None:
            self._attach_projector(projector)
        self._skip_projector_in_vllm_sync()

    def _teacher_shape(self) -> tuple[int, int]:
        """(decoder layers, hidden size) of the teacher: its module's, or what its server reports."""
        if self._served_teacher is not None:
            info = self._served_teacher.info
            return info["num_layers"], info["hidden_size"]
        try:
            teacher_stack = find_decoder_layers(self._unwrapped_teacher())
        except ValueError as error:
            raise ValueError(f"Teacher: {error}") from None
        return teacher_stack.num_layers, self._unwrapped_teacher().config.get_text_config().hidden_size

    def _build_projector(self) -> nn.Module | None:
        args, plan = self.args, self._representation_plan
        kind = args.projector
        if kind == "auto":
            kind = "none" if plan.student_width == plan.teacher_width else "linear"
        if kind == "none":
            if plan.student_width != plan.teacher_width:
                raise ValueError(
                    f"The student's hidden size is {plan.student_width} and the teacher's {plan.teacher_width}: "
                    "their states cannot be compared without a projector. Set projector='linear' (trainable) or "
                    "'bridge' (frozen low-rank), or 'auto'."
                )
            return None
        if kind == "linear":
            return RepresentationProjector(plan.student_width, plan.teacher_width, len(plan.student_layers),
                                           seed=args.seed)
        bridge = BridgeProjector(
            plan.student_width,
            plan.teacher_width,
            len(plan.student_layers),
            args.bridge_rank,
            allow_random_projector=args.allow_random_projector,
            seed=args.seed,
        )
        if args.bridge_path is not None:
            _load_projector_state(bridge, args.bridge_path)
        return bridge

    def _attach_projector(self, projector: nn.Module) -> None:
        """Register the projector as `model.oprd_projector` (same device and dtype as the student's weights)."""
        reference = self.model.get_input_embeddings().weight
        if isinstance(projector, BridgeProjector):
            projector.to(device=reference.device)  # buffers stay float32: frozen, no optimizer, no FSDP flattening
        else:
            projector.to(device=reference.device, dtype=reference.dtype)
        existing = getattr(self.model, PROJECTOR_NAME, None)
        if existing is not None:
            raise ValueError(
                f"The student already has a submodule `{PROJECTOR_NAME}` (from another trainer?). Pass a fresh "
                "model, or delete it first."
            )
        self.model.add_module(PROJECTOR_NAME, projector)
        self._representation_projector = projector

    def _skip_projector_in_vllm_sync(self) -> None:
        """vLLM's model has no `oprd_projector`: leave it out of the weights pushed after each optimizer step."""
        generation = getattr(self, "vllm_generation", None)
        if generation is None or self._representation_projector is None:
            return
        iterate = generation._iter_named_params

        def model_params_only():
            for name, param in iterate():
                if f"{PROJECTOR_NAME}." not in name:
                    yield name, param

        generation._iter_named_params = model_params_only

    # ------------------------------------------------------------------ the capture request and the bridge

    def _build_objective(self):
        """The objective with OPRD's per-layer losses logged under the student's layer indices."""
        plan = self._representation_plan
        layers = () if plan is None else plan.student_layers
        return OPDObjective.from_config(self.args, temperature=self.distillation_temperature,
                                        representation_layers=layers)

    def _capture_request(self, unwrapped_student, inputs) -> CaptureRequest:
        """One capture per role at the distilled layers and completion positions (each side sliced from its own
        prompt width); the trainer arms each around that model's forward."""
        plan = self._representation_plan
        if plan is None:
            return CaptureRequest()
        completion_width = inputs["completion_ids"].size(1)
        loss_mask = self._loss_mask(inputs)
        student_prompt_width = self._student_sequence(inputs)[0].size(1) - completion_width
        teacher_prompt_width = self._teacher_sequence(inputs)[0].size(1) - completion_width
        student_positions, position_mask = completion_positions(loss_mask, student_prompt_width, plan.last_k,
                                                                plan.position_convention)
        teacher_positions, _ = completion_positions(loss_mask, teacher_prompt_width, plan.last_k,
                                                    plan.position_convention)
        return _BridgeFittingRequest(
            student_capture=HiddenStateCapture(unwrapped_student, plan.student_layers, positions=student_positions),
            teacher_capture=ServedCapture(plan.teacher_layers, teacher_positions)
            if self._served_teacher is not None
            else HiddenStateCapture(self._unwrapped_teacher(), plan.teacher_layers, positions=teacher_positions),
            position_mask=position_mask,
            projector=self._representation_projector,
            fit_bridge_teacher=self._fit_bridge_teacher,
        )

    def _capture_states(self, unwrapped_student, inputs):
        """Both backbones' forwards (no LM head) with the capture armed: `(student_states, teacher_states,
        position_mask)`, lists of `[B, K, d_S]` / `[B, K, d_T]` and a `[B, K]` mask (OPRD-Bridge Stage 1)."""
        completion_width = inputs["completion_ids"].size(1)
        request = self._capture_request(unwrapped_student, inputs)
        with request.student:
            self._hidden_states(unwrapped_student, *self._student_sequence(inputs), completion_width)
        with request.teacher:
            self._teacher_signal(inputs, completion_width, request)
        return request.student_capture.states, request.teacher_capture.states, request.position_mask

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.args.representation_only:
            # The parent logs the student's entropy from the LM head, which this mode never computes.
            mode = "train" if self.model.training else "eval"
            entropies = self._metrics[mode].get("entropy")
            if entropies:
                entropies.pop()
            if entropies is not None and not entropies:
                del self._metrics[mode]["entropy"]
        return result

    # ------------------------------------------------------------------ OPRD-Bridge

    def _fit_bridge_teacher(self, bridge: BridgeProjector, teacher_states, position_mask) -> None:
        """allow_random_projector: the teacher PCA from this micro-batch (the reference behaviour), same on all ranks."""
        bridge.fit_teacher([state[position_mask.to(state.device)] for state in teacher_states])
        self._broadcast_buffers(bridge)

    def _broadcast_buffers(self, module: nn.Module) -> None:
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            for buffer in module.buffers():
                buffer.copy_(broadcast(buffer.clone()))

    @torch.no_grad()
    def fit_bridge(self, num_prompts: int | None = None, max_rows: int = 16384) -> BridgeProjector:
        """OPRD-Bridge Stage 1 (Eq. 12–13) on rollouts of the current (initial) student; `train()` calls it.

        Generates completions for up to `num_prompts` training prompts (default `bridge_fit_prompts`), in batches
        of `per_device_train_batch_size` from the start of the training set, and captures both models' states at
        the distilled layers and positions until `max_rows` positions are collected. Then fits the teacher PCA
        and the student projection (closed-form least squares, `BridgeProjector.fit_student`) and makes every
        process use the main process's fit. Returns the fitted, frozen bridge.
        """
        bridge = self._representation_projector
        if not isinstance(bridge, BridgeProjector):
            raise ValueError("fit_bridge needs projector='bridge' (and representation_weight > 0).")
        num_prompts = self.args.bridge_fit_prompts if num_prompts is None else num_prompts
        student_rows, teacher_rows = self._stage_one_states(num_prompts, max_rows)
        if not student_rows:
            raise ValueError("fit_bridge got no prompts: the training set is empty or num_prompts is 0.")
        bridge.fit_teacher(teacher_rows, max_rows=max_rows)
        bridge.fit_student(student_rows, teacher_rows)
        self._broadcast_buffers(bridge)
        return bridge

    def _stage_one_states(self, num_prompts: int, max_rows: int) -> tuple[list, list]:
        """Per distilled layer pair, `[N, d]` student and teacher states (N ≤ max_rows) of fresh rollouts."""
        student_rows, teacher_rows, collected = [], [], 0
        batch_size = self.args.per_device_train_batch_size
        prompts = itertools.islice(iter(self.train_dataset), num_prompts)
        was_training = self.model.training
        unwrapped_student = self.accelerator.unwrap_model(self.model)
        try:
            while collected < max_rows:
                batch = list(itertools.islice(prompts, batch_size))
                if not batch:
                    break
                inputs = self._generate_and_score_completions(batch)
                self.model.eval()
                student_states, teacher_states, mask = self._capture_states(unwrapped_student, inputs)
                self.model.train(was_training)
                student_rows.append([state[mask][: max_rows - collected].float().cpu() for state in student_states])
                teacher_rows.append([state[mask][: max_rows - collected].float().cpu() for state in teacher_states])
                collected += len(student_rows[-1][0])
        finally:
            self.model.train(was_training)
            for metrics in self._metrics.values():  # the Stage-1 rollouts are not training steps
                metrics.clear()
        return [torch.cat(layer) for layer in zip(*student_rows)], [torch.cat(layer) for layer in zip(*teacher_rows)]

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        bridge = self._representation_projector
        unfitted = isinstance(bridge, BridgeProjector) and not bool(bridge.student_fitted)
        # A resumed run loads its bridge from the checkpoint; allow_random_projector keeps P_S random on purpose.
        if unfitted and not resume_from_checkpoint and not self.args.allow_random_projector:
            if self.args.bridge_fit_prompts > 0:
                self.fit_bridge()
            else:
                raise ValueError(
                    "projector='bridge' has no fitted bridge and bridge_fit_prompts=0: set bridge_fit_prompts > 0 "
                    "(Stage 1 at the start of training), bridge_path to a fitted bridge, or "
                    "allow_random_projector=True for a random frozen student projection."
                )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints: the projector in its own file

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self._representation_projector is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None:
            state_dict = self.model.state_dict()
        marker = f"{PROJECTOR_NAME}."
        projector_state = {
            key.split(marker, 1)[1]: value for key, value in state_dict.items() if marker in key
        }
        model_state = {key: value for key, value in state_dict.items() if marker not in key}
        super()._save(output_dir, model_state)
        if self.args.should_save and projector_state:
            os.makedirs(output_dir, exist_ok=True)
            tensors = {key: value.detach().cpu().contiguous() for key, value in projector_state.items()}
            save_file(tensors, os.path.join(output_dir, PROJECTOR_FILE), metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_projector_file(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        if self.state.best_model_checkpoint is not None:
            self._load_projector_file(self.state.best_model_checkpoint)

    def _load_projector_file(self, directory: str) -> None:
        # Under FSDP and DeepSpeed the checkpoint's own model state (`pytorch_model_fsdp*`, DeepSpeed's `global_step*`,
        # loaded by the parent) holds the projector as a submodule of the model, already sharded; the file is for
        # `from_pretrained` users.
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return
        path = os.path.join(directory, PROJECTOR_FILE)
        if self._representation_projector is not None and os.path.isfile(path):
            _load_projector_state(self._representation_projector, path)

    def _issue_warnings_after_load(self, load_result) -> None:
        """The projector's keys are missing from the model weights on purpose (they live in their own file)."""
        marker = f"{PROJECTOR_NAME}."
        missing = [key for key in load_result.missing_keys if marker not in key]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))


@dataclass
class _BridgeFittingRequest(CaptureRequest):
    """OPRD's capture request; with `allow_random_projector` a bridge whose teacher PCA is not fitted yet is fitted
    on the first micro-batch's teacher states (then broadcast) before the objective reads them."""

    fit_bridge_teacher: Callable | None = None

    def states(self) -> RepresentationStates | None:
        states = super().states()
        bridge = self.projector
        if isinstance(bridge, BridgeProjector) and not bool(bridge.teacher_fitted):
            device = module_device(bridge)
            self.fit_bridge_teacher(bridge, [state.to(device) for state in states.teacher],
                                    states.position_mask.to(device))
        return states


def _load_projector_state(projector: nn.Module, path: str) -> None:
    state = load_file(path)
    try:
        projector.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"{path} does not fit this run's projector ({type(projector).__name__} for the configured layers, "
            f"widths and rank): {error}"
        ) from None
