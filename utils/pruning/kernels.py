"""Compiled CPU loops for magnitude pruning at scale: each job in one pass, no temporaries.

Eager PyTorch counts, gathers and zeroes weights by magnitude with several ops per chunk,
each reading its input and writing a temporary, so pruning a billion weights in place costs
about twenty reads of them. These loops, compiled by numba (once per machine, then cached on
disk) and run in parallel over blocks, do each job in one read. They take 1-D numpy views of
contiguous float32 or float64 CPU tensors; ``utils.pruning.threshold`` uses them for large tensors
and keeps the eager ops for every other case (other dtypes, GPUs, masks) and where numba is
missing. Both paths give the same result (tests/test_kernels.py).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import numpy as np
import torch

try:
    import numba
except ImportError:  # the eager path still works
    numba = None

_UINT = {
    np.dtype(np.float32): (np.uint32, 0x7FFFFFFF),
    np.dtype(np.float64): (np.uint64, 0x7FFFFFFFFFFFFFFF),
}


_LOCK = threading.Lock()  # numba's fallback thread pool ("workqueue") aborts on concurrent calls
_STARTED_IN: list[int] = []  # the process that started numba's thread pool (GNU OpenMP, or
# numba's own "workqueue"; neither may be used again in a process forked from it)


def available() -> bool:
    """Whether the compiled loops can run here: numba importable and compiling, and this is
    not a process forked after they ran (their thread pool does not survive a fork)."""
    if numba is None or numba.config.DISABLE_JIT:
        return False
    return not _STARTED_IN or _STARTED_IN[0] == os.getpid()


@contextlib.contextmanager
def _pool() -> Iterator[None]:
    """Run with as many threads as torch uses, one call at a time. Starting numba's OpenMP pool
    resets the thread count that torch reads; it is put back, else a process forked after this
    (a DataLoader worker that set one thread) would enter OpenMP and hang."""
    if (
        _STARTED_IN and _STARTED_IN[0] != os.getpid()
    ):  # before the lock, which a fork may have copied held
        raise RuntimeError(
            "the compiled loops cannot run in a process forked after they ran "
            "(kernels.available() is False here; the eager path works)"
        )
    with _LOCK:
        if not _STARTED_IN:
            _STARTED_IN.append(os.getpid())
        threads = torch.get_num_threads()
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        try:
            yield
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)


def _blocks(n: int) -> int:
    """Blocks for the parallel loops: enough to share out, each at least 64 K elements."""
    return max(1, min(n >> 16, 64))


# The loops compare bit patterns: for floats of one sign, the order of |x| is the order of
# their bits with the sign bit cleared, as unsigned integers. So |x| <= v is "bits < key",
# one integer compare that vectorises, and a band lo < |x| < hi is one unsigned compare.


def _bits(x: np.ndarray) -> tuple[np.ndarray, object]:
    """``x`` viewed as unsigned integers, and the mask that clears the sign bit."""
    if x.dtype not in _UINT or x.ndim != 1 or not x.flags.c_contiguous:
        raise ValueError(
            f"the compiled loops take 1-D contiguous float32 or float64 arrays, got "
            f"{x.dtype} of shape {x.shape}"
        )
    uint, mask = _UINT[x.dtype]
    return x.view(uint), uint(mask)


def _key_below(x: np.ndarray, value: float) -> object:
    """The key K with |x| < value exactly where (bits of |x|) < K. ``value`` is rounded to
    x's dtype first, as torch does when it compares a tensor with a Python number."""
    uint = _UINT[x.dtype][0]
    v = x.dtype.type(value)
    return uint(0) if not v > 0 else np.array(v, x.dtype).view(uint)[()]


def _key_at_most(x: np.ndarray, value: float) -> object:
    """The key K with |x| <= value exactly where (bits of |x|) < K."""
    uint = _UINT[x.dtype][0]
    v = x.dtype.type(value)
    return uint(0) if not v >= 0 else uint(int(np.array(abs(v), x.dtype).view(uint)[()]) + 1)


def band(x: np.ndarray, lo: float, hi: float) -> tuple[int, np.ndarray, np.ndarray]:
    """The number of ``|x| <= lo``, and the positions and values of ``|x|`` strictly between
    ``lo`` and ``hi``, in order: two reads of ``x`` (count, then copy). No NaN in ``x``."""
    xb, mask = _bits(x)
    first, end = _key_at_most(x, lo), _key_below(x, hi)  # band: first <= bits < end
    end = max(end, first)
    with _pool():
        at_most_lo, inside = _count(xb, mask, first, end, _blocks(x.size))
        if not inside.any():
            return int(at_most_lo), np.zeros(0, np.int64), np.zeros(0, x.dtype)
        positions, values = _gather(xb, mask, first, end - first, inside)
    return int(at_most_lo), positions, values.view(x.dtype)


def zero_below(x: np.ndarray, value: float) -> int:
    """Set to zero, in place, the entries with ``|x| < value`` (keeping their sign, as
    multiplying by 0 does); their number."""
    xb, mask = _bits(x)
    with _pool():
        return int(_zero(xb, mask, _key_below(x, value), ~mask, _blocks(x.size)))


def keep_flags(x: np.ndarray, value: float, out: np.ndarray) -> int:
    """Write 1 into ``out`` where ``|x| >= value`` and 0 elsewhere; the number of ones."""
    xb, mask = _bits(x)
    if out.shape != x.shape:
        raise ValueError(f"out has shape {out.shape}, x {x.shape}")
    with _pool():
        return int(_keep(xb, mask, _key_below(x, value), out, _blocks(x.size)))


def warm_up() -> float:
    """Compile (first use on a machine) or load the loops for float32; the seconds it took.
    A one-off per process, which timings of the loops themselves should leave out."""
    t0 = time.perf_counter()
    x = np.linspace(-1, 1, 1 << 12, dtype=np.float32)
    band(x, 0.25, 0.5)
    keep_flags(x, 0.5, np.empty_like(x))
    zero_below(x, 0.5)
    return time.perf_counter() - t0


def _compiler(**options):
    """numba.njit, cached on disk where numba finds a writable folder (else per process)."""

    def wrap(fn):
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(**options)(fn)

    return wrap


if numba is not None:
    # Each parallel loop hands whole blocks to a plain compiled function (the form LLVM
    # vectorises). Counting is `if ...: c += 1`; the copy branches on a rare event only.
    jit, parallel, prange = _compiler(), _compiler(parallel=True), numba.prange

    @jit
    def _count_block(xb, mask, first, end):
        below = below_end = 0
        for i in range(xb.size):
            m = xb[i] & mask
            if m < first:
                below += 1
            if m < end:
                below_end += 1
        return below, below_end - below

    @parallel
    def _count(xb, mask, first, end, nblocks):
        """All bits < first, and per block the number with first <= bits < end."""
        n, step = xb.size, (xb.size + nblocks - 1) // nblocks
        below, inside = np.zeros(nblocks, np.int64), np.zeros(nblocks, np.int64)
        for b in prange(nblocks):
            below[b], inside[b] = _count_block(
                xb[b * step : min(n, (b + 1) * step)], mask, first, end
            )
        return below.sum(), inside

    @jit
    def _gather_block(xb, offset, mask, first, width, positions, values, j):
        for i in range(xb.size):
            m = xb[i] & mask
            if m - first < width:  # unsigned: below first wraps round to a large number
                values[j], positions[j] = m, offset + i
                j += 1

    @parallel
    def _gather(xb, mask, first, width, inside):
        """The positions and bits (sign cleared) with first <= bits < first + width, in order."""
        nblocks = inside.size
        n, step = xb.size, (xb.size + nblocks - 1) // nblocks
        starts = np.zeros(nblocks + 1, np.int64)
        for b in range(nblocks):
            starts[b + 1] = starts[b] + inside[b]
        positions, values = np.empty(starts[-1], np.int64), np.empty(starts[-1], xb.dtype)
        for b in prange(nblocks):
            s = b * step
            _gather_block(
                xb[s : min(n, s + step)], s, mask, first, width, positions, values, starts[b]
            )
        return positions, values

    @jit
    def _zero_block(xb, mask, end, sign):
        zeroed = 0
        for i in range(xb.size):
            small = (xb[i] & mask) < end
            xb[i] = xb[i] & sign if small else xb[i]  # all uint (numba makes `uint64 or 0` a float)
            zeroed += small
        return zeroed

    @parallel
    def _zero(xb, mask, end, sign, nblocks):
        n, step = xb.size, (xb.size + nblocks - 1) // nblocks
        zeroed = np.zeros(nblocks, np.int64)
        for b in prange(nblocks):
            zeroed[b] = _zero_block(xb[b * step : min(n, (b + 1) * step)], mask, end, sign)
        return zeroed.sum()

    @jit
    def _keep_block(xb, mask, end, out):
        kept = 0
        for i in range(xb.size):
            big = (xb[i] & mask) >= end
            out[i] = 1 if big else 0
            kept += big
        return kept

    @parallel
    def _keep(xb, mask, end, out, nblocks):
        n, step = xb.size, (xb.size + nblocks - 1) // nblocks
        kept = np.zeros(nblocks, np.int64)
        for b in prange(nblocks):
            s, e = b * step, min(n, (b + 1) * step)
            kept[b] = _keep_block(xb[s:e], mask, end, out[s:e])
        return kept.sum()
