"""The teacher of a training run when it is served: one interface, one class per backend (methods.md §0.9).

    teacher = connect_teacher(args)                      # before any weights load: is it up, same tokenizer?
    teacher.check_tokenizer(student_tokenizer, probe)
    signal = teacher.signal(rows, ...)                   # per micro-batch: what the objective reads

`rows` is a `TeacherRows`: the teacher's prompt ids (left-padded) and the completion ids (right-padded) with their
masks, exactly what a local teacher's forward gets. `signal` returns what `OPDObjective` reads from a teacher:

* `VLLMTeacher` → `ServedTeacher`: top-k log-probs and the sampled token's log-prob at each completion position;
* `TrlOpdTeacher` → `LocalTeacher`: the teacher's last hidden states at the completion positions and its LM head
  (fetched once), so every pass runs as with a local teacher; with OPRD `fetch` also returns the hidden states at
  the requested layers and positions (`layer_{i}`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..losses import check_served_temperature
from ..objective import LocalTeacher, ServedTeacher
from .arguments import needed_signals
from .http import RetryPolicy
from .vllm_client import VLLMTeacherClient


@dataclass
class TeacherRows:
    """One micro-batch as the teacher sees it: `[B, P]` prompt ids/mask (left-padded), `[B, C]` completion ids/mask
    (right-padded)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    def unpadded(self) -> tuple[list[list[int]], list[list[int]]]:
        """Each row's prompt and completion tokens without padding (a completion ends at its last unmasked token)."""
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(self.prompt_ids.cpu(), self.prompt_mask.cpu())]
        lengths = [int(mask.nonzero().max()) + 1 if mask.any() else 0 for mask in self.completion_mask.cpu()]
        completions = [ids[:length].tolist() for ids, length in zip(self.completion_ids.cpu(), lengths)]
        return prompts, completions

    def sequence(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([self.prompt_ids, self.completion_ids], dim=1),
                torch.cat([self.prompt_mask, self.completion_mask], dim=1))


def _policy(args) -> RetryPolicy:
    return RetryPolicy(timeout=args.teacher_server_timeout, retry_seconds=args.teacher_server_retry_seconds)


class VLLMTeacher:
    """A vLLM server: `ServedTeacher` signals (top-k and sampled-token log-probs at T = 1)."""

    def __init__(self, args):
        self.url = args.teacher_model_server_url
        # Top-k log-probs only when the method reads a distribution; the sampled-token methods ask for none.
        reads_top_k = any(signal == "teacher_top_k" for signal, _ in needed_signals(args))
        self.top_k = args.teacher_server_top_k if reads_top_k else 0
        self.client = VLLMTeacherClient(self.url, _policy(args), model=args.teacher_server_model)

    def check_ready(self, wait_seconds: float) -> None:
        self.client.check_ready(wait_seconds)

    def check_tokenizer(self, tokenizer, probe_text: str) -> None:
        self.client.check_tokenizer(tokenizer, probe_text)

    def signal(self, rows: TeacherRows, *, temperature: float, vocab_size: int) -> ServedTeacher:
        check_served_temperature(1.0, temperature)
        prompts, completions = rows.unpadded()
        served = self.client.completion_logprobs(prompts, completions, top_k=self.top_k,
                                                 width=rows.completion_ids.shape[1], vocab_size=vocab_size)
        device = rows.completion_ids.device
        return ServedTeacher(
            completion_ids=rows.completion_ids,
            vocab_size=vocab_size,
            temperature=1.0,
            sampled_logprobs=served["sampled_logprobs"].to(device),
            support_ids=served["top_k_ids"].to(device),
            support_logprobs=served["top_k_logprobs"].to(device),
        )


    def sampled_logprobs(self, rows: TeacherRows, *, temperature: float, vocab_size: int) -> torch.Tensor:
        """`[B, C]` log p_T of the completion tokens (0 on padding), at T = 1 (RLAD's ratio)."""
        check_served_temperature(1.0, temperature)
        prompts, completions = rows.unpadded()
        served = self.client.completion_logprobs(prompts, completions, top_k=0, width=rows.completion_ids.shape[1],
                                                 vocab_size=vocab_size)
        return served["sampled_logprobs"].to(rows.completion_ids.device)


class TrlOpdTeacher:
    """trl_opd's teacher server: `LocalTeacher` signals from its hidden states and its head (any temperature)."""

    def __init__(self, args):
        from .trl_opd_client import TrlOpdTeacherClient

        self.url = args.teacher_model_server_url
        self.client = TrlOpdTeacherClient(self.url, _policy(args))
        # The hidden states must be computed with the positions the trainer uses for the student (OPDConfig's field).
        self.explicit_position_ids = bool(getattr(args, "explicit_position_ids", False))
        self._heads = {}  # (device, vocab_size) -> the head there: copied once, not once per micro-batch

    def check_ready(self, wait_seconds: float) -> None:
        self.client.check_ready(wait_seconds)

    def check_tokenizer(self, tokenizer, probe_text: str) -> None:
        """The server's tokenizer has exactly `tokenizer`'s vocabulary (its fingerprint), when the server has one."""
        from .teacher_server import tokenizer_sha256

        served = self.client.info().get("tokenizer_sha256")
        if served is not None and served != tokenizer_sha256(tokenizer):
            raise ValueError(
                f"The teacher served at {self.url} has another tokenizer (vocabulary fingerprint {served[:12]}... "
                f"against {tokenizer_sha256(tokenizer)[:12]}... here, {len(tokenizer)} tokens): the trainer and the "
                "server must use the same one (OPDTrainer: the student's; SimCTTrainer: teacher_tokenizer_name_or_path)."
            )

    @property
    def info(self) -> dict:
        return self.client.info()

    def head(self, device, vocab_size: int | None):
        """The teacher's LM head (fetched once by the client) on `device`, sliced to the compared vocabulary."""
        key = (torch.device(device), vocab_size)
        if key not in self._heads:
            head = self.client.head()
            self._heads[key] = dataclasses.replace(
                head, weight=head.weight.to(device), bias=None if head.bias is None else head.bias.to(device),
                vocab_size=vocab_size,
            )
        return self._heads[key]

    def fetch(self, rows: TeacherRows, *, layers=(), positions=None) -> dict[str, torch.Tensor]:
        """The server's last hidden states at the completion positions (and OPRD's layers), on the rows' device."""
        input_ids, attention_mask = rows.sequence()
        out = self.client.score(input_ids.cpu(), attention_mask.cpu(), logits_to_keep=rows.completion_ids.shape[1],
                                last_hidden=True, layers=tuple(layers),
                                positions=None if positions is None else positions.cpu(),
                                explicit_position_ids=self.explicit_position_ids)
        return {name: tensor.to(rows.completion_ids.device) for name, tensor in out.items()}

    def sampled_logprobs(self, rows: TeacherRows, *, temperature: float, vocab_size: int | None = None) -> torch.Tensor:
        """`[B, C]` log p_T of the completion tokens at `temperature`, computed on the server (RLAD's ratio)."""
        input_ids, attention_mask = rows.sequence()
        out = self.client.score(input_ids.cpu(), attention_mask.cpu(), logits_to_keep=rows.completion_ids.shape[1],
                                sampled=True, temperature=temperature,
                                explicit_position_ids=self.explicit_position_ids)
        return out["sampled_logprobs"].to(rows.completion_ids.device)

    def signal(self, rows: TeacherRows, *, vocab_size: int | None, fetched: dict | None = None) -> LocalTeacher:
        """The served hidden states and the head, on the rows' device; `fetched`: an answer of `fetch` already asked
        for (with OPRD's layers). The loss's temperature applies to them as to a local teacher's."""
        fetched = fetched if fetched is not None else self.fetch(rows)
        device = rows.completion_ids.device
        return LocalTeacher(fetched["last_hidden"], self.head(device, vocab_size))


BACKENDS = {"vllm": VLLMTeacher, "trl_opd": TrlOpdTeacher}


def connect_teacher(args):
    """The backend `args` names, after checking that its server answers (fails with the URL before any load)."""
    teacher = BACKENDS[args.teacher_server_backend](args)
    teacher.check_ready(args.teacher_server_wait_seconds)
    return teacher
