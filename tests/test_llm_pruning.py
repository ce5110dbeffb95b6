"""Wanda, SparseGPT, N:M and structured pruning of the LM: formulas, exact counts, same outputs,
masks in force, and bad calls that change nothing."""

import pytest
import torch
from conftest import same_snapshot, snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from utils.lab.lm import CharLM, train_lm
from utils.lab.lm_units import l2_scores, prune_units, shrink_lm, taylor_scores
from utils.pruning import effective_weight
from utils.pruning.llm import (
    InputStats,
    capture_inputs,
    default_layers,
    nm_mask,
    prune_llm,
    prune_magnitude,
    prune_sparsegpt,
    prune_wanda,
    reconstruction_error,
    rescale_inputs,
    row_mask,
    semi_structured_bytes,
    sparsegpt_layer,
    wanda_scores,
)
from utils.pruning.masks import mask_of

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16]


def tiny(device="cpu", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    m = CharLM(65, **({"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "context": 16} | kw))
    with torch.no_grad():  # trained-looking scales instead of 0.02 everywhere
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.to(device=device, dtype=dtype)


def calib(n=8, device="cpu"):
    return torch.randint(0, 65, (n, 16), generator=torch.Generator().manual_seed(1)).to(device)


# ----------------------------------------------------------------------------- formulas and masks
def test_wanda_score_equals_the_formula_on_a_hand_made_case():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    stats = InputStats(2, torch.device("cpu"))
    stats.add(torch.tensor([[3.0, 0.0], [4.0, 1.0]]))  # column norms 5 and 1
    assert torch.equal(stats.norms, torch.tensor([5.0, 1.0]))
    assert torch.equal(wanda_scores(w, stats.norms), torch.tensor([[5.0, 2.0], [15.0, 0.5]]))
    assert torch.equal(
        row_mask(wanda_scores(w, stats.norms), 0.5), torch.tensor([[True, False], [True, False]])
    )
    assert torch.equal(
        row_mask(w.abs(), 0.5), torch.tensor([[False, True], [True, False]])
    )  # magnitude differs


@given(
    rows=st.integers(1, 6), cols=st.integers(1, 20), s=st.floats(0, 0.99), seed=st.integers(0, 99)
)
def test_row_mask_prunes_exactly_per_row_and_ties_go_to_the_earliest(rows, cols, s, seed):
    scores = torch.randint(
        0, 3, (rows, cols), generator=torch.Generator().manual_seed(seed)
    ).float()
    keep = row_mask(scores, s)
    assert ((~keep).sum(1) == round(s * cols)).all()
    for r in range(
        rows
    ):  # every pruned score <= every kept one; among equals, earlier pruned first
        pruned, kept = scores[r][~keep[r]], scores[r][keep[r]]
        if len(pruned) and len(kept):
            assert pruned.max() <= kept.min()
            tie = pruned.max()
            assert (~keep[r])[scores[r] == tie].int().diff().le(0).all()


@given(
    rows=st.integers(1, 5),
    groups=st.integers(1, 6),
    n_m=st.sampled_from([(2, 4), (1, 4), (4, 8), (1, 2)]),
    seed=st.integers(0, 99),
)
def test_nm_masks_keep_exactly_n_of_every_m(rows, groups, n_m, seed):
    n, m = n_m
    scores = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    keep = nm_mask(scores, n, m)
    assert (keep.view(rows, groups, m).sum(-1) == n).all()


def test_semi_structured_bytes():
    assert semi_structured_bytes(128, 512, 16) * 16 == 128 * 512 * 2 * 9
    with pytest.raises(ValueError):
        semi_structured_bytes(4, 6)


def test_rescale_inputs_refuses_a_layernorm_without_gain():
    norm, lin = nn.LayerNorm(8, elementwise_affine=False), nn.Linear(8, 4)
    with pytest.raises(ValueError, match="elementwise_affine"):
        rescale_inputs(norm, [lin], [1], 2.0)


# ----------------------------------------------------------------------------- SparseGPT
def sparsegpt_and_magnitude(
    rows: int, cols: int, s: float, nm: bool, seed: int
) -> tuple[float, float]:
    """Reconstruction errors of SparseGPT and of magnitude on one random layer, and the checks
    that both prune the same number per row and that SparseGPT's pruned weights are zero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    # activations like a network's: features of different scales, mildly correlated. (With
    # isotropic inputs, X^T X ~ I, magnitude is already optimal and nothing can beat it.)
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols**0.5
    x = (torch.randn(4 * cols, cols, generator=g) @ mix) * torch.randn(cols, generator=g).exp()
    stats = InputStats(cols, torch.device("cpu"))
    stats.add(x)
    new, keep = sparsegpt_layer(w, stats, None if nm else s, (2, 4) if nm else None, blocksize=16)
    magnitude = w * (nm_mask(w.abs(), 2, 4) if nm else row_mask(w.abs(), s))
    assert (new[~keep] == 0).all() and torch.equal((~keep).sum(1), (magnitude == 0).sum(1))
    return reconstruction_error(w, new, stats.gram), reconstruction_error(w, magnitude, stats.gram)


@given(
    rows=st.integers(2, 12),
    cols=st.sampled_from([8, 16, 24, 40]),
    s=st.sampled_from([0.3, 0.5, 0.7]),
    nm=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_sparsegpt_prunes_the_same_counts_and_is_never_far_behind_magnitude(
    rows, cols, s, nm, seed
):
    """Greedy OBS is not optimal, so on a tiny layer it can lose to magnitude by a little
    (seed 10000, 2 x 8 at 0.3: 0.7 %); a broken update loses by far more."""
    ours, magnitude = sparsegpt_and_magnitude(rows, cols, s, nm, seed)
    assert ours <= 1.1 * magnitude


def test_sparsegpt_reconstructs_better_than_magnitude_on_nearly_every_layer():
    pairs = [
        sparsegpt_and_magnitude(8, cols, s, nm, seed)
        for seed in range(40)
        for cols, s, nm in [(16, 0.5, False), (40, 0.7, False), (24, 0.5, True)]
    ]
    wins = sum(ours < magnitude for ours, magnitude in pairs)
    assert wins >= 0.95 * len(pairs)
    assert sum(o for o, _ in pairs) < 0.8 * sum(m for _, m in pairs)


def test_sparsegpt_counts_are_exact_per_row_across_uneven_blocks():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(5, 200, generator=g), torch.randn(400, 200, generator=g)
    stats = InputStats(200, torch.device("cpu"))
    stats.add(x)
    for s in (0.3, 0.55, 0.7):
        _, keep = sparsegpt_layer(w, stats, s, blocksize=128)
        assert ((~keep).sum(1) == round(s * 200)).all()


def test_sparsegpt_zeroes_weights_on_dead_inputs_and_handles_small_blocks():
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(4, 16, generator=g), torch.randn(64, 16, generator=g)
    x[:, [2, 9]] = 0  # two inputs that are always zero
    stats = InputStats(16, torch.device("cpu"))
    stats.add(x)
    for kw in ({"sparsity": 0.25}, {"nm": (2, 4), "blocksize": 2}):
        new, keep = sparsegpt_layer(w, stats, **kw)
        assert (new[:, [2, 9]] == 0).all() and torch.isfinite(new).all()
        if "nm" in kw:
            assert (keep.view(4, -1, 4).sum(-1) == 2).all()


def test_sparsegpt_explains_a_hessian_that_is_not_positive_definite():
    stats = InputStats(4, torch.device("cpu"))
    stats.gram = -torch.eye(4)
    stats.count = 1
    with pytest.raises(ValueError, match="damp"):
        sparsegpt_layer(torch.randn(2, 4), stats, 0.5)


def random_layer(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, InputStats]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(4 * cols, cols, generator=g) * torch.randn(cols, generator=g).exp()
    stats = InputStats(cols, torch.device("cpu"))
    stats.add(x)
    return w, stats


@given(
    rows=st.integers(2, 10),
    cols=st.sampled_from([8, 24, 40]),
    s=st.sampled_from([0.3, 0.5]),
    seed=st.integers(0, 10_000),
)
def test_a_fixed_mask_gets_sparsegpts_own_update(rows, cols, s, seed):
    """Given its own mask back, SparseGPT makes the same updates; given all-kept, none."""
    w, stats = random_layer(rows, cols, seed)
    new, keep = sparsegpt_layer(w, stats, s, blocksize=16)
    again, same = sparsegpt_layer(w, stats, blocksize=16, keep=keep)
    assert torch.equal(same, keep) and torch.allclose(again, new, atol=1e-5, rtol=1e-4)
    untouched, _ = sparsegpt_layer(w, stats, keep=torch.ones_like(keep))
    assert torch.equal(untouched, w)


def test_wanda_mask_with_the_update_keeps_the_mask_and_reconstructs_better():
    w, stats = random_layer(12, 40, 3)
    mask = row_mask(wanda_scores(w, stats.norms), 0.5)
    new, keep = sparsegpt_layer(w, stats, keep=mask)
    assert torch.equal(keep, mask) and (new[~mask] == 0).all()
    assert reconstruction_error(w, new, stats.gram) < reconstruction_error(w, w * mask, stats.gram)
    with pytest.raises(ValueError, match="bool mask"):
        sparsegpt_layer(w, stats, keep=mask.float())
    with pytest.raises(ValueError, match="not both"):
        sparsegpt_layer(w, stats, 0.5, keep=mask)
    a, b = tiny(), tiny()
    masks_w = prune_llm(a, 0.5, criterion="wanda", calibration=calib())
    masks_u = prune_llm(b, 0.5, criterion="wanda+update", calibration=calib())
    first = [n for n in masks_w if n.startswith("blocks.0.")]  # later blocks see other inputs
    assert first and all(torch.equal(masks_w[n], masks_u[n]) for n in first)
    assert any(
        not torch.equal(effective_weight(a.get_submodule(n)), effective_weight(b.get_submodule(n)))
        for n in masks_w
    )


# ----------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt", "wanda+update"])
def test_prune_llm_exact_counts_and_masks_in_force(device, dtype, criterion):
    m = tiny(device, dtype)
    for kw in ({"sparsity": 0.5}, {"nm": (2, 4)}):
        m = tiny(device, dtype)
        masks = prune_llm(m, criterion=criterion, calibration=calib(device=device), **kw)
        assert set(masks) == set(default_layers(m)) and len(masks) == 12
        for name, mod in m.named_modules():
            if name in masks:
                w = effective_weight(mod)
                assert w.dtype == dtype and w.device.type == device
                assert ((w == 0).sum(1) >= mod.in_features // 2).all()
                assert ((~masks[name]).sum(1) == mod.in_features // 2).all()
                if "nm" in kw:
                    assert (masks[name].view(mod.out_features, -1, 4).sum(-1) == 2).all()
        assert torch.isfinite(m(calib(2, device)).float()).all()
    train_lm(m, torch.randint(0, 65, (500,)), steps=2, batch_size=4, lr=1e-2, warmup=1)
    assert all(
        bool((effective_weight(mod)[~masks[n]] == 0).all())
        for n, mod in m.named_modules()
        if n in masks
    )


def test_sequential_calibration_and_per_layer_sparsities():
    m = tiny()
    plan = {"blocks.0.fc1": 0.25, "blocks.1.attn.q": 0.75}
    masks = prune_wanda(m, calib(), sparsity=plan)
    assert set(masks) == set(plan)
    assert ((~masks["blocks.0.fc1"]).sum(1) == 8).all() and (
        (~masks["blocks.1.attn.q"]).sum(1) == 24
    ).all()
    a, b = tiny(), tiny()  # block 1 is calibrated on block 0's pruned outputs
    prune_sparsegpt(a, calib(), 0.6)
    prune_sparsegpt(
        b, calib(), 0.6, layers=[n for n in default_layers(b) if n.startswith("blocks.1")]
    )
    assert not torch.equal(mask_of(a.blocks[1].fc2), mask_of(b.blocks[1].fc2))


def test_rescaling_inputs_preserves_the_function_and_fools_magnitude_but_not_wanda():
    m, x = tiny(), calib()
    before = m(x)
    wanda_before = prune_wanda(tiny(), x, 0.5)
    magnitude_before = prune_magnitude(tiny(), 0.5)
    block = m.blocks[0]
    rescale_inputs(block.ln1, [block.attn.q, block.attn.k, block.attn.v], [3, 7], 50.0)
    assert torch.allclose(m(x), before, atol=1e-4)
    r1, r2 = tiny(), tiny()
    for r in (r1, r2):
        b = r.blocks[0]
        rescale_inputs(b.ln1, [b.attn.q, b.attn.k, b.attn.v], [3, 7], 50.0)
    wanda_after, magnitude_after = prune_wanda(r1, x, 0.5), prune_magnitude(r2, 0.5)
    q = "blocks.0.attn.q"
    assert not magnitude_after[q][:, [3, 7]].any() and magnitude_before[q][:, [3, 7]].any()
    assert (
        wanda_after[q] == wanda_before[q]
    ).float().mean() > 0.97  # equal up to rounding of the scores


BAD_CALLS = [
    ({"sparsity": 1.5, "criterion": "magnitude"}, "sparsity"),
    ({"sparsity": 0.5, "criterion": "wanda"}, "calibration"),
    ({"sparsity": 0.5, "criterion": "obs"}, "criterion"),
    ({"criterion": "magnitude"}, "exactly one"),
    ({"nm": (3, 2), "criterion": "magnitude"}, "nm"),
    ({"nm": (2, 3), "criterion": "magnitude"}, "multiple"),
    ({"sparsity": 0.5, "criterion": "magnitude", "layers": ["tok"]}, "tok"),
    ({"sparsity": 0.5, "criterion": "magnitude", "layers": ["nope"]}, "unknown"),
    (
        {
            "sparsity": 0.5,
            "criterion": "sparsegpt",
            "calibration": torch.zeros(2, 40, dtype=torch.long),
        },
        "context",
    ),
    (
        {"sparsity": {"blocks.0.fc1": 0.5}, "criterion": "magnitude", "layers": ["blocks.0.fc1"]},
        "dict",
    ),
]


@pytest.mark.parametrize("kwargs,match", BAD_CALLS, ids=[m for _, m in BAD_CALLS])
def test_bad_calls_raise_and_change_nothing(kwargs, match):
    m = tiny()
    before = snapshot(m)
    with pytest.raises((ValueError, TypeError), match=match):
        prune_llm(m, **kwargs)
    assert same_snapshot(before, snapshot(m))


def test_already_pruned_or_nan_layers_are_refused():
    m = tiny()
    prune_magnitude(m, 0.5, layers=["blocks.0.fc1"])
    before = snapshot(m)
    with pytest.raises(ValueError, match="already pruned"):
        prune_wanda(m, calib(), 0.5)
    assert same_snapshot(before, snapshot(m))
    m = tiny()
    with torch.no_grad():
        m.blocks[1].fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prune_sparsegpt(m, calib(), 0.5)


def test_sparsity_plan_check_rejects_the_uniform_plan_and_bools():
    from utils.kit.checks_llm import check_sparsity_plan

    m = tiny()
    cal = [calib(4).roll(i, 1) for i in range(3)]
    names = default_layers(m)
    assert check_sparsity_plan(lambda model, t: {n: t for n in names}, m, cal).passed < 3
    assert check_sparsity_plan(lambda model, t: {n: True for n in names}, m, cal).passed == 0


# ----------------------------------------------------------------------------- heads and neurons
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["l2", "taylor"])
def test_shrunk_model_has_fewer_units_and_the_same_outputs_as_the_masked_one(device, dtype, method):
    m, x = tiny(device, dtype), calib(device=device)
    scores = l2_scores(m) if method == "l2" else taylor_scores(m, x[:, :-1], x[:, 1:])
    assert all(p.grad is None for p in m.parameters())
    keep = prune_units(m, 0.5, 0.75, scores)
    assert [int(k.sum()) for k in keep["heads"]] == [2, 2] and [
        int(k.sum()) for k in keep["neurons"]
    ] == [16, 16]
    small = shrink_lm(m)
    assert small.config()["n_heads"] == [2, 2] and small.config()["d_ff"] == [16, 16]
    assert (
        next(small.parameters()).dtype == dtype and next(small.parameters()).device.type == device
    )
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in tiny().parameters())
    with torch.no_grad():
        tol = 1e-4 if dtype == torch.float32 else 0.1
        assert torch.allclose(small(x).float(), m(x).float(), atol=tol)


def test_structured_pruning_never_removes_the_last_unit_and_refuses_bad_scores():
    m = tiny()
    keep = prune_units(m, 0.99, 0.99, l2_scores(m))
    assert all(int(k.sum()) == 1 for k in keep["heads"] + keep["neurons"])
    small = shrink_lm(m)
    assert small.config()["n_heads"] == [1, 1]
    m = tiny()
    before = snapshot(m)
    bad = l2_scores(m)
    bad["heads"][1] = torch.ones(3)
    with pytest.raises(ValueError, match="heads"):
        prune_units(m, 0.5, 0.5, bad)
    with pytest.raises(ValueError, match="head_ratio"):
        prune_units(m, 1.0, 0.5, l2_scores(m))
    assert same_snapshot(before, snapshot(m))


def test_capture_inputs_counts_every_token():
    m = tiny()
    stats = capture_inputs(m, {"blocks.0.fc1": m.blocks[0].fc1}, calib(5), batch_size=2)
    assert stats["blocks.0.fc1"].count == 5 * 16
    assert not m.blocks[0].fc1._forward_hooks


def test_checks_accept_the_library_and_reject_an_empty_stub():
    from utils.kit.checks_llm import check_semi_structured_bytes, check_wanda_score
    from utils.pruning.llm import wanda_scores as lib

    def wanda(weight, inputs):
        return weight.abs() * inputs.reshape(-1, inputs.shape[-1]).pow(2).sum(0).sqrt()

    def via_library(weight, inputs):
        return lib(weight, inputs.reshape(-1, inputs.shape[-1]).float().pow(2).sum(0).sqrt())

    assert check_wanda_score(wanda)
    assert check_wanda_score(via_library).passed == 0  # calling the book's function is blocked
    assert check_semi_structured_bytes(lambda r, c, b: r * c // 2 * (b + 2) // 8)
    assert check_semi_structured_bytes(semi_structured_bytes).passed == 0
    assert torch.equal(
        lib(torch.ones(1, 2), torch.ones(2)), torch.ones(1, 2)
    )  # restored afterwards
    assert check_wanda_score(lambda w, x: None).passed == 0
    # wrong formulas fail: magnitude alone, and the squared norm
    assert not check_wanda_score(lambda w, x: w.abs())
    assert not check_wanda_score(lambda w, x: w.abs() * x.reshape(-1, x.shape[-1]).pow(2).sum(0))
    assert check_semi_structured_bytes(lambda *a: None).passed == 0


def test_wanda_check_blocks_the_library_input_norms():
    from utils.kit.checks_llm import check_wanda_score

    def via_stats(weight, inputs):
        stats = InputStats(inputs.shape[-1], torch.device("cpu"))
        stats.add(inputs)
        return weight.abs() * stats.norms

    assert check_wanda_score(via_stats).passed == 0
