"""Every exercise check passes a right answer and fails a wrong one (a check that cannot fail is no check)."""
import pytest
import torch
from torch import nn

from utils import checks
from utils.pruning import semi_structured_mask, smallest_k


def shrink_pair(fc1, fc2, keep):
    a, b = nn.Linear(fc1.in_features, len(keep)), nn.Linear(len(keep), fc2.out_features)
    with torch.no_grad():
        a.weight.copy_(fc1.weight[keep]), a.bias.copy_(fc1.bias[keep])
        b.weight.copy_(fc2.weight[:, keep]), b.bias.copy_(fc2.bias)
    return a, b


def rewind(model, init):
    with torch.no_grad():
        for name, m in model.named_modules():
            if hasattr(m, "weight_orig"):
                m.weight_orig.copy_(init[name + ".weight"])
                m.bias.copy_(init[name + ".bias"])


def best_config(rows, min_accuracy, max_latency):
    ok = [r for r in rows if r["accuracy"] >= min_accuracy and r["latency"] <= max_latency]
    return min(ok, key=lambda r: r["params"])["name"] if ok else None


def n_weights(model):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


CASES = {  # check: (right answer, wrong answer)
    "check_sparsity": (lambda t: float((t == 0).float().mean()), lambda t: float((t != 0).float().mean())),
    "check_row_norms": (lambda w, p: torch.linalg.vector_norm(w.flatten(1), ord=p, dim=1),
                        lambda w, p: torch.linalg.vector_norm(w.flatten(1), ord=2, dim=1)),
    "check_unstructured_mask": (lambda w, r: ~smallest_k(w.abs(), round(r * w.numel())),
                                lambda w, r: w.abs() > w.abs().flatten().quantile(r)),
    "check_count_weights": (n_weights, lambda m: sum(p.numel() for p in m.parameters())),
    "check_model_megabytes": (lambda n, b: n * b / 8 / 1e6, lambda n, b: n * b / 1e6),
    "check_conv_macs": (lambda ci, co, k, h, w: ci * co * k * k * h * w, lambda ci, co, k, h, w: ci * co * k * k),
    "check_compression_ratio": (lambda s: 1 / (1 - s), lambda s: 1 - s),
    "check_local_counts": (lambda sizes, r: [round(r * n) for n in sizes], lambda sizes, r: [int(r * n) + 1 for n in sizes]),
    "check_theoretical_speedup": (lambda m, d: sum(m) / sum(a * b for a, b in zip(m, d)),
                                  lambda m, d: 1 / (sum(d) / len(d))),
    "check_structured_mask": (lambda w, r, p: ~smallest_k(w.flatten(1).norm(p=p, dim=1), round(r * w.shape[0])),
                              lambda w, r, p: ~smallest_k(w.flatten(1).norm(p=p, dim=0)[: w.shape[0]], round(r * w.shape[0]))),
    "check_global_threshold": (
        lambda ws, r: float(torch.cat(ws).abs().kthvalue(max(1, round(r * sum(w.numel() for w in ws)))).values),
        lambda ws, r: float(torch.cat(ws).abs().quantile(r))),
    "check_geometric_schedule": (lambda s, n: [1 - (1 - s) ** (i / n) for i in range(1, n + 1)],
                                 lambda s, n: [s * i / n for i in range(1, n + 1)]),
    "check_regrown": (lambda w, m: int(((m == 0) & (w != 0)).sum()), lambda w, m: int((w != 0).sum())),
    "check_dead_units": (lambda w: int((w.flatten(1) == 0).all(1).sum()), lambda w: int((w == 0).all(0).sum())),
    "check_flatten_columns": (lambda k, hw: (k[:, None] * hw + torch.arange(hw)).flatten(), lambda k, hw: k),
    "check_shrink_linear_pair": (shrink_pair, lambda a, b, k: (a, b)),
    "check_csr_bytes": (lambda r, c, nnz: 4 * nnz + 8 * nnz + 8 * (r + 1), lambda r, c, nnz: 4 * nnz),
    "check_break_even": (lambda t: min((s for s, r in t.items() if r < 1), default=None),
                         lambda t: max((s for s, r in t.items() if r < 1), default=None)),
    "check_modelled_energy": (lambda m, w, c: (m * 4.6 + w * (5 if c else 640)) / 1e6, lambda m, w, c: (m * 4.6 + w * 640) / 1e6),
    "check_relative_amount": (lambda c, t: (t - c) / (1 - c), lambda c, t: t - c),
    "check_pruned_tensor_names": (
        lambda m: sorted(n[:-5] for n, _ in m.named_buffers(recurse=False) if n.endswith("_mask")),
        lambda m: ["weight"]),
    "check_semi_structured_mask": (semi_structured_mask, lambda w: w.abs() >= w.abs().median()),
    "check_cubic_schedule": (lambda t, n, f, i: f + (i - f) * (1 - min(t, n) / n) ** 3, lambda t, n, f, i: f * t / n),
    "check_layer_ratios": (
        lambda scan, d, b: {k: max([r for r, a in v.items() if a >= d - b - 1e-12], default=0.0) for k, v in scan.items()},
        lambda scan, d, b: {k: max(v) for k, v in scan.items()}),
    "check_rewind": (rewind, lambda model, init: None),
    "check_int8": (lambda w: (torch.round(w / (w.abs().max() / 127)).clamp(-127, 127).to(torch.int8), float(w.abs().max()) / 127),
                   lambda w: (torch.round(w * 127).to(torch.int8), 1 / 127)),
    "check_combined_compression": (lambda s, b: 32 / b / (1 - s), lambda s, b: 1 / (1 - s)),
    "check_best_config": (best_config, lambda rows, a, t: rows[0]["name"]),
}


def test_every_check_is_covered():
    public = {n for n in dir(checks) if n.startswith("check_")}
    assert public == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_right_passes_wrong_fails(name, capsys):
    right, wrong = CASES[name]
    check = getattr(checks, name)
    verdict = check(right)
    assert bool(verdict) is True and repr(verdict).startswith("all ")
    assert not check(wrong)
    stub = check(lambda *a: None)  # an unfinished stub fails too, without crashing
    assert not stub and "fix the FAIL lines" in repr(stub)
    out = capsys.readouterr().out
    assert "FAIL" in out and "pass" in out
