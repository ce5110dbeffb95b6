"""Counting and timing: parameters, FLOPs, latency (interleaved, medians), bytes."""
from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from utils.pruning import effective_weight


def count_params(model: nn.Module, nonzero: bool = False) -> int:
    """Number of parameters; with ``nonzero=True`` only those that are not (masked to) zero."""
    if not nonzero:
        return sum(p.numel() for p in model.parameters())
    total = 0
    with torch.no_grad():
        for m in model.modules():
            for name, p in m.named_parameters(recurse=False):
                base = name[:-5] if name.endswith("_orig") else name
                total += int((effective_weight(m, base) != 0).sum())
    return total


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example`` (``torch.utils.flop_counter``; 1 MAC = 2 FLOPs).

    Counts dense work: a masked zero still costs its multiply, as it does on the hardware.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    model.train(was_training)
    return counter.get_total_flops()


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size of the model file."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def time_interleaved(candidates: dict[str, Callable[[], object]], repeats: int = 20,
                     warmup: int = 3) -> dict[str, list[float]]:
    """Wall times (s) of each candidate, run A B C A B C ... so that noise hits all alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def latency(models: dict[str, nn.Module], example: torch.Tensor, repeats: int = 20,
            warmup: int = 3) -> dict[str, float]:
    """Median forward latency (s) of each model on ``example``, measured interleaved."""
    for m in models.values():
        m.eval()

    def runner(m: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return m(example)
        return run

    times = time_interleaved({k: runner(m) for k, m in models.items()}, repeats, warmup)
    return {k: statistics.median(v) for k, v in times.items()}
