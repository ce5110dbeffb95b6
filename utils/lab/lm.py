"""A tiny causal character-level transformer language model, its text, training and perplexity.

The text (Tiny Shakespeare) is not part of the package: :func:`load_text` reads it from a folder
named by ``$PRUNING_BOOK_DATA_DIR`` or a ``shared/data`` folder beside the project, then from a
cache, and otherwise downloads it from its public source. Everything is deterministic for a
given seed on a CPU.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.pruning.modes import eval_mode


@dataclass(frozen=True)
class _Text:
    file: str
    url: str
    sha256: str


TEXTS = {
    "tinyshakespeare": _Text(
        "tinyshakespeare.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    )
}
DATA_DIR_VAR = "PRUNING_BOOK_DATA_DIR"  # a folder that holds the texts (development, CI)
CACHE = Path.home() / ".cache" / "pruning-book" / "data"


# ----------------------------------------------------------------------------- data
def _candidates(file: str) -> list[Path]:
    """Where a text may already be: the folder in $PRUNING_BOOK_DATA_DIR, a ``shared/data``
    folder in the working directory or one of its parents (the project's development layout),
    and the cache."""
    found = [Path(os.environ[DATA_DIR_VAR]) / file] if os.environ.get(DATA_DIR_VAR) else []
    here = Path.cwd().resolve()
    found += [folder / "shared" / "data" / file for folder in (here, *here.parents)]
    return found + [CACHE / file]


def _download(text: _Text) -> str:
    """Fetch the text from its public source into the cache (a few seconds; fails fast offline)."""
    with urllib.request.urlopen(text.url, timeout=20) as reply:
        data = reply.read()
    if hashlib.sha256(data).hexdigest() != text.sha256:
        raise ValueError(f"{text.url} did not give the expected file (SHA-256 differs)")
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / text.file).write_bytes(data)
    return data.decode("utf-8")


def load_text(name: str = "tinyshakespeare") -> str:
    """The raw text of a corpus: from disk where it already is, else downloaded once (cached)."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; known texts are {sorted(TEXTS)}")
    text = TEXTS[name]
    for path in _candidates(text.file):
        if path.is_file():
            return path.read_text(encoding="utf-8")
    try:
        return _download(text)
    except (OSError, ValueError) as e:
        raise RuntimeError(
            f"{text.file} is not on this machine and could not be downloaded ({e}). Download "
            f"{text.url} by hand and set {DATA_DIR_VAR} to the folder that holds it as "
            f"{text.file} (or put it in {CACHE})."
        ) from None


@dataclass
class CharData:
    """A text as token ids, split once: the first ``1 - val_fraction`` trains, the rest
    validates."""

    vocab: list[str]
    train: Tensor
    val: Tensor

    def encode(self, text: str) -> Tensor:
        index = {c: i for i, c in enumerate(self.vocab)}
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


def char_data(name: str = "tinyshakespeare", val_fraction: float = 0.1) -> CharData:
    """Character-level ids of a shipped text with a deterministic split (a contiguous tail for
    validation, so no validation window overlaps a training one)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    text = load_text(name)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = round(len(ids) * (1 - val_fraction))
    return CharData(vocab, ids[:cut], ids[cut:])


def random_windows(
    tokens: Tensor, batch_size: int, context: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``batch_size`` random windows: inputs ``(B, context)`` and the next-character targets."""
    if len(tokens) <= context:
        raise ValueError(f"need more than context={context} tokens, got {len(tokens)}")
    start = torch.randint(0, len(tokens) - context, (batch_size,), generator=generator)
    idx = start[:, None] + torch.arange(context + 1)
    w = tokens[idx]
    return w[:, :-1], w[:, 1:]


# ----------------------------------------------------------------------------- model
class Attention(nn.Module):
    """Causal multi-head self-attention with separate q, k, v, o projections (prunable per head)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        inner = n_heads * head_dim
        self.q, self.k, self.v = (nn.Linear(d_model, inner) for _ in range(3))
        self.o = nn.Linear(inner, d_model)

    @property
    def n_heads(self) -> int:
        return self.o.in_features // self.head_dim

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (
            f(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            for f in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln1(x))``, then ``x + fc2(gelu(fc1(ln2(x))))``."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, d_ff: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, head_dim)
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def _per_layer(value: int | Sequence[int], n_layers: int, what: str) -> list[int]:
    values = [value] * n_layers if isinstance(value, numbers.Integral) else list(value)
    if len(values) != n_layers or not all(
        isinstance(v, numbers.Integral) and v >= 1 for v in values
    ):
        raise ValueError(
            f"{what} must be a positive int or {n_layers} positive ints, got {value!r}"
        )
    return [int(v) for v in values]


class CharLM(nn.Module):
    """A GPT-style causal language model over characters (learned positions, pre-LN, GELU MLP).

    ``n_heads`` and ``d_ff`` may be lists (one entry per block): a model shrunk by structured
    pruning has different numbers of heads and MLP neurons in each block.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int | Sequence[int] = 4,
        d_ff: int | Sequence[int] = 512,
        context: int = 128,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        heads = _per_layer(n_heads, n_layers, "n_heads")
        if head_dim is None:
            if d_model % heads[0]:
                raise ValueError(
                    f"d_model={d_model} is not a multiple of n_heads={heads[0]}; give head_dim"
                )
            head_dim = d_model // heads[0]
        self.context, self.head_dim = context, head_dim
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, h, head_dim, f)
            for h, f in zip(heads, _per_layer(d_ff, n_layers, "d_ff"))
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.apply(self._init)
        for b in self.blocks:  # GPT-2: residual projections scaled down with depth
            for lin in (b.attn.o, b.fc2):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def config(self) -> dict:
        """Constructor arguments that rebuild this architecture (per-block heads and widths)."""
        return {
            "vocab_size": self.tok.num_embeddings,
            "d_model": self.tok.embedding_dim,
            "n_layers": len(self.blocks),
            "n_heads": [b.attn.n_heads for b in self.blocks],
            "d_ff": [b.fc1.out_features for b in self.blocks],
            "context": self.context,
            "head_dim": self.head_dim,
        }

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``(B, T, vocab)`` for token ids ``(B, T)``, ``T <= context``."""
        if idx.dim() != 2 or idx.shape[1] > self.context:
            raise ValueError(
                f"expected token ids (batch, T) with T <= context = {self.context}, "
                f"got shape {tuple(idx.shape)}"
            )
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


# ----------------------------------------------------------------------------- training
def lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-character cross-entropy (nats)."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def train_lm(
    model: CharLM,
    tokens: Tensor,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup: int = 30,
    weight_decay: float = 0.01,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> list[float]:
    """AdamW with linear warm-up and cosine decay to 10 % of ``lr``; returns the loss of each step.

    Windows are drawn with their own generator seeded by ``seed``, so the same seed and the same
    initial model give the same run on a CPU. Pruning masks stay in force (they are applied in
    the forward pass), so a masked model can be fine-tuned with this loop.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses = []
    for _ in range(steps):
        x, y = random_windows(tokens, batch_size, model.context, gen)
        loss = lm_loss(model, x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def eval_windows(
    tokens: Tensor, context: int, max_tokens: int | None = None
) -> tuple[Tensor, Tensor]:
    """Consecutive non-overlapping windows of ``tokens`` (the first ``max_tokens`` + 1 of them)."""
    n = len(tokens) - 1 if max_tokens is None else min(max_tokens, len(tokens) - 1)
    n -= n % context
    if n == 0:
        raise ValueError(f"need more than context={context} tokens to evaluate, got {len(tokens)}")
    return tokens[:n].view(-1, context), tokens[1 : n + 1].view(-1, context)


@torch.no_grad()
def window_losses(
    model: nn.Module, tokens: Tensor, max_tokens: int | None = None, batch_size: int = 64
) -> Tensor:
    """Mean cross-entropy (nats) of each window of :func:`perplexity`, in order (float64).

    The windows are the per-example scores for :func:`utils.lab.stats.compare` (lower is
    better); ``exp`` of their mean is the perplexity, since every window has the same length.
    """
    device = next(model.parameters()).device
    x, y = eval_windows(tokens, model.context, max_tokens)
    out = []
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            logits = model(xb).float()
            nll = F.cross_entropy(logits.transpose(1, 2), yb, reduction="none")
            out.append(nll.double().mean(dim=1).cpu())
    return torch.cat(out)


@torch.no_grad()
def perplexity(
    model: nn.Module, tokens: Tensor, max_tokens: int | None = None, batch_size: int = 64
) -> float:
    """exp(mean cross-entropy) over consecutive windows of the model's context length."""
    device = next(model.parameters()).device
    x, y = eval_windows(tokens, model.context, max_tokens)
    total = 0.0
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            total += lm_loss(model, xb, yb).item() * yb.numel()
    return math.exp(total / y.numel())


@torch.no_grad()
def causal_lm_perplexity(model: nn.Module, ids: Tensor, length: int = 2048) -> float:
    """Perplexity of a Hugging Face causal LM on a 1-D token stream, as the SparseGPT and Wanda
    papers measure it: the stream cut into consecutive segments of ``length`` tokens (the rest
    dropped), each scored alone, exp of the mean loss over every predicted token."""
    segments = len(ids) // length
    if ids.dim() != 1 or segments == 0:
        raise ValueError(f"need a 1-D stream of at least {length} tokens, got {tuple(ids.shape)}")
    device = next(model.parameters()).device
    total = 0.0
    with eval_mode(model):
        for i in range(segments):
            x = ids[i * length : (i + 1) * length].to(device)[None]
            total += float(model(x, labels=x, use_cache=False).loss) * (length - 1)
    return math.exp(total / (segments * (length - 1)))


@torch.no_grad()
def generate(
    model: CharLM, prompt: Tensor, n: int, temperature: float = 0.8, seed: int = 0
) -> Tensor:
    """Sample ``n`` characters after ``prompt`` (1-D ids); returns prompt and sample together."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = prompt.clone().cpu()
    model.eval()
    for _ in range(n):
        logits = model(ids[-model.context :][None].to(device))[0, -1].float().cpu()
        nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen)
        ids = torch.cat([ids, nxt])
    return ids
