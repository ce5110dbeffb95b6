"""The book's figures: small functions so that chapter cells stay short."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, ScalarFormatter

plt.rcParams.update(
    {"figure.dpi": 90, "savefig.dpi": 90, "axes.spines.top": False, "axes.spines.right": False}
)


def mask_heatmaps(
    panels: Mapping[str, torch.Tensor],
    cmap: str = "Greys",
    cols: int | None = None,
    legend: tuple[str, str] | None = None,
) -> Figure:
    """Side-by-side heat maps of 2-D tensors (masks or magnitudes); black = kept / large.

    Ticks are whole row and column numbers; ``legend=("kept", "pruned")`` names black and white.
    """
    cols = cols or len(panels)
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, (title, t) in zip(axes.flat, panels.items()):
        ax.imshow(
            t.detach().float().cpu().numpy(), cmap=cmap, aspect="auto", interpolation="nearest"
        )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("input")
        ax.set_ylabel("output unit")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if legend is not None:
        swatches = [Patch(facecolor=c, edgecolor="0.5", label=t) for c, t in zip("kw", legend)]
        fig.legend(handles=swatches, loc="lower center", ncol=2, frameon=False)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
    else:
        fig.tight_layout()
    return fig


def grouped_bars(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    ylabel: str,
    title: str = "",
    ylim: tuple[float, float] | None = None,
    errors: Mapping[str, Sequence[float]] | None = None,
) -> Figure:
    """Bars of several series side by side for each group (for example, sparsity per layer);
    ``errors`` (same keys) draws error bars, such as the standard deviation over seeds."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        yerr = None if errors is None else errors[name]
        ax.bar(
            x + (i - (len(series) - 1) / 2) * width, values, width, label=name, yerr=yerr, capsize=3
        )
    ax.set_xticks(
        x, [textwrap.fill(str(g), 14) for g in groups]
    )  # long names wrap instead of overlapping
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def curves(
    x: Sequence[float] | Mapping[str, Sequence[float]],
    series: Mapping[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    logy: bool = False,
    marker: str = "o",
    errors: Mapping[str, Sequence[float]] | None = None,
) -> Figure:
    """Line plot of several named series; ``x`` is shared or given per series. ``errors`` (some or
    all of the keys) draws error bars, such as the standard deviation over seeds."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, ys in series.items():
        xs = x[name] if isinstance(x, Mapping) else x
        if errors is not None and name in errors:
            ax.errorbar(xs, ys, yerr=errors[name], marker=marker, label=name, capsize=3)
        else:
            ax.plot(xs, ys, marker=marker, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def histogram(
    values: torch.Tensor,
    threshold: float | None = None,
    bins: int = 100,
    title: str = "",
    xlabel: str = "|w|",
) -> Figure:
    """Histogram of magnitudes, with the pruning threshold drawn as a line."""
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.hist(values.detach().flatten().cpu().numpy(), bins=bins, color="0.5")
    if threshold is not None:
        ax.axvline(threshold, color="C3", label=f"threshold = {threshold:.4f}")
        ax.legend(frameon=False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def pareto(
    points: Mapping[str, tuple[float, float]],
    front: Sequence[str],
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> Figure:
    """Scatter of named ``(cost, quality)`` points on a log cost axis, the names of ``front``
    (cheapest first) joined by a step line and labelled; the others grey and unlabelled."""
    fig, ax = plt.subplots(figsize=(7.2, 4.0))
    others = [p for n, p in points.items() if n not in front]
    if others:
        ax.scatter(*zip(*others), color="0.7", label="dominated", zorder=2)
    xs, ys = zip(*(points[n] for n in front)) if front else ((), ())
    ax.step(xs, ys, where="post", color="C0", alpha=0.6, zorder=1)
    ax.scatter(xs, ys, color="C0", label="Pareto front", zorder=3)
    for n in front:
        ax.annotate(n, points[n], textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())  # 0.5, 1, 2 rather than 5 x 10^-1
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, loc="lower right")
    fig.tight_layout()
    return fig
