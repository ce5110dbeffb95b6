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
    """``model(batch)`` with ``use_cache=False`` where the model may take it (a ``use_cache``
    parameter, or ``**kwargs`` and a config that has one): no key/value cache is built."""
    params = inspect.signature(model.forward).parameters
    takes = "use_cache" in params or (
        any(p.kind is p.VAR_KEYWORD for p in params.values())
        and hasattr(getattr(model, "config", None), "use_cache")
    )
    model(batch, use_cache=False) if takes else model(batch)


def _is_cache(value: object) -> bool:
    return hasattr(value, "get_seq_length")  # a transformers Cache, whatever its class


def _split(args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict]:
    """(hidden states, other arguments, keyword arguments), any key/value cache taken out."""
    args, kwargs = tuple(None if _is_cache(v) else v for v in args), dict(kwargs)
    for k, v in kwargs.items():
        kwargs[k] = None if _is_cache(v) else v
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    if args:
        return args[0], args[1:], kwargs
    if "hidden_states" in kwargs:
        return kwargs.pop("hidden_states"), (), kwargs
    raise ValueError("the first block was called without hidden states as its first argument")


def _hidden_of(out) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


def _same(a: object, b: object) -> bool:
    """Equal arguments: the same object, equal tensors, or containers of equal items."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # an object without a usable ==
        return False


@torch.no_grad()
def catch_inputs(
    model: nn.Module, blocks: nn.ModuleList, calibration: Tensor, batch_size: int = 16
) -> list[BlockInput]:
    """The first block's inputs for each batch of ``calibration``; the model stops there.

    First the model runs on one calibration row up to its last block, to check that each block
    receives the previous block's output and the same other arguments as the first block
    (attention mask, position ids or embeddings): a model whose blocks differ there (for
    example alternating sliding-window layers, which get their own mask) is refused, since the
    blocks are then run one at a time on the first block's arguments.
    """
    caught: list[BlockInput] = []
    device = next(model.parameters()).device

    def catch(mod, args, kwargs):
        caught.append(BlockInput(*_split(args, kwargs)))
        raise _Caught

    with eval_mode(model):
        _check_chain(model, blocks, calibration[:1].to(device))
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
    """Run ``batch`` through the blocks (not past the last one), checking as it goes."""
    state: dict = {"next": 0, "first": None, "out": None}

    def see_in(i: int):
        def hook(mod, args, kwargs) -> None:
            hidden, rest, named = _split(args, kwargs)
            if i != state["next"]:
                raise ValueError(
                    f"block {i} ran when block {state['next']} was expected: the blocks do not "
                    "run in order once each; pass blocks= the decoder's block stack"
                )
            if i == 0:
                state["first"] = (rest, named)
            elif not _same(hidden, state["out"]):
                raise ValueError(
                    f"block {i} does not receive block {i - 1}'s output as its hidden states, "
                    "so they cannot be run one after the other; pass blocks= the decoder's "
                    "block stack"
                )
            elif not _same((rest, named), state["first"]):
                raise ValueError(
                    f"block {i} receives other arguments than block 0 (for example its own "
                    "attention mask or position embeddings, as layers of alternating types "
                    "do): pruning block by block on block 0's arguments is not supported here"
                )
            state["next"] = i + 1
            if i == len(blocks) - 1:
                raise _Caught  # all checked: the last block and the head need not run

        return hook

    def see_out(i: int):
        def hook(mod, args, out) -> None:
            state["out"] = _hidden_of(out)

        return hook

    handles = []
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(see_in(i), with_kwargs=True))
        handles.append(b.register_forward_hook(see_out(i)))
    try:
        call_model(model, batch)
    except _Caught:
        pass
    finally:
        for h in handles:
            h.remove()
    if state["next"] != len(blocks):
        raise ValueError(
            f"only {state['next']} of the {len(blocks)} blocks ran in the model's forward "
            "pass; pass blocks= the ModuleList of decoder blocks the model runs in order"
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
