"""The grader's sandbox: one fresh process that runs a submission's exercise code, and nothing else.

``grade.py`` starts one per exercise and talks to it over its standard input and output (length-
prefixed frames). The sandbox runs the submission's code statement by statement, then calls the
student's function on the inputs the grader sends and sends back what it returned, encoded so
that the grader can read it without running code (``torch.load(weights_only=True)``). The checks,
their expected answers and the verdict stay in the grader's process: nothing the student's code
does here (patching a module, reading a caller's frame, printing a forged result) reaches them.

Before the student's code runs, the sandbox

- blocks the library functions the exercise asks the student to write (their code is replaced,
  so a copy of the function object is blocked too);
- installs an audit hook (PEP 578) that refuses to start processes, to call C code through
  ctypes, to open sockets, to read files outside Python's own folders, the book's package and
  the sandbox's folder, and to write outside the sandbox's folder;
- sends the student's prints to a log file, away from the channel to the grader.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import struct
import sys
import sysconfig
import traceback
import types
from typing import Any, BinaryIO

BLOCKED_EVENTS = {
    "subprocess.Popen",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.killpg",
    "pty.spawn",
    "ctypes.dlopen",
    "ctypes.dlsym",
    "ctypes.cdata",
    "ctypes.call_function",
    "ctypes.string_at",
    "ctypes.wstring_at",
    "socket.connect",
    "socket.bind",
    "socket.sendto",
    "os.symlink",
    "os.link",
    "sys.addaudithook",
}
BLOCKED_IMPORTS = {"_posixsubprocess", "_ctypes", "ctypes", "posix", "_socket", "socket", "pty"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


# ----------------------------------------------------------------------------- the channel
def read_frame(stream: BinaryIO) -> bytes:
    head = stream.read(4)
    if len(head) < 4:
        raise EOFError
    return stream.read(struct.unpack(">I", head)[0])


def write_reply(stream: BinaryIO, header: dict, payload: bytes = b"") -> None:
    text = json.dumps(header).encode()
    stream.write(struct.pack(">I", len(text)) + text + struct.pack(">I", len(payload)) + payload)
    stream.flush()


# ----------------------------------------------------------------------------- the walls
def _roots(extra: list[str]) -> tuple[list[str], list[str]]:
    """(folders the student's code may read, folders it may write)."""
    import torch

    import utils

    paths = sysconfig.get_paths()
    read = {sys.prefix, sys.base_prefix, sys.exec_prefix, *paths.values()}
    read |= {os.path.dirname(torch.__file__), os.path.dirname(utils.__file__)}
    read |= {"/usr/share/fonts", "/etc/fonts", "/proc/cpuinfo", "/sys/devices/system/cpu"}
    read |= {f"/proc/{os.getpid()}", "/dev/null", "/dev/urandom"}
    if os.environ.get("PRUNING_BOOK_DATA_DIR"):  # the book's data (texts, MNIST), read only
        read.add(os.environ["PRUNING_BOOK_DATA_DIR"])
    write = {os.path.realpath(p) for p in extra} | {"/dev/null"}
    return sorted(os.path.realpath(p) for p in read | write), sorted(write)


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def install_walls(box: str) -> None:
    """The audit hook: from here on, this process cannot start another, load C code, reach the
    network or touch files outside Python, the book's package and ``box``."""
    read_roots, write_roots = _roots([box])

    def hook(event: str, args: tuple) -> None:
        if event in BLOCKED_EVENTS:
            raise PermissionError(f"the grader does not allow {event} in a submission")
        if event == "import" and args and args[0] in BLOCKED_IMPORTS:
            raise PermissionError(f"the grader does not allow importing {args[0]} here")
        if event == "open":
            path, mode, flags = (list(args) + [None, None, 0])[:3]
            if path is None or isinstance(path, int):
                return
            real = os.path.realpath(os.fsdecode(path))
            writing = bool(mode and set(str(mode)) & set("wax+")) or bool(
                (flags or 0) & WRITE_FLAGS
            )
            if not _inside(real, write_roots if writing else read_roots):
                raise PermissionError(
                    f"the grader does not let a submission {'write' if writing else 'read'} {real}"
                )
        if event in ("os.remove", "os.rmdir", "os.rename", "os.replace", "shutil.rmtree"):
            target = args[0] if args else None
            if isinstance(target, (str, bytes, os.PathLike)):
                if not _inside(os.path.realpath(os.fsdecode(target)), write_roots):
                    raise PermissionError(f"the grader does not let a submission change {target}")

    sys.modules["_posixsubprocess"].fork_exec = _refused  # type: ignore[attr-defined]
    sys.dont_write_bytecode = True
    sys.addaudithook(hook)


def _refused(*args: Any, **kwargs: Any) -> Any:
    raise PermissionError("the grader does not allow starting processes in a submission")


def block(forbid: list[list[str]]) -> None:
    """Replace the code of each forbidden library function (``[module, qualname]``) with code that
    raises: every reference to it, and every function built from its code, is blocked."""
    import importlib

    for module_name, qualname in forbid:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, types.FunctionType):
            continue
        name = obj.__name__
        space: dict = {}
        exec(  # a blocker with no free variables, so that its code fits any function
            f"def {name}(*args, **kwargs):\n"
            "    raise RuntimeError('this exercise asks you to write it yourself: calling the "
            f"book\\'s {name}() is not allowed here')\n",
            space,
        )
        obj.__code__ = space[name].__code__
        obj.__defaults__, obj.__kwdefaults__ = None, None


# ----------------------------------------------------------------------------- what goes back
class Unportable(Exception):
    """A value the grader cannot take back (an object of the student's own class, hooks)."""


def _module(m: Any) -> Any:
    """A copy of a model with its masks applied: parametrizations and torch.nn.utils.prune's
    re-parametrizations made permanent (the weights hold the zeros), hooks refused."""
    from torch.nn.utils import parametrize, prune

    m = copy.deepcopy(m)
    for sub in m.modules():
        if parametrize.is_parametrized(sub):
            for name in list(sub.parametrizations):
                parametrize.remove_parametrizations(sub, name, leave_parametrized=True)
        for hook in list(sub._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(sub, hook._tensor_name)
        hooks = [
            h
            for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
            if getattr(sub, h, None)
        ]
        if hooks:
            raise Unportable(
                f"the returned model's {type(sub).__name__} carries hooks ({', '.join(hooks)}): "
                "return a model whose weights hold the result (masks from utils.pruning or "
                "torch.nn.utils.prune are fine)"
            )
    return m


def portable(x: Any, memo: dict[int, Any], strict: bool = True) -> Any:
    """``x`` as plain values, tensors and torch.nn modules (the grader reads nothing else)."""
    import numpy as np
    import torch
    from torch import nn

    if id(x) in memo:
        return memo[id(x)]
    if x is None or isinstance(x, (bool, int, float, complex, str)):
        out = x
    elif isinstance(x, np.generic):
        out = x.item()
    elif isinstance(x, np.ndarray):
        out = torch.from_numpy(x.copy())
    elif isinstance(x, torch.Tensor):
        out = x.detach().clone()
    elif isinstance(x, nn.Module):
        out = _module(x)
    elif isinstance(x, list):
        out = [portable(v, memo, strict) for v in x]
    elif isinstance(x, tuple):  # a named tuple too
        out = tuple(portable(v, memo, strict) for v in x)
    elif isinstance(x, dict):
        out = {k: portable(v, memo, strict) for k, v in x.items()}
    elif hasattr(x, "grader_state"):
        out = {"grader_state": portable(x.grader_state(), memo, strict)}
    elif strict:
        raise Unportable(f"the grader cannot take back a {type(x).__name__} object")
    else:
        out = None
    memo[id(x)] = out
    return out


# ----------------------------------------------------------------------------- the loop
def run_statements(job: dict, space: dict, out: BinaryIO) -> list[str]:
    """Run the submission's code one top-level statement at a time (a statement that raises costs
    only itself), telling the grader which one runs, so that an endless one is skipped next time."""
    import ast

    notes = []
    skip = {tuple(s) for s in job.get("skip", [])}
    for ci, source in enumerate(job["cells"]):
        try:
            tree = ast.parse(source)
        except SyntaxError as e:
            notes.append(f"cell {ci} has a syntax error (line {e.lineno}): {e.msg}")
            continue
        for si, stmt in enumerate(tree.body):
            if (ci, si) in skip:
                continue
            write_reply(out, {"op": "running", "at": [ci, si]})
            code = compile(ast.Module(body=[stmt], type_ignores=[]), f"<cell {ci}>", "exec")
            try:
                exec(code, space)
            except BaseException as e:  # noqa: BLE001 (KeyboardInterrupt, SystemExit too)
                notes.append(f"cell {ci}, line {stmt.lineno}: {type(e).__name__}: {str(e)[:200]}")
    return notes


def answer_call(request: dict, space: dict, out: BinaryIO) -> None:
    import torch

    fn = space.get(request["name"])
    if not callable(fn):
        write_reply(out, {"op": "missing", "name": request["name"]})
        return
    args = pickle.loads(request["args"])
    try:
        result = fn(*args)
    except BaseException as e:  # noqa: BLE001 (the student's code may raise anything)
        write_reply(out, {"op": "raised", "type": type(e).__name__, "message": str(e)[:300]})
        return
    grad = isinstance(result, torch.Tensor) and result.grad_fn is not None
    at = next((i for i, a in enumerate(args) if a is result), None)
    try:
        memo: dict[int, Any] = {}
        sent_args = [portable(a, memo, strict=False) for a in args]
        sent = portable(result, memo) if at is None else None
        buf = io.BytesIO()
        torch.save({"result": sent, "args": sent_args}, buf)
    except Exception as e:  # noqa: BLE001
        write_reply(out, {"op": "unportable", "message": str(e)[:300]})
        return
    write_reply(out, {"op": "returned", "grad": grad, "result_is_arg": at}, buf.getvalue())


def main() -> None:
    box = os.getcwd()
    channel_in = os.fdopen(os.dup(0), "rb")
    channel_out = os.fdopen(os.dup(1), "wb")
    log = os.open(os.path.join(box, "output.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
    sys.stderr = sys.stdout
    os.environ.setdefault("MPLBACKEND", "Agg")

    import numpy  # noqa: F401  (loaded before the walls go up)
    import torch  # noqa: F401

    import utils.kit.checks  # noqa: F401  (the book's modules, as a notebook imports them)
    import utils.lab  # noqa: F401

    write_reply(channel_out, {"op": "hello"})  # the exercise's time limit starts now
    job = pickle.loads(read_frame(channel_in))
    for module in job.get("preload", []):
        try:
            __import__(module)
        except Exception:  # noqa: BLE001 (an optional package missing here)
            pass
    block(job.get("forbid", []))
    install_walls(box)
    space: dict = {"__name__": "__main__"}
    try:
        notes = run_statements(job, space, channel_out)
    except BaseException:  # noqa: BLE001
        notes = ["the sandbox failed: " + traceback.format_exc(limit=2)[-300:]]
    write_reply(channel_out, {"op": "ready", "notes": notes})
    while True:
        try:
            request = pickle.loads(read_frame(channel_in))
        except EOFError:
            return
        answer_call(request, space, channel_out)


if __name__ == "__main__":
    main()
