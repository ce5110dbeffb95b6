"""Compiled CPU loops for magnitude pruning at scale: each job in one read, no temporaries.

Eager PyTorch counts, gathers and zeroes weights by magnitude with several ops per chunk,
each reading its input and writing a temporary, so pruning a billion weights in place costs
about twenty reads of them. The loops of ``kernels.c`` do each job in one read, on as many
threads as torch uses. They are compiled with the system's C compiler (``cc``, or ``$CC``) the
first time they are needed on a machine (0.4 s here), then loaded from a cache in
milliseconds, so a first call pays almost nothing for them. They take 1-D numpy views of
contiguous float32 or float64 CPU tensors; ``utils.pruning.threshold`` uses them for large
tensors and keeps the eager ops for every other case (other dtypes, GPUs, masks) and wherever
no C compiler is found (:func:`why_not` says why). Both paths give the same result, bit for bit
(tests/test_kernels.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("kernels.c")
ENV_OFF = "PRUNING_BOOK_NO_KERNELS"  # set to 1: never compile or load the loops (eager path)
ENV_CACHE = "PRUNING_BOOK_KERNEL_CACHE"  # the folder of the compiled library
_UINT = {np.dtype(np.float32): (np.uint32, "f32"), np.dtype(np.float64): (np.uint64, "f64")}
_LOADED: dict = {}  # "lib": the library or None, "why": why not
_LOAD_LOCK = threading.Lock()


FLAGS = ["-O3", "-shared", "-fPIC", "-pthread", "-fno-strict-aliasing"]


def _cache_dirs() -> list[Path]:
    """Where the compiled library is kept: ``$PRUNING_BOOK_KERNEL_CACHE``, else the user's
    cache folder, else a folder of this user's in the temporary folder."""
    if os.environ.get(ENV_CACHE):
        return [Path(os.environ[ENV_CACHE])]
    dirs = []
    try:
        home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        dirs.append(Path(home) / "pruning-book")
    except RuntimeError:  # no home directory known
        pass
    own = f"pruning-book-cache-{os.getuid()}" if hasattr(os, "getuid") else "pruning-book-cache"
    return [*dirs, Path(tempfile.gettempdir()) / own]


def _owned(path: Path, kind: str) -> None:
    """Refuse what another user could have put or could change (a library loaded from there
    would run as this user): ``path`` must be a real ``kind`` ("dir" or "file"), not a link,
    this user's, and not writable by group or others."""
    st = os.lstat(path)
    real = stat.S_ISDIR(st.st_mode) if kind == "dir" else stat.S_ISREG(st.st_mode)
    if not real or (hasattr(os, "getuid") and st.st_uid != os.getuid()) or st.st_mode & 0o022:
        raise OSError(
            f"{path} is not this user's alone (a link, another owner or group/other write)"
        )


def _compiler() -> list[str] | None:
    """The C compiler's command: ``$CC`` (split as a shell does), else cc, gcc or clang."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    return [found] if found else None


def _build(cc: list[str], target: Path) -> None:
    """Compile ``kernels.c`` into ``target``, atomically (a half-written file is never seen),
    then remove the builds of other versions of the source from the same folder."""
    fd, tmp = tempfile.mkstemp(prefix="building-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [*cc, *FLAGS, str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip()[:500]}")
        os.chmod(tmp, 0o700)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    for old in target.parent.glob("kernels-*.so"):
        if old != target:
            with contextlib.suppress(OSError):
                old.unlink()


def _load() -> None:
    """Build on first use (then cache) and load the library into ``_LOADED``; on any failure,
    record why, and the eager path does the work."""
    try:
        _LOADED.update(lib=_find_or_build(), why=None)
    except Exception as error:  # no compiler, a broken one, no usable cache, no kernels.c
        _LOADED.update(lib=None, why=str(error) or type(error).__name__)


def _find_or_build() -> ctypes.CDLL:
    if os.environ.get(ENV_OFF, "") not in ("", "0"):
        raise RuntimeError(f"${ENV_OFF} is set")
    if sys.platform == "win32":
        raise RuntimeError("the loops are built for Linux and macOS only")
    cc = _compiler()
    if not cc:
        raise RuntimeError("no C compiler (cc, gcc or clang) was found")
    recipe = f"{cc}|{FLAGS}|{platform.machine()}|{sys.platform}".encode()
    key = hashlib.sha256(SOURCE.read_bytes() + recipe).hexdigest()[:16]
    errors = []
    for folder in _cache_dirs():
        path = folder / f"kernels-{key}.so"
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            _owned(folder, "dir")
            if not os.path.lexists(path):
                _build(cc, path)
            _owned(path, "file")
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            return lib
        except (OSError, subprocess.SubprocessError) as error:
            errors.append(f"{folder}: {error}")
    raise RuntimeError("; ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix, uint in (("f32", ctypes.c_uint32), ("f64", ctypes.c_uint64)):
        getattr(lib, f"band_{suffix}").argtypes = [p, i64, uint, uint, i32, p, p, p, p]
        getattr(lib, f"band_{suffix}").restype = None
        getattr(lib, f"zero_{suffix}").argtypes = [p, i64, uint, i32]
        getattr(lib, f"zero_{suffix}").restype = i64
        getattr(lib, f"keep_{suffix}").argtypes = [p, i64, uint, p, i32]
        getattr(lib, f"keep_{suffix}").restype = i64


def _after_fork_in_child() -> None:
    global _LOAD_LOCK
    _LOAD_LOCK = threading.Lock()  # a fork during a build may have copied it held


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def library() -> ctypes.CDLL | None:
    """The loaded library (built or loaded once per process), or None."""
    if "lib" not in _LOADED:
        with _LOAD_LOCK:
            if "lib" not in _LOADED:
                _load()
    return _LOADED["lib"]


def available() -> bool:
    """Whether the compiled loops can run here (a C compiler, or the library in the cache)."""
    return library() is not None


def why_not() -> str | None:
    """Why the compiled loops are not available (None when they are)."""
    library()
    return _LOADED["why"]


def _threads(n: int) -> int:
    """Threads for ``n`` elements: torch's count, each with at least 64 K elements."""
    return max(1, min(torch.get_num_threads(), n >> 16, 64))


def _bits(x: np.ndarray) -> tuple[np.ndarray, tuple]:
    """``x`` viewed as unsigned integers, and its (uint type, function suffix)."""
    if x.dtype not in _UINT or x.ndim != 1 or not x.flags.c_contiguous:
        raise ValueError(
            f"the compiled loops take 1-D contiguous float32 or float64 arrays, got "
            f"{x.dtype} of shape {x.shape}"
        )
    kind = _UINT[x.dtype]
    return x.view(kind[0]), kind


def _key_below(x: np.ndarray, value: float) -> int:
    """The key K with |x| < value exactly where (bits of |x|) < K. ``value`` is rounded to
    x's dtype first, as torch does when it compares a tensor with a Python number."""
    v = x.dtype.type(value)
    return 0 if not v > 0 else int(np.array(v, x.dtype).view(_UINT[x.dtype][0])[()])


def _key_at_most(x: np.ndarray, value: float) -> int:
    """The key K with |x| <= value exactly where (bits of |x|) < K."""
    v = x.dtype.type(value)
    return 0 if not v >= 0 else int(np.array(abs(v), x.dtype).view(_UINT[x.dtype][0])[()]) + 1


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"the compiled loops are not available: {why_not()}")
    return lib


class NotFinite(ValueError):
    """:func:`band` found NaN or infinite values where it was asked to refuse them."""


def band(
    x: np.ndarray, lo: float, hi: float, finite: bool = False
) -> tuple[int, np.ndarray, np.ndarray]:
    """The number of ``|x| <= lo``, and the positions and values of ``|x|`` strictly between
    ``lo`` and ``hi``, in order: one read of ``x`` (a second one only if the band holds more
    than 1/64 of it). No NaN in ``x``; ``finite=True`` raises :class:`NotFinite` if it holds
    NaN or an infinity (checked in the same read)."""
    xb, (_, suffix) = _bits(x)
    first, end = _key_at_most(x, lo), _key_below(x, hi)
    threads, fn = _threads(x.size), getattr(_lib(), f"band_{suffix}")
    cap = max(1024, -(-x.size // (64 * threads)))
    offsets = np.arange(threads + 1, dtype=np.int64) * cap  # a region of cap per thread
    while True:
        pos, vals = np.empty(offsets[-1], np.int64), np.empty(offsets[-1], x.dtype)
        res = np.zeros(3 * threads, np.int64)
        fn(
            xb.ctypes.data,
            x.size,
            first,
            end,
            threads,
            offsets.ctypes.data,
            pos.ctypes.data,
            vals.ctypes.data,
            res.ctypes.data,
        )
        if finite and res[2::3].any():
            raise NotFinite(f"{int(res[2::3].sum())} NaN or infinite values")
        found = res[1::3]
        if (found <= np.diff(offsets)).all():
            break
        offsets = np.concatenate([[0], np.cumsum(found)])  # once more, each region exact
    below = int(res[0::3].sum())
    if offsets[-1] == found.sum():  # the regions are exactly full: in order, in one piece
        return below, pos, vals
    parts = [slice(int(o), int(o + f)) for o, f in zip(offsets[:-1], found)]
    return below, np.concatenate([pos[p] for p in parts]), np.concatenate([vals[p] for p in parts])


def zero_below(x: np.ndarray, value: float) -> int:
    """Set to zero, in place, the entries with ``|x| < value`` (keeping their sign, as
    multiplying by 0 does); their number."""
    xb, (_, suffix) = _bits(x)
    if not x.flags.writeable:
        raise ValueError("zero_below writes into x, which is read-only")
    return int(
        getattr(_lib(), f"zero_{suffix}")(
            xb.ctypes.data, x.size, _key_below(x, value), _threads(x.size)
        )
    )


def keep_flags(x: np.ndarray, value: float, out: np.ndarray) -> int:
    """Write 1 into ``out`` where ``|x| >= value`` and 0 elsewhere; the number of ones."""
    xb, (_, suffix) = _bits(x)
    if (
        out.shape != x.shape
        or out.dtype != x.dtype
        or not out.flags.c_contiguous
        or not (out.flags.writeable)
    ):
        raise ValueError(
            f"out must be a writable contiguous {x.dtype} array of shape {x.shape}, got "
            f"{out.dtype} of shape {out.shape}"
        )
    return int(
        getattr(_lib(), f"keep_{suffix}")(
            xb.ctypes.data, x.size, _key_below(x, value), out.ctypes.data, _threads(x.size)
        )
    )


def warm_up() -> float:
    """Build (first use on a machine) or load the loops; the seconds it took."""
    t0 = time.perf_counter()
    available()
    return time.perf_counter() - t0
