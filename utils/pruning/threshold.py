"""The exact k-th smallest score over many tensors, without a copy of them all.

Global pruning needs one threshold over every weight of a model. Copying all scores into
one buffer costs as much memory as the model (gigabytes for a large one). Here scores are
computed chunk by chunk into one reused buffer: a random sample brackets the k-th value,
one pass counts the scores below the bracket and gathers the few inside it, and the exact
value is picked from those. Ties are resolved by position (earliest first), so counts are
exact and choices are deterministic on every device and dtype. For many scores that are the
magnitudes of float32 or float64 CPU weights, compiled loops (``utils.pruning.kernels``) do the
counting and gathering in one read each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

# Scores of the flat positions ``sel`` (a slice or an index tensor) of one tensor; with a
# slice, written into ``out`` (a buffer of at least that length) and returned as its view.
ScoreFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Tuning:
    """Sizes that change speed, never results (the tests shrink them to reach every branch)."""

    small: int = 1 << 17  # up to this many scores, all are looked at at once
    block: int = 16  # block length of the two-step nonzero
    kernels_from: int = 1 << 22  # scores in all from which the compiled loops run
    cpu_chunk: int = 1 << 20  # elements per chunk on a CPU: about its cache (fastest here)
    gpu_chunk: int = 1 << 23


_TUNING = Tuning()


def tuning() -> Tuning:
    """The sizes in force."""
    return _TUNING


def set_tuning(new: Tuning) -> Tuning:
    """Put ``new`` in force; returns the sizes it replaces."""
    global _TUNING
    old, _TUNING = _TUNING, new
    return old


@contextmanager
def tuned(**changes: int) -> Iterator[Tuning]:
    """Run a block with some sizes changed (``tuned(small=8, cpu_chunk=7)``), then restore them."""
    old = set_tuning(replace(_TUNING, **changes))
    try:
        yield _TUNING
    finally:
        set_tuning(old)


@dataclass(frozen=True)
class Threshold:
    """Take every score below ``value``, and the tied scores equal to it at ``ties``: for each
    source, the flat positions to take too (the earliest ties, so that the count is exact)."""

    value: float
    ties: dict[int, Tensor]


@dataclass(frozen=True)
class Source:
    """The scores of one tensor: a function of positions, their number, dtype and device;
    ``array``, where the scores are the magnitudes of a float32 or float64 CPU tensor with no
    mask, is a 1-D numpy view of that tensor, for the compiled loops."""

    score_of: ScoreFn
    n: int
    dtype: torch.dtype
    device: torch.device
    array: object = None


class NonFiniteScores(ValueError):
    """The scores of ``sources[source]`` hold NaN or an infinity (the compiled loops check this
    in the read that counts them, so that a large model is not read once more for it)."""

    def __init__(self, source: int) -> None:
        super().__init__(f"the scores of source {source} hold NaN or an infinity")
        self.source = source


def use_kernels(sources: Sequence[Source]) -> bool:
    """Whether the compiled loops of ``utils.pruning.kernels`` serve these sources: many scores, all
    magnitudes of plain CPU arrays, and the loops built (or buildable) here."""
    if sum(s.n for s in sources) < _TUNING.kernels_from or any(s.array is None for s in sources):
        return False
    from utils.pruning import kernels  # loads (or first builds) the library: only when needed

    return kernels.available()


def chunk_size(device: torch.device) -> int:
    """Elements per chunk: about a CPU's cache (measured fastest here), larger on a GPU."""
    return _TUNING.cpu_chunk if device.type == "cpu" else _TUNING.gpu_chunk


def chunks(n: int, device: torch.device) -> Iterator[slice]:
    """Consecutive slices of ``range(n)``."""
    step = chunk_size(device)
    return (slice(a, min(a + step, n)) for a in range(0, n, step))


class Buffers:
    """Reused chunk-sized buffers (scores and two float 0/1 masks), one set per device and dtype.

    Comparisons written as 0/1 floats and counted with a sum are several times faster on a
    CPU than boolean masks and ``count_nonzero``.
    """

    def __init__(self) -> None:
        self._sets: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

    def get(self, source: Source, length: int) -> tuple[Tensor, Tensor, Tensor]:
        key = (source.device, source.dtype)
        if key not in self._sets or len(self._sets[key][0]) < length:
            size = max(min(chunk_size(source.device), source.n), length, 1)
            self._sets[key] = tuple(
                torch.empty(size, dtype=source.dtype, device=source.device) for _ in range(3)
            )
        return tuple(b[:length] for b in self._sets[key])


def kth_smallest(sources: Sequence[Source], k: int, buffers: Buffers | None = None) -> Threshold:
    """The threshold that selects exactly the ``k`` smallest scores of all ``sources`` together.

    Memory beyond one chunk is a small share of the scores (the sample and the bracket).
    """
    n = sum(s.n for s in sources)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == 0:
        return Threshold(-math.inf, {})
    buffers = buffers or Buffers()
    sample = _sample(sources) if n > _TUNING.small else torch.zeros(0)
    q = k / n
    spread = 4 * math.sqrt(len(sample) * q * (1 - q)) + 2
    lo_i, hi_i = math.floor(q * len(sample) - spread), math.ceil(q * len(sample) + spread)
    if n <= _TUNING.small:  # small: the bracket is everything
        lo_i, hi_i = -1, 0
    while True:
        lo = float(sample[lo_i]) if lo_i >= 0 else -math.inf
        hi = float(sample[hi_i]) if hi_i < len(sample) else math.inf
        at_most_lo, below_hi, inside = _gather(sources, lo, hi, buffers)
        if at_most_lo < k <= below_hi:  # the usual case: the k-th score is strictly inside
            return _pick(inside, k - at_most_lo)
        if k > below_hi:  # at hi or above
            if hi == math.inf:  # +inf scores
                return Threshold(hi, _ties(sources, hi, k - below_hi, buffers))
            lo_i, hi_i = hi_i, hi_i + 2 * (hi_i - lo_i)
        elif (
            below_lo := _count_below(sources, lo, buffers)
        ) < k:  # exactly lo: take the earliest ties
            return Threshold(lo, _ties(sources, lo, k - below_lo, buffers))
        else:  # below lo: move the bracket down
            lo_i, hi_i = lo_i - 2 * (hi_i - lo_i), lo_i


def _pick(found: list[tuple[int, Tensor, Tensor]], rank: int) -> Threshold:
    """The ``rank``-th smallest of the gathered (source, positions, values), with its ties."""
    parts = [v.cpu() for _, _, v in found]
    if len({p.dtype for p in parts}) > 1 or parts[0].dtype in (torch.float16, torch.bfloat16):
        parts = [p.double() for p in parts]  # exact for every score dtype numpy lacks
    values = torch.cat(parts).numpy()
    value = values.dtype.type(np.partition(values, rank - 1)[rank - 1])  # numpy's is ~5x torch's
    ties_left, ties = rank - int(np.count_nonzero(values < value)), {}
    for i, pos, v in found:  # in flat order: sources in order, chunks in order
        if ties_left > 0:
            at = pos[(v == value).nonzero().squeeze(1)[:ties_left].to(pos.device)]
            if len(at):
                ties[i] = torch.cat([ties[i], at]) if i in ties else at
                ties_left -= len(at)
    return Threshold(float(value), ties)


def _sample(sources: Sequence[Source]) -> Tensor:
    """A sorted random sample of all scores, drawn in proportion to each source's size; larger
    for more scores, so that the bracket holds a small share of them."""
    n = sum(s.n for s in sources)
    size = min(max(n >> 8, 1 << 15), 1 << 19)
    g = torch.Generator().manual_seed(0)
    parts = []
    for s in sources:
        m = min(s.n, round(size * s.n / n))
        if m:
            idx = torch.randint(s.n, (m,), generator=g).to(s.device)
            parts.append(s.score_of(idx).cpu())
    return torch.from_numpy(np.sort(torch.cat(parts).float().numpy()))  # ~10x torch.sort here


def _gather(
    sources: Sequence[Source], lo: float, hi: float, buffers: Buffers
) -> tuple[int, int, list[tuple[int, Tensor, Tensor]]]:
    """Counts of scores <= lo and < hi, and the scores strictly between with their flat
    positions, as (source index, positions, values) per chunk."""
    at_most_lo = n_inside = 0
    found = []
    if use_kernels(sources):
        from utils.pruning import kernels

        for i, src in enumerate(sources):
            try:
                below, pos, values = kernels.band(src.array, lo, hi, finite=True)
            except kernels.NotFinite:
                raise NonFiniteScores(i) from None
            at_most_lo, n_inside = at_most_lo + below, n_inside + len(pos)
            if len(pos):
                found.append((i, torch.from_numpy(pos), torch.from_numpy(values)))
        return at_most_lo, at_most_lo + n_inside, found
    for i, src in enumerate(sources):
        for sel in chunks(src.n, src.device):
            s, below, above = buffers.get(src, sel.stop - sel.start)
            s = src.score_of(sel, out=s)
            torch.gt(s, lo, out=above)
            at_most_lo += len(s) - count_ones(above)
            pos = _nonzero(torch.lt(s, hi, out=below).mul_(above))
            n_inside += len(pos)
            if len(pos):
                found.append((i, pos + sel.start, s[pos]))
    return at_most_lo, at_most_lo + n_inside, found


def _count_below(sources: Sequence[Source], value: float, buffers: Buffers) -> int:
    count = 0
    for src in sources:
        for sel in chunks(src.n, src.device):
            s, below, _ = buffers.get(src, sel.stop - sel.start)
            count += count_ones(torch.lt(src.score_of(sel, out=s), value, out=below))
    return count


def _ties(
    sources: Sequence[Source], value: float, wanted: int, buffers: Buffers
) -> dict[int, Tensor]:
    """The flat positions of the first ``wanted`` scores equal to ``value``, per source."""
    ties = {}
    for i, src in enumerate(sources):
        for sel in chunks(src.n, src.device):
            if wanted == 0:
                return ties
            s, equal, _ = buffers.get(src, sel.stop - sel.start)
            pos = (
                _nonzero(torch.eq(src.score_of(sel, out=s), value, out=equal))[:wanted] + sel.start
            )
            ties[i] = torch.cat([ties[i], pos]) if i in ties else pos
            wanted -= len(pos)
    return ties


def count_ones(flags: Tensor) -> int:
    """The number of ones in a 0/1 vector (float32 sums are exact below 2**24 and fast)."""
    return int(flags.sum(dtype=torch.float64 if flags.dtype == torch.float64 else torch.float32))


def _nonzero(flags: Tensor) -> Tensor:
    """Positions of the non-zero entries of a 0/1 vector, found block by block: the blocks
    with any non-zero are picked first with cheap sums, then only they are scanned."""
    block = _TUNING.block
    n = len(flags) - len(flags) % block
    blocks = flags[:n].view(-1, block).sum(1).nonzero().squeeze(1)
    inner = flags[:n].view(-1, block)[blocks].nonzero()
    pos = blocks[inner[:, 0]] * block + inner[:, 1]
    return torch.cat([pos, flags[n:].nonzero().squeeze(1) + n])


def kept_by(
    scores: Tensor, threshold: Threshold, ties: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    """The entries of ``scores`` that ``threshold`` does not take: bool, or 0/1 in ``out``.
    ``ties`` are the positions (in this tensor) of the tied entries it takes too."""
    kept = (
        torch.ge(scores, threshold.value, out=out) if out is not None else scores >= threshold.value
    )
    if ties is not None and len(ties):
        kept.view(-1)[ties] = 0
    return kept


def ties_in(threshold: Threshold, source: int, sel: slice) -> Tensor | None:
    """The tie positions of one source that fall in the chunk ``sel``, relative to its start."""
    t = threshold.ties.get(source)
    if t is None:
        return None
    return t[(t >= sel.start) & (t < sel.stop)] - sel.start
