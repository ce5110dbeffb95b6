"""Compiled CPU loops for magnitude pruning at scale: each job in one read, no temporaries.

Eager PyTorch counts, gathers and zeroes weights by magnitude with several ops per chunk,
each reading its input and writing a temporary, so pruning a billion weights in place costs
about twenty reads of them. The loops of ``kernels.c`` do each job in one read, on as many
threads as torch uses. They are compiled with the system's C compiler (``cc``, or ``$CC``) the
first time they are needed on a machine (about a second), then loaded from a cache in
milliseconds, so a first call pays almost nothing for them. They take 1-D numpy views of
contiguous float32 or float64 CPU tensors; ``utils.pruning.threshold`` uses them for large
tensors and keeps the eager ops for every other case (other dtypes, GPUs, masks) and wherever
no C compiler is found (:func:`why_not` says why). Both paths give the same result, bit for bit
(tests/test_kernels.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
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
_UINT = {
    np.dtype(np.float32): (np.uint32, 0x7FFFFFFF, "f32", ctypes.c_uint32),
    np.dtype(np.float64): (np.uint64, 0x7FFFFFFFFFFFFFFF, "f64", ctypes.c_uint64),
}
_LOADED: dict = {}  # "lib": the library or None, "why": why not
_LOAD_LOCK = threading.Lock()


def _cache_dirs() -> list[Path]:
    """Where the compiled library is kept: ``$PRUNING_BOOK_KERNEL_CACHE``, else the user's
    cache folder, else the temporary folder."""
    if os.environ.get(ENV_CACHE):
        return [Path(os.environ[ENV_CACHE])]
    home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    own = f"pruning-book-cache-{os.getuid()}" if hasattr(os, "getuid") else "pruning-book-cache"
    return [Path(home) / "pruning-book", Path(tempfile.gettempdir()) / own]


def _safe(folder: Path) -> None:
    """Refuse a cache folder that another user could write to (a library there would run as
    this user): it must be ours and not writable by group or others."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise OSError(f"{folder} is not this user's alone (owner or group/other write)")


def _compiler() -> str | None:
    return os.environ.get("CC") or next(
        (c for c in ("cc", "gcc", "clang") if shutil.which(c)), None
    )


def _build(cc: str, target: Path) -> None:
    """Compile ``kernels.c`` into ``target``, atomically (a half-written file is never seen)."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cc, "-O3", "-shared", "-fPIC", "-pthread", str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip()[:500]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load() -> ctypes.CDLL | None:
    """The compiled library, built on first use and then cached; None where it cannot be."""
    if os.environ.get(ENV_OFF, "") not in ("", "0"):
        _LOADED.update(lib=None, why=f"${ENV_OFF} is set")
        return None
    if sys.platform == "win32":
        _LOADED.update(lib=None, why="the loops are built for Linux and macOS only")
        return None
    cc = _compiler()
    if cc is None:
        _LOADED.update(lib=None, why="no C compiler (cc, gcc or clang) was found")
        return None
    key = hashlib.sha256(
        SOURCE.read_bytes() + f"{cc}|{platform.machine()}|{sys.platform}".encode()
    ).hexdigest()[:16]
    errors = []
    for folder in _cache_dirs():
        path = folder / f"kernels-{key}.so"
        try:
            _safe(folder)
            if not path.exists():
                _build(cc, path)
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            _LOADED.update(lib=lib, why=None)
            return lib
        except (OSError, subprocess.SubprocessError) as error:
            errors.append(f"{folder}: {error}")
    _LOADED.update(lib=None, why="; ".join(errors))
    return None


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix, uint in (("f32", ctypes.c_uint32), ("f64", ctypes.c_uint64)):
        getattr(lib, f"band_{suffix}").argtypes = [p, i64, uint, uint, i32, i64, p, p, p]
        getattr(lib, f"band_{suffix}").restype = None
        getattr(lib, f"zero_{suffix}").argtypes = [p, i64, uint, i32]
        getattr(lib, f"zero_{suffix}").restype = i64
        getattr(lib, f"keep_{suffix}").argtypes = [p, i64, uint, p, i32]
        getattr(lib, f"keep_{suffix}").restype = i64


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
    """``x`` viewed as unsigned integers, and its (uint, mask, suffix, ctype)."""
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
    xb, (uint, mask, suffix, _) = _bits(x)
    first, end = _key_at_most(x, lo), _key_below(x, hi)
    end = max(end, first)
    threads, fn = _threads(x.size), getattr(_lib(), f"band_{suffix}")
    cap = max(1024, -(-x.size // (64 * threads)))
    while True:
        pos, vals = np.empty(cap * threads, np.int64), np.empty(cap * threads, x.dtype)
        res = np.zeros(3 * threads, np.int64)
        fn(
            xb.ctypes.data,
            x.size,
            first,
            end,
            threads,
            cap,
            pos.ctypes.data,
            vals.ctypes.data,
            res.ctypes.data,
        )
        if finite and res[2::3].any():
            raise NotFinite(f"{int(res[2::3].sum())} NaN or infinite values")
        found = res[1::3]
        if found.max(initial=0) <= cap:
            break
        cap = int(found.max())  # the band was wider than room was made for: once more, exact
    parts = [slice(k * cap, k * cap + int(found[k])) for k in range(threads)]
    positions = np.concatenate([pos[s] for s in parts]) if threads > 1 else pos[parts[0]]
    values = np.concatenate([vals[s] for s in parts]) if threads > 1 else vals[parts[0]]
    return int(res[0::3].sum()), positions, values


def zero_below(x: np.ndarray, value: float) -> int:
    """Set to zero, in place, the entries with ``|x| < value`` (keeping their sign, as
    multiplying by 0 does); their number."""
    xb, (_, _, suffix, _) = _bits(x)
    return int(
        getattr(_lib(), f"zero_{suffix}")(
            xb.ctypes.data, x.size, _key_below(x, value), _threads(x.size)
        )
    )


def keep_flags(x: np.ndarray, value: float, out: np.ndarray) -> int:
    """Write 1 into ``out`` where ``|x| >= value`` and 0 elsewhere; the number of ones."""
    xb, (_, _, suffix, _) = _bits(x)
    if out.shape != x.shape or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be a contiguous {x.dtype} array of shape {x.shape}, got "
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
