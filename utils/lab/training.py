"""Training and evaluation loops, small and reproducible, on the CPU or a GPU.

A chapter picks its device once (``device = pick_device()``) and passes it to :func:`train`;
the loops move each batch to the model's device and dtype, so the same code runs on either.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels, x)


def set_seed(seed: int = 0) -> None:
    """Seed Python, NumPy and torch so that the same seed gives the same run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def quiet() -> bool:
    """Progress bars stay off under CI, tests and book builds (set ``PRUNING_BOOK_QUIET=1``)."""
    return bool(os.environ.get("CI") or os.environ.get("PRUNING_BOOK_QUIET"))


def pick_device(prefer: str | None = None) -> torch.device:
    """``cuda`` when a CUDA GPU is present, else ``cpu``; ``prefer`` (or ``$PRUNING_BOOK_DEVICE``)
    forces one, for example ``"cpu"`` to reproduce the site's numbers on a GPU runtime."""
    choice = (
        prefer
        or os.environ.get("PRUNING_BOOK_DEVICE")
        or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {choice!r} was asked for, but torch sees no CUDA GPU")
    return device


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (inputs are cast to it)."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return None


def _to(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    return x.to(
        device=device, dtype=dtype if (dtype is not None and x.is_floating_point()) else None
    )


class _On:
    """Context: the model on ``device`` inside, back where it was afterwards (also on error)."""

    def __init__(self, model: nn.Module, device: torch.device | str | None):
        self.model, self.home = model, device_of(model)
        self.device = torch.device(device) if device is not None else self.home

    def __enter__(self) -> torch.device:
        if self.device != self.home:
            self.model.to(self.device)
        return self.device

    def __exit__(self, *exc) -> None:
        if self.device != self.home:
            self.model.to(self.home)


def device_of(model: nn.Module) -> torch.device:
    """Where the model lives: its first parameter or buffer; CPU for a model with neither
    (a dynamically quantized model keeps its weights in packed form, not as parameters)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def train(
    model: nn.Module,
    train_loader: DataLoader,
    epochs: int = 1,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    desc: str = "train",
    on_step: Callable[[int], None] | None = None,
    loss: Loss | None = None,
) -> list[float]:
    """Train with cross-entropy (or ``loss``); SGD with momentum unless an ``optimizer`` is given.

    The loop runs on the model's device, batches moved there (and cast to its floating dtype).
    ``device="cuda"`` runs it on that device instead and puts the model back where it was
    afterwards, so the rest of a chapter keeps working with CPU tensors. Pruning masks installed by
    :mod:`utils.pruning` stay in force: the forward pass multiplies by them, so pruned weights get
    no gradient and stay zero whatever the optimizer does to the stored original
    (``utils.pruning.masks``).
    ``on_step(step)`` is called after every optimizer step (steps count from 1), for example to
    prune gradually. ``loss(logits, labels, inputs)`` replaces cross-entropy, for example
    :class:`Distillation`. Returns the mean loss of each epoch.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    with _On(model, device) as device:
        return _train_loop(
            model,
            train_loader,
            epochs,
            lr,
            momentum,
            weight_decay,
            optimizer,
            device,
            progress,
            desc,
            on_step,
            loss,
        )


def _train_loop(
    model,
    train_loader,
    epochs,
    lr,
    momentum,
    weight_decay,
    optimizer,
    device,
    progress,
    desc,
    on_step,
    loss,
) -> list[float]:
    model.train()
    dtype = _float_dtype(model)
    opt = optimizer or torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    cross_entropy = nn.CrossEntropyLoss()
    loss_fn = loss or (lambda logits, y, x: cross_entropy(logits, y))
    show = (not quiet()) if progress is None else progress
    history, step = [], 0
    for epoch in range(epochs):
        total, count = 0.0, 0
        bar = tqdm(train_loader, desc=f"{desc} {epoch + 1}/{epochs}", disable=not show, leave=False)
        for x, y in bar:
            x, y = _to(x, device, dtype), y.to(device)
            opt.zero_grad(set_to_none=True)
            value = loss_fn(model(x).float(), y, x)
            value.backward()
            opt.step()
            step += 1
            if on_step is not None:
                on_step(step)
            total += value.item() * len(y)
            count += len(y)
            bar.set_postfix(loss=f"{total / count:.3f}")
        history.append(total / max(count, 1))
    return history


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device | str | None = None
) -> float:
    """Top-1 accuracy on ``loader`` as a fraction in [0, 1], on the model's device unless
    ``device`` says otherwise (then the model goes back where it was afterwards)."""
    model.eval()
    correct = total = 0
    with _On(model, device) as device:
        dtype = _float_dtype(model)
        for x, y in loader:
            pred = model(_to(x, device, dtype)).argmax(dim=1)
            correct += int((pred == y.to(device)).sum())
            total += len(y)
    if total == 0:
        raise ValueError("the loader is empty")
    return correct / total


def fine_tune(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    lrs: tuple[float, ...] = (0.003, 0.01, 0.03),
    epochs: int = 2,
    seed: int = 0,
    weight_decay: float = 5e-4,
    device: torch.device | str | None = None,
    loss: Loss | None = None,
) -> tuple[nn.Module, dict]:
    """Fine-tune a copy of ``model`` at each learning rate for up to ``epochs`` epochs and
    return the copy, and its record, with the best **validation** accuracy.

    Every (learning rate, epoch count) pair is a candidate, so the budget and the learning rate
    are both chosen on validation, never on test. Ties go to fewer epochs, then the smaller
    rate. Each run starts from ``model`` and sees the training set in the same order, shuffled
    by ``seed`` in batches of ``train_loader``'s size (whatever that loader's own shuffling has
    done before), so the choice does not depend on what ran earlier. Masks of
    :mod:`utils.pruning` stay in force, and ``model`` itself is left as it was. ``loss`` as
    for :func:`train` (for example :class:`Distillation`; the choice is still made on accuracy).
    """
    from utils.pruning import clone_model  # the one pruning helper the loops need

    if not lrs or any(not lr > 0 for lr in lrs):
        raise ValueError(f"lrs must be positive learning rates, got {lrs!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    best, record = None, {"val": -1.0}
    for lr in sorted(lrs):
        m = clone_model(model)
        set_seed(seed)
        order = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            train_loader.dataset, batch_size=train_loader.batch_size, shuffle=True, generator=order
        )
        opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        for epoch in range(1, epochs + 1):
            train(m, loader, epochs=1, optimizer=opt, device=device, progress=False, loss=loss)
            val = evaluate(m, val_loader, device=device)
            better = val > record["val"] or (val == record["val"] and epoch < record["epochs"])
            if better:
                best, record = clone_model(m), {"lr": lr, "epochs": epoch, "val": val}
    return best, record


class SharedRate:
    """Fine-tuning for an experiment over several networks: for each setting (``key``, such as
    a method and a sparsity) the learning rate is chosen on the validation digits of the first
    network tuned for it, then reused for the others; every network still chooses its own number
    of epochs on validation. This costs one grid per setting instead of one per network.
    ``picked`` holds the chosen rates.
    """

    def __init__(
        self,
        train_loader: DataLoader,
        val_loader: DataLoader,
        lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1),
        epochs: int = 2,
        device: torch.device | str | None = None,
    ) -> None:
        self.train_loader, self.val_loader = train_loader, val_loader
        self.lrs, self.epochs, self.device = lrs, epochs, device
        self.picked: dict = {}

    def __call__(
        self,
        model: nn.Module,
        key,
        seed: int,
        epochs: int | None = None,
        loss: Loss | None = None,
    ) -> tuple[nn.Module, dict]:
        """Fine-tune ``model`` for setting ``key`` (with ``loss``, as for :func:`train`); returns
        the copy and its record."""
        lrs = (self.picked[key],) if key in self.picked else self.lrs
        best, record = fine_tune(
            model,
            self.train_loader,
            self.val_loader,
            lrs=lrs,
            epochs=epochs or self.epochs,
            seed=seed,
            device=self.device,
            loss=loss,
        )
        self.picked.setdefault(key, record["lr"])
        return best, record


def _check_distillation(temperature: float, alpha: float) -> None:
    if not temperature > 0 or not 0 <= alpha <= 1:
        raise ValueError(f"need temperature > 0 and 0 <= alpha <= 1, got {temperature}, {alpha}")


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): ``alpha`` times the KL divergence from the
    teacher's to the student's softened distribution (temperature ``T``), scaled by ``T**2`` so
    that its gradients keep their size as ``T`` grows, plus ``1 - alpha`` times cross-entropy with
    the labels. Logits of shape (batch, classes); the mean over the batch."""
    _check_distillation(temperature, alpha)
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(
            f"student and teacher logits must be (batch, classes), got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    t = temperature
    soft = nn.functional.kl_div(
        nn.functional.log_softmax(student / t, dim=1),
        nn.functional.log_softmax(teacher / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * t * t * soft + (1 - alpha) * nn.functional.cross_entropy(student, labels)


class Distillation:
    """A ``loss`` for :func:`train` and :func:`fine_tune`: :func:`distillation_loss` against a
    fixed ``teacher`` (run in eval mode, without gradients, on the same inputs)."""

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9) -> None:
        _check_distillation(temperature, alpha)  # bad settings fail here, not mid-training
        self.teacher, self.temperature, self.alpha = teacher.eval(), temperature, alpha

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher(x.to(device_of(self.teacher))).float().to(logits.device)
        return distillation_loss(logits, target, labels, self.temperature, self.alpha)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, batches: int = 10) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on ``batches`` batches of
    ``loader``, in place, and return the model in eval mode.

    Pruning channels changes what every later layer receives, so the statistics stored during
    training no longer describe its inputs, and a pruned network can fall to chance accuracy
    before any retraining; re-estimating them costs a few forward passes and no gradient step
    ("adaptive BatchNorm", Li et al. 2020). The estimate is the plain average over the batches
    (``momentum=None``); each layer's momentum is put back afterwards, and if a batch fails, the
    old statistics too.
    """
    if not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be a positive int, got {batches!r}")
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    norms = [m for m in model.modules() if isinstance(m, kinds)]
    if not norms:
        raise ValueError("the model has no BatchNorm layer to recalibrate")
    device, dtype = device_of(model), _float_dtype(model)
    saved = [(m, m.momentum, {k: v.clone() for k, v in m.state_dict().items()}) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches seen
    model.eval()
    for m in norms:  # only the BatchNorms collect statistics; dropout and the rest stay in eval
        m.train()
    try:
        for i, (x, _) in enumerate(loader):
            if i == batches:
                break
            model(_to(x, device, dtype))
    except Exception:  # a batch the model cannot take: put the old statistics back, then raise
        for m, _, state in saved:
            m.load_state_dict(state)
        raise
    finally:
        for m, momentum, _ in saved:
            m.momentum = momentum
        model.eval()
    return model
