"""Heads and MLP neurons of the book's ``CharLM``: scores, masks and a shrunk copy.

Written for :class:`utils.lab.lm.CharLM` only (``blocks[i].attn.q/k/v/o`` and ``fc1/fc2``); the
model-independent one-shot methods are in :mod:`utils.pruning.llm`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from utils.lab.lm import CharLM, lm_loss
from utils.pruning import masks
from utils.pruning.llm import _prune_per_row
from utils.pruning.magnitude import check_share, effective_weight
from utils.pruning.modes import eval_mode


# ----------------------------------------------------------------------------- heads, MLP neurons
def _head_slices(attn: nn.Module) -> list[slice]:
    return [slice(h * attn.head_dim, (h + 1) * attn.head_dim) for h in range(attn.n_heads)]


@torch.no_grad()
def l2_scores(model: CharLM) -> dict[str, list[Tensor]]:
    """L2 norm of all weights that belong to each head (its q, k, v rows, its o columns) and to
    each MLP neuron (its fc1 row, its fc2 column), per block."""
    heads, neurons = [], []
    for b in model.blocks:
        a = b.attn
        q, k, v, o = (effective_weight(m).float() for m in (a.q, a.k, a.v, a.o))
        heads.append(
            torch.stack(
                [
                    (
                        q[s].square().sum()
                        + k[s].square().sum()
                        + v[s].square().sum()
                        + o[:, s].square().sum()
                    ).sqrt()
                    for s in _head_slices(a)
                ]
            )
        )
        f1, f2 = effective_weight(b.fc1).float(), effective_weight(b.fc2).float()
        neurons.append((f1.square().sum(1) + f2.square().sum(0)).sqrt())
    return {"heads": heads, "neurons": neurons}


def taylor_scores(
    model: CharLM, inputs: Tensor, targets: Tensor, batch_size: int = 8
) -> dict[str, list[Tensor]]:
    """First-order (Taylor) importance: the mean over batches of ``|dL/dg|`` for a gate ``g = 1``
    on each head's output and each MLP neuron (after Michel et al. 2019 and Molchanov et al.
    2017), the loss change predicted if the unit were removed. Read off the inputs of ``o`` and
    ``fc2`` and their gradients; no gradient is left on the model's parameters.

    A simplification: ``|.|`` is taken of the gate gradient of a whole batch of ``batch_size``
    windows (the loss is the batch mean), then averaged over batches. Michel et al. average the
    absolute value per example, which never lets examples of opposite sign cancel; with
    ``batch_size=1`` this function does that."""
    device = next(model.parameters()).device
    seen: dict[nn.Module, Tensor] = {}

    def keep_input(mod: nn.Module, inp: tuple) -> None:
        inp[0].retain_grad()
        seen[mod] = inp[0]

    taps = [m for b in model.blocks for m in (b.attn.o, b.fc2)]
    handles = [m.register_forward_pre_hook(keep_input) for m in taps]
    heads = [torch.zeros(b.attn.n_heads, device=device) for b in model.blocks]
    neurons = [torch.zeros(b.fc1.out_features, device=device) for b in model.blocks]
    batches = 0
    try:
        with eval_mode(model):
            for i in range(0, len(inputs), batch_size):
                model.zero_grad(set_to_none=True)
                xb, yb = (
                    inputs[i : i + batch_size].to(device),
                    targets[i : i + batch_size].to(device),
                )
                lm_loss(model, xb, yb).backward()
                for j, b in enumerate(model.blocks):
                    gate = {
                        m: (seen[m].detach() * seen[m].grad).float().sum(dim=(0, 1))
                        for m in (b.attn.o, b.fc2)
                    }
                    heads[j] += gate[b.attn.o].view(-1, b.attn.head_dim).sum(1).abs()
                    neurons[j] += gate[b.fc2].abs()
                batches += 1
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return {"heads": [h / batches for h in heads], "neurons": [n / batches for n in neurons]}


def _check_unit_scores(model: CharLM, scores: dict[str, list[Tensor]]) -> None:
    if not isinstance(scores, dict) or set(scores) != {"heads", "neurons"}:
        raise ValueError(
            "scores must be a dict with 'heads' and 'neurons' (see l2_scores, taylor_scores)"
        )
    for j, b in enumerate(model.blocks):
        for kind, n in (("heads", b.attn.n_heads), ("neurons", b.fc1.out_features)):
            s = scores[kind][j]
            if s.shape != (n,) or not torch.isfinite(s).all():
                raise ValueError(
                    f"scores[{kind!r}][{j}] must be {n} finite numbers, got shape {tuple(s.shape)}"
                )


def prune_units(
    model: CharLM, head_ratio: float, neuron_ratio: float, scores: dict[str, list[Tensor]]
) -> dict[str, list[Tensor]]:
    """Mask the lowest-scoring heads and MLP neurons of every block: exactly ``round(ratio * n)``
    per block (never the last one), ties to the earliest. A head is masked in q, k, v (rows and
    biases) and o (columns); a neuron in fc1 (row, bias) and fc2 (column). Returns the keep
    masks per block ({"heads": [...], "neurons": [...]})."""
    hr = check_share(head_ratio, "head_ratio", one=False)
    nr = check_share(neuron_ratio, "neuron_ratio", one=False)
    _check_unit_scores(model, scores)
    keep = {
        kind: [
            _prune_per_row(s.detach().float().cpu()[None], min(round(r * len(s)), len(s) - 1))[0]
            for s in scores[kind]
        ]
        for kind, r in (("heads", hr), ("neurons", nr))
    }
    with torch.no_grad():
        for b, kh, kn in zip(model.blocks, keep["heads"], keep["neurons"]):
            device = next(b.parameters()).device
            rows, kn = kh.repeat_interleave(b.attn.head_dim).to(device), kn.to(device)
            for lin in (b.attn.q, b.attn.k, b.attn.v):
                _mask_rows(lin, rows)
            _mask_columns(b.attn.o, rows)
            _mask_rows(b.fc1, kn)
            _mask_columns(b.fc2, kn)
    return keep


def _mask_rows(lin: nn.Linear, keep_rows: Tensor) -> None:
    full = keep_rows[:, None].expand(lin.out_features, lin.in_features)
    for name, keep in (("weight", full), ("bias", keep_rows)):
        old = masks.mask_of(lin, name)
        masks.set_mask(lin, name, keep.clone() if old is None else keep & old.bool())


def _mask_columns(lin: nn.Linear, keep_cols: Tensor) -> None:
    old = masks.mask_of(lin)
    keep = keep_cols[None, :].expand(lin.out_features, lin.in_features).clone()
    masks.set_mask(lin, "weight", keep if old is None else keep & old.bool())


@torch.no_grad()
def shrink_lm(model: CharLM) -> CharLM:
    """A smaller dense copy of a masked ``CharLM``: heads whose ``o`` columns are all masked and
    MLP neurons whose ``fc2`` column is masked are cut out (at least one of each stays per block),
    so the copy has fewer heads and narrower MLPs and computes the same outputs."""

    def alive(lin: nn.Linear, groups: int) -> Tensor:
        mask = masks.mask_of(lin)
        if mask is None:
            return torch.ones(groups, dtype=torch.bool, device=lin.weight.device)
        a = (mask != 0).any(dim=0).view(groups, -1).any(dim=1)
        if not a.any():
            a[0] = True
        return a

    heads = [alive(b.attn.o, b.attn.n_heads) for b in model.blocks]
    neurons = [alive(b.fc2, b.fc2.in_features) for b in model.blocks]
    cfg = model.config() | {
        "n_heads": [int(h.sum()) for h in heads],
        "d_ff": [int(n.sum()) for n in neurons],
    }
    small = CharLM(**cfg)
    state = {}
    for name, m in model.named_modules():
        for t in ("weight", "bias"):
            if isinstance(getattr(m, t, None), Tensor):
                state[f"{name}.{t}" if name else t] = effective_weight(m, t).clone()
    for j, (h, n) in enumerate(zip(heads, neurons)):
        rows = h.repeat_interleave(model.head_dim)
        for p in ("q", "k", "v"):
            for t in ("weight", "bias"):
                key = f"blocks.{j}.attn.{p}.{t}"
                state[key] = state[key][rows]
        state[f"blocks.{j}.attn.o.weight"] = state[f"blocks.{j}.attn.o.weight"][:, rows]
        state[f"blocks.{j}.fc1.weight"] = state[f"blocks.{j}.fc1.weight"][n]
        state[f"blocks.{j}.fc1.bias"] = state[f"blocks.{j}.fc1.bias"][n]
        state[f"blocks.{j}.fc2.weight"] = state[f"blocks.{j}.fc2.weight"][:, n]
    small.load_state_dict(state)
    p = next(model.parameters())
    return small.to(device=p.device, dtype=p.dtype).eval()
