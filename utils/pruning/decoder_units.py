"""Structured pruning of modern decoder blocks: SwiGLU neurons, key/value head groups, whole blocks.

For Llama-style blocks (Llama, Qwen2, Mistral: ``self_attn.{q,k,v,o}_proj`` with grouped-query
attention, ``mlp.{gate,up,down}_proj``), the model is **physically shrunk**: a SwiGLU neuron is a
row of ``gate_proj`` and ``up_proj`` and a column of ``down_proj``; a key/value group is one
key/value head with the query heads that read it (rows of ``q_proj``, ``k_proj``, ``v_proj``,
columns of ``o_proj``), so the ratio of query to key/value heads stays what the attention code
expects. Depth pruning drops whole blocks, ranked by how little each one changes its input:
the angular distance of Gromov et al. (ICLR 2025) for one block (their ``n = 1``, averaged over
every token where they use the last; they remove the contiguous run of ``n`` blocks whose ends
are closest, and heal with fine-tuning). ShortGPT's block influence ranks similarly.
Other structures are refused with a clear error; nothing is changed before every check passed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from utils.pruning.decoder import catch_inputs, find_blocks, run_block
from utils.pruning.llm import capture_inputs

_ATTN, _MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


def _parts(block: nn.Module, index: int) -> tuple[nn.Module, nn.Module]:
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    ok = (
        attn is not None
        and mlp is not None
        and all(isinstance(getattr(attn, n, None), nn.Linear) for n in _ATTN)
        and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in _MLP)
        and isinstance(getattr(attn, "head_dim", None), int)
        and isinstance(getattr(attn, "num_key_value_groups", None), int)
    )
    if ok:  # the shapes must say the same: g key/value heads, per query heads each, head_dim d
        d, per = attn.head_dim, attn.num_key_value_groups
        g = attn.k_proj.out_features // d if d > 0 else 0
        ok = (
            g > 0
            and attn.k_proj.out_features == attn.v_proj.out_features == g * d
            and attn.q_proj.out_features == attn.o_proj.in_features == g * per * d
            and mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features
        )
    if not ok:
        raise ValueError(
            f"block {index} ({type(block).__name__}) is not a Llama-style block "
            "(self_attn.q/k/v/o_proj with head_dim and num_key_value_groups and shapes to "
            "match, mlp.gate/up/down_proj): structured pruning of it is not supported"
        )
    return attn, mlp


def _stack(model: nn.Module, blocks) -> tuple[str, nn.ModuleList]:
    name = find_blocks(model, blocks)
    return name, model.get_submodule(name)


def groups_of(attn: nn.Module) -> int:
    """The number of key/value heads (groups) of an attention module."""
    return attn.k_proj.out_features // attn.head_dim


@torch.no_grad()
def unit_scores(
    model: nn.Module, calibration: Tensor | None = None, blocks=None
) -> dict[str, list[Tensor]]:
    """Scores of every block's SwiGLU neurons and key/value groups (higher: more important).

    With ``calibration``: a neuron's ``||a_j|| * ||W_down[:, j]||`` (``a_j`` its activation over
    the calibration tokens, an input of ``down_proj``), and for a group the sum of
    ``||a_c|| * ||W_o[:, c]||`` over the ``o_proj`` inputs ``c`` of its query heads: how much
    each unit can add to the block's output (the structured form of Wanda's score). Without:
    the L2 norm of all the unit's weights.
    """
    name, stack = _stack(model, blocks)
    parts = [_parts(b, i) for i, b in enumerate(stack)]
    norms = {}
    if calibration is not None:
        layers = {}
        for i, (attn, mlp) in enumerate(parts):
            layers[f"o{i}"], layers[f"down{i}"] = attn.o_proj, mlp.down_proj
        stats = capture_inputs(model, layers, calibration, full=False)
        norms = {k: s.norms for k, s in stats.items()}
    scores: dict[str, list[Tensor]] = {"neurons": [], "groups": []}
    for i, (attn, mlp) in enumerate(parts):
        down, o = mlp.down_proj.weight.float(), attn.o_proj.weight.float()
        heads, d, g = o.shape[1] // attn.head_dim, attn.head_dim, groups_of(attn)
        if calibration is None:
            sq = lambda layer, dim: layer.weight.float().pow(2).sum(dim)  # noqa: E731
            neuron = (sq(mlp.gate_proj, 1) + sq(mlp.up_proj, 1) + sq(mlp.down_proj, 0)).sqrt()
            head = (sq(attn.q_proj, 1) + sq(attn.o_proj, 0)).view(heads, d).sum(1)
            kv = (sq(attn.k_proj, 1) + sq(attn.v_proj, 1)).view(g, d).sum(1)
            group = (head.view(g, -1).sum(1) + kv).sqrt()
        else:
            neuron = norms[f"down{i}"] * down.norm(dim=0)
            group = (norms[f"o{i}"] * o.norm(dim=0)).view(g, -1).sum(1)
        scores["neurons"].append(neuron)
        scores["groups"].append(group)
    return scores


def _keep_top(scores: Tensor, ratio: float) -> Tensor:
    """Indices (sorted) of the units kept: the largest scores, ``round((1 - ratio) * n)`` of them
    and at least one; ties go to the earlier unit."""
    n = len(scores)
    kept = max(1, n - round(ratio * n))
    order = torch.sort(-scores.float(), stable=True).indices[:kept]
    return torch.sort(order).values


def _shrunk(layer: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    w = layer.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    bias = layer.bias is not None
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias, device=w.device, dtype=w.dtype)
    new.requires_grad_(layer.weight.requires_grad)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias:
            new.bias.copy_(layer.bias[rows] if rows is not None else layer.bias)
    return new


def prune_units(
    model: nn.Module,
    neuron_ratio: float,
    group_ratio: float,
    scores: dict[str, list[Tensor]],
    blocks=None,
) -> dict[str, list[Tensor]]:
    """Remove the lowest-scored share of each block's SwiGLU neurons and key/value groups (at
    least one of each stays); the model is shrunk in place. Returns the kept indices.

    The config is not changed (``intermediate_size`` and the head counts no longer hold for
    every block, and may differ between blocks): save the shrunk model with ``torch.save``, not
    ``save_pretrained``; a cache that preallocates from the config (a static cache) will not fit.
    The new layers are plain Linears: hooks or parametrizations on the old ones are not kept.
    """
    for label, r in (("neuron_ratio", neuron_ratio), ("group_ratio", group_ratio)):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise ValueError(f"{label} must be a number in [0, 1), got {r!r}")
    name, stack = _stack(model, blocks)
    parts = [_parts(b, i) for i, b in enumerate(stack)]
    for kind, want in (("neurons", lambda a, m: m.gate_proj.out_features), ("groups", None)):
        got = scores.get(kind) if isinstance(scores, dict) else None
        sizes = [want(a, m) if want else groups_of(a) for a, m in parts]
        if not isinstance(got, list) or [getattr(s, "shape", None) for s in got] != [
            (n,) for n in sizes
        ]:
            raise ValueError(f"scores[{kind!r}] must hold one score per unit: sizes {sizes}")
        if not all(torch.isfinite(s).all() for s in got):
            raise ValueError(f"scores[{kind!r}] holds NaN or infinite values")
    kept: dict[str, list[Tensor]] = {"neurons": [], "groups": []}
    for i, (attn, mlp) in enumerate(parts):
        neurons = _keep_top(scores["neurons"][i], neuron_ratio).to(mlp.gate_proj.weight.device)
        mlp.gate_proj = _shrunk(mlp.gate_proj, rows=neurons)
        mlp.up_proj = _shrunk(mlp.up_proj, rows=neurons)
        mlp.down_proj = _shrunk(mlp.down_proj, cols=neurons)
        groups = _keep_top(scores["groups"][i], group_ratio).to(attn.q_proj.weight.device)
        d, per = attn.head_dim, attn.num_key_value_groups
        kv = (groups[:, None] * d + torch.arange(d, device=groups.device)).flatten()
        q_heads = (groups[:, None] * per + torch.arange(per, device=groups.device)).flatten()
        q = (q_heads[:, None] * d + torch.arange(d, device=groups.device)).flatten()
        attn.q_proj, attn.o_proj = _shrunk(attn.q_proj, rows=q), _shrunk(attn.o_proj, cols=q)
        attn.k_proj, attn.v_proj = _shrunk(attn.k_proj, rows=kv), _shrunk(attn.v_proj, rows=kv)
        kept["neurons"].append(neurons.cpu())
        kept["groups"].append(groups.cpu())
    return kept


@torch.no_grad()
def block_distances(model: nn.Module, calibration: Tensor, blocks=None) -> Tensor:
    """Each block's angular distance between its input and output hidden states, ``arccos(cos)
    / pi`` averaged over calibration tokens: 0 for a block that changes nothing."""
    name, stack = _stack(model, blocks)
    inputs, out = catch_inputs(model, stack, calibration), []
    for block in stack:
        outputs = run_block(block, inputs)
        angles = [
            torch.nn.functional.cosine_similarity(a.hidden.float(), b.hidden.float(), dim=-1)
            .clamp(-1, 1)
            .arccos()
            .flatten()
            / math.pi
            for a, b in zip(inputs, outputs)
        ]
        out.append(float(torch.cat(angles).mean()))
        inputs = outputs
    return torch.tensor(out)


def drop_blocks(model: nn.Module, indices, blocks=None) -> None:
    """Remove the blocks at ``indices`` from the stack (at least one stays); the layer numbers
    kept by the blocks and the config (``layer_idx``, ``num_hidden_layers``, ``layer_types``)
    follow."""
    name, stack = _stack(model, blocks)
    flat = torch.as_tensor(indices).flatten().tolist() if not isinstance(indices, bool) else [True]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in flat) or not all(
        0 <= i < len(stack) for i in flat
    ):
        raise ValueError(f"indices must be block numbers in [0, {len(stack)}), got {indices!r}")
    drop = sorted(set(flat))
    if len(drop) >= len(stack):
        raise ValueError("drop_blocks would remove every block; keep at least one")
    keep = [i for i in range(len(stack)) if i not in drop]
    parent, _, attr = name.rpartition(".")
    setattr(
        model.get_submodule(parent) if parent else model,
        attr,
        nn.ModuleList(stack[i] for i in keep),
    )
    for new, old in enumerate(keep):
        for m in stack[old].modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_hidden_layers", None) == len(stack):
        config.num_hidden_layers = len(keep)
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == len(stack):
            config.layer_types = [types[i] for i in keep]
