"""Colab rehearsal: run every chapter alone, from the installed package, in a clean environment.

    python scripts/colab_rehearsal.py [chapters/NN-x.ipynb ...] [--timeout 360] [--executor nbval]

1. builds a wheel of `utils` from the checkout (the files as they are, committed or not);
2. makes a clean virtual environment (no system site-packages) holding only what a Colab runtime
   has: torch and torchvision, the libraries Colab preinstalls, and the tools that execute a
   notebook; it is cached, keyed on that list and on the package's declared dependencies, so a
   second run starts at once (a changed dependency makes a new one, where it installs from scratch);
3. copies each chapter alone into an empty temporary folder and executes it there, with
   ``$PRUNING_BOOK_WHEEL`` pointing at the wheel: the chapter's own set-up cell installs the package
   and its dependencies exactly as it does on Colab (the book's pins are not used);
4. prints each chapter's time and result, and fails if any chapter fails, runs over the limit
   (``--timeout``, where it is stopped) or over its budget (``--budget``: it ran to the end,
   but took longer than a reader should wait); a chapter over ``--target`` is named, not failed.

The book's other dependencies are installed into the cached venv once, before the first
chapter, so that every chapter's time is its own.

With ``--executor nbval`` (the default, used by scripts/test.sh) each chapter runs under
``pytest --nbval-lax``, so this one execution is also the nbval test of the committed chapters;
``--executor nbclient`` only executes them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
WHEEL_VAR = "PRUNING_BOOK_WHEEL"
# What a Colab runtime has before the set-up cell runs (not the book's pins), plus the executors.
PLATFORM = ["torch==2.14.1", "torchvision==0.29.1"]
COLAB_PREINSTALLED = [
    "numpy",
    "pandas",
    "matplotlib",
    "scikit-learn",
    "psutil",
    "tqdm",
    "ipykernel",
    "transformers",  # chapter 9's section on real models (Colab preinstalls it)
]
EXECUTORS = ["nbclient", "nbformat", "pytest", "nbval"]
CACHE = Path(
    os.environ.get(
        "PRUNING_BOOK_REHEARSAL_CACHE", Path.home() / ".cache" / "pruning-book" / "rehearsal"
    )
)


def log(msg: str) -> None:
    print(msg, flush=True)


def build_wheel(out: Path) -> Path:
    """A wheel of the package from the working tree, built in a scratch copy (nothing is written
    into the checkout; no network: the installed setuptools builds it)."""
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="pruning-book-src-") as tmp:
        src = Path(tmp)
        shutil.copy2(ROOT / "pyproject.toml", src)
        shutil.copytree(
            ROOT / "utils", src / "utils", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        for extra in ("README.md", "LICENSE"):
            if (ROOT / extra).exists():
                shutil.copy2(ROOT / extra, src)
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                str(out),
                str(src),
            ],
            check=True,
        )
    wheels = sorted(out.glob("pruning_book_utils-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise RuntimeError(f"no wheel was written to {out}")
    return wheels[-1]


def requirements_key() -> str:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    text = json.dumps(
        [sys.version_info[:2], PLATFORM, COLAB_PREINSTALLED, EXECUTORS, sorted(declared)]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def clean_env(venv: Path, **extra: str) -> dict[str, str]:
    """The environment of a fresh runtime: this venv first on PATH, nothing of the checkout."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "JUPYTER_PATH", WHEEL_VAR)
    }
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(venv),
        JUPYTER_PATH=str(venv / "share" / "jupyter"),
        JUPYTER_PREFER_ENV_PATH="1",
        PYTHONNOUSERSITE="1",
        PRUNING_BOOK_QUIET="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        **extra,
    )
    return env


def ensure_venv(cache: Path = CACHE) -> Path:
    """The cached clean venv for the current requirements; made (minutes: torch is large) if absent."""
    key = requirements_key()
    venv = cache / f"venv-{key}"
    if (venv / ".ready").exists():
        log(f"venv: {venv} (cached)")
        return venv
    for old in cache.glob("venv-*"):  # one environment at a time on disk
        shutil.rmtree(old, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"venv: creating {venv} (a clean one: no system site-packages)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    py, env = str(venv_python(venv)), clean_env(venv)
    for cmd in (
        [py, "-m", "pip", "install", "-q", *PLATFORM, *COLAB_PREINSTALLED, *EXECUTORS],
        [py, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"],
    ):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd[2:5])} ... failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
    (venv / ".ready").write_text(key + "\n")
    log(f"venv: ready in {time.perf_counter() - t0:.0f} s")
    return venv


PROBE = (
    "import importlib.util, sys; print(sys.executable); "
    "assert importlib.util.find_spec('utils') is None, 'utils importable before the install'"
)


def preflight(venv: Path, folder: Path, wheel: Path) -> None:
    """The venv starts without this package, and a notebook kernel there runs the venv's Python.

    The wheel's dependencies are installed first (kept in the cached venv), so that the first
    chapter's time is its own, not the download of the book's other dependencies."""
    py, env = str(venv_python(venv)), clean_env(venv)
    done = subprocess.run(
        [py, "-m", "pip", "install", "-q", str(wheel)], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"installing {wheel.name} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    subprocess.run(
        [py, "-m", "pip", "uninstall", "-q", "-y", "pruning-book-utils"],
        env=env,
        capture_output=True,
    )
    for left in venv.glob("lib/python*/site-packages/utils"):  # files that pip does not own
        if not (left / "__init__.py").exists():  # (such as __pycache__) outlive the uninstall
            shutil.rmtree(left)
    code = (
        "import nbformat, nbclient; nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("
        f"{PROBE!r})]); nbclient.NotebookClient(nb, kernel_name='python3').execute(); "
        "print(nb.cells[0].outputs[0]['text'].strip())"
    )
    done = subprocess.run(
        [py, "-c", code], env=env, cwd=folder, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0 or not done.stdout.strip().startswith(str(venv)):
        raise RuntimeError(
            f"the rehearsal kernel is not the clean venv's Python:\n{done.stdout}\n{done.stderr}"
        )


def run_chapter(venv: Path, chapter: Path, wheel: Path, executor: str, timeout: float) -> dict:
    """Copy ``chapter`` alone into an empty folder and execute it there; returns time and result."""
    with tempfile.TemporaryDirectory(prefix="colab-") as tmp:
        lone = Path(tmp) / chapter.name
        shutil.copy2(chapter, lone)
        py, env = str(venv_python(venv)), clean_env(venv, **{WHEEL_VAR: str(wheel)})
        if executor == "nbval":
            cmd = [
                py,
                "-m",
                "pytest",
                "--nbval-lax",
                "--nbval-current-env",
                "-p",
                "no:cacheprovider",
                "-q",
                "--tb=short",
                lone.name,
            ]
        else:
            cmd = [
                py,
                "-c",
                "import sys, nbformat, nbclient; nb = nbformat.read(sys.argv[1], 4); "
                "nbclient.NotebookClient(nb, kernel_name='python3', timeout=None).execute()",
                lone.name,
            ]
        t0 = time.perf_counter()
        try:
            done = subprocess.run(
                cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout
            )
            ok, tail = done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        except subprocess.TimeoutExpired as e:
            ok, tail = False, f"over the {timeout:.0f} s limit\n" + str((e.stdout or b"")[-2000:])
        left = sorted(
            p.name
            for p in Path(tmp).iterdir()
            if p.name != lone.name and not p.name.startswith(".")
        )
    return {
        "chapter": chapter.name,
        "seconds": round(time.perf_counter() - t0, 1),
        "ok": ok,
        "tail": tail,
        "files written": left,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", nargs="*", type=Path)
    parser.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("PRUNING_BOOK_CHAPTER_TIMEOUT", 360)),
        help="seconds per chapter, the install included (default 360)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds a chapter may take (its install included); over it, the chapter fails",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        help="seconds a chapter should take: over it, it is named (and passes, within --budget)",
    )
    parser.add_argument("--times", type=Path, help="also write each chapter's time here (text)")
    parser.add_argument("--executor", choices=("nbval", "nbclient"), default="nbval")
    parser.add_argument("--json", type=Path, help="also write the per-chapter results here")
    args = parser.parse_args(argv)
    chapters = args.chapters or sorted((ROOT / "chapters").glob("*.ipynb"))
    t0 = time.perf_counter()
    venv = ensure_venv()
    with tempfile.TemporaryDirectory(prefix="pruning-book-wheel-") as build:
        wheel = build_wheel(Path(build))
        log(f"wheel: {wheel.name}")
        with tempfile.TemporaryDirectory(prefix="colab-probe-") as probe:
            preflight(venv, Path(probe), wheel)
        results = []
        for chapter in chapters:
            r = run_chapter(venv, chapter.resolve(), wheel, args.executor, args.timeout)
            ran_clean = r["ok"]
            over = args.budget is not None and r["seconds"] > args.budget
            r["ok"] = ran_clean and not over
            results.append(r)
            log(f"{r['chapter']:<28} {r['seconds']:7.1f} s  {'ok' if r['ok'] else 'FAILED'}")
            if not ran_clean:
                log(r["tail"])
            if over:
                log(
                    f"  {r['chapter']} took {r['seconds']:.0f} s, over the budget of "
                    f"{args.budget:.0f} s a chapter"
                )
            elif args.target is not None and r["seconds"] > args.target:
                r["slow"] = True
                log(
                    f"  {r['chapter']} took {r['seconds']:.0f} s, over the {args.target:.0f} s target"
                )
    if args.times:
        args.times.parent.mkdir(parents=True, exist_ok=True)
        args.times.write_text(
            "".join(
                f"{r['chapter']:<28} {r['seconds']:7.1f} s  "
                f"{'ok' if r['ok'] else 'FAILED'}{', over the target' if r.get('slow') else ''}\n"
                for r in results
            )
            + f"{'chapters in all':<28} {sum(r['seconds'] for r in results):7.1f} s\n"
        )
    if args.json:
        args.json.write_text(
            json.dumps([{k: v for k, v in r.items() if k != "tail"} for r in results], indent=1)
        )
    failed = [r["chapter"] for r in results if not r["ok"]]
    total = sum(r["seconds"] for r in results)
    log(
        f"Colab rehearsal ({args.executor}): {len(results) - len(failed)} of {len(results)} chapters passed; "
        f"chapters {total:.0f} s, all {time.perf_counter() - t0:.0f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
