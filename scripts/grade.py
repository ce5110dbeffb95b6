"""Grade submitted notebooks into a CSV: one row per student and exercise, plus a total per student.

    python scripts/grade.py submissions/*.ipynb --out grades.csv
    python scripts/grade.py alice.ipynb bob.ipynb --chapter chapters/03-algorithms.ipynb
    python scripts/grade.py submissions/*.ipynb --variant spring-2027 --feedback fb/ --lms lms.csv

Each submission is graded by a worker process of its own. The worker reads the notebook as data
and takes its exercise code (from the cells above the exercises only imports and definitions),
then grades each exercise in a sandbox of its own (``grade_sandbox.py``: a process forked from a
server that has loaded torch, which runs that code behind Landlock and an audit hook and
answers calls of the student's function). The check,
its expected answers and the verdict run here, in the worker, never in the student's process:
the function's results come back read with ``torch.load(weights_only=True)``. Checks add hidden
cases drawn from ``--variant`` (or a random seed). An exercise scores its points when every case
passes; a time-out (``--cell-timeout`` per exercise) or an error costs only that exercise.
*Explain* questions get a row with the student's answer for grading by hand (``hand_points``,
kept by a regrade). The exercise list, check calls and points come from the chapter (the
instructor's version), found from the copy's metadata or its exercise labels.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import hashlib
import json
import os
import pickle
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nbformat

ROOT = Path(__file__).resolve().parent.parent
LABEL = re.compile(r"ex-\d+-\d+")
PLACEHOLDER = "replace this line"
MAX_REPLY = 256 * 2**20  # bytes of one result
MAX_PARTS = 100_000  # containers, modules and values in one result
STARTUP_LIMIT = 120  # seconds for a sandbox to load torch and the book (not the exercise's time)
FIELDS = ["student", "exercise", "kind", "points", "max_points", "hand_points", "late", "message"]


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
            spec.append({"label": label, "kind": "manual", "points": points.get(label, 1)})
            continue
        tree = ast.parse(cell.source)
        imports = [
            ast.get_source_segment(cell.source, s)
            for s in tree.body
            if isinstance(s, ast.ImportFrom)
            and (
                (s.module or "").startswith("utils.")
                or any(a.name.startswith("check_") for a in s.names)  # a teacher's own checks
            )
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
        names = [a.id for a in call.args if isinstance(a, ast.Name)]
        defined = {s.name for s in tree.body if isinstance(s, ast.FunctionDef)}
        spec.append(
            {
                "label": label,
                "kind": "auto",
                "points": points.get(label, 1),
                "imports": imports,
                "call": ast.get_source_segment(cell.source, call),
                "names": names,
                "functions": [n for n in names if n in defined],  # the student's, in a sandbox
                "takes": [n for n in names if n not in defined],  # the chapter builds these
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


# ----------------------------------------------------------------------------- the submission's code
def _code_of(source: str) -> str:
    """A cell's Python: shell (``!``) and magic (``%``) lines dropped."""
    return "\n".join(ln for ln in source.splitlines() if not ln.lstrip().startswith(("!", "%")))


def submission_code(nb: dict, full: bool = False) -> list[str]:
    """What the sandbox runs: from the cells before the exercises, only their imports and their
    function and class definitions (not the chapter's training; all of them when ``full``, for an
    exercise that needs what the chapter builds); then every code cell of the exercises
    section, whole, with its ``check_*`` calls left out (the grader calls the checks)."""
    cells = nb.get("cells", [])
    start = next(
        (
            i
            for i, c in enumerate(cells)
            if c.get("cell_type") == "markdown" and "## Exercises" in _source(c)
        ),
        None,
    )
    if start is None:  # no heading left: the exercises start at the first stub
        start = next((i for i, c in enumerate(cells) if "stub" in _tags(c)), len(cells))
    kept = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    out = []
    for i, cell in enumerate(cells):
        if cell.get("cell_type") != "code":
            continue
        code = _code_of(_source(cell))
        try:
            tree = ast.parse(code)
        except SyntaxError:
            out.append(code)  # the sandbox reports the error
            continue
        body = [
            s
            for s in tree.body
            if (full or i >= start or isinstance(s, kept)) and not _is_check_call(s)
        ]
        if body:
            out.append("\n\n".join(ast.get_source_segment(code, s) or "" for s in body))
    return out


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def _is_check_call(stmt: ast.stmt) -> bool:
    """``check_...(...)`` or ``assert check_...(...)`` at a cell's top level."""
    value = (
        stmt.value
        if isinstance(stmt, ast.Expr)
        else stmt.test
        if isinstance(stmt, ast.Assert)
        else None
    )
    return (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and value.func.id.startswith("check_")
    )


def chapter_preload(chapter: Path) -> list[str]:
    """The packages the instructor's chapter imports: loaded in the sandbox before its walls go
    up (some load C libraries through ctypes, which the walls then refuse)."""
    nb = nbformat.read(chapter, as_version=4)
    names = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(_code_of(cell.source))
        except SyntaxError:
            continue
        for s in tree.body:
            if isinstance(s, ast.Import):
                names |= {a.name for a in s.names}
            elif isinstance(s, ast.ImportFrom) and s.module and not s.level:
                names.add(s.module)
    return sorted(n for n in names if not n.startswith("google"))


# ----------------------------------------------------------------------------- the sandbox, seen from here
class SandboxTimeout(BaseException):
    """The exercise ran past its limit (a BaseException: a check's per-case handler lets it by)."""


class ExerciseMissing(BaseException):
    """The exercise's function is not defined in the submission."""


def _exception(name: str, message: str) -> Exception:
    """An exception named as the student's was (a check reports its type and message)."""
    kind = type(name if name.isidentifier() else "Error", (Exception,), {})
    return kind(message)


SANDBOX = Path(__file__).with_name("grade_sandbox.py")


class Zygote:
    """A process with torch, the book and the chapter's packages loaded, which forks one sandbox
    per exercise (a fork takes milliseconds, a fresh interpreter 1.5 s to import torch). It runs
    no submission code itself; each sandbox it forks builds its own walls."""

    def __init__(self, folder: Path, preload: list[str]):
        folder.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, str(SANDBOX), "--zygote", str(theirs.fileno()), *preload],
            cwd=folder,
            env=_sandbox_env(folder),
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        theirs.close()
        self.sock = ours

    def spawn(self, box: Path) -> tuple[int, int, int]:
        """A new sandbox in ``box``: (its pid, the fd to read it from, the fd to write it to)."""
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        request = json.dumps({"box": str(box), "env": _sandbox_env(box)}).encode()
        socket.send_fds(self.sock, [request], [to_r, from_w])
        os.close(to_r)
        os.close(from_w)
        self.sock.settimeout(STARTUP_LIMIT)
        line = b""
        while not line.endswith(b"\n"):
            chunk = self.sock.recv(256)
            if not chunk:
                raise RuntimeError("the grader's sandbox server stopped")
            line += chunk
        return json.loads(line)["pid"], from_r, to_w

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class Sandbox:
    """One exercise's sandbox process, forked by the zygote at the first call with the functions
    that exercise forbids, killed (its whole process group) by ``close``."""

    def __init__(self, zygote: Zygote, code: list[str], box: Path, limit: float, skip: set):
        self.zygote, self.code, self.box, self.skip = zygote, code, box, skip
        self.deadline = time.monotonic() + limit
        self.limit, self.pid, self.forbid, self.running = limit, None, None, None
        self.rfd = self.wfd = -1
        self.started = False
        self.notes: list[str] = []  # skipped statements: the submission's TOTAL row
        self.code_notes: list[str] = []

    # -- frames
    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            left = self.deadline - time.monotonic()
            ready, _, _ = select.select([self.rfd], [], [], max(left, 0))
            if not ready:
                raise SandboxTimeout(self._timeout_text())
            chunk = os.read(self.rfd, n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _reply(self) -> tuple[dict, bytes]:
        header = json.loads(self._read(struct.unpack(">I", self._read(4))[0]))
        payload = self._read(struct.unpack(">I", self._read(4))[0])
        return header, payload

    def _send(self, obj: Any) -> None:
        data = memoryview(struct.pack(">I", len(pickle.dumps(obj))) + pickle.dumps(obj))
        try:
            while data:
                data = data[os.write(self.wfd, data) :]
        except BrokenPipeError:
            raise EOFError from None

    def _timeout_text(self) -> str:
        where = (
            f" while running cell {self.running[0]}, line {self.running[1] + 1} of your code"
            if self.running
            else ""
        )
        return f"timed out: past the {self.limit:g} s limit{where}; it was not run again"

    # -- life
    def start(self, forbid: list[list[str]]) -> None:
        """Start the sandbox and run the submission's code in it; a statement that ends the
        process is skipped and the sandbox started again."""
        self.close()
        self.box.mkdir(parents=True, exist_ok=True)
        self.pid, self.rfd, self.wfd = self.zygote.spawn(self.box)
        self.forbid, self.running = forbid, None
        deadline, self.deadline = self.deadline, time.monotonic() + STARTUP_LIMIT
        try:
            self._reply()  # "hello": torch and the book's modules are loaded
        except EOFError:
            raise RuntimeError("the grader's sandbox did not start") from None
        if not self.started:  # the exercise's limit counts from here, imports done
            self.started, deadline = True, time.monotonic() + self.limit
        self.deadline = deadline
        self._send({"cells": self.code, "skip": sorted(self.skip), "forbid": forbid})
        while True:
            try:
                header, _ = self._reply()
            except EOFError:
                if self.running is None:
                    raise RuntimeError("the grader's sandbox failed before the code ran") from None
                self.skip.add(tuple(self.running))
                self.notes.append(
                    f"cell {self.running[0]}, line {self.running[1] + 1} ended the process "
                    "(os._exit, exit() or a crash) and was skipped"
                )
                return self.start(forbid)
            if header["op"] == "running":
                self.running = tuple(header["at"])
            elif header["op"] == "ready":
                self.running = None
                walls = header.get("walls", "")
                if not walls.startswith("landlock") and walls not in self.notes:
                    self.notes.append(
                        f"file-system walls: Python's audit hook only ({walls}); C code in a "
                        "submission could still read files: grade in a container"
                    )
                self.code_notes = header["notes"]  # statements that raised: the exercise's row
                return

    def call(self, name: str, args: tuple, forbid: list[list[str]]) -> Any:
        if self.pid is None or forbid != self.forbid:
            self.start(forbid)
        try:
            self._send({"name": name, "args": pickle.dumps(args)})
            header, payload = self._reply()
        except EOFError:
            self.close()
            raise _exception(
                "ProcessEnded", "your code ended the grader's process (os._exit, exit() or a crash)"
            ) from None
        if header["op"] == "missing":
            raise ExerciseMissing(
                f"{name} is not defined: was the exercise's function renamed, or its cell deleted?"
            )
        if header["op"] == "raised":
            raise _exception(header["type"], header["message"])
        if header["op"] == "unportable":
            raise _exception("UnreadableResult", header["message"])
        return from_sandbox(payload, args, header["result_is_arg"], header["grad"])

    def close(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            self.pid = None
        for fd in (self.rfd, self.wfd):
            if fd >= 0:
                os.close(fd)
        self.rfd = self.wfd = -1


def _sandbox_env(box: Path) -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "PYTHONHASHSEED", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k in keep}
    home = box / "home"
    home.mkdir(parents=True, exist_ok=True)
    threads = os.environ.get("PRUNING_GRADE_THREADS", "1")
    return {
        **env,
        "HOME": str(home),
        "MPLCONFIGDIR": str(home / "mpl"),
        "MPLBACKEND": "Agg",
        "PRUNING_BOOK_NO_KERNELS": "1",  # the C loops load through ctypes, which the walls refuse
        "OMP_NUM_THREADS": threads,
        "PRUNING_BOOK_QUIET": "1",
        "PRUNING_BOOK_DATA_DIR": str(data_dir()),  # read-only inside the sandbox
        "TMPDIR": str(box),
    }


def data_dir() -> Path:
    """The book's data folder (texts, MNIST): a chapter's code reads it."""
    if os.environ.get("PRUNING_BOOK_DATA_DIR"):
        return Path(os.environ["PRUNING_BOOK_DATA_DIR"])
    here = Path.cwd().resolve()
    for folder in (here, *here.parents, ROOT, *ROOT.parents):
        if (folder / "shared" / "data").is_dir():
            return folder / "shared" / "data"
    return Path.home() / ".cache" / "pruning-book"


def _readable_classes() -> list[type]:
    """The classes a reply may hold: torch.nn's modules, torchvision's models, the book's."""
    import importlib

    from torch import nn

    for name in ("torchvision.models", "utils.lab.models"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    prefixes = ("torch.nn", "torchvision.models", "torchvision.ops", "utils.lab")
    return sorted(
        {
            v
            for name, mod in list(sys.modules.items())
            if mod is not None and name.startswith(prefixes)
            for v in list(vars(mod).values())
            if isinstance(v, type) and issubclass(v, nn.Module)
        },
        key=lambda c: f"{c.__module__}.{c.__qualname__}",
    )


def from_sandbox(payload: bytes, args: tuple, result_is_arg: int | None, grad: bool) -> Any:
    """The function's result, read without running code (``weights_only``), and the arguments'
    changes copied back onto the check's own objects (a model changed in place, a watcher)."""
    import io

    import torch
    from torch import nn

    if len(payload) > MAX_REPLY:
        raise _exception("UnreadableResult", f"the result takes {len(payload):,} bytes, too many")
    try:
        with torch.serialization.safe_globals(_readable_classes()):
            data = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as e:  # noqa: BLE001 (an object the grader does not read)
        kinds = re.findall(r"GLOBAL ([\w.]+)", str(e))
        raise _exception(
            "UnreadableResult",
            "the grader reads back numbers, strings, tensors, lists, tuples, dicts and torch.nn "
            "models only" + (f"; the result held a {kinds[0]}" if kinds else ""),
        ) from None
    if _size(data) > MAX_PARTS:
        raise _exception("UnreadableResult", f"the result has more than {MAX_PARTS:,} parts")
    for orig, new in zip(args, data["args"]):
        if isinstance(orig, nn.Module) and isinstance(new, nn.Module):
            orig.__dict__.clear()
            orig.__dict__.update(new.__dict__)
            if type(orig) is not type(new):
                orig.__class__ = type(new)
        elif hasattr(orig, "grader_restore") and isinstance(new, dict) and "grader_state" in new:
            orig.grader_restore(new["grader_state"])
    result = args[result_is_arg] if result_is_arg is not None else data["result"]
    if grad and isinstance(result, torch.Tensor) and result.is_floating_point():
        result = result.detach().requires_grad_() * 1.0  # it kept its gradient over there
    return result


def _size(x: Any) -> int:
    """Parts of a decoded result (containers, modules, values), counted along every path and
    stopped past ``MAX_PARTS``: a result built from many shared references is refused before a
    check walks it."""
    from torch import nn

    count, todo = 0, [x]
    while todo and count <= MAX_PARTS:
        item = todo.pop()
        count += 1
        if isinstance(item, nn.Module):
            todo += list(item._modules.values()) + list(vars(item).values())[:1000]
        elif isinstance(item, dict):
            todo += list(item.values())
        elif isinstance(item, (list, tuple)):
            todo += list(item)
    return count


class Remote:
    """The student's function as a check sees it: each call runs in the sandbox."""

    runs_elsewhere = True

    def __init__(self, sandbox: Sandbox, name: str):
        self.sandbox, self.name, self.__name__ = sandbox, name, name

    def __call__(self, *args: Any) -> Any:
        from utils.kit import checks

        forbid = [[f.__module__, f.__qualname__] for f in checks.forbidden_now()]
        return self.sandbox.call(self.name, args, forbid)


# ----------------------------------------------------------------------------- the worker (one submission)
def grade_exercise(
    ex: dict,
    code: list[str],
    zygote: Zygote,
    box: Path,
    limit: float,
    skip: set,
    seed: int | None,
    chapter_space: dict,
) -> dict:
    """Run one exercise's check in this process on the student's function in a sandbox."""
    import io

    from utils.kit import checks

    notes: list[str] = []
    for attempt in range(3):  # a statement that hangs is skipped and the exercise rerun
        sandbox = Sandbox(zygote, code, box / f"{ex['label']}-{attempt}", limit, skip)
        space: dict = dict(chapter_space)
        for imp in ex["imports"]:
            exec(imp, space)
        for name in ex["functions"]:
            space[name] = Remote(sandbox, name)
        buf = io.StringIO()
        result: dict
        try:
            with contextlib.redirect_stdout(buf), checks.hidden_cases(seed):
                verdict = eval(ex["call"], space)
            result = {"passed": int(verdict.passed), "total": int(verdict.total)}
        except SandboxTimeout as e:
            if sandbox.running is not None and attempt < 2:
                skip.add(tuple(sandbox.running))
                notes += [*sandbox.notes, f"{e}; that statement was skipped"]
                sandbox.close()
                continue
            result = {"error": str(e)}
        except ExerciseMissing as e:
            result = {"error": str(e)}
        except Exception as e:  # noqa: BLE001 (a check must never crash the grader)
            result = {"error": f"the check crashed: {type(e).__name__}: {str(e)[:200]}"}
        finally:
            sandbox.close()
        raised = "".join(f"note: {n}\n" for n in sandbox.code_notes)
        result["output"] = (raised + buf.getvalue())[-6000:]
        result["notes"] = notes + sandbox.notes
        return result
    raise AssertionError("unreachable")


def worker(
    submission: Path, spec: list[dict], cell_timeout: int, result_path: Path, job: dict
) -> None:
    """Grade one submission: every automatic exercise in a sandbox of its own, checked here."""
    nb = json.loads(submission.read_text())
    code, full = submission_code(nb), None
    chapter_space = {}
    if job.get("objects"):
        with open(job["objects"], "rb") as f:  # the grader's own pickle, built from the chapter
            chapter_space = pickle.load(f)
    results, notes, skip = {}, [], set()
    boxes = result_path.parent.parent / "box"  # beside private/, never inside it
    zygote = None
    try:
        for ex in spec:
            if ex["kind"] != "auto":
                continue
            if ex["takes"] and full is None:
                full = submission_code(nb, full=True)
            if zygote is None:
                zygote = Zygote(boxes / "zygote", job["preload"])
            r = grade_exercise(
                ex,
                full if ex["takes"] else code,
                zygote,
                boxes,
                cell_timeout,
                skip,
                job.get("seed"),
                chapter_space,
            )
            notes += [n for n in r.pop("notes") if n not in notes]
            results[ex["label"]] = r
    finally:
        if zygote is not None:
            zygote.close()
    result_path.write_text(
        json.dumps({"results": results, "notes": notes, "answers": _answers(nb)})
    )


def _answers(nb: dict) -> dict[str, str]:
    return {
        _label(c): _source(c)
        for c in nb.get("cells", [])
        if "stub" in _tags(c) and c.get("cell_type") == "markdown" and _label(c)
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
            "max_points": ex["points"],
            "points": 0,
            "hand_points": "",
        }
        if failure:
            row["message"] = f"not graded: {failure}"
        elif ex["kind"] == "manual":
            answer = answers.get(ex["label"], "").replace("**Your answer:**", "").strip()
            row["points"] = ""
            row["answer"] = answer
            row["message"] = (
                "grade by hand: no answer"
                if not answer or PLACEHOLDER in answer
                else "grade by hand: " + " ".join(answer.split())
            )
        else:
            r = results.get(ex["label"], {"error": "not run"})
            row["output"] = r.get("output", "")
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
    notes = "; ".join((outcome or {}).get("notes", []))
    manual = sum(r["kind"] == "manual" for r in rows)
    rows.append(
        {
            "student": student,
            "exercise": "TOTAL",
            "kind": "",
            "points": sum(int(r["points"] or 0) for r in rows if r["kind"] == "auto"),
            "max_points": sum(r["max_points"] for r in rows),  # explain answers included
            "hand_points": "",
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


def _total_only(student: str, message: str) -> list[dict]:
    return [
        {
            "student": student,
            "exercise": "TOTAL",
            "kind": "",
            "points": 0,
            "max_points": "",
            "hand_points": "",
            "message": f"not graded: {message}",
        }
    ]


def student_name(path: Path, nb: dict | None, how: str | None) -> tuple[str, bool]:
    """(the student's identifier, late?) from ``--student``: ``metadata:FIELD`` reads the
    notebook's metadata, a regular expression with a ``student`` group (and optionally ``late``)
    reads the file name; by default the file's path."""
    if how and how.startswith("metadata:"):
        value = (nb or {}).get("metadata", {})
        for part in how.split(":", 1)[1].split("."):
            value = value.get(part, {}) if isinstance(value, dict) else {}
        return (str(value) if value not in ({}, None, "") else str(path)), False
    if how:
        m = re.search(how, path.name)
        if m and m.groupdict().get("student"):
            return m["student"], bool(m.groupdict().get("late"))
    return str(path), False


def chapter_objects_file(chapter: Path, spec: list[dict], cache: dict) -> str | None:
    """The objects some check calls take besides the student's function (a model the chapter
    builds), built once per chapter by running the instructor's chapter up to its exercises."""
    names = sorted({n for ex in spec if ex["kind"] == "auto" for n in ex["takes"]})
    if not names:
        return None
    if chapter not in cache:
        import contextlib
        import io

        nb = nbformat.read(chapter, as_version=4)
        space: dict = {"__name__": "__main__"}
        labels = {ex["label"] for ex in spec if ex["kind"] == "auto" and ex["takes"]}
        with contextlib.redirect_stdout(io.StringIO()):
            exercises = False
            for cell in nb.cells:
                exercises |= cell.cell_type == "markdown" and "## Exercises" in cell.source
                if cell.cell_type != "code" or "google.colab" in cell.source:
                    continue
                if not exercises:
                    exec(_code_of(cell.source), space)
                elif "stub" in _tags(cell) and _label(cell) in labels:  # what the call takes
                    tree = ast.parse(_code_of(cell.source))
                    keep = (ast.Assign, ast.Import, ast.ImportFrom)
                    body = [st for st in tree.body if isinstance(st, keep)]
                    exec(compile(ast.Module(body=body, type_ignores=[]), "<stub>", "exec"), space)
        if "objects" not in cache:  # removed by main() at the end
            cache["objects"] = Path(tempfile.mkdtemp(prefix="grade-shared-"))
        target = cache["objects"] / f"{chapter.stem}-objects.pkl"
        target.write_bytes(pickle.dumps({n: space[n] for n in names if n in space}))
        cache[chapter] = str(target)
    return cache[chapter]


def grade_one(
    submission: Path,
    chapters: list[Path],
    chapter: Path | None,
    cell_timeout: int,
    total_timeout: int | None = None,
    seed: int | None = None,
    student: str | None = None,
    cache: dict | None = None,
) -> list[dict]:
    """Grade one submission into rows (one per exercise and a TOTAL); never raises for a bad file."""
    cache = {} if cache is None else cache
    seed = int.from_bytes(os.urandom(4), "big") >> 1 if seed is None else seed  # hidden cases
    try:
        raw = submission.read_bytes()
        nb = json.loads(raw)
        nbformat.validate(nbformat.reads(raw.decode("utf-8"), as_version=4))
    except Exception as e:  # not JSON, not a notebook, unreadable: rows, not a crash
        source = (
            chapter or find_chapter({}, chapters) or (chapters[0] if len(chapters) == 1 else None)
        )
        spec = exercise_spec(source) if source else []
        why = f"invalid notebook ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        who, late = student_name(submission, None, student)
        return _late(_rows(who, spec, None, why) if spec else _total_only(who, why), late)
    who, late = student_name(submission, nb, student)
    source = chapter or find_chapter(nb, chapters)
    if source is None:
        return _late(
            _total_only(
                who, "cannot tell which chapter this is (no exercise labels); pass --chapter"
            ),
            late,
        )
    spec = exercise_spec(source)
    auto = sum(ex["kind"] == "auto" for ex in spec)
    total_timeout = total_timeout or cell_timeout * (auto + 2) + 120
    tmp = Path(tempfile.mkdtemp(prefix="grade-"))
    try:
        # the worker (trusted) keeps its files in private/; the sandboxes run in box/<exercise>/
        # and may touch nothing outside it
        private = tmp / "private"
        private.mkdir()
        (private / "submission.ipynb").write_bytes(raw)
        (private / "spec.json").write_text(json.dumps(spec))
        job = {
            "preload": chapter_preload(source),
            "seed": seed,
            "objects": chapter_objects_file(source, spec, cache),
        }
        (private / "job.json").write_text(json.dumps(job))
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            str(private / "submission.ipynb"),
            "--spec",
            str(private / "spec.json"),
            "--job",
            str(private / "job.json"),
            "--result",
            str(private / "result.json"),
            "--cell-timeout",
            str(cell_timeout),
        ]
        env = {**os.environ, "PRUNING_BOOK_QUIET": "1", "MPLBACKEND": "Agg"}
        # a teacher's own check module may sit beside their (private) chapter
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(source.resolve().parent), os.environ.get("PYTHONPATH", "")) if p
        )
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
            return _late(_rows(who, spec, None, f"grading ran longer than {total_timeout} s"), late)
        result = private / "result.json"
        if not result.exists():
            tail = log.decode(errors="replace").strip().splitlines()[-1:] if log else []
            return _late(
                _rows(
                    who, spec, None, "the grader failed" + (f": {tail[0][:300]}" if tail else "")
                ),
                late,
            )
        return _late(_rows(who, spec, json.loads(result.read_text()), None), late)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _late(rows: list[dict], late: bool) -> list[dict]:
    for r in rows:
        r["late"] = "late" if late else ""
    return rows


# ----------------------------------------------------------------------------- what the teacher gets
def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def merge_previous(rows: list[dict], previous: Path) -> list[dict]:
    """Keep what a regrade must not lose: hand-given points (``hand_points``) of the rows graded
    again, and every row of the students not graded this time."""
    if not previous.exists():
        return rows
    with previous.open(newline="") as f:
        old = list(csv.DictReader(f))
    hand = {(r["student"], r["exercise"]): r.get("hand_points", "") for r in old}
    graded = {r["student"] for r in rows}
    for r in rows:
        if r["exercise"] != "TOTAL" and hand.get((r["student"], r["exercise"])):
            r["hand_points"] = hand[(r["student"], r["exercise"])]
    kept = [r for r in old if r["student"] not in graded]
    return kept + rows


def with_totals(rows: list[dict]) -> list[dict]:
    """Each student's TOTAL: automatic points plus the hand-given points entered so far."""
    by_student: dict[str, list[dict]] = {}
    for r in rows:
        by_student.setdefault(r["student"], []).append(r)
    for group in by_student.values():
        total = next((r for r in group if r["exercise"] == "TOTAL"), None)
        if total is None:
            continue
        parts = [r for r in group if r["exercise"] != "TOTAL"]
        auto = sum(_number(r["points"]) or 0 for r in parts if r["kind"] == "auto")
        hand = sum(_number(r.get("hand_points")) or 0 for r in parts)
        total["points"] = int(auto + hand) if float(auto + hand).is_integer() else auto + hand
        total["max_points"] = (
            sum(_number(r["max_points"]) or 0 for r in parts) or total["max_points"]
        )
        if isinstance(total["max_points"], float) and total["max_points"].is_integer():
            total["max_points"] = int(total["max_points"])
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_lms_csv(rows: list[dict], path: Path, id_column: str) -> None:
    """One row per student, one column per exercise and a total: the shape a gradebook import
    (Canvas, Moodle) maps onto its columns, the student matched by ``id_column``."""
    labels = list(dict.fromkeys(r["exercise"] for r in rows if r["exercise"] != "TOTAL"))
    table: dict[str, dict] = {}
    for r in rows:
        line = table.setdefault(r["student"], {id_column: r["student"], "late": r.get("late", "")})
        if r["exercise"] == "TOTAL":
            line["total"] = r["points"]
        elif r["kind"] == "manual":
            line[r["exercise"]] = r.get("hand_points", "")
        else:
            line[r["exercise"]] = r["points"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[id_column, *labels, "total", "late"])
        writer.writeheader()
        writer.writerows(table.values())


def gradescope_results(rows: list[dict]) -> dict:
    """One student's rows as Gradescope's autograder ``results.json``: a test per exercise with
    its score, maximum and feedback; explain answers as tests scored 0 for hand grading."""
    tests = []
    for r in rows:
        if r["exercise"] == "TOTAL":
            continue
        tests.append(
            {
                "name": r["exercise"],
                "score": _number(r["points"]) or _number(r.get("hand_points")) or 0.0,
                "max_score": _number(r["max_points"]) or 0.0,
                "output": r["message"] + ("\n\n" + r["output"] if r.get("output") else ""),
                "visibility": "visible",
            }
        )
    return {
        "score": sum(t["score"] for t in tests),
        "tests": tests,
        "output": next((r["message"] for r in rows if r["exercise"] == "TOTAL"), ""),
    }


def feedback_markdown(rows: list[dict], seed: int | None) -> str:
    """The file a teacher returns to one student: every exercise's result and check lines."""
    total = next(r for r in rows if r["exercise"] == "TOTAL")
    lines = [
        f"# Feedback: {total['student']}",
        "",
        f"**Automatic points: {total['points']} of {total['max_points']}**"
        + (
            " (explain answers are graded by hand)"
            if any(r["kind"] == "manual" for r in rows)
            else ""
        ),
        "",
    ]
    if total["message"]:
        lines += [f"> {total['message']}", ""]
    for r in rows:
        if r["exercise"] == "TOTAL":
            continue
        score = f"{r['points']} / {r['max_points']}" if r["kind"] == "auto" else "graded by hand"
        lines += [f"## {r['exercise']}: {score}", "", r["message"], ""]
        if r.get("output"):
            lines += ["```text", r["output"].rstrip(), "```", ""]
    lines += [
        "Numbers pass within the tolerance a FAIL line states (by default 1e-6 + 1e-6 x "
        "|expected|, a few float32 roundings); masks and counts must match exactly. Hidden "
        "cases use inputs drawn when grading" + (f" (seed {seed})." if seed is not None else "."),
        "",
    ]
    return "\n".join(lines)


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", Path(name).stem if name.endswith(".ipynb") else name)[:80]


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
        "--cell-timeout", type=int, default=120, help="seconds per exercise (default 120)"
    )
    parser.add_argument(
        "--total-timeout",
        type=int,
        help="seconds per submission (default: enough for each exercise)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="submissions graded at once (default 1)"
    )
    parser.add_argument(
        "--variant",
        help="a private word or number: hidden cases drawn from it (default: drawn at random)",
    )
    parser.add_argument(
        "--student",
        help="how to name a student: 'metadata:FIELD' or a regex on the file name with a "
        "'student' group (and optionally 'late'); default: the file's path",
    )
    parser.add_argument("--feedback", type=Path, help="folder for one Markdown file per student")
    parser.add_argument("--lms", type=Path, help="also write a one-row-per-student CSV here")
    parser.add_argument(
        "--lms-id", default="student", help="the LMS CSV's identifier column (default student)"
    )
    parser.add_argument(
        "--gradescope",
        type=Path,
        help="Gradescope results.json: this file for one submission, else a folder of files",
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(
            args.worker,
            json.loads(args.spec.read_text()),
            args.cell_timeout,
            args.result,
            json.loads(args.job.read_text()),
        )
        return 0
    seed = (
        int.from_bytes(hashlib.sha256(args.variant.encode()).digest()[:4], "big") >> 1
        if args.variant
        else int.from_bytes(os.urandom(4), "big") >> 1
    )
    chapters = sorted(args.chapters.glob("*.ipynb"))
    cache: dict = {}
    t_all = time.perf_counter()

    def one(sub: Path) -> list[dict]:
        t0 = time.perf_counter()
        got = grade_one(
            sub,
            chapters,
            args.chapter,
            args.cell_timeout,
            args.total_timeout,
            seed,
            args.student,
            cache,
        )
        total = got[-1]
        print(
            f"{sub}: {total['points']} / {total['max_points']} points in "
            f"{time.perf_counter() - t0:.0f} s"
            + (f" ({total['message']})" if total["message"] else ""),
            flush=True,
        )
        return got

    rows: list[dict] = []
    try:
        if args.jobs > 1 and len(args.submissions) > 1:
            if args.chapter:  # build the chapter's shared objects once, before the workers
                chapter_objects_file(args.chapter, exercise_spec(args.chapter), cache)
            with ThreadPoolExecutor(args.jobs) as pool:  # each submission in its own processes
                for got in pool.map(one, args.submissions):
                    rows += got
        else:
            for sub in args.submissions:
                rows += one(sub)
    finally:
        if "objects" in cache:
            shutil.rmtree(cache["objects"], ignore_errors=True)
    rows = with_totals(merge_previous(rows, args.out))
    write_csv(rows, args.out)
    print(f"wrote {args.out} ({len(rows)} rows) in {time.perf_counter() - t_all:.0f} s")
    by_student: dict[str, list[dict]] = {}
    for r in rows:
        by_student.setdefault(r["student"], []).append(r)
    if args.feedback:
        args.feedback.mkdir(parents=True, exist_ok=True)
        for who, group in by_student.items():
            (args.feedback / f"{_safe(who)}.md").write_text(feedback_markdown(group, seed))
        print(f"wrote {len(by_student)} feedback files to {args.feedback}")
    if args.lms:
        write_lms_csv(rows, args.lms, args.lms_id)
        print(f"wrote {args.lms}")
    if args.gradescope:
        if len(by_student) == 1 and args.gradescope.suffix == ".json":
            args.gradescope.parent.mkdir(parents=True, exist_ok=True)
            args.gradescope.write_text(
                json.dumps(gradescope_results(next(iter(by_student.values()))))
            )
        else:
            args.gradescope.mkdir(parents=True, exist_ok=True)
            for who, group in by_student.items():
                (args.gradescope / f"{_safe(who)}.json").write_text(
                    json.dumps(gradescope_results(group))
                )
        print(f"wrote {args.gradescope}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
