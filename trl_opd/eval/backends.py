"""Generation backends: vLLM, transformers ``generate`` and an OpenAI-compatible completions endpoint.

Each backend turns a list of :class:`Request` into one :class:`Completion` per request, in order.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling parameters shared by all backends (``temperature=0`` means greedy)."""

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int | None = None
    max_new_tokens: int = 32768

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be None (off) or >= 1, got {self.top_k}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")


@dataclass(frozen=True)
class Request:
    """One sample to generate: the prompt text, a per-sample seed, and whether to add special tokens (BOS)."""

    prompt: str
    seed: int
    add_special_tokens: bool = True


@dataclass
class Completion:
    """A generated completion; ``finish_reason`` is ``"stop"`` (end of sequence) or ``"length"`` (truncated)."""

    text: str
    num_tokens: int
    finish_reason: str


class TransformersBackend:
    """Batched ``model.generate`` (works on CPU). Left-pads, samples, decodes only the new tokens.

    ``max_new_tokens`` is clipped to the model's ``max_position_embeddings`` minus the prompt length (with a
    warning), so the defaults also run on small models. The global torch RNG is restored after each batch, so
    evaluation during training does not change the training's random stream.
    """

    name = "transformers"

    def __init__(self, model, tokenizer, sampling: SamplingSettings, *, batch_size: int = 8) -> None:
        if tokenizer is None:
            raise ValueError(
                "The transformers backend needs a tokenizer: pass tokenizer=... or a model path."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.model, self.tokenizer, self.sampling, self.batch_size = model, tokenizer, sampling, batch_size
        self._warned_clip = False

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        sampling: SamplingSettings,
        *,
        tokenizer=None,
        batch_size: int = 8,
        dtype: str = "auto",
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, sampling, batch_size=batch_size)

    @property
    def chunk_size(self) -> int:
        return self.batch_size

    def _new_token_budget(self, prompt_length: int) -> int:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        budget = self.sampling.max_new_tokens
        if limit is not None and prompt_length + budget > limit:
            budget = max(1, limit - prompt_length)
            if not self._warned_clip:
                logger.warning("max_new_tokens clipped to %d: the model holds %d positions.", budget, limit)
                self._warned_clip = True
        return budget

    def generate(self, requests: list[Request]) -> list[Completion]:
        completions: list[Completion] = []
        for start in range(0, len(requests), self.batch_size):
            completions += self._generate_batch(requests[start : start + self.batch_size])
        return completions

    def _generate_batch(self, requests: list[Request]) -> list[Completion]:
        import torch

        tokenizer = self.tokenizer
        saved = tokenizer.padding_side, tokenizer.pad_token
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        try:
            encoded = tokenizer(
                [request.prompt for request in requests],
                return_tensors="pt",
                padding=True,
                add_special_tokens=requests[0].add_special_tokens,
            ).to(self.model.device)
        finally:
            tokenizer.padding_side, tokenizer.pad_token = saved
        prompt_length = encoded["input_ids"].shape[1]
        budget = self._new_token_budget(prompt_length)
        sampling = self.sampling
        options = dict(
            do_sample=sampling.temperature > 0,
            max_new_tokens=budget,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
        if sampling.temperature > 0:  # top_k=0 turns off transformers' default top-k of 50
            options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0)
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(requests[0].seed)
            output = self.model.generate(**encoded, **options)
        return [self._decode(row) for row in output[:, prompt_length:]]

    def _eos_ids(self) -> set[int]:
        configured = self.model.generation_config.eos_token_id
        ids = set(configured if isinstance(configured, (list, tuple)) else [configured])
        return (ids | {self.tokenizer.eos_token_id}) - {None}

    def _decode(self, new_tokens) -> Completion:
        """Text up to the first end-of-sequence token; without one the sample was cut at the token budget."""
        tokens = new_tokens.tolist()
        eos_ids = self._eos_ids()
        end = next((index for index, token in enumerate(tokens) if token in eos_ids), None)
        if end is None:
            return Completion(self.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), "length")
        return Completion(self.tokenizer.decode(tokens[: end + 1], skip_special_tokens=True), end + 1, "stop")

    def close(self) -> None:
        pass


class VLLMBackend:
    """vLLM offline inference (``vllm.LLM``); used by ``backend="auto"`` when vLLM is installed and a GPU is present.

    Prompts are passed as token ids (tokenised here), so a chat template's BOS is not added twice.
    Extra keyword arguments go to ``vllm.LLM`` (e.g. ``tensor_parallel_size``, ``gpu_memory_utilization``,
    ``max_model_len``).
    """

    name = "vllm"
    chunk_size = 512

    def __init__(
        self, model_path: str, sampling: SamplingSettings, *, tokenizer=None, seed: int = 0, **llm_kwargs
    ):
        from transformers import AutoTokenizer
        from vllm import LLM

        self.sampling = sampling
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model_path)
        self.llm = LLM(model=model_path, seed=seed, **llm_kwargs)

    def generate(self, requests: list[Request]) -> list[Completion]:
        from vllm import SamplingParams

        sampling = self.sampling
        params = [
            SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k or -1,
                max_tokens=sampling.max_new_tokens,
                seed=request.seed,
            )
            for request in requests
        ]
        prompts = [
            {
                "prompt_token_ids": self.tokenizer(r.prompt, add_special_tokens=r.add_special_tokens)[
                    "input_ids"
                ]
            }
            for r in requests
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        completions = []
        for output in outputs:
            sample = output.outputs[0]
            reason = "length" if sample.finish_reason == "length" else "stop"
            completions.append(Completion(sample.text, len(sample.token_ids), reason))
        return completions

    def close(self) -> None:
        del self.llm


class OpenAICompletionsBackend:
    """An OpenAI-compatible ``/completions`` endpoint (vLLM ``serve``, SGLang, TGI, ...), queried concurrently.

    Args:
        base_url: the API root, e.g. ``http://localhost:8000/v1``.
        model: the served model name.
        api_key: sent as a bearer token (default: ``$OPENAI_API_KEY``, else none).
        max_concurrency: parallel requests. ``top_k`` and ``seed`` are sent only when set (vLLM reads both).
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        sampling: SamplingSettings,
        *,
        api_key: str | None = None,
        max_concurrency: int = 8,
        request_timeout: float = 3600.0,
        max_retries: int = 3,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}.")
        self.url = base_url.rstrip("/") + "/completions"
        self.model, self.sampling = model, sampling
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.max_concurrency, self.request_timeout, self.max_retries = (
            max_concurrency,
            request_timeout,
            max_retries,
        )

    @property
    def chunk_size(self) -> int:
        return 4 * self.max_concurrency

    def _payload(self, request: Request) -> dict:
        sampling = self.sampling
        payload = {
            "model": self.model,
            "prompt": request.prompt,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "n": 1,
            "seed": request.seed,
        }
        if sampling.top_k is not None:
            payload["top_k"] = sampling.top_k
        return payload

    def _post(self, request: Request) -> Completion:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = json.dumps(self._payload(request)).encode()
        for attempt in range(self.max_retries + 1):
            try:
                http_request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(http_request, timeout=self.request_timeout) as response:
                    reply = json.loads(response.read())
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
                client_error = isinstance(error, urllib.error.HTTPError) and 400 <= error.code < 500
                if client_error or attempt == self.max_retries:
                    raise RuntimeError(f"Completion request to {self.url} failed: {error}") from error
                time.sleep(min(30.0, 2.0**attempt))
        choice = reply["choices"][0]
        tokens = reply.get("usage", {}).get("completion_tokens", 0)
        return Completion(
            choice["text"], tokens, "length" if choice.get("finish_reason") == "length" else "stop"
        )

    def generate(self, requests: list[Request]) -> list[Completion]:
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as executor:
            return list(executor.map(self._post, requests))

    def close(self) -> None:
        pass


def vllm_usable() -> bool:
    """vLLM is importable and a CUDA GPU is visible."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()
