"""The served-teacher fields of `OPDConfig` and `RLADConfig`, and which teacher signals a config needs.

A served teacher gives some signals and not others (methods.md §0.9):

| signal | what the loss reads | vLLM (`/v1/completions`, `prompt_logprobs`) | trl_opd server |
|---|---|---|---|
| `sampled` | log p_T(ŷ_t) of each sampled token | yes (T = 1) | yes (any T) |
| `teacher_top_k` | the teacher's top-k log-probs per token | yes, k ≤ `teacher_server_top_k` (T = 1) | yes |
| `distribution` | the teacher's whole next-token distribution | no | yes: last hidden states + the head |
| `layers` | hidden states at chosen layers (OPRD) | no | yes |
| `generate` | the teacher writing completions (`seq_kd`) | no | no |

`needed_signals(config)` lists what a config's method reads (each with the field that asks for it);
`ServedTeacherArguments.validate_served_teacher_arguments` refuses a config whose method needs a signal its backend
cannot give, at construction, naming the backend that can.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("vllm", "trl_opd")
BACKEND_SIGNALS = {
    "vllm": frozenset({"sampled", "teacher_top_k"}),
    "trl_opd": frozenset({"sampled", "teacher_top_k", "distribution", "layers"}),
}
BACKEND_NAMES = {"vllm": "a vLLM server (`vllm serve`)", "trl_opd": "trl_opd's teacher server (`trl-opd serve-teacher`)"}
FIXED_TEMPERATURE = {"vllm": 1.0}  # vLLM's prompt log-probs are the model's raw log-softmax


@dataclass
class ServedTeacherArguments:
    r"""
    A teacher served by another process (methods.md §0.9), mixed into `OPDConfig` and `RLADConfig`.

    Parameters:
        > Served teacher

        teacher_model_server_url (`str` or `None`, defaults to `None`):
            URL of a teacher server (`http://host:port`), the name TRL's `ServerDistillationConfig` uses. Set it
            instead of `teacher_model_name_or_path`: the teacher then never loads in the training processes. The
            server is asked once before the student loads (a server that is down fails then, with its URL).
        teacher_server_backend (`str`, defaults to `"vllm"`):
            `"vllm"`: a stock `vllm serve MODEL` (OpenAI-compatible); it returns the teacher's top-k log-probs and the
            sampled token's log-prob at T = 1, which serve the teacher-top-k support (`loss_top_k` ≤
            `teacher_server_top_k`, `loss_top_k_source="teacher"`, with or without `loss_top_k_tail`), the
            sampled-token estimators, TIP on that support, position weights, the evidence mask and RLAD.
            `"trl_opd"`: `trl-opd serve-teacher MODEL`; it returns the teacher's last hidden states (and hidden states
            at OPRD's layers) and its LM head once, so every method runs exactly as with a local teacher, at the cost
            of one copy of the teacher's LM head in each training process.
        teacher_server_top_k (`int`, defaults to `20`):
            vLLM: log-probs per token asked for (`prompt_logprobs`); vLLM's `--max-logprobs` (default 20) caps it.
        teacher_server_model (`str` or `None`, defaults to `None`):
            vLLM: the served model's name in requests; `None` takes the server's only model.
        teacher_server_timeout (`float`, defaults to `120.0`):
            Seconds one request may take.
        teacher_server_retry_seconds (`float`, defaults to `300.0`):
            Mid-run, a server that cannot be reached (or answers 5xx) is retried with backoff for this long; then
            the run stops with an error before the step's update. Resume with `resume_from_checkpoint=True`.
        teacher_server_wait_seconds (`float`, defaults to `0.0`):
            At start, how long to wait for the server to come up (0: it must answer at once).
    """

    teacher_model_server_url: str | None = field(
        default=None, metadata={"help": "URL of a teacher server (vLLM or `trl-opd serve-teacher`)."}
    )
    teacher_server_backend: str = field(default="vllm", metadata={"help": "Teacher server kind: vllm or trl_opd."})
    teacher_server_top_k: int = field(default=20, metadata={"help": "vLLM: top-k log-probs per token asked for."})
    teacher_server_model: str | None = field(default=None, metadata={"help": "vLLM: the served model's name."})
    teacher_server_timeout: float = field(default=120.0, metadata={"help": "Seconds one teacher request may take."})
    teacher_server_retry_seconds: float = field(
        default=300.0, metadata={"help": "Seconds an unreachable teacher server is retried mid-run."}
    )
    teacher_server_wait_seconds: float = field(
        default=0.0, metadata={"help": "Seconds to wait for the teacher server at start."}
    )

    @property
    def served_teacher(self) -> bool:
        return self.teacher_model_server_url is not None

    def validate_served_teacher_arguments(self) -> None:
        """Field values, then what the method needs against what the backend gives (before any load)."""
        if self.teacher_server_backend not in BACKENDS:
            raise ValueError(f"`teacher_server_backend` must be one of {BACKENDS}, got {self.teacher_server_backend!r}.")
        for name in ("teacher_server_timeout", "teacher_server_retry_seconds", "teacher_server_wait_seconds"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"`{name}` must be a number of seconds >= 0, got {getattr(self, name)!r}.")
        if not self.teacher_server_top_k >= 1:
            raise ValueError(f"`teacher_server_top_k` must be >= 1, got {self.teacher_server_top_k}.")
        if not self.served_teacher:
            return
        url = self.teacher_model_server_url
        if not (isinstance(url, str) and url.startswith(("http://", "https://"))):
            raise ValueError(f"`teacher_model_server_url` must be an http(s) URL like http://localhost:8000, got {url!r}.")
        if self.teacher_model_name_or_path is not None:
            raise ValueError(
                f"Both `teacher_model_name_or_path`={self.teacher_model_name_or_path!r} and "
                f"`teacher_model_server_url`={url!r} are set: the teacher is either loaded here or served. Unset one."
            )
        refuse_unserved_signals(self, self.teacher_server_backend, self.teacher_server_top_k)

_SIGNAL_WORDS = {
    "sampled": "the teacher's log-prob of each sampled token",
    "teacher_top_k": "the teacher's top-k log-probs",
    "distribution": "the teacher's whole next-token distribution",
    "layers": "the teacher's hidden states at chosen layers",
    "generate": "the teacher to generate completions",
}


def refuse_unserved_signals(config, backend: str, top_k: int, where: str = "") -> None:
    """A ValueError when `config`'s method needs a signal `backend` cannot return (naming the backends that can), or
    reads it at a temperature or top-k it cannot serve. `where` prefixes the message (one of several teachers)."""
    given, prefix = BACKEND_SIGNALS[backend], f"{where}: " if where else ""
    for signal, reason in needed_signals(config):
        if signal in given:
            continue
        others = [BACKEND_NAMES[name] for name, signals in BACKEND_SIGNALS.items() if signal in signals]
        remedy = f"; {' or '.join(others)} can" if others else "; no served teacher can: load the teacher locally"
        raise ValueError(
            f"{prefix}{reason} needs {_SIGNAL_WORDS[signal]}, which {BACKEND_NAMES[backend]} cannot return{remedy} "
            f"(teacher_server_backend={'|'.join(BACKENDS)})."
        )
    fixed, temperature = FIXED_TEMPERATURE.get(backend), _teacher_temperature(config)
    if fixed is not None and temperature != fixed:
        raise ValueError(
            f"{prefix}{BACKEND_NAMES[backend]} returns log-probs at temperature {fixed}, but this config reads the "
            f"teacher at {temperature} (`distillation_temperature`, else `temperature`). Set it to {fixed}, or use "
            f"{BACKEND_NAMES['trl_opd']} (any temperature)."
        )
    loss_top_k = getattr(config, "loss_top_k", None)
    if backend == "vllm" and loss_top_k is not None and loss_top_k > top_k:
        raise ValueError(
            f"{prefix}loss_top_k={loss_top_k} exceeds teacher_server_top_k={top_k}, the log-probs per token asked of "
            "vLLM: raise teacher_server_top_k (and vLLM's --max-logprobs)."
        )


def _teacher_temperature(config) -> float:
    effective = getattr(config, "effective_distillation_temperature", None)
    return config.temperature if effective is None else effective


def needed_signals(config) -> list[tuple[str, str]]:
    """(signal, the setting that needs it) for everything `config`'s method reads from the teacher."""
    if not hasattr(config, "estimator"):  # RLADConfig: the TRRD ratio reads the sampled token's log-prob only
        return [("sampled", "RLAD's trust-region ratio")]
    if getattr(config, "trainer_name", None) == "SimCTTrainer":  # segment rows over the teacher's own vocabulary
        return [("distribution", "SimCT (the teacher's logits over its own vocabulary at every position)")]
    needs = []
    uses_heads = not (config.representation_weight > 0 and config.logit_weight == 0)
    if uses_heads:
        support = _support_signal(config)
        if config.estimator == "analytic":
            needs.append(support)
        else:
            needs.append(("sampled", f"estimator={config.estimator!r}"))
        if config.token_selection != "none":
            needs.append((support[0], f"token_selection={config.token_selection!r} (scored on the loss's support)"))
        if config.evidence_mode != "none":
            needs.append(("sampled", f"evidence_mode={config.evidence_mode!r}"))
        if config.diagnostics_steps > 0:
            needs.append(("distribution", "diagnostics_steps > 0 (the top-k overlap diagnostics)"))
    if config.representation_weight > 0:
        needs.append(("layers", "OPRD (representation_weight > 0)"))
    if config.seq_kd and config.lmbda < 1:
        needs.append(("generate", "seq_kd=True"))
    return needs


def _support_signal(config) -> tuple[str, str]:
    if config.loss_top_k is None:
        return "distribution", "the full-vocabulary divergence (loss_top_k=None)"
    if config.loss_top_k_source != "teacher":
        return "distribution", f"loss_top_k_source={config.loss_top_k_source!r}"
    return "teacher_top_k", f"loss_top_k={config.loss_top_k} with loss_top_k_source='teacher'"
