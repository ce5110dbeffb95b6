"""Physical removal of pruned units: a smaller dense model that computes the same outputs.

Masks alone save nothing: a zeroed filter is still convolved. :func:`shrink` cuts dead
units out of their layer *and* cuts the matching inputs of the next layer (and the
BatchNorm between them), following the model's data flow with ``torch.fx``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from utils.graph import first_arg_is, is_flatten, is_zero_preserving, op_name, trace
from utils.pruning import clone_model, make_permanent

_BatchNorm = nn.modules.batchnorm._BatchNorm


class UnsupportedGraphError(ValueError):
    """The pruned units feed an operation that simple surgery cannot cut (e.g. a residual add)."""


@dataclass
class _Chain:
    """Where one layer's output goes: BatchNorms on the way, the layers that read it."""
    producer: str
    batchnorms: list[str] = field(default_factory=list)
    consumers: list[tuple[str, bool]] = field(default_factory=list)  # (name, reads it flattened)
    blocked: list[str] = field(default_factory=list)  # operations we cannot cut through


def _follow(node: fx.Node, chain: _Chain, modules: dict[str, nn.Module], conv: bool, flat: bool) -> None:
    for user in node.users:
        m = modules.get(user.target) if user.op == "call_module" else None
        if user.op == "output":
            chain.blocked.append("output")
        elif isinstance(m, nn.Conv2d) and conv and not flat and m.groups == 1:
            chain.consumers.append((user.target, False))
        elif isinstance(m, nn.Linear) and (flat or not conv):
            chain.consumers.append((user.target, flat))
        elif isinstance(m, _BatchNorm) and not flat:
            chain.batchnorms.append(user.target)
            _follow(user, chain, modules, conv, flat)
        elif is_zero_preserving(user, modules) and first_arg_is(user, node):
            _follow(user, chain, modules, conv, flat)
        elif conv and not flat and first_arg_is(user, node) and is_flatten(user, modules):
            _follow(user, chain, modules, conv, True)
        else:
            chain.blocked.append(op_name(user))


def _dead_units(model_modules: dict[str, nn.Module], chain: _Chain) -> Tensor:
    """Units whose output is exactly zero after the layer and its BatchNorms (train or eval)."""
    layer = model_modules[chain.producer]
    w = layer.weight.detach()
    dead = (w.reshape(w.shape[0], -1) == 0).all(dim=1)
    if layer.bias is not None:
        dead &= layer.bias.detach() == 0
    for name in chain.batchnorms:
        bn = model_modules[name]
        gamma = bn.weight.detach() if bn.affine else torch.ones(bn.num_features)
        beta = bn.bias.detach() if bn.affine else torch.zeros(bn.num_features)
        maps_zero_to_zero = beta == 0
        if bn.track_running_stats:
            maps_zero_to_zero &= gamma * bn.running_mean == 0
        dead = (dead & maps_zero_to_zero) | ((gamma == 0) & (beta == 0))
    if dead.all():
        dead[0] = False  # never leave a layer with no units
    return dead


def _cut_conv(m: nn.Conv2d, out_idx: Tensor, in_idx: Tensor) -> nn.Conv2d:
    new = nn.Conv2d(len(in_idx), len(out_idx), m.kernel_size, m.stride, m.padding, m.dilation,
                    groups=1, bias=m.bias is not None, padding_mode=m.padding_mode,
                    device=m.weight.device, dtype=m.weight.dtype)
    new.weight.data = m.weight.data[out_idx][:, in_idx].clone()
    if m.bias is not None:
        new.bias.data = m.bias.data[out_idx].clone()
    return new


def _cut_linear(m: nn.Linear, out_idx: Tensor, in_idx: Tensor) -> nn.Linear:
    new = nn.Linear(len(in_idx), len(out_idx), bias=m.bias is not None,
                    device=m.weight.device, dtype=m.weight.dtype)
    new.weight.data = m.weight.data[out_idx][:, in_idx].clone()
    if m.bias is not None:
        new.bias.data = m.bias.data[out_idx].clone()
    return new


def _cut_batchnorm(bn: _BatchNorm, idx: Tensor) -> _BatchNorm:
    state = {k: (v[idx].clone() if v.dim() == 1 else v.clone()) for k, v in bn.state_dict().items()}
    new = type(bn)(len(idx), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats)
    new.load_state_dict(state)
    return new.to(next(iter(state.values())).device) if state else new


def shrink(model: nn.Module) -> nn.Module:
    """A physically smaller copy of ``model`` with every dead unit cut out.

    A unit is dead when its weights, bias and following BatchNorm all give zero.
    Follows Conv2d -> BatchNorm -> activation -> pooling -> Conv2d,
    Conv2d -> flatten -> Linear (each filter owns ``h*w`` columns) and Linear -> Linear.
    Units that reach the model output (the classes) are kept. Raises
    :class:`UnsupportedGraphError` when dead units feed anything else, such as a residual
    addition; Torch-Pruning handles those graphs. The original model is not changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    small = make_permanent(clone_model(model))
    modules = dict(small.named_modules())
    graph = trace(small).graph
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    out_idx: dict[str, Tensor] = {}
    in_idx: dict[str, Tensor] = {}
    bn_idx: dict[str, Tensor] = {}
    with torch.no_grad():
        for node in graph.nodes:
            layer = modules.get(node.target) if node.op == "call_module" else None
            if not isinstance(layer, (nn.Conv2d, nn.Linear)):
                continue
            chain = _Chain(node.target)
            _follow(node, chain, modules, conv=isinstance(layer, nn.Conv2d), flat=False)
            dead = _dead_units(modules, chain)
            if not dead.any():
                continue
            shared = [c for c, _ in chain.consumers if calls.count(c) > 1]
            if chain.blocked and set(chain.blocked) == {"output"}:
                continue  # the classifier: its units are the model's outputs
            if chain.blocked or shared or calls.count(node.target) > 1:
                why = ", ".join(sorted(set(chain.blocked))) or "a layer used more than once"
                raise UnsupportedGraphError(
                    f"cannot cut the {int(dead.sum())} dead units of {node.target!r}: its output feeds "
                    f"{why}, which this surgery does not follow (a residual addition, say). "
                    "Torch-Pruning (pip install torch-pruning) cuts such dependency graphs; see chapter 6.")
            keep = (~dead).nonzero().squeeze(1)
            out_idx[node.target] = keep
            for bn in chain.batchnorms:
                bn_idx[bn] = keep
            for name, flat in chain.consumers:
                if not flat:
                    in_idx[name] = keep
                    continue
                per_unit, rest = divmod(modules[name].in_features, len(dead))
                if rest:
                    raise UnsupportedGraphError(f"{name!r} has {modules[name].in_features} inputs, not a "
                                                f"multiple of the {len(dead)} channels of {node.target!r}")
                in_idx[name] = (keep[:, None] * per_unit + torch.arange(per_unit)).reshape(-1)
        for name in set(out_idx) | set(in_idx):
            m = modules[name]
            rows = out_idx.get(name, torch.arange(m.weight.shape[0]))
            cols = in_idx.get(name, torch.arange(m.weight.shape[1]))
            cut = _cut_conv if isinstance(m, nn.Conv2d) else _cut_linear
            small.set_submodule(name, cut(m, rows, cols).train(m.training))
        for name, idx in bn_idx.items():
            small.set_submodule(name, _cut_batchnorm(modules[name], idx).train(modules[name].training))
    return small
