"""utils beyond LeNet: every dtype and device, grouped and 1-d/3-d/transposed convolutions, the
classifier found from the graph, untraceable models, tied weights, branches, in-place pruning at
scale, and the exact chunked threshold. Each test here failed before the fix it guards."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import same_snapshot, snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import utils.pruning.threshold as threshold
from utils.lab.measure import count_weights, layer_macs
from utils.lab.models import LeNet5
from utils.pruning import (
    effective_weight,
    is_pruned,
    prune_structured,
    prune_unstructured,
    smallest_k,
    sparsity,
    sparsity_report,
)
from utils.pruning.masks import mask_of, stored
from utils.pruning.surgery import UnsupportedGraphError, _dead_units, _paths, shrink

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def mlp(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)
    ).to(device=device, dtype=dtype)


def zeros(model):
    return sum(
        int((effective_weight(m) == 0).sum()) for m in model.modules() if isinstance(m, nn.Linear)
    )


# ----------------------------------------------------------------------------- dtypes and devices
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", ["global", "local"])
def test_unstructured_keeps_dtype_and_device(dtype, device, scope):
    model = mlp(dtype, device)
    masks = prune_unstructured(model, 0.5, scope=scope)
    assert (
        zeros(model) == round(0.5 * 8 * 16) + round(0.5 * 16 * 12) + round(0.5 * 12 * 4)
        or scope == "global"
    )
    assert zeros(model) == sum(int((~m).sum()) for m in masks.values())
    if scope == "global":
        assert zeros(model) == round(0.5 * (8 * 16 + 16 * 12 + 12 * 4))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert stored(m).dtype == mask_of(m).dtype == m.weight.dtype == dtype
            assert m.weight.device.type == device
    assert model(torch.randn(3, 8, device=device, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_zeroes_exactly_and_keeps_no_mask(dtype, device):
    model = mlp(dtype, device)
    kept = prune_unstructured(model, 0.75, inplace=True)
    n = 8 * 16 + 16 * 12 + 12 * 4
    assert not is_pruned(model) and zeros(model) == round(0.75 * n)
    assert sum(kept.values()) == n - round(0.75 * n)
    assert all(m.weight.dtype == dtype for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_structured_and_shrink_keep_dtype_and_device(dtype, device):
    model = mlp(dtype, device).eval()
    prune_structured(model, 0.5, scope="global")
    small = shrink(model)
    x = torch.randn(5, 8, device=device, dtype=dtype)
    assert small[0].out_features + small[2].out_features == 14  # 28 hidden units, half removed
    assert all(p.dtype == dtype and p.device.type == device for p in small.parameters())
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    assert torch.allclose(small(x).float(), model(x).float(), atol=tol, rtol=tol)


def test_inplace_pruning_writes_through_channels_last_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).to(
        memory_format=torch.channels_last
    )
    kept = prune_unstructured(model, 0.5, inplace=True)
    n = 8 * 3 * 9 + 8 * 8 * 9
    assert sparsity(model) == round(0.5 * n) / n and sum(kept.values()) == n - round(0.5 * n)
    masked = nn.Sequential(nn.Conv2d(3, 8, 3)).to(memory_format=torch.channels_last)
    masks = prune_unstructured(masked, 0.5)
    assert torch.equal(effective_weight(masked[0]) != 0, masks["0"] & (stored(masked[0]) != 0))


# ----------------------------------------------------------------------------- the chunked threshold
def reference_smallest(scores, k):
    order = torch.sort(scores.reshape(-1).double(), stable=True).indices[:k]
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view_as(scores)


@given(
    n=st.integers(1, 300),
    k_share=st.floats(0, 1),
    kind=st.sampled_from(["normal", "ties", "constant"]),
    seed=st.integers(0, 1000),
)
def test_chunked_selection_matches_a_full_sort(n, k_share, kind, seed):
    g = torch.Generator().manual_seed(seed)
    scores = {
        "normal": torch.randn(n, generator=g),
        "ties": torch.randint(-2, 3, (n,), generator=g).float(),
        "constant": torch.zeros(n),
    }[kind]
    k = round(k_share * n)
    with threshold.tuned(small=8, cpu_chunk=7):  # tiny sample and chunks: the bracket path
        assert torch.equal(smallest_k(scores, k), reference_smallest(scores, k))


def test_global_pruning_over_many_chunks_is_exact_with_ties():
    with threshold.tuned(small=16, cpu_chunk=50):
        _global_pruning_is_exact_with_ties()


def _global_pruning_is_exact_with_ties():
    model = mlp()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randint(-3, 4, m.weight.shape).float())
    weights = torch.cat(
        [m.weight.detach().reshape(-1) for m in model.modules() if isinstance(m, nn.Linear)]
    )
    masks = prune_unstructured(model, 0.6)
    got = torch.cat([~m.reshape(-1) for m in masks.values()])
    assert torch.equal(got, reference_smallest(weights.abs(), round(0.6 * len(weights))))


def test_smallest_k_with_infinities_nan_and_strided_scores():
    inf = float("inf")
    assert smallest_k(torch.tensor([-inf, 1.0, 2.0, 3.0]), 1).tolist() == [
        True,
        False,
        False,
        False,
    ]
    assert smallest_k(torch.tensor([1.0, inf, 2.0]), 3).all()
    assert smallest_k(torch.tensor([inf, 1.0, inf]), 2).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="NaN"):
        smallest_k(torch.tensor([1.0, float("nan")]), 1)
    t = torch.arange(12.0).view(3, 4).t()
    assert torch.equal(smallest_k(t, 5), reference_smallest(t, 5))


# ----------------------------------------------------------------------------- layer types
class AllConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 3)
        self.c3 = nn.Conv3d(1, 4, 2)
        self.t2 = nn.ConvTranspose2d(3, 5, 2)
        self.fc = nn.Linear(6 * 6, 3)

    def forward(self, a, b, c):
        return self.fc(F.relu(self.c1(a)).flatten(1)), self.c3(b), self.t2(c)


def test_conv1d_conv3d_and_transposed_convs_are_pruned_and_counted():
    model = AllConvs()
    n = sum(m.weight.numel() for m in model.modules() if not isinstance(m, AllConvs))
    prune_unstructured(model, 0.5)
    assert set(sparsity_report(model).index) == {"c1", "c3", "t2", "fc", "total"}
    assert count_weights(model) == n
    assert abs(sparsity(model) - round(0.5 * n) / n) < 1e-12
    t2 = AllConvs().t2
    prune_structured(t2, 0.4, layers=[""])  # a transposed conv's units are its second axis
    dead = (effective_weight(t2) == 0).all(dim=(0, 2, 3))
    assert int(dead.sum()) == 2 and t2(torch.randn(1, 3, 4, 4))[0, dead].abs().sum() == 0


def test_conv1d_network_shrinks_with_the_same_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 8, 3),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Conv1d(8, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6, 3),
    ).eval()
    prune_structured(model, 0.5)
    small = shrink(model)
    x = torch.randn(4, 2, 10)
    assert (
        small[0].out_channels == 4 and small[3].in_channels == 4 and small[6].in_features == 3 * 6
    )
    assert torch.allclose(small(x), model(x), atol=1e-5)


def test_layer_macs_follow_the_flop_counter_for_any_layer():
    twice = nn.Linear(3, 3)  # called twice: counts twice
    model = nn.Sequential(
        nn.Conv1d(2, 6, 3), nn.Flatten(), nn.Linear(36, 3), nn.ReLU(), twice, nn.ReLU(), twice
    )
    assert layer_macs(model, torch.zeros(1, 2, 8)) == {
        "0": 6 * 6 * 2 * 3,
        "2": 36 * 3,
        "4": 2 * 3 * 3,
    }


# ----------------------------------------------------------------------------- grouped convolutions
def depthwise_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).eval()


@pytest.mark.parametrize("layer", ["0", "2"])
def test_grouped_convolutions_are_refused_never_broken(layer):
    model = depthwise_net()
    prune_structured(model, 0.5, layers=[layer])  # dead units into, or inside, the depthwise conv
    before = snapshot(model)
    with pytest.raises(UnsupportedGraphError, match="grouped convolution"):
        shrink(model)
    assert same_snapshot(before, snapshot(model))


def test_grouped_transposed_conv_with_bias_is_read_per_unit():
    model = nn.Sequential(
        nn.ConvTranspose2d(4, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 2, 1)
    ).eval()
    x = torch.randn(1, 4, 5, 5)
    assert torch.allclose(shrink(model)(x), model(x))  # nothing dead: the same model
    with torch.no_grad():
        model[0].weight[:2, 1] = 0  # group 0, its second output channel: unit 1
        model[0].bias[1] = 0
    with pytest.raises(UnsupportedGraphError, match="grouped"):
        shrink(model)


# ----------------------------------------------------------------------------- the classifier
class HeadFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 10)  # registered first, used last
        self.body = nn.Linear(8, 16)

    def forward(self, x):
        return self.head(F.relu(self.body(x)))


def test_the_output_layer_is_found_from_the_graph_not_the_registration_order():
    model = HeadFirst()
    masks = prune_structured(model, 0.5)
    assert set(masks) == {"body"} and not (mask_of(model.head) is not None)


# ----------------------------------------------------------------------------- untraceable models
class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn_b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)  # registered side by side ...
        self.b, self.bn_a = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.bn_a(self.a(x))  # ... but used crosswise
        if x.sum() > 0:
            x = F.relu(x)
        return self.fc(self.bn_b(self.b(x)).mean((2, 3)))


def test_untraceable_models_do_not_guess_the_batchnorm():
    model = Untraceable()
    with pytest.raises(ValueError, match="name layers= explicitly"):
        prune_structured(model, 0.5)
    with pytest.warns(UserWarning, match="BatchNorms after pruned layers are left unmasked"):
        prune_structured(model, 0.5, layers=["a"])
    assert not is_pruned(model.bn_b) and not is_pruned(model.bn_a)


# ----------------------------------------------------------------------------- what shrink keeps
def test_shrink_keeps_dtype_device_frozen_flags_and_mode():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 2),
    ).double()
    model[0].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    prune_structured(model, 0.5)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        small = shrink(model)
        assert small[1].weight.dtype == small[1].running_mean.dtype == torch.float64
        assert not small[0].weight.requires_grad and not small[1].bias.requires_grad
        assert small[3].weight.requires_grad and small.training == (mode == "train")
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        assert small[0].out_channels == 4 and torch.allclose(small(x), model(x))


class ViewFlatten(LeNet5):
    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(x.size(0), -1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def test_view_with_the_batch_size_is_supported():
    model = ViewFlatten().eval()
    prune_structured(model, 0.5)
    small = shrink(model)
    x = torch.randn(3, 1, 32, 32)
    assert small.conv2.out_channels == 8 and small.fc1.in_features == 8 * 25
    assert torch.allclose(small(x), model(x), atol=1e-5)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).mean((2, 3)))


def test_a_refusal_names_the_real_blocker():
    model = Concat()
    prune_structured(model, 0.5, layers=["a"])
    with pytest.raises(UnsupportedGraphError, match="'cat'") as err:
        shrink(model)
    assert "residual" not in str(err.value)


class SharedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3, self.bn = (
            nn.Conv2d(3, 4, 3),
            nn.Conv2d(4, 4, 3),
            nn.Conv2d(4, 2, 3),
            nn.BatchNorm2d(4),
        )

    def forward(self, x):
        return self.c3(self.bn(self.c2(F.relu(self.bn(self.c1(x))))))


def test_a_batchnorm_called_twice_is_neither_masked_for_one_layer_nor_cut():
    model = SharedNorm().eval()
    prune_structured(model, 0.5, layers=["c1"])
    assert not is_pruned(model.bn)
    with torch.no_grad():
        model.bn.bias.zero_()
        model.bn.running_mean.zero_()
    with pytest.raises(UnsupportedGraphError, match="BatchNorm 'bn'"):
        shrink(model)


class Reshape3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(36, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.size(0), y.size(1), -1)).mean(1)


def test_a_reshape_that_is_not_a_flatten_only_blocks_a_cut():
    model = Reshape3d().eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(shrink(model)(x), model(x))  # nothing to cut: no refusal
    prune_structured(model, 0.5, layers=["conv"])
    with pytest.raises(UnsupportedGraphError, match="'view'"):
        shrink(model)


def test_a_batchnorm_without_affine_parameters_is_reported():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(), nn.Conv2d(4, 2, 3)
    )
    with pytest.warns(UserWarning, match="no affine parameters"):
        prune_structured(model, 0.5)


# ----------------------------------------------------------------------------- branches
class TwoPaths(nn.Module):
    """One conv read twice: through a BatchNorm, and raw."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.after_bn, self.raw = nn.Conv2d(4, 2, 3), nn.Conv2d(4, 2, 3)

    def forward(self, x):
        y = self.conv(x)
        return (self.after_bn(F.relu(self.bn(y))) + self.raw(y)).mean((2, 3))


def test_only_units_dead_on_every_path_are_cut():
    model = TwoPaths().eval()
    with torch.no_grad():
        model.bn.weight[0] = model.bn.bias[0] = 0  # channel 0 is dead after the BatchNorm only
    small = shrink(model)
    x = torch.randn(2, 3, 8, 8)
    assert small.conv.out_channels == 4 and torch.allclose(small(x), model(x), atol=1e-6)


def test_a_dead_filter_before_a_batchnorm_with_a_running_mean_is_kept():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3)
    ).eval()
    with torch.no_grad():
        model[0].weight[1] = model[0].bias[1] = 0
        model[1].running_mean.fill_(0.5)  # eval: (0 - 0.5) * gamma / std + 0 is not zero
    modules = dict(model.named_modules())
    graph_node = [n for n in torch.fx.symbolic_trace(model).graph.nodes if n.target == "0"][0]
    assert not _dead_units(model[0], _paths(graph_node, modules, conv=True), modules).any()
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(shrink(model)(x), model(x), atol=1e-6)
    with torch.no_grad():
        model[1].running_mean.zero_()
    assert shrink(model)[0].out_channels == 3


# ----------------------------------------------------------------------------- tied weights
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(6, 6), nn.Linear(6, 6)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(F.relu(self.first(x)))


def test_a_tied_tensor_is_counted_and_masked_once():
    model = Tied()
    masks = prune_unstructured(model, 0.5)
    assert torch.equal(masks["first"], masks["second"]) and int((~masks["first"]).sum()) == 18
    assert sparsity(model) == 0.5 and count_weights(model) == 36
    assert stored(model.first) is stored(model.second)


class TiedEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.embed(tokens))


def test_a_tensor_shared_with_an_unpruned_module_is_refused_unless_in_place():
    model = TiedEmbedding()
    before = snapshot(model)
    with pytest.raises(ValueError, match="shared with embed"):
        prune_unstructured(model, 0.5)
    assert same_snapshot(before, snapshot(model))
    prune_unstructured(model, 0.5, inplace=True)
    assert int((model.embed.weight == 0).sum()) == 20  # the embedding sees the same zeros


# ----------------------------------------------------------------------------- bad input
def test_inplace_bad_input_raises_and_changes_nothing():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or infinite"):
        prune_unstructured(model, 0.5, inplace=True)
    with pytest.raises(TypeError, match="inplace"):
        prune_unstructured(model, 0.5, inplace="yes")
    assert same_snapshot(before, snapshot(model))
    masked = mlp()
    prune_unstructured(masked, 0.5)
    with pytest.raises(ValueError, match="make_permanent"):
        prune_unstructured(masked, 0.7, inplace=True)


def test_computed_weights_are_refused_before_anything_changes():
    model = nn.Sequential(
        nn.Linear(4, 4), nn.ReLU(), nn.utils.parametrizations.weight_norm(nn.Linear(4, 2))
    )
    before = snapshot(model)
    for call in (
        lambda: prune_unstructured(model, 0.5),
        lambda: prune_unstructured(model, 0.5, inplace=True),
        lambda: prune_structured(model, 0.5, layers=["0", "2"]),
    ):
        with pytest.raises(ValueError, match="computed"):
            call()
        assert same_snapshot(before, snapshot(model))


# ----------------------------------------------------------------------------- the core stays small
def test_the_library_loads_no_book_helper_nor_a_heavy_package():
    code = (
        "import sys, torch; before = set(sys.modules); "
        "import utils.pruning, utils.pruning.surgery, utils.pruning.graph, utils.pruning.threshold; "
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in "
        "('pandas', 'matplotlib', 'tqdm', 'mlxtend', 'yaml', 'psutil', 'sklearn') or "
        "(m.startswith('utils.') and not m.startswith('utils.pruning'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
