"""The course kit: student copies (no solution left, run clean) and the autograder (reference =
full marks, untouched copy = 0, one exercise solved = exactly its points, broken, hostile and
cheating submissions = rows that score nothing, never a crash or a changed file outside the
grader's temporary folder).

Every chapter's exercises are graded in one plain Python process (seconds), hidden cases
included; the tests marked ``heavy`` run the grader itself, with its sandboxes and time-outs, on
chapters 1, 3 and 7 (about two and a half minutes; ``scripts/test.sh`` runs them, the fast lane
``-m "not heavy"`` does not)."""

import ast
import copy
import csv
import json
import os
import re
import subprocess
import symtable
import sys
import time
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
            kw.get("total_timeout"),
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
# (sandboxes, time-outs, the CSV), as a teacher runs it. The Colab rehearsal (scripts/test.sh) runs
# every chapter with its solutions and stubs, so a student copy, which only drops the solution
# cells, runs wherever no later cell needs a name that only a solution defines (checked here).
IN_PROCESS = r"""
import contextlib, io, json, sys
from utils.kit import checks
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
        for ex in job["alone"]:  # then every check with hidden cases, as the grader calls it
            with contextlib.redirect_stdout(io.StringIO()) as printed, checks.hidden_cases(job["seed"]):
                try:
                    v = eval(ex["call"], ns)
                    r = {"passed": v.passed, "total": v.total}
                except Exception as e:
                    r = {"error": repr(e)}
            r["hidden"] = printed.getvalue().count(checks.HIDDEN)
            out[f"{job['chapter']}|{ex['label']}|{who}"] = r
print("<<in-process>>" + json.dumps(out))
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
            "seed": 20261203,
        }
        lines.append(json.dumps(job))
    done = subprocess.run(
        [sys.executable, "-c", IN_PROCESS],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PRUNING_BOOK_QUIET": "1"},
    )
    assert "<<in-process>>" in done.stdout, done.stderr[-3000:]
    return json.loads(done.stdout.split("<<in-process>>", 1)[1].splitlines()[0])


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


def replace_stub(nb, label, source):
    """``nb`` with the stub of exercise ``label`` holding ``source`` (its check call kept)."""
    nb = copy.deepcopy(nb)
    stub = next(c for c in nb.cells if "stub" in tags(c) and label in tags(c))
    call = next(ln for ln in stub.source.splitlines() if ln.startswith("check_"))
    imports = [ln for ln in stub.source.splitlines() if ln.startswith("from utils")]
    stub.source = "\n".join(imports) + "\n\n\n" + source.strip() + "\n\n\n" + call
    return nb


def student(chapter):
    """The student copy of a chapter's exercise section (imports, exercises, no solutions)."""
    return student_copy.student_copy(trimmed(nbformat.read(chapter, as_version=4)), chapter.stem)


def chapter_named(stem):
    return next(p for p in CHAPTERS if p.stem == stem)


@pytest.mark.heavy
def test_one_chapter_graded_end_to_end(tmp_path):
    """Chapter 1 through the grader as a teacher runs it (a sandbox per exercise): its untouched
    full student copy scores zero, the reference full marks, a copy with one exercise solved
    exactly that exercise's points; the chapter's own experiments are not run."""
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
    rows = grade_files([full_copy, reference, one], tmp_path, chapter=path, cell_timeout=120)
    zero, ref, single = (by_exercise(rows, p) for p in (full_copy, reference, one))
    total = zero["TOTAL"]
    assert total["points"] == 0 and "not graded" not in total["message"], total
    assert all(zero[e["label"]]["message"].startswith("0 of ") for e in auto), zero
    manual = [e["label"] for e in spec if e["kind"] == "manual"]
    assert all(zero[m]["message"] == "grade by hand: no answer" for m in manual)
    assert ref["TOTAL"]["points"] == sum(e["points"] for e in auto), ref["TOTAL"]
    assert ref["TOTAL"]["max_points"] == sum(e["points"] for e in spec)
    assert all(ref[e["label"]]["points"] == e["points"] for e in auto), ref
    assert single["TOTAL"]["points"] == single[first["label"]]["points"] == first["points"], single


@pytest.mark.heavy
def test_broken_and_hostile_submissions_give_rows(tmp_path):
    """Files that are not notebooks give rows; code that deletes files, loops without end
    (ignoring interrupts) or ends its process costs only what it stops, and changes nothing
    outside the grader's folder."""
    chapter = CHAPTERS[0]
    nb = student(chapter)
    (tmp_path / "not-json.ipynb").write_text("{ this is not a notebook")
    (tmp_path / "not-a-notebook.ipynb").write_text(json.dumps({"cells": 3}))
    spec = grade.exercise_spec(chapter)
    auto = [e for e in spec if e["kind"] == "auto"]
    solutions = {
        e["label"]: next(
            c.source
            for c in nbformat.read(chapter, as_version=4).cells
            if "solution" in tags(c) and e["label"] in tags(c) and c.cell_type == "code"
        ).replace("assert check_", "check_")
        for e in auto
    }
    victim = tmp_path / "outside.txt"
    victim.write_text("keep me")
    hostile = copy.deepcopy(nb)
    stubs = [i for i, c in enumerate(hostile.cells) if "stub" in tags(c) and c.cell_type == "code"]
    hostile.cells[stubs[1]].source = (  # deletes what it can reach, then solves its exercise
        "import os, shutil\n"
        f"for f in os.listdir('.') + [{str(victim)!r}]:\n"
        "    try:\n        os.remove(f)\n    except OSError:\n        pass\n"
        "shutil.rmtree('..', ignore_errors=True)\n\n" + solutions[auto[1]["label"]]
    )
    hostile.cells[stubs[2]].source = (  # an endless statement that ignores interrupts
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass\n\n"
        + solutions[auto[2]["label"]]
    )
    hostile.cells[stubs[3]].source = "import os\nos._exit(3)\n\n" + solutions[auto[3]["label"]]
    hostile.cells.pop(stubs[0])  # a missing exercise
    write(hostile, tmp_path / "hostile.ipynb")
    before = sorted(p.name for p in tmp_path.iterdir())
    rows = grade_files(
        [
            tmp_path / "not-json.ipynb",
            tmp_path / "not-a-notebook.ipynb",
            tmp_path / "hostile.ipynb",
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
    assert "renamed, or its cell deleted" in r[auto[0]["label"]]["message"], r
    for e in auto[1:]:  # each solved after its hostile lines: the walls, the skip, the restart
        assert r[e["label"]]["points"] == e["points"], r
    assert "timed out" in r["TOTAL"]["message"] and "ended the process" in r["TOTAL"]["message"]
    assert "PermissionError" in r[auto[1]["label"]]["output"], r[auto[1]["label"]]


@pytest.mark.heavy
def test_endless_exercise_costs_only_itself_and_one_cell_limit(tmp_path):
    """An exercise whose function never returns: it times out once, is not run again, and every
    other exercise still scores."""
    chapter = CHAPTERS[0]
    auto = [e for e in grade.exercise_spec(chapter) if e["kind"] == "auto"]
    endless = auto[0]
    nb = trimmed(nbformat.read(chapter, as_version=4))  # the reference: full marks
    nb.cells = [c for c in nb.cells if not ("solution" in tags(c) and endless["label"] in tags(c))]
    nb = replace_stub(
        nb,
        endless["label"],
        f"def {endless['functions'][0]}(*args):\n    while True:\n        pass",
    )
    path = write(nb, tmp_path / "endless-exercise.ipynb")
    t0 = time.perf_counter()
    rows = by_exercise(grade_files([path], tmp_path, chapter=chapter, cell_timeout=10), path)
    assert time.perf_counter() - t0 < 10 + 45, "one time-out, not one per case"
    assert rows[endless["label"]]["points"] == 0
    assert "not run again" in rows[endless["label"]]["message"], rows
    for e in auto[1:]:
        assert rows[e["label"]]["points"] == e["points"], rows


# ----------------------------------------------------------------------------- tricks
# Each trick makes an exercise pass under a grader that runs the check in the student's process
# or only on the cases the notebook shows; each must score nothing here.
SOLUTION_OF = """
def solution_of(text, label, name):  # the instructor's solution, run from the chapter's text
    space = {"torch": torch}
    for c in json.loads(text)["cells"]:
        tags = c["metadata"].get("tags", [])
        if "solution" in tags and label in tags and c["cell_type"] == "code":
            exec("".join(c["source"]).split("assert")[0], space)
    return space[name]
"""

TRICKS_3 = [
    {  # hard-coding the public answers, keyed by the input; a subprocess rewrites the result
        "ex-3-1": """
def share_at_threshold(w, theta):
    return TABLE[(tuple(w.shape), round(float(w.abs().sum()), 3), theta)]
""",
        "ex-3-2": """
import types
import utils.pruning


def rowwise_mask(w, ratio):  # a copy of the forbidden function, built from its code
    sk = utils.pruning.smallest_k
    k_smallest = types.FunctionType(sk.__code__, sk.__globals__, "mine")
    rows = w.reshape(w.shape[0], -1).abs()
    k = round(ratio * rows.shape[1])
    return torch.stack([~k_smallest(r, k) for r in rows]).view_as(w)
""",
        "ex-3-3": """
import utils.kit.checks as _checks


class _AllPass:
    def __init__(self, passed, total):
        self.passed = self.total = total

    def __bool__(self):
        return True


def prune_and_finetune(model, train_loader, ratio):  # patch the checker from inside
    _checks.Verdict = _AllPass
    _checks._sparse_toy_model = lambda got, ratio, val: (None, ratio, 1.0)
    return model
""",
    },
    {  # a forged result line; the instructor's chapter read and its solution run; a patched library
        "ex-3-1": """
import json


def share_at_threshold(w, theta):
    print('<<pruning-book-grade>>' + json.dumps({"passed": 12, "total": 12}))
    print("  pass: forged")
    return None
""",
        "ex-3-2": SOLUTION_OF
        + """
import json
from pathlib import Path
import utils


def rowwise_mask(w, ratio):
    book = Path(utils.__file__).resolve().parents[1] / "chapters" / "03-algorithms.ipynb"
    return solution_of(book.read_text(), "ex-3-2", "rowwise_mask")(w, ratio)
""",
        "ex-3-3": """
import torch
import utils.pruning


def prune_and_finetune(model, train_loader, ratio):  # the check's measure, patched
    utils.pruning.effective_weight = lambda m: torch.zeros_like(m.weight)
    return model
""",
    },
    {  # a plausible slip (strict <); the checker's frame read; a detached process
        "ex-3-1": """
def share_at_threshold(w, theta):
    return float((w.abs() < theta).sum()) / w.numel()
""",
        "ex-3-2": """
import sys


def rowwise_mask(w, ratio):
    frame = sys._getframe(1)
    while frame is not None and "want" not in frame.f_locals:
        frame = frame.f_back
    return frame.f_locals["want"]
""",
        "ex-3-3": """
import json, subprocess, sys
from pathlib import Path


def prune_and_finetune(model, train_loader, ratio):
    forged = json.dumps({"results": {f"ex-3-{i}": {"passed": 1, "total": 1} for i in (1, 2, 3)}})
    script = (
        "import time, pathlib\\n"
        "for _ in range(600):\\n"
        "    for p in pathlib.Path('/tmp').glob('grade-*/private'):\\n"
        f"        (p / 'result.json').write_text({forged!r})\\n"
        "    time.sleep(0.05)\\n"
    )
    subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    return model
""",
    },
]

TRICKS_3 += [
    {  # C code reading the chapter; a blocked function made anew by reloading; forward hijacked
        "ex-3-1": SOLUTION_OF
        + """
import json, os
from pathlib import Path
import utils


def share_at_threshold(w, theta):
    book = Path(utils.__file__).resolve().parents[1] / "chapters" / "03-algorithms.ipynb"
    raw = torch.from_file(str(book), shared=False, size=os.stat(book).st_size, dtype=torch.uint8)
    return solution_of(bytes(raw.numpy()).decode(), "ex-3-1", "share_at_threshold")(w, theta)
""",
        "ex-3-2": """
import importlib
import utils.pruning.magnitude as magnitude


def rowwise_mask(w, ratio):
    fresh = importlib.reload(magnitude).smallest_k
    rows = w.reshape(w.shape[0], -1).abs()
    k = round(ratio * rows.shape[1])
    return torch.stack([~fresh(r, k) for r in rows]).view_as(w)
""",
        "ex-3-3": """
import copy
import torch


def prune_and_finetune(model, train_loader, ratio):  # zeros in the weights, a dense forward
    dense = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight.data.view(-1)
            w[: round(ratio * w.numel())] = 0
    model.__dict__["forward"] = dense
    return model
""",
    },
    {  # a dir_fd read of the chapter; writes outside the sandbox; decoy layers
        "ex-3-1": SOLUTION_OF
        + """
import json, os
from pathlib import Path
import utils


def share_at_threshold(w, theta):
    package = Path(utils.__file__).resolve().parent
    fd = os.open(str(package), os.O_RDONLY)
    os.chdir(os.path.dirname(torch.__file__))
    f = os.open("../chapters/03-algorithms.ipynb", os.O_RDONLY, dir_fd=fd)
    return solution_of(os.read(f, 10**8).decode(), "ex-3-1", "share_at_threshold")(w, theta)
""",
        "ex-3-2": """
import os
from utils.pruning import semi_structured_mask


def rowwise_mask(w, ratio):
    for attempt in (
        lambda: torch.save(w, OUTSIDE + "-saved.pt"),
        lambda: (open("planted.txt", "w").write("x"), os.rename("planted.txt", OUTSIDE + "-moved")),
    ):
        try:
            attempt()
        except Exception:
            pass
    rows = w.reshape(w.shape[0], -1)
    m = rows.shape[1]
    k = round(ratio * m)
    keep = semi_structured_mask(rows.abs().flip(1), n=m - k, m=m).flip(1)
    return keep.view_as(w)
""",
        "ex-3-3": """
import torch
from torch import nn


def prune_and_finetune(model, train_loader, ratio):  # the dense net as 1x1 convolutions
    convs = []
    for m in model:
        if isinstance(m, nn.Linear):
            c = nn.Conv2d(m.in_features, m.out_features, 1)
            c.weight.data = m.weight.data.clone()[:, :, None, None]
            c.bias.data = m.bias.data.clone()
            convs.append(c)
        else:
            convs.append(m)
    decoy = nn.Linear(10, 10)
    decoy.weight.data.view(-1)[: round(ratio * 100)] = 0
    hidden = nn.Identity()
    hidden.decoy = decoy
    return nn.Sequential(nn.Unflatten(1, (10, 1, 1)), *convs, nn.Flatten(), hidden)
""",
    },
]

TRICKS_7 = {  # a different method than the one asked: one-shot pruning, then fine-tuning
    "ex-7-3": """
from utils.lab.training import train
from utils.pruning import prune_unstructured


def prune_while_training(model, train_loader, final, epochs):
    train(model, train_loader, epochs=1, lr=0.05, progress=False)
    prune_unstructured(model, final)
    train(model, train_loader, epochs=epochs - 1, lr=0.05, progress=False)
    return model
""",
    "ex-7-2": """
def mask_overlap(a, b):  # no special case for two empty masks
    a, b = a.bool(), b.bool()
    return float((a & b).sum()) / float((a | b).sum())
""",
}


HONEST_3 = {  # correct, and written differently from the reference: numpy, torch.nn.utils.prune
    "ex-3-1": """
import numpy as np


def share_at_threshold(w, theta):
    return np.mean(np.abs(w.numpy()) <= theta)
""",
    "ex-3-2": """
import numpy as np


def rowwise_mask(w, ratio):
    rows = np.abs(w.reshape(w.shape[0], -1).numpy())
    k = round(ratio * rows.shape[1])
    keep = np.ones(rows.shape, dtype=bool)
    order = np.argsort(rows, axis=1, kind="stable")[:, :k]
    np.put_along_axis(keep, order, False, axis=1)
    return torch.from_numpy(keep).view_as(w)
""",
    "ex-3-3": """
from torch import nn
from torch.nn.utils import prune
from utils.lab.training import train


def prune_and_finetune(model, train_loader, ratio):
    layers = [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=ratio)
    train(model, train_loader, epochs=3, lr=0.02, progress=False)
    return model
""",
}


def public_share_table():
    """What the notebook's own check of exercise 3.1 shows: its inputs and expected answers."""
    from utils.kit import checks

    table = {}
    for w in checks._tensors().values():
        for theta in (0.0, 0.5, 1.0):
            key = (tuple(w.shape), round(float(w.abs().sum()), 3), theta)
            table[key] = float((w.abs() <= theta).sum()) / w.numel()
    return table


def landlock_abi() -> int:
    """The kernel's Landlock version (0 without it): the tricks that only Landlock stops (C code
    reading or writing files) are graded only where the grader has it."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return max(0, libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))
    except (OSError, AttributeError):
        return 0


@pytest.mark.heavy
def test_tricks_score_nothing_and_honest_work_scores_full_marks(tmp_path):
    ch3, ch7 = chapter_named("03-algorithms"), chapter_named("07-trends")
    paths = []
    tricks_here = TRICKS_3 if landlock_abi() else TRICKS_3[:3]
    for i, tricks in enumerate(tricks_here):
        nb = student(ch3)
        for label, source in tricks.items():
            nb = replace_stub(nb, label, source)
        first = next(c for c in nb.cells if "stub" in tags(c) and "ex-3-1" in tags(c))
        first.source = (
            f"TABLE = {public_share_table()!r}\nOUTSIDE = {str(tmp_path / 'planted')!r}\n"
            + first.source
        )
        paths.append(write(nb, tmp_path / f"tricks-{i}.ipynb"))
    honest = write(trimmed(nbformat.read(ch3, as_version=4)), tmp_path / "honest.ipynb")
    other = student(ch3)
    for label, source in HONEST_3.items():
        other = replace_stub(other, label, source)
    other = write(other, tmp_path / "honest-other.ipynb")
    rows = grade_files([*paths, honest, other], tmp_path, chapter=ch3, cell_timeout=120)
    for p in paths:
        r = by_exercise(rows, p)
        assert r["TOTAL"]["points"] == 0, (p.name, r)
    assert (
        "ex-3-1" in by_exercise(rows, paths[0])
        and "hidden case" in (by_exercise(rows, paths[0])["ex-3-1"]["output"])
    )
    for p in (honest, other):
        r = by_exercise(rows, p)
        assert r["TOTAL"]["points"] == sum(
            e["points"] for e in grade.exercise_spec(ch3) if e["kind"] == "auto"
        ), (p.name, r)
    nb = student(ch7)
    for label, source in TRICKS_7.items():
        nb = replace_stub(nb, label, source)
    seven = write(nb, tmp_path / "tricks-7.ipynb")
    r = by_exercise(grade_files([seven], tmp_path, chapter=ch7, cell_timeout=120), seven)
    assert r["ex-7-3"]["points"] == 0 and "rose by" in r["ex-7-3"]["output"], r["ex-7-3"]
    assert r["ex-7-2"]["points"] == 0, r["ex-7-2"]
    assert not list(tmp_path.glob("planted*")), "a submission wrote outside its sandbox"
    leftovers = []  # the detached process's command line names this pattern
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"grade-*/private" in cmdline.read_bytes():
                leftovers.append(cmdline.parent.name)
        except OSError:
            pass
    assert not leftovers, "a process a submission started outlived its grading"


# ----------------------------------------------------------------------------- what the teacher gets
@pytest.mark.heavy
def test_cli_writes_csv_feedback_and_lms_exports_and_keeps_hand_points(tmp_path):
    chapter = CHAPTERS[0]
    spec = grade.exercise_spec(chapter)
    manual = next(e["label"] for e in spec if e["kind"] == "manual")
    nb = trimmed(nbformat.read(chapter, as_version=4))
    alice = write(nb, tmp_path / "alice_LATE_1001_ch1.ipynb")
    bob = write(student(chapter), tmp_path / "bob_1002_ch1.ipynb")
    out, lms, fb, gs = (tmp_path / n for n in ("grades.csv", "lms.csv", "feedback", "gs"))
    who = r"^(?P<student>[a-z]+)(?:_(?P<late>LATE))?_\d+"
    common = ["--out", str(out), "--cell-timeout", "60", "--student", who, "--jobs", "2"]
    assert (
        grade.main(
            [
                str(alice),
                str(bob),
                *common,
                "--feedback",
                str(fb),
                "--lms",
                str(lms),
                "--gradescope",
                str(gs),
                "--variant",
                "spring-2027",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == grade.FIELDS
    total = {r["student"]: r for r in rows if r["exercise"] == "TOTAL"}
    auto_max = sum(e["points"] for e in spec if e["kind"] == "auto")
    assert int(total["alice"]["points"]) == auto_max and total["alice"]["late"] == "late"
    assert int(total["bob"]["points"]) == 0 and total["bob"]["late"] == ""
    table = list(csv.DictReader(lms.open()))
    assert [r["student"] for r in table] == ["alice", "bob"]
    assert list(table[0]) == ["student", *[e["label"] for e in spec], "total", "late"]
    text = (fb / "bob.md").read_text()
    assert "# Feedback: bob" in text and "FAIL" in text and "tolerance" in text
    results = json.loads((gs / "alice.json").read_text())
    assert results["score"] == auto_max and {"name", "score", "max_score", "output"} <= set(
        results["tests"][0]
    )
    # the teacher marks alice's explain answer; regrading bob alone keeps it and alice's rows
    for r in rows:
        if r["student"] == "alice" and r["exercise"] == manual:
            r["hand_points"] = "2"
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=grade.FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    assert grade.main([str(bob), *common]) == 0
    again = list(csv.DictReader(out.open()))
    total = {r["student"]: r for r in again if r["exercise"] == "TOTAL"}
    assert int(total["alice"]["points"]) == auto_max + 2
    assert {r["student"] for r in again} == {"alice", "bob"}


def private_chapter(folder):
    """A teacher's own chapter: one exercise whose check comes from a module beside it."""
    (folder / "mychecks.py").write_text(
        "from utils.kit.checks import run_check\n\n\n"
        "def check_double(fn):\n"
        '    return run_check("twice the input", fn, [("2", (2,), 4), ("3.5", (3.5,), 7.0)])\n'
    )
    cells = [
        nbformat.v4.new_markdown_cell("# A private chapter"),
        nbformat.v4.new_markdown_cell("## Exercises"),
        nbformat.v4.new_markdown_cell(
            "Write `double(x)`.", metadata={"tags": ["exercise", "ex-90-1"], "points": 1}
        ),
        nbformat.v4.new_code_cell(
            "from mychecks import check_double\n\n\ndef double(x):\n    ...  # your code here"
            "\n\n\ncheck_double(double)",
            metadata={"tags": ["stub", "ex-90-1"]},
        ),
    ]
    return write(nbformat.v4.new_notebook(cells=cells), folder / "90-private.ipynb")


def test_a_teachers_own_check_module_is_part_of_the_spec(tmp_path):
    spec = grade.exercise_spec(private_chapter(tmp_path))
    assert spec[0]["imports"] == ["from mychecks import check_double"]
    assert spec[0]["functions"] == ["double"] and spec[0]["takes"] == []


@pytest.mark.heavy
def test_a_private_chapter_with_its_own_checks_is_graded(tmp_path):
    chapter = private_chapter(tmp_path)
    nb = nbformat.read(chapter, as_version=4)
    nb.cells[3].source = nb.cells[3].source.replace("...  # your code here", "return 2 * x")
    answer = write(nb, tmp_path / "answer.ipynb")
    rows = by_exercise(grade_files([answer], tmp_path, chapter=chapter, cell_timeout=60), answer)
    assert rows["ex-90-1"]["points"] == 1, rows
