"""Render the README's table of config fields from the dataclasses themselves, so the README cannot drift.

    python scripts/config_table.py            # rewrite the table between the README markers
    python scripts/config_table.py --check    # exit 1 if the README's table is stale (used by the tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"
# (config class, its TRL parent): only the fields a class adds or re-defaults are listed.
CONFIGS = [
    ("trl_opd.trainers.opd_config", "OPDConfig", "trl", "DistillationConfig"),
    ("trl_opd.trainers.simct_config", "SimCTConfig", "trl_opd.trainers.opd_config", "OPDConfig"),
    ("trl_opd.trainers.rlad_config", "RLADConfig", "trl", "GRPOConfig"),
]


def _load(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _own_fields(cls, parent) -> list[dataclasses.Field]:
    inherited = {f.name: f for f in dataclasses.fields(parent)} if parent is not None else {}
    own = []
    for f in dataclasses.fields(cls):
        base = inherited.get(f.name)
        if base is None or base.default != f.default or base.metadata.get("help") != f.metadata.get("help"):
            own.append(f)
    return own


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`"
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f"`{f.default_factory()!r}`"
    return "required"


def render() -> str:
    lines = []
    for module, name, parent_module, parent_name in CONFIGS:
        cls = _load(module, name)
        if cls is None:
            continue
        parent = _load(parent_module, parent_name)
        lines += [f"**`{name}`** (extends `{parent_name}`)", "", "| field | default | meaning |", "|---|---|---|"]
        for f in _own_fields(cls, parent):
            meaning = " ".join(f.metadata.get("help", "").split()).replace("|", "\\|")
            lines.append(f"| `{f.name}` | {_default(f)} | {meaning} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def current_table(text: str) -> str:
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip("\n") + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    check = parser.parse_args(argv).check
    text = README.read_text()
    table = render()
    if check:
        if current_table(text) != table:
            print("README config table is stale: run `python scripts/config_table.py`.", file=sys.stderr)
            return 1
        return 0
    start, end = text.index(START) + len(START), text.index(END)
    README.write_text(text[:start] + "\n" + table + text[end:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
