"""utils.kit.plots: the figures draw what they are given, error bars included."""

import matplotlib

matplotlib.use("Agg")

from utils.kit import plots  # noqa: E402


def test_curves_draw_error_bars_for_the_series_that_have_them():
    fig = plots.curves(
        [1, 2, 3],
        {"a": [0.9, 0.8, 0.7], "b": [0.5, 0.6, 0.7]},
        "x",
        "y",
        errors={"a": [0.01, 0.02, 0.03]},
    )
    ax = fig.axes[0]
    assert len(ax.containers) == 1  # one errorbar container, for "a" only
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["a", "b"]


def test_grouped_bars_with_errors():
    fig = plots.grouped_bars(["g1", "g2"], {"a": [1.0, 2.0]}, "y", errors={"a": [0.1, 0.2]})
    assert len(fig.axes[0].patches) == 2


def test_pareto_labels_only_the_front():
    points = {"a": (1.0, 0.9), "b": (2.0, 0.95), "c": (3.0, 0.93)}
    fig = plots.pareto(points, ["a", "b"], xlabel="ms", ylabel="accuracy", title="t")
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["a", "b"]
    assert ax.get_xscale() == "log" and ax.get_title() == "t"
    matplotlib.pyplot.close(fig)
