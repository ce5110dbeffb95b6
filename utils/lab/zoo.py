"""The book's model zoo: trained networks, shipped with the package, loaded in one call.

Pruning lessons only transfer from networks that have left their initialization behind, so the
chapters start from these instead of a few epochs of their own. ``scripts/train_zoo.py`` trains
every member with the recipe below (one deterministic script; the README gives its table):

- LeNet-5, LeNet-300-100 and ResNet-20 (30 epochs and 3 seeds; 60 and 5 for the LeNets): SGD
  with momentum, weight decay, a cosine learning-rate schedule, random shifts of up to 2 pixels,
  on the training split of :func:`utils.lab.data.load_mnist` with ``validation=True``; the epoch
  with the best validation accuracy is kept.
- the character LM of chapter 9: AdamW with warm-up and cosine decay; the step with the lowest
  perplexity on a selection slice (the *end* of the validation text; chapter 9 measures on its
  start) is kept.

Weights are stored in float16 (half the bytes) and loaded as float32; the accuracies recorded
in ``zoo.json`` are those of the loaded models. Members for data the package does not ship
(``PRUNING_BOOK_DATA=mnist``) are trained with the same recipe on first use and cached.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from utils.lab.data import MEAN, STD, load_mnist, resolve_source
from utils.lab.models import LeNet5, LeNet300100, ResNet
from utils.lab.training import evaluate, quiet, set_seed

SHIPPED = Path(__file__).parent / "zoo_weights"
CACHE = Path(os.environ.get("PRUNING_BOOK_CACHE", Path.home() / ".cache" / "pruning-book"))
SEEDS = (0, 1, 2, 3, 4)
LM_SEEDS = (0, 1)


@dataclass(frozen=True)
class Recipe:
    """How an image classifier of the zoo is trained."""

    epochs: int = 60
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    shift: int = 2  # random translation, pixels


@dataclass(frozen=True)
class LMRecipe:
    """How chapter 9's character LM is trained (its size is chapter 9's)."""

    steps: int = 3000
    eval_every: int = 250
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    batch_size: int = 32
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    context: int = 64
    select_tokens: int = 16384


def _lenet5_half() -> nn.Module:
    """LeNet-5 with half the units of every hidden layer (3, 8, 60, 42): what local structured
    pruning at 50 % leaves, here trained from scratch (the control of chapter 4.2)."""
    return LeNet5(widths=(3, 8, 60, 42))


def _resnet20() -> nn.Module:
    """ResNet-20 at twice the CIFAR widths (32, 64, 128): wide enough that the convolutions,
    not the per-element work around them, set a CPU runtime's speed (chapter 5.2)."""
    return ResNet(blocks=3, widths=(32, 64, 128))


MODELS = {
    "lenet5": LeNet5,
    "lenet5-half": _lenet5_half,
    "lenet300100": LeNet300100,
    "resnet20": _resnet20,
}
RECIPES = {name: Recipe() for name in MODELS} | {"resnet20": Recipe(epochs=30)}
MEMBER_SEEDS = {name: SEEDS for name in MODELS} | {"resnet20": (0, 1, 2)}
LM = LMRecipe()


def _check(name: str, seed: int) -> None:
    if name not in MODELS and name != "charlm":
        raise ValueError(f"no zoo member {name!r}; there are {sorted(MODELS) + ['charlm']}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def fresh(name: str, seed: int = 0) -> nn.Module:
    """The member's initialization: the untrained network its training started from."""
    _check(name, seed)
    set_seed(seed)
    if name == "charlm":
        from utils.lab.lm import CharLM

        return CharLM(_vocab_size(), LM.d_model, LM.n_layers, LM.n_heads, LM.d_ff, LM.context)
    return MODELS[name]()


def _vocab_size() -> int:
    """The LM's vocabulary size: recorded with the zoo, so loading the LM needs no text."""
    if (SHIPPED / "zoo.json").exists():
        recorded = records()["members"].get("charlm", {}).get("vocab_size")
        if recorded is not None:
            return int(recorded)
    from utils.lab.lm import char_data

    return len(char_data().vocab)


def shifted(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by up to ``shift`` pixels in each direction, background filled in."""
    if shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, value=(0.0 - MEAN) / STD)
    dy, dx = (torch.randint(0, 2 * shift + 1, (n,), generator=gen) for _ in range(2))
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def train_member(
    name: str,
    seed: int,
    train: DataLoader,
    val: DataLoader,
    recipe: Recipe | None = None,
    progress: bool | None = None,
) -> tuple[nn.Module, dict]:
    """Train one image classifier of the zoo; returns it (its best validation epoch) and a log."""
    recipe = recipe or RECIPES[name]
    model, gen = fresh(name, seed), torch.Generator().manual_seed(seed)
    loader = DataLoader(train.dataset, batch_size=recipe.batch_size, shuffle=True, generator=gen)
    opt = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe.epochs * len(loader))
    best, best_state, curve, t0 = -1.0, None, [], time.perf_counter()
    show = (not quiet()) if progress is None else progress
    for epoch in range(recipe.epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(shifted(x, recipe.shift, gen)), y).backward()
            opt.step()
            sched.step()
        acc = evaluate(model, val)
        curve.append(acc)
        if acc > best:
            best, best_state = acc, {k: v.clone() for k, v in model.state_dict().items()}
        if show:
            print(f"{name} seed {seed} epoch {epoch + 1}/{recipe.epochs}: val {acc:.4f}", end="\r")
    model.load_state_dict(best_state)
    log = {
        "best_epoch": curve.index(best) + 1,
        "val_curve": curve,
        "seconds": time.perf_counter() - t0,
        "recipe": asdict(recipe),
    }
    return model.eval(), log


def _lm_factor(step: int) -> float:
    if step < LM.warmup:
        return (step + 1) / LM.warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - LM.warmup) / max(1, LM.steps - LM.warmup)))


def train_lm_member(seed: int, progress: bool | None = None) -> tuple[nn.Module, dict]:
    """Train chapter 9's LM; keep the step with the lowest perplexity on the selection slice."""
    from utils.lab.lm import char_data, lm_loss, perplexity, random_windows

    data, model = char_data(), fresh("charlm", seed)
    select = data.val[-(LM.select_tokens + 1) :]
    opt = torch.optim.AdamW(
        model.parameters(), lr=LM.lr, betas=(0.9, 0.95), weight_decay=LM.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lm_factor)
    gen, curve, best, best_state = torch.Generator().manual_seed(seed), [], math.inf, None
    show, t0 = ((not quiet()) if progress is None else progress), time.perf_counter()
    for step in range(1, LM.steps + 1):
        model.train()
        x, y = random_windows(data.train, LM.batch_size, LM.context, gen)
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % LM.eval_every == 0:
            ppl = perplexity(model, select)
            curve.append((step, ppl))
            if ppl < best:
                best, best_state = ppl, {k: v.clone() for k, v in model.state_dict().items()}
            if show:
                print(f"charlm seed {seed} step {step}/{LM.steps}: selection ppl {ppl:.3f}")
    model.load_state_dict(best_state)
    log = {
        "best_step": min(curve, key=lambda c: c[1])[0],
        "select_curve": curve,
        "seconds": time.perf_counter() - t0,
        "recipe": asdict(LM),
    }
    return model.eval(), log


def path(name: str, seed: int, source: str, root: Path = SHIPPED) -> Path:
    """Where a member's weights are stored: ``<root>/<name>-<data>-seed<seed>.pt``."""
    return Path(root) / f"{name}-{'text' if name == 'charlm' else source}-seed{seed}.pt"


def save(model: nn.Module, file: Path) -> None:
    """Store the weights in float16 (half the bytes; loading casts them back to float32)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, file
    )


def _loaded(name: str, seed: int, file: Path) -> nn.Module:
    model = fresh(name, seed)
    state = torch.load(file, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def load(name: str, seed: int = 0, source: str | None = None, train: bool = True) -> nn.Module:
    """A trained zoo member (float32, eval mode): ``lenet5``, ``lenet5-half``, ``lenet300100`` or
    ``charlm``.

    The package ships every member for the default data (the 5,000-digit subset). For full
    MNIST (``source="mnist"`` or ``$PRUNING_BOOK_DATA=mnist``) the member is trained with the
    same recipe on first use (minutes; ``train=False`` raises instead) and cached.
    """
    _check(name, seed)
    if name == "charlm":
        data = "text"
    elif source in ("subset", "mnist"):  # an explicit source wins over $PRUNING_BOOK_DATA
        data = source
    else:
        data = resolve_source(source or "subset")
    file = path(name, seed, data)
    if file.exists():
        return _loaded(name, seed, file)
    cached = path(name, seed, data, CACHE / "zoo")
    if cached.exists():
        return _loaded(name, seed, cached)
    if not train:
        shipped = sorted(p.stem for p in SHIPPED.glob("*.pt"))
        raise FileNotFoundError(
            f"zoo member {file.name} is neither shipped nor cached (shipped: {shipped}); "
            "train=True trains it with the zoo's recipe (about a minute for a LeNet, ten for "
            "the LM) and caches it"
        )
    print(
        f"zoo: {file.name} is not shipped: training it with the zoo's recipe (once; cached "
        f"in {cached.parent})"
    )
    if name == "charlm":
        model, _ = train_lm_member(seed)
    else:
        tr, val, _ = load_mnist(data, validation=True, verbose=False)
        model, _ = train_member(name, seed, tr, val)
    save(model, cached)
    return _loaded(name, seed, cached)


def records() -> dict:
    """What ``scripts/train_zoo.py`` recorded: recipes, accuracies, run times (``zoo.json``)."""
    return json.loads((SHIPPED / "zoo.json").read_text())
