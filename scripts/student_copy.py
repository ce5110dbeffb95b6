"""Write student copies of chapters: solutions and answer keys removed, outputs cleared.

    python scripts/student_copy.py                      # every chapter -> _build/student/
    python scripts/student_copy.py chapters/03-algorithms.ipynb --out handout/

A chapter follows the book's exercise convention: the exercise text is a Markdown cell tagged
``exercise`` + ``ex-C-N``, the reader's cell is tagged ``stub`` + ``ex-C-N``, and every cell of
the solution dropdown (reference code, answer key) is tagged ``solution`` + ``ex-C-N``. The copy
drops the ``solution`` cells (and the sentence pointing at them), turns the exercise directives
into plain headings and every other MyST role and directive into plain Markdown (``{term}``,
``{cite}`` as author-year with a References cell at the end, admonitions as quotes: Jupyter and
Colab render neither, as the Colab pages do), clears every output, keeps the checks and the
Colab set-up cell, and adds a short header saying what to do and how the copy is graded.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from colab_pages import (  # noqa: E402  (the same conversion as the Colab pages)
    bibliography_url,
    book_config,
    plain_directives,
    plain_roles,
    read_bib,
    reference_line,
)

EXERCISE = re.compile(
    r"`{3,}\{exercise-start\}\s*\n:label:\s*(\S+)\s*\n`{3,}\s*\n(.*?)\n?`{3,}\{exercise-end\}\s*\n`{3,}",
    re.S,
)

# The chapters' exercise introductions point at the site's solution dropdowns, which a copy lacks.
SOLUTIONS_NOTE = re.compile(r"\s*Solutions are in the collapsed dropdowns: try first\.")

HEADER = """> **Student copy.** Run the notebook top to bottom (on Colab: *Runtime → Run all*). Each
> exercise at the end has a cell of its own: replace `...  # your code here` with your code and
> rerun the cell until its check prints only `pass`; write the answers to *explain* questions in
> the text cell marked **Your answer**. Keep the function names and do not delete exercise cells.
>
> **How it is graded.** The grader takes the code of your exercise cells (and the imports and
> functions defined above them, not the chapter's experiments) and runs each exercise in a fresh
> process of its own, with a time limit; the check runs outside it, on the cases you see here and
> on hidden ones drawn when grading (other shapes and values), so write the general solution.
> An exercise scores its points when every case passes; an error or a time-out costs only that
> exercise. *Explain* answers are read and graded by hand."""


def tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def label_of(cell: dict) -> str | None:
    return next((t for t in tags(cell) if re.fullmatch(r"ex-\d+-\d+", t)), None)


def exercise_heading(source: str) -> str:
    """``{exercise-start}`` ... ``{exercise-end}`` as a plain Markdown heading and text."""

    def plain(m: re.Match) -> str:
        chapter, number = m.group(1).split("-")[1:]
        chapter = f"{chapter[0]}.{chapter[1:]}" if len(chapter) > 1 else chapter
        return f"### Exercise {chapter}.{number} (`{m.group(1)}`)\n\n{m.group(2).strip()}"

    return EXERCISE.sub(plain, source)


def student_copy(nb: nbformat.NotebookNode, source_name: str) -> nbformat.NotebookNode:
    """A new notebook: ``nb`` without solutions, with cleared outputs and the student header."""
    out = copy.deepcopy(nb)
    bib, config, cited = read_bib(), book_config(), []
    link = bibliography_url(config)
    cells = []
    for cell in out.cells:
        if "solution" in tags(cell):
            continue
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
        if "exercise" in tags(cell):
            cell.source = exercise_heading(cell.source)
        if cell.cell_type == "markdown":
            source = SOLUTIONS_NOTE.sub("", cell.source)
            cell.source = plain_directives(plain_roles(source, bib, cited, link))
        cells.append(cell)
    first_markdown = next(i for i, c in enumerate(cells) if c.cell_type == "markdown")
    header = nbformat.v4.new_markdown_cell(HEADER, metadata={"tags": ["student-header"]})
    cells.insert(first_markdown + 1, header)
    if cited:
        lines = ["## References", ""] + [reference_line(bib[k]) for k in cited if k in bib]
        cells.append(
            nbformat.v4.new_markdown_cell("\n".join(lines), metadata={"tags": ["references"]})
        )
    out.cells = cells
    out.metadata["pruning_book"] = {"student_copy": True, "chapter": source_name}
    return out


def solution_sources(nb: nbformat.NotebookNode) -> list[str]:
    """The source of every solution cell (to check that none is left in a copy)."""
    return [c.source for c in nb.cells if "solution" in tags(c)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "chapters", nargs="*", type=Path, help="chapter notebooks (default: every chapter)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "_build" / "student",
        help="folder for the copies (default: _build/student/)",
    )
    args = parser.parse_args(argv)
    chapters = args.chapters or sorted((ROOT / "chapters").glob("*.ipynb"))
    args.out.mkdir(parents=True, exist_ok=True)
    for path in chapters:
        nb = nbformat.read(path, as_version=4)
        copy_ = student_copy(nb, path.stem)
        labels = sorted({label_of(c) for c in copy_.cells if "stub" in tags(c)} - {None})
        target = args.out / path.name
        nbformat.write(copy_, target)
        print(f"{target}: {len(labels)} exercises ({', '.join(labels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
