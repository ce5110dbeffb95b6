"""The model zoo: shipped members load as recorded, the recipe keeps its best validation epoch,
and bad requests are refused clearly."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from utils.lab import zoo
from utils.lab.data import MEAN, STD, load_mnist
from utils.lab.training import evaluate

ROOT = Path(__file__).resolve().parents[1]
RECORDS = zoo.records()["members"]


@pytest.fixture(scope="module")
def loaders():
    return load_mnist("subset", validation=True, verbose=False)


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_every_shipped_classifier_loads_with_its_recorded_accuracy(name, loaders):
    _, val, test = loaders
    assert set(RECORDS[name]["seeds"]) == {str(s) for s in zoo.MEMBER_SEEDS[name]}
    for seed, row in RECORDS[name]["seeds"].items():
        model = zoo.load(name, int(seed), source="subset", train=False)
        assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
        assert evaluate(model, test) == row["test"] and evaluate(model, val) == row["val"]
        curve = row["val_curve"]  # the best validation epoch was kept (its float32 accuracy; the
        assert row["best_epoch"] == curve.index(max(curve)) + 1  # float16 copy may differ a bit)
        assert abs(row["val"] - max(curve)) <= 0.005
        assert row["test"] > (0.96 if name == "lenet5-half" else 0.97)  # trained, not near init


def test_the_language_model_loads_with_its_recorded_perplexity():
    from utils.lab.lm import char_data, perplexity

    data = char_data()
    assert set(RECORDS["charlm"]["seeds"]) == {str(s) for s in zoo.LM_SEEDS}
    for seed, row in RECORDS["charlm"]["seeds"].items():
        model = zoo.load("charlm", int(seed), train=False)
        got = perplexity(model, data.val[: zoo.LM.select_tokens + 1])
        assert got == pytest.approx(row["val_ppl"], rel=1e-6)
        best = min(ppl for _, ppl in row["select_curve"])
        assert [s for s, p in row["select_curve"] if p == best][0] == row["best_step"]


def test_every_member_is_committed_so_that_a_clone_ships_it():
    import subprocess

    tracked = subprocess.run(
        ["git", "ls-files", "utils/lab/zoo_weights"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    wanted = [
        zoo.path(n, s, "subset").relative_to(ROOT).as_posix()
        for n in zoo.MODELS
        for s in zoo.MEMBER_SEEDS[n]
    ]
    wanted += [zoo.path("charlm", s, "text").relative_to(ROOT).as_posix() for s in zoo.LM_SEEDS]
    assert set(wanted) <= set(tracked), sorted(set(wanted) - set(tracked))


def test_the_lm_loads_without_its_text(monkeypatch):
    from utils.lab import lm

    monkeypatch.setattr(lm, "char_data", lambda *a, **k: pytest.fail("the text was read"))
    assert zoo.load("charlm", 0, train=False).head.out_features == RECORDS["charlm"]["vocab_size"]


def test_an_explicit_source_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("PRUNING_BOOK_DATA", "mnist")
    a = zoo.load("lenet5", 0, source="subset", train=False)
    monkeypatch.delenv("PRUNING_BOOK_DATA")
    assert torch.equal(a.fc1.weight, zoo.load("lenet5", 0, train=False).fc1.weight)


def test_fresh_is_the_deterministic_start_of_training():
    a, b, c = zoo.fresh("lenet5", 3), zoo.fresh("lenet5", 3), zoo.fresh("lenet5", 4)
    assert torch.equal(a.fc1.weight, b.fc1.weight) and not torch.equal(a.fc1.weight, c.fc1.weight)
    trained = zoo.load("lenet5", 3)
    assert not torch.equal(a.fc1.weight, trained.fc1.weight)


def test_train_member_returns_its_best_validation_epoch():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 1, 32, 32, generator=g), torch.randint(0, 10, (120,), generator=g)
    train = DataLoader(TensorDataset(x[:80], y[:80]), batch_size=16)
    val = DataLoader(TensorDataset(x[80:], y[80:]), batch_size=40)
    recipe = zoo.Recipe(epochs=3, lr=0.1)
    model, log = zoo.train_member("lenet300100", 0, train, val, recipe=recipe, progress=False)
    assert len(log["val_curve"]) == 3 and evaluate(model, val) == max(log["val_curve"])
    assert log["best_epoch"] == log["val_curve"].index(max(log["val_curve"])) + 1
    again, _ = zoo.train_member("lenet300100", 0, train, val, recipe=recipe, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


def test_shifts_move_images_and_fill_in_background():
    x = torch.randn(5, 1, 32, 32)
    assert zoo.shifted(x, 0, torch.Generator()) is x
    a = zoo.shifted(x, 2, torch.Generator().manual_seed(1))
    b = zoo.shifted(x, 2, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    background = torch.tensor([(0.0 - MEAN) / STD])
    for i in range(len(x)):
        assert torch.isin(a[i], torch.cat([x[i].flatten(), background])).all()
    assert not torch.equal(a, x)


def test_bad_requests_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no zoo member"):
        zoo.load("resnet50")
    with pytest.raises(ValueError, match="seed"):
        zoo.load("lenet5", -1)
    monkeypatch.setattr(zoo, "CACHE", tmp_path)
    with pytest.raises(FileNotFoundError, match="neither shipped nor cached.*train=True"):
        zoo.load("lenet5", 0, source="mnist", train=False)


def test_the_readme_table_is_the_recorded_one():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from train_zoo import table
    finally:
        sys.path.pop(0)
    assert table(zoo.records()) in (ROOT / "README.md").read_text()
