"""One-shot pruning of transformer LMs: magnitude, Wanda, SparseGPT, N:M.

Unstructured and N:M pruning compare weights within a group: one output row (``sparsity``) or
every ``m`` consecutive inputs of a row (``nm=(n, m)``: keep ``n`` of ``m``). Counts are exact
per group, ties go to the earliest input, and masks are installed as parametrizations
(:mod:`utils.pruning.masks`), so fine-tuning cannot revive a pruned weight. Every public function
checks its arguments, and the model's structure, before it changes anything: a bad call raises
and leaves the model unchanged. The calibrated criteria then prune block by block in place; an
error part-way (a Hessian that damping cannot save, memory) says which blocks were pruned.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from utils.pruning import masks
from utils.pruning.decoder import (
    call_model,
    catch_inputs,
    find_blocks,
    in_features,
    is_linear,
    move_inputs,
    run_block,
    transposed,
)
from utils.pruning.magnitude import (
    check_share,
    refuse_unmaskable,
    select_layers,
    semi_structured_mask,
    weight_tensors,
)
from utils.pruning.modes import eval_mode

CRITERIA = ("magnitude", "wanda", "sparsegpt", "wanda+update")


# ----------------------------------------------------------------------------- masks and scores
def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask (bool) that prunes exactly ``round(sparsity * cols)`` smallest scores in every row;
    among equal scores the earliest input is pruned first."""
    return _prune_per_row(scores, round(sparsity * scores.shape[1]))


def _prune_per_row(scores: Tensor, k: int) -> Tensor:
    order = torch.sort(scores, dim=1, stable=True).indices[:, :k]  # stable: ties to the earliest
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, order, False)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask with the ``n`` largest scores of every ``m`` consecutive inputs (2:4 by default in
    :func:`utils.pruning.semi_structured_mask`, whose tie rule it shares)."""
    return semi_structured_mask(scores, n, m)


def wanda_scores(weight: Tensor, input_norms: Tensor) -> Tensor:
    """Wanda's saliency ``|W_ij| * ||X_j||_2`` (Sun et al. 2023), in float32."""
    return weight.detach().float().abs() * input_norms.float().to(weight.device)[None, :]


def reconstruction_error(weight: Tensor, new_weight: Tensor, gram: Tensor) -> float:
    """``||W X - W' X||_F^2`` over the calibration inputs, from their Gram matrix ``X^T X``."""
    d = (weight.float() - new_weight.float()).to(gram.device)
    return float(torch.einsum("ij,jk,ik->", d, gram.float(), d))


def semi_structured_bytes(rows: int, cols: int, bits: int = 16) -> int:
    """Bytes of a 2:4 matrix as sparse tensor cores store it: the kept half of the values plus
    a 2-bit position for each kept value (for 16-bit values: 9/16 of the dense bytes)."""
    if rows < 1 or cols < 1 or cols % 4:
        raise ValueError(f"need rows >= 1 and cols a positive multiple of 4, got {rows}x{cols}")
    kept = rows * cols // 2
    return kept * bits // 8 + kept * 2 // 8


# ----------------------------------------------------------------------------- calibration
class InputStats:
    """Running statistics (float32) of the inputs a Linear layer has seen: ``X^T X`` and the row
    count, or with ``full=False`` only the diagonal of ``X^T X`` (all Wanda needs: ``features``
    numbers instead of ``features ** 2``)."""

    def __init__(self, features: int, device: torch.device, full: bool = True) -> None:
        self.gram = torch.zeros(features, features, device=device) if full else None
        self.squares = None if full else torch.zeros(features, device=device)
        self.count = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.gram is not None:
            self.gram += x.T @ x
        else:
            self.squares += (x * x).sum(0)
        self.count += x.shape[0]

    @property
    def norms(self) -> Tensor:
        """``||X_j||_2`` of every input feature over all rows seen."""
        diagonal = self.gram.diagonal() if self.gram is not None else self.squares
        return diagonal.clamp_min(0).sqrt()


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calibration: Tensor,
    batch_size: int = 16,
    full: bool = True,
) -> dict[str, InputStats]:
    """Run the whole ``model`` on ``calibration`` (rows = samples); collect each layer's input
    statistics (``full=False``: only the diagonal of ``X^T X``, :class:`InputStats`). For
    pruning block by block, :func:`prune_llm` runs one block at a time instead."""
    stats, handles = {}, []
    device = next(model.parameters()).device

    def record(name: str):
        def hook(mod: nn.Module, inp: tuple, out: Tensor) -> None:
            stats[name].add(inp[0])

        return hook

    for name, m in layers.items():
        stats[name] = InputStats(in_features(m), device, full)
        handles.append(m.register_forward_hook(record(name)))
    try:
        with eval_mode(model):
            for i in range(0, len(calibration), batch_size):
                call_model(model, calibration[i : i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return stats


# ----------------------------------------------------------------------------- SparseGPT
def sparsegpt_layer(
    weight: Tensor,
    stats: InputStats,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    damp: float = 0.01,
    blocksize: int = 128,
    keep: Tensor | None = None,
    consume: bool = False,
) -> tuple[Tensor, Tensor]:
    """SparseGPT (Frantar and Alistarh 2023) for one Linear: returns (new weight, keep mask).

    ``consume=True`` computes in the statistics' own ``X^T X`` and drops it from ``stats``
    (``stats.gram`` is ``None`` afterwards): one matrix of ``cols ** 2`` floats less at the peak.

    ``keep`` (bool, the weight's shape) fixes the mask instead of choosing it, so that only
    SparseGPT's update of the kept weights is applied: Wanda's mask with SparseGPT's update is
    the mask-versus-update ablation of Sun et al. (their section 5). Give it instead of
    ``sparsity`` and ``nm``.

    Columns are processed left to right; each pruned weight's error is spread over the columns
    not yet processed with the inverse Hessian ``H = 2 X^T X / n`` (OBS), damped by ``damp``
    times the mean of ``diag H``. With the upper Cholesky factor ``H^-1 = U^T U``, the saliency
    of weight ``j`` is ``w_j^2 / U_jj^2``: twice the OBS cost ``w_j^2 / (2 [(H_F)^-1]_jj)`` over
    the set ``F`` of columns not yet processed (the factor changes no ranking).

    **A per-row variant.** The reference code chooses the mask lazily per block of
    ``blocksize`` columns *across all rows* of the block (so rows end up unevenly sparse); here
    every row is treated alone: with ``sparsity`` each row loses ``round(s*i2) - round(s*i1)``
    weights in block ``[i1, i2)``, so exactly ``round(s*cols)`` per row, as Wanda and magnitude
    do in :func:`prune_llm`. With ``nm`` the mask is chosen per group of ``m`` columns.

    As in the reference, inputs that were always zero get ``H_jj`` set (here to the mean of
    ``diag H``) and their weights set to zero. Raises ``ValueError`` if ``H`` is not positive
    definite even after damping (try a larger ``damp``).
    """
    if stats.gram is None:
        raise ValueError("SparseGPT needs the full X^T X: collect InputStats with full=True")
    w = weight.detach().float().clone()
    rows, cols = w.shape
    fixed = keep is not None
    if fixed and (keep.shape != w.shape or keep.dtype != torch.bool):
        raise ValueError(f"keep must be a bool mask of shape {tuple(w.shape)}")
    if fixed and (sparsity is not None or nm is not None):
        raise ValueError("give keep= or a sparsity / nm, not both")
    if nm is not None:
        blocksize = max(nm[1], blocksize - blocksize % nm[1])
    h = stats.gram.to(w.device, torch.float32, copy=not consume)
    if consume:
        stats.gram = None
    h.mul_(2 / max(stats.count, 1))
    dead = h.diagonal() == 0  # inputs that were always zero: their weights cannot matter
    if dead.any():
        alive_mean = float(h.diagonal()[~dead].mean()) if (~dead).any() else 1.0
        h[dead, dead] = alive_mean
        w[:, dead] = 0
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    try:  # H^-1 = U^T U; each intermediate is freed as soon as the next exists
        factor = torch.linalg.cholesky(h)
        del h
        hinv = torch.cholesky_inverse(factor)
        del factor
        hinv = torch.linalg.cholesky(hinv, upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(
            f"SparseGPT: the damped Hessian is not positive definite (damp={damp}); "
            "try a larger damp, e.g. 0.1, or more calibration data"
        ) from e
    keep = keep.to(w.device).clone() if fixed else torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        h1 = hinv[i1:i2, i1:i2]
        d = h1.diagonal()
        if nm is None and not fixed:
            k = round(sparsity * i2) - round(sparsity * i1)
            keep[:, i1:i2] = _prune_per_row(w[:, i1:i2] ** 2 / d**2, k)
        # the block transposed: column i of the weights is row i here, contiguous in memory
        w1, err = w[:, i1:i2].T.contiguous(), torch.empty(i2 - i1, rows, device=w.device)
        drop = (~keep[:, i1:i2]).T.contiguous()
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                g = slice(i, i + nm[1])
                kept = nm_mask((w1[g] ** 2 / d[g, None] ** 2).T, *nm)
                keep[:, i1 + i : i1 + i + nm[1]] = kept
                drop[g] = ~kept.T
            err[i] = w1[i] * drop[i] / d[i]  # what pruning column i removes, scaled
            w1[i:].addr_(h1[i, i:], err[i], alpha=-1)  # spread over the columns to its right
        w[:, i1:i2] = (w1 * ~drop).T
        w[:, i2:].addmm_(err.T, hinv[i1:i2, i2:], alpha=-1)
    return (w * keep).to(weight.dtype), keep


# ----------------------------------------------------------------------------- one-shot pruning
def _check_nm(nm: object) -> tuple[int, int]:
    ints = (
        isinstance(nm, Sequence)
        and len(nm) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in nm)
    )
    if not ints or not 0 < nm[0] <= nm[1]:
        raise ValueError(
            f"nm must be (n, m) with integers 0 < n <= m (keep n of every m), got {nm!r}"
        )
    return int(nm[0]), int(nm[1])


def _blocks_or_none(model: nn.Module, blocks: str | nn.ModuleList | None) -> str | None:
    """The block stack's name; ``None`` for a model without one (unless ``blocks`` was given)."""
    if blocks is not None:
        return find_blocks(model, blocks)
    try:
        return find_blocks(model)
    except ValueError:
        return None


def default_layers(model: nn.Module, blocks: str | nn.ModuleList | None = None) -> list[str]:
    """The Linear (and GPT-2 ``Conv1D``) layers inside the model's blocks
    (:func:`utils.pruning.decoder.find_blocks`); for a model without blocks, every Linear but
    the last (the output layer)."""
    stack = _blocks_or_none(model, blocks)
    names = [n for n, m in model.named_modules() if is_linear(m)]
    inside = [n for n in names if stack is not None and n.startswith(stack + ".")]
    return inside or names[:-1]


def _block_of(name: str, stack: str) -> int | None:
    """The index of the block that holds layer ``name`` (``None`` outside the stack)."""
    if not name.startswith(stack + "."):
        return None
    return int(name[len(stack) + 1 :].split(".")[0])


def _select(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    selected = select_layers(model, names, accept=is_linear, kind="Linear")
    for owner_name, owner in model.named_modules():  # it computes with out_proj.weight directly
        if isinstance(owner, nn.MultiheadAttention) and f"{owner_name}.out_proj" in selected:
            raise ValueError(
                f"{owner_name}.out_proj belongs to an nn.MultiheadAttention, which never calls "
                "it (it reads the weight itself), so its inputs cannot be seen: leave it out"
            )
    return selected


def _refuse_uncovered(stack: nn.Module) -> None:
    """Refuse a block whose matrix weights lie mostly outside Linear layers (a mixture of experts
    holds its experts as 3-D tensors): pruning only its Linears would prune a small part."""
    inside = {id(p) for m in stack.modules() if is_linear(m) for p in m.parameters()}
    matrices = [p for p in stack.parameters() if p.dim() >= 2]
    outside = sum(p.numel() for p in matrices if id(p) not in inside)
    if outside > 0.5 * sum(p.numel() for p in matrices):
        raise ValueError(
            f"{outside:,} of the blocks' matrix weights are not in Linear layers (for example "
            "fused mixture-of-experts tensors), which prune_llm does not prune; pass layers= "
            "to prune only the Linear layers anyway"
        )


def _validate(
    model: nn.Module,
    sparsity: object,
    criterion: str,
    calibration: object,
    nm: object,
    layers: Iterable[str] | None,
    blocks: str | nn.ModuleList | None,
    damp: float,
) -> tuple[dict[str, float | None], tuple[int, int] | None, str | None]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if (sparsity is None) == (nm is None):
        raise ValueError("give exactly one of sparsity= (unstructured) and nm=(n, m) (N:M)")
    if not (isinstance(damp, (int, float)) and damp > 0):
        raise ValueError(f"damp must be a positive number, got {damp!r}")
    if isinstance(sparsity, dict):
        if layers is not None:
            raise ValueError("sparsity is a dict of per-layer sparsities: leave layers=None")
        layers = list(sparsity)
    stack = _blocks_or_none(model, blocks)
    if layers is None and stack is not None:
        _refuse_uncovered(model.get_submodule(stack))
    selected = _select(model, default_layers(model, blocks) if layers is None else layers)
    refuse_unmaskable((n, m, "weight") for n, m in selected.items())
    if len(weight_tensors(model, selected)) < len(selected):  # also refuses sharing outside
        raise ValueError("one-shot pruning of a weight shared by several layers is not supported")
    nm = None if nm is None else _check_nm(nm)
    plan = {}
    for n, m in selected.items():
        if masks.is_masked(m):
            raise ValueError(f"layer {n!r} is already pruned; one-shot methods start dense")
        if not torch.isfinite(m.weight).all():
            raise ValueError(f"layer {n!r} has NaN or infinite weights")
        if nm is not None and in_features(m) % nm[1]:
            raise ValueError(
                f"layer {n!r} has {in_features(m)} inputs, not a multiple of m={nm[1]}"
            )
        s = sparsity.get(n) if isinstance(sparsity, dict) else sparsity
        plan[n] = None if nm is not None else check_share(s, f"sparsity of {n!r}", one=False)
    if criterion != "magnitude":
        if not isinstance(calibration, Tensor) or calibration.dim() < 1 or len(calibration) == 0:
            raise ValueError(
                f"criterion {criterion!r} needs calibration= (a non-empty tensor of model inputs)"
            )
        if stack is None:
            find_blocks(model)  # raises, saying what to pass
        outside = [n for n in plan if _block_of(n, stack) is None]
        if outside:
            raise ValueError(
                f"{outside} lie outside the blocks ({stack!r}): criterion {criterion!r} "
                "calibrates block by block; prune them with criterion='magnitude'"
            )
    return plan, nm, stack


def _prune_layer(
    module: nn.Module, stats: InputStats | None, criterion: str, share, nm, damp: float
) -> tuple[Tensor | None, Tensor]:
    """(new weight or ``None`` where the kept weights stay as they are, keep mask) of one
    layer, both in the layer's own weight layout."""
    w = masks.stored(module).detach()
    w = w.T if transposed(module) else w  # rows are outputs, columns inputs
    if criterion == "sparsegpt":
        new, keep = sparsegpt_layer(w, stats, share, nm, damp, consume=True)
    elif criterion == "wanda+update":  # Wanda's mask, SparseGPT's update
        scores = wanda_scores(w, stats.norms)
        mask = nm_mask(scores, *nm) if nm is not None else row_mask(scores, share)
        new, keep = sparsegpt_layer(w, stats, damp=damp, keep=mask, consume=True)
    else:
        scores = w.float().abs() if criterion == "magnitude" else wanda_scores(w, stats.norms)
        keep = nm_mask(scores, *nm) if nm is not None else row_mask(scores, share)
        new = None
    if transposed(module):
        new, keep = (None if new is None else new.T), keep.T.contiguous()
    return new, keep


def _apply(module: nn.Module, new: Tensor | None, keep: Tensor, install: bool = True) -> None:
    with torch.no_grad():
        if new is not None:
            masks.stored(module).copy_(new)
        if install:
            masks.set_mask(module, "weight", keep)
        else:  # zeros in place, as the papers' drivers do: no mask to keep them zero
            masks.stored(module).mul_(keep)


@torch.no_grad()
def _block_stats(
    block: nn.Module, layers: dict[str, nn.Module], inputs: list, full: bool
) -> dict[str, InputStats]:
    """Each layer's input statistics while ``block`` runs on every calibration batch."""
    device = next(block.parameters()).device
    stats = {n: InputStats(in_features(m), device, full) for n, m in layers.items()}
    handles = [
        m.register_forward_hook(lambda mod, inp, out, n=n: stats[n].add(inp[0]))
        for n, m in layers.items()
    ]
    try:
        run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    silent = [n for n, s in stats.items() if s.count == 0]
    if silent:
        raise ValueError(f"{silent} never ran when their block did, so they cannot be calibrated")
    return stats


def prune_llm(
    model: nn.Module,
    sparsity: float | dict[str, float] | None = None,
    criterion: str = "wanda",
    calibration: Tensor | None = None,
    nm: tuple[int, int] | None = None,
    layers: Iterable[str] | None = None,
    damp: float = 0.01,
    blocks: str | nn.ModuleList | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 16,
    install_masks: bool = True,
) -> dict[str, Tensor]:
    """One-shot pruning of a decoder LM's Linear layers without retraining; returns keep masks
    by layer (in each weight's own layout).

    ``criterion``: ``"magnitude"`` (|W|), ``"wanda"`` (|W| * ||X_j||), ``"sparsegpt"`` (OBS
    reconstruction, which also updates the kept weights) or ``"wanda+update"`` (Wanda's mask,
    then SparseGPT's update of the kept weights). ``sparsity`` is a share per output row
    (one float, or a dict ``{layer: share}``); ``nm=(2, 4)`` keeps 2 of every 4 inputs instead.

    By default the Linear layers of the model's blocks are pruned (the block stack is found
    generically, see :func:`utils.pruning.decoder.find_blocks`; ``blocks=`` names it). The
    calibrated criteria run **sequentially, one pass per block**, as the papers' drivers do:
    the first block's inputs are caught once, then each block collects its layers' statistics,
    is pruned in place, and runs once more to give the next block its inputs, so each block is
    calibrated on the outputs of the already pruned blocks before it. Nothing is copied:
    memory is one block's activations and statistics (Wanda keeps only ``diag(X^T X)``).
    ``device="cuda"`` runs each block there while it is pruned and puts it back (the model can
    stay on the CPU). Blocks compute in the model's dtype; statistics are float32.

    ``install_masks=False`` zeroes the pruned weights in place and installs no mask (nothing to
    keep them zero if the model is trained later), returns ``{}``, and so needs no memory
    beyond the model's own: for a model that fills the machine.
    """
    plan, nm, stack = _validate(model, sparsity, criterion, calibration, nm, layers, blocks, damp)
    modules = dict(model.named_modules())
    results = {}
    if criterion == "magnitude":
        for n, share in plan.items():
            new, keep = _prune_layer(modules[n], None, criterion, share, nm, damp)
            _apply(modules[n], new, keep, install_masks)
            if install_masks:
                results[n] = keep
        return results
    stack_list = modules[stack]
    by_block: dict[int, list[str]] = {}
    for n in plan:
        by_block.setdefault(_block_of(n, stack), []).append(n)
    inputs = catch_inputs(model, stack_list, calibration, batch_size)
    done_blocks = 0
    for i in range(max(by_block) + 1):
        block = stack_list[i]
        home = next(block.parameters()).device
        run_on = torch.device(device) if device is not None else home
        if run_on != home:
            block.to(run_on)
            inputs = move_inputs(inputs, run_on)
        try:
            if i in by_block:
                layers_i = {n: modules[n] for n in by_block[i]}
                stats = _block_stats(block, layers_i, inputs, full=criterion != "wanda")
                for n, m in layers_i.items():  # each layer's statistics freed once used
                    new, keep = _prune_layer(m, stats.pop(n), criterion, plan[n], nm, damp)
                    _apply(m, new, keep, install_masks)
                    results[n] = keep.to(home) if install_masks else None
                    done_blocks = i + 1
                    del new, keep
            if i < max(by_block):
                inputs = run_block(block, inputs)
        except Exception as error:
            if done_blocks:  # say what was done: the blocks before this one are pruned
                error.add_note(
                    f"prune_llm: the first {done_blocks} blocks of {stack!r} were pruned "
                    "already (the last of them perhaps in part)"
                )
            raise
        finally:
            if run_on != home:
                block.to(home)
    return results if install_masks else {}


def prune_magnitude(
    model: nn.Module,
    sparsity: float | dict | None = None,
    nm: tuple[int, int] | None = None,
    layers: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """``prune_llm`` with ``|W|`` per output row (or per group of ``m`` inputs)."""
    return prune_llm(model, sparsity, "magnitude", None, nm, layers)


def prune_wanda(
    model: nn.Module,
    calibration: Tensor,
    sparsity: float | dict | None = None,
    nm: tuple[int, int] | None = None,
    layers: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """``prune_llm`` with Wanda's ``|W| * ||X_j||`` (Sun et al. 2023)."""
    return prune_llm(model, sparsity, "wanda", calibration, nm, layers)


def prune_sparsegpt(
    model: nn.Module,
    calibration: Tensor,
    sparsity: float | dict | None = None,
    nm: tuple[int, int] | None = None,
    layers: Iterable[str] | None = None,
    damp: float = 0.01,
) -> dict[str, Tensor]:
    """``prune_llm`` with SparseGPT's reconstruction (Frantar and Alistarh 2023)."""
    return prune_llm(model, sparsity, "sparsegpt", calibration, nm, layers, damp)


@torch.no_grad()
def rescale_inputs(
    norm: nn.LayerNorm, linears: Sequence[nn.Linear], channels: Sequence[int], factor: float
) -> None:
    """Multiply channels of a LayerNorm's gain and bias by ``factor`` and divide the same input
    columns of the Linears it feeds: the network computes the same function, but those inputs
    become large and their weights small (the outlier features of large LLMs). The LayerNorm
    needs its affine gain and bias (``elementwise_affine=True``)."""
    if getattr(norm, "weight", None) is None:
        raise ValueError("rescale_inputs needs a LayerNorm with a gain (elementwise_affine=True)")
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor!r}")
    idx = torch.as_tensor(list(channels), dtype=torch.long)
    if len(idx) and (idx.min() < 0 or idx.max() >= norm.normalized_shape[-1]):
        raise ValueError(f"channels must lie in [0, {norm.normalized_shape[-1]})")
    if any(masks.is_masked(lin) for lin in linears):
        raise ValueError("rescale before pruning: a Linear is already pruned")
    norm.weight[idx] *= factor
    if norm.bias is not None:
        norm.bias[idx] *= factor
    for lin in linears:
        lin.weight[:, idx] /= factor
