"""The client of trl_opd's teacher server (`trl-opd serve-teacher`, `trl_opd.serving.teacher_server`).

Every call goes through `http.request`: a server that cannot be reached or answers 5xx is retried with backoff for
`policy.retry_seconds`, then `TeacherServerError`; a refused request (422) or an answer of the wrong shape is
`TeacherResponseError` at once. Tensors come back on the CPU; the caller moves them to its device.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

import requests
import torch
from torch import Tensor

from ..losses import OutputHead
from .http import (
    TENSOR_CONTENT_TYPE,
    RetryPolicy,
    TeacherResponseError,
    TeacherServerError,
    decode_tensors,
    encode_tensors,
    request,
)

DEFAULT_POLICY = RetryPolicy()


class TrlOpdTeacherClient:
    """Talks to one trl_opd teacher server at `url` (e.g. "http://127.0.0.1:8010") through one `requests.Session`.

    `info()` and `head()` are fetched once and cached; `score()` asks for the teacher's outputs on a batch and checks
    that the answer has the shapes asked for.
    """

    def __init__(self, url: str, policy: RetryPolicy = DEFAULT_POLICY):
        self.url = url.rstrip("/")
        self.policy = policy
        self.session = requests.Session()
        self._info: dict | None = None
        self._head: OutputHead | None = None

    def _call(self, method: str, path: str, what: str, **kwargs) -> requests.Response:
        return request(method, f"{self.url}{path}", self.policy, what=what, session=self.session, **kwargs)

    def check_ready(self, wait_seconds: float = 0) -> None:
        """GET /health, retried for at most `wait_seconds` (0: one try); `TeacherServerError` if nothing answers."""
        # Short polls: a server that is still loading its model should be seen soon after it listens.
        policy = RetryPolicy(timeout=min(self.policy.timeout, 10.0), retry_seconds=wait_seconds,
                             backoff_initial=0.25, backoff_max=2.0)
        try:
            response = request("GET", f"{self.url}/health", policy, what="a health check", session=self.session)
        except TeacherServerError as error:
            parts = urlsplit(self.url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            raise TeacherServerError(
                f"No teacher server answers at {self.url} (teacher_model_server_url; waited {wait_seconds:g} s, "
                f"teacher_server_wait_seconds): start it with: trl-opd serve-teacher MODEL --port {port}, or point "
                "the URL at the running server."
            ) from error
        if _json(response) != {"status": "ok"}:
            raise TeacherResponseError(
                f"{self.url}/health answered {response.text[:200]!r}, not {{'status': 'ok'}}: is this a trl_opd "
                "teacher server (`trl-opd serve-teacher`)?"
            )

    def info(self) -> dict:
        """GET /info (cached): backend, model, vocab_size, hidden_size, num_layers, max_length, tokenizer_vocab_size,
        tokenizer_sha256, dtype."""
        if self._info is None:
            info = _json(self._call("GET", "/info", what="the teacher's description"))
            if not isinstance(info, dict) or info.get("backend") != "trl_opd":
                raise TeacherResponseError(
                    f"{self.url}/info answered {str(info)[:200]}, not a trl_opd teacher server's description."
                )
            self._info = info
        return self._info

    def head(self) -> OutputHead:
        """The teacher's LM head (fetched once, cached): weight [V, d] on the CPU in the teacher's dtype."""
        if self._head is None:
            response = self._call("GET", "/head", what="the teacher's LM head")
            tensors, meta = decode_tensors(response.content)
            info = self.info()
            _check_shape("weight", tensors.get("weight"), (info["vocab_size"], info["hidden_size"]))
            if "bias" in tensors:
                _check_shape("bias", tensors["bias"], (info["vocab_size"],))
            self._head = OutputHead(weight=tensors["weight"], bias=tensors.get("bias"), softcap=meta.get("softcap"),
                                    scale=float(meta.get("scale", 1.0)), vocab_size=None)
        return self._head

    def score(self, input_ids: Tensor, attention_mask: Tensor, *, logits_to_keep: int, last_hidden: bool = False,
              layers: Sequence[int] = (), positions: Tensor | None = None, token_ids: Tensor | None = None,
              temperature: float = 1.0, top_k: int = 0, sampled: bool = False,
              explicit_position_ids: bool = False) -> dict[str, Tensor]:
        """The teacher's outputs for a batch, on the CPU (C = logits_to_keep, the last C tokens are scored):

        last_hidden [B, C, d]; layer_{i} [B, K, d] for i in `layers` (HF hidden_states indices, at `positions`
        [B, K]); token_logprobs [B, C, m] at `token_ids` [B, C, m]; top_k_ids / top_k_logprobs [B, C, k];
        sampled_logprobs [B, C] at input_ids[:, -C:]. Log-probs are float32 of log_softmax(logits / temperature).
        """
        if layers and positions is None:
            raise ValueError("layers need positions [B, K]: the sequence positions whose states are returned.")
        tensors = {"input_ids": input_ids.long(), "attention_mask": attention_mask.long()}
        if token_ids is not None:
            tensors["token_ids"] = token_ids.long()
        if positions is not None:
            tensors["positions"] = positions.long()
        meta = {"logits_to_keep": int(logits_to_keep), "last_hidden": bool(last_hidden),
                "layers": [int(index) for index in layers], "temperature": float(temperature), "top_k": int(top_k),
                "sampled": bool(sampled), "explicit_position_ids": bool(explicit_position_ids)}
        response = self._call("POST", "/score", what="the teacher's scores", data=encode_tensors(tensors, meta),
                              headers={"Content-Type": TENSOR_CONTENT_TYPE})
        answer, _ = decode_tensors(response.content)
        self._check_answer(answer, self._expected_shapes(tensors, meta))
        return answer

    def _expected_shapes(self, tensors: dict[str, Tensor], meta: dict) -> dict[str, tuple[int, ...]]:
        batch, width, hidden = tensors["input_ids"].size(0), meta["logits_to_keep"], self.info()["hidden_size"]
        expected = {"last_hidden": (batch, width, hidden)} if meta["last_hidden"] else {}
        for index in meta["layers"]:
            expected[f"layer_{index}"] = (batch, tensors["positions"].size(1), hidden)
        if "token_ids" in tensors:
            expected["token_logprobs"] = (batch, width, tensors["token_ids"].size(-1))
        if meta["top_k"]:
            expected["top_k_ids"] = expected["top_k_logprobs"] = (batch, width, meta["top_k"])
        if meta["sampled"]:
            expected["sampled_logprobs"] = (batch, width)
        return expected

    def _check_answer(self, answer: dict[str, Tensor], expected: dict[str, tuple[int, ...]]) -> None:
        """Exactly the tensors asked for, with their shapes, log-probs in float32 and ids in the vocabulary: an answer
        of another shape would misalign the teacher with the student."""
        if set(answer) != set(expected):
            raise TeacherResponseError(
                f"The teacher server at {self.url} answered tensors {sorted(answer)}; asked for {sorted(expected)}."
            )
        for name, shape in expected.items():
            _check_shape(name, answer[name], shape)
            if name.endswith("logprobs") and answer[name].dtype != torch.float32:
                raise TeacherResponseError(f"The teacher's {name} are {answer[name].dtype}, not float32.")
        ids = answer.get("top_k_ids")
        if ids is not None:
            vocab_size = self.info()["vocab_size"]
            if ids.dtype != torch.int64 or (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size)):
                raise TeacherResponseError(
                    f"The teacher's top_k_ids ({ids.dtype}) must be int64 ids in [0, {vocab_size})."
                )


def _check_shape(name: str, tensor: Tensor | None, shape: tuple[int, ...]) -> None:
    got = None if tensor is None else tuple(tensor.shape)
    if got != tuple(shape):
        raise TeacherResponseError(f"The teacher's {name} has shape {got}; expected {tuple(shape)}.")


def _json(response: requests.Response):
    try:
        return response.json()
    except ValueError:
        raise TeacherResponseError(f"{response.url} answered {response.text[:200]!r}, which is not JSON.") from None
