"""Automatic checks for the exercises: run the reader's function on fixed small inputs.

Each ``check_*`` prints one line per case and a verdict, and returns True or False,
so a notebook cell can also ``assert`` it. The expected answers come from
:mod:`utils.pruning`, never from typed-in numbers.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from utils.pruning import smallest_k


def _same(got: Any, want: Any, atol: float) -> bool:
    if isinstance(want, Tensor):
        if not isinstance(got, Tensor) or got.shape != want.shape:
            return False
        if want.dtype == torch.bool:
            return bool(torch.equal(got.bool(), want))
        return bool(torch.allclose(got.double(), want.double(), atol=atol, rtol=0))
    if isinstance(want, float):
        return isinstance(got, (int, float)) and abs(got - want) <= atol
    return got == want


def run_check(title: str, fn: Callable[..., Any], cases: Sequence[tuple[str, tuple, Any]],
              atol: float = 1e-6) -> bool:
    """Call ``fn(*args)`` for each ``(label, args, expected)`` and print pass/fail per case."""
    print(f"check: {title}")
    ok = True
    for label, args, want in cases:
        try:
            got = fn(*args)
            passed = _same(got, want, atol)
            detail = "" if passed else f" (expected {want!r}, got {got!r})"
        except Exception as e:  # the reader's code may raise anything; report it, do not crash
            passed, detail = False, f" (raised {type(e).__name__}: {e})"
        ok &= passed
        print(f"  {'pass' if passed else 'FAIL'}: {label}{detail if len(detail) < 300 else ' (wrong result)'}")
    print("  => all cases pass" if ok else "  => some cases fail: read the FAIL lines above")
    return ok


def _tensors() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"random 4x6": torch.randn(4, 6, generator=g),
            "ties 3x4": torch.tensor([[1., -1., 2., 0.], [0., 1., -2., 1.], [3., 0., 1., -1.]]),
            "conv 3x2x3x3": torch.randn(3, 2, 3, 3, generator=g)}


def check_unstructured_mask(fn: Callable[[Tensor, float], Tensor]) -> bool:
    """``fn(weight, ratio) -> bool mask`` (True = kept) that zeroes exactly round(ratio*n) weights,
    the smallest |w| first, ties to the earliest position (equation 3.1 with an exact threshold)."""
    cases = []
    for name, w in _tensors().items():
        for r in (0.0, 0.25, 0.5, 0.9):
            want = ~smallest_k(w.abs(), round(r * w.numel()))
            cases.append((f"{name}, ratio {r}", (w.clone(), r), want))
    return run_check("unstructured magnitude mask", fn, cases)


def check_row_norms(fn: Callable[[Tensor, float], Tensor]) -> bool:
    """``fn(weight, p) -> one L_p norm per output unit`` (row of a Linear, filter of a Conv2d)."""
    cases = []
    for name, w in _tensors().items():
        for p in (1.0, 2.0):
            want = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), ord=p, dim=1)
            cases.append((f"{name}, p={p}", (w.clone(), p), want))
    return run_check("L_p norm of each output unit", fn, cases, atol=1e-5)


def check_sparsity(fn: Callable[[Tensor], float]) -> bool:
    """``fn(tensor) -> fraction of zero entries`` as a float in [0, 1]."""
    cases = [(name, (w.clone(),), float((w == 0).sum()) / w.numel()) for name, w in _tensors().items()]
    cases.append(("all zeros", (torch.zeros(5, 5),), 1.0))
    return run_check("sparsity of a tensor", fn, cases)
