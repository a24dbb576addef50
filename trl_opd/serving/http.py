"""The HTTP layer every served teacher goes through: retries with backoff, clear errors, binary tensor bodies.

Faults (issue 15): a request that cannot reach the server (connection refused or reset, a timeout, a 5xx answer) is
retried with exponential backoff (1 s, 2 s, 4 s, ... at most `backoff_max`) until `retry_seconds` have passed since
the first try; then `TeacherServerError` stops the run. It is raised inside the loss of the step being computed, so
no optimizer step is applied with a partial signal and no checkpoint is written by it: the last checkpoint is the
one `resume_from_checkpoint=True` continues from. An answer the client cannot use (a 4xx, the wrong shape, ids outside
the vocabulary) is `TeacherResponseError` at once: retrying would not change it, and reading it anyway would misalign
the teacher with the student.

Tensors travel as safetensors bytes (`encode_tensors` / `decode_tensors`): exact, typed, no JSON lists of floats; a
small JSON dict rides in the safetensors metadata.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass

import requests
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

TENSOR_CONTENT_TYPE = "application/x-safetensors"
_META_KEY = "trl_opd"


class TeacherServerError(RuntimeError):
    """The teacher server could not be reached (at start, or for longer than the retry window mid-run)."""


class TeacherResponseError(ValueError):
    """The teacher server answered with something that cannot be used (an error, a wrong shape or vocabulary)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long one request may take, and how long a failing server is retried before the run stops.

    Attributes:
        timeout: seconds one HTTP request may take (connect + read).
        retry_seconds: total seconds a request is retried while the server is unreachable or answers 5xx; 0 tries
            once.
        backoff_initial / backoff_max: seconds before the first retry; the longest wait between two tries.
    """

    timeout: float = 120.0
    retry_seconds: float = 300.0
    backoff_initial: float = 1.0
    backoff_max: float = 30.0


def _is_transient(response: requests.Response | None) -> bool:
    return response is None or response.status_code >= 500


def request(method: str, url: str, policy: RetryPolicy, *, what: str, session: requests.Session | None = None,
            **kwargs) -> requests.Response:
    """`requests.request` with the retry policy; raises `TeacherServerError` after the window, `TeacherResponseError`
    on a 4xx. `what` names the request in the errors ("the teacher's top-k log-probs")."""
    send = session.request if session is not None else requests.request
    deadline = time.monotonic() + policy.retry_seconds
    wait, attempts = policy.backoff_initial, 0
    while True:
        attempts += 1
        response, failure = None, None
        try:
            response = send(method, url, timeout=policy.timeout, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as error:
            failure = f"{type(error).__name__}: {error}"
        if response is not None and not _is_transient(response):
            if response.status_code >= 400:
                raise TeacherResponseError(
                    f"The teacher server at {url} refused {what} with HTTP {response.status_code}: "
                    f"{response.text[:500]}"
                )
            return response
        if failure is None:
            failure = f"HTTP {response.status_code}: {response.text[:300]}"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TeacherServerError(
                f"The teacher server at {url} did not answer {what} after {attempts} tries over "
                f"{policy.retry_seconds:g} s (teacher_server_retry_seconds); last error: {failure}. "
                "The step was stopped before its update, so no checkpoint holds a partial step: restart the server "
                "and run again with `resume_from_checkpoint=True`."
            )
        time.sleep(min(wait, remaining))
        wait = min(wait * 2, policy.backoff_max)


def encode_tensors(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> bytes:
    """safetensors bytes of contiguous CPU tensors, with `meta` (JSON-serialisable) in the header."""
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    return save_safetensors(tensors, metadata={_META_KEY: json.dumps(meta or {})})


def decode_tensors(body: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) from `encode_tensors` bytes; a body that is not one is a `TeacherResponseError`."""
    try:
        (header_length,) = struct.unpack("<Q", body[:8])
        header = json.loads(body[8: 8 + header_length])
        meta = json.loads(header.get("__metadata__", {}).get(_META_KEY, "{}"))
        return load_safetensors(body), meta
    except Exception as error:  # any malformed body: say what it was, not a struct error
        raise TeacherResponseError(
            f"The teacher server's answer is not a safetensors body ({len(body)} bytes; {error})."
        ) from error
