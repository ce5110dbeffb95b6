"""Prose never types a number that a cell computes (issue 12, "no claim without a number or an assert").

Every number followed by ``x``, ``%``, ``pp``, "percent" or "(percentage) points" in a chapter's
Markdown (or the book's front matter) must be covered by an entry of the allow-list
``tests/prose_numbers/<page>.txt``. Each entry is one line, ``reason | snippet``: the snippet is a
piece of the page's text that contains the number, and the reason says why the prose may type it:

* ``cited``      a figure reported by a paper, cited next to it;
* ``setting``    an input the code uses (a sparsity asked for, a split size), not a result;
* ``definition`` true by definition or arithmetic (fp32 -> int8 is 4x; 90 % sparsity is 10x);
* ``exercise``   part of an exercise's specification (what the check demands).

A measured result belongs in a cell's output, with an assert guarding what the text says of it.
Entries that no longer match anything fail too, so the list stays honest.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from bookconf import ROOT

ALLOW = Path(__file__).parent / "prose_numbers"
REASONS = {"cited", "setting", "definition", "exercise"}
NUMBER = re.compile(
    r"(?<![\w.,])\d+(?:[.,]\d+)*\s*(?:x(?!\s*\d)(?![\w])|×(?!\s*\d)|%|pp\b|percent\b|percentage points?\b|points?\b)"
)
PAGES = sorted((ROOT / "chapters").glob("*.ipynb")) + [
    ROOT / "book" / n for n in ("intro.md", "glossary.md", "instructors.md")
]  # not README.md: its benchmark table is a dated report of `python -m utils.kit.benchmark`


def prose(path: Path) -> str:
    """The page's reader-facing text (Markdown cells of a notebook, or the Markdown file), with
    glossary links as their words and every run of white space as one space, so that a snippet
    may span a line break."""
    if path.suffix == ".md":
        text = path.read_text()
    else:
        cells = json.loads(path.read_text())["cells"]
        text = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    text = re.sub(
        r"\{term\}`([^`<]*?)\s*(?:<[^`>]*>)?`", r"\1", text
    )  # a glossary link reads as its word
    return re.sub(r"\s+", " ", text)


def allow_list(path: Path) -> list[tuple[str, str]]:
    file = ALLOW / f"{path.stem}.txt"
    if not file.exists():
        return []
    entries = []
    for line in file.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            reason, _, snippet = line.partition(" | ")
            entries.append((reason.strip(), re.sub(r"\s+", " ", snippet.strip())))
    return entries


def typed_numbers(text: str, entries: list[tuple[str, str]]) -> list[str]:
    """The numbers in ``text`` that no allow-list snippet covers, each with some context."""
    covered = []
    for _, snippet in entries:
        covered += [
            (m.start(), m.start() + len(snippet)) for m in re.finditer(re.escape(snippet), text)
        ]
    return [
        text[max(0, m.start() - 60) : m.end() + 20]
        for m in NUMBER.finditer(text)
        if not any(a <= m.start() and m.end() <= b for a, b in covered)
    ]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.stem)
def test_prose_types_no_computed_number(path: Path):
    text = prose(path)
    entries = allow_list(path)
    assert {r for r, _ in entries} <= REASONS, f"reasons must be one of {sorted(REASONS)}"
    stale = [s for _, s in entries if s not in text]
    assert not stale, f"allow-list entries of {path.name} that match nothing: {stale}"
    missing = typed_numbers(text, entries)
    assert not missing, (
        f"{path.name} types numbers that no allow-list entry in tests/prose_numbers/{path.stem}.txt "
        f"covers (point at the cell's output instead, or add a 'reason | snippet' line): {missing}"
    )


def test_the_rule_catches_a_typed_result():
    text = "Global pruning keeps 97.3 % accuracy, 2.5 points above local, and runs 12x faster."
    assert len(typed_numbers(text, [])) == 3
    assert (
        typed_numbers(text, [("cited", "97.3 % accuracy, 2.5 points"), ("cited", "12x faster")])
        == []
    )
    assert typed_numbers("a 5 x 5 block and 25 x 16 values", []) == []
