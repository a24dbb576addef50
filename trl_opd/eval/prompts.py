r"""Prompts and sampling presets for math evaluation (``reference/landscape.md`` §4.5).

The default follows DeepSeek-R1 / Qwen / open-r1: the problem, then "Please reason step by step, and put your
final answer within \boxed{}.", inside the model's chat template (thinking on) when its tokenizer has one.
"""

from __future__ import annotations

DEFAULT_PROMPT_TEMPLATE = (
    "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
)

#: Named sampling settings for comparability with published numbers; splat into ``evaluate_math(**PRESETS[x])``.
PRESETS: dict[str, dict] = {
    "r1": dict(n=16, temperature=0.6, top_p=0.95, top_k=None, max_new_tokens=32768),
    "opsd": dict(n=12, temperature=1.0, top_p=0.95, top_k=None, max_new_tokens=38912, enable_thinking=True),
    "rethinking": dict(n=16, temperature=0.7, top_p=0.95, top_k=None, max_new_tokens=31744),
    "oprd": dict(n=16, temperature=0.7, top_p=0.95, top_k=None, max_new_tokens=15360),
    "tip": dict(n=16, temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=8192),
    "rlad": dict(n=32, temperature=0.6, top_p=0.95, top_k=None, max_new_tokens=32768),
    "tm": dict(n=32, temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=64000),
    "qwen3_thinking": dict(
        n=16, temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=32768, enable_thinking=True
    ),
}


def render_problem(problem: str, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """``template`` with ``{problem}`` replaced (plain replacement: the braces of ``\\boxed{}`` stay as they are)."""
    if "{problem}" not in template:
        raise ValueError("The prompt template must contain '{problem}' where the problem text goes.")
    return template.replace("{problem}", problem)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(
    problem: str,
    tokenizer=None,
    *,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    system_prompt: str | None = None,
    use_chat_template: bool | None = None,
    enable_thinking: bool | None = True,
) -> tuple[str, bool]:
    """The prompt text for ``problem`` and whether it went through the chat template.

    Args:
        tokenizer: its chat template is used when ``use_chat_template`` is None (auto) and it has one.
        template: the user message, with ``{problem}``.
        system_prompt: an optional system message (chat template only).
        enable_thinking: passed to the chat template (Qwen3 reads it; other templates ignore it); None omits it.
    """
    message = render_problem(problem, template)
    chat = has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
    if not chat:
        if system_prompt:
            message = f"{system_prompt}\n\n{message}"
        return message, False
    if not has_chat_template(tokenizer):
        raise ValueError(
            "use_chat_template=True but the tokenizer has no chat template; pass use_chat_template=False."
        )
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": message}
    ]
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    return text, True
