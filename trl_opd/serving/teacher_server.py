"""trl_opd's teacher server: a teacher that does not fit beside the student answers the training processes over HTTP.

vLLM's server returns top-k log-probs only; this one returns what OPD's other losses need from a teacher: its last
hidden states (for the chunked losses, which apply the LM head themselves), the outputs of any decoder layer (OPRD),
log-probs at arbitrary token ids, and the LM head itself. `trl-opd serve-teacher MODEL` runs it;
`trl_opd.serving.trl_opd_client.TrlOpdTeacherClient` talks to it.

Protocol (tensor bodies are `http.encode_tensors` safetensors bytes with a JSON meta dict):

    GET  /health  {"status": "ok"}
    GET  /info    {"backend": "trl_opd", "model", "vocab_size", "hidden_size", "num_layers", "max_length",
                   "tokenizer_vocab_size", "tokenizer_sha256", "dtype"}              (`teacher_info`)
    GET  /head    tensors weight [V, d] (+ bias [V]); meta {"softcap", "scale"}         (`encode_head`)
    POST /score   tensors input_ids, attention_mask [B, L] (+ token_ids [B, C, m], positions [B, K]);
                  meta {"logits_to_keep": C, "last_hidden", "layers", "temperature", "top_k", "sampled",
                  "explicit_position_ids"}; answer: the tensors asked for           (`parse_score_request`, `score`)

A request the server cannot use is HTTP 422 with {"error": "<what to change>"} (the client does not retry it); a
failure of the model is 500 (the client retries it, as a server fault).

One worker thread owns the model (`ScoringWorker`): the HTTP handlers only parse and queue. The worker takes up to
`max_batch_size` waiting requests, merges those that can share a forward and answers each with its own rows.

The pure pieces (`last_hidden_states`, `score`, `parse_score_request`, `tokenizer_sha256`) import neither starlette
nor uvicorn, so a trainer can use them without the `serve` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import queue
import threading
import time
from concurrent.futures import Future

import torch
from accelerate.utils import is_peft_model
from torch import Tensor

from ..losses import OutputHead
from ..representation import HiddenStateCapture, find_decoder_layers
from ..trainers.lm_head import output_head
from .http import TENSOR_CONTENT_TYPE, TeacherResponseError, decode_tensors, encode_tensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
LOGIT_ROWS = 1024  # rows of [rows, V] float32 logits built at once: 1024 × 152k ≈ 0.6 GB for Qwen's vocabulary
SCORE_TENSORS = ("input_ids", "attention_mask", "token_ids", "positions")


# ------------------------------------------------------------------------------------------------- the model side


def last_hidden_states(model, input_ids: Tensor, attention_mask: Tensor, logits_to_keep: int, *,
                       explicit_position_ids: bool) -> Tensor:
    """The last hidden states (after the final norm, before the LM head) that predict the last `logits_to_keep`
    tokens: `hidden[:, :-1][:, -C:]`, [B, C, d], bit for bit what the trainers compute.

    `explicit_position_ids=True`: the backbone gets `position_ids = cumsum(attention_mask) - 1` (clamped at 0, what
    `generate` used), so left padding of any width leaves a row unchanged (`OPDTrainer._hidden_states`). False: TRL's
    `DistillationTrainer._get_last_hidden_state` for a text model: positions count from the padded start, and the
    backbone is given `logits_to_keep=C + 1` when the causal LM's forward takes that argument, as TRL does.
    A PEFT model is unwrapped to its base causal LM first (its adapters stay active: they live in the layers).
    """
    if is_peft_model(model):
        model = model.base_model.model
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if explicit_position_ids:
        inputs["position_ids"] = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    elif "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs["logits_to_keep"] = logits_to_keep + 1
    hidden = model.base_model(**inputs).last_hidden_state
    return hidden[:, :-1][:, -logits_to_keep:]


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
    """The meta of a /score request, defaults filled in. Hashable: equal options are one condition of merging."""

    logits_to_keep: int
    last_hidden: bool = False
    layers: tuple[int, ...] = ()
    temperature: float = 1.0
    top_k: int = 0
    sampled: bool = False
    explicit_position_ids: bool = False

    def as_meta(self) -> dict:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}


@dataclasses.dataclass
class ScoreRequest:
    """A checked /score request: its options and CPU tensors (input_ids, attention_mask, optional token_ids and
    positions, all int64, batch first)."""

    options: ScoreOptions
    tensors: dict[str, Tensor]

    @property
    def rows(self) -> int:
        return self.tensors["input_ids"].size(0)

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys run as one forward: the same options, the same tensors, and the same sizes past
        the batch dimension (L; C and m of token_ids; K of positions)."""
        shapes = tuple(sorted((name, tuple(tensor.shape[1:])) for name, tensor in self.tensors.items()))
        return self.options, shapes


@torch.no_grad()
def score(model, head: OutputHead, request: ScoreRequest) -> dict[str, Tensor]:
    """The answer to one (possibly merged) /score request, CPU tensors (B rows, C = logits_to_keep):

    last_hidden [B, C, d] and layer_{i} [B, K, d] in the model's dtype; token_logprobs [B, C, m], top_k_ids [B, C, k]
    (int64) with top_k_logprobs [B, C, k] (descending) and sampled_logprobs [B, C] in float32, all log-probs of
    log_softmax(logits / T). The layer states come from the same forward as the last hidden states.
    """
    options, tensors = request.options, request.tensors
    device = model.get_input_embeddings().weight.device
    input_ids, attention_mask = tensors["input_ids"].to(device), tensors["attention_mask"].to(device)
    capture = (HiddenStateCapture(model, options.layers, positions=tensors["positions"].to(device))
               if options.layers else None)
    with capture if capture is not None else contextlib.nullcontext():
        hidden = last_hidden_states(model, input_ids, attention_mask, options.logits_to_keep,
                                    explicit_position_ids=options.explicit_position_ids)
    out = {"last_hidden": hidden} if options.last_hidden else {}
    if capture is not None:
        out.update({f"layer_{index}": states for index, states in zip(options.layers, capture.states)})
    token_ids = tensors.get("token_ids")
    completion_ids = input_ids[:, -options.logits_to_keep:]
    out.update(log_probs(head, hidden, options, completion_ids, None if token_ids is None else token_ids.to(device)))
    return {name: tensor.to("cpu") for name, tensor in out.items()}


def log_probs(head: OutputHead, hidden: Tensor, options: ScoreOptions, completion_ids: Tensor,
              token_ids: Tensor | None) -> dict[str, Tensor]:
    """log_softmax(head.logits(hidden) / T) read at `token_ids` [B, C, m], its top-k and at `completion_ids` [B, C],
    as asked; LOGIT_ROWS rows of logits at a time, so [B·C, V] float32 logits never exist at once."""
    wanted = token_ids is not None or options.top_k > 0 or options.sampled
    if not wanted:
        return {}
    batch, width, _ = hidden.shape
    rows = hidden.reshape(batch * width, -1)
    pieces: dict[str, list[Tensor]] = {}
    for start in range(0, rows.size(0), LOGIT_ROWS):
        chunk = slice(start, start + LOGIT_ROWS)
        logprobs = torch.log_softmax(head.logits(rows[chunk]) / options.temperature, dim=-1)
        found = {}
        if token_ids is not None:
            found["token_logprobs"] = logprobs.gather(-1, token_ids.reshape(batch * width, -1)[chunk])
        if options.top_k > 0:
            found["top_k_logprobs"], found["top_k_ids"] = logprobs.topk(options.top_k, dim=-1, sorted=True)
        if options.sampled:
            found["sampled_logprobs"] = logprobs.gather(-1, completion_ids.reshape(-1, 1)[chunk]).squeeze(-1)
        for name, piece in found.items():
            pieces.setdefault(name, []).append(piece)
    out = {}
    for name, parts in pieces.items():
        joined = torch.cat(parts).reshape(batch, width, *parts[0].shape[1:])
        out[name] = joined if name == "top_k_ids" else joined.to(torch.float32)
    return out


# ------------------------------------------------------------------------------------------------- requests


class BadScoreRequest(ValueError):
    """A /score request the server cannot use (HTTP 422); the message says what to change."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise BadScoreRequest(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_score_request(body: bytes, *, vocab_size: int, num_layers: int) -> ScoreRequest:
    """Decode and check a /score body; `BadScoreRequest` says what is wrong. Ids must lie in [0, vocab_size), layer
    indices in 1..num_layers (HF hidden_states: num_layers is the output of the final norm)."""
    try:
        tensors, meta = decode_tensors(body)
    except TeacherResponseError as error:
        raise BadScoreRequest(f"The body must be safetensors bytes of trl_opd.serving.http.encode_tensors: {error}")
    options = _parse_options(meta, vocab_size=vocab_size, num_layers=num_layers)
    _check_tensors(tensors, options, vocab_size=vocab_size)
    return ScoreRequest(options, tensors)


def _parse_options(meta: dict, *, vocab_size: int, num_layers: int) -> ScoreOptions:
    fields = [field.name for field in dataclasses.fields(ScoreOptions)]
    unknown = sorted(set(meta) - set(fields))
    _require(not unknown, f"Unknown meta keys {unknown}; the keys are {', '.join(fields)}.")
    _require("logits_to_keep" in meta, "The meta needs logits_to_keep: C, the number of completion tokens scored.")
    values = {**dataclasses.asdict(ScoreOptions(logits_to_keep=0)), **meta}
    _require(_is_int(values["logits_to_keep"]) and values["logits_to_keep"] >= 1,
             f"logits_to_keep={values['logits_to_keep']!r} must be an integer >= 1.")
    for name in ("last_hidden", "sampled", "explicit_position_ids"):
        _require(isinstance(values[name], bool), f"{name}={values[name]!r} must be true or false.")
    layers = values["layers"]
    _require(isinstance(layers, (list, tuple)) and all(_is_int(index) for index in layers),
             f"layers={layers!r} must be a list of integers.")
    _require(all(1 <= index <= num_layers for index in layers),
             f"layers={list(layers)} is out of range: indices follow HF hidden_states, 1..{num_layers} for this "
             f"{num_layers}-layer teacher ({num_layers} = output of the final norm).")
    _require(len(set(layers)) == len(layers), f"layers={list(layers)} repeats an index; list each layer once.")
    temperature = values["temperature"]
    _require(isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
             and math.isfinite(temperature) and temperature > 0,
             f"temperature={temperature!r} must be a finite number > 0.")
    _require(_is_int(values["top_k"]) and 0 <= values["top_k"] <= vocab_size,
             f"top_k={values['top_k']!r} must be an integer in 0..{vocab_size} (the teacher's vocabulary).")
    return ScoreOptions(**{**values, "layers": tuple(layers), "temperature": float(temperature)})


def _int64(tensors: dict[str, Tensor], name: str, dims: int, shape: str) -> Tensor:
    tensor = tensors[name]
    _require(tensor.dim() == dims, f"{name} must be {shape}; got shape {list(tensor.shape)}.")
    _require(tensor.dtype == torch.int64, f"{name} must be int64; got {tensor.dtype} (send tensor.long()).")
    return tensor


def _check_ids(name: str, ids: Tensor, vocab_size: int) -> None:
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        _require(low >= 0 and high < vocab_size,
                 f"{name} holds ids in [{low}, {high}] but the teacher's vocabulary is [0, {vocab_size}): the "
                 "student's tokenizer must be the teacher's (or map its ids first).")


def _check_tensors(tensors: dict[str, Tensor], options: ScoreOptions, *, vocab_size: int) -> None:
    unknown = sorted(set(tensors) - set(SCORE_TENSORS))
    _require(not unknown, f"Unknown tensors {unknown}; send {', '.join(SCORE_TENSORS)}.")
    for name in ("input_ids", "attention_mask"):
        _require(name in tensors, f"The body needs {name} [B, L] int64.")
    input_ids = _int64(tensors, "input_ids", 2, "[B, L]")
    batch, length = input_ids.shape
    _require(batch >= 1 and length >= 2, f"input_ids must have B >= 1 rows of L >= 2 tokens; got [{batch}, {length}].")
    mask = _int64(tensors, "attention_mask", 2, "[B, L]")
    _require(mask.shape == input_ids.shape,
             f"attention_mask has shape {list(mask.shape)}, input_ids {list(input_ids.shape)}; they must match.")
    _require(bool(((mask == 0) | (mask == 1)).all()), "attention_mask must hold only 0 and 1.")
    _check_ids("input_ids", input_ids, vocab_size)
    _require(options.logits_to_keep <= length - 1,
             f"logits_to_keep={options.logits_to_keep} must be at most L - 1 = {length - 1} (the first token is "
             "predicted by nothing).")
    if "token_ids" in tensors:
        token_ids = _int64(tensors, "token_ids", 3, "[B, C, m]")
        _require(token_ids.shape[:2] == (batch, options.logits_to_keep) and token_ids.size(2) >= 1,
                 f"token_ids must be [B, C, m] = [{batch}, {options.logits_to_keep}, m >= 1]; got "
                 f"{list(token_ids.shape)}.")
        _check_ids("token_ids", token_ids, vocab_size)
    _require(bool(options.layers) == ("positions" in tensors),
             "positions [B, K] are needed with layers" if options.layers else
             "positions were sent but no layers asked: send positions only with layers.")
    if options.layers:
        positions = _int64(tensors, "positions", 2, "[B, K]")
        _require(positions.size(0) == batch and positions.size(1) >= 1,
                 f"positions must be [B, K] = [{batch}, K >= 1]; got {list(positions.shape)}.")
        _require(bool(((positions >= 0) & (positions < length)).all()),
                 f"positions index the L = {length} positions of input_ids: each must be in [0, {length}).")
    asked = options.last_hidden or options.layers or "token_ids" in tensors or options.top_k or options.sampled
    _require(bool(asked), "The request asks for nothing: set last_hidden, layers, top_k or sampled, or send token_ids.")


# ------------------------------------------------------------------------------------------------- batching


def merge_requests(requests: list[ScoreRequest]) -> ScoreRequest:
    """One request of the rows of `requests` (equal `batch_key`s), concatenated along the batch in order."""
    names = requests[0].tensors
    return ScoreRequest(requests[0].options,
                        {name: torch.cat([request.tensors[name] for request in requests]) for name in names})


def split_answer(answer: dict[str, Tensor], rows: list[int]) -> list[dict[str, Tensor]]:
    """The answer of a merged request back into one answer per request (`rows`: each one's batch size)."""
    # clone: each answer owns its memory, so encoding one does not carry the whole merged storage.
    parts = {name: [piece.clone() for piece in tensor.split(rows)] for name, tensor in answer.items()}
    return [{name: pieces[index] for name, pieces in parts.items()} for index in range(len(rows))]


class ScoringWorker:
    """The one thread that runs the model (in eval mode, under `torch.no_grad()`).

    It takes a waiting request, waits at most `batch_wait_ms` for more (up to `max_batch_size` requests in all),
    merges the requests with equal `batch_key`s into one forward each and runs the others one by one. Merged rows get
    the results they get alone: the rows of a forward do not interact (up to the floating-point order of batched
    kernels). `forwards` counts the forwards run (tests and logs).
    """

    def __init__(self, model, head: OutputHead, *, max_batch_size: int = 8, batch_wait_ms: float = 5):
        if max_batch_size < 1 or batch_wait_ms < 0:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1 and batch_wait_ms={batch_wait_ms} >= 0.")
        self.model, self.head = model.eval(), head
        self.max_batch_size, self.batch_wait = max_batch_size, batch_wait_ms / 1000
        self.forwards = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="trl_opd-teacher-worker", daemon=True)
        self._thread.start()

    def submit(self, request: ScoreRequest) -> Future:
        """Queue `request`; the future holds its answer (or the model's exception)."""
        future: Future = Future()
        self._queue.put((request, future))
        return future

    def stop(self, timeout: float = 30) -> None:
        """Finish the requests taken, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        with torch.no_grad():  # grad mode is per thread: set it in the thread that runs the model
            while (batch := self._take_batch()) is not None:
                groups: dict[tuple, list] = {}
                for item in batch:
                    groups.setdefault(item[0].batch_key, []).append(item)
                for group in groups.values():
                    self._answer(group)

    def _take_batch(self) -> list | None:
        """Up to max_batch_size waiting (request, future) pairs, or None once stopped. Cancelled requests (their
        client left) are dropped; the others are marked running, so they can no longer be cancelled."""
        first = self._queue.get()
        if first is None:
            return None
        batch, deadline = [first], time.monotonic() + self.batch_wait
        while len(batch) < self.max_batch_size:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if item is None:  # stop after this batch
                self._queue.put(None)
                break
            batch.append(item)
        return [(request, future) for request, future in batch if future.set_running_or_notify_cancel()]

    def _score(self, request: ScoreRequest) -> dict[str, Tensor]:
        self.forwards += 1
        return score(self.model, self.head, request)

    def _merged_answers(self, group: list) -> list[dict[str, Tensor]] | None:
        """Each request's answer from one forward of the whole group, or None if that forward failed."""
        requests = [request for request, _ in group]
        try:
            return split_answer(self._score(merge_requests(requests)), [request.rows for request in requests])
        except Exception:  # noqa: BLE001  e.g. out of memory for the merged batch: each alone may still fit
            return None

    def _answer(self, group: list) -> None:
        answers = self._merged_answers(group) if len(group) > 1 else None
        if answers is not None:
            for (_, future), answer in zip(group, answers):
                future.set_result(answer)
            return
        for request, future in group:
            try:
                future.set_result(self._score(request))
            except Exception as error:  # noqa: BLE001  the handler turns it into HTTP 500
                future.set_exception(error)


# ------------------------------------------------------------------------------------------------- the app


def tokenizer_sha256(tokenizer) -> str:
    """A fingerprint of a tokenizer's vocabulary: sha256 of the JSON of its sorted (token, id) pairs. Equal
    fingerprints mean the student's ids are the teacher's."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def teacher_info(model, tokenizer=None, model_name: str = "teacher") -> dict:
    """The JSON of GET /info (the tokenizer fields are null without a tokenizer)."""
    head = output_head(model)
    config = model.config.get_text_config()
    return {
        "backend": "trl_opd",
        "model": model_name,
        "vocab_size": int(head.weight.shape[0]),
        "hidden_size": int(head.weight.shape[1]),
        "num_layers": find_decoder_layers(model).num_layers,
        "max_length": getattr(config, "max_position_embeddings", None),
        "tokenizer_vocab_size": None if tokenizer is None else len(tokenizer),
        "tokenizer_sha256": None if tokenizer is None else tokenizer_sha256(tokenizer),
        "dtype": str(head.weight.dtype).removeprefix("torch."),
    }


def encode_head(head: OutputHead) -> bytes:
    """The body of GET /head: weight [V, d] (+ bias [V]) in the model's dtype, meta {"softcap", "scale"}."""
    tensors = {"weight": head.weight.detach()}
    if head.bias is not None:
        tensors["bias"] = head.bias.detach()
    return encode_tensors(tensors, {"softcap": head.softcap, "scale": head.scale})


def build_app(model, *, tokenizer=None, model_name: str = "teacher", max_batch_size: int = 8,
              batch_wait_ms: float = 5):
    """The Starlette app serving `model` (see the module docstring). Its worker thread starts now and stops when the
    app shuts down; `app.state.worker` is the `ScoringWorker`."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    head = output_head(model)
    info = teacher_info(model, tokenizer, model_name)
    worker = ScoringWorker(model, head, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms)
    head_body = _Cached(lambda: encode_head(head))  # built on the first GET /head: a large vocabulary's head is GBs

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def get_info(request):
        return JSONResponse(info)

    async def get_head(request):
        return Response(await run_in_threadpool(head_body.get), media_type=TENSOR_CONTENT_TYPE)

    async def post_score(request):
        body = await request.body()
        try:
            parsed = await run_in_threadpool(parse_score_request, body, vocab_size=info["vocab_size"],
                                             num_layers=info["num_layers"])
        except BadScoreRequest as error:
            return JSONResponse({"error": str(error)}, status_code=422)
        try:
            answer = await asyncio.wrap_future(worker.submit(parsed))
        except Exception as error:  # noqa: BLE001  any failure of the model: a server fault, reported
            return JSONResponse({"error": f"The teacher model failed: {type(error).__name__}: {error}"},
                                status_code=500)
        body = await run_in_threadpool(encode_tensors, answer, parsed.options.as_meta())
        return Response(body, media_type=TENSOR_CONTENT_TYPE)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(worker.stop)

    app = Starlette(routes=[Route("/health", health), Route("/info", get_info), Route("/head", get_head),
                            Route("/score", post_score, methods=["POST"])], lifespan=lifespan)
    app.state.worker = worker
    return app


class _Cached:
    """A value computed once, on first use, by whichever thread asks first."""

    def __init__(self, compute):
        self._compute, self._value, self._lock = compute, None, threading.Lock()

    def get(self):
        with self._lock:
            if self._value is None:
                self._value = self._compute()
            return self._value


def load_teacher_model(model_name_or_path: str, *, dtype: str = "auto", device: str | None = None):
    """`AutoModelForCausalLM.from_pretrained` (trust_remote_code=False) on `device` (default: cuda if available)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {', '.join(DTYPES)}.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=DTYPES[dtype], trust_remote_code=False)
    return model.to(device).eval()


def load_tokenizer(model_name_or_path: str):
    """The model's tokenizer, or None when it has none (then /info cannot fingerprint its vocabulary)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def serve(model_name_or_path: str, *, host: str = "127.0.0.1", port: int = 8010, dtype: str = "auto",
          device: str | None = None, max_batch_size: int = 8, batch_wait_ms: float = 5) -> None:
    """Load the teacher and serve it until interrupted (uvicorn, log level "warning")."""
    import uvicorn

    model = load_teacher_model(model_name_or_path, dtype=dtype, device=device)
    app = build_app(model, tokenizer=load_tokenizer(model_name_or_path), model_name=model_name_or_path,
                    max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms)
    print(f"trl_opd teacher server: {model_name_or_path} on http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
