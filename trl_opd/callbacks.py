r"""`ForesightCallback`: EffOPD update extrapolation ("Learning to Foresee", arXiv 2605.11739; methods.md §9).

OPD updates lock early into a low-rank direction, so the update since an anchor can be followed further. After
the optimizer step at every scheduled global step t (default 1, 2, 4, 8, ...), with θ the selected parameters
and θ_a their anchor::

    best ← S(θ_t);  keep ← θ_t;  f ← initial_factor
    repeat max_trials times:
        θ ← θ + f · (θ − θ_a)                    # θ: the current, possibly already moved, parameters
        if S(θ) > best:  best ← S(θ);  keep ← θ;  f ← f / (1 + f)
        else:            θ ← keep;  break         # rollback: bit-identical to the last accepted parameters
    θ_a ← keep

With Δ = θ_t − θ_a the k-th candidate is θ_t + k·f₀·Δ (f₀ = 2: factors 2, 4, 6, 8, 10), because 1 + α_k = Π_j
(1 + f_j) telescopes to 1 + k·f₀. The logged ``foresight/alpha`` is the accepted factor α (0 when the first
candidate fails).

Decisions for trl_opd (methods.md §9.2 where it has one):

* Selected parameters: trainable parameters whose lower-cased name contains one of ``parameter_patterns``
  (substring match, as the authors' code: ``attention`` also matches ``post_attention_layernorm`` and
  ``self_attn`` matches ``q_norm``/``k_norm``). Embeddings, ``lm_head`` and the final norm do not match. Under
  PEFT only adapter weights (``lora_A``/``lora_B``/...) of matching modules are selected; the frozen base
  never moves.
* Arithmetic in fp32 (fp64 for fp64 parameters), cast back to the parameter dtype. The anchor is an fp32 copy
  on the CPU; the rollback copy keeps the parameter dtype, so a rollback restores the exact bits.
* Optimizer and scheduler state are never touched (Adam moments are stale after a jump: watch the grad norm).
* Score S: a user callable ``metric_fn(model) -> float`` (greater is better by default;
  ``greater_is_better``), called in eval mode under ``torch.no_grad()``. A NaN score never counts as an
  improvement. With ``evaluate_on="main_process"`` only rank 0 evaluates and broadcasts the score; with
  ``"all_processes"`` every process evaluates (e.g. on its shard of the validation set) and the scores are
  averaged. Either way every process sees the same numbers and takes the same decisions; DDP keeps parameters
  identical across processes, so the weights stay identical too.
* Logging: ``foresight/alpha``, ``foresight/metric_before``, ``foresight/metric_after``, ``foresight/trials``
  (candidates evaluated), ``foresight/eval_seconds`` (wall time of this step's evaluations) and
  ``foresight/eval_seconds_total`` are added to the trainer's log entry of the trigger step
  (``state.log_history`` and the ``logs`` seen by callbacks registered after this one; reporting integrations
  such as W&B are registered before user callbacks and do not see them). ``history`` keeps one record per
  trigger.
* Checkpoints: ``on_save`` writes the anchor (``foresight_anchor.safetensors``) and the history
  (``foresight_state.json``) into ``checkpoint-{step}``; ``on_train_begin`` of a resumed run reads them back
  from ``resume_from``, ``args.resume_from_checkpoint`` or ``{output_dir}/checkpoint-{step}``, the first that
  has them.
* Not supported (clear error): parameters sharded by FSDP or DeepSpeed ZeRO-3, and DeepSpeed in general (its
  optimizer keeps master weights that would overwrite the extrapolated ones). A generation backend holding its
  own copy of the weights (vLLM) must be re-synced inside ``metric_fn``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from numbers import Real

import torch
from torch import nn
from transformers import TrainerCallback

DEFAULT_PARAMETER_PATTERNS = (
    "attn",
    "self_attn",
    "attention",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "mlp",
    "feed_forward",
    "ffn",
    "gate_proj",
    "up_proj",
    "down_proj",
)
EVALUATE_ON = ("main_process", "all_processes")
ANCHOR_FILE = "foresight_anchor.safetensors"
STATE_FILE = "foresight_state.json"
LOG_PREFIX = "foresight/"


# ------------------------------------------------------------------------------------------- pure pieces


def is_power_of_two(step: int) -> bool:
    """True for 1, 2, 4, 8, ... (the paper's trigger steps)."""
    return step >= 1 and step & (step - 1) == 0


def extrapolate(current: torch.Tensor, anchor: torch.Tensor, factor: float) -> torch.Tensor:
    """``current + factor · (current − anchor)`` in fp32 (fp64 for fp64 input), cast to ``current.dtype``.

    Shapes: ``current`` and ``anchor`` alike (any shape; ``anchor`` may live on another device or dtype).
    """
    compute_dtype = torch.promote_types(current.dtype, torch.float32)
    moved = current.to(compute_dtype)
    moved = moved + factor * (moved - anchor.to(device=current.device, dtype=compute_dtype))
    return moved.to(current.dtype)


def select_parameters(model: nn.Module, patterns: Iterable[str] = DEFAULT_PARAMETER_PATTERNS):
    """``[(name, parameter)]`` that ForesightCallback moves: trainable, lower-cased name containing a pattern.

    For a PEFT model only adapter weights qualify (the frozen base and ``modules_to_save`` copies never move).
    """
    patterns = tuple(pattern.lower() for pattern in patterns)
    adapter_ids = _adapter_parameter_ids(model)
    selected = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if adapter_ids is not None and id(parameter) not in adapter_ids:
            continue
        if any(pattern in name.lower() for pattern in patterns):
            selected.append((name, parameter))
    return selected


def _adapter_parameter_ids(model: nn.Module) -> set[int] | None:
    """ids of the adapter parameters of a PEFT model (None for a plain model)."""
    from accelerate.utils import is_peft_model

    if not is_peft_model(model):
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    ids = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                ids.update(id(parameter) for parameter in getattr(module, layer_name).parameters())
    return ids


# ------------------------------------------------------------------------------------------- validation


def _check_schedule(schedule) -> frozenset[int] | None:
    """None for "power_of_two", else the set of trigger steps."""
    if isinstance(schedule, str):
        if schedule != "power_of_two":
            raise ValueError(
                f"Unknown schedule {schedule!r}: use 'power_of_two' (steps 1, 2, 4, 8, ...) or a strictly "
                "increasing list of optimizer steps, e.g. [1, 2, 4, 8]."
            )
        return None
    try:
        steps = list(schedule)
    except TypeError:
        raise ValueError(
            f"schedule must be 'power_of_two' or a list of optimizer steps, got {schedule!r}."
        ) from None
    if not steps:
        raise ValueError("schedule is empty: give at least one optimizer step, or use 'power_of_two'.")
    if any(isinstance(step, bool) or not isinstance(step, int) or step < 1 for step in steps):
        raise ValueError(f"schedule steps must be integers >= 1 (optimizer steps count from 1), got {steps}.")
    if any(later <= earlier for earlier, later in itertools.pairwise(steps)):
        raise ValueError(f"schedule steps must be strictly increasing, got {steps}.")
    return frozenset(steps)


def _check_options(metric_fn, max_trials, initial_factor, patterns, evaluate_on) -> None:
    if metric_fn is None or not callable(metric_fn):
        raise ValueError(
            "ForesightCallback needs metric_fn, a callable model -> float scoring the model on a small "
            "validation set (greater is better), e.g. "
            f"`lambda model: accuracy(model, tokenizer, validation_problems[:50])`; got {metric_fn!r}."
        )
    if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1:
        raise ValueError(f"max_trials must be an integer >= 1 (the paper uses 5), got {max_trials!r}.")
    if not isinstance(initial_factor, Real) or not math.isfinite(initial_factor) or initial_factor <= 0:
        raise ValueError(
            f"initial_factor must be a finite number > 0 (the paper uses 2.0), got {initial_factor!r}."
        )
    if isinstance(patterns, str) or not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(
            f"parameter_patterns must be a non-empty list of name substrings like ['mlp', 'self_attn'], got "
            f"{patterns!r}."
        )
    if evaluate_on not in EVALUATE_ON:
        raise ValueError(f"evaluate_on must be one of {EVALUATE_ON}, got {evaluate_on!r}.")


def _check_supported_distribution(args, selected) -> None:
    """Sharded or DeepSpeed-managed weights cannot be edited in place here: say so, do not fail silently."""
    from torch.distributed.tensor import DTensor

    uses_deepspeed = (
        bool(getattr(args, "deepspeed", None)) or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    )
    sharded = any(
        isinstance(parameter, DTensor) or hasattr(parameter, "ds_id") or "_fsdp_wrapped_module" in name
        for name, parameter in selected
    )
    if uses_deepspeed or sharded:
        raise ValueError(
            "ForesightCallback edits the selected weights in place and supports single-process and DDP "
            "training (incl. PEFT). Parameters sharded by FSDP or DeepSpeed ZeRO-3, and DeepSpeed's fp32 "
            "master weights, are not supported yet: train with DDP, or remove the callback."
        )


def _as_score(value) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(
            f"metric_fn must return a number (a float score), got {value!r} of type {type(value)}."
        )
    return float(value)


# ------------------------------------------------------------------------------------------- the callback


class ForesightCallback(TrainerCallback):
    """EffOPD update extrapolation for any `transformers.Trainer` (OPDTrainer included); see the module doc.

    Args:
        metric_fn: ``model -> float``, the validation score S (e.g. accuracy on ~50 fixed validation
        problems).
        schedule: ``"power_of_two"`` (global steps 1, 2, 4, 8, ...) or a strictly increasing list of
            global steps.
        max_trials: candidates tried per trigger at most (paper: 5).
        initial_factor: f₀, the first step along θ − θ_a (paper: 2.0); then f ← f / (1 + f).
        parameter_patterns: lower-case substrings of the parameter names to move (default: attention and MLP).
        greater_is_better: False for a score to minimise (a validation loss); acceptance stays strict.
        evaluate_on: ``"main_process"`` (rank 0 scores, the score is broadcast) or ``"all_processes"`` (every
            process scores, the mean is used).
        resume_from: checkpoint directory to read the anchor from when resuming (default: found
            automatically).

    Attributes:
        history: one dict per trigger: ``step``, ``alpha``, ``metric_before``, ``metric_after``, ``trials``,
            ``eval_seconds``.
        anchor: ``{name: fp32 CPU tensor}`` of the selected parameters.
    """

    def __init__(
        self,
        metric_fn: Callable[[nn.Module], float],
        *,
        schedule="power_of_two",
        max_trials: int = 5,
        initial_factor: float = 2.0,
        parameter_patterns: Iterable[str] = DEFAULT_PARAMETER_PATTERNS,
        greater_is_better: bool = True,
        evaluate_on: str = "main_process",
        resume_from: str | os.PathLike | None = None,
    ):
        parameter_patterns = (
            parameter_patterns if isinstance(parameter_patterns, str) else tuple(parameter_patterns)
        )
        _check_options(metric_fn, max_trials, initial_factor, parameter_patterns, evaluate_on)
        self.metric_fn = metric_fn
        self.trigger_steps = _check_schedule(schedule)
        self.max_trials = max_trials
        self.initial_factor = float(initial_factor)
        self.parameter_patterns = parameter_patterns
        self.greater_is_better = greater_is_better
        self.evaluate_on = evaluate_on
        self.resume_from = resume_from
        self.anchor: dict[str, torch.Tensor] | None = None
        self.history: list[dict] = []
        self.eval_seconds_total = 0.0
        self._selected: list[tuple[str, nn.Parameter]] = []
        self._pending_logs: dict[str, float] = {}

    def is_trigger_step(self, step: int) -> bool:
        return is_power_of_two(step) if self.trigger_steps is None else step in self.trigger_steps

    # ---------------------------------------------------------------------------------------- trainer events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._selected = self._select(model)
        _check_supported_distribution(args, self._selected)
        self._pending_logs = {}
        if state.global_step > 0 and self._restore_from_checkpoint(args, state):
            return control
        if state.global_step > 0:
            warnings.warn(
                f"ForesightCallback: resuming at step {state.global_step} without a saved anchor "
                f"({ANCHOR_FILE} not found); the anchor restarts from the current weights.",
                stacklevel=2,
            )
        self.history, self.eval_seconds_total = [], 0.0
        self.anchor = self._anchor_copy()
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self.is_trigger_step(state.global_step):
            return control
        if self.anchor is None:
            raise ValueError(
                "ForesightCallback.on_step_end before on_train_begin: register it with the Trainer."
            )
        record = self.foresee(model, state.global_step)
        logs = {LOG_PREFIX + key: value for key, value in record.items() if key != "step"}
        logs[LOG_PREFIX + "eval_seconds_total"] = self.eval_seconds_total
        self._pending_logs = logs
        control.should_log = True  # so the trainer writes a log entry at this step to carry the record
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending_logs or logs is None:
            return control
        logs.update(self._pending_logs)
        # Trainer.log appended a copy of `logs` to the history just before calling us: complete that entry.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending_logs)
        self._pending_logs = {}
        return control

    def on_save(self, args, state, control, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self.anchor is None or not args.should_save or not os.path.isdir(checkpoint):
            return control
        from safetensors.torch import save_file

        save_file(
            {name: tensor.contiguous() for name, tensor in self.anchor.items()},
            os.path.join(checkpoint, ANCHOR_FILE),
        )
        with open(os.path.join(checkpoint, STATE_FILE), "w") as handle:
            json.dump(
                {"history": self.history, "eval_seconds_total": self.eval_seconds_total}, handle, indent=2
            )
        return control

    # ---------------------------------------------------------------------------------------- the algorithm

    def foresee(self, model: nn.Module, step: int) -> dict:
        """Run the extrapolation search on ``model`` now (``on_step_end`` calls it); returns the record."""
        if model is None:
            raise ValueError(
                "ForesightCallback needs the model (the Trainer passes it to callbacks as `model=`)."
            )
        start_seconds = self.eval_seconds_total
        best = before = self._score(model)
        keep = self._snapshot()
        factor, alpha, trials = self.initial_factor, 0.0, 0
        for _ in range(self.max_trials):
            self._move(factor)
            trials += 1
            score = self._score(model)
            if not self._improves(score, best):
                self._load(keep)
                break
            best, keep = score, self._snapshot()
            alpha, factor = alpha + factor * (1.0 + alpha), factor / (1.0 + factor)
        self.anchor = self._anchor_copy()
        record = {
            "step": step,
            "alpha": alpha,
            "metric_before": before,
            "metric_after": best,
            "trials": trials,
            "eval_seconds": self.eval_seconds_total - start_seconds,
        }
        self.history.append(record)
        return record

    def _improves(self, score: float, best: float) -> bool:
        return score > best if self.greater_is_better else score < best  # NaN: False either way

    @torch.no_grad()
    def _move(self, factor: float) -> None:
        for name, parameter in self._selected:
            parameter.copy_(extrapolate(parameter.detach(), self.anchor[name], factor))

    @torch.no_grad()
    def _load(self, snapshot: dict[str, torch.Tensor]) -> None:
        for name, parameter in self._selected:
            parameter.copy_(snapshot[name])

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """Exact CPU copies of the selected parameters (same dtype: restoring them is bit-identical)."""
        return {name: parameter.detach().to("cpu", copy=True) for name, parameter in self._selected}

    def _anchor_copy(self) -> dict[str, torch.Tensor]:
        return {
            name: parameter.detach().to(
                "cpu", dtype=torch.promote_types(parameter.dtype, torch.float32), copy=True
            )
            for name, parameter in self._selected
        }

    def _select(self, model) -> list[tuple[str, nn.Parameter]]:
        if model is None:
            raise ValueError(
                "ForesightCallback needs the model (the Trainer passes it to callbacks as `model=`)."
            )
        selected = select_parameters(model, self.parameter_patterns)
        if not selected:
            raise ValueError(
                f"No trainable parameter name contains any of {list(self.parameter_patterns)}: "
                "ForesightCallback would move nothing. Pass parameter_patterns matching your model's "
                "attention/MLP weights."
            )
        return selected

    # ---------------------------------------------------------------------------------------- scoring

    def _score(self, model: nn.Module) -> float:
        start = time.perf_counter()
        evaluates_here = self.evaluate_on == "all_processes" or _process_index() == 0
        score = self._call_metric(model) if evaluates_here else math.nan
        score = _synchronise(score, self.evaluate_on)
        self.eval_seconds_total += time.perf_counter() - start
        return score

    def _call_metric(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return _as_score(self.metric_fn(model))
        finally:
            model.train(was_training)

    # ---------------------------------------------------------------------------------------- resuming

    def _restore_from_checkpoint(self, args, state) -> bool:
        directory = self._find_checkpoint(args, state)
        if directory is None:
            return False
        from safetensors.torch import load_file

        anchor = load_file(os.path.join(directory, ANCHOR_FILE))
        expected = {name: tuple(parameter.shape) for name, parameter in self._selected}
        found = {name: tuple(tensor.shape) for name, tensor in anchor.items()}
        if found != expected:
            raise ValueError(
                f"The ForesightCallback anchor in {directory} does not match the selected parameters of this "
                f"model (saved {len(found)} tensors, selected {len(expected)}; first differences: "
                f"{sorted(set(found.items()) ^ set(expected.items()))[:3]}). Use the same model, PEFT config "
                "and parameter_patterns as the run that wrote the checkpoint."
            )
        self.anchor = anchor
        state_file = os.path.join(directory, STATE_FILE)
        if os.path.isfile(state_file):
            with open(state_file) as handle:
                saved = json.load(handle)
            self.history, self.eval_seconds_total = saved["history"], saved["eval_seconds_total"]
        return True

    def _find_checkpoint(self, args, state) -> str | None:
        candidates = [
            self.resume_from,
            getattr(args, "resume_from_checkpoint", None),
            os.path.join(args.output_dir, f"checkpoint-{state.global_step}"),
        ]
        for candidate in candidates:
            if isinstance(candidate, (str, os.PathLike)) and os.path.isfile(
                os.path.join(candidate, ANCHOR_FILE)
            ):
                return os.fspath(candidate)
        return None


# ------------------------------------------------------------------------------------------- distributed


def _process_index() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _synchronise(score: float, evaluate_on: str) -> float:
    """The same score on every process: rank 0's (``main_process``) or the mean (``all_processes``)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return score
    if torch.distributed.get_world_size() == 1:
        return score
    from accelerate import PartialState

    value = torch.tensor([score], dtype=torch.float64, device=PartialState().device)
    if evaluate_on == "main_process":
        torch.distributed.broadcast(value, src=0)
    else:
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
        value /= torch.distributed.get_world_size()
    return value.item()
