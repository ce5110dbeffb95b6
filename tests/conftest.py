"""Shared fixtures and settings for the unit and property tests."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

sys.path.insert(
    0, str(Path(__file__).resolve().parent.parent / "scripts")
)  # bookconf, the scripts' helpers
os.environ.setdefault("PRUNING_BOOK_QUIET", "1")
_SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
if _SHARED.is_dir():  # the development and CI layout: data beside the project, not in it
    os.environ.setdefault("PRUNING_BOOK_DATA_DIR", str(_SHARED))
torch.set_num_threads(2)
settings.register_profile(
    "book", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("book")


def load_file(path: Path, name: str = ""):
    """Import a script or extension that is not part of the package (scripts/, book/_ext/)."""
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def snapshot(model: nn.Module) -> dict:
    """Everything that describes the model's state: tensors by name (masks included), its modules
    and their classes (a parametrization changes the class), and any hooks."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hooks = [(name, type(m), len(m._forward_pre_hooks)) for name, m in model.named_modules()]
    return {"state": state, "hooks": hooks}


def same_snapshot(a: dict, b: dict) -> bool:
    return (
        a["hooks"] == b["hooks"]
        and a["state"].keys() == b["state"].keys()
        and all(_equal(a["state"][k], b["state"][k]) for k in a["state"])
    )


def _equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit-for-bit equal, NaN matching NaN."""
    if x.is_floating_point():
        return x.shape == y.shape and bool(torch.allclose(x, y, rtol=0, atol=0, equal_nan=True))
    return torch.equal(x, y)


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)
    )


def take_steps(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int
) -> None:
    """A few optimizer steps on one batch, then a forward pass so that masked weights are recomputed."""
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model(x)
