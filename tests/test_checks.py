"""Every exercise check passes a right answer, fails wrong ones, and fails the empty stub on every
case (a check that cannot fail is no check); the utils function an exercise asks for is blocked."""

import copy
import math
import sys

import pytest
import torch
import torch_pruning as tp
from torch import nn

import utils.lab.measure
from utils import pruning
from utils.kit import checks
from utils.lab import energy, measure
from utils.lab.training import train
from utils.pruning import prune_structured, prune_unstructured, semi_structured_mask, smallest_k
from utils.pruning.surgery import shrink


def shrink_pair(fc1, fc2, keep):
    a, b = nn.Linear(fc1.in_features, len(keep)), nn.Linear(len(keep), fc2.out_features)
    with torch.no_grad():
        a.weight.copy_(fc1.weight[keep]), a.bias.copy_(fc1.bias[keep])
        b.weight.copy_(fc2.weight[:, keep]), b.bias.copy_(fc2.bias)
    return a, b


def best_config(rows, min_accuracy, max_latency):
    ok = [r for r in rows if r["accuracy"] >= min_accuracy and r["latency"] <= max_latency]
    return min(ok, key=lambda r: r["params"])["name"] if ok else "none"


def n_weights(model):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def mlp_widths(budget_mb, bits):
    n = budget_mb * 1e6 * 8 / bits
    h2 = 10
    h1 = int((0.95 * n - 11 * h2 - 10 * 11) / (785 + h2))  # aim at 95 % of the budget
    return h1, h2


def allocation(sizes, macs, total):
    s, left = [0.0] * len(sizes), total * sum(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -macs[i] / sizes[i]):
        take = min(0.95 * sizes[i], left)
        s[i], left = take / sizes[i], left - take
    return s


def rowwise_mask(w, ratio):
    rows = w.reshape(w.shape[0], -1).abs()
    keep = torch.ones_like(rows, dtype=torch.bool)
    k = round(ratio * rows.shape[1])
    order = torch.argsort(rows, dim=1, stable=True)[:, :k]
    return keep.scatter_(1, order, False).view_as(w)


def prune_finetune(model, loader, ratio):
    prune_unstructured(model, ratio)
    train(model, loader, epochs=3, lr=0.02, progress=False)
    return model


def safe_ratio(model, val, budget):
    dense = checks.toy_accuracy(model, val)
    best = 0.0
    for i in range(1, 20):
        m = copy.deepcopy(model)
        prune_unstructured(m, i / 20)
        if checks.toy_accuracy(m, val) >= dense - budget:
            best = i / 20
    return best


def macs_budget(model, loader, budget):
    h = int(-7 + (49 + 0.95 * budget) ** 0.5)  # MACs of 10-h-h-4: 10h + h*h + 4h
    prune_structured(model, (64 - h) / 64)
    train(model, loader, epochs=3, lr=0.02, progress=False)
    return shrink(model)


def csr_break_even(rows, cols):
    return (4 * rows * cols - 8 * (rows + 1)) / (12 * rows * cols)


def halve_macs(model, example):
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.3,
        ignored_layers=[model.fc],
    )
    pruner.step()
    return model


def mask_2_4(w):
    groups = w.abs().reshape(-1, 4)
    top2 = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :2]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top2, True).view_as(w)


def overlap(a, b):
    a, b = a.bool(), b.bool()
    either = int((a | b).sum())
    return float((a & b).sum()) / either if either else 1.0


def cubic_ramp(model, loader, final, epochs, ramp_share=0.7):
    """Train while raising the sparsity to ``final`` on a cubic schedule that ends after
    ``ramp_share`` of the steps."""
    ramp = int(ramp_share * epochs * len(loader))

    def step(t):
        if t % 5 == 0 or t == ramp:
            prune_unstructured(model, round(final * (1 - (1 - min(t, ramp) / ramp) ** 3), 6))

    train(model, loader, epochs=epochs, lr=0.05, on_step=step, progress=False)
    return model


def gradual(model, loader, final, epochs):
    return cubic_ramp(model, loader, final, epochs)


def gradual_to_the_end(model, loader, final, epochs):
    """Wrong: the ramp ends at the very last step, so nothing recovers."""
    return cubic_ramp(model, loader, final, epochs, ramp_share=1.0)


def gradual_one_epoch_more(model, loader, final, epochs):
    """Wrong: one extra epoch hides a ramp that ends at the last step of the asked epochs."""
    gradual_to_the_end(model, loader, final, epochs)
    train(model, loader, epochs=1, lr=0.05, progress=False)
    return model


def compression_budget(model, loader):
    prune_unstructured(model, 0.8)
    train(model, loader, epochs=3, lr=0.02, progress=False)
    return model, 8


def wrong_cheap_train(model, loader, ratio):  # prunes but never fine-tunes
    prune_unstructured(model, ratio)
    return model


def distillation_loss(s, t, y, temperature, alpha):
    soft = torch.nn.functional.kl_div(
        torch.log_softmax(s / temperature, 1),
        torch.softmax(t / temperature, 1),
        reduction="batchmean",
    )
    return alpha * temperature**2 * soft + (1 - alpha) * torch.nn.functional.cross_entropy(s, y)


def _folded(conv, bn, eps, into=None):
    fused = into if into is not None else copy.deepcopy(conv)
    scale = bn.weight / torch.sqrt(bn.running_var + eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        new_bias = (bias - bn.running_mean) * scale + bn.bias
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias = torch.nn.Parameter(new_bias)
    return fused


def fold_batchnorm(conv, bn):
    return _folded(conv, bn, bn.eps)


def fold_batchnorm_without_eps(conv, bn):
    return _folded(conv, bn, 0.0)


def fold_batchnorm_in_place(conv, bn):
    return _folded(conv, bn, bn.eps, into=conv)


def prune_resnet(model, example, ratio, round_to, keep_first=False):
    import torch_pruning as tp

    kept = [model.fc] + ([model.conv1, *model.layer1.modules()] if keep_first else [])
    kept = [m for m in kept if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=kept,
        round_to=round_to,
    ).step()
    return model


CASES = {  # check: (right answer, [wrong answers])
    "check_count_weights": (
        n_weights,
        [
            lambda m: sum(p.numel() for p in m.parameters()),
            lambda m: sum(p.numel() for p in m.parameters() if p.dim() > 1),
            measure.count_weights,
        ],
    ),
    "check_model_megabytes": (
        lambda n, b: n * b / 8 / 1e6,
        [lambda n, b: n * b / 1e6, lambda n, b: n * b / 8 / 2**20],
    ),
    "check_conv_macs": (
        lambda ci, co, k, h, w: ci * co * k * k * h * w,
        [
            lambda ci, co, k, h, w: ci * co * k * k,
            lambda ci, co, k, h, w: (
                measure.count_flops(nn.Conv2d(ci, co, k), torch.zeros(1, ci, h + k - 1, w + k - 1))
                // 2
            ),
        ],
    ),
    "check_mlp_widths": (
        mlp_widths,
        [
            lambda b, bits: (300, 100),
            lambda b, bits: (10, 20),
            lambda b, bits: tuple(x * 2 for x in mlp_widths(b, bits)),
        ],
    ),
    "check_sparsity": (
        lambda t: float((t == 0).float().mean()),
        [
            lambda t: float((t != 0).float().mean()),
            lambda t: (t == 0).float().mean(),
            lambda t: float((t.abs() < 1e-3).float().mean()),  # small is not zero
        ],
    ),
    "check_local_counts": (
        lambda sizes, r: [round(r * n) for n in sizes],
        [lambda sizes, r: [int(r * n) + 1 for n in sizes], lambda sizes, r: round(r * sum(sizes))],
    ),
    "check_theoretical_speedup": (
        lambda m, d: sum(m) / sum(a * b for a, b in zip(m, d)),
        [lambda m, d: 1 / (sum(d) / len(d))],
    ),
    "check_sparsity_allocation": (
        allocation,
        [
            lambda sizes, macs, t: [t] * len(sizes),
            lambda sizes, macs, t: allocation(sizes, [n * n for n in sizes], t),
        ],
    ),
    "check_rowwise_mask": (
        rowwise_mask,
        [
            lambda w, r: ~smallest_k(w.abs(), round(r * w.numel())),
            lambda w, r: (
                w.abs() > w.abs().flatten(1).quantile(r, dim=1).view(-1, *[1] * (w.dim() - 1))
            ),
        ],
    ),
    "check_prune_finetune": (prune_finetune, [wrong_cheap_train, lambda m, loader, r: m]),
    "check_share_at_threshold": (
        lambda w, t: float((w.abs() <= t).float().mean()),
        [
            lambda w, t: float((w.abs() < t).float().mean()),
            lambda w, t: float((w <= t).float().mean()),
        ],
    ),
    "check_total_sparsity": (
        lambda sizes, r: sum(n * r.get(k, 0.0) for k, n in sizes.items()) / sum(sizes.values()),
        [
            lambda sizes, r: sum(r.values()) / len(r),
            lambda sizes, r: sum(r.values()) / len(sizes),
            lambda sizes, r: (
                sum(round(n * r.get(k, 0.0)) for k, n in sizes.items()) / sum(sizes.values())
            ),
        ],
    ),
    "check_global_threshold": (
        lambda ws, r: float(
            torch.cat(ws).abs().kthvalue(max(1, round(r * sum(w.numel() for w in ws)))).values
        ),
        [lambda ws, r: float(torch.cat(ws).abs().quantile(r))],
    ),
    "check_geometric_schedule": (
        lambda s, n: [1 - (1 - s) ** (i / n) for i in range(1, n + 1)],
        [lambda s, n: [s * i / n for i in range(1, n + 1)]],
    ),
    "check_regrown": (
        lambda w, m: int(((m == 0) & (w != 0)).sum()),
        [lambda w, m: int((w != 0).sum())],
    ),
    "check_safe_ratio": (safe_ratio, [lambda m, v, b: 0.95, lambda m, v, b: 0.0]),
    "check_dead_units": (
        lambda w: int((w.flatten(1) == 0).all(1).sum()),
        [lambda w: int((w == 0).all(0).sum())],
    ),
    "check_flatten_columns": (
        lambda k, hw: (k[:, None] * hw + torch.arange(hw)).flatten(),
        [lambda k, hw: k],
    ),
    "check_shrink_linear_pair": (shrink_pair, [lambda a, b, k: (a, b)]),
    "check_macs_budget": (
        macs_budget,
        [lambda m, loader, b: m, lambda m, loader, b: shrink(_silenced(m, 0.75))],
    ),
    "check_csr_bytes": (
        lambda r, c, nnz: 4 * nnz + 8 * nnz + 8 * (r + 1),
        [lambda r, c, nnz: 4 * nnz],
    ),
    "check_break_even": (
        lambda t: min((s for s, r in t.items() if r < 1), default=math.inf),
        [
            lambda t: max((s for s, r in t.items() if r < 1), default=math.inf),
            lambda t: min((s for s, r in t.items() if r <= 1), default=math.inf),
        ],
    ),
    "check_modelled_energy": (
        lambda m, w, c: (m * 4.6 + w * (energy.sram_read_pj(4 * w) if c else 640)) / 1e6,
        [
            lambda m, w, c: (m * 4.6 + w * 640) / 1e6,
            lambda m, w, c: (m * 4.6 + w * (5 if c else 640)) / 1e6,  # one SRAM size for all
        ],
    ),
    "check_csr_storage_break_even": (csr_break_even, [lambda r, c: 1 / 3, lambda r, c: 2 / 3]),
    "check_relative_amount": (lambda c, t: (t - c) / (1 - c), [lambda c, t: t - c]),
    "check_pruned_tensor_names": (
        lambda m: sorted(n[:-5] for n, _ in m.named_buffers(recurse=False) if n.endswith("_mask")),
        [
            lambda m: ["weight"],
            lambda m: sorted(n[:-5] for n, _ in m.named_buffers() if n.endswith("_mask")),
        ],
    ),
    "check_semi_structured_mask": (
        mask_2_4,
        [lambda w: w.abs() >= w.abs().median(), semi_structured_mask],
    ),
    "check_halve_macs": (halve_macs, [lambda m, e: m]),
    "check_mask_overlap": (overlap, [lambda a, b: float((a.bool() & b.bool()).float().mean())]),
    "check_gradual_pruning": (
        gradual,
        [
            lambda m, loader, f, e: (prune_unstructured(m, f), m)[1],
            gradual_to_the_end,
            gradual_one_epoch_more,
        ],
    ),
    "check_int8": (
        lambda w: (
            torch.round(w / (w.abs().max() / 127)).clamp(-127, 127).to(torch.int8),
            float(w.abs().max()) / 127,
        ),
        [lambda w: (torch.round(w * 127).to(torch.int8), 1 / 127)],
    ),
    "check_combined_compression": (lambda s, b: 32 / b / (1 - s), [lambda s, b: 1 / (1 - s)]),
    "check_best_config": (
        best_config,
        [
            lambda rows, a, t: rows[0]["name"],
            lambda rows, a, t: (
                best_config(rows, a, t) if best_config(rows, a, t) != "none" else None
            ),
        ],
    ),
    "check_compression_budget": (
        compression_budget,
        [lambda m, loader: (m, 8), lambda m, loader: (prune_finetune(m, loader, 0.8), 16)],
    ),
    "check_distillation_loss": (
        distillation_loss,
        [
            lambda s, t, y, T, a: distillation_loss(s, t, y, T, a) / (T * T),  # no T**2 factor
            lambda s, t, y, T, a: (
                torch.nn.functional.kl_div(  # no label term
                    torch.log_softmax(s / T, 1), torch.softmax(t / T, 1), reduction="batchmean"
                )
                * T
                * T
            ),
        ],
    ),
    "check_fold_batchnorm": (
        fold_batchnorm,
        [
            lambda conv, bn: conv,  # BatchNorm ignored
            fold_batchnorm_without_eps,
            fold_batchnorm_in_place,
        ],
    ),
    "check_prune_for_runtime": (
        lambda m, e: prune_resnet(m, e, 0.7, 16, keep_first=True),
        [
            lambda m, e: prune_resnet(m, e, 0.5, 16),  # the first stage pruned too
            lambda m, e: prune_resnet(m, e, 0.5, 16, keep_first=True),  # 52 % of the MACs
            lambda m, e: prune_resnet(m, e, 0.7, 8, keep_first=False),
            lambda m, e: m,
        ],
    ),
}


def _silenced(model, ratio):
    prune_structured(model, ratio)
    return model


def test_every_check_is_covered():
    public = {n for n in dir(checks) if n.startswith("check_")}
    assert public == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_right_passes_wrong_fails_stub_fails_every_case(name, capsys):
    right, wrongs = CASES[name]
    check = getattr(checks, name)
    verdict = check(right)
    out = capsys.readouterr().out
    assert bool(verdict) is True and repr(verdict).startswith("all "), out
    for wrong in wrongs:
        assert not check(wrong)
    for stub in (lambda *a: None, lambda *a: 1 / 0):  # the empty stub, and one that raises
        verdict = check(stub)
        assert verdict.passed == 0 and "fix the FAIL lines" in repr(verdict)
    out = capsys.readouterr().out
    assert "FAIL" in out and "got None: does your function `return` its result?" in out


def test_forbidden_blocks_the_readers_code_only_under_every_alias_and_restores():
    from utils.lab.measure import count_weights as alias

    model = nn.Linear(3, 2)
    library_code = measure.count_weights.__code__

    def via_alias(m):
        return alias(m)

    def via_module(m):
        return measure.count_weights(m)

    def via_package(m):
        return utils.lab.measure.count_weights(m)

    def via_own_import(m):
        from utils.lab.measure import count_weights

        return count_weights(m)

    for reader in (via_alias, via_module, via_package, via_own_import):
        with pytest.raises(RuntimeError, match="write it yourself"):
            with checks.forbidden(reader, measure.count_weights):
                reader(model)
    with checks.forbidden(via_alias, measure.count_weights):
        assert (
            sys.modules["utils.lab.measure"].count_weights(model) == 6
        )  # other callers unaffected
    assert measure.count_weights.__code__ is library_code  # the library is never changed
    assert all(
        reader(model) == 6 for reader in (via_alias, via_module, via_package, via_own_import)
    )


def test_forbidden_sees_through_a_checks_wrapper_and_lets_the_readers_own_names_be():
    def count_weights(m):  # the reader's own function, with the library's name
        return sum(p.numel() for n, p in m.named_parameters() if n.endswith("weight"))

    def wrapper(m):  # as a check wraps the reader's function
        return count_weights(m)

    with checks.forbidden(wrapper, measure.count_weights):
        assert wrapper(nn.Linear(3, 2)) == 6
    verdict = checks.run_check(
        "weights",
        lambda m: measure.count_weights(m),
        [("a", (nn.Linear(3, 2),), 6)],
        forbid=(measure.count_weights,),
    )
    assert verdict.passed == 0


def test_no_case_expects_none():
    """A stub returning None must never pass: run every check with a stub and count the passes."""
    for name in CASES:
        assert getattr(checks, name)(lambda *a: None).passed == 0, name


def _smallest_two(s):
    from utils.pruning import smallest_k as sk  # imported inside: refused before it runs

    return sk(s, 2)


def _via_module_import(s):
    import utils.pruning.magnitude as mg

    return mg.smallest_k(s, 2)


class _CallableAnswer:
    def __call__(self, s):
        return pruning.smallest_k(s, 2)


def _helper(s):
    return smallest_k(s, 2)


def _via_helper(s):
    return _helper(s)


def _via_default(s, fn=smallest_k):
    return fn(s, 2)


def _via_lru_cache():
    import functools

    return functools.lru_cache(maxsize=None)(lambda s: smallest_k(s, 2))


@pytest.mark.parametrize(
    "reader",
    [
        _smallest_two,
        _via_module_import,
        _CallableAnswer(),
        _via_helper,
        _via_default,
        _via_lru_cache(),
    ],
    ids=[
        "local import",
        "module import",
        "callable object",
        "helper",
        "default argument",
        "lru_cache",
    ],
)
def test_forbidden_blocks_every_route_and_restores_everything(reader):
    scores = torch.tensor([3.0, 1.0, 2.0, 0.5])
    with pytest.raises(RuntimeError, match="write it yourself"):
        with checks.forbidden(reader, smallest_k):
            reader(scores)
    assert _via_default.__defaults__[0] is smallest_k and pruning.smallest_k is smallest_k
    assert smallest_k(scores, 2).tolist() == [False, True, False, True]


def test_forbidden_lets_a_readers_own_attribute_of_that_name_be_and_restores_a_shared_cell():
    class Mine:
        def smallest_k(self, s, k):
            return s.argsort()[:k]

    def answer(s):
        return Mine().smallest_k(s, 2)

    with checks.forbidden(answer, smallest_k):
        assert answer(torch.tensor([3.0, 1.0, 2.0])).tolist() == [1, 2]

    def factory():
        pr = pruning

        def helper(s):
            return pr.smallest_k(s, 2)

        def outer(s):
            return helper(s) if pr else None

        return outer

    outer = factory()
    with pytest.raises(RuntimeError):
        with checks.forbidden(outer, smallest_k):
            outer(torch.tensor([3.0, 1.0, 2.0]))
    assert all(not isinstance(c.cell_contents, checks._BlockingModule) for c in outer.__closure__)
    cells = [c.cell_contents for c in outer.__closure__]
    assert pruning in cells


def test_an_honest_float32_answer_passes_and_a_fail_line_states_the_tolerance(capsys):
    """Issue 25: 'expected 0.942675, got 0.942675' for a float32 computation of ex-7-1."""
    import torch

    from utils.kit.checks import check_total_sparsity

    def in_float32(sizes, ratios):
        pruned = torch.tensor([n * ratios.get(k, 0.0) for k, n in sizes.items()]).sum()
        return (pruned / torch.tensor(float(sum(sizes.values())))).item()

    def rounded(sizes, ratios):  # wrong: whole counts
        return sum(round(n * ratios.get(k, 0.0)) for k, n in sizes.items()) / sum(sizes.values())

    def in_numpy_float32(sizes, ratios):
        import numpy as np

        pruned = np.float32(sum(n * ratios.get(k, 0.0) for k, n in sizes.items()))
        return pruned / np.float32(sum(sizes.values()))

    assert check_total_sparsity(in_float32) and check_total_sparsity(in_numpy_float32)
    assert not check_total_sparsity(rounded)
    assert "more than the tolerance" in capsys.readouterr().out


def test_an_honest_float32_schedule_passes():
    import torch

    from utils.kit.checks import check_geometric_schedule

    def in_float32(final, rounds):
        s = torch.tensor(final, dtype=torch.float32)
        return [float(1 - (1 - s) ** (i / rounds)) for i in range(1, rounds + 1)]

    assert check_geometric_schedule(in_float32)
