"""int8_dynamic: the supported API (torchao) where it runs, the deprecated torch.ao behind a guard."""

import warnings

import pytest
import torch
from torch import nn

from utils.lab import quantize
from utils.lab.measure import file_sizes
from utils.lab.quantize import int8_api, int8_dynamic, legacy_available, torchao_available
from utils.pruning import make_permanent, prune_unstructured


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)).eval()


def close_to(model, q, x):
    with torch.no_grad():
        want, got = model(x), q(x)
    return float((got - want).abs().max()) < 0.05 * float(want.abs().max())


APIS = [
    pytest.param(
        "torchao", marks=pytest.mark.skipif(not torchao_available(), reason="torchao does not run")
    ),
    pytest.param(
        "torch.ao", marks=pytest.mark.skipif(not legacy_available(), reason="torch.ao is gone")
    ),
]


@pytest.mark.parametrize("api", APIS)
def test_int8_copy_is_close_4x_smaller_and_leaves_the_original_alone(api):
    model, x = mlp(), torch.randn(8, 1, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecated path must not leak its warnings
        q = int8_dynamic(model, api=api)
    assert close_to(model, q, x)
    assert file_sizes(q.state_dict())["KB"] < 0.3 * file_sizes(model.state_dict())["KB"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def test_auto_prefers_the_supported_api_and_falls_back_behind_the_guard(monkeypatch):
    if torchao_available():
        assert int8_api() == "torchao"
    monkeypatch.setattr(quantize, "torchao_available", lambda: False)
    monkeypatch.setattr(quantize, "torchao_problem", lambda: "ImportError: built for torch 9.9")
    monkeypatch.setattr(quantize, "legacy_available", lambda: True)
    assert int8_api("auto") == "torch.ao"
    with pytest.raises(RuntimeError, match=r"built for torch 9\.9.*pip install 'torchao>=0\.17"):
        int8_api("torchao")
    monkeypatch.setattr(quantize, "legacy_available", lambda: False)
    with pytest.raises(RuntimeError, match="no int8 path"):
        int8_api("auto")
    with pytest.raises(ValueError, match="api must be"):
        int8_api("int4")


def test_a_model_with_masks_is_refused_until_they_are_folded_in():
    model = mlp()
    prune_unstructured(model, 0.5)
    with pytest.raises(ValueError, match="make_permanent"):
        int8_dynamic(model)
    make_permanent(model)
    assert close_to(model, int8_dynamic(model), torch.randn(4, 1, 16, 16))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torchao_int8_runs_on_the_gpu():
    if not torchao_available():
        pytest.skip("torchao does not run")
    model = mlp().cuda()
    q = int8_dynamic(model, api="torchao")
    assert close_to(model, q, torch.randn(8, 1, 16, 16, device="cuda"))
    with pytest.raises(ValueError, match="CPU only"):
        if legacy_available():
            int8_dynamic(model, api="torch.ao")
        else:
            raise ValueError("CPU only")
