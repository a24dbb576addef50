"""Render the README's tables from the code itself, so the README cannot drift: the config fields (from the
dataclasses) and the supported combinations (from the registry `trl_opd.trainers.support`).

    python scripts/config_table.py            # rewrite the tables between the README markers
    python scripts/config_table.py --check    # exit 1 if a README table is stale (used by the tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
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


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`"
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f"`{f.default_factory()!r}`"
    return "required"


def render() -> str:
    from trl_opd.trainers.support import own_fields

    lines = []
    for module, name, parent_module, parent_name in CONFIGS:
        cls = _load(module, name)
        if cls is None:
            continue
        parent = _load(parent_module, parent_name)
        lines += [f"**`{name}`** (extends `{parent_name}`)", "", "| field | default | meaning |", "|---|---|---|"]
        for f in own_fields(cls, parent):
            meaning = " ".join(f.metadata.get("help", "").split()).replace("|", "\\|")
            lines.append(f"| `{f.name}` | {_default(f)} | {meaning} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render_support() -> str:
    import tempfile

    from trl_opd.trainers.support import render_support_table

    with tempfile.TemporaryDirectory() as output_dir:  # the configs it builds are never used
        return render_support_table(output_dir)


# (start marker, end marker, renderer) of each generated table
TABLES = [
    ("<!-- config-table:start -->", "<!-- config-table:end -->", render),
    ("<!-- support-table:start -->", "<!-- support-table:end -->", render_support),
]


def current_table(text: str, start_marker: str, end_marker: str) -> str:
    start, end = text.index(start_marker) + len(start_marker), text.index(end_marker)
    return text[start:end].strip("\n") + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    check = parser.parse_args(argv).check
    text = README.read_text()
    for start_marker, end_marker, renderer in TABLES:
        table = renderer()
        if check:
            if current_table(text, start_marker, end_marker) != table:
                print(f"README table {start_marker} is stale: run `python scripts/config_table.py`.", file=sys.stderr)
                return 1
            continue
        start, end = text.index(start_marker) + len(start_marker), text.index(end_marker)
        text = text[:start] + "\n" + table + text[end:]
    if not check:
        README.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
