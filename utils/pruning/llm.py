"""One-shot pruning of transformer LMs: magnitude, Wanda, SparseGPT, N:M.

Unstructured and N:M pruning compare weights within a group: one output row (``sparsity``) or
every ``m`` consecutive inputs of a row (``nm=(n, m)``: keep ``n`` of ``m``). Counts are exact
per group, ties go to the earliest input, and masks are installed as parametrizations
(:mod:`utils.pruning.masks`), so fine-tuning cannot revive a pruned weight. Every public function
checks its arguments and computes everything on a copy first: a bad call raises and leaves
the model unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from utils.pruning import masks
from utils.pruning.magnitude import (
    check_share,
    clone_model,
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
    """Running ``X^T X`` (float32) and row count of the inputs a Linear layer has seen."""

    def __init__(self, features: int, device: torch.device) -> None:
        self.gram = torch.zeros(features, features, device=device)
        self.count = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.gram += x.T @ x
        self.count += x.shape[0]

    @property
    def norms(self) -> Tensor:
        """``||X_j||_2`` of every input feature over all rows seen."""
        return self.gram.diagonal().clamp_min(0).sqrt()


class _Enough(Exception):
    """Raised inside a forward pass once every layer of interest has seen its input."""


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calibration: Tensor,
    batch_size: int = 16,
    stop_early: bool = False,
) -> dict[str, InputStats]:
    """Run ``model`` on ``calibration`` (rows = samples); collect each layer's input statistics.

    With ``stop_early`` each forward pass is cut short once every layer has run (right for
    layers that run once per pass, such as the Linears of one transformer block).
    """
    stats, handles, seen = {}, [], set()
    device = next(model.parameters()).device

    def record(name: str):
        def hook(mod: nn.Module, inp: tuple, out: Tensor) -> None:
            stats[name].add(inp[0])
            seen.add(name)
            if stop_early and len(seen) == len(layers):
                raise _Enough

        return hook

    for name, m in layers.items():
        stats[name] = InputStats(m.in_features, device)
        handles.append(m.register_forward_hook(record(name)))
    try:
        with eval_mode(model):
            for i in range(0, len(calibration), batch_size):
                seen.clear()
                try:
                    model(calibration[i : i + batch_size].to(device))
                except _Enough:
                    pass
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
) -> tuple[Tensor, Tensor]:
    """SparseGPT (Frantar and Alistarh 2023) for one Linear: returns (new weight, keep mask).

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
    w = weight.detach().float().clone()
    rows, cols = w.shape
    fixed = keep is not None
    if fixed and (keep.shape != w.shape or keep.dtype != torch.bool):
        raise ValueError(f"keep must be a bool mask of shape {tuple(w.shape)}")
    if fixed and (sparsity is not None or nm is not None):
        raise ValueError("give keep= or a sparsity / nm, not both")
    if nm is not None:
        blocksize = max(nm[1], blocksize - blocksize % nm[1])
    h = stats.gram.float().to(w.device) * (2 / max(stats.count, 1))
    dead = h.diagonal() == 0  # inputs that were always zero: their weights cannot matter
    if dead.any():
        alive_mean = float(h.diagonal()[~dead].mean()) if (~dead).any() else 1.0
        h[dead, dead] = alive_mean
        w[:, dead] = 0
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(
            f"SparseGPT: the damped Hessian is not positive definite (damp={damp}); "
            "try a larger damp, e.g. 0.1, or more calibration data"
        ) from e
    keep = keep.to(w.device).clone() if fixed else torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        d, err = h1.diagonal(), torch.zeros_like(w1)
        if nm is None and not fixed:
            k = round(sparsity * i2) - round(sparsity * i1)
            keep[:, i1:i2] = _prune_per_row(w1**2 / d**2, k)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                g = slice(i, i + nm[1])
                keep[:, i1 + i : i1 + i + nm[1]] = nm_mask(w1[:, g] ** 2 / d[g] ** 2, *nm)
            q = w1[:, i] * keep[:, i1 + i]
            err[:, i] = (w1[:, i] - q) / d[i]
            w1[:, i:] -= err[:, i : i + 1] * h1[i : i + 1, i:]
            w1[:, i] = q
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
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


def default_layers(model: nn.Module) -> list[str]:
    """The Linear layers inside ``model.blocks`` if it has blocks, else all Linears but the last."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    inside = [n for n in names if n.startswith("blocks.")]
    return inside or names[:-1]


def _groups(names: list[str]) -> list[list[str]]:
    """Layers pruned together: one group per ``blocks.<i>``, in order; all others in one group."""
    groups: dict[str, list[str]] = {}
    for n in names:
        parts = n.split(".")
        groups.setdefault(".".join(parts[:2]) if parts[0] == "blocks" else "", []).append(n)
    return list(groups.values())


def _validate(
    model: nn.Module,
    sparsity: object,
    criterion: str,
    calibration: object,
    nm: object,
    layers: Iterable[str] | None,
) -> tuple[dict[str, float | None], tuple[int, int] | None]:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if (sparsity is None) == (nm is None):
        raise ValueError("give exactly one of sparsity= (unstructured) and nm=(n, m) (N:M)")
    if isinstance(sparsity, dict):
        if layers is not None:
            raise ValueError("sparsity is a dict of per-layer sparsities: leave layers=None")
        layers = list(sparsity)
    selected = select_layers(model, default_layers(model) if layers is None else layers)
    names = list(selected)
    refuse_unmaskable((n, m, "weight") for n, m in selected.items())
    if len(weight_tensors(model, selected)) < len(selected):  # also refuses sharing outside
        raise ValueError("one-shot pruning of a weight shared by several layers is not supported")
    modules = dict(model.named_modules())
    nm = None if nm is None else _check_nm(nm)
    plan = {}
    for n in names:
        m = modules[n]
        if not isinstance(m, nn.Linear):
            raise ValueError(f"layer {n!r} is a {type(m).__name__}; only Linear layers are pruned")
        if masks.is_masked(m):
            raise ValueError(f"layer {n!r} is already pruned; one-shot methods start dense")
        if not torch.isfinite(m.weight).all():
            raise ValueError(f"layer {n!r} has NaN or infinite weights")
        if nm is not None and m.in_features % nm[1]:
            raise ValueError(f"layer {n!r} has {m.in_features} inputs, not a multiple of m={nm[1]}")
        s = sparsity.get(n) if isinstance(sparsity, dict) else sparsity
        plan[n] = None if nm is not None else check_share(s, f"sparsity of {n!r}", one=False)
    if criterion != "magnitude":
        if not isinstance(calibration, Tensor) or calibration.dim() < 1 or len(calibration) == 0:
            raise ValueError(
                f"criterion {criterion!r} needs calibration= (a non-empty tensor of model inputs)"
            )
    return plan, nm


def prune_llm(
    model: nn.Module,
    sparsity: float | dict[str, float] | None = None,
    criterion: str = "wanda",
    calibration: Tensor | None = None,
    nm: tuple[int, int] | None = None,
    layers: Iterable[str] | None = None,
    damp: float = 0.01,
) -> dict[str, Tensor]:
    """One-shot pruning of Linear layers without retraining; returns keep masks by layer.

    ``criterion``: ``"magnitude"`` (|W|), ``"wanda"`` (|W| * ||X_j||), ``"sparsegpt"`` (OBS
    reconstruction, which also updates the kept weights) or ``"wanda+update"`` (Wanda's mask,
    then SparseGPT's update of the kept weights). ``sparsity`` is a share per output row
    (one float, or a dict ``{layer: share}``); ``nm=(2, 4)`` keeps 2 of every 4 inputs instead.
    By default the Linear layers of ``model.blocks`` are pruned, block after block: each block's
    calibration inputs come from the model with the earlier blocks already pruned.
    """
    plan, nm = _validate(model, sparsity, criterion, calibration, nm, layers)
    work = clone_model(model) if criterion != "magnitude" else model
    wmods, results = dict(work.named_modules()), {}
    with torch.no_grad():
        for group in _groups(list(plan)):
            stats = (
                {}
                if criterion == "magnitude"
                else capture_inputs(
                    work,
                    {n: wmods[n] for n in group},
                    calibration,
                    stop_early=group[0].startswith("blocks."),
                )
            )
            for n in group:
                w = wmods[n].weight
                if criterion == "sparsegpt":
                    new, keep = sparsegpt_layer(w, stats[n], plan[n], nm, damp)
                elif criterion == "wanda+update":  # Wanda's mask, SparseGPT's update
                    scores = wanda_scores(w, stats[n].norms)
                    mask = nm_mask(scores, *nm) if nm is not None else row_mask(scores, plan[n])
                    new, keep = sparsegpt_layer(w, stats[n], damp=damp, keep=mask)
                else:
                    scores = (
                        w.float().abs()
                        if criterion == "magnitude"
                        else wanda_scores(w, stats[n].norms)
                    )
                    keep = nm_mask(scores, *nm) if nm is not None else row_mask(scores, plan[n])
                    new = w.detach()
                results[n] = (new.clone(), keep)
            if work is not model:
                for n in group:  # the next block sees the pruned outputs of this one
                    wmods[n].weight.copy_(results[n][0] * results[n][1])
        modules = dict(model.named_modules())
        for n, (new, keep) in results.items():
            modules[n].weight.copy_(new)
            masks.set_mask(modules[n], "weight", keep)
    return {n: keep for n, (_, keep) in results.items()}


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
