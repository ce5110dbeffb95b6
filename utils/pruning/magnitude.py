"""Magnitude pruning, equations 3.1 (unstructured) and 3.2 (structured) of the source, fixed.

Masks are torch parametrizations (:mod:`utils.pruning.masks`: ``weight = original * mask``
on every read), so an optimizer can never revive a pruned weight; ``inplace=True`` instead
zeroes the weights themselves (one-shot pruning of large models, no mask kept). Every public
function validates its arguments and computes its whole plan *before* it touches the model: a
bad call raises and leaves the model exactly as it was. Everything runs on the model's own
device and dtype.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvTransposeNd
from torch.nn.utils import prune as torch_prune

from utils.pruning import masks
from utils.pruning.graph import LAYERS, following_batchnorms, output_layers, unit_axis
from utils.pruning.threshold import (
    Buffers,
    NonFiniteScores,
    Source,
    Threshold,
    chunks,
    count_ones,
    kept_by,
    kth_smallest,
    ties_in,
    use_kernels,
)

SCOPES = ("global", "local")


# ----------------------------------------------------------------------------- helpers
def check_share(value: object, what: str = "ratio", one: bool = True) -> float:
    """``value`` as a float share in [0, 1] (or [0, 1) with ``one=False``), else a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number in [0, 1], got {type(value).__name__} {value!r}")
    r = float(value)
    if math.isnan(r) or not (0.0 <= r <= 1.0 if one else 0.0 <= r < 1.0):
        raise ValueError(
            f"{what} must be in [0, {'1]' if one else '1)'} (the share of weights set to "
            f"zero), got {value!r}"
        )
    return r


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope must be 'global' or 'local', got {scope!r}")
    return scope


def select_layers(
    model: nn.Module,
    layers: Iterable[str] | str | None = None,
    accept: Callable[[nn.Module], bool] | None = None,
    kind: str = "Linear or convolution",
) -> dict[str, nn.Module]:
    """The Linear and convolution modules to prune, by name: all, or the named ones (checked).

    ``accept`` (with ``kind``, its name in messages) selects another set of layer types, for
    example the Linear layers of LLM pruning, GPT-2's ``Conv1D`` included."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    accept = accept or (lambda m: isinstance(m, LAYERS))
    modules = dict(model.named_modules())
    prunable = [n for n, m in modules.items() if accept(m)]
    if not prunable:
        raise ValueError(f"the model has no {kind} layer to prune")
    if layers is None:
        return {n: modules[n] for n in prunable}
    names = [layers] if isinstance(layers, str) else list(layers)
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"layers must be module names (str), got {type(n).__name__} {n!r}")
        if n not in modules:
            raise ValueError(f"unknown layer {n!r}; prunable layers are {prunable}")
        if not accept(modules[n]):
            raise ValueError(
                f"layer {n!r} is a {masks.base_class(modules[n]).__name__}; "
                f"only {kind.replace(' or ', ' and ')} layers are pruned"
            )
    if not names:
        raise ValueError(f"layers is empty: name at least one {kind} layer")
    return {n: modules[n] for n in dict.fromkeys(names)}


def weight_and_mask(module: nn.Module, name: str = "weight") -> tuple[Tensor, Tensor | None]:
    """The stored (unmasked) tensor and its mask, or ``None`` if it was never pruned."""
    return masks.stored(module, name).detach(), masks.mask_of(module, name)


def effective_weight(module: nn.Module, name: str = "weight") -> Tensor:
    """What the layer computes with: ``original * mask`` where it is masked (detached)."""
    return masks.effective(module, name)


@dataclass
class WeightGroup:
    """One weight tensor to prune and the layers that use it (several when weights are tied)."""

    names: list[str]
    modules: list[nn.Module]

    @property
    def weight(self) -> Tensor:
        return weight_and_mask(self.modules[0])[0]

    @property
    def mask(self) -> Tensor | None:
        return weight_and_mask(self.modules[0])[1]


def weight_tensors(
    model: nn.Module, selected: dict[str, nn.Module], check_shared: bool = True
) -> list[WeightGroup]:
    """The distinct weight tensors of ``selected``: a tensor shared by several layers counts once.

    With ``check_shared`` (before masking), a tensor that a layer outside the selection also reads
    is refused: a mask would leave that layer unmasked. Zeroing in place, or only reading, is
    fine.
    """
    groups: dict[int, WeightGroup] = {}
    for name, m in selected.items():
        key = id(masks.stored(m)) if masks.stored(m) is not None else id(m)
        groups.setdefault(key, WeightGroup([], [])).names.append(name)
        groups[key].modules.append(m)
    if check_shared:
        for owner, _, attr, p in masks.own_tensors(model):
            g = groups.get(id(p))
            if g is not None and owner not in g.names:
                raise ValueError(
                    f"the weight of {g.names[0]!r} is shared with {owner}.{attr}, which is not "
                    "pruned: a mask would leave it unmasked; select it too, untie the weights, "
                    "or use inplace=True"
                )
    return list(groups.values())


def refuse_unmaskable(targets: Iterable[tuple[str, nn.Module, str]]) -> None:
    """Raise unless every ``(layer name, module, tensor name)`` can take a mask: a tensor
    computed from others (weight_norm, a parametrization other than our mask, the hook of
    torch.nn.utils.prune) cannot. Called while planning, before anything is changed."""
    for label, m, tensor in targets:
        if torch_prune.is_pruned(m):
            raise ValueError(
                f"{label!r} was pruned with torch.nn.utils.prune: call "
                "torch.nn.utils.prune.remove on it first"
            )
        stored = masks.stored(m, tensor)
        if not isinstance(stored, nn.Parameter) or masks.has_foreign_parametrization(m, tensor):
            raise ValueError(
                f"the {tensor} of {label!r} is computed (weight_norm, spectral_norm or a "
                "parametrization), not a Parameter of its own: remove that first "
                f"(torch.nn.utils.parametrize.remove_parametrizations(module, {tensor!r})), "
                "or leave the layer out with layers="
            )


def _flat(t: Tensor) -> Tensor:
    """A 1-D view of ``t`` in memory order, sharing its storage (also for channels_last)."""
    if t.is_contiguous():
        return t.view(-1)
    permuted = t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    if not permuted.is_contiguous():
        raise ValueError(
            "a weight that is a strided view of a larger tensor cannot be pruned in place"
        )
    return permuted.view(-1)


def _check_finite(t: WeightGroup) -> None:
    w = t.weight
    if w.numel() and not all(math.isfinite(float(v)) for v in torch.aminmax(w)):
        raise ValueError(f"layer {t.names[0]!r} has NaN or infinite weights")


def _score_dtype(tensors: list[WeightGroup]) -> torch.dtype:
    """float64 if any weight is float64, else float32 (exact for float16 and bfloat16)."""
    return torch.float64 if any(t.weight.dtype == torch.float64 for t in tensors) else torch.float32


def _magnitude(t: WeightGroup, dtype: torch.dtype) -> Source:
    """The scores of one tensor: |w|, and -1 where an earlier mask pruned it (always first)."""
    w, mask = _flat(t.weight), t.mask
    flat_mask = None if mask is None else _flat(mask)

    def score_of(sel: slice | Tensor, out: Tensor | None = None) -> Tensor:
        x = w[sel]
        if out is None:
            s = x.abs().to(dtype)
        else:
            s = torch.abs(x, out=out) if x.dtype == dtype else out.copy_(x).abs_()
        if flat_mask is not None:
            s.masked_fill_(flat_mask[sel] == 0, -1.0)
        return s

    plain = mask is None and w.device.type == "cpu" and w.dtype == dtype
    return Source(score_of, w.numel(), dtype, w.device, w.detach().numpy() if plain else None)


def smallest_k(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of exactly the ``k`` smallest entries of ``scores``.

    Ties at the threshold go to the earliest entries in flat order, so the count is
    exact and the choice is deterministic. Works on any device, in any float dtype.
    """
    flat = scores.detach().reshape(-1)
    if not 0 <= k <= flat.numel():
        raise ValueError(f"k must be between 0 and {flat.numel()}, got {k}")
    if flat.is_floating_point() and bool(torch.isnan(flat).any()):
        raise ValueError("scores contain NaN, which has no order")
    threshold = kth_smallest(
        [Source(lambda sel, out=None: flat[sel], flat.numel(), flat.dtype, flat.device)], k
    )
    return ~kept_by(flat, threshold, threshold.ties.get(0)).view(scores.shape)


# ----------------------------------------------------------------------------- equation 3.1
def prune_unstructured(
    model: nn.Module,
    ratio: float,
    scope: str = "global",
    layers: Iterable[str] | str | None = None,
    inplace: bool = False,
) -> dict[str, Tensor] | dict[str, int]:
    """Zero the smallest-magnitude weights so that exactly ``round(ratio * n)`` are zero.

    ``n`` counts the selected weights of all layers together (``scope="global"``) or of
    each layer (``"local"``); a tensor shared by several layers counts once. Weights pruned
    earlier stay pruned and count towards the share, so calling this with rising ratios is
    iterative pruning. Returns the kept-weight masks (bool, 1 = kept) by layer name.

    ``inplace=True`` writes zeros into the weights and keeps no mask (nothing stops training
    from moving them again): one-shot pruning of models too large for a second copy. The
    threshold is found chunk by chunk, so extra memory stays a small share of the model's.
    It returns the number of weights kept per layer instead of masks.
    """
    r, scope = check_share(ratio), _check_scope(scope)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    selected = select_layers(model, layers)
    if layers is None:
        _warn_unselected_attention(model)
    refuse_unmaskable((name, m, "weight") for name, m in selected.items())
    tensors = weight_tensors(model, selected, check_shared=not inplace)
    if inplace and is_pruned(model):
        raise ValueError(
            "the model carries pruning masks; make_permanent(model) first, or use inplace=False"
        )
    with torch.no_grad():
        dtype = _score_dtype(tensors)
        sources = [_magnitude(t, dtype) for t in tensors]
        # the compiled loops check finiteness in the read that counts: which tensors they read
        # (local scope: each tensor alone, so a small layer of a large model takes torch ops)
        covered = (
            [use_kernels(sources)] * len(sources)
            if scope == "global"
            else [use_kernels([s]) for s in sources]
        )
        for t, done in zip(tensors, covered):
            if not done:
                _check_finite(t)
        buffers = Buffers()
        try:  # raises before anything changes
            thresholds = _choose_weights(tensors, sources, r, scope, buffers)
        except NonFiniteScores as error:
            raise ValueError(
                f"layer {tensors[error.source].names[0]!r} has NaN or infinite weights"
            ) from None
        for t, th, done in zip(tensors, thresholds, covered):
            if done and th.value == -math.inf:  # k = 0: no pass of the loops looked at it
                _check_finite(t)
        return _zero_weights(tensors, sources, thresholds, inplace, buffers)


def _warn_unselected_attention(model: nn.Module) -> None:
    """nn.MultiheadAttention keeps its query, key and value weights in one Parameter of its
    own (``in_proj_weight``), not in Linear layers: say that they are left dense."""
    packed = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention) and getattr(m, "in_proj_weight", None) is not None
    ]
    if packed:
        warnings.warn(
            f"{len(packed)} nn.MultiheadAttention module(s) ({packed[0]!r}, ...) keep their "
            "query/key/value weights in in_proj_weight, which is not a Linear layer: those "
            "weights stay dense and are not counted in the ratio",
            stacklevel=3,
        )


def _choose_weights(
    tensors: list[WeightGroup], sources: list[Source], r: float, scope: str, buffers: Buffers
) -> list[Threshold]:
    """One threshold for all tensors (global) or one per tensor (local), with exact counts."""
    already = [0 if t.mask is None else int((t.mask == 0).sum()) for t in tensors]
    if scope == "global":
        k = round(r * sum(s.n for s in sources))
        if sum(already) > k:
            raise ValueError(
                f"{sum(already)} weights are already pruned, more than round(ratio * n) = {k}; "
                "pruned weights stay pruned, so the ratio must not fall"
            )
        return [kth_smallest(sources, k, buffers)] * len(tensors)
    thresholds = []
    for t, source, a in zip(tensors, sources, already):
        k = round(r * source.n)
        if a > k:
            raise ValueError(
                f"layer {t.names[0]!r} already has {a} pruned weights, more than "
                f"round(ratio * n) = {k}; pruned weights stay pruned"
            )
        try:
            thresholds.append(kth_smallest([source], k, buffers))
        except NonFiniteScores:
            raise NonFiniteScores(len(thresholds)) from None  # the index of this tensor
    return thresholds


def _zero_weights(
    tensors: list[WeightGroup],
    sources: list[Source],
    thresholds: list[Threshold],
    inplace: bool,
    buffers: Buffers,
) -> dict[str, Tensor] | dict[str, int]:
    """Apply the thresholds, as masks or (``inplace``) by zeroing the weights, by the compiled
    loops where they serve, else chunk by chunk with torch ops (the same result)."""
    out: dict = {}
    shared = all(th is thresholds[0] for th in thresholds)
    compiled = use_kernels(sources)
    for i, (t, src, th) in enumerate(zip(tensors, sources, thresholds)):
        tie_key = i if shared else 0  # the key of this tensor's ties in th
        full_mask = (
            None if inplace else torch.empty_like(t.weight)
        )  # same memory order as the weight
        w, mask = (_flat(t.weight), None) if inplace else (None, _flat(full_mask))
        if compiled:
            kept = _zero_compiled(src, th, tie_key, w, mask)
        else:
            kept = _zero_eager(src, th, tie_key, w, mask, buffers)
        for name, m in zip(t.names, t.modules):
            if inplace:
                out[name] = kept
            else:
                masks.install(m, "weight", full_mask if len(t.modules) == 1 else full_mask.clone())
                out[name] = full_mask.bool()
    return out


def _zero_eager(
    src: Source,
    th: Threshold,
    tie_key: int,
    w: Tensor | None,
    mask: Tensor | None,
    buffers: Buffers,
) -> int:
    """Zero the flat weights ``w`` below the threshold (multiplying by 0/1), or write the 0/1
    ``mask``, chunk by chunk; the kept count (``w`` only)."""
    kept = 0
    for sel in chunks(src.n, src.device):
        s_buf, flags, _ = buffers.get(src, sel.stop - sel.start)
        if mask is not None and mask.dtype == src.dtype:
            flags = mask[sel]  # write the 0/1 mask in place
        flags = kept_by(src.score_of(sel, out=s_buf), th, ties_in(th, tie_key, sel), out=flags)
        if w is not None:
            w[sel].mul_(flags)
            kept += count_ones(flags)
        elif flags.data_ptr() != mask[sel].data_ptr():
            mask[sel] = flags
    return kept


def _zero_compiled(
    src: Source, th: Threshold, tie_key: int, w: Tensor | None, mask: Tensor | None
) -> int:
    """``_zero_eager`` by the compiled loops, one pass: zero the weights below the threshold in
    place (``w``) or write the 0/1 ``mask``, then the tied positions; the kept count."""
    from utils.pruning import kernels

    ties = th.ties.get(tie_key, torch.zeros(0, dtype=torch.long))
    if w is not None:
        kept = src.n - kernels.zero_below(src.array, th.value)
        kept -= int((w[ties].abs() >= th.value).sum())  # as the eager path counts them (aliases)
        w[ties] *= 0  # as the eager path zeroes them: -0.0 for a negative weight
        return kept
    kept = kernels.keep_flags(src.array, th.value, mask.numpy())
    mask[ties] = 0
    return kept - len(ties)


# ----------------------------------------------------------------------------- equation 3.2
def _unit_axis(module: nn.Module) -> int:
    """:func:`~utils.pruning.graph.unit_axis`, refusing a grouped ConvTranspose (its units are
    not whole slices of one axis)."""
    if _grouped_transpose(module):
        raise ValueError("structured pruning of a grouped ConvTranspose is not supported")
    return unit_axis(module)


def unit_rows(w: Tensor, module: nn.Module) -> Tensor:
    """The weights as one row per output unit: row ``W_i:`` of a Linear, filter ``i`` of a conv."""
    axis = _unit_axis(module)
    return w.movedim(axis, 0).reshape(w.shape[axis], -1)


def unit_norms(module: nn.Module, p: float = 2.0) -> Tensor:
    """The L_p norm of each output unit's weights (in float32, or float64 for float64 weights)."""
    w = effective_weight(module)
    w = w if w.dtype == torch.float64 else w.float()
    return torch.linalg.vector_norm(unit_rows(w, module), ord=p, dim=1)


def _check_p(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a positive number, got {type(p).__name__} {p!r}")
    if math.isnan(p) or p <= 0:
        raise ValueError(f"p must be > 0 (the order of the norm), got {p!r}")
    return float(p)


def _default_structured_layers(model: nn.Module) -> list[str]:
    """Every prunable layer except those whose output is the model's output (the classes)."""
    try:
        heads = output_layers(model)
    except ValueError as e:
        raise ValueError(
            f"{e}. Without the graph the output layer is unknown: name layers= explicitly"
        ) from None
    names = [n for n in select_layers(model) if n not in heads]
    if not names:
        raise ValueError(
            "every prunable layer produces the model's output; name layers= explicitly"
        )
    return names


def prune_structured(
    model: nn.Module,
    ratio: float,
    scope: str = "local",
    p: float = 2.0,
    layers: Iterable[str] | str | None = None,
    round_to: int = 1,
) -> dict[str, Tensor]:
    """Remove whole output units (Linear rows, conv filters) with the smallest L_p norm.

    Prunes exactly ``round(ratio * units)`` units per layer (``"local"``) or over all selected
    layers (``"global"``), but never a layer's last unit. With ``round_to=R`` (such as 8, for
    the vector width of CPU and GPU kernels) each layer then keeps the smallest multiple of R at
    or above what that leaves it (all its units when that multiple exceeds the layer): the
    strongest of its chosen units are spared again (ties: the later ones), so the counts are
    exact per layer for that rule and at most ``round(ratio * units)`` are pruned. This rounds
    the kept count up; Torch-Pruning's ``round_to`` (1.6) rounds it down and prunes more. Units
    pruned earlier stay pruned, which can leave a layer off the multiple.

    For ``"global"`` each norm is divided by the mean norm of the layer's remaining units: raw
    norms are not comparable across layers (initialization scales weights by fan-in, and a
    BatchNorm after a layer makes its weight scale meaningless), so a unit is judged against its
    own layer's average.
    By default every layer is pruned except those that produce the model's output (found in
    the torch.fx graph: their units are the classes). A pruned unit is silenced completely:
    its weights, its bias, and the BatchNorm that follows it are masked. Returns weight masks
    (bool, 1 = kept) by layer.
    """
    r, scope, p = check_share(ratio), _check_scope(scope), _check_p(p)
    if isinstance(round_to, bool) or not isinstance(round_to, numbers.Integral):
        raise TypeError(f"round_to must be a positive int, got {type(round_to).__name__}")
    if round_to < 1:
        raise ValueError(f"round_to must be a positive int, got {round_to!r}")
    round_to = int(round_to)
    selected = select_layers(model, _default_structured_layers(model) if layers is None else layers)
    refuse_unmaskable((name, m, "weight") for name, m in selected.items())
    tensors = weight_tensors(model, selected)
    if len(tensors) < len(selected):
        raise ValueError("structured pruning of a weight shared by several layers is not supported")
    plan = _unit_targets(model, selected)  # the biases and BatchNorms the units are silenced in
    refuse_unmaskable(t for targets in plan.values() for t in targets)
    with torch.no_grad():
        scores = {
            name: _unit_scores(name, m, p, normalize=scope == "global")
            for name, m in selected.items()
        }
        pruned = _choose_units(scores, r, scope)  # raises before anything is changed
        if round_to > 1:
            pruned = {n: _round_kept(scores[n], g, round_to) for n, g in pruned.items()}
        return _silence_units(selected, pruned, plan)


def _round_kept(scores: Tensor, gone: Tensor, round_to: int) -> Tensor:
    """``gone`` with its strongest newly pruned units spared until the kept count is a multiple
    of ``round_to`` (or the whole layer); units pruned earlier (score -1) are never spared."""
    n, kept = gone.numel(), int((~gone).sum())
    spare = min(n, -(-kept // round_to) * round_to) - kept
    newly = gone & (scores != -1.0)
    spare = min(spare, int(newly.sum()))
    if spare <= 0:
        return gone
    # keep pruning the weakest of the chosen (earlier-pruned ones, at -1, first; ties: earliest)
    return smallest_k(
        torch.where(gone, scores, torch.full_like(scores, math.inf)), n - kept - spare
    )


def _unit_scores(name: str, module: nn.Module, p: float, normalize: bool) -> Tensor:
    """L_p norm per unit (over the layer's mean if ``normalize``); -1 for units pruned earlier."""
    w, mask = weight_and_mask(module)
    if not torch.isfinite(w).all():
        raise ValueError(f"layer {name!r} has NaN or infinite weights")
    s = unit_norms(module, p)
    gone = (
        torch.zeros_like(s, dtype=torch.bool)
        if mask is None
        else (unit_rows(mask, module) == 0).all(dim=1)
    )
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
                raise ValueError(
                    f"layer {name!r} already has {already[name]} pruned units, "
                    f"more than the {k} asked for"
                )
            pruned[name] = smallest_k(s, k)
        return pruned
    total = sum(s.numel() for s in scores.values())
    k = min(round(r * total), total - len(scores))
    if sum(already.values()) > k:
        raise ValueError(
            f"{sum(already.values())} units are already pruned, more than the {k} asked for"
        )
    candidates = [s.clone().cpu() for s in scores.values()]
    for s in candidates:  # the strongest unit of each layer is never a candidate
        s[s.argmax()] = math.inf
    gone = smallest_k(torch.cat(candidates), k)
    return {
        name: g.to(s.device)
        for (name, s), g in zip(scores.items(), gone.split([s.numel() for s in candidates]))
    }


def _unit_targets(
    model: nn.Module, selected: dict[str, nn.Module]
) -> dict[str, list[tuple[str, nn.Module, str]]]:
    """For each layer, the other tensors a pruned unit is silenced in: its bias and the
    affine parameters of the BatchNorm after it (warns where that BatchNorm has none)."""
    bns, modules, plan = following_batchnorms(model), dict(model.named_modules()), {}
    for name, m in selected.items():
        targets = [(name, m, "bias")] if m.bias is not None else []
        bn = modules[bns[name]] if name in bns else None
        if bn is not None and bn.affine:
            targets += [(bns[name], bn, "weight"), (bns[name], bn, "bias")]
        elif bn is not None and bn.track_running_stats:
            warnings.warn(
                f"{bns[name]!r} has no affine parameters to mask: in eval mode a pruned unit of "
                f"{name!r} still outputs -running_mean / std",
                stacklevel=4,
            )
        plan[name] = targets
    return plan


def _silence_units(
    selected: dict[str, nn.Module],
    pruned: dict[str, Tensor],
    plan: dict[str, list[tuple[str, nn.Module, str]]],
) -> dict[str, Tensor]:
    """Mask the pruned units' weights and the tensors of ``plan`` (biases, the following
    BatchNorm); return the weight masks."""
    unit_masks = {}
    for name, m in selected.items():
        keep_units = ~pruned[name]
        w, mask = weight_and_mask(m)
        axis = _unit_axis(m)
        shape = [1] * w.dim()
        shape[axis] = -1
        keep = keep_units.view(shape).expand_as(w).clone()
        if mask is not None:
            keep &= mask.bool()
        unit_masks[name] = keep
        masks.set_mask(m, "weight", keep)
        for _, mod, tensor in plan[name]:
            _, old = weight_and_mask(mod, tensor)
            masks.set_mask(mod, tensor, keep_units if old is None else keep_units & old.bool())
    return unit_masks


# ----------------------------------------------------------------------------- 2:4 pattern
def semi_structured_mask(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Keep the ``n`` largest magnitudes in every group of ``m`` consecutive inputs (N:M sparsity).

    With the default 2:4 this is the pattern NVIDIA sparse tensor cores run at up to twice the
    dense speed; the mask can be computed anywhere, only its speed needs such a GPU. Ties go to
    the earlier input. Returns a bool mask (True = kept) shaped like ``weight``.
    """
    if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n <= m:
        raise ValueError(f"need integers 0 < n <= m, got n={n!r}, m={m!r}")
    if weight.dim() == 0 or weight.shape[-1] % m:
        raise ValueError(
            f"the last dimension ({tuple(weight.shape)[-1:]}) must be a multiple of m={m}"
        )
    groups = weight.detach().abs().reshape(-1, m).float()
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
    return keep.view_as(weight)


# ----------------------------------------------------------------------------- inspection
def sparsity(model: nn.Module) -> float:
    """Fraction of the weights of all Linear and convolution layers that are zero, in [0, 1].

    A weight tensor shared by several layers is counted once.
    """
    with torch.no_grad():
        zeros = total = 0
        for t in weight_tensors(model, select_layers(model), check_shared=False):
            w = effective_weight(t.modules[0])
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
        return zeros / total


def sparsity_report(model: nn.Module):
    """One row per Linear/convolution layer (and a total): shape, weights kept, sparsity, units
    alive.

    The total counts a weight tensor shared by several layers once.
    """
    import pandas as pd  # only here: the pruning functions do not need it

    rows, seen, n, kept_total = [], set(), 0, 0
    with torch.no_grad():
        for name, m in select_layers(model).items():
            w = effective_weight(m)
            kept = int((w != 0).sum())
            alive = (
                int((unit_rows(w, m) != 0).any(dim=1).sum()) if not _grouped_transpose(m) else None
            )
            rows.append(
                {
                    "layer": name,
                    "type": masks.base_class(m).__name__,
                    "shape": tuple(w.shape),
                    "weights": w.numel(),
                    "kept": kept,
                    "sparsity": 1 - kept / w.numel(),
                    "units alive": "" if alive is None else f"{alive}/{len(unit_rows(w, m))}",
                }
            )
            if id(masks.stored(m)) not in seen:
                seen.add(id(masks.stored(m)))
                n, kept_total = n + w.numel(), kept_total + kept
    rows.append(
        {
            "layer": "total",
            "type": "",
            "shape": "",
            "weights": n,
            "kept": kept_total,
            "sparsity": 1 - kept_total / n,
            "units alive": "",
        }
    )
    return pd.DataFrame(rows).set_index("layer").round({"sparsity": 4})


def _grouped_transpose(m: nn.Module) -> bool:
    return isinstance(m, _ConvTransposeNd) and m.groups != 1


# ----------------------------------------------------------------------------- housekeeping
def is_pruned(model: nn.Module) -> bool:
    """True while any tensor of the model carries a pruning mask."""
    return any(True for _ in masks.masked(model))


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every mask into its tensor and drop the parametrization; returns the model.

    Afterwards the state_dict has plain ``weight``/``bias`` entries only, the zeros are
    ordinary values (same Parameter objects, so an optimizer keeps working), and nothing
    keeps them zero during further training.
    """
    return masks.fold_all(model)


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy, masks included (tied weights stay tied within the copy)."""
    return copy.deepcopy(model)
