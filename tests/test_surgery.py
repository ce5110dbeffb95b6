"""shrink: a physically smaller model with the same outputs, or a clear refusal."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from utils.lab.measure import count_flops, count_params
from utils.lab.models import VGG, LeNet5, LeNet300100
from utils.pruning import is_pruned, prune_structured, prune_unstructured
from utils.pruning.surgery import UnsupportedGraphError, shrink


def randomize_batchnorm(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                (
                    m.weight.normal_(),
                    m.bias.normal_(),
                    m.running_mean.normal_(),
                    m.running_var.uniform_(0.5, 2),
                )


@given(ratio=st.floats(0, 1), scope=st.sampled_from(["local", "global"]), seed=st.integers(0, 500))
def test_shrunk_lenet5_gives_the_same_outputs_with_fewer_params_and_flops(ratio, scope, seed):
    torch.manual_seed(seed)
    model = LeNet5().eval()
    prune_structured(model, ratio, scope=scope)
    small = shrink(model)
    x = torch.randn(4, 1, 32, 32)
    assert torch.allclose(small(x), model(x), atol=1e-5)
    assert not is_pruned(small) and is_pruned(model)  # the original keeps its masks
    if ratio >= 0.25:
        assert count_params(small) < count_params(model)
        assert count_flops(small, x) < count_flops(model, x)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_shrunk_vgg_with_batchnorm_gives_the_same_outputs(mode):
    torch.manual_seed(0)
    model = VGG(width=0.25)
    randomize_batchnorm(model)
    prune_structured(model, 0.5, scope="global")
    getattr(model, mode)()
    small = shrink(model)
    assert small.training == model.training
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(small(x), model(x), atol=1e-4)
    ratio = count_flops(model.eval(), x) / count_flops(small.eval(), x)
    assert ratio > 2.5  # half the channels on both sides of most convolutions: about 4x fewer MACs


def test_vgg_half_channels_local_is_about_a_quarter_of_the_macs():
    model = VGG(width=0.25).eval()
    prune_structured(model, 0.5, scope="local")
    small = shrink(model)
    x = torch.randn(1, 3, 32, 32)
    convs = [m for m in small.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 32, 64, 64]
    assert 3.0 < count_flops(model, x) / count_flops(small, x) < 4.0


def test_shrink_lenet300100_and_an_unpruned_model():
    torch.manual_seed(0)
    model = LeNet300100().eval()
    prune_structured(model, 0.7)
    small = shrink(model)
    assert (small.fc1.out_features, small.fc2.in_features, small.fc2.out_features) == (90, 90, 30)
    x = torch.randn(3, 1, 32, 32)
    assert torch.allclose(small(x), model(x), atol=1e-5)
    dense = LeNet5()
    assert count_params(shrink(dense)) == count_params(dense)


def test_unstructured_zeros_do_not_remove_units_unless_a_whole_unit_is_dead():
    torch.manual_seed(0)
    model = LeNet5()
    prune_unstructured(model, 0.5)
    assert count_params(shrink(model)) == count_params(model)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv2(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_residual_addition_is_refused_with_a_pointer_to_torch_pruning():
    model = Residual().eval()
    prune_structured(model, 0.5, layers=["conv2"])
    with pytest.raises(UnsupportedGraphError, match="Torch-Pruning"):
        shrink(model)
    inner = Residual().eval()  # units inside the block (conv1 -> bn1 -> relu -> conv2) can be cut
    prune_structured(inner, 0.5, layers=["conv1"])
    small = shrink(inner)
    x = torch.randn(2, 3, 8, 8)
    assert small.conv1.out_channels == 4 and small.conv2.in_channels == 4
    assert torch.allclose(small(x), inner(x), atol=1e-5)


class SeedStyle(LeNet5):
    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Untraceable(LeNet5):
    def forward(self, x):
        if x.sum() > 0:
            return super().forward(x)
        return super().forward(-x)


def test_hard_coded_view_and_untraceable_models_raise_clearly():
    model = SeedStyle()
    prune_structured(model, 0.5)
    with pytest.raises(ValueError, match="torch.flatten"):
        shrink(model)
    model = Untraceable()
    with pytest.raises(ValueError, match="cannot trace.*name layers= explicitly"):
        prune_structured(model, 0.5)  # without the graph the classifier is unknown
    prune_structured(model, 0.5, layers=["conv1", "fc1"])
    with pytest.raises(ValueError, match="cannot trace"):
        shrink(model)
    with pytest.raises(TypeError):
        shrink("model")
