"""The Colab copies (colab/, written by scripts/colab_pages.py) read well on Colab and are in
sync with the chapters; the site's Colab button opens them."""

import json
import re
from pathlib import Path

import pytest
from conftest import load_file

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))


colab_pages = load_file(ROOT / "scripts" / "colab_pages.py")
book_site = load_file(ROOT / "book" / "_ext" / "book_site.py")
MYST = re.compile(
    r"\{(exercise|solution)-(start|end)\}|\{cite[:\w]*\}`|\{term\}`|:class: dropdown"
    r"|\{(ref|numref|doc|eq|glue[:\w]*)\}`|^```+\s*\{|^:::+\s*\{",
    re.M,
)


def test_colab_copies_are_in_sync_with_the_chapters():
    stale = [
        p.name
        for p, text in colab_pages.targets().items()
        if not p.exists() or p.read_text(encoding="utf8") != text
    ]
    assert not stale, f"run `python scripts/colab_pages.py`: stale Colab copies {stale}"
    extra = {p.name for p in (ROOT / "colab").glob("*.ipynb")} - {p.name for p in CHAPTERS}
    assert not extra, f"Colab copies of no chapter: {extra}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_colab_copy_reads_as_plain_markdown(chapter):
    source = json.loads(chapter.read_text(encoding="utf8"))
    copy = json.loads(colab_pages.targets([chapter])[colab_pages.OUT / chapter.name])
    for cell in copy["cells"]:
        text = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            assert not MYST.search(text), f"MyST left for Colab in {chapter.name}:\n{text[:300]}"
        else:
            assert cell["outputs"] == [] and cell["execution_count"] is None
    code = [c for c in copy["cells"] if c["cell_type"] == "code"]
    assert "google.colab" in "".join(code[0]["source"]), "the set-up cell comes first"
    # every exercise has a numbered heading, every solution is a collapsed form cell
    labels = sorted(
        {
            t
            for c in source["cells"]
            for t in c["metadata"].get("tags", [])
            if re.fullmatch(r"ex-\d+-\d+", t)
        }
    )
    markdown = "\n".join(
        "".join(c["source"]) for c in copy["cells"] if c["cell_type"] == "markdown"
    )
    for label in labels:
        assert f"### Exercise {colab_pages.exercise_number(label)}" in markdown, label
    solutions = [c for c in copy["cells"] if "solution" in c["metadata"].get("tags", [])]
    assert all(
        c["cell_type"] == "code"
        and c["metadata"].get("cellView") == "form"
        and "".join(c["source"]).startswith("#@title ")
        for c in solutions
    )
    solution_code = [
        c
        for c in source["cells"]
        if "solution" in c["metadata"].get("tags", []) and c["cell_type"] == "code"
    ]
    assert len([c for c in solutions if "Solution to" in c["source"][0]]) == len(solution_code)
    # citations as text, and a references list linking to the bibliography
    cited = set(re.findall(r"\{cite[:\w]*\}`([^`]*)`", json.dumps(source)))
    if cited:
        assert "## References" in markdown and "bibliography" in markdown
        for key in {k.strip() for keys in cited for k in keys.split(",")}:
            who, year = colab_pages.author_year(colab_pages.read_bib()[key])
            assert who in markdown and year in markdown, key


def test_markdown_conversions():
    bib = {
        "han2015learning": {
            "author": "Han, Song and Pool, Jeff and Tran, John",
            "year": "2015",
            "title": "T",
        },
        "lecun1990optimal": {"author": "LeCun, Yann and Denker, John S.", "year": "1990"},
    }
    cited = []
    text = "as shown {cite}`han2015learning` and {cite:t}`lecun1990optimal`; {term}`sparsity`."
    assert colab_pages.plain_roles(text, bib, cited) == (
        "as shown (Han et al., 2015) and LeCun and Denker (1990); sparsity."
    )
    assert cited == ["han2015learning", "lecun1990optimal"]
    assert colab_pages.plain_roles("{term}`masks <mask>`", bib, []) == "masks"
    linked = colab_pages.plain_roles("Han et al. {cite}`han2015learning`", bib, [], "https://b")
    assert linked == "Han et al. [(2015)](https://b)"
    ex = "````{exercise-start}\n:label: ex-41-2\n````\nDo it.\n````{exercise-end}\n````"
    assert colab_pages.convert_exercise(ex, "ex-41-2") == "### Exercise 4.1.2\n\nDo it."
    note = "```{note}\nRead this.\n```\n(my-target)=\n$$ x $$ (eq-1)"
    assert colab_pages.plain_directives(note) == "> **Note.**\n> Read this.\n$$ x $$"


def test_the_colab_button_opens_the_colab_copy():
    url = "https://github.com/pruning-book/pruning-book"
    org_repo = url.split("github.com/")[1]
    button = {
        "text": "Colab",
        "url": "https://colab.research.google.com/github/"
        f"{org_repo}/blob/main/chapters/05-applications.ipynb",
    }
    context = {"header_buttons": [{"label": "launch-buttons", "buttons": [button]}]}
    book_site.colab_copy_buttons(None, "chapters/05-applications", "page.html", context, None)
    assert button["url"].endswith(f"{org_repo}/blob/main/colab/05-applications.ipynb")
    other = {"text": "Colab", "url": "https://colab.research.google.com/x/book/intro.ipynb"}
    book_site.colab_copy_buttons(
        None, "book/intro", "page.html", {"header_buttons": [{"buttons": [other]}]}, None
    )
    assert other["url"].endswith("book/intro.ipynb")


def test_bibliography_reader_handles_long_fields_organisations_and_others(tmp_path):
    bib = tmp_path / "r.bib"
    bib.write_text("""@article{a,
  title   = {A {Long} Title that
             runs over two lines?},
  author  = {Howard, Andrew and
             Sandler, Mark and Chu, Grace},
  year    = {2019}
}
@misc{b,
  author = {{PyTorch Team}},
  title  = {Docs},
  year   = 2026
}
@inproceedings{c,
  author = {Paszke, Adam and others},
  title = {PyTorch},
  year = {2019}
}
""")
    entries = colab_pages.read_bib(bib)
    assert colab_pages.author_year(entries["a"]) == ("Howard et al.", "2019")
    assert entries["a"]["title"] == "A Long Title that runs over two lines?"
    assert colab_pages.author_year(entries["b"]) == ("PyTorch Team", "2026")
    assert colab_pages.author_year(entries["c"]) == ("Paszke et al.", "2019")
    assert colab_pages.reference_line(entries["a"]).startswith(
        "- Howard, Sandler, Chu (2019). A Long"
    )
    assert "?." not in colab_pages.reference_line(entries["a"])
