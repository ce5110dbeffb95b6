"""Pruning masks on a public torch API: ``torch.nn.utils.parametrize``.

A masked tensor is a parametrization: ``module.weight`` is computed as ``original * mask`` every
time it is read, also where a parent module reads a child's weight without calling the child's
forward (``nn.MultiheadAttention`` reads ``out_proj.weight``). The original stays the same
Parameter object (no ``right_inverse``), so an optimizer built before pruning keeps working and
tied weights stay tied; its pruned entries get zero gradient through the product, and whatever an
optimizer does to them (momentum, weight decay) never reaches the computed weight. This is the
mechanism ``torch.ao.pruning`` uses too.

The state_dict of a masked module holds ``parametrizations.<name>.original`` and
``parametrizations.<name>.0.mask``; :func:`fold` (``make_permanent``) turns it back into a plain
``<name>`` entry.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


class Mask(nn.Module):
    """The parametrization ``original * mask``; ``mask`` is a 0/1 buffer of the tensor's dtype."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, original: Tensor) -> Tensor:
        return original * self.mask


def base_class(module: nn.Module) -> type:
    """The module's own class (``Linear``), not torch's ``ParametrizedLinear`` wrapper."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _parametrizations(module: nn.Module, name: str) -> nn.ModuleList | None:
    if not parametrize.is_parametrized(module, name):
        return None
    return module.parametrizations[name]


def is_masked(module: nn.Module, name: str = "weight") -> bool:
    """True if ``module.<name>`` is computed by exactly one :class:`Mask` and nothing else."""
    plist = _parametrizations(module, name)
    return plist is not None and len(plist) == 1 and isinstance(plist[0], Mask)


def has_foreign_parametrization(module: nn.Module, name: str = "weight") -> bool:
    """True if ``module.<name>`` is computed by a parametrization that is not a lone mask
    (weight_norm, spectral_norm, orthogonal, ...): such a tensor cannot take a mask here."""
    return _parametrizations(module, name) is not None and not is_masked(module, name)


def mask_of(module: nn.Module, name: str = "weight") -> Tensor | None:
    """The 0/1 mask of ``module.<name>`` (the live buffer), or ``None`` if it carries none."""
    return module.parametrizations[name][0].mask if is_masked(module, name) else None


def stored(module: nn.Module, name: str = "weight") -> Tensor | None:
    """The tensor as stored, before any mask: the Parameter an optimizer updates."""
    if is_masked(module, name):
        return module.parametrizations[name].original
    return module._parameters.get(name, getattr(module, name, None))


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before its parametrizations change.

    torch puts a parametrized module in a generated class whose properties compute the tensors,
    and ``copy.deepcopy`` shares that class between the copies; registering or removing a
    parametrization edits the class, so without this a change to a copy would break the original.
    """
    cls = type(module)
    if parametrize.is_parametrized(module):
        module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def set_mask(module: nn.Module, name: str, keep: Tensor) -> None:
    """Make ``keep`` (0/1 or bool, the tensor's shape) the mask of ``module.<name>``.

    A mask already there is overwritten in place (the caller includes the old mask in ``keep``);
    otherwise a :class:`Mask` parametrization is registered.
    """
    tensor = stored(module, name)
    if not isinstance(tensor, nn.Parameter):
        raise ValueError(
            f"{type(module).__name__}.{name} is not a Parameter, so it cannot be masked"
        )
    if keep.shape != tensor.shape:
        raise ValueError(f"the mask has shape {tuple(keep.shape)}, {name} {tuple(tensor.shape)}")
    if keep.dtype != torch.bool and not bool(((keep == 0) | (keep == 1)).all()):
        raise ValueError("a mask holds only 0 and 1 (or False and True)")
    if mask_of(module, name) is not None:
        install(module, name, keep)
    else:  # a copy of its own: the caller's tensor must not become the live mask of this module
        install(module, name, keep.to(device=tensor.device, dtype=tensor.dtype, copy=True))


def install(module: nn.Module, name: str, mask: Tensor) -> None:
    """:func:`set_mask` without its checks, for callers that built ``mask`` themselves: a 0/1
    tensor of the Parameter's shape, dtype and device, which becomes the live mask (no copy)
    unless a mask is there already, which is overwritten in place."""
    old = mask_of(module, name)
    if old is not None:
        old.copy_(mask)
        return
    _own_class(module)
    # unsafe: skip torch's check, which computes the masked tensor once (the mask keeps the
    # tensor's shape and dtype by construction)
    parametrize.register_parametrization(module, name, Mask(mask), unsafe=True)


def load_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load the state_dict of a masked model into ``model`` (a plain one of the same
    architecture, or a masked one): masks are first installed where ``state`` has them, then
    everything is loaded (strictly: keys must match)."""
    suffix = ".0.mask"
    for key in state:
        if ".parametrizations." in f".{key}" and key.endswith(suffix):
            owner, _, name = key[: -len(suffix)].rpartition("parametrizations.")
            module = model.get_submodule(owner.rstrip("."))
            if not is_masked(module, name):
                set_mask(module, name, torch.ones_like(stored(module, name), dtype=torch.bool))
    model.load_state_dict(state)


def fold(module: nn.Module, name: str = "weight") -> None:
    """Write the mask into the tensor and remove the parametrization (same Parameter object)."""
    _own_class(module)
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def masked(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(module name, module, tensor name)`` for every masked tensor of ``model``."""
    for owner, m in model.named_modules():
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations.keys()):
                if is_masked(m, name):
                    yield owner, m, name


def own_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """``(module name, module, tensor name, Parameter)`` for every parameter of every module,
    a masked one under its own name and module (not inside torch's parametrization containers)."""
    for owner, m in model.named_modules():
        if isinstance(m, parametrize.ParametrizationList):
            continue
        for name, p in m._parameters.items():
            if p is not None:
                yield owner, m, name, p
        if parametrize.is_parametrized(m):
            for name in m.parametrizations.keys():
                # one original (ours), or several (weight_norm's original0 and original1)
                for p in m.parametrizations[name].parameters(recurse=False):
                    yield owner, m, name, p


def fold_all(model: nn.Module) -> nn.Module:
    """:func:`fold` every mask of ``model``; returns the model."""
    for _, m, name in list(masked(model)):
        fold(m, name)
    return model


@torch.no_grad()
def effective(module: nn.Module, name: str = "weight") -> Tensor:
    """What the module computes with (``original * mask`` where masked), detached."""
    return getattr(module, name).detach()
