"""Equation 3.2, fixed: whole units by L_p norm, exact counts, silenced bias and BatchNorm."""

import copy

import pytest
import torch
from conftest import same_snapshot, snapshot, take_steps
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune as torch_prune

from utils.lab.models import VGG, LeNet5
from utils.pruning import effective_weight, prune_structured, prune_unstructured, unit_norms
from utils.pruning.masks import mask_of, set_mask, stored

HIDDEN = ["conv1", "conv2", "fc1", "fc2"]


def dead_units(module):
    w = effective_weight(module)
    return (w.reshape(w.shape[0], -1) == 0).all(dim=1)


@given(
    ratio=st.floats(0, 1),
    seed=st.integers(0, 1000),
    p=st.sampled_from([1.0, 2.0, 3.0, float("inf")]),
)
def test_local_removes_exactly_round_ratio_units_per_layer_never_all(ratio, seed, p):
    torch.manual_seed(seed)
    model = LeNet5()
    masks = prune_structured(model, ratio, scope="local", p=p)
    assert list(masks) == HIDDEN  # the classifier fc3 is skipped by default
    for name in HIDDEN:
        m = getattr(model, name)
        units = stored(m).shape[0]
        assert int(dead_units(m).sum()) == min(round(ratio * units), units - 1)
        # removed units have smaller norms than kept ones (ties aside)
        norms = torch.linalg.vector_norm(stored(m).detach().reshape(units, -1), ord=p, dim=1)
        gone = dead_units(m)
        if gone.any() and (~gone).any():
            assert norms[gone].max() <= norms[~gone].min()


@given(ratio=st.floats(0, 1), seed=st.integers(0, 1000))
def test_global_removes_exactly_round_ratio_units_overall(ratio, seed):
    torch.manual_seed(seed)
    model = LeNet5()
    prune_structured(model, ratio, scope="global")
    units = [stored(getattr(model, n)).shape[0] for n in HIDDEN]
    dead = [int(dead_units(getattr(model, n)).sum()) for n in HIDDEN]
    assert sum(dead) == min(round(ratio * sum(units)), sum(units) - len(units))
    assert all(d < u for d, u in zip(dead, units))


@given(
    ratio=st.floats(0, 1),
    seed=st.integers(0, 1000),
    scope=st.sampled_from(["local", "global"]),
    round_to=st.sampled_from([1, 2, 4, 8, 64]),
)
def test_round_to_keeps_a_multiple_per_layer_by_sparing_the_strongest(ratio, seed, scope, round_to):
    torch.manual_seed(seed)
    plain = VGG(width=0.25)
    rounded = copy.deepcopy(plain)
    exact = prune_structured(plain, ratio, scope=scope)
    got = prune_structured(rounded, ratio, scope=scope, round_to=round_to)
    assert list(got) == list(exact)
    for name in got:
        m = rounded.get_submodule(name)
        units = stored(m).shape[0]
        kept_exact = units - int(dead_units(plain.get_submodule(name)).sum())
        gone = dead_units(m)
        assert units - int(gone.sum()) == min(units, -(-kept_exact // round_to) * round_to)
        assert not (gone & ~dead_units(plain.get_submodule(name))).any()  # only spares units
        norms = torch.linalg.vector_norm(stored(m).detach().reshape(units, -1), dim=1)
        spared = ~gone & dead_units(plain.get_submodule(name))
        if spared.any() and gone.any():
            assert norms[spared].min() >= norms[gone].max()  # the strongest are spared
    if round_to == 1:
        assert all(torch.equal(got[n], exact[n]) for n in got)


def test_round_to_never_spares_units_pruned_earlier():
    layer = nn.Linear(4, 12)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(12, 2))
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 13.0)[:, None].expand(12, 4))  # unit i: norm ~ i
    keep = torch.ones(12, 4, dtype=torch.bool)
    keep[:6] = False  # six units pruned earlier in the weight only (their biases still live)
    set_mask(layer, "weight", keep)
    prune_structured(model, 0.5, round_to=8)  # 6 asked, all pruned earlier: 6 kept, not 8
    assert torch.equal(dead_units(layer), torch.arange(12) < 6)
    assert torch.equal(mask_of(layer, "bias"), (torch.arange(12) >= 6).float())


def test_round_to_counts_in_a_layer_off_the_multiple_and_with_ties():
    torch.manual_seed(0)
    model = LeNet5()  # fc2 has 84 units: 42 kept at 0.5, rounded up to 48
    prune_structured(model, 0.5, round_to=8)
    assert int((~dead_units(model.fc2)).sum()) == 48
    layer = nn.Linear(4, 16)
    with torch.no_grad():
        layer.weight.fill_(1.0)  # all tied: the earliest are pruned, the later ones spared
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(16, 2))
    prune_structured(model, 0.75, round_to=8)  # 12 asked, 4 kept, rounded up to 8
    assert torch.equal(dead_units(layer), torch.arange(16) < 8)


def test_round_to_with_rising_ratios():
    torch.manual_seed(1)
    model = VGG(width=0.25)
    for ratio in (0.2, 0.45, 0.7):
        before = {n: dead_units(model.get_submodule(n)) for n in ("features.0", "features.4")}
        prune_structured(model, ratio, round_to=4)
        for name, was in before.items():
            gone = dead_units(model.get_submodule(name))
            assert not (was & ~gone).any()  # what was pruned stays pruned
            units, kept = gone.numel(), int((~gone).sum())
            assert kept % 4 == 0 or kept == units - int(was.sum())


def test_global_scores_ignore_the_scale_of_a_layer():
    """Scaling one layer's weights (as BatchNorm makes harmless) must not change the choice."""
    torch.manual_seed(0)
    a = LeNet5()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.fc1.weight.mul_(100.0)
    ma, mb = prune_structured(a, 0.4, scope="global"), prune_structured(b, 0.4, scope="global")
    assert all(torch.equal(ma[n], mb[n]) for n in ma)


@pytest.mark.parametrize("p", [1, 2])
def test_same_masks_as_torch_ln_structured(p):
    torch.manual_seed(1)
    ours = LeNet5()
    theirs = copy.deepcopy(ours)
    masks = prune_structured(ours, 0.5, p=p)
    for name in HIDDEN:
        torch_prune.ln_structured(getattr(theirs, name), "weight", amount=0.5, n=p, dim=0)
        assert torch.equal(masks[name], getattr(theirs, name).weight_mask.bool())


def test_removed_units_output_exactly_zero_bias_and_batchnorm_included():
    torch.manual_seed(0)
    model = VGG(width=0.125)
    for m in model.modules():  # non-trivial BatchNorm parameters and statistics
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                (
                    m.weight.normal_(),
                    m.bias.normal_(),
                    m.running_mean.normal_(),
                    m.running_var.uniform_(0.5, 2),
                )
    prune_structured(model, 0.5)
    conv, bn = model.features[0], model.features[1]
    seen = {}
    bn.register_forward_hook(lambda mod, i, o: seen.update(out=o))
    x = torch.randn(4, 3, 32, 32)
    for mode in (model.train, model.eval):
        mode()
        model(x)
        assert (seen["out"][:, dead_units(conv)] == 0).all()
    lenet = LeNet5()
    prune_structured(lenet, 0.5)
    out = lenet.fc1(torch.randn(5, 400))
    assert (out[:, dead_units(lenet.fc1)] == 0).all() and (
        out[:, ~dead_units(lenet.fc1)] != 0
    ).any()


def test_masks_stay_in_force_during_training_with_batchnorm():
    torch.manual_seed(0)
    model = VGG(width=0.125)
    prune_structured(model, 0.5, scope="global")
    gone = {
        n: dead_units(m)
        for n, m in model.named_modules()
        if (mask_of(m) is not None) and m.weight.dim() > 1
    }
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    take_steps(model, opt, x, y, 3)
    for n, m in model.named_modules():
        if n in gone:
            assert torch.equal(dead_units(m), gone[n])
    bn = model.features[1]
    assert (bn.weight[gone["features.0"]] == 0).all() and (bn.bias[gone["features.0"]] == 0).all()


def test_stacks_on_unstructured_masks():
    model = LeNet5()
    first = prune_unstructured(model, 0.3, scope="local")
    second = prune_structured(model, 0.5)
    for name in HIDDEN:
        assert not (second[name] & ~first[name]).any()


def test_unit_norms_are_rows_not_columns():
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0]])
    layer = nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(w)
    assert torch.allclose(unit_norms(layer, 2), torch.tensor([5.0, 1.0, 1.0]))


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(ratio=0.5, p=0), ValueError, "p must be > 0"),
        (dict(ratio=0.5, p=-1), ValueError, "p must"),
        (dict(ratio=0.5, p=float("nan")), ValueError, "p must"),
        (dict(ratio=0.5, p="2"), TypeError, "p must"),
        (dict(ratio=2.0), ValueError, "ratio"),
        (dict(ratio=0.5, scope="all"), ValueError, "scope"),
        (dict(ratio=0.5, layers=["nope"]), ValueError, "unknown layer"),
        (dict(ratio=0.5, round_to=0), ValueError, "round_to"),
        (dict(ratio=0.5, round_to=-8), ValueError, "round_to"),
        (dict(ratio=0.5, round_to=2.5), TypeError, "round_to"),
        (dict(ratio=0.5, round_to=True), TypeError, "round_to"),
    ],
)
def test_bad_input_raises_and_leaves_the_model_unchanged(kwargs, error, words):
    model = VGG(width=0.125)
    prune_structured(model, 0.25)
    before = snapshot(model)
    with pytest.raises(error, match=words):
        prune_structured(model, **kwargs)
    assert same_snapshot(before, snapshot(model))


def test_falling_ratio_and_classifier_only_models_raise():
    model = LeNet5()
    prune_structured(model, 0.5)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already"):
        prune_structured(model, 0.25)
    assert same_snapshot(before, snapshot(model))
    with pytest.raises(ValueError, match="every prunable layer produces the model's output"):
        prune_structured(nn.Linear(4, 2), 0.5)
    assert set(prune_structured(nn.Linear(4, 2), 0.5, layers=[""])) == {""}


@given(
    rows=st.integers(1, 6), groups=st.integers(1, 5), seed=st.integers(0, 1000), ints=st.booleans()
)
def test_semi_structured_mask_keeps_the_two_largest_of_every_four(rows, groups, seed, ints):
    from utils.pruning import semi_structured_mask

    g = torch.Generator().manual_seed(seed)
    w = (
        torch.randint(-2, 3, (rows, 4 * groups), generator=g).float()
        if ints
        else torch.randn(rows, 4 * groups, generator=g)
    )
    mask = semi_structured_mask(w)
    blocks, kept = w.abs().reshape(-1, 4), mask.reshape(-1, 4)
    assert (kept.sum(dim=1) == 2).all()
    assert (
        blocks.masked_fill(~kept, float("inf")).min(dim=1).values
        >= blocks.masked_fill(kept, -1).max(dim=1).values
    ).all()


def test_semi_structured_mask_rejects_bad_shapes():
    from utils.pruning import semi_structured_mask

    with pytest.raises(ValueError, match="multiple of m=4"):
        semi_structured_mask(torch.randn(3, 6))
    with pytest.raises(ValueError, match="0 < n <= m"):
        semi_structured_mask(torch.randn(3, 8), n=5, m=4)
    assert semi_structured_mask(torch.tensor([[1.0, 1.0, 1.0, 1.0]])).tolist() == [
        [True, True, False, False]
    ]
