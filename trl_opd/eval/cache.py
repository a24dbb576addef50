"""A resumable, append-only JSONL cache of generations.

Each finished sample is appended (and flushed to disk) as soon as its batch returns, so a killed run loses at
most the batch in flight. Rows carry a fingerprint of the generation settings and the prompt's hash; on
restart only rows whose fingerprint and prompt match the current run are reused. A half-written last line
(the process died mid-write) is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def fingerprint(settings: dict) -> str:
    """A short stable hash of JSON-serialisable ``settings``."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


class GenerationCache:
    """Finished samples of one benchmark, keyed by ``(problem id, sample index)``.

    Args:
        path: the JSONL file (created with its folder); None keeps nothing on disk.
        key: the fingerprint of the generation settings (see :func:`fingerprint`).
        resume: reuse the matching rows already in ``path``; False starts the file afresh.
    """

    def __init__(self, path: str | Path | None, key: str, *, resume: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.key = key
        self.rows: dict[tuple[str, int], dict] = {}
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.path.exists():
            self._load()
        elif not resume:
            self.path.write_text("")

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if isinstance(row, dict) and row.get("key") == self.key:
                    self.rows[(row["id"], row["sample"])] = row

    def get(self, problem_id: str, sample: int, prompt: str) -> dict | None:
        """The cached row for this sample, if it was generated from the same prompt."""
        row = self.rows.get((problem_id, sample))
        return row if row is not None and row.get("prompt_hash") == prompt_hash(prompt) else None

    def _ends_mid_line(self) -> bool:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return False
        with open(self.path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"

    def add(self, rows: list[dict]) -> None:
        """Record finished samples (dicts with ``id``, ``sample``, ``prompt``, ``completion``, ...) and persist them."""
        stored = []
        for row in rows:
            entry = {key: value for key, value in row.items() if key != "prompt"}
            entry.update(key=self.key, prompt_hash=prompt_hash(row["prompt"]))
            self.rows[(entry["id"], entry["sample"])] = entry
            stored.append(entry)
        if self.path is None or not stored:
            return
        separator = (
            "\n" if self._ends_mid_line() else ""
        )  # do not extend a line a killed run left half-written
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(separator + "\n".join(json.dumps(entry) for entry in stored) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
