"""Write the Colab copies of the chapters: colab/NN-name.ipynb, plain Markdown that Colab reads.

    python scripts/colab_pages.py            # (re)write colab/ from chapters/
    python scripts/colab_pages.py --check    # exit 1 if colab/ is out of date (tests do this)

Colab renders Markdown only: the book's MyST (``{exercise-start}``, ``{solution-start}``,
``{cite}``, ``{term}``, ...) would show as raw text, and solutions would sit open under each
exercise. Each copy is generated from its chapter and differs only where Colab needs it:

* exercises become a heading "Exercise 5.2" (the same number as on the site) and their text;
* solutions are collapsed: each solution code cell and answer key becomes a Colab form cell
  (``#@title`` first line, ``cellView: form``), whose content shows on a double-click; the
  directive fences around them are dropped;
* citations become text linked to the book's bibliography page, "[(Han et al., 2015)](...)",
  and a "References" cell at the end lists the works cited;
* other roles and directives become plain Markdown (``{term}`x``` -> x, admonitions -> quotes);
* a cell that fails on purpose (tag ``raises-exception``) gets a note saying how to go on;
* outputs are cleared; the Colab set-up cell stays first; other ``remove-cell`` cells go.

The site's Colab launch button opens these copies (``book/_ext/book_site.py``);
``tests/test_colab_pages.py`` checks that they are in sync with the chapters.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"
OUT = ROOT / "colab"
CHAPTER = re.compile(r"^(\d+)(?:-(\d+))?-")
FENCE = re.compile(r"^(`{3,}|:{3,})\s*\{([\w:-]+)\}\s*(.*)$")
LABEL = re.compile(r"^ex-(\d+)-(\d+)$")


# --- the book's settings and bibliography --------------------------------------------------


def book_config() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text())


def bibliography_url(config: dict) -> str:
    """The bibliography page of the online book (html.baseurl, else the GitHub Pages address
    of the repository named in _config.yml)."""
    base = (config.get("html", {}) or {}).get("baseurl", "").rstrip("/")
    if not base:
        url = config["repository"]["url"].rstrip("/")
        org, repo = url.split("github.com/")[-1].split("/")[:2]
        base = f"https://{org}.github.io/{repo}"
    return f"{base}/book/bibliography.html"


def _latex_to_text(text: str) -> str:
    text = re.sub(r"\\url\{([^}]*)\}", r"\1", text)  # \url{https://...} -> the address
    text = re.sub(r"\\['`^\"~]\{?(\w)\}?", r"\1", text)  # accents: {\'e} -> e
    return text.replace("{", "").replace("}", "").replace("--", "–").replace("\\&", "&")


def read_bib(path: Path = ROOT / "book" / "references.bib") -> dict[str, dict]:
    """A small reader for the book's BibTeX: ``field = {...}`` (braces balanced, over several
    lines if need be), ``"..."`` or a bare number. Author names keep their braces (``{{PyTorch
    Team}}`` is one name); other fields become plain text."""
    text, entries = path.read_text(encoding="utf8"), {}
    for m in re.finditer(r"@(\w+)\s*\{\s*([^,\s]+)\s*,", text):
        entry, i = {"type": m.group(1).lower()}, m.end()
        while f := re.compile(r"\s*(\w+)\s*=\s*").match(text, i):
            i = f.end()
            if text[i] == "{":
                depth, j = 0, i
                while True:
                    depth += {"{": 1, "}": -1}.get(text[j], 0)
                    if depth == 0:
                        break
                    j += 1
                value, i = text[i + 1 : j], j + 1
            else:
                v = re.compile(r'"([^"]*)"|(\w+)').match(text, i)
                value, i = v.group(1) or v.group(2), v.end()
            value = " ".join(value.split())
            name = f.group(1).lower()
            if (found := re.search(r"\\url\{([^}]*)\}", value)) and name != "url":
                entry.setdefault("url", found.group(1))  # howpublished = {\url{...}}: the link
            entry[name] = value if name == "author" else _latex_to_text(value)
            i = re.compile(r"\s*,?").match(text, i).end()
        entries.setdefault(m.group(2), entry)
    return entries


def _surnames(entry: dict) -> list[str]:
    """Surnames in order; a braced name (an organisation) whole; "others" as "et al."."""
    names = re.split(r"\s+and\s+(?![^{]*\})", entry.get("author", "Anonymous"))
    out = []
    for n in (n.strip() for n in names):
        if n == "others":
            out.append("et al.")
        elif n.startswith("{") and n.endswith("}"):
            out.append(_latex_to_text(n))
        else:
            n = _latex_to_text(n)
            out.append(n.split(",")[0].strip() if "," in n else n.split()[-1])
    return out


def author_year(entry: dict) -> tuple[str, str]:
    names = _surnames(entry)
    if len(names) == 1:
        who = names[0]
    elif len(names) == 2 and names[1] != "et al.":
        who = f"{names[0]} and {names[1]}"
    else:
        who = f"{names[0]} et al."
    return who, entry.get("year", "n.d.")


def reference_line(entry: dict) -> str:
    who = ", ".join(_surnames(entry)).replace(", et al.", " et al.")
    venue = entry.get("journal") or entry.get("booktitle") or entry.get("publisher") or ""
    link = entry.get("url") or (f"https://doi.org/{entry['doi']}" if entry.get("doi") else "")
    title = f"[{entry.get('title', '')}]({link})" if link else entry.get("title", "")
    end = "" if re.search(r"[.?!]\)?$", title) else "."
    return f"- {who} ({entry.get('year', 'n.d.')}). {title}{end}" + (
        f" *{venue}*." if venue else ""
    )


# --- Markdown ----------------------------------------------------------------------------------


def cite_text(
    role: str, keys: str, bib: dict, cited: list[str], before: str = "", link: str = ""
) -> str:
    """A citation as author-year text, linked to the bibliography when ``link`` is given.
    After its own authors ("Han et al. {cite}`han2015learning`") only the year is added."""
    parts = []
    for key in [k.strip() for k in keys.split(",") if k.strip()]:
        if key not in cited:
            cited.append(key)
        who, year = author_year(bib[key]) if key in bib else (key, "")
        parts.append((who, year))
    if len(parts) == 1 and before.rstrip().endswith(parts[0][0]):
        text = f"({parts[0][1]})"
    elif role.endswith(":t"):
        text = "; ".join(f"{who} ({year})" for who, year in parts)
    else:
        text = "(" + "; ".join(f"{who}, {year}" for who, year in parts) + ")"
    return f"[{text}]({link})" if link else text


def plain_roles(text: str, bib: dict, cited: list[str], link: str = "") -> str:
    """MyST roles -> text: citations as author-year, {term}/{ref}/{doc}... as their text."""

    def role(m):
        name, body = m.group(1), m.group(2)
        if name.startswith("cite"):
            return cite_text(name, body, bib, cited, m.string[: m.start()], link)
        if name == "math":
            return f"${body}$"
        shown = re.match(r"^(.*?)\s*<[^<>]+>$", body, re.S)
        text = shown.group(1) if shown else body
        return f"`{text}`" if name in ("code", "kbd", "file") else text

    return re.sub(r"\{([\w:-]+)\}`([^`]*)`", role, text)


def plain_directives(text: str) -> str:
    """Remaining MyST directives -> plain Markdown: admonitions as block quotes, others
    unwrapped; ``(label)=`` targets and ``$$ (label)`` equation labels removed."""
    out, stack = [], []
    for line in text.splitlines():
        m = FENCE.match(line.strip())
        if m:
            fence, name, arg = m.groups()
            stack.append((fence, name))
            if name in (
                "note",
                "tip",
                "warning",
                "important",
                "caution",
                "attention",
                "hint",
                "danger",
                "error",
                "seealso",
                "admonition",
            ):
                title = arg or name.capitalize()
                out.append(f"> **{title}.**")
            elif name in ("math", "code-cell", "code-block", "code"):
                out.append("$$" if name == "math" else f"```{arg}".rstrip())
            continue
        if stack and line.strip() == stack[-1][0]:
            fence, name = stack.pop()
            if name in ("math",):
                out.append("$$")
            elif name in ("code-cell", "code-block", "code"):
                out.append("```")
            continue
        if stack and re.match(r"^:[\w-]+:", line.strip()):
            continue  # directive options
        if re.match(r"^\(.+\)=\s*$", line.strip()):
            continue  # MyST targets
        line = re.sub(r"\$\$\s*\([\w:-]+\)\s*$", "$$", line)  # labelled equations
        quoted = any(
            n
            in (
                "note",
                "tip",
                "warning",
                "important",
                "caution",
                "attention",
                "hint",
                "danger",
                "error",
                "seealso",
                "admonition",
            )
            for _, n in stack
        )
        out.append(("> " + line if line else ">") if quoted else line)
    return "\n".join(out).strip("\n")


# --- cells -------------------------------------------------------------------------------------


def exercise_number(label: str) -> str:
    """``ex-5-2`` -> "5.2"; ``ex-41-3`` -> "4.1.3" (4.1 and 4.2 use 41 and 42)."""
    m = LABEL.match(label)
    if not m:
        return label
    chapter, n = m.groups()
    chapter = f"{chapter[0]}.{chapter[1:]}" if len(chapter) > 1 else chapter
    return f"{chapter}.{n}"


def _label(cell) -> str | None:
    return next((t for t in cell.metadata.get("tags", []) if LABEL.match(t)), None)


def _form_cell(title: str, body: str, like) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(f"#@title {title}\n{body}")
    cell.id = like.id
    cell.metadata = {"cellView": "form", "tags": list(like.metadata.get("tags", []))}
    return cell


def _note(text: str, cell_id: str) -> nbformat.NotebookNode:
    note = nbformat.v4.new_markdown_cell(text)
    note.id = cell_id
    return note


def convert_exercise(source: str, label: str | None) -> str:
    lines = source.splitlines()
    out = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i].strip())
        if m and m.group(2) == "exercise-start":
            title = m.group(3).strip()
            i = _past_directive(lines, i)
            number = exercise_number(label) if label else ""
            out.append(f"### Exercise {number}" + (f": {title}" if title else ""))
            out.append("")
            continue
        if m and m.group(2) == "exercise-end":
            i = _past_directive(lines, i)
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out).strip("\n")


def _past_directive(lines: list[str], i: int) -> int:
    """Index of the first line after the directive that starts at line ``i``: its options
    (``:label:``, ``:class:``, ...) and the fence that closes it."""
    i += 1
    while i < len(lines) and lines[i].startswith(":") and not lines[i].startswith("::"):
        i += 1
    if i < len(lines) and re.match(r"^`{3,}\s*$", lines[i]):
        i += 1
    return i


def strip_solution_fences(source: str) -> str:
    out = []
    lines = source.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i].strip())
        if m and m.group(2) in ("solution-start", "solution-end"):
            i = _past_directive(lines, i)
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out).strip("\n")


def colab_notebook(nb, name: str, bib: dict, config: dict) -> nbformat.NotebookNode:
    """The Colab copy of one chapter (``nb`` is not changed)."""
    out = copy.deepcopy(nb)
    cited: list[str] = []
    link = bibliography_url(config)
    cells = []
    for cell in out.cells:
        tags = cell.metadata.get("tags", [])
        label = _label(cell)
        source = cell.source
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
        if "remove-cell" in tags and "google.colab" not in source:
            continue
        if "solution" in tags:
            number = exercise_number(label) if label else ""
            if cell.cell_type == "code":
                cells.append(
                    _form_cell(
                        f"Solution to exercise {number} (double-click to show)", source, cell
                    )
                )
                continue
            text = plain_directives(plain_roles(strip_solution_fences(source), bib, cited, link))
            if not text.strip():
                continue  # only the dropdown's fences
            body = "\n".join("# " + line if line else "#" for line in text.splitlines())
            cells.append(
                _form_cell(f"Answer key for exercise {number} (double-click to show)", body, cell)
            )
            continue
        if cell.cell_type == "markdown":
            if "exercise" in tags:
                source = convert_exercise(source, label)
            cell.source = plain_directives(plain_roles(source, bib, cited, link))
            cells.append(cell)
            continue
        if "raises-exception" in tags:
            cells.append(
                _note(
                    "*The next cell fails on purpose: it shows an error the text discusses. "
                    'On Colab, "Run all" stops there; to go on, click the cell after it and use '
                    "Runtime ▸ Run after.*",
                    f"{cell.id}-note"[:64],
                )
            )
        cells.append(cell)
    # a short note after the title; the references at the end
    url = config["repository"]["url"].rstrip("/")
    intro = _note(
        f"*This is the Colab copy of `chapters/{name}` of the book "
        f"[*{config.get('title', 'the book')}*]({url}), generated by "
        '`scripts/colab_pages.py`. Solutions are collapsed: double-click a "Solution" cell to '
        "show its code.*",
        "colab-copy-note",
    )
    cells.insert(1 if cells and cells[0].cell_type == "markdown" else 0, intro)
    if cited:
        lines = ["## References", ""] + [reference_line(bib[k]) for k in cited if k in bib]
        lines += ["", f"The book's full bibliography: {bibliography_url(config)}"]
        cells.append(_note("\n".join(lines), "colab-references"))
    out.cells = cells
    out.metadata["colab"] = {"provenance": [], "toc_visible": True}
    return out


def render(nb) -> str:
    return nbformat.writes(nb) + "\n"


def targets(chapters: list[Path] | None = None) -> dict[Path, str]:
    """{colab/NAME.ipynb: its text} for every chapter."""
    bib, config = read_bib(), book_config()
    paths = chapters or sorted(CHAPTERS.glob("*.ipynb"))
    result = {}
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        result[OUT / path.name] = render(colab_notebook(nb, path.name, bib, config))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale copies")
    parser.add_argument("chapters", nargs="*", type=Path)
    args = parser.parse_args(argv)
    wanted = targets([p.resolve() for p in args.chapters] or None)
    stale = [
        p for p, text in wanted.items() if not p.exists() or p.read_text(encoding="utf8") != text
    ]
    if not args.chapters:  # copies of chapters that no longer exist
        stale += [p for p in OUT.glob("*.ipynb") if p not in wanted]
    if args.check:
        for p in stale:
            print(f"stale: {p.relative_to(ROOT)} (run python scripts/colab_pages.py)")
        return 1 if stale else 0
    OUT.mkdir(exist_ok=True)
    for p in stale:
        if p in wanted:
            p.write_text(wanted[p], encoding="utf8")
            print(f"wrote {p.relative_to(ROOT)}")
        else:
            p.unlink()
            print(f"removed {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
