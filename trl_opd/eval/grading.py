"""Answer extraction and grading shared by the evaluators and the testbed."""

from __future__ import annotations


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, nested braces kept; None if absent."""
    best = None
    for command in ("\\boxed", "\\fbox"):
        start = text.rfind(command)
        if start > (best[0] if best else -1):
            best = (start, command)
    if best is None:
        return None
    index = best[0] + len(best[1])
    while index < len(text) and text[index] == " ":
        index += 1
    if index >= len(text) or text[index] != "{":
        return None
    depth, begin = 0, index + 1
    for position in range(index, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:position].strip()
    return None
