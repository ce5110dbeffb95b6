"""Counting and timing: parameters, FLOPs, latency (interleaved, medians), bytes."""

from __future__ import annotations

import io
import os
import statistics
import time
import warnings
import zlib
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from utils.pruning import effective_weight, masks, select_layers, weight_tensors
from utils.pruning.modes import eval_mode


def use_threads(n: int | None = None) -> int:
    """Set torch's CPU threads (default: all cores) and return the number, to print with timings."""
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return torch.get_num_threads()


def count_params(model: nn.Module, nonzero: bool = False) -> int:
    """Number of parameters; with ``nonzero=True`` only those that are not (masked to) zero."""
    if not nonzero:
        return sum(p.numel() for p in model.parameters())
    total, seen = 0, set()  # a tensor shared by several modules, or computed from two, counts once
    with torch.no_grad():
        for _, m, name, p in masks.own_tensors(model):
            if id(p) not in seen and (id(m), name) not in seen:
                seen |= {id(p), (id(m), name)}
                total += int((effective_weight(m, name) != 0).sum())
    return total


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example`` (``torch.utils.flop_counter``; 1 MAC = 2 FLOPs).

    Counts dense work: a masked zero still costs its multiply, as it does on the hardware.
    """
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return counter.get_total_flops()


def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Dense multiply-accumulates of each Linear/conv layer for one forward pass on ``example``.

    Read from ``torch.utils.flop_counter`` (1 MAC = 2 FLOPs), per module; a layer called
    twice counts twice.
    """
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    prefix = type(model).__name__ + "."
    flops = {
        k[len(prefix) :]: sum(v.values())
        for k, v in counter.get_flop_counts().items()
        if k.startswith(prefix)
    }
    return {name: flops.get(name, 0) // 2 for name in select_layers(model)}


def to_csr(weight: torch.Tensor, index_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``weight`` (2-D) in PyTorch's CSR format, with ``index_dtype`` column indices and row
    pointers.

    PyTorch builds CSR with int64 indices and also accepts int32 (both index tensors share one
    dtype). Every part gets its own storage: ``to_sparse_csr`` leaves the column indices a view
    into a twice larger buffer, which ``torch.save`` (it writes whole storages) would store too.
    PyTorch warns that sparse CSR support is in beta; that warning is silenced here on purpose.
    """
    if index_dtype not in (torch.int64, torch.int32):
        raise ValueError(f"CSR indices are torch.int64 or torch.int32, not {index_dtype}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = weight.detach().to_sparse_csr()
        return torch.sparse_csr_tensor(
            csr.crow_indices().to(index_dtype, copy=True),
            csr.col_indices().to(index_dtype, copy=True),
            csr.values().clone(),
            csr.shape,
            check_invariants=False,
        )  # valid: copied from a CSR


def csr_index_bytes(csr: torch.Tensor) -> int:
    """Bytes of the indices of a CSR tensor: one column index per stored value, and rows + 1 row
    pointers."""
    return sum(t.numel() * t.element_size() for t in (csr.col_indices(), csr.crow_indices()))


def csr_bytes(weight: torch.Tensor, index_dtype: torch.dtype = torch.int64) -> int:
    """Bytes of ``weight`` (2-D) in CSR: values, column indices, row pointers."""
    csr = to_csr(weight, index_dtype)
    return csr.values().numel() * csr.values().element_size() + csr_index_bytes(csr)


def count_weights(model: nn.Module, nonzero: bool = False) -> int:
    """Weights of the Linear and conv layers (biases excluded; a tied tensor counts once),
    optionally only the non-zero ones."""
    tensors = weight_tensors(model, select_layers(model), check_shared=False)
    with torch.no_grad():
        weights = [effective_weight(t.modules[0]) for t in tensors]
        return sum(int(torch.count_nonzero(w)) if nonzero else w.numel() for w in weights)


def effective_macs(model: nn.Module, example: torch.Tensor) -> float:
    """MACs left if every zero weight were skipped: each layer's dense MACs times its density.

    An upper bound on what sparse kernels could save; dense kernels do the full ``layer_macs``.
    """
    macs = layer_macs(model, example)
    modules = dict(model.named_modules())
    with torch.no_grad():
        return sum(
            n * float((effective_weight(modules[k]) != 0).float().mean()) for k, n in macs.items()
        )


def saved_bytes(obj: object) -> bytes:
    """What ``torch.save(obj)`` writes (for a state_dict: the model file), kept in memory."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def file_sizes(obj: object) -> dict[str, float]:
    """KB of ``torch.save(obj)``, raw and compressed with DEFLATE (zlib level 9, as in a .zip)."""
    raw = saved_bytes(obj)
    return {"KB": len(raw) / 1e3, "KB zipped": len(zlib.compress(raw, 9)) / 1e3}


def time_interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 3
) -> dict[str, list[float]]:
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


def median_times(
    candidates: dict[str, Callable[[], object]],
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Median wall time (s) of each candidate under ``no_grad``, interleaved; on a GPU each call
    is followed by a synchronize, so that the timer sees the finished work."""
    device = torch.device(device)

    def synced(fn: Callable[[], object]) -> Callable[[], object]:
        if device.type != "cuda":
            return fn
        return lambda: (fn(), torch.cuda.synchronize(device))

    with torch.no_grad():
        times = time_interleaved({k: synced(f) for k, f in candidates.items()}, repeats, warmup)
    return {k: statistics.median(v) for k, v in times.items()}


def latency(
    models: dict[str, nn.Module], example: torch.Tensor, repeats: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median forward latency (s) of each model on ``example``, measured interleaved."""
    for m in models.values():
        m.eval()
    return median_times(
        {k: (lambda m=m: m(example)) for k, m in models.items()},
        repeats,
        warmup,
        device=example.device,
    )
