"""The character-level LM: shipped text, deterministic split, model, training, perplexity."""

import math

import pytest
import torch

from utils.lab.lm import (
    CharLM,
    char_data,
    eval_windows,
    generate,
    load_text,
    perplexity,
    random_windows,
    train_lm,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def data():
    return char_data()


def tiny(vocab=65, **kw):
    torch.manual_seed(0)
    return CharLM(
        vocab, **({"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "context": 16} | kw)
    )


def test_the_text_loads_and_splits_the_same_way_every_time(data):
    text = load_text()
    assert len(text) > 1_000_000 and text.startswith("First Citizen")
    assert len(data.vocab) == len(set(text)) == 65
    assert len(data.train) + len(data.val) == len(text)
    assert 0.09 < len(data.val) / len(text) < 0.11
    again = char_data()
    assert torch.equal(again.train, data.train) and torch.equal(again.val, data.val)
    assert data.decode(data.train[:13]) == "First Citizen"
    assert torch.equal(data.encode("First"), data.train[:5])
    with pytest.raises(ValueError, match="unknown text"):
        load_text("nope")
    with pytest.raises(ValueError, match="val_fraction"):
        char_data(val_fraction=1.0)


def test_windows_are_shifted_by_one(data):
    x, y = random_windows(data.train, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    ex, ey = eval_windows(data.val, 16, max_tokens=100)
    assert ex.shape == (6, 16) and torch.equal(ex.flatten()[1:], ey.flatten()[:-1])


def test_model_shapes_config_and_bad_input():
    m = tiny(n_heads=[4, 2], d_ff=[64, 8])
    out = m(torch.zeros(3, 16, dtype=torch.long))
    assert out.shape == (3, 16, 65)
    again = CharLM(**m.config())
    assert again.config() == m.config() and [b.attn.n_heads for b in again.blocks] == [4, 2]
    with pytest.raises(ValueError, match="context"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="n_heads"):
        CharLM(65, n_layers=2, n_heads=[4])


def test_uniform_logits_give_perplexity_equal_to_the_vocabulary(data):
    m = tiny()
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.zero_()
    assert perplexity(m, data.val, max_tokens=512) == pytest.approx(65, rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_training_and_it_learns(data, device):
    runs = []
    for _ in range(2):
        m = tiny().to(device)
        losses = train_lm(m, data.train, steps=25, batch_size=8, lr=1e-2, warmup=5, seed=3)
        runs.append((losses, m.head.weight.detach().cpu().clone()))
    if device == "cpu":
        assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    else:  # GPU kernels may sum in another order; the runs agree closely
        assert torch.allclose(runs[0][1], runs[1][1], atol=1e-4)
    losses = runs[0][0]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert perplexity(m, data.val, max_tokens=1024) < 40
    with pytest.raises(ValueError, match="steps"):
        train_lm(m, data.train, steps=-1)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_forward_and_generate(data, device):
    m = tiny().to(device=device, dtype=torch.bfloat16)
    ppl = perplexity(m, data.val, max_tokens=256)
    assert math.isfinite(ppl) and 30 < ppl < 130  # untrained: about the vocabulary size
    out = generate(m, data.encode("ROMEO:"), 20)
    assert len(out) == 26 and torch.equal(out, generate(m, data.encode("ROMEO:"), 20))


def test_the_text_is_read_from_the_data_folder_then_the_cache_and_a_failed_download_says_what_to_do(
    tmp_path, monkeypatch
):
    from utils.lab import lm

    folder, cache = tmp_path / "data", tmp_path / "cache"
    folder.mkdir()
    (folder / "tinyshakespeare.txt").write_text("First Citizen: from the folder")
    monkeypatch.setattr(lm, "CACHE", cache)
    monkeypatch.chdir(tmp_path)  # no shared/data above this folder
    monkeypatch.setenv(lm.DATA_DIR_VAR, str(folder))
    assert lm.load_text() == "First Citizen: from the folder"
    monkeypatch.delenv(lm.DATA_DIR_VAR)
    cache.mkdir()
    (cache / "tinyshakespeare.txt").write_text("from the cache")
    assert lm.load_text() == "from the cache"
    (cache / "tinyshakespeare.txt").unlink()

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(lm.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match=lm.DATA_DIR_VAR) as failure:
        lm.load_text()
    assert "raw.githubusercontent.com" in str(failure.value) and "no network" in str(failure.value)


def test_window_losses_are_the_per_window_parts_of_the_perplexity():
    import math

    from utils.lab.lm import CharLM, perplexity, window_losses

    torch.manual_seed(0)
    model = CharLM(11, d_model=16, n_layers=1, n_heads=2, d_ff=32, context=8).eval()
    tokens = torch.randint(0, 11, (8 * 9 + 5,))
    losses = window_losses(model, tokens, batch_size=4)
    assert losses.shape == (9,) and losses.dtype == torch.float64
    assert math.exp(float(losses.mean())) == pytest.approx(perplexity(model, tokens), rel=1e-6)
    assert model.training is False
