"""Evaluation results on disk: a metrics table (Parquet + JSON), a markdown report with a plot, and
a cache of FID reference statistics of real splits.

Metric naming convention (it drives the plot): accuracies start with ``acc`` (``acc_logreg``,
``acc_mlp``, ...), FIDs start with ``fid``. A run with ``epsilon`` None is non-private. Every FID row
carries the number of synthetic and reference images it was computed from (``fid_synthetic_count``,
``fid_reference_count``): FIDs from different counts are not comparable.

Class-wise accuracy: rows whose metric starts with ``class_acc`` (``class_acc_logreg``, ...) hold the
accuracy of that classifier on the test images of one class (``class_name``, the release's class name,
or the label index as text where the release has no names); every other row has ``class_name`` None.
A run's overall accuracy is the ``acc_*`` row; select ``class_name`` None for one row per (run, metric).
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
CLASS_METRIC_PREFIX = "class_"  # "acc_logreg" over the whole test split -> "class_acc_logreg" per class
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
    class_name: str | None = None  # class_acc_* rows: the test class the accuracy is restricted to; else None

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
        if self.metric.startswith(CLASS_METRIC_PREFIX + "acc"):
            if not isinstance(self.class_name, str) or not self.class_name:
                raise ValueError(f"{self.run}/{self.metric} is a class-wise accuracy: class_name must be a "
                                 f"non-empty string, got {self.class_name!r}")
        elif self.class_name is not None:
            raise ValueError(f"{self.run}/{self.metric} is not a class-wise accuracy (class_acc_*): class_name must "
                             f"be None, got {self.class_name!r}")

    @classmethod
    def of_synthetic(cls, run: str, metric: str, value: float, info: SyntheticInfo,
                     fid_counts: tuple[int, int] | None = None, class_name: str | None = None) -> "MetricRow":
        """A metric of a synthetic dataset: its provenance (claim, encoder, steps, release) from `info`;
        `fid_counts` (synthetic, reference) for an FID, None for any other metric; `class_name` for a
        class-wise accuracy (class_acc_*)."""
        syn, ref = fid_counts if fid_counts is not None else (None, None)
        return cls(run, metric, float(value), info.epsilon, info.delta, info.encoder, info.steps, info.release_id,
                   syn, ref, class_name)

    @classmethod
    def of_real_data(cls, run: str, metric: str, value: float, class_name: str | None = None) -> "MetricRow":
        """A metric of real data (the non-private ceiling): no epsilon, delta, encoder, generator or release,
        written as None, None, "", 0 steps and "" (the table's types have no missing integer)."""
        return cls(run, metric, float(value), None, None, "", 0, "", class_name=class_name)


def named_classes(per_class: Iterable[float], class_names: Iterable[str] | None) -> list[tuple[str, float]]:
    """(class name, accuracy) for each label k with a finite accuracy (NaN: no test image of that class).

    `class_names[k]` names label k (the release's names); without names (None, or fewer than the labels)
    the label index as text."""
    names = list(class_names or ())
    return [(names[k] if k < len(names) else str(k), float(v)) for k, v in enumerate(per_class) if math.isfinite(v)]


COLUMNS = tuple(f.name for f in dataclasses.fields(MetricRow))
_COUNT_COLUMNS = ("fid_synthetic_count", "fid_reference_count")  # absent from files written before issue 13
_OPTIONAL_COLUMNS = (*_COUNT_COLUMNS, "class_name")  # class_name: absent from files written before issue 14


def as_rows(rows: Iterable[MetricRow | Mapping]) -> list[MetricRow]:
    """Accept MetricRow objects or dicts with exactly the MetricRow fields."""
    out = []
    for row in rows:
        if isinstance(row, MetricRow):
            out.append(row)
            continue
        if not set(COLUMNS) - set(_OPTIONAL_COLUMNS) <= set(row) <= set(COLUMNS):
            raise ValueError(f"metric row needs exactly {list(COLUMNS)}, got {sorted(row)}")
        out.append(MetricRow(**row))
    if not out:
        raise ValueError("rows must hold at least one metric, got 0")
    seen = set()
    for row in out:
        if (row.run, row.metric, row.class_name) in seen:
            of_class = "" if row.class_name is None else f" of class {row.class_name!r}"
            raise ValueError(f"duplicate metric {row.metric!r}{of_class} for run {row.run!r}")
        seen.add((row.run, row.metric, row.class_name))
    return out


def write_metrics_parquet(path: str | os.PathLike, rows: Iterable[MetricRow | Mapping]) -> Path:
    """One row per (run, metric, class_name); columns as MetricRow. Written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = as_rows(rows)
    schema = pa.schema([
        ("run", pa.string()), ("metric", pa.string()), ("value", pa.float64()),
        ("epsilon", pa.float64()), ("delta", pa.float64()), ("encoder", pa.string()),
        ("steps", pa.int64()), ("release_id", pa.string()),
        ("fid_synthetic_count", pa.int64()), ("fid_reference_count", pa.int64()), ("class_name", pa.string()),
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


def _class_table(rows: list[MetricRow]) -> list[str]:
    """Markdown lines of the class-wise accuracies (class_acc_* rows): one line per run and classifier."""
    if not rows:
        return []
    classes = list(dict.fromkeys(r.class_name for r in rows))
    value = {(r.run, r.metric, r.class_name): r.value for r in rows}
    lines = ["## Class-wise accuracy on the real test split", "",
             "| run | epsilon | classifier | " + " | ".join(classes) + " |", "|---" * (3 + len(classes)) + "|"]
    for run, metric, eps in dict.fromkeys((r.run, r.metric, r.epsilon) for r in rows):
        cells = [f"{value[(run, metric, c)]:.4f}" if (run, metric, c) in value else "" for c in classes]
        lines.append(f"| {run} | {_fmt_eps(eps)} | {metric.removeprefix(CLASS_METRIC_PREFIX + 'acc_')} | "
                     + " | ".join(cells) + " |")
    return lines + [""]


def _markdown(rows: list[MetricRow], plot_name: str, samples_name: str | None) -> str:
    class_rows = [r for r in rows if r.class_name is not None]  # their own table, after the plot
    rows = [r for r in rows if r.class_name is None]
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
    lines += _class_table(class_rows)
    if samples_name:
        lines += ["## Samples", "", f"![samples]({samples_name})", ""]
    return "\n".join(lines)


def _cell(row: MetricRow) -> str:
    """A table cell: the value, and for an FID its counts (`12.3456 (1,000 synth / 10,000 ref)`)."""
    if row.fid_synthetic_count is None:
        return f"{row.value:.4f}"
    return f"{row.value:.4f} ({row.fid_synthetic_count:,} synth / {row.fid_reference_count:,} ref)"


def write_report(out_dir: str | os.PathLike, rows: Iterable[MetricRow | Mapping],
                 sample_grid_png: str | os.PathLike | None = None) -> Path:
    """Write metrics.parquet, metrics.json, metrics.png (and samples.png) and report.md; returns report.md."""
    rows = as_rows(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_metrics_parquet(out_dir / METRICS_PARQUET, rows)
    write_metrics_json(out_dir / METRICS_JSON, rows)
    from storage.report_plots import plot_metrics  # imports this module

    plot_metrics(rows, out_dir / REPORT_PLOT)
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


# Markdown image links to a PNG beside the report: `![alt](name.png)` or `![alt](sub/name.png "title")`.
_PNG_LINK = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<src>[^()\s]+\.png)(?P<title>\s+\"[^\"]*\")?\)", re.IGNORECASE)
EMBED_MAX_BYTES = 4 * 1024 * 1024  # a PNG above this stays a link (a Prefect artifact lives in the server's database)


def embed_report_images(markdown: str, base_dir: str | os.PathLike, max_bytes: int = EMBED_MAX_BYTES) -> str:
    """The report's markdown with every relative PNG link replaced by a `data:image/png;base64,...` URI.

    For the Prefect artifact: the UI cannot resolve `metrics.png` relative to a file on the worker,
    so such links show as broken images; a data URI carries the image itself (the UI's markdown
    renderer keeps `data:` image sources; tests/test_ui_browser.py checks it in Chromium). Links
    that are absolute URLs or `data:` already, files that do not exist under `base_dir`, files
    that are not PNGs (checked by signature) and files over `max_bytes` are left as they were. The
    on-disk report.md keeps its relative links. Raises nothing for a bad link; reads only files
    inside `base_dir`.
    """
    import base64

    base = Path(base_dir).resolve()

    def replace(match: re.Match) -> str:
        src = match.group("src")
        if ":" in src or src.startswith("/"):
            return match.group(0)
        path = (base / src).resolve()
        if not path.is_relative_to(base) or not path.is_file() or path.stat().st_size > max_bytes:
            return match.group(0)
        data = path.read_bytes()
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            return match.group(0)
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return f"![{match.group('alt')}]({uri}{match.group('title') or ''})"

    return _PNG_LINK.sub(replace, markdown)


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
