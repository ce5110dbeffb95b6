"""Checks for the exercises of chapter 9 (pruning language models), in the style of
:mod:`utils.checks`: run the reader's function on fixed small inputs, print pass/FAIL per case,
return a :class:`~utils.checks.Verdict`."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from utils.checks import Verdict, run_check


def check_wanda_score(fn: Callable[[Tensor, Tensor], Tensor]) -> Verdict:
    """``fn(weight, inputs) -> |W_ij| * ||X_j||_2``: ``inputs`` holds one row per token (any
    leading shape), ``X_j`` is input feature ``j`` over all tokens. The expected values are
    computed here with plain tensor operations, not with :mod:`utils.llm_pruning`."""
    g = torch.Generator().manual_seed(9)
    outlier = torch.randn(10, 6, generator=g)
    outlier[:, 2] *= 100
    cases_in = {
        "hand-made 2x2": (torch.tensor([[1.0, -2.0], [3.0, 0.5]]),
                          torch.tensor([[3.0, 0.0], [4.0, 1.0]])),
        "random 4x6, 10 tokens": (torch.randn(4, 6, generator=g), torch.randn(10, 6, generator=g)),
        "inputs shaped (batch, time, features)": (torch.randn(3, 6, generator=g),
                                                  torch.randn(2, 5, 6, generator=g)),
        "one outlier feature": (torch.randn(4, 6, generator=g), outlier)}
    cases = []
    for name, (w, x) in cases_in.items():
        flat = x.reshape(-1, x.shape[-1])
        want = w.abs() * (flat * flat).sum(dim=0).sqrt()[None, :]
        cases.append((name, (w.clone(), x.clone()), want))

    def scaled(w: Tensor, x: Tensor) -> Any:  # any tensor-like result, compared in float64
        out = fn(w, x)
        return None if out is None else torch.as_tensor(out).double()
    from utils import llm_pruning
    return run_check("Wanda score", scaled, cases, atol=1e-3, forbid=(llm_pruning.wanda_scores,))


def check_semi_structured_bytes(fn: Callable[[int, int, int], int]) -> Verdict:
    """``fn(rows, cols, bits) -> bytes`` of a 2:4 sparse matrix: the kept half of the values
    at ``bits`` each plus a 2-bit position per kept value."""
    from utils.llm_pruning import semi_structured_bytes
    cases = [(f"{r}x{c}, {b}-bit values", (r, c, b), semi_structured_bytes(r, c, b))
             for r, c, b in [(4, 8, 16), (128, 512, 16), (4096, 4096, 16), (64, 64, 8)]]
    return run_check("bytes of a 2:4 matrix", fn, cases, forbid=(semi_structured_bytes,))


def check_sparsity_plan(fn: Callable[[nn.Module, float], dict[str, float]], model: nn.Module,
                        calibration: Tensor, val_tokens: Tensor, target: float = 0.6,
                        margin: float = 0.03, max_tokens: int = 16384) -> Verdict:
    """``fn(model, target) -> {layer: sparsity}`` for the Linear layers of ``model.blocks``:
    at least a share ``target`` of their weights must go (the budget), and Wanda with this plan
    must reach a validation perplexity at most ``(1 + margin)`` times that of the uniform plan."""
    from utils.lm import perplexity
    from utils.llm_pruning import default_layers, prune_wanda
    from utils.pruning import clone_model
    modules = dict(model.named_modules())
    names = default_layers(model)
    total = sum(modules[n].weight.numel() for n in names)
    print(f"check: per-layer sparsities, at least {target:.0%} of {total:,} weights pruned")
    try:
        got = fn(clone_model(model), target)
        ok = (isinstance(got, dict) and set(got) <= set(names)
              and all(isinstance(v, (int, float)) and 0 <= v < 1 for v in got.values()))
        plan = {n: float(got.get(n, 0.0)) for n in names} if ok else None
        detail = "" if ok else (" (return a dict {layer of model.blocks: sparsity in [0, 1)}, "
                                f"got {type(got).__name__})")
    except Exception as e:  # the reader's code may raise anything
        ok, plan, detail = False, None, f" (raised {type(e).__name__}: {e})"
    bad = not ok
    print(f"  {'FAIL' if bad else 'pass'}: a sparsity in [0, 1) for layers of model.blocks{detail}")
    if bad:
        print("  FAIL: budget (not checked)\n  FAIL: perplexity (not checked)")
        return Verdict(0, 3)
    pruned = sum(modules[n].weight.shape[0] * round(s * modules[n].weight.shape[1])
                 for n, s in plan.items())
    ok_budget = pruned >= math.ceil(target * total - 1e-9)
    print(f"  {'pass' if ok_budget else 'FAIL'}: budget: {pruned:,} weights pruned, "
          f"{pruned / total:.2%}")
    mine, uniform = clone_model(model), clone_model(model)
    prune_wanda(mine, calibration, sparsity=plan)
    prune_wanda(uniform, calibration, sparsity=target)
    p_mine = perplexity(mine, val_tokens, max_tokens)
    p_uni = perplexity(uniform, val_tokens, max_tokens)
    ok_ppl = p_mine <= (1 + margin) * p_uni
    print(f"  {'pass' if ok_ppl else 'FAIL'}: perplexity {p_mine:.3f} vs uniform {p_uni:.3f} "
          f"(allowed: {1 + margin:.2f}x)")
    return Verdict(1 + ok_budget + ok_ppl, 3)
