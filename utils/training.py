"""Training and evaluation loops, small and reproducible."""
from __future__ import annotations

import os
import random
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm


def set_seed(seed: int = 0) -> None:
    """Seed Python, NumPy and torch so that the same seed gives the same run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def quiet() -> bool:
    """Progress bars stay off under CI, tests and book builds (set ``PRUNING_BOOK_QUIET=1``)."""
    return bool(os.environ.get("CI") or os.environ.get("PRUNING_BOOK_QUIET"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_of(model: nn.Module) -> torch.device:
    """Where the model lives: its first parameter or buffer; CPU for a model with neither
    (a dynamically quantized model keeps its weights in packed form, not as parameters)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def train(model: nn.Module, train_loader: DataLoader, epochs: int = 1, lr: float = 0.01,
          momentum: float = 0.9, weight_decay: float = 0.0, optimizer: torch.optim.Optimizer | None = None,
          device: torch.device | str | None = None, progress: bool | None = None,
          desc: str = "train", on_step: Callable[[int], None] | None = None) -> list[float]:
    """Train with cross-entropy; SGD with momentum unless an ``optimizer`` is given.

    Pruning masks installed by :mod:`utils.pruning` stay in force: the forward pass
    multiplies by them, so pruned weights get no gradient and stay zero whatever the
    optimizer does to the hidden ``weight_orig``. ``on_step(step)`` is called after every
    optimizer step (steps count from 1), for example to prune gradually. Returns the mean loss
    of each epoch.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    device = torch.device(device) if device is not None else device_of(model)
    model.to(device).train()
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    show = (not quiet()) if progress is None else progress
    history, step = [], 0
    for epoch in range(epochs):
        total, count = 0.0, 0
        bar = tqdm(train_loader, desc=f"{desc} {epoch + 1}/{epochs}", disable=not show, leave=False)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            step += 1
            if on_step is not None:
                on_step(step)
            total += loss.item() * len(y)
            count += len(y)
            bar.set_postfix(loss=f"{total / count:.3f}")
        history.append(total / max(count, 1))
    return history


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str | None = None) -> float:
    """Top-1 accuracy on ``loader`` as a fraction in [0, 1]."""
    device = torch.device(device) if device is not None else device_of(model)
    model.to(device).eval()
    correct = total = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(dim=1)
        correct += int((pred == y.to(device)).sum())
        total += len(y)
    if total == 0:
        raise ValueError("the loader is empty")
    return correct / total
