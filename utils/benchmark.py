"""Benchmarks, runnable from the command line: ``python -m utils.benchmark [--quick] [--json PATH]``.

(a) Global unstructured pruning of a ResNet-50-size model (random weights: values do not
change the work): ``utils.pruning`` vs the seed's listing vs ``torch.nn.utils.prune``,
time and peak extra memory, next to the floor of one read of all weights. Candidates run
interleaved (A B C A B C ...) on fresh copies; medians are reported.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import threading
import time
from collections.abc import Callable

import psutil
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from utils import seed_listings
from utils.pruning import prune_unstructured


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": psutil.cpu_count(logical=True), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def peak_extra_rss(fn: Callable[[], object], interval: float = 0.002) -> tuple[float, int]:
    """Run ``fn``; return its wall time (s) and the peak resident memory above the start (bytes).

    A thread samples the process's RSS every ``interval`` seconds: an estimate, good to
    a few MB, enough to tell 100 MB from 2 GB.
    """
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = base, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(interval)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    done.set()
    watcher.join()
    return elapsed, max(peak, proc.memory_info().rss) - base


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


PRUNERS: dict[str, Callable[[nn.Module, float], object]] = {
    "utils.pruning": lambda m, r: prune_unstructured(m, r, scope="global"),
    "seed listing": seed_listings.unstructured_pruning,
    "torch.nn.utils.prune": lambda m, r: torch_prune.global_unstructured(
        [(layer, "weight") for layer in _layers(m)], pruning_method=torch_prune.L1Unstructured, amount=r),
}


def bench_prune_speed(model: nn.Module, ratio: float = 0.5, repeats: int = 3) -> dict:
    """(a): time and peak extra memory of each global pruner on fresh copies of ``model``.

    Memory is sampled in one separate pass, so that the sampling thread does not slow the
    timed runs (on 2 cores it would).
    """
    weights = [m.weight.detach() for m in _layers(model)]
    memory = {}
    for name, prune in PRUNERS.items():
        victim = copy.deepcopy(model)
        memory[name] = peak_extra_rss(lambda: prune(victim, ratio))[1]
        del victim
    times: dict[str, list[float]] = {k: [] for k in PRUNERS}
    floor = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in weights:
            w.sum()
        floor.append(time.perf_counter() - t0)
        for name, prune in PRUNERS.items():
            victim = copy.deepcopy(model)
            t0 = time.perf_counter()
            prune(victim, ratio)
            times[name].append(time.perf_counter() - t0)
            del victim
    ours = statistics.median(times["utils.pruning"])
    return {"weights": sum(w.numel() for w in weights), "ratio": ratio, "repeats": repeats,
            "one read of all weights (s)": statistics.median(floor),
            "pruners": {name: {"time_s": statistics.median(t), "peak_extra_mb": memory[name] / 2**20,
                               "times_slower_than_utils": statistics.median(t) / ours}
                        for name, t in times.items()}}


def print_prune_speed(result: dict) -> None:
    print(f"(a) global unstructured pruning of {result['weights']:,} weights at ratio {result['ratio']} "
          f"(median of {result['repeats']})")
    print(f"    floor, one read of all weights: {result['one read of all weights (s)'] * 1e3:8.1f} ms")
    for name, row in result["pruners"].items():
        print(f"    {name:22s} {row['time_s'] * 1e3:8.1f} ms  {row['peak_extra_mb']:8.0f} MB extra  "
              f"{row['times_slower_than_utils']:6.1f}x utils")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model and one repeat (for tests)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        from utils.models import VGG
        model, repeats = VGG(width=0.25), args.repeats or 1
    else:
        from torchvision.models import resnet50
        model, repeats = resnet50(weights=None), args.repeats or 3
    results = {"machine": machine(), "quick": args.quick}
    print("machine:", ", ".join(f"{k}={v}" for k, v in results["machine"].items()))
    results["prune_speed"] = bench_prune_speed(model, repeats=repeats)
    print_prune_speed(results["prune_speed"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
