"""The code follows the ruff configuration in pyproject.toml (lint rules and formatting)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_ruff_lint_is_clean():
    run = ruff("check", "--no-cache", ".")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]


def test_ruff_format_is_clean():
    run = ruff("format", "--no-cache", "--check", ".")
    assert run.returncode == 0, "run `ruff format .`:\n" + run.stdout[-3000:] + run.stderr[-1000:]


def test_the_style_check_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx=1\n")
    lint = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    form = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--no-cache", "--isolated", "--check", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lint.returncode == 1 and "F401" in lint.stdout and form.returncode == 1
