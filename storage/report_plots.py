"""The evaluation plot (`metrics.png`): privacy against utility, for one run or many.

Panels, from the rows of `storage.metrics` (`MetricRow`):

1. accuracy on the real test split against epsilon (log x), one line per classifier (`acc_*`);
   rows without epsilon (the real-data ceiling, `MetricRow.of_real_data`, or a non-private run) are
   horizontal dashed lines in the classifier's colour;
2. FID against epsilon (log x), one line per FID metric and (synthetic, reference) image counts
   (FIDs from different counts are not comparable, so they never share a line); rows without
   epsilon as dashed lines;
3. one panel per classifier with class-wise rows (`class_acc_*`): its accuracy on each class of the
   test split, one bar per run (labelled by epsilon), the real-data ceiling as black markers.

FID and accuracy never share an axis. `plot_data` computes what is drawn (tested), `plot_metrics`
draws it with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from storage.atomic import atomic_path
from storage.metrics import CLASS_METRIC_PREFIX, MetricRow

Point = tuple[float, float]  # (epsilon, value)


@dataclasses.dataclass(frozen=True)
class ClassWise:
    """One classifier's class-wise accuracies: `classes` in first-seen order; `runs` maps a run's label
    (`epsilon 1 (run)`) to one value per class (NaN where that run has no row for the class); `ceiling`
    the same for rows without epsilon."""

    classes: tuple[str, ...]
    runs: dict[str, tuple[float, ...]]
    ceiling: dict[str, tuple[float, ...]]


@dataclasses.dataclass(frozen=True)
class PlotData:
    """What `plot_metrics` draws.

    `accuracy` / `fid`: line label -> points (epsilon, value) sorted by epsilon, for rows with an
    epsilon; `accuracy_levels` / `fid_levels`: label -> value for rows without one (dashed lines);
    `class_wise`: classifier metric (`acc_logreg`) -> ClassWise.
    """

    accuracy: dict[str, tuple[Point, ...]]
    accuracy_levels: dict[str, float]
    fid: dict[str, tuple[Point, ...]]
    fid_levels: dict[str, float]
    class_wise: dict[str, ClassWise]


def _fmt_eps(epsilon: float) -> str:
    return f"{epsilon:g}"


def _fid_label(row: MetricRow) -> str:
    return f"{row.metric} ({row.fid_synthetic_count:,} synth / {row.fid_reference_count:,} ref)"


def _lines(rows: Iterable[MetricRow], label) -> tuple[dict[str, tuple[Point, ...]], dict[str, float]]:
    points: dict[str, list[Point]] = {}
    levels: dict[str, float] = {}
    for r in rows:
        if r.epsilon is None:
            levels[f"{label(r)}: {r.run}"] = r.value
        else:
            points.setdefault(label(r), []).append((r.epsilon, r.value))
    return {k: tuple(sorted(v)) for k, v in points.items()}, levels


def _run_label(row: MetricRow, runs_per_epsilon: dict[float, set[str]]) -> str:
    """`epsilon 1`, or `epsilon 1 (run)` where several runs share that epsilon."""
    text = f"epsilon {_fmt_eps(row.epsilon)}"
    return f"{text} ({row.run})" if len(runs_per_epsilon[row.epsilon]) > 1 else text


def plot_data(rows: Sequence[MetricRow]) -> PlotData:
    """The series of the plot (see the module docstring); rows as `storage.metrics.as_rows` returns them."""
    overall = [r for r in rows if r.class_name is None]
    accuracy, accuracy_levels = _lines((r for r in overall if r.metric.startswith("acc")), lambda r: r.metric)
    fid, fid_levels = _lines((r for r in overall if r.metric.startswith("fid")), _fid_label)

    runs_per_epsilon: dict[float, set[str]] = {}
    for r in rows:
        if r.epsilon is not None:
            runs_per_epsilon.setdefault(r.epsilon, set()).add(r.run)
    class_rows = [r for r in rows if r.class_name is not None]
    order = sorted(class_rows, key=lambda r: (r.epsilon is None, r.epsilon or 0.0))  # runs by epsilon, ceiling last
    class_wise = {}
    for metric in dict.fromkeys(r.metric for r in class_rows):
        mine = [r for r in order if r.metric == metric]
        classes = tuple(dict.fromkeys(r.class_name for r in class_rows if r.metric == metric))
        runs: dict[str, dict[str, float]] = {}
        ceiling: dict[str, dict[str, float]] = {}
        for r in mine:
            if r.epsilon is None:
                ceiling.setdefault(r.run, {})[r.class_name] = r.value
            else:
                runs.setdefault(_run_label(r, runs_per_epsilon), {})[r.class_name] = r.value
        class_wise[metric.removeprefix(CLASS_METRIC_PREFIX)] = ClassWise(
            classes,
            {k: tuple(v.get(c, math.nan) for c in classes) for k, v in runs.items()},
            {k: tuple(v.get(c, math.nan) for c in classes) for k, v in ceiling.items()})
    return PlotData(accuracy, accuracy_levels, fid, fid_levels, class_wise)


def _against_epsilon(ax, lines: dict[str, tuple[Point, ...]], levels: dict[str, float], colours: dict[str, str],
                     ylabel: str, title: str, nothing: str) -> None:
    if not lines and not levels:
        ax.text(0.5, 0.5, nothing, ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    epsilons = sorted({x for pts in lines.values() for x, _ in pts})
    for label, pts in lines.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=label, color=colours.get(label.split(" ")[0]))
    for label, value in levels.items():
        ax.axhline(value, linestyle="--", linewidth=1.2, color=colours.get(label.split(":")[0].split(" ")[0]),
                   label=label)
    ax.set_xscale("log")
    if epsilons:
        lo, hi = epsilons[0], epsilons[-1]
        ax.set_xlim(lo / 1.6, hi * 1.6)
        ax.set_xticks(epsilons, [_fmt_eps(e) for e in epsilons])
        ax.minorticks_off()
    else:
        ax.set_xticks([])
    ax.set_xlabel("epsilon (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _class_panel(ax, classifier: str, data: ClassWise) -> None:
    import numpy as np
    from matplotlib import colormaps

    x = np.arange(len(data.classes))
    width = 0.8 / max(1, len(data.runs))
    shades = colormaps["viridis"](np.linspace(0.15, 0.85, max(1, len(data.runs))))  # low to high epsilon
    for i, (label, values) in enumerate(data.runs.items()):
        ax.bar(x - 0.4 + width * (i + 0.5), values, width, label=label, color=shades[i])
    for j, (label, values) in enumerate(data.ceiling.items()):
        ax.scatter(x, values, marker="_", s=600, linewidths=2.5, color="black" if j == 0 else "dimgrey",
                   label=label, zorder=3)
    ax.set_xticks(x, data.classes, rotation=20 if len(data.classes) > 6 else 0, fontsize="small")
    ax.set_ylim(0, 1.22)  # room for the legend above the bars
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("accuracy on the class")
    ax.set_title(f"{classifier}: class-wise accuracy on the real test split")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncol=min(6, len(data.runs) + len(data.ceiling)), loc="upper center")


def plot_metrics(rows: Sequence[MetricRow], path: str | os.PathLike) -> Path:
    """Draw `plot_data(rows)` as one PNG at `path` (written atomically); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    data = plot_data(rows)
    palette = [c["color"] for c in matplotlib.rcParams["axes.prop_cycle"]]
    names = list(dict.fromkeys([*(k.split(" ")[0] for k in data.accuracy),
                                *(k.split(":")[0] for k in data.accuracy_levels),
                                *(k.split(" ")[0] for k in data.fid), *(k.split(" ")[0] for k in data.fid_levels)]))
    colours = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    n_class = len(data.class_wise)
    fig = plt.figure(figsize=(12, 4.2 + 3.6 * n_class))
    grid = fig.add_gridspec(1 + n_class, 2, height_ratios=[4.2] + [3.6] * n_class)
    _against_epsilon(fig.add_subplot(grid[0, 0]), data.accuracy, data.accuracy_levels, colours,
                     "accuracy on the real test split", "downstream accuracy against epsilon", "no accuracy in these runs")
    _against_epsilon(fig.add_subplot(grid[0, 1]), data.fid, data.fid_levels, colours,
                     "FID (lower is better)", "FID against epsilon", "no FID in these runs")
    for i, (classifier, wise) in enumerate(data.class_wise.items()):
        _class_panel(fig.add_subplot(grid[1 + i, :]), classifier, wise)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
