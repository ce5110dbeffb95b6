"""Link each glossary term to the glossary at its first use in every chapter (issue 12).

    python scripts/glossary_links.py            # add the missing links to chapters/*.ipynb
    python scripts/glossary_links.py --check    # exit 1 and list the missing links (tests do this)

A term is used where one of its English names (the glossary entry's line up to " (", split at
", ") appears as a whole word, in singular or plural, in a chapter's Markdown outside headings,
code, math, links, roles and directive lines. Its first such use becomes ``{term}`word <entry>```,
which the site renders as a link and the Colab copies as plain text. Only Markdown changes, so
the chapter's outputs stand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Spans that are not running prose: code, math, roles, links and HTML tags.
SKIP = re.compile(
    r"\{[\w:-]+\}`[^`]*`|```.*?```|`[^`]*`|\$\$.*?\$\$|\$[^$\n]+\$|\[[^\]]*\]\([^)]*\)|<[^>\n]+>",
    re.S,
)
# Whole lines that are not running prose: headings, directive fences and options, labels.
# Names that mostly mean something else in running text ("a fast int8 kernel").
NOT_LINKED = {"kernel"}
SKIP_LINE = re.compile(r"^(#|```|:::|:\w|\(\w[\w-]*\)=)")


def glossary_terms() -> dict[str, str]:
    """English name (lower case) -> the glossary entry it links to."""
    text = (ROOT / "book" / "glossary.md").read_text()
    block = text.split("```{glossary}", 1)[1].split("\n```", 1)[0]
    terms = {}
    for line in block.splitlines():
        if line.strip() and not line.startswith((" ", "\t")):
            for name in line.split(" (")[0].split(", "):
                if name.strip() not in NOT_LINKED:
                    terms[name.strip().lower()] = line.strip()
    return terms


def _prose_spans(cell: str) -> list[tuple[int, int]]:
    """(start, end) of the parts of a Markdown cell that are running prose."""
    blocked = [m.span() for m in SKIP.finditer(cell)]
    pos = 0
    for line in cell.splitlines(keepends=True):
        if SKIP_LINE.match(line.lstrip() if line.startswith("  ") else line):
            blocked.append((pos, pos + len(line)))
        pos += len(line)
    spans, start = [], 0
    for a, b in sorted(blocked):
        if a > start:
            spans.append((start, a))
        start = max(start, b)
    spans.append((start, len(cell)))
    return spans


def first_uses(cells: list[str], terms: dict[str, str]) -> dict[str, tuple[int, int, int] | None]:
    """For each entry used in the chapter: (cell, start, end) of its first use in prose, or None
    when that first use is already a {term} link."""
    found: dict[str, tuple[int, int, int] | None] = {}
    for i, cell in enumerate(cells):
        links = [
            (m.start(), m.group(1)) for m in re.finditer(r"\{term\}`(?:[^`<]*<)?([^`>]+)>?`", cell)
        ]
        hits = []
        for name, entry in terms.items():
            pattern = re.compile(rf"(?<![\w-]){re.escape(name)}(?:s|es)?(?![\w-])", re.I)
            for a, b in _prose_spans(cell):
                hits += [(m.start(), m.end(), entry) for m in pattern.finditer(cell, a, b)]
        # "pruning" inside "structured pruning" is a use of the longer term only
        hits = [
            h
            for h in hits
            if not any(o[0] <= h[0] and h[1] <= o[1] and o[1] - o[0] > h[1] - h[0] for o in hits)
        ]
        hits += [(start, None, entry) for start, entry in links]
        for start, end, entry in sorted(hits, key=lambda h: h[0]):
            entry = next((e for e in terms.values() if e.lower() == entry.strip().lower()), entry)
            if entry not in found:
                found[entry] = None if end is None else (i, start, end)
    return found


def link_chapter(path: Path, terms: dict[str, str], write: bool) -> list[str]:
    """Add the missing first-use links of one chapter; return the terms that lacked one."""
    nb = json.loads(path.read_text())
    md = [c for c in nb["cells"] if c["cell_type"] == "markdown"]
    cells = ["".join(c["source"]) for c in md]
    todo = {e: u for e, u in first_uses(cells, terms).items() if u is not None}
    for entry, (i, a, b) in sorted(todo.items(), key=lambda t: (t[1][0], -t[1][1])):
        word = cells[i][a:b]
        cells[i] = cells[i][:a] + f"{{term}}`{word} <{entry}>`" + cells[i][b:]
    if write and todo:
        for cell, text in zip(md, cells):
            cell["source"] = text.splitlines(keepends=True)
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return sorted(todo)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report missing links")
    args = parser.parse_args()
    terms, missing = glossary_terms(), 0
    for path in sorted((ROOT / "chapters").glob("*.ipynb")):
        todo = link_chapter(path, terms, write=not args.check)
        missing += len(todo)
        if todo:
            print(f"{path.name}: {'missing' if args.check else 'linked'} {', '.join(todo)}")
    return 1 if args.check and missing else 0


if __name__ == "__main__":
    sys.exit(main())
