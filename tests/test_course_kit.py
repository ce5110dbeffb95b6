"""The course kit: student copies (no solution left, run clean) and the autograder (reference =
full marks, untouched copy = 0, one exercise solved = exactly its points, broken or hostile
submissions = rows, never a crash or a changed file outside the grader's temporary folder)."""

import ast
import copy
import csv
import json
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


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_reference_full_marks_and_one_solved_exact_points(path, tmp_path):
    """On the chapter's imports and exercises only (seconds, not minutes): the reference solutions
    score full marks, an untouched copy zero, a copy with one exercise solved exactly its points.
    Exercises whose check needs objects the chapter body builds are graded by the heavy test."""
    nb = nbformat.read(path, as_version=4)
    spec = grade.exercise_spec(path)
    auto = [e for e in spec if e["kind"] == "auto"]
    alone = [e for e in auto if self_contained(nb, e)]
    assert alone, "at least one exercise can be graded on its own"
    reference = write(trimmed(nb), tmp_path / "reference.ipynb")
    small_copy = student_copy.student_copy(trimmed(nb), path.stem)
    untouched = write(small_copy, tmp_path / "untouched.ipynb")
    first = alone[0]
    solved = copy.deepcopy(small_copy)
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
    rows = grade_files([reference, untouched, one], tmp_path, chapter=path)
    ref, zero, single = (
        by_exercise(rows, reference),
        by_exercise(rows, untouched),
        by_exercise(rows, one),
    )
    assert ref["TOTAL"]["max_points"] == sum(e["points"] for e in auto)
    assert ref["TOTAL"]["points"] == sum(e["points"] for e in alone), ref
    assert all(ref[e["label"]]["points"] == e["points"] for e in alone)
    assert all("is not defined" in ref[e["label"]]["message"] for e in auto if e not in alone)
    assert zero["TOTAL"]["points"] == 0, zero
    assert (
        single["TOTAL"]["points"] == first["points"]
        and single[first["label"]]["points"] == first["points"]
    ), single
    manual = [e["label"] for e in spec if e["kind"] == "manual"]
    assert all(zero[m]["message"] == "grade by hand: no answer" for m in manual)
    assert all(zero[e["label"]]["message"].startswith("0 of ") for e in alone)


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
        cell_timeout=30,
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
        grade_files([path], tmp_path, chapter=chapter, cell_timeout=20, total_timeout=60), path
    )
    assert rows["TOTAL"]["points"] == 0
    auto = [e["label"] for e in grade.exercise_spec(chapter) if e["kind"] == "auto"]
    assert "ran longer than 60 s" in rows["TOTAL"]["message"] or all(
        "timed out" in rows[label]["message"] or "no result" in rows[label]["message"]
        for label in auto
    ), rows


def test_cli_writes_csv(tmp_path):
    chapter = CHAPTERS[0]
    nb = trimmed(nbformat.read(chapter, as_version=4))
    path = write(nb, tmp_path / "alice.ipynb")
    out = tmp_path / "grades.csv"
    assert grade.main([str(path), "--out", str(out), "--cell-timeout", "60"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == grade.FIELDS and rows[-1]["exercise"] == "TOTAL"
    assert rows[-1]["points"] == rows[-1]["max_points"]


# ----------------------------------------------------------------------------- the heavy one
@pytest.mark.heavy
@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_student_copy_runs_clean_and_scores_zero(path, tmp_path):
    """Grading the untouched full copy of a chapter both runs it top to bottom (no cell may raise)
    and checks that it scores zero. This executes every chapter once: minutes in all."""
    assert student_copy.main([str(path), "--out", str(tmp_path)]) == 0
    copy_ = tmp_path / path.name
    rows = grade_files([copy_], tmp_path, cell_timeout=600, total_timeout=1200)
    total = by_exercise(rows, copy_)["TOTAL"]
    assert (
        total["points"] == 0
        and "raised" not in total["message"]
        and "not graded" not in total["message"]
    ), total
