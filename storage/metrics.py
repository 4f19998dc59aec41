"""Evaluation results on disk: a metrics table (Parquet + JSON), a markdown report with a plot, and
a cache of FID reference statistics of real splits.

Metric naming convention (it drives the plot): accuracies start with ``acc`` (``acc_logreg``,
``acc_mlp``, ...), FIDs start with ``fid``. A run with ``epsilon`` None is non-private. Every FID row
carries the number of synthetic and reference images it was computed from (``fid_synthetic_count``,
``fid_reference_count``): FIDs from different counts are not comparable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from mepf_core.errors import PathNotFoundError
from storage.atomic import atomic_path, atomic_write_bytes
from storage.provenance import SyntheticInfo

logger = logging.getLogger(__name__)

METRICS_PARQUET = "metrics.parquet"
METRICS_JSON = "metrics.json"
REPORT_MD = "report.md"
REPORT_PLOT = "metrics.png"
SAMPLES_PNG = "samples.png"
CACHE_ENV = "MEPF_CACHE_DIR"

# pytorch-fid's guidance: at least 2,048 images per side, the dimension of the pool3 features. Below it
# the 2,048 x 2,048 covariance is rank-deficient and FID is biased upwards (the bias grows as the count
# shrinks), so a smaller FID is accepted only behind `allow_small_fid` (`--allow-small-fid`), for quick
# runs, and then down to FID_ABSOLUTE_MIN (a covariance needs two samples).
FID_MIN_SAMPLES = 2048
FID_ABSOLUTE_MIN = 2


def small_fid_problem(name: str, count: int) -> str:
    """The one-line refusal of an FID from `count` < FID_MIN_SAMPLES images (`name`: what was counted)."""
    return (f"{name} {count} is below {FID_MIN_SAMPLES:,}, the minimum for a comparable FID (pytorch-fid: at least "
            f"as many images as the {FID_MIN_SAMPLES:,}-d pool features); use more images, or pass --allow-small-fid "
            "(allow_small_fid=True) to accept a biased FID for a quick run")


@dataclasses.dataclass(frozen=True)
class MetricRow:
    """One metric of one run, with the privacy and provenance facts needed to compare runs."""

    run: str  # run name, unique per generator run
    metric: str  # e.g. "fid", "acc_logreg"
    value: float
    epsilon: float | None  # None: non-private
    delta: float | None
    encoder: str
    steps: int  # generator training steps
    release_id: str  # the release the generator was trained from
    fid_synthetic_count: int | None = None  # FID rows: synthetic images the FID used; None for other metrics
    fid_reference_count: int | None = None  # FID rows: real reference images of its statistics

    def __post_init__(self):
        if not self.run or not self.metric:
            raise ValueError(f"run and metric must be non-empty, got run={self.run!r} metric={self.metric!r}")
        if not math.isfinite(self.value):
            raise ValueError(f"value of {self.run}/{self.metric} must be finite, got {self.value}")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"epsilon of {self.run} must be positive or None, got {self.epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta of {self.run} must be in (0, 1) or None, got {self.delta}")
        if self.steps < 0:
            raise ValueError(f"steps of {self.run} must be non-negative, got {self.steps}")
        counts = (self.fid_synthetic_count, self.fid_reference_count)
        if self.metric.startswith("fid"):
            if any(not isinstance(c, int) or isinstance(c, bool) or c < FID_ABSOLUTE_MIN for c in counts):
                raise ValueError(f"{self.run}/{self.metric} needs fid_synthetic_count and fid_reference_count, "
                                 f"integers >= {FID_ABSOLUTE_MIN}, got {counts}")
        elif counts != (None, None):
            raise ValueError(f"{self.run}/{self.metric} is not an FID: its fid counts must be None, got {counts}")

    @classmethod
    def of_synthetic(cls, run: str, metric: str, value: float, info: SyntheticInfo,
                     fid_counts: tuple[int, int] | None = None) -> "MetricRow":
        """A metric of a synthetic dataset: its provenance (claim, encoder, steps, release) from `info`;
        `fid_counts` (synthetic, reference) for an FID, None for any other metric."""
        syn, ref = fid_counts if fid_counts is not None else (None, None)
        return cls(run, metric, float(value), info.epsilon, info.delta, info.encoder, info.steps, info.release_id,
                   syn, ref)

    @classmethod
    def of_real_data(cls, run: str, metric: str, value: float) -> "MetricRow":
        """A metric of real data (the non-private ceiling): no epsilon, delta, encoder, generator or release,
        written as None, None, "", 0 steps and "" (the table's types have no missing integer)."""
        return cls(run, metric, float(value), None, None, "", 0, "")


COLUMNS = tuple(f.name for f in dataclasses.fields(MetricRow))
_COUNT_COLUMNS = ("fid_synthetic_count", "fid_reference_count")  # absent from files written before issue 13


def as_rows(rows: Iterable[MetricRow | Mapping]) -> list[MetricRow]:
    """Accept MetricRow objects or dicts with exactly the MetricRow fields."""
    out = []
    for row in rows:
        if isinstance(row, MetricRow):
            out.append(row)
            continue
        if not set(COLUMNS) - set(_COUNT_COLUMNS) <= set(row) <= set(COLUMNS):
            raise ValueError(f"metric row needs exactly {list(COLUMNS)}, got {sorted(row)}")
        out.append(MetricRow(**row))
    if not out:
        raise ValueError("rows must hold at least one metric, got 0")
    seen = set()
    for row in out:
        if (row.run, row.metric) in seen:
            raise ValueError(f"duplicate metric {row.metric!r} for run {row.run!r}")
        seen.add((row.run, row.metric))
    return out


def write_metrics_parquet(path: str | os.PathLike, rows: Iterable[MetricRow | Mapping]) -> Path:
    """One row per (run, metric); columns as MetricRow. Written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = as_rows(rows)
    schema = pa.schema([
        ("run", pa.string()), ("metric", pa.string()), ("value", pa.float64()),
        ("epsilon", pa.float64()), ("delta", pa.float64()), ("encoder", pa.string()),
        ("steps", pa.int64()), ("release_id", pa.string()),
        ("fid_synthetic_count", pa.int64()), ("fid_reference_count", pa.int64()),
    ])
    table = pa.Table.from_pylist([dataclasses.asdict(r) for r in rows], schema=schema)
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_metrics_parquet(path: str | os.PathLike) -> list[MetricRow]:
    import pyarrow.parquet as pq

    return as_rows(pq.read_table(path).to_pylist())


def write_metrics_json(path: str | os.PathLike, rows: Iterable[MetricRow | Mapping]) -> Path:
    """The same rows as a JSON list of objects (None for a non-private epsilon)."""
    rows = as_rows(rows)
    text = json.dumps([dataclasses.asdict(r) for r in rows], indent=2, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())
    return Path(path)


# --- report -------------------------------------------------------------------------------------


def _fmt_eps(epsilon: float | None) -> str:
    return "non-private" if epsilon is None else f"{epsilon:g}"


def _markdown(rows: list[MetricRow], plot_name: str, samples_name: str | None) -> str:
    runs = list(dict.fromkeys(r.run for r in rows))
    metrics = list(dict.fromkeys(r.metric for r in rows))
    value = {(r.run, r.metric): r for r in rows}
    first = {r.run: r for r in reversed(rows)}
    lines = ["# DP-MEPF evaluation", "",
             "| run | epsilon | delta | encoder | steps | release | " + " | ".join(metrics) + " |",
             "|---" * (6 + len(metrics)) + "|"]
    for run in runs:
        r = first[run]
        cells = [_cell(value[(run, m)]) if (run, m) in value else "" for m in metrics]
        delta = "" if r.delta is None else f"{r.delta:g}"
        lines.append(f"| {run} | {_fmt_eps(r.epsilon)} | {delta} | {r.encoder} | {r.steps} | "
                     f"{r.release_id} | " + " | ".join(cells) + " |")
    small = [r for r in rows if r.fid_synthetic_count is not None
             and min(r.fid_synthetic_count, r.fid_reference_count) < FID_MIN_SAMPLES]
    lines += ["", "FID cells give the synthetic and reference image counts; FIDs from different counts are "
              "not comparable."] if any(r.metric.startswith("fid") for r in rows) else []
    if small:
        lines += ["", f"**Small FID**: {', '.join(f'{r.run}/{r.metric}' for r in small)} used fewer than "
                  f"{FID_MIN_SAMPLES:,} images on a side (accepted with --allow-small-fid); biased upwards."]
    lines += ["", f"![metrics]({plot_name})", ""]
    if samples_name:
        lines += ["## Samples", "", f"![samples]({samples_name})", ""]
    return "\n".join(lines)


def _cell(row: MetricRow) -> str:
    """A table cell: the value, and for an FID its counts (`12.3456 (1,000 synth / 10,000 ref)`)."""
    if row.fid_synthetic_count is None:
        return f"{row.value:.4f}"
    return f"{row.value:.4f} ({row.fid_synthetic_count:,} synth / {row.fid_reference_count:,} ref)"


def _plot(rows: list[MetricRow], path: Path) -> None:
    """Several runs: accuracy and FID against epsilon (log x); one run: a bar chart of its metrics."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs = list(dict.fromkeys(r.run for r in rows))
    if len(runs) == 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar([r.metric for r in rows], [r.value for r in rows])
        ax.set_title(f"{runs[0]} (epsilon {_fmt_eps(rows[0].epsilon)})")
        ax.tick_params(axis="x", rotation=30)
    else:
        groups = [("accuracy", lambda m: m.startswith("acc")), ("FID", lambda m: m.startswith("fid"))]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, (label, wanted) in zip(axes, groups):
            for metric in dict.fromkeys(r.metric for r in rows if wanted(r.metric)):
                private = sorted((r.epsilon, r.value) for r in rows
                                 if r.metric == metric and r.epsilon is not None)
                line = ax.plot(*zip(*private), marker="o", label=metric)[0] if private else None
                for r in rows:
                    if r.metric == metric and r.epsilon is None:
                        ax.axhline(r.value, linestyle="--", color=line.get_color() if line else None,
                                   label=f"{metric} ({r.run}, non-private)")
            ax.set_xscale("log")
            ax.set_xlabel("epsilon")
            ax.set_ylabel(label)
            ax.set_title(f"{label} against epsilon")
            if ax.has_data():
                ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_report(out_dir: str | os.PathLike, rows: Iterable[MetricRow | Mapping],
                 sample_grid_png: str | os.PathLike | None = None) -> Path:
    """Write metrics.parquet, metrics.json, metrics.png (and samples.png) and report.md; returns report.md."""
    rows = as_rows(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_metrics_parquet(out_dir / METRICS_PARQUET, rows)
    write_metrics_json(out_dir / METRICS_JSON, rows)
    _plot(rows, out_dir / REPORT_PLOT)
    samples_name = None
    if sample_grid_png is not None:
        source = Path(sample_grid_png)
        if not source.is_file():
            raise PathNotFoundError(f"sample grid {source} does not exist")
        if source.resolve() != (out_dir / SAMPLES_PNG).resolve():
            with atomic_path(out_dir / SAMPLES_PNG) as tmp:
                shutil.copyfile(source, tmp)
        samples_name = SAMPLES_PNG
    report = out_dir / REPORT_MD
    atomic_write_bytes(report, _markdown(rows, REPORT_PLOT, samples_name).encode())
    return report


# --- FID reference statistics cache -------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$MEPF_CACHE_DIR/fid`` if the variable is set, else ``~/.cache/dp-mepf/fid``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "dp-mepf") / "fid"


def reference_stats_path(key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/<readable key prefix>-<sha256(key)[:16]>.npz``."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string, got {key!r}")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:60]
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{slug}-{digest}.npz"


def _valid_stats(mu, sigma, where: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{where}: need mu (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{where}: mu and sigma must be finite")
    return mu, sigma


def load_or_compute_reference_stats(
    key: str,
    compute: Callable[[], tuple[np.ndarray, np.ndarray]],
    cache_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics (mu, sigma) of a real split, computed once per key and then read from disk.

    ``key`` must name everything the statistics depend on (dataset, split, preprocessing). The key is
    stored in the file and checked on load; an unreadable or mismatched file is recomputed.
    """
    path = reference_stats_path(key, cache_dir)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["key"]) == key:
                    return _valid_stats(data["mu"], data["sigma"], str(path))
                logger.warning("%s holds statistics for another key; recomputing", path)
        except (OSError, KeyError, ValueError) as err:
            logger.warning("cannot read cached statistics %s (%s); recomputing", path, err)
    mu, sigma = _valid_stats(*compute(), f"statistics computed for {key!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, key=np.array(key))
    logger.info("cached FID reference statistics for %r at %s", key, path)
    return mu, sigma
