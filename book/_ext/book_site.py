"""What readers see on the site, fixed at build time (no chapter notebook is edited).

Registered in ``_config.yml`` (``sphinx.local_extensions``). It

* numbers exercises per chapter: ``chapters/05-applications`` gets Exercise 5.1, 5.2, ...
  (``04-1-unstructured`` gets 4.1.1, ...), instead of one count across the whole book;
* shortens the tracebacks of cells meant to raise (tag ``raises-exception``) to what a reader
  needs: the notebook's own frames, the last library frame, and the message; and removes local
  paths (virtual environments, the build machine's home and checkout) from every output;
* points the Colab launch button of a chapter at its plain-Markdown copy in ``colab/``
  (written by ``scripts/colab_pages.py``), which reads well on Colab;
* loads ``book/_static/search_snippets.js``, which keeps the launch buttons and the navigation
  out of the search result snippets;
* writes each script once per page (no "THEBE_JS_URL has already been declared" error);
* never publishes ``reports/`` (myst-nb's execution logs) inside the site.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from docutils import nodes

HERE = Path(__file__).resolve().parent
STATIC = HERE.parent / "_static"
CHAPTER = re.compile(r"^chapters/(\d+)(?:-(\d+))?-")


# --- exercise numbers per chapter ----------------------------------------------------------


def chapter_number(docname: str) -> tuple[int, ...] | None:
    """``chapters/05-applications`` -> (5,), ``chapters/04-1-unstructured`` -> (4, 1)."""
    m = CHAPTER.match(docname)
    if not m:
        return None
    return tuple(int(g) for g in m.groups() if g is not None)


def renumber_exercises(app, env):
    """Runs after Sphinx assigned book-wide numbers; rewrites them as chapter.N."""
    for docname, by_type in env.toc_fignumbers.items():
        prefix = chapter_number(docname)
        numbers = by_type.get("exercise")
        if prefix is None or not numbers:
            continue
        ordered = sorted(numbers, key=lambda ident: numbers[ident])
        by_type["exercise"] = {ident: prefix + (i + 1,) for i, ident in enumerate(ordered)}
    return []


# --- outputs: short tracebacks, no local paths ----------------------------------------------

_FRAME = re.compile(r"^(Cell In\[|Input In \[|File )")
_PATHS = [
    # .../site-packages/torch/nn/x.py -> torch/nn/x.py ; .../lib/python3.11/abc.py -> abc.py
    (re.compile(r"(?:~|/)[^\s'\"(),:]*?/(?:site|dist)-packages/"), ""),
    (re.compile(r"(?:~|/)[^\s'\"(),:]*?/lib/python3\.\d+/"), ""),
    # ipykernel's per-cell files: /tmp/ipykernel_123/456.py -> <cell>
    (re.compile(r"/tmp/ipykernel_\d+/\d+\.py"), "<cell>"),
]


def clean_paths(text: str, roots: list[str]) -> str:
    """Remove the machine's own paths: environments, the checkout, the home folder."""
    for pattern, repl in _PATHS:
        text = pattern.sub(repl, text)
    for root in roots:
        text = text.replace(root.rstrip("/") + "/", "")
    return re.sub(r"(?<![\w.])(?:/root|/home/[\w.-]+)/", "~/", text)


def short_traceback(text: str, keep_last: int = 1) -> str:
    """IPython's traceback cut to the notebook's own frames, the frame that raised (when it is
    in library code) and the message. Anything it does not recognise is returned unchanged."""
    blocks = re.split(r"\n\s*\n", text.strip("\n"))
    head = blocks[0].splitlines()
    if len(blocks) < 3 or not any("Traceback (most recent call last)" in h for h in head):
        return text
    frames, rest = [], []
    first_frame_line = next((i for i, h in enumerate(head) if _FRAME.match(h)), None)
    if first_frame_line is not None:  # the first frame shares its block with the header
        frames.append("\n".join(head[first_frame_line:]))
        head = head[:first_frame_line]
    for block in blocks[1:]:
        (frames if _FRAME.match(block) and not rest else rest).append(block)
    if "During handling" in "\n".join(rest) or not rest:
        return text  # chained exceptions: leave them whole
    # the notebook's own frames, and of the library frames after the last of them (where the
    # error was raised) the last ``keep_last``; library plumbing in between is left out
    own = [i for i, f in enumerate(frames) if not f.startswith("File ")]
    trailing = [i for i in range(len(frames)) if i > (own[-1] if own else -1)]
    shown = set(own) | (set(trailing[-keep_last:]) if keep_last else set())
    out, hidden = [], 0
    for i, frame in enumerate(frames):
        if i in shown:
            if hidden:
                out.append(f"... {hidden} frame{'s' * (hidden > 1)} inside library code ...")
                hidden = 0
            out.append(frame)
        else:
            hidden += 1
    if hidden:
        out.append(f"... {hidden} frame{'s' * (hidden > 1)} inside library code ...")
    return "\n\n".join(["\n".join(head)] + out + rest) + "\n"


def clean_outputs(app, doctree):
    roots = [str(Path(app.srcdir).resolve()), str(Path.cwd().resolve())]
    for block in list(doctree.findall(nodes.literal_block)):
        classes = block.get("classes", [])
        if "output" not in classes:
            continue
        text = block.astext()
        new = clean_paths(text, roots)
        if "traceback" in classes:
            new = short_traceback(new)
        if new != text:
            block.children = [nodes.Text(new)]
            block.rawsource = new


# --- launch buttons: Colab opens the plain-Markdown copy in colab/ ----------------------------


def colab_copy_buttons(app, pagename, templatename, context, doctree):
    if chapter_number(pagename) is None:
        return
    stem = pagename.split("/", 1)[1]
    for group in context.get("header_buttons", []):
        for button in group.get("buttons", []) if isinstance(group, dict) else []:
            if button.get("text") == "Colab" and button.get("url"):
                button["url"] = button["url"].replace(
                    f"/chapters/{stem}.ipynb", f"/colab/{stem}.ipynb"
                )


# --- scripts: each once -------------------------------------------------------------------------


def unique_scripts(app, pagename, templatename, context, doctree):
    """sphinx-thebe adds its inline ``const THEBE_JS_URL = ...`` at env-before-read-docs, which
    Sphinx 7.4 registers twice (filename None and ""): every page logged "Identifier
    'THEBE_JS_URL' has already been declared". Keep the first of identical scripts."""
    seen, unique = set(), []
    for js in context.get("script_files", []):
        key = (
            getattr(js, "filename", js) or "",
            tuple(sorted(getattr(js, "attributes", {}).items())),
        )
        if key not in seen:
            seen.add(key)
            unique.append(js)
    context["script_files"] = unique


# --- static files and reports -----------------------------------------------------------------


def add_static(app, config):
    config.html_static_path = list(config.html_static_path) + [str(STATIC)]
    # a clean console: no 404 for /favicon.ico, and pydata-sphinx-theme's colour mode set
    # (an empty one logs "Got invalid theme mode")
    if not config.html_favicon:
        config.html_favicon = str(STATIC / "favicon.svg")
    config.html_context = {**config.html_context, "default_mode": "auto"}


def drop_reports(app, exception):
    reports = Path(app.outdir) / "reports"
    if reports.is_dir():
        shutil.rmtree(reports)


def setup(app):
    app.connect("config-inited", add_static)
    app.connect("env-get-updated", renumber_exercises, priority=900)
    app.connect("doctree-read", clean_outputs)
    app.connect("html-page-context", colab_copy_buttons, priority=600)
    app.connect("html-page-context", unique_scripts, priority=999)
    app.connect("build-finished", drop_reports)
    app.add_js_file("search_snippets.js")
    app.add_css_file("book_site.css")
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
