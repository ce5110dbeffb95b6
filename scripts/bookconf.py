"""Book plumbing: the repository URL (kept once, in _config.yml) and the Colab set-up cell."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COLAB_TAG = "remove-cell"


def repository_url(config: Path = ROOT / "_config.yml") -> str:
    """The book's repository, as written in ``_config.yml`` (its only home)."""
    return yaml.safe_load(Path(config).read_text())["repository"]["url"].rstrip("/")


PLACEHOLDER_URL = "https://github.com/pruning-book/pruning-book"  # until the book is published
WHEEL_VAR = "PRUNING_BOOK_WHEEL"  # a local build (wheel, sdist or folder) for the cell to install

_INSTALL = """\
# Set-up on Colab: install this book's `utils` package (the runtime's own PyTorch is kept).
# Elsewhere it does nothing, unless ${wheel_var} names a local build of it to install.
import os, subprocess, sys
_REPO = "{url}"
if "google.colab" in sys.modules or os.environ.get("{wheel_var}"):
    _package = os.environ.get("{wheel_var}"){from_repo}
    _pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", _package],
                          capture_output=True, text=True)
    if _pip.returncode != 0:
        print(_pip.stdout[-2000:], _pip.stderr[-2000:], sep="\\n")
        raise SystemExit(f"Installing {{_package}} failed (pip says why above): check the "
                         "runtime's internet connection, then run this cell again.")
    import importlib; importlib.invalidate_caches()"""

_FROM_REPO = ' or f"pruning-book-utils @ git+{_REPO}.git"'
_PLACEHOLDER = """
    if not _package:
        raise SystemExit(f"{_REPO} is a placeholder (the book is not published yet): run "
                         "this chapter in a clone of the book, after `pip install -e .` there.")"""


def colab_cell_source(url: str | None = None) -> str:
    """The first code cell of every chapter: on Colab only, install this book's ``utils``.

    Colab already has PyTorch; the install brings ``utils`` and its small dependencies only. The
    cell is plain Python (``pip`` through ``sys.executable``), so it runs in any kernel; it also
    installs outside Colab when ``$PRUNING_BOOK_WHEEL`` names a local build (the Colab rehearsal,
    ``scripts/colab_rehearsal.py``). While ``_config.yml`` holds the placeholder URL, or when the
    install fails, it says what to do in one sentence and stops (``SystemExit``: a Colab "run all"
    stops there instead of failing at an import further down).
    """
    url = (url or repository_url()).rstrip("/")
    tail = _PLACEHOLDER if url == PLACEHOLDER_URL else _FROM_REPO
    return _INSTALL.format(url=url, wheel_var=WHEEL_VAR, from_repo=tail)


def sync_colab_cells(notebooks: list[Path]) -> list[Path]:
    """Rewrite the Colab cell of each notebook from ``_config.yml``; returns those changed."""
    changed = []
    src = colab_cell_source()
    for path in notebooks:
        nb = json.loads(Path(path).read_text())
        for cell in nb["cells"]:
            if COLAB_TAG in cell.get("metadata", {}).get("tags", []) and "google.colab" in "".join(
                cell["source"]
            ):
                if "".join(cell["source"]) != src:
                    cell["source"] = src.splitlines(keepends=True)
                    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
                    changed.append(Path(path))
    return changed
