"""A decoder LM's block stack, read generically: find it, catch its inputs, run it block by block.

Pruning an LM one block at a time (as the SparseGPT and Wanda drivers do) needs three things
from any model: which modules are its blocks, what the first block receives (hidden states and
the keyword arguments the model passes it: attention mask, position ids or embeddings), and a
way to run one block on those inputs. This module gives them for the book's ``CharLM`` and for
Hugging Face decoders (Llama, Qwen2, Mistral, OPT, GPT-2, GPT-NeoX) without importing
transformers; a model it cannot read gets a ``ValueError`` that says what to pass.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from utils.pruning.modes import eval_mode


def _conv1d_class() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's layers: ``y = x @ W + b``, ``W`` of shape (in, out)),
    if transformers is loaded; it is never imported here."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D``: the layers LLM pruning works on."""
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def transposed(module: nn.Module) -> bool:
    """True for ``Conv1D``, whose weight is stored (in, out) rather than (out, in)."""
    return is_linear(module) and not isinstance(module, nn.Linear)


def in_features(module: nn.Module) -> int:
    """The number of inputs of a Linear or Conv1D."""
    return module.weight.shape[0] if transposed(module) else module.weight.shape[1]


def find_blocks(model: nn.Module, blocks: str | nn.ModuleList | None = None) -> str:
    """The name of the model's block stack: ``blocks`` if given (a module name or the
    ModuleList itself), else the longest ``ModuleList`` of modules of one class that hold
    Linear layers (ties: more parameters)."""
    names = {id(m): n for n, m in model.named_modules()}
    if blocks is not None:
        name = names.get(id(blocks)) if isinstance(blocks, nn.Module) else blocks
        found = dict(model.named_modules()).get(name) if isinstance(name, str) else None
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise ValueError(
                f"blocks={blocks!r} is not a non-empty ModuleList or Sequential of this model"
            )
        return name
    candidates = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1:
            if all(any(is_linear(x) for x in b.modules()) for b in m):
                size = sum(p.numel() for p in m.parameters())
                candidates.append((len(m), size, name))
    if not candidates:
        raise ValueError(
            f"could not find the blocks of this {type(model).__name__}: no ModuleList of "
            "repeated modules holding Linear layers; pass blocks='name.of.the.ModuleList' "
            "(the decoder blocks the model runs one after the other)"
        )
    return max(candidates)[2]


@dataclass
class BlockInput:
    """What one block receives for one calibration batch: hidden states and everything else."""

    hidden: Tensor
    args: tuple
    kwargs: dict


class _Caught(Exception):
    """Raised by the first block's hook once its input is caught: the rest is not needed."""


def call_model(model: nn.Module, batch: Tensor) -> None:
    """``model(batch)``, with ``use_cache=False`` where the model takes it (no key/value cache)."""
    params = inspect.signature(model.forward).parameters
    model(batch, use_cache=False) if "use_cache" in params else model(batch)


def _split(args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], dict(kwargs)
    if "hidden_states" in kwargs:
        rest = dict(kwargs)
        return rest.pop("hidden_states"), (), rest
    raise ValueError("the first block was called without hidden states as its first argument")


def _hidden_of(out) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


@torch.no_grad()
def catch_inputs(
    model: nn.Module, blocks: nn.ModuleList, calibration: Tensor, batch_size: int = 16
) -> list[BlockInput]:
    """The first block's inputs for each batch of ``calibration``; the model stops there.

    On the first batch the whole model runs once, to check that each block's input is the
    previous block's output (a model whose blocks are not chained that way is refused).
    """
    caught: list[BlockInput] = []
    device = next(model.parameters()).device

    def catch(mod, args, kwargs):
        caught.append(BlockInput(*_split(args, kwargs)))
        raise _Caught

    with eval_mode(model):
        _check_chain(model, blocks, calibration[:batch_size].to(device))
        handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for i in range(0, len(calibration), batch_size):
                try:
                    call_model(model, calibration[i : i + batch_size].to(device))
                except _Caught:
                    pass
                if len(caught) != i // batch_size + 1:
                    raise ValueError("the first block did not run on a calibration batch")
        finally:
            handle.remove()
    return caught


def _check_chain(model: nn.Module, blocks: nn.ModuleList, batch: Tensor) -> None:
    seen_in, seen_out, handles = {}, {}, []

    def see_in(i: int):
        def hook(mod, args, kwargs) -> None:
            seen_in.setdefault(i, _split(args, kwargs)[0])

        return hook

    def see_out(i: int):
        def hook(mod, args, out) -> None:
            seen_out.setdefault(i, _hidden_of(out))

        return hook

    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(see_in(i), with_kwargs=True))
        handles.append(b.register_forward_hook(see_out(i)))
    try:
        call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    if len(seen_in) != len(blocks) or len(seen_out) != len(blocks):
        raise ValueError(
            f"only {len(seen_in)} of the {len(blocks)} blocks ran in the model's forward pass; "
            "pass blocks= the ModuleList of decoder blocks the model runs in order"
        )
    for i in range(len(blocks) - 1):
        if seen_in[i + 1] is not seen_out[i] and not torch.equal(seen_in[i + 1], seen_out[i]):
            raise ValueError(
                f"block {i + 1} does not receive block {i}'s output as its hidden states, so "
                "they cannot be run one after the other; pass blocks= the decoder's block stack"
            )


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[BlockInput]) -> list[BlockInput]:
    """The next block's inputs: ``block`` run on each batch, the other arguments kept."""
    with eval_mode(block):
        return [
            BlockInput(_hidden_of(block(x.hidden, *x.args, **x.kwargs)), x.args, x.kwargs)
            for x in inputs
        ]


def move_inputs(inputs: list[BlockInput], device: torch.device) -> list[BlockInput]:
    """The same inputs on ``device`` (tensors in args, kwargs and tuples of them moved)."""

    def to(v):
        if isinstance(v, Tensor):
            return v.to(device)
        if isinstance(v, tuple):
            return tuple(to(t) for t in v)
        return v

    return [
        BlockInput(to(x.hidden), to(x.args), {k: to(v) for k, v in x.kwargs.items()})
        for x in inputs
    ]
