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


def colab_cell_source(url: str | None = None) -> str:
    """The first code cell of every chapter: on Colab only, install this book's ``utils``.

    Colab already has PyTorch; the install brings ``utils`` and its small dependencies only.
    """
    url = url or repository_url()
    return ("# Colab only: install this book's `utils` package (Colab's own PyTorch is kept).\n"
            "import sys\n"
            "if \"google.colab\" in sys.modules:\n"
            f"    !pip install -q \"pruning-book-utils @ git+{url}.git\"")


def sync_colab_cells(notebooks: list[Path]) -> list[Path]:
    """Rewrite the Colab cell of each notebook from ``_config.yml``; returns those changed."""
    changed = []
    src = colab_cell_source()
    for path in notebooks:
        nb = json.loads(Path(path).read_text())
        for cell in nb["cells"]:
            if COLAB_TAG in cell.get("metadata", {}).get("tags", []) and "google.colab" in "".join(cell["source"]):
                if "".join(cell["source"]) != src:
                    cell["source"] = src.splitlines(keepends=True)
                    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
                    changed.append(Path(path))
    return changed
