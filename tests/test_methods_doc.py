r"""docs/methods.md is the repository's one maths document: every "§" citation of it names a section that exists.

Which "§" citations are checked
    Every ``.py``, ``.md``, ``.yaml`` and ``.yml`` file under ``trl_opd/``, ``recipes/``, ``bench/``, ``docs/`` and
    ``tests/`` (this file excepted: its docstring shows examples), plus the ``.md`` files at the repository root, is
    read line by line. A citation is "§" followed by a section number N(.N)* (e.g. ``§8.4.2``), optionally a range
    (``§0.3–§0.6``, ``§8.1-8.2``: both ends are checked) and optionally ``item K`` / ``step K`` (then section N must
    contain a numbered list entry ``K.``).

    A citation refers to methods.md unless another document owns it:

    * a document file name (``trl.md``, ``reference/landscape.md``, ...) owns every "§" to its right on the same line
      up to the next file name; ``methods.md`` is one of them, so the closest file name to the left decides;
    * the name of a paper owns a "§" written directly after it: an ``arXiv NNNN.NNNNN`` id, the word ``Paper`` /
      ``paper's`` (optionally with a version, ``Paper v3 §3.2``), ``landscape``, or a method name, possibly followed by
      other locators of the same paper (``TIP §7.3``, ``TIP Eq. 7 / §7.3``). Elsewhere "paper" or an arXiv id is
      ordinary prose and owns nothing;
    * a "§" that nothing owns refers to methods.md (a bare "§" in this repository means methods.md; inside
      docs/methods.md it is a cross-reference within the document).

    So "(methods.md §7.3, arXiv 2604.13016 §5)" checks §7.3 only, "the paper's §4.1" is skipped, and "SimCT (arXiv
    2605.07711, §8.1-8.2)" checks §8.1 and §8.2. Write a citation of a paper's own section with the paper's name or
    "Paper" right before it.

What else is checked
    Headings ``## N.``, ``### N.M`` and ``#### N.M.K`` of docs/methods.md are unique and nested (N.M sits under N);
    every method of the project has its section (issue 14, item 5); and every ``methods.md#anchor`` link resolves to a
    heading of docs/methods.md (GitHub's slug rule) or to an explicit ``<a id="...">``, and so does every in-page link
    ``](#anchor)`` of docs/methods.md (its table of contents).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"
SCANNED_DIRECTORIES = ("trl_opd", "recipes", "bench", "docs", "tests")
SCANNED_SUFFIXES = {".py", ".md", ".yaml", ".yml"}
SKIPPED_PARTS = {".venv", ".git", "__pycache__", "node_modules", ".pytest_cache"}

NUMBER = r"\d+(?:\.\d+)*"
CITATION = re.compile(
    rf"§\s?(?P<first>{NUMBER})"
    rf"(?:\s*[–-]\s*§?\s?(?P<last>{NUMBER}))?"
    r"(?:\s+(?:item|step)\s+(?P<item>\d+))?"
)
METHOD_NAMES = r"(?:TIP|OPSD|PW-OPSD|EDGE-OPD|OPRD|SimCT|EffOPD|RLAD|TRRD|AAPA|MonoSoup|GKD|GOLD|ULD|IW-OPD|DistiLLM)"
# Document file names: the closest one to the left of a "§" on its line owns it.
FILE_NAMES = re.compile(r"[\w./-]*\w\.md\b")
# Names of another document that own a "§" only when written right before it ("Paper §2.3", "TIP Eq. 7 / §7.3").
LOCATOR = r"(?:Eq\.|App\.|Table|Fig\.|§)\s*[\w.]+\s*[/,]\s*"
DIRECTLY_BEFORE = re.compile(
    r"(?:\barXiv[\s:]*\d{4}\.\d{4,5}"
    r"|\b[Pp]aper(?:'s)?(?:\s+v\d+)?"
    r"|\blandscape"
    rf"|\b{METHOD_NAMES}(?:'s)?(?:\s+{LOCATOR})*"
    r")[\s`'\"]*$"
)
HEADING = re.compile(r"^(?P<hashes>#{2,6})\s+(?P<number>\d+(?:\.\d+)*)\.?\s+(?P<title>.*?)\s*$")
ANY_HEADING = re.compile(r"^(?P<hashes>#{1,6})\s+(?P<title>.*?)\s*$")
LINK = re.compile(r"methods\.md#(?P<anchor>[\w-]+)")
INTERNAL_LINK = re.compile(r"\]\(#(?P<anchor>[\w-]+)\)")
EXPLICIT_ANCHOR = re.compile(r"""<a\s+(?:id|name)=["'](?P<anchor>[^"']+)["']""")

# Every method of the project and a word its section's title must contain (issue 14, item 5).
REQUIRED_SECTIONS = {
    "0": "skeleton",
    "1": "f-divergence",  # the survey family
    "2": "OPSD",
    "3": "TIP",
    "4": "PW-OPSD",
    "5": "EDGE-OPD",
    "6": "OPRD",
    "7": "dynamics",
    "8": "SimCT",
    "9": "EffOPD",
    "10": "RLAD",
    "11": "AAPA",
    "12": "MonoSoup",
}


def _methods_lines() -> list[str]:
    return METHODS.read_text(encoding="utf-8").splitlines()


def _sections() -> dict[str, tuple[int, int, str]]:
    """{number: (heading level, line index, title)} of docs/methods.md's numbered headings, outside code blocks."""
    sections, in_code = {}, False
    for index, line in enumerate(_methods_lines()):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        match = None if in_code else HEADING.match(line)
        if match:
            number = match["number"]
            assert number not in sections, f"docs/methods.md numbers two headings §{number}."
            sections[number] = (len(match["hashes"]), index, match["title"])
    return sections


def _section_body(number: str) -> list[str]:
    """Lines of section `number` up to the next heading of the same or a higher level."""
    sections, lines = _sections(), _methods_lines()
    level, start, _ = sections[number]
    body = []
    for line in lines[start + 1 :]:
        match = ANY_HEADING.match(line)
        if match and len(match["hashes"]) <= level:
            break
        body.append(line)
    return body


def _scanned_files() -> list[Path]:
    files = [path for path in ROOT.glob("*.md") if path.is_file()]
    for directory in SCANNED_DIRECTORIES:
        for path in (ROOT / directory).rglob("*"):
            if path.suffix in SCANNED_SUFFIXES and path.is_file() and not SKIPPED_PARTS & set(path.parts):
                files.append(path)
    return sorted(set(files) - {Path(__file__).resolve()})


def _refers_to_methods(line: str, position: int) -> bool:
    """Does the "§" at `position` cite methods.md? See the module docstring for the rule."""
    before = line[:position]
    if DIRECTLY_BEFORE.search(before):
        return False
    names = FILE_NAMES.findall(before)
    return not names or names[-1].endswith("methods.md")


def _citations() -> list[tuple[str, int, str, str, str | None, str]]:
    """(file, line number, first, last, item, line text) of every citation that refers to methods.md."""
    found = []
    for path in _scanned_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if "§" not in text:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            for match in CITATION.finditer(line):
                if _refers_to_methods(line, match.start()):
                    relative = str(path.relative_to(ROOT))
                    found.append((relative, number, match["first"], match["last"], match["item"], line.strip()))
    return found


def _github_slug(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (letters, digits, '_', '-' and spaces kept), spaces
    to '-'."""
    title = re.sub(r"<[^>]+>", "", title).replace("`", "")
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def test_headings_are_nested():
    sections = _sections()
    for number, (level, _, title) in sections.items():
        depth = number.count(".") + 1
        assert level == depth + 1, f"§{number} ({title!r}) should be a level-{depth + 1} heading, not level {level}."
        parent = number.rpartition(".")[0]
        assert not parent or parent in sections, f"§{number} has no parent section §{parent}."


@pytest.mark.parametrize("number, word", sorted(REQUIRED_SECTIONS.items(), key=lambda item: int(item[0])))
def test_every_method_has_a_section(number, word):
    sections = _sections()
    assert number in sections, f"docs/methods.md has no section {number} ({word})."
    level, _, title = sections[number]
    assert level == 2 and word.lower() in title.lower(), f"Section {number} is {title!r}; expected one about {word}."


def test_citations_were_found():
    # Guards the scanner itself: the repository cites methods.md in many docstrings.
    citations = _citations()
    assert len(citations) > 50
    assert any(file.startswith("trl_opd/") for file, *_ in citations)


def test_every_citation_names_an_existing_section():
    sections = _sections()
    missing = []
    for file, line, first, last, item, text in _citations():
        for number in filter(None, (first, last)):
            if number not in sections:
                missing.append(f"{file}:{line}: §{number} does not exist in docs/methods.md: {text}")
        if item is not None and first in sections:
            body = _section_body(first)
            if not any(re.match(rf"\s*{item}\.\s", entry) for entry in body):
                missing.append(f"{file}:{line}: §{first} has no numbered entry {item}: {text}")
    assert not missing, "Dangling methods.md citations:\n" + "\n".join(missing)


def test_links_to_methods_anchors_resolve():
    lines = _methods_lines()
    anchors = {match["anchor"] for line in lines for match in EXPLICIT_ANCHOR.finditer(line)}
    anchors |= {_github_slug(match["title"]) for line in lines if (match := ANY_HEADING.match(line))}
    broken = [
        f"docs/methods.md:{number}: #{match['anchor']}"
        for number, line in enumerate(lines, start=1)
        for match in INTERNAL_LINK.finditer(line)
        if match["anchor"] not in anchors
    ]
    for path in _scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            for match in LINK.finditer(line):
                if match["anchor"] not in anchors:
                    broken.append(f"{path.relative_to(ROOT)}:{number}: #{match['anchor']}")
    assert not broken, "Links to missing docs/methods.md anchors:\n" + "\n".join(broken)


def test_source_rule_examples():
    def checked(line: str) -> list[str]:
        return [m["first"] for m in CITATION.finditer(line) if _refers_to_methods(line, m.start())]

    assert checked("(methods.md §7.3, arXiv 2604.13016 §5)") == ["7.3"]
    assert checked("the paper's §4.1 is a typo") == []
    assert checked("(Paper v3 §3.2)") == []
    assert checked("where the clamp acts (the paper does not say, §10.4 item 2)") == ["10.4"]
    assert checked("TIP Eq. 7 / §7.3 / App. B.2") == []
    assert checked("(as TIP §7.3 writes it)") == []
    assert checked("(§10.4 item 2, ``trl.md`` §5.4)") == ["10.4"]
    assert checked("(landscape §4.4 decision 2)") == []
    assert checked("OPSD (arXiv 2601.18734, methods.md §2), PW-OPSD (position weights, §4)") == ["2", "4"]
    assert checked("in chunks (§0.10.2)") == ["0.10.2"]
    assert checked("see [`docs/methods.md`](docs/methods.md) §3.4 item 1") == ["3.4"]
    assert checked("SimCT (arXiv 2605.07711, §8.1-8.2)") == ["8.1"]
    assert checked("Grading follows ``reference/landscape.md`` §4.4 (Decision for trl_opd)") == []
