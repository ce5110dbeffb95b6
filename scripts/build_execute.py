"""Execute the book's chapters before Sphinx renders them; stop at the first failing cell.

    python scripts/build_execute.py [--book DIR]

Run by ``scripts/build.sh`` before ``jupyter-book build``. Every notebook in ``_toc.yml`` that
jupyter-cache (``_build/.jupyter_cache``, the cache the book build reads) does not hold yet is run
top to bottom on a fresh kernel, one after the other. Cells tagged ``raises-exception`` may fail;
any other failing cell stops this script at once, non-zero, with the chapter, the cell and the
message on the last line. A failed chapter is never cached and its old page is removed from
``_build/html``, so the next run executes it again and no stale page is left to publish.
The Sphinx build that follows finds every chapter in the cache and executes nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat
import yaml
from jupyter_cache import get_cache
from jupyter_cache.base import CacheBundleIn
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# the kernel logs errors only: no "Kernel is running over TCP without encryption" per chapter
QUIET_KERNEL = ["--IPKernelApp.log_level=ERROR"]


def toc_files(toc: dict) -> list[str]:
    """Every ``file:`` entry of a jupyter-book ``_toc.yml``, in reading order."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                found.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []) or []:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    found.append(toc["root"])
    walk(toc)
    return found


def notebooks(book: Path) -> list[Path]:
    toc = yaml.safe_load((book / "_toc.yml").read_text())
    paths = []
    for entry in toc_files(toc):
        path = book / (entry if entry.endswith(".ipynb") else entry + ".ipynb")
        if path.exists() and path not in paths:
            paths.append(path)
    return paths


def fail(book: Path, path: Path, where: str, message: str, detail: str) -> int:
    """Print the cause (last lines), remove the chapter's old page, return the exit status."""
    page = book / "_build" / "html" / path.relative_to(book).with_suffix(".html")
    if page.exists():
        page.unlink()
    if detail:
        print(detail.rstrip(), file=sys.stderr)
    rel = path.relative_to(book).as_posix()
    print(f"\nbuild stopped: {rel}, {where}: {message}", file=sys.stderr, flush=True)
    return 1


def execute(book: Path, path: Path, timeout: int, cache) -> int:
    rel = path.relative_to(book).as_posix()
    nb = nbformat.read(path, as_version=4)
    try:
        record = cache.match_cache_notebook(nb)
    except KeyError:
        record = None
    if record is not None:
        print(f"{rel}: cached (executed {record.created:%Y-%m-%d %H:%M})", flush=True)
        return 0
    print(f"{rel}: executing ...", flush=True)
    failed = {}

    def on_error(cell, cell_index, execute_reply):
        if "raises-exception" not in cell.metadata.get("tags", []):
            failed.setdefault("index", cell_index)

    started = {}

    def on_start(cell, cell_index):
        started["index"] = cell_index

    client = NotebookClient(
        nb,
        timeout=timeout,
        allow_errors=False,
        record_timing=False,
        extra_arguments=QUIET_KERNEL,
        kernel_name=nb.metadata.get("kernelspec", {}).get("name", "python3"),
        resources={"metadata": {"path": str(path.parent)}},
        on_cell_error=on_error,
        on_cell_start=on_start,
    )
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as err:
        index = failed.get("index", started.get("index", -1))
        count = nb.cells[index].get("execution_count") if index >= 0 else None
        where = f"cell {index + 1}" + (f" (In [{count}])" if count else "")
        tb = ANSI.sub("", err.traceback or str(err))
        lines = [line for line in tb.strip().splitlines() if line.strip()]
        message = f"{err.ename}: {err.evalue}".splitlines()[0] if err.ename else lines[-1]
        return fail(book, path, where, message, "\n".join(lines[-20:]))
    except CellTimeoutError as err:
        index = started.get("index", -1)
        return fail(
            book,
            path,
            f"cell {index + 1}",
            f"timed out after {timeout} s (execute.timeout in _config.yml)",
            str(err),
        )
    except DeadKernelError as err:
        index = started.get("index", -1)
        return fail(book, path, f"cell {index + 1}", "the kernel died", str(err))
    seconds = time.perf_counter() - t0
    cache.cache_notebook_bundle(
        CacheBundleIn(nb, str(path.resolve()), data={"execution_seconds": seconds}),
        check_validity=False,
        overwrite=True,
    )
    print(f"{rel}: executed in {seconds:.0f} s, cached", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--book", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    book = args.book.resolve()
    config = yaml.safe_load((book / "_config.yml").read_text()).get("execute", {})
    mode = config.get("execute_notebooks", "auto")
    if mode == "off":
        print("execute_notebooks is off: nothing to execute")
        return 0
    os.environ.setdefault("PRUNING_BOOK_QUIET", "1")
    cache = get_cache(str(book / "_build" / ".jupyter_cache"))
    if mode == "force":
        cache.clear_cache()
    timeout = int(config.get("timeout", 300))
    t0 = time.perf_counter()
    for path in notebooks(book):
        status = execute(book, path, timeout, cache)
        if status:
            return status
    print(f"chapters: {time.perf_counter() - t0:.0f} s in all (cached ones take none)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
