"""Magnitude pruning, equations 3.1 (unstructured) and 3.2 (structured) of the seed, fixed.

Masks are kept with the reparametrization of :mod:`torch.nn.utils.prune`
(``weight = weight_orig * weight_mask``, recomputed by a forward pre-hook), so an
optimizer can never revive a pruned weight. Every public function validates its
arguments and computes all masks *before* it touches the model: a bad call raises
and leaves the model exactly as it was.
"""
from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from utils.graph import following_batchnorms

PRUNABLE = (nn.Conv2d, nn.Linear)
SCOPES = ("global", "local")


# ----------------------------------------------------------------------------- helpers
def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"ratio must be a number in [0, 1], got {type(ratio).__name__} {ratio!r}")
    r = float(ratio)
    if math.isnan(r) or not 0.0 <= r <= 1.0:
        raise ValueError(f"ratio must be in [0, 1] (the share of weights set to zero), got {ratio!r}")
    return r


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope must be 'global' or 'local', got {scope!r}")
    return scope


def select_layers(model: nn.Module, layers: Iterable[str] | str | None = None) -> dict[str, nn.Module]:
    """The Conv2d/Linear modules to prune, by name: all of them, or the named ones (checked)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    prunable = [n for n, m in modules.items() if isinstance(m, PRUNABLE)]
    if not prunable:
        raise ValueError("the model has no Conv2d or Linear layer to prune")
    if layers is None:
        return {n: modules[n] for n in prunable}
    names = [layers] if isinstance(layers, str) else list(layers)
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"layers must be module names (str), got {type(n).__name__} {n!r}")
        if n not in modules:
            raise ValueError(f"unknown layer {n!r}; prunable layers are {prunable}")
        if not isinstance(modules[n], PRUNABLE):
            raise ValueError(f"layer {n!r} is a {type(modules[n]).__name__}; only Conv2d and Linear are pruned")
    if not names:
        raise ValueError("layers is empty: name at least one Conv2d or Linear layer")
    return {n: modules[n] for n in dict.fromkeys(names)}


def weight_and_mask(module: nn.Module, name: str = "weight") -> tuple[Tensor, Tensor | None]:
    """The current (unmasked) tensor and its mask, or ``None`` if it was never pruned."""
    if hasattr(module, name + "_orig"):
        return getattr(module, name + "_orig").detach(), getattr(module, name + "_mask")
    return getattr(module, name).detach(), None


def effective_weight(module: nn.Module, name: str = "weight") -> Tensor:
    """What the layer computes with: ``orig * mask``; never a stale ``module.weight``."""
    w, mask = weight_and_mask(module, name)
    return w if mask is None else w * mask


def smallest_k(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of exactly the ``k`` smallest entries of ``scores``.

    Ties at the threshold go to the earliest entries in flat order, so the count is
    exact and the choice is deterministic.
    """
    flat = scores.reshape(-1)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    # numpy's introselect is several times faster than torch.kthvalue on large CPU tensors
    theta = torch.as_tensor(np.partition(flat.numpy(), k - 1)[k - 1])
    chosen = flat <= theta
    excess = int(torch.count_nonzero(chosen)) - k
    if excess > 0:  # ties at theta: keep the earliest, release the rest
        ties = (flat == theta).nonzero().squeeze(1)
        chosen[ties[len(ties) - excess:]] = False
    return chosen.view_as(scores)


def _apply_mask(module: nn.Module, name: str, keep: Tensor) -> None:
    """Install ``keep`` (already including any earlier mask) as the mask of ``module.<name>``.

    The same reparametrization as ``torch.nn.utils.prune.custom_from_mask`` (``<name>_orig``
    parameter, ``<name>_mask`` buffer, torch's own forward pre-hook, so ``prune.remove``
    works), built without its extra full-size temporaries.
    """
    if hasattr(module, name + "_mask"):
        getattr(module, name + "_mask").copy_(keep)
    else:
        orig = module._parameters.pop(name)
        module.register_parameter(name + "_orig", orig)
        module.register_buffer(name + "_mask", keep.to(orig.dtype))
        hook = torch_prune.CustomFromMask(None)
        hook._tensor_name = name
        module.register_forward_pre_hook(hook)
    with torch.no_grad():  # a leaf tensor, so that copy.deepcopy works right away
        setattr(module, name, getattr(module, name + "_orig") * getattr(module, name + "_mask"))


# ----------------------------------------------------------------------------- equation 3.1
def prune_unstructured(model: nn.Module, ratio: float, scope: str = "global",
                       layers: Iterable[str] | str | None = None) -> dict[str, Tensor]:
    """Zero the smallest-magnitude weights so that exactly ``round(ratio * n)`` are zero.

    ``n`` counts the selected weights of all layers together (``scope="global"``) or of
    each layer (``"local"``). Weights pruned earlier stay pruned and count towards the
    share, so calling this with rising ratios is iterative pruning. Returns the kept-weight
    masks (bool, 1 = kept) by layer name.
    """
    r, scope = _check_ratio(ratio), _check_scope(scope)
    selected = select_layers(model, layers)
    with torch.no_grad():
        sizes = [m.weight_orig.numel() if hasattr(m, "weight_orig") else m.weight.numel()
                 for m in selected.values()]
        flat = torch.empty(sum(sizes))  # one buffer holds every score: no per-layer copies
        scores, already, offset = [], [], 0
        for (lname, m), size in zip(selected.items(), sizes):
            w, mask = weight_and_mask(m)
            s = flat[offset:offset + size].view_as(w)
            offset += size
            torch.abs(w, out=s)
            if not torch.isfinite(s.max()):  # NaN and inf both propagate to the max
                raise ValueError(f"layer {lname!r} has NaN or infinite weights")
            if mask is not None:
                s.masked_fill_(mask == 0, -1.0)  # pruned earlier: always among the smallest
            scores.append(s)
            already.append(0 if mask is None else int((mask == 0).sum()))
        if scope == "global":
            k = round(r * sum(sizes))
            if sum(already) > k:
                raise ValueError(f"{sum(already)} weights are already pruned, more than round(ratio * n) = {k}; "
                                 "pruned weights stay pruned, so the ratio must not fall")
            gone = smallest_k(flat, k)  # one selection over all layers; scores are views of flat
            pruned = [gone[o - n:o].view_as(s) for s, n, o in zip(scores, sizes, np.cumsum(sizes))]
        else:
            pruned = []
            for (lname, _), s, size, a in zip(selected.items(), scores, sizes, already):
                k = round(r * size)
                if a > k:
                    raise ValueError(f"layer {lname!r} already has {a} pruned weights, more than "
                                     f"round(ratio * n) = {k}; pruned weights stay pruned")
                pruned.append(smallest_k(s, k))
        masks = {n: ~p for n, p in zip(selected, pruned)}
        for n, m in selected.items():
            _apply_mask(m, "weight", masks[n])
    return masks


# ----------------------------------------------------------------------------- equation 3.2
def unit_norms(module: nn.Module, p: float = 2.0) -> Tensor:
    """The L_p norm of each output unit's weights: row ``W_i:`` of a Linear, filter ``i`` of a Conv2d."""
    w = effective_weight(module)
    return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), ord=p, dim=1)


def _check_p(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a positive number, got {type(p).__name__} {p!r}")
    if math.isnan(p) or p <= 0:
        raise ValueError(f"p must be > 0 (the order of the norm), got {p!r}")
    return float(p)


def prune_structured(model: nn.Module, ratio: float, scope: str = "local", p: float = 2.0,
                     layers: Iterable[str] | str | None = None) -> dict[str, Tensor]:
    """Remove whole output units (Linear rows, Conv2d filters) with the smallest L_p norm.

    Prunes exactly ``round(ratio * units)`` units per layer (``"local"``) or over all selected
    layers (``"global"``), but never a layer's last unit. For ``"global"`` each norm is divided
    by the mean norm of the layer's remaining units: raw norms are not comparable across
    layers (initialization scales weights by fan-in, and a BatchNorm after a layer makes its
    weight scale meaningless), so a unit is judged against its own layer's average.
    By default every Conv2d/Linear except the last (the classifier, whose units are the
    classes) is pruned. A pruned unit is silenced completely: its weights, its bias, and the
    BatchNorm that follows it are masked. Returns weight masks (bool, 1 = kept) by layer.
    """
    r, scope, p = _check_ratio(ratio), _check_scope(scope), _check_p(p)
    if layers is None:
        names = list(select_layers(model))
        if len(names) < 2:
            raise ValueError("the model has only one prunable layer, its classifier; name layers= explicitly")
        layers = names[:-1]
    selected = select_layers(model, layers)
    with torch.no_grad():
        scores = {name: _unit_scores(name, m, p, normalize=scope == "global") for name, m in selected.items()}
        pruned = _choose_units(scores, r, scope)  # raises before anything is changed
        return _silence_units(model, selected, pruned)


def _unit_scores(name: str, module: nn.Module, p: float, normalize: bool) -> Tensor:
    """L_p norm per unit (divided by the layer's mean if ``normalize``); -1 for units pruned earlier."""
    w, mask = weight_and_mask(module)
    if not torch.isfinite(w).all():
        raise ValueError(f"layer {name!r} has NaN or infinite weights")
    s = unit_norms(module, p)
    gone = torch.zeros_like(s, dtype=torch.bool) if mask is None else (mask.flatten(1) == 0).all(dim=1)
    if normalize and s[~gone].sum() > 0:
        s = s / s[~gone].mean()  # relative to the layer's average unit
    s[gone] = -1.0
    return s


def _choose_units(scores: dict[str, Tensor], r: float, scope: str) -> dict[str, Tensor]:
    """Which units to prune (True = pruned): exact counts, never a layer's last unit."""
    already = {name: int((s == -1.0).sum()) for name, s in scores.items()}
    if scope == "local":
        pruned = {}
        for name, s in scores.items():
            k = min(round(r * s.numel()), s.numel() - 1)
            if already[name] > k:
                raise ValueError(f"layer {name!r} already has {already[name]} pruned units, more than the {k} asked for")
            pruned[name] = smallest_k(s, k)
        return pruned
    total = sum(s.numel() for s in scores.values())
    k = min(round(r * total), total - len(scores))
    if sum(already.values()) > k:
        raise ValueError(f"{sum(already.values())} units are already pruned, more than the {k} asked for")
    candidates = [s.clone() for s in scores.values()]
    for s in candidates:  # the strongest unit of each layer is never a candidate
        s[s.argmax()] = math.inf
    gone = smallest_k(torch.cat(candidates), k)
    return dict(zip(scores, gone.split([s.numel() for s in candidates])))


def _silence_units(model: nn.Module, selected: dict[str, nn.Module], pruned: dict[str, Tensor]) -> dict[str, Tensor]:
    """Mask the pruned units' weights, biases and following BatchNorm; return the weight masks."""
    bns, modules, masks = following_batchnorms(model), dict(model.named_modules()), {}
    for name, m in selected.items():
        keep_units = ~pruned[name]
        w, mask = weight_and_mask(m)
        keep = keep_units.view((-1,) + (1,) * (w.dim() - 1)).expand_as(w).clone()
        if mask is not None:
            keep &= mask.bool()
        masks[name] = keep
        _apply_mask(m, "weight", keep)
        targets = [(m, "bias")] if m.bias is not None else []
        bn = modules[bns[name]] if name in bns else None
        if bn is not None and bn.affine:
            targets += [(bn, "weight"), (bn, "bias")]
        for mod, tensor in targets:
            _, old = weight_and_mask(mod, tensor)
            _apply_mask(mod, tensor, keep_units if old is None else keep_units & old.bool())
    return masks


# ----------------------------------------------------------------------------- 2:4 pattern
def semi_structured_mask(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Keep the ``n`` largest magnitudes in every group of ``m`` consecutive inputs (N:M sparsity).

    With the default 2:4 this is the pattern NVIDIA sparse tensor cores run at up to twice the
    dense speed; the mask can be computed anywhere, only its speed needs such a GPU. Ties go to
    the earlier input. Returns a bool mask (True = kept) shaped like ``weight``.
    """
    if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n <= m:
        raise ValueError(f"need integers 0 < n <= m, got n={n!r}, m={m!r}")
    if weight.shape[-1] % m:
        raise ValueError(f"the last dimension ({weight.shape[-1]}) must be a multiple of m={m}")
    groups = weight.detach().abs().reshape(-1, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
    return keep.view_as(weight)


# ----------------------------------------------------------------------------- inspection
def sparsity(model: nn.Module) -> float:
    """Fraction of the Conv2d/Linear weights that are zero, in [0, 1]."""
    with torch.no_grad():
        weights = [effective_weight(m) for m in select_layers(model).values()]
        return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def sparsity_report(model: nn.Module) -> pd.DataFrame:
    """One row per Conv2d/Linear layer (and a total): shape, weights kept, sparsity, units alive."""
    rows = []
    with torch.no_grad():
        for name, m in select_layers(model).items():
            w = effective_weight(m)
            kept = int((w != 0).sum())
            alive = int((w.reshape(w.shape[0], -1) != 0).any(dim=1).sum())
            rows.append({"layer": name, "type": type(m).__name__, "shape": tuple(w.shape),
                         "weights": w.numel(), "kept": kept, "sparsity": 1 - kept / w.numel(),
                         "units alive": f"{alive}/{w.shape[0]}"})
    n, kept = sum(r["weights"] for r in rows), sum(r["kept"] for r in rows)
    rows.append({"layer": "total", "type": "", "shape": "", "weights": n, "kept": kept,
                 "sparsity": 1 - kept / n, "units alive": ""})
    return pd.DataFrame(rows).set_index("layer").round({"sparsity": 4})


# ----------------------------------------------------------------------------- housekeeping
def _pruning_hooks(model: nn.Module):
    for m in model.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                yield m, hook


def is_pruned(model: nn.Module) -> bool:
    """True while any tensor of the model is reparametrized by a pruning mask."""
    return any(True for _ in _pruning_hooks(model))


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every mask into its tensor (``torch.nn.utils.prune.remove``); returns the model.

    Afterwards the state_dict has plain ``weight``/``bias`` entries only, the zeros are
    ordinary values, and nothing keeps them zero during further training.
    """
    for m, hook in list(_pruning_hooks(model)):
        torch_prune.remove(m, hook._tensor_name)
    return model


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy that works on pruned models too.

    ``copy.deepcopy`` fails on a pruned module whose masked tensor was last computed with
    autograd on (it is not a leaf); recomputing it under ``no_grad`` first avoids that.
    """
    with torch.no_grad():
        for m, hook in _pruning_hooks(model):
            setattr(m, hook._tensor_name, hook.apply_mask(m))
    return copy.deepcopy(model)
