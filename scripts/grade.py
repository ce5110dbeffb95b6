"""Grade submitted notebooks into a CSV: one row per student and exercise, plus a total per student.

    python scripts/grade.py submissions/*.ipynb --out grades.csv
    python scripts/grade.py alice.ipynb bob.ipynb --chapter chapters/03-algorithms.ipynb

Each submission is copied into a temporary folder and run there, top to bottom, on a fresh
kernel (one worker process per submission, killed after ``--total-timeout`` seconds; each cell
is interrupted after ``--cell-timeout``). Then, in the same kernel, every exercise's check is
called on the student's function, exactly as the chapter's stub cell calls it (the check module
is reloaded first, so a notebook cannot redefine it). An exercise scores its points when every
case passes. A cell that raises or times out costs nothing by itself; a cell that kills the
kernel is skipped and the notebook rerun. *Explain* questions get a row with the student's
answer for grading by hand. The exercise list, check calls and points come from the chapter
(the instructor's version), found from the copy's metadata or its exercise labels.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
LABEL = re.compile(r"ex-\d+-\d+")
MARK = "<<pruning-book-grade>>"
PLACEHOLDER = "replace this line"
FIELDS = ["student", "exercise", "kind", "points", "max_points", "message"]


# ----------------------------------------------------------------------------- the chapter's exercises
def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _label(cell) -> str | None:
    return next((t for t in _tags(cell) if LABEL.fullmatch(t)), None)


def exercise_spec(chapter: Path) -> list[dict]:
    """The exercises of a chapter, in order: label, kind (auto or manual), points, and for auto
    exercises the check call and the imports of its stub cell."""
    nb = nbformat.read(chapter, as_version=4)
    points = {_label(c): c.metadata.get("points", 1) for c in nb.cells if "exercise" in _tags(c)}
    spec = []
    for cell in nb.cells:
        label = _label(cell)
        if "stub" not in _tags(cell) or label is None:
            continue
        if cell.cell_type == "markdown":
            spec.append({"label": label, "kind": "manual", "points": 0})
            continue
        tree = ast.parse(cell.source)
        imports = [
            ast.get_source_segment(cell.source, s)
            for s in tree.body
            if isinstance(s, ast.ImportFrom) and (s.module or "").startswith("utils.")
        ]
        calls = [
            s.value
            for s in tree.body
            if isinstance(s, ast.Expr)
            and isinstance(s.value, ast.Call)
            and isinstance(s.value.func, ast.Name)
            and s.value.func.id.startswith("check_")
        ]
        if not calls:
            raise ValueError(f"{chapter.name}: the stub of {label} calls no check_* function")
        call = calls[-1]
        spec.append(
            {
                "label": label,
                "kind": "auto",
                "points": points.get(label, 1),
                "imports": imports,
                "call": ast.get_source_segment(cell.source, call),
                "names": [a.id for a in call.args if isinstance(a, ast.Name)],
            }
        )
    return spec


def find_chapter(nb: dict, chapters: list[Path]) -> Path | None:
    """The chapter a submission was copied from: its metadata, else its exercise labels."""
    name = nb.get("metadata", {}).get("pruning_book", {}).get("chapter")
    by_stem = {p.stem: p for p in chapters}
    if name in by_stem:
        return by_stem[name]
    labels = {
        t
        for c in nb.get("cells", [])
        for t in c.get("metadata", {}).get("tags", [])
        if LABEL.fullmatch(str(t))
    }
    for path in chapters:
        ch = json.loads(path.read_text())
        if labels and labels <= {
            t for c in ch["cells"] for t in c.get("metadata", {}).get("tags", [])
        }:
            return path
    return None


# ----------------------------------------------------------------------------- the worker (one submission)
def grading_source(ex: dict) -> str:
    modules = sorted({re.match(r"from\s+([\w.]+)", imp).group(1) for imp in ex["imports"]})
    reloads = "".join(f"import {m}\n_importlib.reload({m})\n" for m in modules)
    imports = "".join(f"{imp}\n" for imp in ex["imports"])
    return f"""import importlib as _importlib, io as _io, json as _json, contextlib as _contextlib
{reloads}{imports}_buf = _io.StringIO()
try:
    with _contextlib.redirect_stdout(_buf):
        _verdict = {ex["call"]}
    _result = {{"passed": int(_verdict.passed), "total": int(_verdict.total)}}
except NameError as _e:
    _result = {{"error": f"{{_e}}: was the exercise's function renamed, or its cell deleted?"}}
except KeyboardInterrupt:
    _result = {{"error": "timed out"}}
except BaseException as _e:
    _result = {{"error": f"the check crashed: {{type(_e).__name__}}: {{_e}}"}}
_result["output"] = _buf.getvalue()[-3000:]
print({MARK!r} + _json.dumps(_result))
"""


def _parse_grade(cell) -> dict:
    for out in cell.get("outputs", []):
        text = out.get("text", "")
        if out.get("output_type") == "stream" and MARK in text:
            return json.loads(text.split(MARK, 1)[1].splitlines()[0])
        if out.get("output_type") == "error":
            return {
                "error": "timed out"
                if out.get("ename") in ("KeyboardInterrupt", "CellTimeoutError")
                else f"{out.get('ename')}: {out.get('evalue')}"
            }
    return {"error": "the check printed no result (timed out?)"}


def _timed_out(cell) -> bool:
    return any(
        o.get("output_type") == "error"
        and o.get("ename") in ("CellTimeoutError", "KeyboardInterrupt")
        for o in cell.get("outputs", [])
    )


def worker(submission: Path, spec: list[dict], cell_timeout: int, result_path: Path) -> None:
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    nb = nbformat.read(submission, as_version=4)
    results: dict[str, dict] = {}
    skip: set[int] = set()
    notes: list[str] = []
    for _attempt in range(4):
        for folder in (submission.parent, Path(os.environ.get("HOME", submission.parent))):
            folder.mkdir(parents=True, exist_ok=True)  # a cell may have deleted its folder
        run = nbformat.from_dict(json.loads(json.dumps(nb)))
        client = NotebookClient(
            run,
            timeout=cell_timeout,
            kernel_name="python3",
            extra_arguments=["--IPKernelApp.log_level=ERROR"],  # no transport warnings
            allow_errors=True,
            interrupt_on_timeout=True,
            record_timing=False,
            error_on_timeout={"ename": "CellTimeoutError", "evalue": "timed out", "traceback": []},
            resources={"metadata": {"path": str(submission.parent)}},
        )
        index = None
        try:
            with client.setup_kernel():
                for index, cell in enumerate(run.cells):
                    if cell.cell_type == "code" and index not in skip:
                        client.execute_cell(cell, index)
                errors = [
                    i
                    for i, c in enumerate(run.cells)
                    if c.cell_type == "code"  # failing on purpose
                    and "raises-exception" not in _tags(c)  # is no error
                    and any(o.get("output_type") == "error" for o in c.get("outputs", []))
                ]
                if errors:
                    notes.append(
                        f"{len(errors)} cell(s) raised or timed out while running the notebook"
                    )
                timed_out = {  # an exercise whose own cell timed out: its check would too
                    _label(c)
                    for c in run.cells
                    if c.cell_type == "code" and "stub" in _tags(c) and _timed_out(c)
                }
                for ex in spec:
                    if ex["kind"] != "auto" or ex["label"] in results:
                        continue
                    if ex["label"] in timed_out:
                        results[ex["label"]] = {
                            "error": f"timed out: its cell ran past the {cell_timeout} s limit "
                            "in the notebook run, so its check was not run again"
                        }
                        continue
                    index = ("grading", ex["label"])
                    cell = nbformat.v4.new_code_cell(grading_source(ex))
                    run.cells.append(cell)
                    client.execute_cell(cell, len(run.cells) - 1)
                    results[ex["label"]] = _parse_grade(cell)
            break
        except DeadKernelError:
            if isinstance(index, tuple):
                results[index[1]] = {
                    "error": "the check killed the kernel (os._exit, exit() or a crash)"
                }
            elif index is not None:
                skip.add(index)
                notes.append(f"cell {index} killed the kernel and was skipped")
        except Exception as e:  # anything else the kernel machinery raises: report, never crash
            notes.append(f"the run stopped: {type(e).__name__}: {str(e)[:200]}")
            break
    result_path.write_text(
        json.dumps({"results": results, "notes": notes, "answers": _answers(nb)})
    )


def _answers(nb) -> dict[str, str]:
    return {
        _label(c): c.source
        for c in nb.cells
        if "stub" in _tags(c) and c.cell_type == "markdown" and _label(c)
    }


# ----------------------------------------------------------------------------- the parent
def _rows(student: str, spec: list[dict], outcome: dict | None, failure: str | None) -> list[dict]:
    rows = []
    results = (outcome or {}).get("results", {})
    answers = (outcome or {}).get("answers", {})
    for ex in spec:
        row = {
            "student": student,
            "exercise": ex["label"],
            "kind": ex["kind"],
            "max_points": ex["points"] if ex["kind"] == "auto" else "",
            "points": 0,
        }
        if failure:
            row["message"] = f"not graded: {failure}"
        elif ex["kind"] == "manual":
            answer = " ".join(answers.get(ex["label"], "").replace("**Your answer:**", "").split())
            row["points"] = ""
            row["message"] = (
                "grade by hand: no answer"
                if not answer or PLACEHOLDER in answer
                else f"grade by hand: {answer}"
            )
        else:
            r = results.get(ex["label"], {"error": "not run"})
            if "error" in r:
                row["message"] = r["error"]
            elif r["total"] > 0 and r["passed"] == r["total"]:
                row["points"], row["message"] = ex["points"], f"all {r['total']} cases pass"
            else:
                fails = [
                    ln.strip()
                    for ln in r.get("output", "").splitlines()
                    if ln.strip().startswith("FAIL")
                ]
                row["message"] = f"{r['passed']} of {r['total']} cases pass" + (
                    f"; first {fails[0]}" if fails else ""
                )
        rows.append(row)
    auto = [r for r in rows if r["kind"] == "auto"]
    notes = "; ".join((outcome or {}).get("notes", []))
    manual = sum(r["kind"] == "manual" for r in rows)
    rows.append(
        {
            "student": student,
            "exercise": "TOTAL",
            "kind": "",
            "points": sum(int(r["points"] or 0) for r in auto),
            "max_points": sum(r["max_points"] for r in auto),
            "message": "; ".join(
                m
                for m in [
                    failure and f"not graded: {failure}",
                    f"{manual} explain answer(s) to grade by hand" if manual else "",
                    notes,
                ]
                if m
            ),
        }
    )
    return rows


def grade_one(
    submission: Path,
    chapters: list[Path],
    chapter: Path | None,
    cell_timeout: int,
    total_timeout: int,
) -> list[dict]:
    student = str(submission)
    try:
        raw = submission.read_bytes()
        nb = json.loads(raw)
        nbformat.validate(nbformat.reads(raw.decode("utf-8"), as_version=4))
    except Exception as e:  # not JSON, not a notebook, unreadable: a row, not a crash
        source = chapter or (chapters[0] if len(chapters) == 1 else None)
        spec = exercise_spec(source) if source else []
        why = f"invalid notebook ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        return (
            _rows(student, spec, None, why)
            if spec
            else [
                {
                    "student": student,
                    "exercise": "TOTAL",
                    "kind": "",
                    "points": 0,
                    "max_points": "",
                    "message": f"not graded: {why}",
                }
            ]
        )
    source = chapter or find_chapter(nb, chapters)
    if source is None:
        return [
            {
                "student": student,
                "exercise": "TOTAL",
                "kind": "",
                "points": 0,
                "max_points": "",
                "message": "not graded: cannot tell which chapter this is (no exercise labels); pass --chapter",
            }
        ]
    spec = exercise_spec(source)
    tmp = Path(tempfile.mkdtemp(prefix="grade-"))
    try:
        # the notebook runs in box/work (HOME is box/home); the spec and result live beside box/,
        # out of reach of relative paths such as shutil.rmtree("..")
        work, home, private = tmp / "box" / "work", tmp / "box" / "home", tmp / "private"
        for d in (work, home, private):
            d.mkdir(parents=True)
        (work / "submission.ipynb").write_bytes(raw)
        (private / "spec.json").write_text(json.dumps(spec))
        env = {
            **os.environ,
            "HOME": str(home),
            "MPLCONFIGDIR": str(home / "mpl"),
            "PRUNING_BOOK_QUIET": "1",
            "PRUNING_BOOK_DATA_DIR": os.environ.get(
                "PRUNING_BOOK_DATA_DIR", str(Path.home() / ".cache" / "pruning-book")
            ),
        }
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            str(work / "submission.ipynb"),
            "--spec",
            str(private / "spec.json"),
            "--result",
            str(private / "result.json"),
            "--cell-timeout",
            str(cell_timeout),
        ]
        proc = subprocess.Popen(
            cmd,
            cwd=private,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            log, _ = proc.communicate(timeout=total_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return _rows(
                student,
                spec,
                None,
                f"the notebook ran longer than {total_timeout} s (an endless loop?)",
            )
        result = private / "result.json"
        if not result.exists():
            tail = log.decode(errors="replace").strip().splitlines()[-1:] if log else []
            return _rows(
                student,
                spec,
                None,
                "the grader lost its result (did the notebook delete files?)"
                + (f": {tail[0][:200]}" if tail else ""),
            )
        return _rows(student, spec, json.loads(result.read_text()), None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("submissions", nargs="*", type=Path)
    parser.add_argument(
        "--out", type=Path, default=Path("grades.csv"), help="the CSV to write (default grades.csv)"
    )
    parser.add_argument(
        "--chapter", type=Path, help="the chapter all submissions come from (default: detected)"
    )
    parser.add_argument(
        "--chapters", type=Path, default=ROOT / "chapters", help="where the chapters are"
    )
    parser.add_argument(
        "--cell-timeout", type=int, default=300, help="seconds per cell (default 300)"
    )
    parser.add_argument(
        "--total-timeout", type=int, default=900, help="seconds per notebook (default 900)"
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, json.loads(args.spec.read_text()), args.cell_timeout, args.result)
        return 0
    chapters = sorted(args.chapters.glob("*.ipynb"))
    rows = []
    for sub in args.submissions:
        t0 = time.perf_counter()
        student_rows = grade_one(sub, chapters, args.chapter, args.cell_timeout, args.total_timeout)
        rows += student_rows
        total = student_rows[-1]
        print(
            f"{sub}: {total['points']} / {total['max_points']} points in {time.perf_counter() - t0:.0f} s"
            + (f" ({total['message']})" if total["message"] else "")
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
