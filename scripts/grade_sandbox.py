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
DIR_FD_ARGS = {  # how many of an event's last arguments are dir_fd (-1 when not given)
    "os.remove": 1,
    "os.rmdir": 1,
    "os.rename": 2,
    "os.replace": 2,
    "os.chmod": 1,
    "os.chown": 1,
    "os.utime": 1,
    "os.mkdir": 1,
    "os.link": 2,
    "shutil.rmtree": 1,
}
CHANGING_EVENTS = {
    "os.remove",
    "os.rmdir",
    "os.rename",
    "os.replace",
    "os.truncate",
    "os.chmod",
    "os.chown",
    "os.utime",
    "os.mkdir",
    "os.link",
    "os.chflags",
    "os.lchflags",
    "os.lchmod",
    "shutil.rmtree",
    "shutil.move",
    "shutil.copyfile",
}


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
# Landlock (Linux 5.13+): the kernel's own file-system walls, which an unprivileged process puts
# around itself; they hold for C code too (torch.from_file, torch.save to a path, dir_fd tricks).
_FS_FILE = (
    (1 << 0) | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15)
)  # execute, write, read, truncate, ioctl
_FS_READ = (1 << 0) | (1 << 2) | (1 << 3)  # execute, read file, read dir
_FS_ALL_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}


def _landlock(read: list[str], write: list[str], hidden: set[str]) -> str:
    """Restrict this process with Landlock: read (and load) only under ``read`` (minus the files
    in ``hidden``), write only under ``write``, no TCP, no signals out. Returns what it did."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return f"Landlock is not available here (errno {ctypes.get_errno()})"
    fs_all = _FS_ALL_BY_ABI.get(abi, (1 << 16) - 1)
    attr = (ctypes.c_uint64 * 3)(fs_all, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return f"Landlock refused a ruleset (errno {ctypes.get_errno()})"

    class Beneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    def allow(path: str, access: int) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        if not os.path.isdir(path):
            access &= _FS_FILE
        rule = Beneath(access & fs_all, fd)
        libc.syscall(445, ruleset, 1, ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(fd)

    def grant(folder: str) -> None:  # a folder holding a hidden file: entry by entry
        if not any(h.startswith(folder.rstrip("/") + "/") for h in hidden):
            allow(folder, _FS_READ)
            return
        allow(folder, 1 << 3)  # list it
        for entry in os.scandir(folder):
            if entry.is_dir(follow_symlinks=False):
                grant(entry.path)
            elif entry.path not in hidden:
                allow(entry.path, _FS_READ)

    for root in read:
        grant(root)
    for root in write:
        allow(root, fs_all)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, which restrict_self requires
        return f"Landlock: no_new_privs refused (errno {ctypes.get_errno()})"
    if libc.syscall(446, ruleset, ctypes.c_uint32(0)) != 0:
        return f"Landlock: restrict_self refused (errno {ctypes.get_errno()})"
    os.close(ruleset)
    return f"landlock abi {abi}"


def _hidden_files(forbid: list[list[str]]) -> set[str]:
    """The source and compiled files of the modules that define a forbidden function: no
    re-reading them (``importlib.reload`` would make the function anew)."""
    out = set()
    for module_name, _ in forbid:
        module = sys.modules.get(module_name)
        source = getattr(module, "__file__", None)
        if not source:
            continue
        source = os.path.realpath(source)
        out.add(source)
        cache = os.path.join(os.path.dirname(source), "__pycache__")
        stem = os.path.splitext(os.path.basename(source))[0] + "."
        if os.path.isdir(cache):
            out |= {os.path.join(cache, f) for f in os.listdir(cache) if f.startswith(stem)}
    return out


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


def install_walls(box: str, forbid: list[list[str]]) -> str:
    """The walls: Landlock where the kernel has it, and an audit hook in any case. From here on,
    this process cannot start another, load C code through ctypes, reach the network, re-read
    the modules of the forbidden functions or touch files outside Python, the book's package
    and ``box``. Returns what holds the file-system walls."""
    read_roots, write_roots = _roots([box])
    hidden = _hidden_files(forbid)
    walls = _landlock(read_roots, write_roots, hidden)

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
            if real in hidden:
                raise PermissionError(f"the grader does not let a submission read {real}")
            writing = bool(mode and set(str(mode)) & set("wax+")) or bool(
                (flags or 0) & WRITE_FLAGS
            )
            if not _inside(real, write_roots if writing else read_roots):
                raise PermissionError(
                    f"the grader does not let a submission {'write' if writing else 'read'} {real}"
                )
        if event in CHANGING_EVENTS:
            two = event in ("os.rename", "os.replace", "os.link", "shutil.move", "shutil.copyfile")
            for target in args[: 2 if two else 1]:
                if isinstance(target, (str, bytes, os.PathLike)) and not _inside(
                    os.path.realpath(os.fsdecode(target)), write_roots
                ):
                    raise PermissionError(f"the grader does not let a submission change {target}")
            tail = DIR_FD_ARGS.get(event, 0)
            if tail and any(isinstance(a, int) and a >= 0 for a in args[-tail:]):
                raise PermissionError(f"the grader does not allow {event} with dir_fd here")

    sys.modules["_posixsubprocess"].fork_exec = _refused  # type: ignore[attr-defined]
    sys.dont_write_bytecode = True
    sys.addaudithook(hook)
    return walls


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
    """A copy of a model with its masks applied: torch.nn.utils.prune's re-parametrizations and
    parametrizations made permanent (the weights hold the zeros). Refused: layers of the
    student's own classes, hooks, and methods replaced on an instance (``m.forward = ...``)."""
    from torch.nn.utils import parametrize, prune

    for sub in m.modules():  # torch's pruning first, in place: its weight cannot be deep-copied
        for hook in list(sub._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(sub, hook._tensor_name)
    m = copy.deepcopy(m)
    for sub in m.modules():
        kind = type(sub)
        if parametrize.is_parametrized(sub):
            for name in list(sub.parametrizations):
                parametrize.remove_parametrizations(sub, name, leave_parametrized=True)
            kind = type(sub)
        if not kind.__module__.startswith(("torch.nn", "torchvision.", "utils.")):
            raise Unportable(
                f"the returned model holds a {kind.__name__}, a class of your own: the grader "
                "takes back models built from torch.nn layers (copy its weights, masks applied, "
                "into the torch.nn layer it extends)"
            )
        hooks = [
            h
            for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
            if getattr(sub, h, None)
        ]
        if hooks:
            raise Unportable(
                f"the returned model's {kind.__name__} carries hooks ({', '.join(hooks)}): "
                "return a model whose weights hold the result (masks from utils.pruning or "
                "torch.nn.utils.prune are fine)"
            )
        shadowed = [k for k in vars(sub) if callable(getattr(kind, k, None))]
        if shadowed:
            raise Unportable(
                f"the returned model's {kind.__name__} has {', '.join(shadowed)} replaced on the "
                "instance: the grader takes back layers that compute as their class does"
            )
    return m


def portable(x: Any, memo: dict[int, Any], strict: bool = True) -> Any:
    """``x`` as plain values, tensors and torch.nn modules (the grader reads nothing else)."""
    import numpy as np
    import torch
    from torch import nn

    if id(x) in memo:
        return memo[id(x)]
    if isinstance(x, np.generic):  # numpy.float64 is a float too: plain Python numbers go back
        out = x.item()
    elif x is None or type(x) in (bool, int, float, complex, str):
        out = x
    elif isinstance(x, (bool, int, float, complex, str)):  # a subclass: its plain value
        out = next(t for t in (bool, int, float, complex, str) if isinstance(x, t))(x)
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
    walls = install_walls(box, job.get("forbid", []))
    space: dict = {"__name__": "__main__"}
    try:
        notes = run_statements(job, space, channel_out)
    except BaseException:  # noqa: BLE001
        notes = ["the sandbox failed: " + traceback.format_exc(limit=2)[-300:]]
    write_reply(channel_out, {"op": "ready", "notes": notes, "walls": walls})
    while True:
        try:
            request = pickle.loads(read_frame(channel_in))
        except EOFError:
            return
        answer_call(request, space, channel_out)


def zygote(sock_fd: int, preload: list[str]) -> None:
    """Load torch, the book and ``preload`` once, then fork a sandbox for each request on the
    socket (its two pipe ends come with it); the sandbox builds its own walls in ``main``."""
    import signal
    import socket

    import numpy  # noqa: F401
    import torch  # noqa: F401

    import utils.kit.checks  # noqa: F401
    import utils.lab  # noqa: F401

    for module in preload:
        try:
            __import__(module)
        except Exception:  # noqa: BLE001 (an optional package missing here)
            pass
    sock = socket.socket(fileno=sock_fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the sandboxes
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 2)
        except OSError:
            return
        if not message or len(fds) != 2:
            return
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:  # the sandbox
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                sock.close()
                os.setsid()
                os.dup2(fds[0], 0)
                os.dup2(fds[1], 1)
                for fd in fds:
                    os.close(fd)
                os.chdir(request["box"])
                os.environ.clear()
                os.environ.update(request["env"])
                main()
            finally:
                os._exit(0)
        for fd in fds:
            os.close(fd)
        sock.sendall(json.dumps({"pid": pid}).encode() + b"\n")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--zygote":
        zygote(int(sys.argv[2]), sys.argv[3:])
    else:
        main()
