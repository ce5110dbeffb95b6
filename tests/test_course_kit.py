"""The course kit: student copies (no solution left, run clean) and the autograder (reference =
full marks, untouched copy = 0, one exercise solved = exactly its points, broken or hostile
submissions = rows, never a crash or a changed file outside the grader's temporary folder).

Every chapter's exercises are graded in one plain Python process (seconds); the tests marked
``heavy`` run the grader itself, with its kernels and time-outs, on chapter 1 (about two
minutes; ``scripts/test.sh`` runs them, the fast lane ``-m "not heavy"`` does not)."""

import ast
import copy
import csv
import json
import os
import re
import subprocess
import symtable
import sys
from pathlib import Path

import nbformat
import pytest
from bookconf import ROOT
from conftest import load_file

CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))


student_copy = load_file(ROOT / "scripts" / "student_copy.py")
grade = load_file(ROOT / "scripts" / "grade.py")


def tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def exercise_labels(nb):
    return [t for c in nb.cells if "exercise" in tags(c) for t in tags(c) if t.startswith("ex-")]


def trimmed(nb):
    """The chapter's title, Colab cell, imports and exercises only: grading it takes seconds."""
    cells = nb.cells
    start = next(i for i, c in enumerate(cells) if "## Exercises" in c.source)
    imports = []
    for c in cells[:start]:
        if c.cell_type == "code" and "google.colab" not in c.source:
            tree = ast.parse(
                "\n".join(
                    ln for ln in c.source.splitlines() if not ln.lstrip().startswith(("!", "%"))
                )
            )
            imports += [
                ast.get_source_segment(c.source, s)
                for s in tree.body
                if isinstance(s, (ast.Import, ast.ImportFrom))
            ]
    out = copy.deepcopy(nb)
    out.cells = [
        copy.deepcopy(cells[0]),
        nbformat.v4.new_code_cell("\n".join(imports)),
    ] + copy.deepcopy(cells[start:])
    return out


def grade_files(paths, tmp_path, **kw):
    rows = []
    for p in paths:
        rows += grade.grade_one(
            Path(p),
            CHAPTERS,
            kw.get("chapter"),
            kw.get("cell_timeout", 120),
            kw.get("total_timeout", 300),
        )
    return rows


def by_exercise(rows, student):
    return {r["exercise"]: r for r in rows if r["student"] == str(student)}


def write(nb, path):
    nbformat.write(nb, path)
    return path


# ----------------------------------------------------------------------------- convention and copies
@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_exercise_cells_follow_the_convention(path):
    nb = nbformat.read(path, as_version=4)
    labels = exercise_labels(nb)
    assert len(labels) >= 3 and len(set(labels)) == len(labels)
    kinds = {"auto": 0, "manual": 0}
    for ex in grade.exercise_spec(path):
        kinds[ex["kind"]] += 1
    assert set(e["label"] for e in grade.exercise_spec(path)) == set(labels), (
        "every exercise has one stub cell"
    )
    assert kinds["manual"] >= 1 and kinds["auto"] >= 1, (
        "checked exercises and an explain question with an answer key"
    )
    for c in nb.cells:
        if "{solution-start}" in c.source or "{solution-end}" in c.source:
            assert "solution" in tags(c)
        if "{exercise-start}" in c.source:
            assert "exercise" in tags(c)
        assert "# NBVAL" not in c.source, "nbval markers are tags, not comments"
    for label in labels:
        sol = [c for c in nb.cells if "solution" in tags(c) and label in tags(c)]
        assert sol and "{solution-start}" in sol[0].source and "{solution-end}" in sol[-1].source
        stub = next(c for c in nb.cells if "stub" in tags(c) and label in tags(c))
        if stub.cell_type == "code":
            assert "# your code here" in stub.source
            assert any("assert check_" in c.source for c in sol)
        else:  # an explain question: the answer key sits between the dropdown's fences
            assert any(
                c.cell_type == "markdown" and "{solution-" not in c.source and c.source.strip()
                for c in sol
            )


@pytest.mark.parametrize(
    "path",
    [p for p in CHAPTERS if p.stem[:2] in {f"0{i}" for i in range(1, 9)}],
    ids=lambda p: p.stem,
)
def test_chapters_1_to_8_hide_stub_output_and_have_a_design_exercise(path):
    nb = nbformat.read(path, as_version=4)
    assert all(
        "hide-output" in tags(c) for c in nb.cells if "stub" in tags(c) and c.cell_type == "code"
    )
    assert any(c.metadata.get("points", 1) >= 2 for c in nb.cells if "exercise" in tags(c))


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_student_copy_has_no_solution_and_no_output(path, tmp_path):
    assert student_copy.main([str(path), "--out", str(tmp_path)]) == 0
    nb = nbformat.read(path, as_version=4)
    copy_ = nbformat.read(tmp_path / path.name, as_version=4)
    text = "\n".join(c.source for c in copy_.cells)
    elsewhere = {ln for c in nb.cells if "solution" not in tags(c) for ln in c.source.splitlines()}
    solution_lines = {
        ln
        for src in student_copy.solution_sources(nb)
        for ln in src.splitlines()
        if ln.strip() and ln not in elsewhere
    }
    assert solution_lines, "the chapter has solutions"
    left = {ln for ln in text.splitlines() if ln in solution_lines}
    assert not left, f"solution lines left in the student copy: {sorted(left)[:3]}"
    assert "{solution-start}" not in text and "{exercise-start}" not in text
    assert all(
        c.outputs == [] and c.execution_count is None for c in copy_.cells if c.cell_type == "code"
    )
    assert sum("google.colab" in c.source for c in copy_.cells) == 1
    assert "Student copy" in copy_.cells[1].source
    assert "collapsed dropdowns" not in text, "the copy has no solutions to point at"
    markdown = "\n".join(c.source for c in copy_.cells if c.cell_type == "markdown")
    roles = re.findall(r"\{[\w:.-]+\}`", markdown) + re.findall(
        r"^(?:`{3,}|:{3,})\{", markdown, re.M
    )
    assert not roles, f"MyST roles or directives that Jupyter shows raw: {roles[:3]}"
    kept = [c for c in nb.cells if c.cell_type == "markdown" and "solution" not in tags(c)]
    if any("{cite" in c.source for c in kept):
        assert "## References" in copy_.cells[-1].source
    stubs = [c for c in copy_.cells if "stub" in tags(c)]
    assert len(stubs) == len(exercise_labels(nb)) and all(
        "check_" in c.source for c in stubs if c.cell_type == "code"
    )
    nbformat.validate(copy_)


# ----------------------------------------------------------------------------- grading
def self_contained(nb, ex):
    """True when the exercise's check call needs nothing but the stub's own function (some
    checks also take objects the chapter builds, such as a trained model)."""
    stub = next(c for c in nb.cells if "stub" in tags(c) and ex["label"] in tags(c))
    defined = {s.name for s in ast.parse(stub.source).body if isinstance(s, ast.FunctionDef)}
    return set(ex["names"]) <= defined


# Every chapter is graded by the cheap path below; one chapter goes through the grader end to end
# (kernels, time-outs, the CSV), as a teacher runs it. The Colab rehearsal (scripts/test.sh) runs
# every chapter with its solutions and stubs, so a student copy, which only drops the solution
# cells, runs wherever no later cell needs a name that only a solution defines (checked here).
IN_PROCESS = r"""
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import grade
out = {}
for line in sys.stdin:
    job = json.loads(line)
    for who in ("reference", "untouched"):
        ns = {"__name__": "__main__"}
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            for source in [job["imports"], *job[who]]:  # as a kernel runs a notebook's cells:
                try:  # one namespace, in order; a cell that raises, then the next
                    exec(source, ns)
                except Exception:
                    pass
            for ex in job["alone"]:  # then every check, as the grader calls it
                exec(grade.grading_source(ex), ns)
        parts = buf.getvalue().split(grade.MARK)[1:]
        for ex, part in zip(job["alone"], parts):
            out[f"{job['chapter']}|{ex['label']}|{who}"] = json.loads(part.splitlines()[0])
print(grade.MARK + json.dumps(out))
"""


def exercise_code(nb):
    """The code cells of the chapter's exercise section, in order (what a trimmed copy runs)."""
    return [c.source for c in trimmed(nb).cells[2:] if c.cell_type == "code"]


@pytest.fixture(scope="module")
def in_process():
    """Every self-contained exercise of every chapter graded by the grader's own check source, in
    one fresh Python process (no kernel): the chapter's exercise section with its solutions (the
    reference) and the student copy of it (untouched), each in one namespace, cells in order."""
    lines = []
    for path in CHAPTERS:
        nb = nbformat.read(path, as_version=4)
        alone = [
            e for e in grade.exercise_spec(path) if e["kind"] == "auto" and self_contained(nb, e)
        ]
        untouched = student_copy.student_copy(nb, path.stem)
        job = {
            "chapter": str(path),
            "imports": trimmed(nb).cells[1].source,
            "alone": alone,
            "reference": exercise_code(nb),
            "untouched": exercise_code(untouched),
        }
        lines.append(json.dumps(job))
    done = subprocess.run(
        [sys.executable, "-c", IN_PROCESS, str(ROOT / "scripts")],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PRUNING_BOOK_QUIET": "1"},
    )
    assert grade.MARK in done.stdout, done.stderr[-3000:]
    return json.loads(done.stdout.split(grade.MARK, 1)[1].splitlines()[0])


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_reference_passes_and_untouched_stub_scores_zero_for_every_exercise(path, in_process):
    """Self-contained exercises: graded in process. The others (their check takes objects the
    chapter builds): the stub calls its check exactly as the solution cell asserts it, and that
    assert runs in the Colab rehearsal."""
    nb = nbformat.read(path, as_version=4)
    auto = [e for e in grade.exercise_spec(path) if e["kind"] == "auto"]
    assert any(self_contained(nb, e) for e in auto), "at least one exercise grades on its own"
    for ex in auto:
        if self_contained(nb, ex):
            ref, stub = (
                in_process[f"{path}|{ex['label']}|{who}"] for who in ("reference", "untouched")
            )
            assert "error" not in ref and ref["passed"] == ref["total"] > 0, (ex["label"], ref)
            assert "error" not in stub and stub["passed"] == 0 < stub["total"], (ex["label"], stub)
        else:
            asserted = [
                c.source
                for c in nb.cells
                if "solution" in tags(c) and ex["label"] in tags(c) and c.cell_type == "code"
            ]
            assert any(f"assert {ex['call']}" in src for src in asserted), ex


def bound_and_loaded(source):
    """Names a cell binds at its top level (assignments, defs, imports) and the module-level
    names it reads anywhere, functions included (``x += 1`` both reads and binds ``x``)."""
    code = "\n".join(ln for ln in source.splitlines() if not ln.lstrip().startswith(("!", "%")))
    top = symtable.symtable(code, "cell", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    loaded = {s.get_name() for s in top.get_symbols() if s.is_referenced()}
    tables = list(top.get_children())
    while tables:  # names a function or class body reads from the cell's module scope
        t = tables.pop()
        tables += t.get_children()
        loaded |= {
            s.get_name()
            for s in t.get_symbols()
            if s.is_referenced() and (s.is_global() or s.is_free()) and not s.is_assigned()
        }
    return bound, loaded


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_student_copy_runs_where_the_chapter_runs(path):
    """A student copy is the chapter without its solution cells: its code cells are the chapter's
    others, in order, and none of them reads a name that only a solution cell binds."""
    nb = nbformat.read(path, as_version=4)
    copy_ = student_copy.student_copy(nb, path.stem)
    kept = [c.source for c in nb.cells if c.cell_type == "code" and "solution" not in tags(c)]
    assert [c.source for c in copy_.cells if c.cell_type == "code"] == kept
    start = next(i for i, c in enumerate(nb.cells) if "## Exercises" in c.source)
    assert all(
        {"stub", "solution"} & set(tags(c)) for c in nb.cells[start:] if c.cell_type == "code"
    ), "every code cell among the exercises is a stub or a solution"
    everywhere, only_solutions = set(), set()
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        bound, loaded = bound_and_loaded(c.source)
        if "solution" in tags(c):
            only_solutions |= bound - everywhere
            continue
        needs = (loaded - bound) & only_solutions
        assert not needs, f"a cell of the student copy needs {sorted(needs)} from a solution"
        everywhere |= bound
        only_solutions -= bound


@pytest.mark.heavy
def test_one_chapter_graded_end_to_end(tmp_path):
    """Chapter 1 through the grader as a teacher runs it (a kernel per submission): its untouched
    full student copy runs clean and scores zero, the reference full marks, a copy with one
    exercise solved exactly that exercise's points."""
    path = CHAPTERS[0]
    nb = nbformat.read(path, as_version=4)
    spec = grade.exercise_spec(path)
    auto = [e for e in spec if e["kind"] == "auto"]
    assert all(self_contained(nb, e) for e in auto)
    assert student_copy.main([str(path), "--out", str(tmp_path)]) == 0
    full_copy = tmp_path / path.name
    reference = write(trimmed(nb), tmp_path / "reference.ipynb")
    solved = student_copy.student_copy(trimmed(nb), path.stem)
    first = auto[0]
    code = next(
        c
        for c in nb.cells
        if "solution" in tags(c) and first["label"] in tags(c) and c.cell_type == "code"
    )
    at = next(
        i for i, c in enumerate(solved.cells) if "stub" in tags(c) and first["label"] in tags(c)
    )
    solved.cells.insert(at + 1, nbformat.v4.new_code_cell(code.source))
    one = write(solved, tmp_path / "one.ipynb")
    rows = grade_files([full_copy, reference, one], tmp_path, chapter=path, cell_timeout=300)
    zero, ref, single = (by_exercise(rows, p) for p in (full_copy, reference, one))
    total = zero["TOTAL"]
    assert total["points"] == 0 and "raised" not in total["message"], total
    assert "not graded" not in total["message"], total
    assert all(zero[e["label"]]["message"].startswith("0 of ") for e in auto), zero
    manual = [e["label"] for e in spec if e["kind"] == "manual"]
    assert all(zero[m]["message"] == "grade by hand: no answer" for m in manual)
    assert ref["TOTAL"]["points"] == ref["TOTAL"]["max_points"] == sum(e["points"] for e in auto)
    assert all(ref[e["label"]]["points"] == e["points"] for e in auto), ref
    assert single["TOTAL"]["points"] == single[first["label"]]["points"] == first["points"], single


@pytest.mark.heavy
def test_broken_and_hostile_submissions_give_rows(tmp_path):
    chapter = CHAPTERS[0]
    nb = student_copy.student_copy(trimmed(nbformat.read(chapter, as_version=4)), chapter.stem)
    (tmp_path / "not-json.ipynb").write_text("{ this is not a notebook")
    (tmp_path / "not-a-notebook.ipynb").write_text(json.dumps({"cells": 3}))
    spec = grade.exercise_spec(chapter)
    auto = [e for e in spec if e["kind"] == "auto"]
    hostile = copy.deepcopy(nb)
    victim = tmp_path / "outside.txt"
    victim.write_text("keep me")
    stubs = [i for i, c in enumerate(hostile.cells) if "stub" in tags(c) and c.cell_type == "code"]
    hostile.cells.pop(stubs[0])  # a missing exercise
    at = (
        next(
            i
            for i, c in enumerate(hostile.cells)
            if c.cell_type == "code" and "import torch" in c.source
        )
        + 1
    )
    hostile.cells.insert(
        at,
        nbformat.v4.new_code_cell(  # deletes every file it can reach by relative paths
            "import os, shutil\nfor f in os.listdir('.'):\n    os.remove(f)\nshutil.rmtree('..', ignore_errors=True)"
        ),
    )
    hostile.cells.insert(
        at + 1, nbformat.v4.new_code_cell("while True:\n    pass")
    )  # an endless loop, interrupted
    write(hostile, tmp_path / "hostile.ipynb")
    killer = copy.deepcopy(nb)
    killer.cells.insert(2, nbformat.v4.new_code_cell("import os\nos._exit(3)"))  # kills the kernel
    write(killer, tmp_path / "killer.ipynb")
    before = sorted(p.name for p in tmp_path.iterdir())
    rows = grade_files(
        [
            tmp_path / "not-json.ipynb",
            tmp_path / "not-a-notebook.ipynb",
            tmp_path / "hostile.ipynb",
            tmp_path / "killer.ipynb",
        ],
        tmp_path,
        chapter=chapter,
        cell_timeout=10,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before and victim.read_text() == "keep me"
    for name in ("not-json.ipynb", "not-a-notebook.ipynb"):
        r = by_exercise(rows, tmp_path / name)
        assert r["TOTAL"]["points"] == 0 and "invalid notebook" in r["TOTAL"]["message"]
        assert all("invalid notebook" in r[e["label"]]["message"] for e in spec)
    r = by_exercise(rows, tmp_path / "hostile.ipynb")
    assert r["TOTAL"]["points"] == 0
    assert "renamed, or its cell deleted" in r[auto[0]["label"]]["message"], r
    assert "raised or timed out" in r["TOTAL"]["message"]
    r = by_exercise(rows, tmp_path / "killer.ipynb")
    assert "killed the kernel" in r["TOTAL"]["message"]
    assert all(r[e["label"]]["message"].startswith("0 of ") for e in auto), r


@pytest.mark.heavy
def test_endless_notebook_is_stopped(tmp_path):
    """A loop that ignores interrupts: cells and checks time out, or the whole run is killed."""
    chapter = CHAPTERS[0]
    nb = student_copy.student_copy(trimmed(nbformat.read(chapter, as_version=4)), chapter.stem)
    at = (
        next(
            i
            for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and "import torch" in c.source
        )
        + 1
    )
    nb.cells.insert(
        at,
        nbformat.v4.new_code_cell(
            "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"
        ),
    )
    path = write(nb, tmp_path / "endless.ipynb")
    rows = by_exercise(
        grade_files([path], tmp_path, chapter=chapter, cell_timeout=8, total_timeout=30), path
    )
    assert rows["TOTAL"]["points"] == 0
    auto = [e["label"] for e in grade.exercise_spec(chapter) if e["kind"] == "auto"]
    assert "ran longer than 30 s" in rows["TOTAL"]["message"] or all(
        "timed out" in rows[label]["message"] or "no result" in rows[label]["message"]
        for label in auto
    ), rows


@pytest.mark.heavy
def test_endless_exercise_costs_only_itself_and_one_cell_limit(tmp_path):
    """An exercise whose function never returns: its cell times out once, its check is not run
    again, and every other exercise still scores."""
    chapter = CHAPTERS[0]
    auto = [e for e in grade.exercise_spec(chapter) if e["kind"] == "auto"]
    endless = auto[0]
    nb = trimmed(nbformat.read(chapter, as_version=4))  # the reference: full marks
    nb.cells = [c for c in nb.cells if not ("solution" in tags(c) and endless["label"] in tags(c))]
    stub = next(c for c in nb.cells if "stub" in tags(c) and endless["label"] in tags(c))
    name = endless["names"][0]
    imports = "".join(f"{imp}\n" for imp in endless["imports"])  # the stub's own imports
    stub.source = (
        f"{imports}\n\ndef {name}(*args, **kwargs):\n    while True:\n        pass\n\n\n"
        f"{endless['call']}"
    )
    path = write(nb, tmp_path / "endless-exercise.ipynb")
    rows = by_exercise(grade_files([path], tmp_path, chapter=chapter, cell_timeout=8), path)
    assert rows[endless["label"]]["points"] == 0
    assert "was not run again" in rows[endless["label"]]["message"], rows
    for e in auto[1:]:
        assert rows[e["label"]]["points"] == e["points"], rows


@pytest.mark.heavy
def test_cli_writes_csv(tmp_path):
    chapter = CHAPTERS[0]
    nb = trimmed(nbformat.read(chapter, as_version=4))
    path = write(nb, tmp_path / "alice.ipynb")
    out = tmp_path / "grades.csv"
    assert grade.main([str(path), "--out", str(out), "--cell-timeout", "60"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == grade.FIELDS and rows[-1]["exercise"] == "TOTAL"
    assert rows[-1]["points"] == rows[-1]["max_points"]
