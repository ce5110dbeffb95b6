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


def _blobs(n, seed):
    """Two Gaussian blobs in 8 dimensions: an MLP learns them in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) + 1.5 * (2 * y[:, None] - 1)
    return DataLoader(
        TensorDataset(x, y),
        batch_size=16,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


def _mlp():
    set_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def test_fine_tune_keeps_the_best_validation_candidate_and_leaves_the_model():
    from utils.lab.training import fine_tune

    model, train_l, val_l = _mlp(), _blobs(128, 1), _blobs(64, 2)
    prune_unstructured(model, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    best, record = fine_tune(model, train_l, val_l, lrs=(0.001, 0.1), epochs=3, seed=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert record["lr"] in (0.001, 0.1) and 1 <= record["epochs"] <= 3
    assert record["val"] == evaluate(best, val_l)
    assert abs(sparsity(best) - 0.5) < 1e-9  # the masks stayed in force
    seen = []  # every candidate, rebuilt by hand with the same batch order
    for lr in (0.001, 0.1):
        m = _mlp()
        prune_unstructured(m, 0.5)
        set_seed(5)
        order = DataLoader(
            train_l.dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(5)
        )
        opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        for _ in range(3):
            train(m, order, epochs=1, optimizer=opt, progress=False)
            seen.append(evaluate(m, val_l))
    assert record["val"] == max(seen)
    for _ in train_l:  # the loader's own shuffling has moved on: the choice stays the same
        pass
    again = fine_tune(model, train_l, val_l, lrs=(0.001, 0.1), epochs=3, seed=5)[1]
    assert again == record


@pytest.mark.parametrize("bad", [{"lrs": ()}, {"lrs": (0.01, -1.0)}, {"epochs": 0}])
def test_fine_tune_refuses_bad_arguments_without_touching_the_model(bad):
    from utils.lab.training import fine_tune

    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        fine_tune(model, _blobs(32, 1), _blobs(32, 2), **bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shared_rate_chooses_once_per_setting_and_reuses_it():
    from utils.lab.training import SharedRate, fine_tune

    train_l, val_l = _blobs(128, 1), _blobs(64, 2)
    tuned = SharedRate(train_l, val_l, lrs=(0.001, 0.1), epochs=2)
    first, rec = tuned(_mlp(), "a", seed=0)
    assert tuned.picked == {"a": rec["lr"]}
    assert rec == fine_tune(_mlp(), train_l, val_l, lrs=(0.001, 0.1), epochs=2, seed=0)[1]
    _, again = tuned(_mlp(), "a", seed=1, epochs=3)  # the rate is reused, the epochs its own
    assert again["lr"] == rec["lr"] and 1 <= again["epochs"] <= 3
    tuned(_mlp(), "b", seed=1)
    assert set(tuned.picked) == {"a", "b"}
