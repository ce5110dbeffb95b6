"""Physical removal of pruned units: a smaller dense model that computes the same outputs.

Masks alone save nothing: a zeroed filter is still convolved. :func:`shrink` cuts dead
units out of their layer *and* cuts the matching inputs of the next layer (and the
BatchNorm between them), following the model's data flow with ``torch.fx``. It plans
every cut first and refuses, with the real reason, a graph it cannot cut correctly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from utils.pruning.graph import (
    LAYERS,
    first_arg_is,
    flatten_kind,
    is_shape_query,
    is_zero_preserving,
    op_name,
    trace,
    unit_axis,
)
from utils.pruning.magnitude import clone_model, make_permanent

_BatchNorm = nn.modules.batchnorm._BatchNorm


class UnsupportedGraphError(ValueError):
    """The pruned units feed an operation that simple surgery cannot cut (e.g. a residual add)."""


@dataclass
class _Path:
    """One way a layer's output travels: the BatchNorms on the way, and where it ends."""

    batchnorms: list[str]
    end: str  # a consumer layer's name, "output", or the operation that blocks
    kind: str  # "consumer", "flat consumer" (after a flatten), "output" or "blocked"


@dataclass
class _Plan:
    """Which rows/columns each layer and BatchNorm keeps."""

    out_idx: dict[str, Tensor] = field(default_factory=dict)
    in_idx: dict[str, Tensor] = field(default_factory=dict)
    bn_idx: dict[str, Tensor] = field(default_factory=dict)


def _paths(
    node: fx.Node,
    modules: dict[str, nn.Module],
    conv: bool,
    flat: bool = False,
    bns: tuple[str, ...] = (),
) -> list[_Path]:
    """Every path from ``node`` to the next layers, through BatchNorms, activations, pooling and
    flattens."""
    paths = []
    for user in node.users:
        m = modules.get(user.target) if user.op == "call_module" else None
        if is_shape_query(user):
            continue
        if user.op == "output":
            paths.append(_Path(list(bns), "output", "output"))
        elif isinstance(m, _ConvNd) and conv and not flat and first_arg_is(user, node):
            ok = m.groups == 1
            paths.append(
                _Path(
                    list(bns),
                    user.target
                    if ok
                    else f"the grouped convolution {user.target!r} (groups={m.groups})",
                    "consumer" if ok else "blocked",
                )
            )
        elif isinstance(m, nn.Linear) and (flat or not conv) and first_arg_is(user, node):
            paths.append(_Path(list(bns), user.target, "flat consumer" if flat else "consumer"))
        elif isinstance(m, _BatchNorm) and not flat:
            paths += _paths(user, modules, conv, flat, bns + (user.target,))
        elif is_zero_preserving(user, modules) and first_arg_is(user, node):
            paths += _paths(user, modules, conv, flat, bns)
        elif (
            conv
            and not flat
            and first_arg_is(user, node)
            and flatten_kind(user, modules) == "flatten"
        ):
            paths += _paths(user, modules, conv, True, bns)
        elif conv and not flat and flatten_kind(user, modules) == "hard-coded":
            paths.append(
                _Path(
                    list(bns),
                    f"{op_name(user)!r} with a hard-coded size (write torch.flatten(x, 1) instead)",
                    "blocked",
                )
            )
        else:
            name = op_name(user)
            paths.append(
                _Path(
                    list(bns),
                    "an addition (a residual connection, say)"
                    if name in ("add", "iadd")
                    else f"{name!r} ({user.op})",
                    "blocked",
                )
            )
    return paths


def _unit_rows(layer: nn.Module) -> Tensor:
    """One row of weights per output unit, also for a grouped transposed convolution."""
    w = layer.weight.detach()
    if isinstance(layer, _ConvTransposeNd):  # (in, out / groups, ...): units are (group, column)
        w = w.unflatten(0, (layer.groups, -1)).transpose(1, 2).flatten(0, 1)
    return w.reshape(w.shape[0], -1)


def _dead_units(layer: nn.Module, paths: list[_Path], modules: dict[str, nn.Module]) -> Tensor:
    """Units whose output is exactly zero on every path, after its BatchNorms (train or eval)."""
    w = layer.weight.detach()
    raw = (_unit_rows(layer) == 0).all(dim=1)
    if layer.bias is not None:
        raw &= layer.bias.detach() == 0
    dead = torch.ones_like(raw)
    for path in paths:
        on_path = raw
        for name in path.batchnorms:
            bn = modules[name]
            gamma = bn.weight.detach() if bn.affine else torch.ones_like(raw, dtype=w.dtype)
            beta = bn.bias.detach() if bn.affine else torch.zeros_like(raw, dtype=w.dtype)
            maps_zero_to_zero = beta == 0  # train mode: a zero channel normalizes to beta
            if bn.track_running_stats:  # eval mode: (0 - mean) * gamma / std + beta
                maps_zero_to_zero &= gamma * bn.running_mean == 0
            on_path = (on_path & maps_zero_to_zero) | ((gamma == 0) & (beta == 0))
        dead &= on_path
    if dead.all():
        dead[0] = False  # never leave a layer with no units
    return dead


def _check_cuttable(
    name: str, paths: list[_Path], dead: Tensor, shared: set[str], calls: list[str]
) -> None:
    blockers = sorted({p.end for p in paths if p.kind == "blocked"})
    if calls.count(name) > 1:
        blockers.append(f"{name!r} itself, which is called more than once")
    blockers += [
        f"{p.end!r}, which is called more than once"
        for p in paths
        if p.kind != "blocked" and calls.count(p.end) > 1
    ]
    blockers += [
        f"{n!r}, whose weight is shared with another module"
        for n in [name] + [p.end for p in paths if p.kind != "blocked"]
        if n in shared
    ]
    blockers += [
        f"the BatchNorm {bn!r}, which is called more than once"
        for bn in sorted({bn for p in paths for bn in p.batchnorms})
        if calls.count(bn) > 1
    ]
    if blockers:
        raise UnsupportedGraphError(
            f"cannot cut the {int(dead.sum())} dead units of {name!r}: "
            f"they reach {', '.join(blockers)}, "
            "which this surgery does not cut. Torch-Pruning (pip install torch-pruning) cuts such "
            "dependency graphs; see chapter 6."
        )


def _refuse_hidden_dead_units(modules: dict[str, nn.Module], called: set[str]) -> None:
    """A layer the graph never calls sits inside a module torch.fx keeps whole (a
    TransformerEncoderLayer, a MultiheadAttention) or is used through its weight only; its
    units cannot be followed, so dead units there are refused instead of left in place."""
    with torch.no_grad():
        for name, layer in modules.items():
            if not isinstance(layer, LAYERS) or name in called:
                continue
            dead = (_unit_rows(layer) == 0).all(dim=1)
            if layer.bias is not None:
                dead &= layer.bias.detach() == 0
            if dead.any():
                raise UnsupportedGraphError(
                    f"{name!r} has {int(dead.sum())} dead units, but the torch.fx graph never "
                    "calls it (it sits inside a module that fx keeps whole, such as "
                    "nn.TransformerEncoderLayer or nn.MultiheadAttention): shrink cannot follow "
                    "its outputs. Torch-Pruning handles attention blocks (chapter 6)"
                )


def plan_shrink(model: nn.Module) -> _Plan:
    """Find the dead units of every layer and what to keep; refuses (raises) before any change."""
    modules = dict(model.named_modules())
    graph = trace(model).graph
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    owners: dict[int, list[str]] = {}
    for name, m in modules.items():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(name)
    shared = {n for names in owners.values() if len(names) > 1 for n in names}
    _refuse_hidden_dead_units(modules, set(calls))
    plan = _Plan()
    with torch.no_grad():
        for node in graph.nodes:
            layer = modules.get(node.target) if node.op == "call_module" else None
            if not isinstance(layer, LAYERS):
                continue
            paths = _paths(node, modules, conv=isinstance(layer, _ConvNd))
            dead = _dead_units(layer, paths, modules)
            if not dead.any() or any(p.kind == "output" for p in paths):
                continue  # nothing to cut, or the units are the model's outputs (the classes)
            if isinstance(layer, _ConvNd) and layer.groups != 1:
                raise UnsupportedGraphError(
                    f"cannot cut the {int(dead.sum())} dead units of the grouped "
                    f"convolution {node.target!r} (groups={layer.groups}); "
                    "Torch-Pruning handles grouped convolutions (chapter 6)"
                )
            _check_cuttable(node.target, paths, dead, shared, calls)
            _plan_layer(plan, node.target, (~dead).nonzero().squeeze(1), paths, modules)
    return plan


def _plan_layer(
    plan: _Plan, name: str, keep: Tensor, paths: list[_Path], modules: dict[str, nn.Module]
) -> None:
    units = modules[name].weight.shape[unit_axis(modules[name])]
    plan.out_idx[name] = keep
    for path in paths:
        for bn in path.batchnorms:
            plan.bn_idx[bn] = keep
        if path.kind == "consumer":
            plan.in_idx[path.end] = keep
        else:  # after a flatten, each unit owns the h*w (or l, or d*h*w) columns of its channel
            per_unit, rest = divmod(modules[path.end].in_features, units)
            if rest:
                raise UnsupportedGraphError(
                    f"{path.end!r} has {modules[path.end].in_features} inputs, not a "
                    f"multiple of the {units} channels of {name!r}"
                )
            cols = keep[:, None] * per_unit + torch.arange(per_unit, device=keep.device)
            plan.in_idx[path.end] = cols.reshape(-1)


def _cut_layer(m: nn.Module, rows: Tensor | None, cols: Tensor | None) -> nn.Module:
    """A copy of a Linear or conv with only output units ``rows`` and inputs ``cols``."""
    out_axis, in_axis = (1, 0) if isinstance(m, _ConvTransposeNd) else (0, 1)
    new = copy.deepcopy(m)
    w = m.weight.detach()
    if rows is not None:
        w = w.index_select(out_axis, rows)
    if cols is not None:
        w = w.index_select(in_axis, cols)
    new.weight = nn.Parameter(w.clone(), requires_grad=m.weight.requires_grad)
    if m.bias is not None and rows is not None:
        new.bias = nn.Parameter(m.bias.detach()[rows].clone(), requires_grad=m.bias.requires_grad)
    if isinstance(m, nn.Linear):
        new.out_features, new.in_features = new.weight.shape
    else:
        new.out_channels, new.in_channels = new.weight.shape[out_axis], new.weight.shape[in_axis]
    return new


def _cut_batchnorm(bn: _BatchNorm, idx: Tensor) -> _BatchNorm:
    """A copy of ``bn`` for the channels ``idx`` only: same dtype, device, mode and frozen flags."""
    new = copy.deepcopy(bn)
    new.num_features = len(idx)
    for name, p in bn.named_parameters(recurse=False):
        setattr(new, name, nn.Parameter(p.detach()[idx].clone(), requires_grad=p.requires_grad))
    for name, b in bn.named_buffers(recurse=False):
        if b is not None and b.dim() == 1:
            setattr(new, name, b[idx].clone())
    return new


def shrink(model: nn.Module) -> nn.Module:
    """A physically smaller copy of ``model`` with every dead unit cut out.

    A unit is dead when its output is exactly zero on every path it takes (its weights and
    bias are zero, and each BatchNorm on the way maps zero to zero). Follows
    conv -> BatchNorm -> activation -> pooling -> conv, conv -> flatten -> Linear (each filter
    owns ``h*w`` columns) and Linear -> Linear, for 1-, 2- and 3-d convolutions. Units that
    reach the model output (the classes) are kept. Raises :class:`UnsupportedGraphError`,
    naming the blocker, when dead units feed anything else (a residual addition, a grouped
    convolution, a concatenation); Torch-Pruning handles those graphs. The copy keeps the
    original's dtype, device, frozen parameters and train/eval mode; its masks are folded in
    (zeros left inside the surviving units are ordinary values from then on). The original is
    not changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    small = make_permanent(clone_model(model))
    modules = dict(small.named_modules())
    plan = plan_shrink(small)
    for name in set(plan.out_idx) | set(plan.in_idx):
        small.set_submodule(
            name, _cut_layer(modules[name], plan.out_idx.get(name), plan.in_idx.get(name))
        )
    for name, idx in plan.bn_idx.items():
        small.set_submodule(name, _cut_batchnorm(modules[name], idx))
    return small
