"""Benchmarks, runnable from the command line: ``python -m utils.kit.benchmark [--quick] [--json PATH]``.

(a) Global unstructured pruning of a ResNet-50-size model: ``utils.pruning`` vs the source's
    listing vs ``torch.nn.utils.prune``, time and peak extra memory, next to the floor of one
    read of all weights.
(b) Structured pruning that pays: a VGG-style CNN (CIFAR-size input) with half its channels
    cut out: MACs ratio and CPU latency ratio at batch 1 and 32; then VGG-16 the same way in
    three CPU runtimes (eager, folded and channels-last, ONNX Runtime).
(c) Unstructured pruning that pays only at high sparsity: dense vs masked vs CSR Linear layers,
    50 to 99 % sparse, batch 1 and 64: where CSR breaks even.
(d) The same on a GPU when there is one, plus 2:4 semi-structured sparsity where supported.
(e) Scale: global pruning in place of about a billion weights (16 Linear(8192, 8192)), time
    against one read of all weights and peak extra memory against the model's bytes.

Weights are random: values do not change the work. Candidates always run interleaved
(A B C A B C ...) and medians are reported, so noise on a shared machine hits all alike.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from utils.kit import source_listings
from utils.lab.measure import count_flops, csr_bytes, median_times, to_csr
from utils.lab.models import VGG
from utils.pruning import (
    clone_model,
    kernels,
    prune_structured,
    prune_unstructured,
    select_layers,
    semi_structured_mask,
    smallest_k,
)
from utils.pruning.surgery import shrink
from utils.pruning.threshold import tuning


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
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_extra_rss(fn: Callable[[], object]) -> tuple[float, int]:
    """Run ``fn``; return its wall time (s) and the peak resident memory above the start (bytes).

    On Linux the kernel's own peak (``VmHWM``) is reset first (``/proc/self/clear_refs``), so
    the peak is exact and nothing runs beside ``fn``; memory freed earlier is handed back to the
    system first (glibc's ``malloc_trim``), so that ``fn`` reusing it still counts. Elsewhere the process's lifetime peak
    (``getrusage``) is used: an upper bound when the process was larger before.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(
            0
        )  # hand freed memory back, so that reuse is not hidden
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base, read_peak = _status_kb("VmRSS") * 1024, lambda: _status_kb("VmHWM") * 1024
    except OSError:
        import resource

        scale = 1 if platform.system() == "Darwin" else 1024
        base, read_peak = 0, lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    return elapsed, max(0, read_peak() - base)


_DEFAULT_THREADS = torch.get_num_threads()  # before --threads changes it

PRUNERS: dict[str, Callable[[nn.Module, float], object]] = {
    "utils.pruning": lambda m, r: prune_unstructured(m, r, scope="global"),
    "source listing": source_listings.unstructured_pruning,
    "torch.nn.utils.prune": lambda m, r: torch_prune.global_unstructured(
        [(layer, "weight") for layer in select_layers(m).values()],
        pruning_method=torch_prune.L1Unstructured,
        amount=r,
    ),
}


def bench_prune_speed(model: nn.Module, ratio: float = 0.5, repeats: int = 3) -> dict:
    """(a): time and peak extra memory of each global pruner on fresh copies of ``model``.

    ``utils.pruning`` runs once untimed first (its lazy imports, loading its compiled loops: the
    others have none); then memory is measured once per pruner, which is every pruner's first
    call, and times are taken interleaved (one copy per pruner per repeat), medians reported.
    """
    weights = [m.weight.detach() for m in select_layers(model).values()]
    PRUNERS["utils.pruning"](copy.deepcopy(model), ratio)  # the one warm-up
    memory = {}
    for name, prune in PRUNERS.items():
        victim = copy.deepcopy(model)
        memory[name] = peak_extra_rss(lambda prune=prune, victim=victim: prune(victim, ratio))[1]
        del victim
    times: dict[str, list[float]] = {k: [] for k in PRUNERS}
    floor = []
    for _ in range(repeats):
        floor.append(_one_read(weights))
        for name, prune in PRUNERS.items():
            victim = copy.deepcopy(model)
            t0 = time.perf_counter()
            prune(victim, ratio)
            times[name].append(time.perf_counter() - t0)
            del victim
    ours = statistics.median(times["utils.pruning"])
    return {
        "weights": sum(w.numel() for w in weights),
        "ratio": ratio,
        "repeats": repeats,
        "one read of all weights (s)": statistics.median(floor),
        "pruners": {
            name: {
                "time_s": statistics.median(t),
                "peak_extra_mb": memory[name] / 2**20,
                "times_slower_than_utils": statistics.median(t) / ours,
            }
            for name, t in times.items()
        },
    }


_FIRST_CALL = """
import json, os, statistics, sys, time
import torch
if os.environ.get("PRUNING_BOOK_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["PRUNING_BOOK_BENCH_THREADS"]))
name, model, ratio = sys.argv[1], sys.argv[2], float(sys.argv[3])
torch.manual_seed(0)
if model == "resnet50":
    from torchvision.models import resnet50 as make
elif model == "lenet5":
    from utils.lab.models import LeNet5 as make
else:
    from utils.lab.models import VGG
    make = lambda: VGG(width=float(model.removeprefix("vgg")))
copies = [make() for _ in range(4)]
# each pruner's own imports, and no other (not timed): what a user's script would import
if name == "utils.pruning":
    from utils.pruning import prune_unstructured
    prune = lambda m, r: prune_unstructured(m, r, scope="global")
elif name == "source listing":
    from utils.kit.source_listings import unstructured_pruning as prune
else:
    from torch.nn.utils import prune as P
    from utils.pruning import select_layers  # the layers PRUNERS gives it (import not timed)
    def prune(m, r):
        layers = [(x, "weight") for x in select_layers(m).values()]
        P.global_unstructured(layers, pruning_method=P.L1Unstructured, amount=r)
times = []
for m in copies:
    t0 = time.perf_counter()
    prune(m, ratio)
    times.append(time.perf_counter() - t0)
print(json.dumps({"first": times[0], "warm": statistics.median(times[1:]),
                  "threads": torch.get_num_threads()}))
"""


def first_call_model(name: str) -> nn.Module:
    """The models of :func:`bench_first_call`, seeded."""
    torch.manual_seed(0)
    if name == "resnet50":
        from torchvision.models import resnet50

        return resnet50(weights=None)
    if name == "lenet5":
        from utils.lab.models import LeNet5

        return LeNet5()
    return VGG(width=float(name.removeprefix("vgg")))


def _fresh_process(code: str, *args: str, timeout: float = 600) -> dict:
    """Run ``code`` in a new Python process; its last output line, parsed as JSON."""
    import subprocess

    env = dict(os.environ)
    if torch.get_num_threads() != _DEFAULT_THREADS:  # --threads: the children use as many
        env["PRUNING_BOOK_BENCH_THREADS"] = str(torch.get_num_threads())
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if done.returncode:
        raise RuntimeError(f"the benchmark's child process failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_first_call(
    model: str = "resnet50", ratio: float = 0.5, repeats: int = 3, pruners=None
) -> dict:
    """(a) as a user meets it: each pruner's first call in a fresh Python process (its imports
    done and not timed, everything after them timed), and its warm call (the median of three
    more calls in that process). Processes run interleaved (A B C A B C ...), medians reported.

    The compiled loops of ``utils.pruning.kernels`` are built here first if this machine has
    not built them yet (a one-off per machine, reported apart); a fresh process loads them.
    """
    build = kernels.warm_up()  # building them if this machine has not, else loading them
    names = list(pruners or PRUNERS)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(repeats):
        for n in names:
            runs[n].append(_fresh_process(_FIRST_CALL, n, model, str(ratio)))
    row = {
        n: {k: statistics.median(r[k] for r in rs) for k in ("first", "warm")}
        for n, rs in runs.items()
    }
    ours = row.get("utils.pruning")
    for r in row.values():
        r["first call / utils first call"] = r["first"] / ours["first"] if ours else None
        r["first / warm"] = r["first"] / r["warm"]
    return {
        "model": model,
        "ratio": ratio,
        "repeats": repeats,
        "pruners": row,
        "loops": "compiled" if kernels.available() else f"eager ({kernels.why_not()})",
        "loading or building the loops in this process (s)": build,
    }


def print_first_call(r: dict) -> None:
    print(
        f"(a) first call in a fresh process, {r['model']}, global, ratio {r['ratio']} "
        f"(median of {r['repeats']} processes; utils loops: {r['loops']})"
    )
    for name, row in r["pruners"].items():
        vs = row["first call / utils first call"]
        print(
            f"    {name:22s} first {row['first'] * 1e3:8.1f} ms  warm {row['warm'] * 1e3:8.1f} ms"
            + (f"  first call {vs:5.1f}x utils' first call" if vs else "")
        )


def _one_read(weights: list[torch.Tensor]) -> float:
    """Seconds to read every weight once (a sum): the floor for any pruner."""
    t0 = time.perf_counter()
    for w in weights:
        w.sum()
    return time.perf_counter() - t0


def bench_large_inplace(
    layers: int = 16, width: int = 8192, ratio: float = 0.5, repeats: int = 3
) -> dict:
    """(e): one-shot global pruning in place of ``layers`` Linear(width, width) layers
    (16 x 8192 x 8192 is about a billion weights, 4.3 GB in float32): time against one read
    of all weights, and peak extra memory against the model's bytes.

    Run it in a fresh process (the command line does) to time a first call: loading the
    compiled loops (``utils.pruning.kernels``) is then part of the time; building them, once per
    machine, is not (the command line builds them first)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        *[nn.utils.skip_init(nn.Linear, width, width, bias=False) for _ in range(layers)]
    )
    with torch.no_grad():
        for m in model:
            m.weight.uniform_(-1, 1)
    weights = [m.weight.detach() for m in model]
    n = sum(w.numel() for w in weights)
    read = statistics.median(_one_read(weights) for _ in range(repeats))
    elapsed, extra = peak_extra_rss(lambda: prune_unstructured(model, ratio, inplace=True))
    zeros = sum(int(w.numel() - torch.count_nonzero(w)) for w in weights)
    model_bytes = n * weights[0].element_size()
    return {
        "layers": layers,
        "width": width,
        "weights": n,
        "ratio": ratio,
        "zeros": zeros,
        "compiled loops": kernels.available() and n >= tuning().kernels_from,
        "exact": zeros == round(ratio * n),
        "model_mb": model_bytes / 2**20,
        "one read of all weights (s)": read,
        "time_s": elapsed,
        "time / one read": elapsed / read,
        "peak_extra_mb": extra / 2**20,
        "peak extra / model bytes": extra / model_bytes,
    }


def print_large_inplace(r: dict) -> None:
    print(
        f"(e) prune_unstructured(inplace=True), global, ratio {r['ratio']}: {r['layers']} x Linear({r['width']}, "
        f"{r['width']}) = {r['weights']:,} weights, {r['model_mb']:,.0f} MB"
    )
    print(
        f"    {r['time_s']:.2f} s = {r['time / one read']:.1f}x one read of all weights "
        f"({r['one read of all weights (s)'] * 1e3:.0f} ms); peak extra memory {r['peak_extra_mb']:,.0f} MB = "
        f"{r['peak extra / model bytes']:.3f} of the model; exact count: {r['exact']}"
    )
    if r["compiled loops"]:
        print("    by the compiled loops of utils.pruning.kernels, loading them included")
    else:
        print(
            "    by eager torch ops (the compiled loops need a C compiler and at least "
            f"{tuning().kernels_from:,} weights)"
        )


def print_prune_speed(result: dict) -> None:
    print(
        f"(a) warm calls in this process: global unstructured pruning of {result['weights']:,} "
        f"weights at ratio {result['ratio']} (median of {result['repeats']})"
    )
    print(
        f"    floor, one read of all weights: {result['one read of all weights (s)'] * 1e3:8.1f} ms"
    )
    for name, row in result["pruners"].items():
        print(
            f"    {name:22s} {row['time_s'] * 1e3:8.1f} ms  {row['peak_extra_mb']:8.0f} MB extra  "
            f"{row['times_slower_than_utils']:6.1f}x utils"
        )


def bench_structured(
    width: float = 1.0,
    batches: tuple[int, ...] = (1, 32),
    repeats: int = 20,
    device: str | torch.device = "cpu",
    scope: str = "local",
    round_to: int = 1,
) -> list[dict]:
    """(b): dense vs masked vs shrunk VGG, half of the hidden layers' channels removed (of
    each layer: ``"local"``; of all together: ``"global"``, where the kept counts are uneven
    unless ``round_to`` rounds them)."""
    device = torch.device(device)
    torch.manual_seed(0)
    dense = VGG(width=width).eval()
    masked = clone_model(dense)
    prune_structured(masked, 0.5, scope=scope, round_to=round_to)
    small = shrink(masked).eval()
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 32, 32)
        macs = count_flops(dense, x) / count_flops(small, x)
        models = {
            k: m.to(device) for k, m in {"dense": dense, "masked": masked, "shrunk": small}.items()
        }
        xd = x.to(device)
        t = median_times(
            {k: (lambda m=m, xd=xd: m(xd)) for k, m in models.items()}, repeats, 2, device
        )
        rows.append(
            {
                "device": device.type,
                "width": width,
                "scope": scope,
                "round_to": round_to,
                "channels kept": "/".join(
                    str(m.out_channels) for m in small.modules() if isinstance(m, nn.Conv2d)
                ),
                "batch": batch,
                "MACs ratio": macs,
                "dense ms": t["dense"] * 1e3,
                "masked ms": t["masked"] * 1e3,
                "shrunk ms": t["shrunk"] * 1e3,
                "latency ratio": t["dense"] / t["shrunk"],
                "share of the MACs ratio": t["dense"] / t["shrunk"] / macs,
            }
        )
    for m in (dense, masked, small):
        m.to("cpu")
    return rows


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _cpu_runtimes(model: nn.Module, example: torch.Tensor, workdir: str) -> dict:
    """``model`` as three CPU runtimes run it: eager; eager with BatchNorm folded and the
    channels-last layout; ONNX Runtime (the exporter folds BatchNorm too)."""
    from utils.lab import deploy

    folded = deploy.fold_batchnorm(model).to(memory_format=torch.channels_last)
    path = deploy.export_onnx(
        model, example, f"{workdir}/{id(model)}-{torch.get_num_threads()}.onnx"
    )
    return {
        "eager": model,
        "eager, folded, channels-last": lambda x: folded(
            x.contiguous(memory_format=torch.channels_last)
        ),
        "ONNX Runtime": deploy.ort_runner(deploy.ort_session(path, torch.get_num_threads())),
    }


def bench_structured_runtimes(
    width: float = 1.0,
    batches: tuple[int, ...] = (1, 32),
    repeats: int = 30,
    threads: tuple[int, ...] | None = None,
) -> list[dict]:
    """(b) continued: VGG-16 (13 convolutions, 32x32 input), half of every layer's channels cut
    out by ``shrink``, dense against shrunk in three CPU runtimes at each thread count (default:
    one, and torch's current count). Costs that do not shrink with the MACs (4x here) weigh
    more on the small network: a fixed cost per operator and per call, and the passes over the
    activations (BatchNorm, ReLU, pooling), which shrink with the channels (2x); folding and
    fusing remove some of them. Outputs are checked against eager before any timing."""
    import tempfile

    torch.manual_seed(0)
    dense = VGG(VGG16_CFG, width=width).eval()
    masked = clone_model(dense)
    prune_structured(masked, 0.5, scope="local")
    small = shrink(masked).eval()
    before, rows = torch.get_num_threads(), []
    try:
        with tempfile.TemporaryDirectory() as workdir, torch.no_grad():
            for n in threads or sorted({1, before}):
                torch.set_num_threads(n)
                for row in _runtime_rows(dense, small, batches, repeats, workdir):
                    rows.append({"threads": n, "width": width, **row})
    finally:
        torch.set_num_threads(before)
    return rows


def _agrees(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-3) -> bool:
    """Within ``rel`` of the reference's largest magnitude: random networks' logits are tiny, so
    an absolute tolerance would pass anything."""
    return got.shape == want.shape and bool((got - want).abs().max() <= rel * want.abs().max())


def _runtime_rows(
    dense: nn.Module, small: nn.Module, batches: tuple[int, ...], repeats: int, workdir: str
) -> list[dict]:
    """Dense against shrunk, interleaved within each runtime, at the current thread count."""
    example = torch.randn(max(batches), 3, 32, 32)
    runs = {k: _cpu_runtimes(m, example, workdir) for k, m in (("d", dense), ("s", small))}
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 32, 32)
        macs = count_flops(dense, x) / count_flops(small, x)
        for runtime in runs["d"]:
            for k, m in (("d", dense), ("s", small)):
                want = m(x)  # eager is the reference; the other runtimes must agree with it
                if runtime != "eager" and not _agrees(runs[k][runtime](x), want):
                    raise RuntimeError(f"{runtime} computes another function than eager")
            t = median_times(
                {k: (lambda f=r[runtime], x=x: f(x)) for k, r in runs.items()}, repeats, 3
            )
            rows.append(
                {
                    "runtime": runtime,
                    "batch": batch,
                    "MACs ratio": macs,
                    "dense ms": t["d"] * 1e3,
                    "shrunk ms": t["s"] * 1e3,
                    "latency ratio": t["d"] / t["s"],
                    "share of the MACs ratio": t["d"] / t["s"] / macs,
                }
            )
    return rows


def bench_sparse_linear(
    widths: tuple[int, ...] = (1024, 4096),
    batches: tuple[int, ...] = (1, 64),
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99),
    repeats: int = 7,
    device: str | torch.device = "cpu",
) -> list[dict]:
    """(c): y = x W^T with W dense, masked (original * mask each call, as a mask parametrization
    does) or CSR.

    Each shape (width, batch) is warmed up first, and its dense time is the median over all its
    rows (one dense time per shape, from ``len(sparsities)`` times more calls), so that a cold
    first row does not tilt the ratios.
    """
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    rows, dense = [], {}
    for n in widths:
        w = torch.randn(n, n, generator=g)
        xs = {b: torch.randn(b, n, generator=g).to(device) for b in batches}
        wd = w.to(device)
        median_times(
            {b: (lambda x=x, wd=wd: F.linear(x, wd)) for b, x in xs.items()}, 10, 5, device
        )
        for s in sparsities:
            mask = ~smallest_k(w.abs(), round(s * w.numel()))
            wm = (w * mask).to(device)
            md = mask.to(device=device, dtype=w.dtype)
            csr = to_csr(wm)
            for batch, x in xs.items():
                t = median_times(
                    {
                        "dense": lambda x=x, wd=wd: F.linear(x, wd),
                        "masked": lambda x=x, wd=wd, md=md: F.linear(x, wd * md),
                        "csr": lambda x=x, csr=csr: (csr @ x.t()).t(),
                    },
                    repeats,
                    2,
                    device,
                )
                dense.setdefault((n, batch), []).append(t["dense"])
                rows.append(
                    {
                        "device": device.type,
                        "width": n,
                        "batch": batch,
                        "sparsity": s,
                        "masked": t["masked"],
                        "csr": t["csr"],
                        "csr bytes / dense bytes": csr_bytes(wm.cpu()) / (4 * n * n),
                    }
                )
    out = []
    for r in rows:  # one dense time per shape
        d = statistics.median(dense[(r["width"], r["batch"])])
        keys = ("device", "width", "batch", "sparsity")
        out.append(
            {k: r[k] for k in keys}
            | {"dense ms": d * 1e3, "masked / dense": r["masked"] / d, "csr / dense": r["csr"] / d}
            | {"csr bytes / dense bytes": r["csr bytes / dense bytes"]}
        )
    return out


def break_even(rows: list[dict]) -> dict[str, float | None]:
    """Lowest sparsity at which CSR beat dense, per (device, width, batch); None if it never did."""
    out: dict[str, float | None] = {}
    for r in rows:
        key = f"{r['device']} width {r['width']} batch {r['batch']}"
        out.setdefault(key, None)
        if r["csr / dense"] < 1 and (out[key] is None or r["sparsity"] < out[key]):
            out[key] = r["sparsity"]
    return out


def bench_semi_structured(
    n: int = 4096, batches: tuple[int, ...] = (64, 1024), repeats: int = 20
) -> dict:
    """(d): dense fp16 vs 2:4 semi-structured fp16 Linear on a supporting GPU, else why not."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA GPU"}
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return {
            "skipped": f"2:4 sparse tensor cores need compute capability 8.0+, this GPU has {major}.x"
        }
    from torch.sparse import to_sparse_semi_structured

    device = torch.device("cuda")
    w = torch.randn(n, n, device=device, dtype=torch.float16)
    w24 = w * semi_structured_mask(w).to(w.dtype)
    sparse = to_sparse_semi_structured(w24)
    rows = []
    for batch in batches:
        x = torch.randn(batch, n, device=device, dtype=torch.float16)
        t = median_times(
            {"dense": lambda x=x: F.linear(x, w24), "2:4": lambda x=x: F.linear(x, sparse)},
            repeats,
            2,
            device,
        )
        rows.append(
            {
                "batch": batch,
                "dense ms": t["dense"] * 1e3,
                "2:4 ms": t["2:4"] * 1e3,
                "speedup": t["dense"] / t["2:4"],
                "max abs difference": float((F.linear(x, w24) - F.linear(x, sparse)).abs().max()),
            }
        )
    return {"gpu": torch.cuda.get_device_name(0), "width": n, "rows": rows}


def _print_rows(title: str, rows: list[dict]) -> None:
    import pandas as pd

    print(title)
    print(pd.DataFrame(rows).round(3).to_string(index=False))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small models, few repeats (for tests)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--only", default="abcde", help="which parts to run, e.g. 'bc' (default: abcde)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="override the number of repeats of (a)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results: dict = {"machine": machine(), "quick": args.quick}
    print("machine:", ", ".join(f"{k}={v}" for k, v in results["machine"].items()))
    q = args.quick
    if "a" in args.only:
        big, repeats = ("vgg0.25", args.repeats or 1) if q else ("resnet50", args.repeats or 3)
        results["first_call"] = bench_first_call(big, repeats=repeats)
        print_first_call(results["first_call"])
        results["first_call_small"] = bench_first_call(
            "lenet5", repeats=repeats, pruners=["utils.pruning"]
        )
        print_first_call(results["first_call_small"])
        results["prune_speed"] = bench_prune_speed(first_call_model(big), repeats=repeats + 2)
        print_prune_speed(results["prune_speed"])
    if "b" in args.only:
        results["structured"] = [
            r
            for width in ((0.25,) if q else (1.0, 2.0))
            for scope, round_to in (("local", 1), ("global", 1), ("global", 8))
            for r in bench_structured(
                width, (1, 2) if q else (1, 32), 2 if q else 20, scope=scope, round_to=round_to
            )
        ]
        _print_rows(
            "(b) VGG, half the channels cut out (ratios: dense / shrunk)", results["structured"]
        )
        results["structured_runtimes"] = bench_structured_runtimes(
            0.25 if q else 1.0, (1, 2) if q else (1, 32), 2 if q else 30
        )
        _print_rows(
            "(b) VGG-16, half the channels cut out, in three CPU runtimes (dense / shrunk)",
            results["structured_runtimes"],
        )
    if "c" in args.only:
        results["sparse_linear"] = bench_sparse_linear(
            (256,) if q else (1024, 4096),
            (1, 8) if q else (1, 64),
            (0.5, 0.99) if q else (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99),
            2 if q else 7,
        )
        results["break_even"] = break_even(results["sparse_linear"])
        _print_rows("(c) Linear layer, dense vs masked vs CSR", results["sparse_linear"])
        print("    CSR breaks even at sparsity:", results["break_even"])
    if "d" in args.only:
        if torch.cuda.is_available():
            results["gpu_structured"] = bench_structured(
                0.25 if q else 1.0, (1, 32), 3 if q else 50, device="cuda"
            )
            results["gpu_sparse_linear"] = bench_sparse_linear(
                (1024,) if q else (1024, 4096),
                (1, 64),
                (0.5, 0.9, 0.99),
                3 if q else 20,
                device="cuda",
            )
            results["gpu_break_even"] = break_even(results["gpu_sparse_linear"])
            _print_rows("(d) GPU: VGG, half the channels cut out", results["gpu_structured"])
            _print_rows(
                "(d) GPU: Linear layer, dense vs masked vs CSR", results["gpu_sparse_linear"]
            )
        results["semi_structured"] = bench_semi_structured(1024 if q else 4096)
        if "skipped" in results["semi_structured"]:
            print(f"(d) GPU part skipped: {results['semi_structured']['skipped']}")
        else:
            _print_rows(
                f"(d) 2:4 on {results['semi_structured']['gpu']}",
                results["semi_structured"]["rows"],
            )
    if "e" in args.only:
        if kernels.available():
            kernels.warm_up()  # built once per machine, before the fresh process loads them
        layers, width = (4, 256) if q else (16, 8192)
        results["large_inplace"] = _fresh_process(
            "import json; from utils.kit.benchmark import bench_large_inplace as b; "
            f"print(json.dumps(b({layers}, {width}, repeats={1 if q else 3})))"
        )
        print_large_inplace(results["large_inplace"])
    return save_results(results, args.json)


def save_results(results: dict, path: str | None) -> dict:
    """Write ``results`` as JSON to ``path`` when one is given; return them."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
