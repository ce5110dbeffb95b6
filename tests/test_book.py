"""The chapters follow the book's design: title first, Colab cell from _config.yml, summary and
checked exercises at the end, executed top to bottom, all listed in the table of contents."""

import json
import re
from pathlib import Path

import pytest
import yaml
from bookconf import ROOT, colab_cell_source, repository_url
from conftest import load_file

CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))


def source(cell):
    return "".join(cell["source"])


def test_every_chapter_is_in_the_table_of_contents():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    listed = {c["file"] for part in toc["parts"] for c in part["chapters"]}
    assert {f"chapters/{p.stem}" for p in CHAPTERS} <= listed
    assert all((ROOT / f"{f}.md").exists() or (ROOT / f"{f}.ipynb").exists() for f in listed)
    assert len(CHAPTERS) >= 1


def test_the_repository_url_lives_in_one_place():
    assert repository_url().startswith("https://")
    assert repository_url() in colab_cell_source()


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_layout(path: Path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    assert cells[0]["cell_type"] == "markdown" and source(cells[0]).startswith("# ")
    colab = [c for c in cells if "google.colab" in source(c)]
    assert len(colab) == 1 and source(colab[0]) == colab_cell_source()
    assert "remove-cell" in colab[0]["metadata"].get("tags", [])
    markdown = "\n".join(source(c) for c in cells if c["cell_type"] == "markdown")
    assert "## Summary" in markdown and "## Exercises" in markdown
    assert markdown.count("{exercise-start}") >= 3 and markdown.count("{solution-start}") >= 3
    code = [c for c in cells if c["cell_type"] == "code"]
    assert sum("check_" in source(c) and "assert check_" in source(c) for c in code) >= 3
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        "commit chapters executed top to bottom on a fresh kernel"
    )
    assert not any("NBVAL_SKIP" in source(c) for c in code)
    errors = [c for c in code if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert all("raises-exception" in c["metadata"].get("tags", []) for c in errors)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


def test_every_bibliography_entry_is_cited_and_well_formed():
    bib = (ROOT / "book" / "references.bib").read_text()
    entries = re.findall(r"^@(\w+)\{([^,]+),", bib, flags=re.M)
    pages = [json.loads(p.read_text()) for p in CHAPTERS]
    text = "\n".join(source(c) for nb in pages for c in nb["cells"] if c["cell_type"] == "markdown")
    text += "\n".join(p.read_text() for p in (ROOT / "book").glob("*.md"))
    cited = {
        k.strip()
        for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", text)
        for k in group.split(",")
    }
    keys = [k for _, k in entries]
    assert len(keys) == len(set(keys)), "a key is defined twice"
    assert not cited - set(keys), f"cited but not in references.bib: {sorted(cited - set(keys))}"
    assert not set(keys) - cited, (
        f"in references.bib but cited nowhere: {sorted(set(keys) - cited)}"
    )
    for kind, key in entries:  # a book is a @book, not an @inproceedings with a booktitle
        block = bib[bib.index(f"{{{key},") :].split("\n}\n", 1)[0]
        assert kind != "inproceedings" or "booktitle" in block, key
        assert not (kind == "book" and "booktitle" in block), key


def test_every_chapter_links_each_glossary_term_at_its_first_use():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "glossary_links.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"run `python scripts/glossary_links.py`:\n{done.stdout}"


def test_glossary_links_skip_code_headings_and_longer_terms(tmp_path):
    gl = load_file(ROOT / "scripts" / "glossary_links.py")
    terms = {
        "pruning": "pruning (剪枝)",
        "structured pruning": "structured pruning (结构化剪枝)",
        "mask": "mask",
    }
    cells = ["# Pruning\n`mask = x`", "Structured pruning first; $mask$ then masks, then pruning."]
    uses = gl.first_uses(cells, terms)
    assert cells[1][slice(*uses["structured pruning (结构化剪枝)"][1:])] == "Structured pruning"
    assert cells[1][slice(*uses["mask"][1:])] == "masks"
    assert (
        cells[1][slice(*uses["pruning (剪枝)"][1:])] == "pruning" and uses["pruning (剪枝)"][1] > 40
    )
    assert gl.first_uses(["{term}`masks <mask>` and a mask"], terms) == {"mask": None}
