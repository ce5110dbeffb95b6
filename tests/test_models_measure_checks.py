"""Models have the documented shapes; counters are exact; exercise checks pass and fail as they should."""
import torch
from torch import nn

from utils.checks import check_row_norms, check_sparsity, check_unstructured_mask
from utils.measure import count_flops, count_params, latency, state_dict_bytes
from utils.models import VGG, LeNet5, LeNet300100
from utils.pruning import prune_unstructured, smallest_k


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
    weights = sum(m.weight_orig.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    biases = sum(m.bias.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert count_params(model, nonzero=True) == weights // 2 + biases
    assert state_dict_bytes(LeNet5()) > 4 * 61_706


def test_latency_returns_a_positive_median_per_model():
    lat = latency({"a": LeNet5(), "b": LeNet5()}, torch.randn(1, 1, 32, 32), repeats=3, warmup=1)
    assert set(lat) == {"a", "b"} and all(v > 0 for v in lat.values())


def test_checks_pass_a_right_answer_and_fail_a_wrong_one(capsys):
    assert check_sparsity(lambda t: float((t == 0).float().mean()))
    assert not check_sparsity(lambda t: float((t != 0).float().mean()))
    assert check_row_norms(lambda w, p: torch.linalg.vector_norm(w.flatten(1), ord=p, dim=1))
    assert not check_row_norms(lambda w, p: torch.linalg.vector_norm(w.flatten(1), ord=p, dim=0))
    assert check_unstructured_mask(lambda w, r: ~smallest_k(w.abs(), round(r * w.numel())))
    # the seed's rule (interpolated percentile, strict >) fails on ties
    assert not check_unstructured_mask(lambda w, r: w.abs() > w.abs().flatten().quantile(r))
    assert not check_unstructured_mask(lambda w, r: 1 / 0)
    out = capsys.readouterr().out
    assert "FAIL" in out and "pass" in out and "ZeroDivisionError" in out
