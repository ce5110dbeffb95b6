"""Checks for the exercises of chapter 9 (pruning language models), in the style of
:mod:`utils.kit.checks`: run the reader's function on fixed small inputs, print pass/FAIL per case,
return a :class:`~utils.kit.checks.Verdict`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from utils.kit.checks import Verdict, run_check


def check_wanda_score(fn: Callable[[Tensor, Tensor], Tensor]) -> Verdict:
    """``fn(weight, inputs) -> |W_ij| * ||X_j||_2``: ``inputs`` holds one row per token (any
    leading shape), ``X_j`` is input feature ``j`` over all tokens. The expected values are
    computed here with plain tensor operations, not with :mod:`utils.pruning.llm`."""
    g = torch.Generator().manual_seed(9)
    outlier = torch.randn(10, 6, generator=g)
    outlier[:, 2] *= 100
    cases_in = {
        "hand-made 2x2": (
            torch.tensor([[1.0, -2.0], [3.0, 0.5]]),
            torch.tensor([[3.0, 0.0], [4.0, 1.0]]),
        ),
        "random 4x6, 10 tokens": (torch.randn(4, 6, generator=g), torch.randn(10, 6, generator=g)),
        "inputs shaped (batch, time, features)": (
            torch.randn(3, 6, generator=g),
            torch.randn(2, 5, 6, generator=g),
        ),
        "one outlier feature": (torch.randn(4, 6, generator=g), outlier),
    }
    cases = []
    for name, (w, x) in cases_in.items():
        flat = x.reshape(-1, x.shape[-1])
        want = w.abs() * (flat * flat).sum(dim=0).sqrt()[None, :]
        cases.append((name, (w.clone(), x.clone()), want))

    def scaled(w: Tensor, x: Tensor) -> Any:  # any tensor-like result, compared in float64
        out = fn(w, x)
        return None if out is None else torch.as_tensor(out).double()

    from utils.pruning import llm

    blocked = (llm.wanda_scores, llm.InputStats)
    return run_check("Wanda score", scaled, cases, atol=1e-3, forbid=blocked)


def check_semi_structured_bytes(fn: Callable[[int, int, int], int]) -> Verdict:
    """``fn(rows, cols, bits) -> bytes`` of a 2:4 sparse matrix: the kept half of the values
    at ``bits`` each plus a 2-bit position per kept value."""
    from utils.pruning.llm import semi_structured_bytes

    cases = [
        (f"{r}x{c}, {b}-bit values", (r, c, b), semi_structured_bytes(r, c, b))
        for r, c, b in [(4, 8, 16), (128, 512, 16), (4096, 4096, 16), (64, 64, 8)]
    ]
    return run_check("bytes of a 2:4 matrix", fn, cases, forbid=(semi_structured_bytes,))


def check_sparsity_plan(
    fn: Callable[[nn.Module, float], dict[str, float]],
    model: nn.Module,
    calibrations: Sequence[Tensor],
    target: float = 0.6,
    min_gain: float = 0.01,
    max_tokens: int = 16384,
) -> Verdict:
    """``fn(model, target) -> {layer: sparsity}`` for the Linear layers of ``model.blocks`` (a
    ``CharLM`` trained on Tiny Shakespeare): at least a share ``target`` of their weights must go
    (the budget), and the plan must be *measurably better* than the uniform one.

    Both plans are pruned with Wanda once per calibration set in ``calibrations`` (at least 3)
    and scored on validation text the chapter never shows: the third block of ``max_tokens`` + 1
    characters of the validation split (the first two are the chapter's evaluation and tuning
    text; the zoo chose the model's training step on the last block). Each output row of a
    layer loses ``round(sparsity * columns)`` weights, and the budget counts them that way. The plan passes if its worst perplexity is below the uniform plan's
    best and its mean is lower by more than both spreads (max - min over the calibration sets)
    and by at least ``min_gain`` of the uniform mean."""
    from utils.lab.lm import char_data, perplexity
    from utils.pruning import clone_model
    from utils.pruning.llm import default_layers, prune_wanda

    if len(calibrations) < 3:
        raise ValueError("give at least 3 calibration sets, so that the spread can be measured")
    modules = dict(model.named_modules())
    names = default_layers(model)
    total = sum(modules[n].weight.numel() for n in names)
    print(f"check: per-layer sparsities, at least {target:.0%} of {total:,} weights pruned")
    try:
        got = fn(clone_model(model), target)
        ok = (
            isinstance(got, dict)
            and set(got) <= set(names)
            and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
                for v in got.values()
            )
        )
        plan = {n: float(got.get(n, 0.0)) for n in names} if ok else None
        detail = (
            ""
            if ok
            else (
                " (return a dict {layer of model.blocks: sparsity in [0, 1)}, "
                f"got {type(got).__name__})"
            )
        )
    except Exception as e:  # the reader's code may raise anything
        ok, plan, detail = False, None, f" (raised {type(e).__name__}: {e})"
    bad = not ok
    print(f"  {'FAIL' if bad else 'pass'}: a sparsity in [0, 1) for layers of model.blocks{detail}")
    if bad:
        print("  FAIL: budget (not checked)\n  FAIL: perplexity (not checked)")
        return Verdict(0, 3)
    pruned = sum(
        modules[n].weight.shape[0] * round(s * modules[n].weight.shape[1]) for n, s in plan.items()
    )
    need = math.ceil(target * total - 1e-9)
    ok_budget = pruned >= need
    print(
        f"  {'pass' if ok_budget else 'FAIL'}: budget: {pruned:,} weights pruned, "
        f"{pruned / total:.2%} (need at least {need:,}; each row loses round(sparsity * columns))"
    )
    block = max_tokens + 1
    held_out = char_data().val[2 * block : 3 * block]
    ppl: dict[str, list[float]] = {"yours": [], "uniform": []}
    for calib in calibrations:
        for kind, sparsity in (("yours", plan), ("uniform", target)):
            m = clone_model(model)
            prune_wanda(m, calib, sparsity=sparsity)
            ppl[kind].append(perplexity(m, held_out, max_tokens))
    mine, uni = torch.tensor(ppl["yours"]), torch.tensor(ppl["uniform"])
    spread = max(float(mine.max() - mine.min()), float(uni.max() - uni.min()))
    gap = float(uni.mean() - mine.mean())
    ok_ppl = (
        ok_budget
        and float(mine.max()) < float(uni.min())
        and gap > spread
        and gap >= min_gain * float(uni.mean())
    )
    print(
        f"  {'pass' if ok_ppl else 'FAIL'}: held-out perplexity {float(mine.mean()):.3f} "
        f"(range {float(mine.min()):.3f}-{float(mine.max()):.3f}) vs uniform "
        f"{float(uni.mean()):.3f} (range {float(uni.min()):.3f}-{float(uni.max()):.3f}) over "
        f"{len(calibrations)} calibration sets; needed: lower by more than the spread "
        f"{spread:.3f} and by at least {min_gain:.0%}"
        + ("" if ok_budget else " (and the budget met)")
    )
    return Verdict(1 + ok_budget + ok_ppl, 3)
