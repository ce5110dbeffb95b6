"""train/evaluate/set_seed: reproducible, learns, keeps masks."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from utils.lab.data import load_mnist
from utils.lab.models import LeNet5
from utils.lab.training import evaluate, set_seed, train
from utils.pruning import prune_unstructured, sparsity
from utils.pruning.masks import stored


def tiny_loader(n=64):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(
        TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def test_same_seed_same_result():
    runs = []
    for _ in range(2):
        set_seed(7)
        model = LeNet5()
        runs.append(
            (train(model, tiny_loader(), epochs=2, lr=0.05), model.fc3.weight.detach().clone())
        )
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


def test_lenet5_learns_mnist_subset_and_fine_tuning_keeps_the_masks():
    set_seed(0)
    train_loader, test_loader = load_mnist("subset", batch_size=64, verbose=False)
    model = LeNet5()
    history = train(model, train_loader, epochs=2, lr=0.05)
    assert history[1] < history[0]
    acc = evaluate(model, test_loader)
    assert 0.85 < acc <= 1.0
    prune_unstructured(model, 0.9)
    train(model, train_loader, epochs=1, lr=0.02, weight_decay=1e-3)
    assert sparsity(model) >= 0.9 - 1e-9
    assert evaluate(model, test_loader) > 0.8


def test_bad_arguments():
    with pytest.raises(ValueError, match="epochs"):
        train(LeNet5(), tiny_loader(), epochs=-1)
    with pytest.raises(ValueError, match="empty"):
        evaluate(
            LeNet5(), DataLoader(TensorDataset(torch.zeros(0, 1, 32, 32), torch.zeros(0).long()))
        )


def test_on_step_is_called_after_every_optimizer_step_and_can_prune():
    set_seed(0)
    model = LeNet5()
    seen = []

    def prune_gradually(step):
        seen.append(step)
        prune_unstructured(model, min(0.5, 0.1 * step))

    train(model, tiny_loader(64), epochs=2, lr=0.01, on_step=prune_gradually)
    assert seen == list(range(1, 9))  # 4 batches of 16, two epochs
    assert abs(sparsity(model) - 0.5) < 1e-4


def test_evaluate_works_on_a_model_without_parameters():
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Identity())
    loader = DataLoader(
        TensorDataset(torch.eye(10).view(10, 1, 10, 1), torch.arange(10)), batch_size=5
    )
    assert evaluate(model, loader) == 1.0


def test_pick_device_prefers_cuda_when_present_and_can_be_forced(monkeypatch):
    from utils.lab.training import pick_device

    monkeypatch.delenv("PRUNING_BOOK_DEVICE", raising=False)
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("PRUNING_BOOK_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")


def test_training_follows_the_model_dtype_and_keeps_it():
    set_seed(0)
    model = LeNet5().to(torch.bfloat16)
    history = train(model, tiny_loader(), epochs=2, lr=0.05)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters()) and history[1] < history[0]
    assert 0.0 <= evaluate(model, tiny_loader()) <= 1.0


def test_a_failing_run_on_another_device_puts_the_model_back():
    from utils.lab.training import device_of

    model = LeNet5()
    bad = DataLoader(TensorDataset(torch.zeros(4, 1, 28, 28), torch.zeros(4).long()), batch_size=2)
    with pytest.raises(RuntimeError):
        train(model, bad, device="cpu")
    assert device_of(model).type == "cpu" and model.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_on_the_gpu_keeps_masks_and_returns_the_model_to_the_cpu(dtype):
    from utils.lab.training import device_of

    set_seed(0)
    model = LeNet5().to(dtype)
    prune_unstructured(model, 0.8)
    before = stored(model.fc1).detach().clone()
    history = train(model, tiny_loader(), epochs=2, lr=0.05, device="cuda")
    assert device_of(model).type == "cpu" and model.fc1.weight.dtype == dtype
    assert not torch.equal(before, stored(model.fc1).detach()) and history[1] < history[0]
    assert sparsity(model) >= 0.8 - 1e-9
    assert 0.0 <= evaluate(model, tiny_loader(), device="cuda") <= 1.0
    assert device_of(model).type == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_on_the_gpu_trains_there_with_cpu_batches():
    from utils.lab.training import device_of

    set_seed(0)
    model = LeNet5().cuda()
    train(model, tiny_loader(), epochs=1, lr=0.05)
    assert device_of(model).type == "cuda" and 0.0 <= evaluate(model, tiny_loader()) <= 1.0
