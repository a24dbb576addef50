"""A stock vLLM server as a teacher: its top-k log-probs and the sampled token's log-prob at every completion position.

The route is the one TRL's `VLLMClient.get_sequence_logprobs` uses: `POST /v1/completions` with the whole sequence
(prompt + completion, no padding) as token ids, `max_tokens=1` and `prompt_logprobs=k`. vLLM then returns, for every
position j ≥ 1, a dict {token id: {"logprob", "rank", ...}} holding its top-k ids and the id at j (k or k + 1 entries).
The log-probs are the model's raw log-softmax (temperature 1, whatever the request's sampling temperature).

Checks at start (`check_ready`, `check_tokenizer`, before the student loads): the server answers `/v1/models`, serves
the named model, and tokenises a probe text into the student's ids (`/tokenize`): a teacher with another vocabulary
would be silently misaligned otherwise. Every answer is checked: one choice per sequence, one entry per position, ids
inside the compared vocabulary, the scored token equal to the sequence's.
"""

from __future__ import annotations

import torch

from .http import RetryPolicy, TeacherResponseError, TeacherServerError, request


DEFAULT_POLICY = RetryPolicy()


class VLLMTeacherClient:
    """Teacher log-probs from a vLLM OpenAI-compatible server at `url`."""

    def __init__(self, url: str, policy: RetryPolicy = DEFAULT_POLICY, *, model: str | None = None):
        self.url = url.rstrip("/")
        self.policy = policy
        self._model = model

    # ------------------------------------------------------------------ start-up checks

    def check_ready(self, wait_seconds: float = 0.0) -> None:
        """The server answers `/v1/models` (waiting up to `wait_seconds`) and serves the model asked for."""
        policy = RetryPolicy(timeout=min(self.policy.timeout, 30.0), retry_seconds=wait_seconds)
        try:
            answer = request("GET", f"{self.url}/v1/models", policy, what="its model list").json()
        except TeacherServerError as error:
            raise TeacherServerError(
                f"No vLLM teacher server answers at {self.url} (teacher_model_server_url). Start it first, e.g. "
                f"`vllm serve TEACHER --port PORT --max-logprobs 20`, or give it time with "
                f"teacher_server_wait_seconds. ({error})"
            ) from None
        served = sorted(entry["id"] for entry in answer.get("data", []))
        if self._model is None:
            if len(served) != 1:
                raise TeacherResponseError(
                    f"The vLLM server at {self.url} serves {served}: name one with teacher_server_model."
                )
            self._model = served[0]
        elif self._model not in served:
            raise TeacherResponseError(
                f"teacher_server_model={self._model!r} is not served at {self.url}; it serves {served}."
            )

    @property
    def model(self) -> str:
        if self._model is None:
            self.check_ready()
        return self._model

    def check_tokenizer(self, tokenizer, probe_text: str) -> None:
        """The served model's tokenizer splits `probe_text` into the student tokenizer's ids."""
        expected = tokenizer(probe_text, add_special_tokens=False)["input_ids"]
        body = {"model": self.model, "prompt": probe_text, "add_special_tokens": False}
        served = request("POST", f"{self.url}/tokenize", self.policy, json=body, what="a tokenisation").json()
        if served.get("tokens") != expected:
            raise ValueError(
                f"The teacher served at {self.url} ({self.model}) tokenises {probe_text[:60]!r} into "
                f"{served.get('tokens', [])[:12]}..., the student's tokenizer into {expected[:12]}...: OPDTrainer and "
                "RLADTrainer need one shared tokenizer (for a teacher with another tokenizer use SimCTTrainer)."
            )

    # ------------------------------------------------------------------ scoring

    def completion_logprobs(self, prompts: list[list[int]], completions: list[list[int]], *, top_k: int,
                            width: int, vocab_size: int) -> dict[str, torch.Tensor]:
        """The teacher's log-probs at each completion token of each row, right-padded to `width` positions.

        Returns `sampled_logprobs` [B, width] (log p_T of the completion token; 0 on padding), `top_k_ids`
        [B, width, top_k] (−1 on padding) and `top_k_logprobs` [B, width, top_k], sorted by rank (top_k = 0: only
        the sampled tokens').
        """
        sequences = [prompt + completion for prompt, completion in zip(prompts, completions)]
        body = {"model": self.model, "prompt": sequences, "max_tokens": 1, "temperature": 1.0,
                "prompt_logprobs": top_k}
        answer = request("POST", f"{self.url}/v1/completions", self.policy, json=body,
                         what="the teacher's top-k log-probs").json()
        choices = sorted(answer.get("choices", []), key=lambda choice: choice["index"])
        if len(choices) != len(sequences):
            raise TeacherResponseError(f"vLLM at {self.url} returned {len(choices)} choices for {len(sequences)} rows.")
        out = {
            "sampled_logprobs": torch.zeros(len(sequences), width),
            "top_k_ids": torch.full((len(sequences), width, top_k), -1, dtype=torch.long),
            "top_k_logprobs": torch.full((len(sequences), width, top_k), float("-inf")),
        }
        for row, (choice, prompt, completion) in enumerate(zip(choices, prompts, completions)):
            self._fill_row(out, row, choice.get("prompt_logprobs"), len(prompt), completion, top_k, vocab_size)
        return out

    def _fill_row(self, out, row: int, positions, prompt_length: int, completion: list[int], top_k: int,
                  vocab_size: int) -> None:
        if positions is None or len(positions) != prompt_length + len(completion):
            got = None if positions is None else len(positions)
            raise TeacherResponseError(
                f"vLLM at {self.url} returned prompt log-probs for {got} positions of a {prompt_length + len(completion)}"
                "-token sequence (is prompt_logprobs allowed, and the sequence within max_model_len?)."
            )
        for t, token in enumerate(completion):
            entries = {int(token_id): entry for token_id, entry in positions[prompt_length + t].items()}
            if token not in entries:
                raise TeacherResponseError(f"vLLM at {self.url} did not score the sequence's own token {token}.")
            ranked = sorted((entry["rank"], token_id, entry["logprob"]) for token_id, entry in entries.items())
            ranked = [(token_id, logprob) for rank, token_id, logprob in ranked if rank <= top_k][:top_k]
            if len(ranked) < min(top_k, vocab_size) or any(not 0 <= token_id < vocab_size for token_id, _ in ranked):
                raise TeacherResponseError(
                    f"vLLM at {self.url} returned top-k ids {[i for i, _ in ranked][:8]} (need {top_k} ids below "
                    f"{vocab_size}, the compared vocabulary): raise --max-logprobs, or check the served model."
                )
            out["sampled_logprobs"][row, t] = entries[token]["logprob"]
            out["top_k_ids"][row, t] = torch.tensor([token_id for token_id, _ in ranked])
            out["top_k_logprobs"][row, t] = torch.tensor([logprob for _, logprob in ranked])
