"""Is method A ahead of method B? One interval, and one rule, for every comparison in the book.

Each chapter's comparison is a table of per-example scores: for each training seed ``s`` (a dense
model, a calibration draw) and each test example ``i``, method A scores ``a[s, i]`` and method B
``b[s, i]`` (1/0 for a digit right or wrong; a per-window loss for a language model). The
estimate is the mean of the differences ``d = a - b``. Run the experiment again and it moves for
two reasons: other seeds would have been drawn, and other test examples. Both count. Because every
seed is scored on the *same* examples, a digit that happens to favour A does so for every seed:
averaging over seeds removes seed noise, never example noise.

How the interval is made: the two-way crossed random-effects analysis of variance of the
(seeds x examples) table of differences. Write ``d[s, i] = mu + seed[s] + example[i] + rest[s, i]``
(the ANOVA decomposition: seed and example effects are row and column means, ``rest`` is what is
left). With seeds and examples drawn independently, the variance of the grand mean is
``var(seed)/S + var(example)/N + var(rest)/(S N)`` (no normality needed), and the two-way ANOVA
mean squares estimate it without bias: ``(MS_seed + MS_example - MS_residual) / (S N)``. Each
variance component is clipped at zero, so the variance is never below what the seeds alone or the
examples alone show. The interval is the estimate +- a Student t quantile times the square root,
with Satterthwaite's degrees of freedom: with 5 seeds the seed part rests on 4 degrees of freedom,
and a normal quantile (or a bootstrap over 5 seeds) would give an interval too narrow. A seed part
that happens to look negligible keeps those 4 degrees of freedom: 5 seeds cannot show that seeds
do not matter. (Dropping it instead, as a mixed-model fit does when its seed variance lands on
zero, covered the truth only 85-92 % of the time with 2 seeds in this module's simulations.) This
is the "subjects x items" problem of psycholinguistics (Clark 1973) and the crossed design of
Owen's pigeonhole bootstrap (Owen 2007), with Satterthwaite's approximation (Satterthwaite 1946).

With one seed only example noise is counted: the interval is the paired t-interval over examples.
It says how sure we are about *these two models* on new digits, not about the methods on new seeds
(the printed summary says "1 seed").

The verdict is one symmetric three-way rule: "A ahead" when the whole interval lies on A's better
side of zero, "B ahead" when it lies on B's side, otherwise "no difference measurable here".

References: H. H. Clark (1973), The language-as-fixed-effect fallacy, J. Verbal Learning and
Verbal Behavior 12, 335-359. A. B. Owen (2007), The pigeonhole bootstrap, Annals of Applied
Statistics 1(2), 386-411. F. E. Satterthwaite (1946), An approximate distribution of estimates of
variance components, Biometrics Bulletin 2(6), 110-114.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import RandomSampler

from utils.lab.training import _float_dtype, _On, _to
from utils.pruning.modes import eval_mode

if TYPE_CHECKING:
    import pandas as pd

NO_DIFFERENCE = "no difference measurable here"


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare`: ``estimate = mean(a) - mean(b)``, its interval, the verdict.

    ``estimate``, ``low``, ``high`` and ``se`` are in the scores' own units (fractions for 0/1
    scores); ``str()`` shows 0/1 scores in percentage points. ``df`` is the t quantile's degrees of
    freedom (Satterthwaite); ``inf`` when the differences do not vary at all.
    """

    estimate: float
    low: float
    high: float
    level: float
    n_seeds: int
    n_examples: int
    verdict: str
    names: tuple[str, str]
    higher_is_better: bool
    se: float
    df: float
    unit: str = ""

    @property
    def ahead(self) -> str | None:
        """The name of the method ahead, or None when no difference is measurable."""
        return _winner(self.low, self.high, self.names, self.higher_is_better)

    def __str__(self) -> str:
        scale = 100.0 if self.unit == "points" else 1.0
        est, lo, hi = (scale * v for v in (self.estimate, self.low, self.high))
        if self.unit == "points":
            decimals = 2
        else:  # two significant digits of the half-width
            half = (hi - lo) / 2
            decimals = 4 if half == 0 else max(0, 1 - math.floor(math.log10(half)))
        unit = f" {self.unit}" if self.unit else ""
        seeds = f"{self.n_seeds} seed{'s' if self.n_seeds != 1 else ''}"
        lower = "" if self.higher_is_better else ", lower is better"
        return (
            f"{self.names[0]} minus {self.names[1]}: {est:+.{decimals}f}{unit} "
            f"[{lo:+.{decimals}f}, {hi:+.{decimals}f}] ({self.level * 100:g} %, {seeds} x "
            f"{self.n_examples:,} examples{lower}): {self.verdict}"
        )


def compare(
    a: Any,
    b: Any,
    *,
    higher_is_better: bool = True,
    level: float = 0.95,
    names: Sequence[str] = ("A", "B"),
    unit: str | None = None,
) -> Comparison:
    """Is A ahead of B? Paired per-example scores, shape (seeds, examples), in; a verdict out.

    ``a`` and ``b``: arrays or tensors of shape (n_seeds, n_examples), or a list of per-seed 1-D
    arrays; row ``s`` of both comes from the same seed, column ``i`` is the same test example. A
    1-D input is one seed (only example noise is counted then). ``higher_is_better=False`` for
    losses. ``unit``: ``"points"`` (percentage points) by default when all scores are 0/1, else
    none; any other string is printed after the numbers. The caller's arrays are not changed.
    """
    x, y = _matrix(a, "a"), _matrix(b, "b")
    if x.shape != y.shape:
        raise ValueError(
            f"a and b must have the same shape (seeds, examples): {x.shape} != {y.shape}"
        )
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must be a number strictly between 0 and 1, got {level!r}")
    names = (names,) if isinstance(names, str) else tuple(names)
    if len(names) != 2 or not all(isinstance(n, str) for n in names) or names[0] == names[1]:
        raise ValueError(f"names must be two different strings, got {names!r}")
    if unit is None:
        unit = "points" if _zero_one(x) and _zero_one(y) else ""
    d = x - y
    n_seeds, n_examples = d.shape
    var, df = _variance_of_mean(d)
    estimate, se = float(d.mean()), math.sqrt(var)
    half = _t_quantile(0.5 + level / 2, df) * se if se > 0 else 0.0
    low, high = estimate - half, estimate + half
    winner = _winner(low, high, names, higher_is_better)
    return Comparison(
        estimate=estimate,
        low=low,
        high=high,
        level=float(level),
        n_seeds=n_seeds,
        n_examples=n_examples,
        verdict=NO_DIFFERENCE if winner is None else f"{winner} ahead",
        names=names,
        higher_is_better=bool(higher_is_better),
        se=se,
        df=df,
        unit=unit,
    )


def compare_many(table: Mapping[str, Any], baseline: str, **options: Any) -> pd.DataFrame:
    """Every method of ``table`` (name -> scores as for :func:`compare`) against ``baseline``.

    One row per other method, in the table's order: estimate, low, high (method minus baseline),
    the method ahead (or None), the verdict and the printed summary. ``options`` go to
    :func:`compare` (``higher_is_better``, ``level``, ``unit``).
    """
    import pandas as pd

    if baseline not in table:
        raise ValueError(f"baseline {baseline!r} is not in the table ({', '.join(table)})")
    rows = {}
    for name, scores in table.items():
        if name != baseline:
            c = compare(scores, table[baseline], names=(name, baseline), **options)
            rows[name] = {
                "estimate": c.estimate,
                "low": c.low,
                "high": c.high,
                "ahead": c.ahead,
                "verdict": c.verdict,
                "summary": str(c),
            }
    return pd.DataFrame.from_dict(rows, orient="index")


@torch.no_grad()
def correct(
    model: nn.Module, loader: Iterable, device: torch.device | str | None = None
) -> np.ndarray:
    """Whether the model's top-1 prediction is right, per example, in the loader's order (bool).

    Like :func:`utils.lab.training.evaluate` (eval mode, no gradients, on the model's device
    unless ``device`` says otherwise), but it keeps every example, so that rows from several seeds
    line up for :func:`compare`; the model's train/eval mode is put back afterwards. A shuffling
    DataLoader is refused: its examples would not line up across models.
    """
    if isinstance(getattr(loader, "sampler", None), RandomSampler):
        raise ValueError("the loader shuffles: per-example results would not line up across models")
    hits = []
    with eval_mode(model), _On(model, device) as device:
        dtype = _float_dtype(model)
        for x, y in loader:
            pred = model(_to(x, device, dtype)).argmax(dim=1)
            hits.append((pred == y.to(device)).cpu())
    if not hits:
        raise ValueError("the loader is empty")
    return torch.cat(hits).numpy()


def _winner(low: float, high: float, names: tuple[str, str], higher_is_better: bool) -> str | None:
    """The three-way rule: the interval wholly on one side of zero names that side's method."""
    if low > 0:
        return names[0] if higher_is_better else names[1]
    if high < 0:
        return names[1] if higher_is_better else names[0]
    return None


def _matrix(values: Any, name: str) -> np.ndarray:
    """A fresh float64 (seeds, examples) copy of ``values``; ValueError for what cannot be one."""
    if isinstance(values, (list, tuple)):
        values = [v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for v in values]
        lengths = {np.shape(v) for v in values}
        if len(lengths) > 1:
            raise ValueError(f"{name}: the per-seed arrays differ in shape: {sorted(lengths)}")
    elif isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        m = np.array(values, dtype=np.float64)  # a copy: the caller's array is never touched
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numbers of shape (seeds, examples): {e}") from None
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2:
        raise ValueError(f"{name} must be 1-D (one seed) or 2-D (seeds, examples), got {m.shape}")
    if m.shape[0] < 1 or m.shape[1] < 2:
        raise ValueError(f"{name} needs at least 1 seed and 2 examples, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError(f"{name} holds NaN or infinite values ({int((~np.isfinite(m)).sum())})")
    return m


def _zero_one(m: np.ndarray) -> bool:
    return bool(((m == 0) | (m == 1)).all())


def _variance_of_mean(d: np.ndarray) -> tuple[float, float]:
    """Variance of ``d.mean()`` over new seeds and new examples, and its Satterthwaite df.

    Two-way ANOVA without replication: ``(MS_seed + MS_example - MS_residual) / (S N)``, each
    variance component clipped at zero by raising a mean square below ``MS_residual`` to it; the
    raised term keeps its degrees of freedom in Satterthwaite's formula, so a seed term that
    merely looks small still counts as known from S - 1 seeds. One seed: ``var(d) / N``, N - 1 df.
    """
    n_seeds, n_examples = d.shape
    if n_seeds == 1:
        return float(d.var(ddof=1)) / n_examples, float(n_examples - 1)
    grand, rows, cols = d.mean(), d.mean(axis=1), d.mean(axis=0)
    df_s, df_e = n_seeds - 1, n_examples - 1
    ms_s = n_examples * float(((rows - grand) ** 2).sum()) / df_s
    ms_e = n_seeds * float(((cols - grand) ** 2).sum()) / df_e
    resid = d - rows[:, None] - cols[None, :] + grand
    ms_r = float((resid**2).sum()) / (df_s * df_e)
    # a mean square below the residual one is raised to it, and keeps its own df below
    terms = [(max(ms_s, ms_r), df_s), (max(ms_e, ms_r), df_e), (-ms_r, df_s * df_e)]
    total = sum(m for m, _ in terms)
    if total <= 0:
        return 0.0, math.inf
    df = total**2 / sum(m**2 / k for m, k in terms)
    return total / (n_seeds * n_examples), max(1.0, df)


def _t_quantile(p: float, df: float) -> float:
    """Student t quantile for ``p`` in [0.5, 1) and real ``df`` >= 1, without scipy.

    Newton's method on the upper tail from the normal quantile, which lies below the root; the
    tail is convex there, so the iterates rise monotonically to it. Above 1,000 degrees of
    freedom the Cornish-Fisher expansion in 1/df (four terms) is exact to about 1e-12.
    """
    z = NormalDist().inv_cdf(p)
    if math.isinf(df):
        return z
    if df > 1000:
        z2, v = z * z, df
        return z * (
            1
            + (z2 + 1) / (4 * v)
            + (5 * z2**2 + 16 * z2 + 3) / (96 * v**2)
            + (3 * z2**3 + 19 * z2**2 + 17 * z2 - 15) / (384 * v**3)
            + (79 * z2**4 + 776 * z2**3 + 1482 * z2**2 - 1920 * z2 - 945) / (92160 * v**4)
        )
    q = 1 - p
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    t = z
    for _ in range(200):
        tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
        density = math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))
        step = (tail - q) / density
        t += step
        if abs(step) <= 1e-13 * t:
            break
    return t


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b): continued fraction, modified Lentz."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1 - _betainc(b, a, 1 - x)
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return math.exp(log_front) * h / a
