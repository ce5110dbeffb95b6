"""Models have the documented shapes; counters are exact."""

import torch
from torch import nn

from utils.lab.measure import count_flops, count_params, file_sizes, latency, saved_bytes
from utils.lab.models import VGG, LeNet5, LeNet300100
from utils.pruning import make_permanent, prune_unstructured
from utils.pruning.masks import stored


def test_model_shapes_and_sizes():
    assert LeNet5()(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert LeNet300100()(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert VGG(width=0.25)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert count_params(LeNet5()) == 61_706
    assert count_params(LeNet300100()) == 1024 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10


def test_flops_are_twice_the_macs_of_lenet5():
    macs = 6 * 28 * 28 * 25 + 16 * 10 * 10 * 150 + 400 * 120 + 120 * 84 + 84 * 10
    assert count_flops(LeNet5(), torch.randn(1, 1, 32, 32)) == 2 * macs


def test_nonzero_params_and_bytes():
    model = LeNet5()
    prune_unstructured(model, 0.5)
    weights = sum(
        stored(m).numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    biases = sum(m.bias.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert count_params(model, nonzero=True) == weights // 2 + biases
    assert len(saved_bytes(LeNet5().state_dict())) > 4 * 61_706
    sizes = file_sizes(make_permanent(model).state_dict())
    assert sizes["KB zipped"] < sizes["KB"] * 0.8  # half the weights are zeros: they compress


def test_latency_returns_a_positive_median_per_model():
    lat = latency({"a": LeNet5(), "b": LeNet5()}, torch.randn(1, 1, 32, 32), repeats=3, warmup=1)
    assert set(lat) == {"a", "b"} and all(v > 0 for v in lat.values())


def test_layer_macs_add_up_to_the_flop_counter():
    from utils.lab.measure import layer_macs

    for model, x in [
        (LeNet5(), torch.randn(1, 1, 32, 32)),
        (VGG(width=0.25), torch.randn(2, 3, 32, 32)),
    ]:
        macs = layer_macs(model, x)
        assert 2 * sum(macs.values()) == count_flops(model, x)
    assert layer_macs(LeNet5(), torch.randn(1, 1, 32, 32))["conv1"] == 6 * 28 * 28 * 25


def test_csr_bytes_counts_values_indices_and_row_pointers(recwarn):
    from utils.lab.measure import csr_bytes

    w = torch.zeros(3, 4)
    w[0, 1], w[2, 3] = 1.0, 2.0
    assert csr_bytes(w) == 2 * 4 + 2 * 8 + 4 * 8
    assert not [x for x in recwarn if "beta" in str(x.message)]


def test_count_weights_and_effective_macs():
    from utils.lab.measure import count_weights, effective_macs, layer_macs

    model = LeNet5()
    x = torch.randn(1, 1, 32, 32)
    assert count_weights(model) == 61_470 and count_weights(model, nonzero=True) == 61_470
    assert effective_macs(model, x) == sum(layer_macs(model, x).values())
    prune_unstructured(model, 0.5, scope="local")
    assert (
        count_weights(model) == 61_470 and abs(count_weights(model, nonzero=True) - 61_470 / 2) <= 3
    )
    assert abs(effective_macs(model, x) - sum(layer_macs(model, x).values()) / 2) < 10


def test_median_times_runs_every_candidate_interleaved():
    from utils.lab.measure import median_times

    calls = []
    t = median_times(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1
    )
    assert set(t) == {"a", "b"} and calls == ["a", "b"] + ["a", "b"] * 3


def test_resnet20_has_the_cifar_layout_and_ties_channels_through_its_skips():
    import pytest

    from utils.lab.models import ResNet
    from utils.pruning import prune_structured
    from utils.pruning.surgery import UnsupportedGraphError, shrink

    model = ResNet().eval()  # ResNet-20 at the CIFAR widths (16, 32, 64): 0.27 M parameters
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 18 + 2 and count_params(model) == 272_186
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    assert ResNet(blocks=2, widths=(8, 8, 8), num_classes=3)(torch.zeros(1, 1, 32, 32)).shape == (
        1,
        3,
    )
    prune_structured(model, 0.5)
    with pytest.raises(UnsupportedGraphError, match="addition"):
        shrink(model)  # the skip connections: chapter 5.2 uses Torch-Pruning instead
