"""One table and one plot over several finished runs, from the metrics files `evaluate` wrote.

Nothing is recomputed: each run's rows are read back from its `metrics.parquet` (or, where that is
missing, `metrics.json`), relabelled with the run's folder name, and written as one report with
`storage.metrics.write_report` (metrics.parquet, metrics.json, metrics.png, report.md).

A run folder may be given as the pipeline's folder (`DIR/eps-1`, holding `report/`), or as the folder
`evaluate` wrote (`DIR/eps-1/report`, holding the metrics files). The label of its rows is the run's
folder name (`eps-1`); where two folders would get the same label, the path relative to their common
parent (`a/eps-1`, `b/eps-1`). Real-data rows (`MetricRow.of_real_data`: the ceiling) are kept once
when every run that has them agrees, else once per run, labelled `real-data-ceiling (eps-1)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from mepf_core.errors import InvalidArgumentError, PathNotFoundError
from storage.metrics import METRICS_JSON, METRICS_PARQUET, MetricRow, as_rows, read_metrics_parquet, write_report

REPORT_FOLDER = "report"  # where the pipeline's evaluation writes, inside a run's folder


def metrics_folder(run: str | os.PathLike) -> Path:
    """The folder holding a run's metrics files: RUN itself or RUN/report. PathNotFoundError otherwise."""
    run = Path(run)
    for folder in (run, run / REPORT_FOLDER):
        if (folder / METRICS_PARQUET).is_file() or (folder / METRICS_JSON).is_file():
            return folder
    raise PathNotFoundError(f"{run} holds no finished evaluation: neither {run / METRICS_PARQUET} nor "
                            f"{run / REPORT_FOLDER / METRICS_JSON} (nor their .json/.parquet twins) exists; "
                            "evaluate the run first (`mepf evaluate` or `mepf run`)")


def read_run_rows(run: str | os.PathLike) -> list[MetricRow]:
    """A run's metric rows, from metrics.parquet, or metrics.json when there is no Parquet file."""
    folder = metrics_folder(run)
    if (folder / METRICS_PARQUET).is_file():
        return read_metrics_parquet(folder / METRICS_PARQUET)
    try:
        rows = json.loads((folder / METRICS_JSON).read_text())
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"{folder / METRICS_JSON} is not valid JSON: {exc}") from None
    if not isinstance(rows, list):
        raise InvalidArgumentError(f"{folder / METRICS_JSON} must hold a list of metric rows")
    return as_rows(rows)


def _run_folder(run: Path) -> Path:
    """The run's own folder: RUN, or RUN's parent when RUN is the evaluation's `report/` folder."""
    return run.parent if metrics_folder(run) == run and run.name == REPORT_FOLDER else run


def run_labels(runs: Sequence[str | os.PathLike]) -> list[str]:
    """One distinct label per run folder (see the module docstring); InvalidArgumentError for a run given twice."""
    folders = [_run_folder(Path(r)).resolve() for r in runs]
    twice = sorted({str(f) for f in folders if folders.count(f) > 1})
    if twice:
        raise InvalidArgumentError(f"run folder(s) given more than once: {', '.join(twice)}")
    labels = [f.name for f in folders]
    if len(set(labels)) < len(labels):
        common = Path(os.path.commonpath(folders))
        labels = [str(f.relative_to(common)) for f in folders]
    return labels


def _is_real_data(row: MetricRow) -> bool:
    return row.epsilon is None and row.release_id == "" and row.steps == 0


def combine_runs(runs: Sequence[str | os.PathLike]) -> list[MetricRow]:
    """The rows of every run, relabelled (module docstring), in the order the runs are given."""
    if not runs:
        raise InvalidArgumentError("name at least one run folder, got none")
    labels = run_labels(runs)
    synthetic, real = [], []
    for label, run in zip(labels, runs):
        rows = read_run_rows(run)
        own = [r for r in rows if not _is_real_data(r)]
        names = list(dict.fromkeys(r.run for r in own))
        rename = {name: label if len(names) == 1 else f"{label}/{name}" for name in names}
        synthetic += [dataclasses.replace(r, run=rename[r.run]) for r in own]
        ceiling = [r for r in rows if _is_real_data(r)]
        if ceiling:
            real.append((label, ceiling))
    distinct = {frozenset((r.run, r.metric, r.class_name, r.value) for r in rows) for _, rows in real}
    if len(distinct) <= 1:
        ceiling_rows = real[0][1] if real else []
    else:
        ceiling_rows = [dataclasses.replace(r, run=f"{r.run} ({label})") for label, rows in real for r in rows]
    return as_rows(synthetic + ceiling_rows)


def write_combined_report(runs: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """`combine_runs(runs)` written to OUT (metrics.parquet, metrics.json, metrics.png, report.md);
    returns OUT/report.md. OUT must not be one of the runs' metrics folders (it would overwrite them)."""
    out = Path(out)
    for run in runs:
        if metrics_folder(run).resolve() == out.resolve():
            raise InvalidArgumentError(f"the combined report would overwrite the metrics of run {run}; choose "
                                       "another output folder")
    return write_report(out, combine_runs(runs))
