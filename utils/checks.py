"""Automatic checks for the exercises: run the reader's function on fixed small inputs.

Each ``check_*`` prints one line per case and returns a :class:`Verdict`: true when every
case passes (so a cell can ``assert`` it), shown as a one-line summary in a notebook. The expected answers come from
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


class Verdict:
    """The result of a check: true when every case passed; its repr is a one-line summary."""

    def __init__(self, passed: int, total: int) -> None:
        self.passed, self.total = passed, total

    def __bool__(self) -> bool:
        return self.passed == self.total

    def __repr__(self) -> str:
        if self:
            return f"all {self.total} cases pass"
        return f"{self.passed} of {self.total} cases pass: fix the FAIL lines above"


def run_check(title: str, fn: Callable[..., Any], cases: Sequence[tuple[str, tuple, Any]],
              atol: float = 1e-6) -> Verdict:
    """Call ``fn(*args)`` for each ``(label, args, expected)`` and print pass/fail per case."""
    print(f"check: {title}")
    passed = 0
    for label, args, want in cases:
        try:
            got = fn(*args)
            ok = _same(got, want, atol)
            detail = "" if ok else f" (expected {want!r}, got {got!r})"
            if got is None:
                detail = " (got None: does your function return its result?)"
        except Exception as e:  # the reader's code may raise anything; report it, do not crash
            ok, detail = False, f" (raised {type(e).__name__}: {e})"
        passed += ok
        print(f"  {'pass' if ok else 'FAIL'}: {label}{detail if len(detail) < 300 else ' (wrong result)'}")
    return Verdict(passed, len(cases))


def _tensors() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"random 4x6": torch.randn(4, 6, generator=g),
            "ties 3x4": torch.tensor([[1., -1., 2., 0.], [0., 1., -2., 1.], [3., 0., 1., -1.]]),
            "conv 3x2x3x3": torch.randn(3, 2, 3, 3, generator=g)}


def check_unstructured_mask(fn: Callable[[Tensor, float], Tensor]) -> Verdict:
    """``fn(weight, ratio) -> bool mask`` (True = kept) that zeroes exactly round(ratio*n) weights,
    the smallest |w| first, ties to the earliest position (equation 3.1 with an exact threshold)."""
    cases = []
    for name, w in _tensors().items():
        for r in (0.0, 0.25, 0.5, 0.9):
            want = ~smallest_k(w.abs(), round(r * w.numel()))
            cases.append((f"{name}, ratio {r}", (w.clone(), r), want))
    return run_check("unstructured magnitude mask", fn, cases)


def check_row_norms(fn: Callable[[Tensor, float], Tensor]) -> Verdict:
    """``fn(weight, p) -> one L_p norm per output unit`` (row of a Linear, filter of a Conv2d)."""
    cases = []
    for name, w in _tensors().items():
        for p in (1.0, 2.0):
            want = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), ord=p, dim=1)
            cases.append((f"{name}, p={p}", (w.clone(), p), want))
    return run_check("L_p norm of each output unit", fn, cases, atol=1e-5)


def check_sparsity(fn: Callable[[Tensor], float]) -> Verdict:
    """``fn(tensor) -> fraction of zero entries`` as a float in [0, 1]."""
    cases = [(name, (w.clone(),), float((w == 0).sum()) / w.numel()) for name, w in _tensors().items()]
    cases.append(("all zeros", (torch.zeros(5, 5),), 1.0))
    return run_check("sparsity of a tensor", fn, cases)


# ----------------------------------------------------------------------------- chapter 1
def check_count_weights(fn: Callable[[torch.nn.Module], int]) -> Verdict:
    """``fn(model) -> number of weights in its Conv2d and Linear layers`` (biases excluded)."""
    from utils.models import LeNet5, LeNet300100, VGG
    cases = []
    for name, model in {"LeNet5": LeNet5(), "LeNet300100": LeNet300100(), "VGG(width=0.25)": VGG(width=0.25)}.items():
        want = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
        cases.append((name, (model,), want))
    return run_check("weights of Conv2d and Linear layers", fn, cases)


def check_model_megabytes(fn: Callable[[int, int], float]) -> Verdict:
    """``fn(n_params, bits) -> size in megabytes (10**6 bytes)`` of the raw values."""
    cases = [(f"{n:,} params at {b} bits", (n, b), n * b / 8 / 1e6)
             for n, b in [(61_706, 32), (25_557_032, 32), (25_557_032, 8), (1_000_000, 4)]]
    return run_check("model size in MB", fn, cases)


def check_conv_macs(fn: Callable[[int, int, int, int, int], int]) -> Verdict:
    """``fn(c_in, c_out, k, h_out, w_out) -> multiply-accumulates`` of a k x k Conv2d (groups=1)."""
    from utils.measure import count_flops
    cases = []
    for c_in, c_out, k, h, w in [(1, 6, 5, 28, 28), (6, 16, 5, 10, 10), (64, 128, 3, 16, 16), (3, 8, 1, 7, 9)]:
        conv = torch.nn.Conv2d(c_in, c_out, k, bias=False)
        want = count_flops(conv, torch.zeros(1, c_in, h + k - 1, w + k - 1)) // 2
        cases.append((f"conv {c_in}->{c_out}, {k}x{k}, out {h}x{w}", (c_in, c_out, k, h, w), want))
    return run_check("MACs of a convolution", fn, cases)


# ----------------------------------------------------------------------------- chapter 2
def check_compression_ratio(fn: Callable[[float], float]) -> Verdict:
    """``fn(sparsity) -> compression ratio`` = weights before / weights kept."""
    cases = [(f"sparsity {s}", (s,), 1 / (1 - s)) for s in (0.0, 0.5, 0.9, 0.92, 0.99)]
    return run_check("compression ratio", fn, cases, atol=1e-9)


def check_local_counts(fn: Callable[[Sequence[int], float], list[int]]) -> Verdict:
    """``fn(layer_sizes, ratio) -> weights pruned in each layer`` under local pruning."""
    cases = [(f"sizes {s}, ratio {r}", (list(s), r), [round(r * n) for n in s])
             for s, r in [((150, 2400, 48000), 0.5), ((10, 10), 0.25), ((7, 3, 1), 0.9), ((100,), 0.0)]]
    return run_check("weights pruned per layer (local)", fn, cases)


def check_theoretical_speedup(fn: Callable[[Sequence[int], Sequence[float]], float]) -> Verdict:
    """``fn(macs_per_layer, density_per_layer) -> dense MACs / MACs left`` when zeros are skipped."""
    cases = [(f"macs {m}, density {d}", (list(m), list(d)), sum(m) / sum(a * b for a, b in zip(m, d)))
             for m, d in [((100, 100), (0.5, 0.5)), ((117600, 240000, 48000), (1.0, 0.2, 0.05)),
                          ((10,), (0.1,))]]
    return run_check("theoretical speedup", fn, cases, atol=1e-9)


# ----------------------------------------------------------------------------- chapter 3
def check_structured_mask(fn: Callable[[Tensor, float, float], Tensor]) -> Verdict:
    """``fn(weight, ratio, p) -> bool per output unit`` (True = kept): the round(ratio * units)
    units with the smallest L_p norm are removed, ties to the earliest unit."""
    cases = []
    for name, w in _tensors().items():
        for r, p in [(0.34, 2.0), (0.5, 1.0), (0.0, 2.0)]:
            norms = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), ord=p, dim=1)
            cases.append((f"{name}, ratio {r}, p={p}", (w.clone(), r, p), ~smallest_k(norms, round(r * w.shape[0]))))
    return run_check("structured (unit) mask", fn, cases)


# ----------------------------------------------------------------------------- chapter 4.1
def check_global_threshold(fn: Callable[[list[Tensor], float], float]) -> Verdict:
    """``fn(weights, ratio) -> theta``: the k-th smallest |w| over all tensors, k = round(ratio * n)
    (k >= 1), so that pruning ``|w| <= theta`` removes k weights when there are no ties."""
    g = torch.Generator().manual_seed(1)
    cases = []
    for sizes, r in [((5, 7), 0.5), ((100, 3, 40), 0.9), ((1000,), 0.123)]:
        ws = [torch.randn(n, generator=g) for n in sizes]
        flat = torch.cat(ws).abs()
        k = max(1, round(r * flat.numel()))
        cases.append((f"sizes {sizes}, ratio {r}", ([w.clone() for w in ws], r), float(flat.kthvalue(k).values)))
    return run_check("global threshold", fn, cases)


def check_geometric_schedule(fn: Callable[[float, int], list[float]]) -> Verdict:
    """``fn(final_sparsity, rounds) -> sparsity after each round`` when every round removes the same
    share of the weights still left: s_i = 1 - (1 - S) ** (i / rounds)."""
    cases = [(f"S={s}, {n} rounds", (s, n), [1 - (1 - s) ** (i / n) for i in range(1, n + 1)])
             for s, n in [(0.9, 3), (0.92, 5), (0.5, 1)]]

    def as_list(*args: Any) -> Any:
        out = fn(*args)
        return torch.tensor([float(v) for v in out], dtype=torch.float64) if out is not None else None

    cases = [(label, args, torch.tensor(want, dtype=torch.float64)) for label, args, want in cases]
    return run_check("iterative pruning schedule", as_list, cases, atol=1e-9)


def check_regrown(fn: Callable[[Tensor, Tensor], int]) -> Verdict:
    """``fn(weight, mask) -> how many pruned positions (mask == 0) hold a non-zero weight``."""
    g = torch.Generator().manual_seed(2)
    cases = []
    for shape in [(4, 5), (3, 2, 3, 3)]:
        w = torch.randn(shape, generator=g)
        w[torch.rand(shape, generator=g) < 0.3] = 0
        mask = (torch.rand(shape, generator=g) < 0.5).float()
        cases.append((f"shape {shape}", (w.clone(), mask.clone()), int(((mask == 0) & (w != 0)).sum())))
    return run_check("regrown weights", fn, cases)


# ----------------------------------------------------------------------------- chapter 4.2
def check_dead_units(fn: Callable[[Tensor], int]) -> Verdict:
    """``fn(weight) -> number of output units (rows / filters) whose weights are all zero``."""
    cases = []
    for name, w in _tensors().items():
        w = w.clone()
        w[0] = 0
        cases.append((name, (w,), int((w.reshape(w.shape[0], -1) == 0).all(dim=1).sum())))
    cases.append(("zero columns only", (torch.tensor([[0.0, 1.0], [0.0, 2.0]]),), 0))
    return run_check("whole units removed", fn, cases)


def check_flatten_columns(fn: Callable[[Tensor, int], Tensor]) -> Verdict:
    """``fn(kept_channels, hw) -> the input columns of the Linear after flatten that stay``
    (channel c owns columns c*hw ... c*hw + hw - 1), in increasing order."""
    cases = []
    for keep, hw in [([0, 2], 3), ([1], 25), ([0, 3, 4], 1)]:
        k = torch.tensor(keep)
        want = (k[:, None] * hw + torch.arange(hw)).reshape(-1)
        cases.append((f"channels {keep}, h*w={hw}", (k.clone(), hw), want))

    def as_long(*args: Any) -> Any:
        out = fn(*args)
        return torch.as_tensor(out).long() if out is not None else None

    return run_check("columns of the next layer", as_long, cases)


def check_shrink_linear_pair(fn: Callable[[torch.nn.Linear, torch.nn.Linear, Tensor], tuple]) -> Verdict:
    """``fn(fc1, fc2, keep) -> (small_fc1, small_fc2)``: fc1 keeps only the units ``keep``, fc2 only
    the matching inputs; ``fc2(relu(fc1(x)))`` is unchanged when the other units were dead."""
    torch.manual_seed(3)
    cases = []
    for n_in, n_hidden, n_out, keep in [(6, 5, 3, [0, 3]), (10, 8, 4, [1, 2, 7])]:
        fc1, fc2 = torch.nn.Linear(n_in, n_hidden), torch.nn.Linear(n_hidden, n_out)
        dead = [i for i in range(n_hidden) if i not in keep]
        with torch.no_grad():
            fc1.weight[dead] = 0
            fc1.bias[dead] = 0
        x = torch.randn(5, n_in)
        want = fc2(torch.relu(fc1(x))).detach()

        def run(fc1=fc1, fc2=fc2, keep=keep, x=x):
            small1, small2 = fn(fc1, fc2, torch.tensor(keep))
            if small1.out_features != len(keep):
                return f"small_fc1 has {small1.out_features} units, expected {len(keep)}"
            return small2(torch.relu(small1(x))).detach()

        cases.append((f"{n_hidden} units, keep {keep}", (run,), want))
    return run_check("shrink a Linear pair", lambda run: run(), cases, atol=1e-5)


# ----------------------------------------------------------------------------- chapter 5
def check_csr_bytes(fn: Callable[[int, int, int], int]) -> Verdict:
    """``fn(rows, cols, nnz) -> bytes`` of a float32 CSR matrix with int64 indices, as PyTorch stores
    it: a value and a column index per non-zero, and rows + 1 row pointers."""
    from utils.measure import csr_bytes
    cases = []
    for rows, cols, nnz in [(3, 4, 2), (120, 400, 4800), (4096, 4096, 167772), (10, 10, 0)]:
        w = torch.zeros(rows * cols)
        w[:nnz] = 1.0
        cases.append((f"{rows}x{cols}, {nnz} non-zeros", (rows, cols, nnz), csr_bytes(w.view(rows, cols))))
    return run_check("bytes of a CSR matrix", fn, cases)


def check_break_even(fn: Callable[[dict[float, float]], float | None]) -> Verdict:
    """``fn({sparsity: csr_time / dense_time}) -> the lowest sparsity where CSR was faster``, or None."""
    cases = [("wins from 0.9", ({0.5: 3.1, 0.9: 0.8, 0.95: 0.4, 0.99: 0.1},), 0.9),
             ("never wins", ({0.5: 3.0, 0.99: 1.2},), None),
             ("unordered keys", ({0.99: 0.2, 0.8: 0.9, 0.7: 1.5},), 0.8),
             ("noisy: wins, loses, wins", ({0.7: 0.95, 0.8: 1.05, 0.9: 0.7},), 0.7)]
    return run_check("break-even sparsity", fn, cases)


def check_modelled_energy(fn: Callable[[float, float, bool], float]) -> Verdict:
    """``fn(macs, weights, on_chip) -> µJ`` per inference under the 45 nm model of ``utils.energy``:
    a float multiply and add per MAC, one 32-bit read per weight from SRAM (on chip) or DRAM."""
    from utils.energy import modelled_energy
    cases = [(f"{m:g} MACs, {w:g} weights, on_chip={c}", (m, w, c), modelled_energy(m, w, on_chip=c)["total µJ"])
             for m, w, c in [(416_520, 61_470, True), (416_520, 61_470, False), (1.3e8, 9.2e6, False), (0, 10, True)]]
    return run_check("modelled energy", fn, cases, atol=1e-6)


# ----------------------------------------------------------------------------- chapter 6
def check_relative_amount(fn: Callable[[float, float], float]) -> Verdict:
    """``fn(current, target) -> amount`` for ``torch.nn.utils.prune``, whose amount counts among the
    weights still unpruned, so that a tensor ``current`` sparse becomes ``target`` sparse."""
    cases = [(f"{c} -> {t}", (c, t), (t - c) / (1 - c)) for c, t in [(0.0, 0.5), (0.5, 0.75), (0.9, 0.95), (0.3, 0.3)]]
    return run_check("relative amount", fn, cases, atol=1e-9)


def check_pruned_tensor_names(fn: Callable[[torch.nn.Module], list[str]]) -> Verdict:
    """``fn(module) -> sorted names of its own tensors reparametrized by torch.nn.utils.prune``."""
    from torch.nn.utils import prune

    def build(kind: str) -> torch.nn.Module:
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 3)
        if kind in ("weight", "both"):
            prune.l1_unstructured(m, "weight", amount=0.5)
        if kind in ("bias", "both"):
            prune.random_unstructured(m, "bias", amount=0.3)
        return m

    cases = [(f"{k} pruned", (build(k),), w) for k, w in
             [("none", []), ("weight", ["weight"]), ("bias", ["bias"]), ("both", ["bias", "weight"])]]
    return run_check("names of pruned tensors", fn, cases)


def check_semi_structured_mask(fn: Callable[[Tensor], Tensor]) -> Verdict:
    """``fn(weight) -> bool mask`` keeping the 2 largest magnitudes of every 4 consecutive inputs."""
    from utils.pruning import semi_structured_mask
    g = torch.Generator().manual_seed(4)
    cases = [(name, (w,), semi_structured_mask(w)) for name, w in
             [("random 3x8", torch.randn(3, 8, generator=g)), ("ties 1x8", torch.tensor([[1., 1., 1., 1., 0., 2., 2., 0.]])),
              ("random 16x16", torch.randn(16, 16, generator=g))]]
    return run_check("2:4 mask", fn, cases)


# ----------------------------------------------------------------------------- chapter 7
def check_cubic_schedule(fn: Callable[[int, int, float, float], float]) -> Verdict:
    """``fn(step, total_steps, final, initial) -> sparsity`` of Zhu and Gupta's gradual schedule,
    s = final + (initial - final) * (1 - step / total_steps) ** 3, held at ``final`` after the end."""
    def want(t: int, n: int, f: float, i: float) -> float:
        return f + (i - f) * (1 - min(t, n) / n) ** 3
    cases = [(f"step {t} of {n}, {i} -> {f}", (t, n, f, i), want(t, n, f, i))
             for t, n, f, i in [(0, 10, 0.9, 0.0), (5, 10, 0.9, 0.0), (10, 10, 0.9, 0.0), (15, 10, 0.9, 0.0), (3, 7, 0.95, 0.5)]]
    return run_check("cubic sparsity schedule", fn, cases, atol=1e-9)


def check_layer_ratios(fn: Callable[[dict, float, float], dict]) -> Verdict:
    """``fn(scan, dense_acc, budget) -> {layer: ratio}``: for each layer the largest scanned ratio whose
    accuracy is at least ``dense_acc - budget`` (0.0 if none is)."""
    scan = {"conv1": {0.5: 0.97, 0.7: 0.95, 0.9: 0.80}, "fc1": {0.5: 0.98, 0.9: 0.975, 0.95: 0.97, 0.98: 0.90},
            "fc2": {0.3: 0.90, 0.5: 0.85}}
    cases = [(f"budget {b}", (scan, 0.98, b), {layer: max([r for r, a in row.items() if a >= 0.98 - b - 1e-12], default=0.0)
                                               for layer, row in scan.items()})
             for b in (0.01, 0.035, 0.2)]
    return run_check("per-layer ratios under an accuracy budget", fn, cases)


def check_rewind(fn: Callable[[torch.nn.Module, dict], None]) -> Verdict:
    """``fn(model, init_state)``: reset every weight and bias of a pruned ``model`` to ``init_state``
    (a state_dict saved before training, with plain ``weight``/``bias`` keys), keeping the masks."""
    from utils.models import LeNet300100
    from utils.pruning import effective_weight, prune_unstructured

    def run(seed: int) -> Tensor:
        torch.manual_seed(seed)
        model = LeNet300100()
        init = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # "training"
        prune_unstructured(model, 0.8)
        masks = {n: m.weight_mask.clone() for n, m in model.named_modules() if hasattr(m, "weight_mask")}
        fn(model, init)
        got = []
        for n, m in model.named_modules():
            if n in masks:
                ok = torch.equal(m.weight_mask, masks[n]) and torch.equal(effective_weight(m), init[n + ".weight"] * masks[n]) \
                    and torch.equal(m.bias.detach(), init[n + ".bias"])
                got.append(ok)
        return torch.tensor(got)

    cases = [(f"LeNet-300-100, seed {s}", (s,), torch.ones(3, dtype=torch.bool)) for s in (0, 1)]
    return run_check("rewind to initialization, masks kept", run, cases)


# ----------------------------------------------------------------------------- chapter 8
def check_int8(fn: Callable[[Tensor], tuple[Tensor, float]]) -> Verdict:
    """``fn(w) -> (q, scale)``: symmetric per-tensor int8 quantization, scale = max|w| / 127,
    q = round(w / scale) as torch.int8, so that q * scale approximates w."""
    g = torch.Generator().manual_seed(5)
    ws = {"random 4x5": torch.randn(4, 5, generator=g), "with zeros": torch.tensor([0.0, -1.0, 0.5, 0.25]),
          "tiny": torch.randn(3, 3, generator=g) * 1e-3}
    cases = []
    for name, w in ws.items():
        scale = float(w.abs().max()) / 127
        cases.append((name, (w.clone(),), torch.round(w / scale).clamp(-127, 127).to(torch.int8)))

    def q_only(w: Tensor) -> Any:
        out = fn(w)
        if out is None:
            return None
        q, scale = out
        if abs(float(scale) - float(w.abs().max()) / 127) > 1e-9:
            return f"scale {scale}"
        return q if q.dtype == torch.int8 else f"dtype {q.dtype}"
    return run_check("int8 quantization", q_only, cases)


def check_combined_compression(fn: Callable[[float, int], float]) -> Verdict:
    """``fn(sparsity, bits) -> compression vs dense fp32`` when the kept weights are stored with
    ``bits`` bits (index storage ignored): 32 / bits / (1 - sparsity)."""
    cases = [(f"sparsity {s}, {b} bits", (s, b), 32 / b / (1 - s)) for s, b in [(0.0, 8), (0.9, 32), (0.9, 8), (0.5, 4)]]
    return run_check("pruning and quantization together", fn, cases, atol=1e-9)


def check_best_config(fn: Callable[[list[dict], float, float], str | None]) -> Verdict:
    """``fn(rows, min_accuracy, max_latency) -> name`` of the row with the fewest parameters among those
    with accuracy >= min_accuracy and latency <= max_latency, or None. Rows have keys
    name, accuracy, latency, params."""
    rows = [{"name": "dense", "accuracy": 0.98, "latency": 10.0, "params": 60000},
            {"name": "unstructured global", "accuracy": 0.975, "latency": 10.5, "params": 6000},
            {"name": "structured local", "accuracy": 0.96, "latency": 4.0, "params": 15000},
            {"name": "structured global", "accuracy": 0.97, "latency": 5.0, "params": 14000}]
    cases = [("accuracy first", (rows, 0.97, 20.0), "unstructured global"), ("latency first", (rows, 0.95, 6.0), "structured global"),
             ("strict", (rows, 0.965, 4.5), None), ("everything allowed", (rows, 0.0, 100.0), "unstructured global")]
    return run_check("decision guide", fn, cases)
