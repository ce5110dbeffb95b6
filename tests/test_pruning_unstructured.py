"""Equation 3.1, fixed: exact share, ties, iterative pruning, masks in force, agreement with torch."""

import copy
import io

import pytest
import torch
from conftest import same_snapshot, snapshot, take_steps
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune as torch_prune

from utils.lab.models import LeNet5
from utils.pruning import (
    clone_model,
    effective_weight,
    is_pruned,
    make_permanent,
    prune_structured,
    prune_unstructured,
    smallest_k,
    sparsity,
    sparsity_report,
)
from utils.pruning.masks import mask_of, stored

LAYERS = (nn.Conv2d, nn.Linear)


def random_mlp(sizes, seed, integer_weights=False):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    if integer_weights:  # many exact ties
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randint(-2, 3, m.weight.shape).float())
    return model


def zeros_of(model):
    return {
        n: int((effective_weight(m) == 0).sum())
        for n, m in model.named_modules()
        if isinstance(m, LAYERS)
    }


sizes = st.lists(st.integers(1, 12), min_size=2, max_size=4)
ratios = st.floats(0.0, 1.0)


@given(sizes=sizes, seed=st.integers(0, 10_000), ratio=ratios, ties=st.booleans())
def test_global_prunes_exactly_the_asked_share(sizes, seed, ratio, ties):
    model = random_mlp(sizes, seed, integer_weights=ties)
    masks = prune_unstructured(model, ratio, scope="global")
    n = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(ratio * n)
    # the pruned weights are never larger than the kept ones
    w = {k: effective_weight(mod) for k, mod in model.named_modules() if k in masks}
    orig = {k: stored(mod).detach().abs() for k, mod in model.named_modules() if k in masks}
    pruned = torch.cat([orig[k][~masks[k]] for k in masks])
    kept = torch.cat([orig[k][masks[k]] for k in masks])
    if len(pruned) and len(kept):
        assert pruned.max() <= kept.min()
    assert all(torch.equal(w[k] == 0, ~masks[k] | (orig[k] == 0)) for k in masks)


@given(sizes=sizes, seed=st.integers(0, 10_000), ratio=ratios, ties=st.booleans())
def test_local_prunes_exactly_the_asked_share_per_layer(sizes, seed, ratio, ties):
    model = random_mlp(sizes, seed, integer_weights=ties)
    masks = prune_unstructured(model, ratio, scope="local")
    for m in masks.values():
        assert int((~m).sum()) == round(ratio * m.numel())


def test_ties_are_broken_by_position_and_deterministically():
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 2.0])
    assert smallest_k(scores, 3).tolist() == [True, True, False, True, False, False]
    assert smallest_k(scores, 0).tolist() == [False] * 6
    assert smallest_k(scores, 6).all()
    ones = nn.Linear(10, 10)
    with torch.no_grad():
        ones.weight.fill_(1.0)
    masks = [prune_unstructured(copy.deepcopy(ones), 0.37)[""] for _ in range(2)]
    assert torch.equal(masks[0], masks[1]) and int((~masks[0]).sum()) == 37


@given(seed=st.integers(0, 1000), steps=st.lists(ratios, min_size=1, max_size=4))
def test_iterative_pruning_keeps_pruned_weights_pruned(seed, steps):
    model = random_mlp([6, 9, 5], seed)
    previous = None
    for ratio in sorted(steps):
        masks = prune_unstructured(model, ratio)
        flat = torch.cat([m.reshape(-1) for m in masks.values()])
        assert int((~flat).sum()) == round(ratio * flat.numel())
        if previous is not None:
            assert not (flat & ~previous).any(), "a pruned weight came back"
        previous = flat


def test_repruning_at_the_same_ratio_changes_nothing_and_a_higher_ratio_continues(mlp):
    prune_unstructured(mlp, 0.5)
    before = sparsity(mlp)
    prune_unstructured(mlp, 0.5)
    assert sparsity(mlp) == before
    prune_unstructured(mlp, 0.75)
    n = sum(stored(m).numel() for m in mlp.modules() if isinstance(m, nn.Linear))
    assert round(sparsity(mlp) * n) == round(0.75 * n)


def test_same_masks_as_torch_l1_unstructured_and_global_unstructured():
    torch.manual_seed(3)
    ours, theirs = LeNet5(), None
    theirs = copy.deepcopy(ours)
    prune_unstructured(ours, 0.6, scope="local")
    for m in theirs.modules():
        if isinstance(m, LAYERS):
            torch_prune.l1_unstructured(m, "weight", amount=0.6)
    for name, b in theirs.named_modules():
        if isinstance(b, LAYERS):
            assert torch.equal(mask_of(ours.get_submodule(name)), b.weight_mask)
    ours = LeNet5()
    theirs = copy.deepcopy(ours)
    prune_unstructured(ours, 0.7, scope="global")
    torch_prune.global_unstructured(
        [(m, "weight") for m in theirs.modules() if isinstance(m, LAYERS)],
        pruning_method=torch_prune.L1Unstructured,
        amount=0.7,
    )
    for name, b in theirs.named_modules():
        if isinstance(b, LAYERS):
            assert torch.equal(mask_of(ours.get_submodule(name)), b.weight_mask)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=1e-2),
        lambda p: torch.optim.AdamW(p, lr=0.05),
    ],
)
def test_masks_stay_in_force_during_training(make_opt):
    torch.manual_seed(0)
    model = LeNet5()
    masks = prune_unstructured(model, 0.8)
    opt = make_opt(model.parameters())
    x, y = torch.randn(16, 1, 32, 32), torch.randint(0, 10, (16,))
    take_steps(model, opt, x, y, 5)
    for name, m in model.named_modules():
        if name in masks:
            assert (effective_weight(m)[~masks[name]] == 0).all()
            assert (m.weight[~masks[name]] == 0).all()
    assert sparsity(model) >= 0.8 - 1e-9


def test_only_the_named_layers_are_pruned():
    model = LeNet5()
    masks = prune_unstructured(model, 0.5, layers=["fc1", "conv2"])
    assert set(masks) == {"fc1", "conv2"}
    assert not (mask_of(model.fc2) is not None) and not (mask_of(model.conv1) is not None)
    assert set(prune_unstructured(LeNet5(), 0.1, layers="fc1")) == {"fc1"}


BAD = [
    (dict(ratio=-0.1), ValueError, "ratio"),
    (dict(ratio=1.5), ValueError, "ratio"),
    (dict(ratio=float("nan")), ValueError, "ratio"),
    (dict(ratio="0.5"), TypeError, "ratio"),
    (dict(ratio=True), TypeError, "ratio"),
    (dict(ratio=None), TypeError, "ratio"),
    (dict(ratio=0.5, scope="globl"), ValueError, "scope"),
    (dict(ratio=0.5, layers=["fc9"]), ValueError, "unknown layer"),
    (dict(ratio=0.5, layers=["pool"]), ValueError, "only Linear and convolution"),
    (dict(ratio=0.5, layers=[]), ValueError, "empty"),
    (dict(ratio=0.5, layers=[3]), TypeError, "names"),
]


@pytest.mark.parametrize("kwargs,error,words", BAD)
def test_bad_input_raises_and_leaves_the_model_unchanged(kwargs, error, words):
    model = LeNet5()
    prune_unstructured(model, 0.2)  # already pruned once: the state to keep includes masks
    before = snapshot(model)
    with pytest.raises(error, match=words):
        prune_unstructured(model, **kwargs)
    assert same_snapshot(before, snapshot(model))


def test_nothing_to_prune_nan_weights_and_a_falling_ratio_raise_cleanly():
    with pytest.raises(ValueError, match="no Linear or convolution"):
        prune_unstructured(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        prune_unstructured("model", 0.5)
    model = LeNet5()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN"):
        prune_unstructured(model, 0.5)
    assert same_snapshot(before, snapshot(model))
    for scope in ("global", "local"):
        model = LeNet5()
        prune_unstructured(model, 0.6, scope=scope)
        before = snapshot(model)
        with pytest.raises(ValueError, match="already"):
            prune_unstructured(model, 0.3, scope=scope)
        assert same_snapshot(before, snapshot(model))


def test_sparsity_and_report():
    model = LeNet5()
    assert sparsity(model) == 0.0
    prune_unstructured(model, 0.5, scope="local")
    report = sparsity_report(model)
    assert list(report.index) == ["conv1", "conv2", "fc1", "fc2", "fc3", "total"]
    assert report.loc["fc1", "weights"] == 48000 and report.loc["fc1", "kept"] == 24000
    assert report.loc["total", "sparsity"] == pytest.approx(sparsity(model), abs=1e-4)
    assert "fc1" in str(report)


def test_make_permanent_round_trip_loads_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = LeNet5()
    prune_unstructured(model, 0.9)
    x = torch.randn(3, 1, 32, 32)
    want = model(x)
    make_permanent(model)
    assert not is_pruned(model)
    assert not any(
        "parametrizations" in k or k.endswith(("_orig", "_mask")) for k in model.state_dict()
    )
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = LeNet5()
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert torch.allclose(fresh(x), want)
    assert sparsity(fresh) == pytest.approx(0.9, abs=1e-4)


def test_copies_work_after_training_and_stay_independent():
    """torch.nn.utils.prune's hook left a non-leaf ``weight`` after a backward pass, and
    copy.deepcopy failed on it; a parametrization stores no computed tensor. Folding or
    re-pruning a copy must not touch the original (torch's copies share a generated class)."""
    model = LeNet5()
    prune_unstructured(model, 0.5)
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    x = torch.randn(2, 1, 32, 32)
    want = model(x)
    make_permanent(copy.deepcopy(model))
    prune_structured(copy.deepcopy(model), 0.5)  # masks biases too: a new parametrization
    assert torch.equal(model(x), want) and is_pruned(model)
    assert set(model.state_dict()) == set(clone_model(model).state_dict())
    twin = clone_model(model)
    buf = io.BytesIO()
    torch.save(twin.state_dict(), buf)
    assert sparsity(twin) == sparsity(model)
