"""Prefect artifacts: what a person sees of a run in the Prefect UI.

Builders (pure functions of public fields, testable without Prefect) and thin publishers:

* `metrics_table`: the evaluation's metrics as a table artifact (FID with its sample counts, the
  accuracies, epsilon, delta, neighbouring relation, release id);
* `release_summary_markdown`: the custodian's release summary (epsilon, delta, relation, sigmas,
  array shapes, encoder and its weights' hash). Everything in it is in the public release file;
  it never holds a count, n or anything else un-noised;
* `RunProgress`: a progress artifact updated at most every `min_percent` points and every
  `min_interval_s` seconds (training: steps done / total steps, both public);
* `FixedStepProgress`: a progress artifact that reports only the fixed fractions 1/k, 2/k, ..., 1,
  each exactly once and in order, whatever the underlying count (extraction, where the count of
  images done is private; see its docstring).

Every publisher is a no-op outside a Prefect flow or task run (the plain functions the tasks wrap
are also called from tests, benchmarks and the audit), and a failed artifact call is logged, never
raised: the UI is a view of the work, not part of it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from uuid import UUID

logger = logging.getLogger(__name__)

# Artifact keys: lowercase letters, digits and dashes (Prefect's rule). One key per kind, so the
# Artifacts page keeps each kind's history across runs.
METRICS_KEY = "dp-mepf-metrics"
REPORT_KEY = "dp-mepf-evaluation"
RELEASE_KEY = "dp-mepf-release-summary"
TRAINING_PROGRESS_KEY = "dp-mepf-training-progress"
EXTRACTION_PROGRESS_KEY = "dp-mepf-extraction-progress"

TABLE_COLUMNS = ("run", "metric", "value", "fid_synthetic_count", "fid_reference_count", "epsilon", "delta",
                 "relation", "release_id")


def in_prefect_run() -> bool:
    """True inside a Prefect flow or task run (where an artifact is linked to that run)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _guarded(what: str, call: Callable[[], object]) -> object | None:
    """Run a Prefect artifact call; on any error log a warning and return None (the run goes on)."""
    if not in_prefect_run():
        return None
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - an artifact is a view; it must never fail the work
        logger.warning("could not %s (%s: %s); the run goes on", what, type(exc).__name__, exc)
        return None


# --- metrics table --------------------------------------------------------------------------------

def metrics_table(rows: Iterable, relation: str | None = None) -> list[dict]:
    """One dict per metric row (storage.metrics.MetricRow), with TABLE_COLUMNS keys.

    `relation`: the release's neighbouring relation ("add-remove" / "replace-one"), given to every
    row with an epsilon (rows of real data, the non-private ceiling, get None). FID rows carry their
    synthetic and reference image counts (public: chosen by the evaluation's parameters); other
    rows None. Values are plain floats, ints, strings or None (JSON).
    """
    table = []
    for r in rows:
        table.append({
            "run": r.run, "metric": r.metric, "value": round(float(r.value), 6),
            "fid_synthetic_count": r.fid_synthetic_count, "fid_reference_count": r.fid_reference_count,
            "epsilon": None if r.epsilon is None else float(f"{r.epsilon:.6g}"),  # as the report prints it
            "delta": r.delta, "relation": relation if r.epsilon is not None else None,
            "release_id": r.release_id or None,
        })
    if not table:
        raise ValueError("metrics_table needs at least one metric row, got 0")
    return table


def publish_metrics_table(table: list[dict], description: str) -> UUID | None:
    """A table artifact (key METRICS_KEY) in the current run; None outside a run or on an API error."""
    from prefect.artifacts import create_table_artifact

    return _guarded("create the metrics table artifact",
                    lambda: create_table_artifact(table, key=METRICS_KEY, description=description))


def publish_markdown(markdown: str, key: str, description: str) -> UUID | None:
    """A markdown artifact in the current run; None outside a run or on an API error."""
    from prefect.artifacts import create_markdown_artifact

    return _guarded(f"create the {key} artifact",
                    lambda: create_markdown_artifact(markdown, key=key, description=description))


# --- release summary ------------------------------------------------------------------------------

# What the release summary may show: every field is in the release file, which is public. Anything
# else passed in (n_public under replace-one, a path on the custodian's machine) is left out: the
# summary is for a privacy board and for users of a shared Prefect server.
RELEASE_SUMMARY_FIELDS = ("release_id", "epsilon", "delta", "neighbouring", "sigmas", "shapes", "encoder",
                          "encoder_weights_sha256", "release_sha256", "signed_by", "image_mode_source",
                          "cells_per_class")


def release_summary_markdown(release: Mapping) -> str:
    """Markdown of a release's public facts.

    `release`: the custodian flow's result (tasks.custodian.charge_noise_and_release) with, optionally,
    `release_sha256`. Reads only RELEASE_SUMMARY_FIELDS: release id, epsilon, delta, neighbouring
    relation, cells per class, per-part sigma, array shapes (rows x feature dimension: both public, in the file),
    encoder name and weights SHA-256, release file SHA-256, signer fingerprint. No count, no n, and no
    other field of `release` appears. Raises KeyError when a required field (release_id, epsilon,
    delta, neighbouring, sigmas, shapes) is missing.
    """
    r = {k: release.get(k) for k in RELEASE_SUMMARY_FIELDS}
    for key in ("release_id", "epsilon", "delta", "neighbouring", "sigmas", "shapes"):
        if r[key] is None:
            raise KeyError(f"release summary needs {key!r}")
    lines = [f"# DP-MEPF release `{r['release_id']}`", "",
             "| claim | value |", "|---|---|",
             f"| epsilon | {float(r['epsilon']):.6g} |",
             f"| delta | {float(r['delta']):.3g} |",
             f"| neighbouring relation | {r['neighbouring']} |",
             *([f"| cells per class | {int(r['cells_per_class'])} (rows = classes x cells) |"]
               if r["cells_per_class"] not in (None, 1) else []),
             f"| encoder | {r['encoder'] or 'not recorded'} |",
             f"| encoder weights SHA-256 | `{r['encoder_weights_sha256'] or 'not recorded'}` |",
             f"| release file SHA-256 | `{r['release_sha256'] or 'not recorded'}` |",
             f"| signed by | {r['signed_by'] or 'unsigned'} |",
             # an inferred mode is one bit of the private data outside epsilon: the summary says so
             *([f"| image mode chosen by | {r['image_mode_source']}"
                + (" (one bit of the data, not covered by epsilon)" if r["image_mode_source"] == "inferred-from-data"
                   else "") + " |"] if r["image_mode_source"] else []),
             "", "| part | shape | sigma |", "|---|---|---|"]
    for name, sigma in r["sigmas"].items():
        shape = r["shapes"].get(name)
        shape_text = " x ".join(str(int(s)) for s in shape) if shape is not None else "(not released)"
        lines.append(f"| {name} | {shape_text} | {float(sigma):.6g} |")
    lines += ["", "Every released array is noised once with the sigma above (a part with sigma 0 is public by "
              "the relation). Shapes are rows (classes x cells) x feature dimension: no count of images appears here."]
    return "\n".join(lines) + "\n"


# --- progress -------------------------------------------------------------------------------------

def _create_progress(key: str, description: str, percent: float) -> UUID | None:
    from prefect.artifacts import create_progress_artifact

    return _guarded(f"create the {key} progress artifact",
                    lambda: create_progress_artifact(percent, key=key, description=description))


def _update_progress(artifact_id: UUID, percent: float) -> bool:
    from prefect.artifacts import update_progress_artifact

    return _guarded("update a progress artifact", lambda: update_progress_artifact(artifact_id, percent)) is not None


class RunProgress:
    """A Prefect progress artifact (0-100) for work whose size is public (training steps).

    Created on the first `update` inside a Prefect run; later updates reach the API only when the
    value moved by at least `min_percent` points since the last one sent AND `min_interval_s`
    seconds passed (so a 10,000-step run sends at most 50 updates), except `finish()` (100%),
    which is always sent. After an API error it stops sending (logged once). Outside a run: no-op.
    """

    def __init__(self, key: str, description: str, *, min_percent: float = 2.0, min_interval_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        if not min_percent >= 0 or not min_interval_s >= 0:
            raise ValueError(f"min_percent and min_interval_s must be >= 0, got {min_percent}, {min_interval_s}")
        self.key, self.description = key, description
        self.min_percent, self.min_interval_s, self.clock = min_percent, min_interval_s, clock
        self.artifact_id: UUID | None = None
        self.sent: list[float] = []  # values sent, in order (for tests and logs)
        self._last_time = -math.inf
        self._broken = False

    def update(self, percent: float, *, force: bool = False) -> None:
        if self._broken:
            return
        percent = min(max(float(percent), 0.0), 100.0)
        if self.artifact_id is None:
            if not in_prefect_run():
                return
            self.artifact_id = _create_progress(self.key, self.description, percent)
            if self.artifact_id is None:
                self._broken = True
                return
            self.sent.append(percent)
            self._last_time = self.clock()
            return
        now = self.clock()
        moved = percent - self.sent[-1]
        if not force and (moved < self.min_percent or now - self._last_time < self.min_interval_s):
            return
        if moved == 0:
            return
        if not _update_progress(self.artifact_id, percent):
            self._broken = True
            return
        self.sent.append(percent)
        self._last_time = now

    def fraction(self, done: int, total: int) -> None:
        """update(100 * done / total); total must be > 0."""
        if total <= 0:
            raise ValueError(f"total must be > 0, got {total}")
        self.update(100.0 * done / total)

    def finish(self) -> None:
        self.update(100.0, force=True)


class FixedStepProgress:
    """A progress artifact over work whose size is private: it reports only 100*j/k for j = 1..k.

    Why this reveals no private count: the extraction of a shard covers a private number of images
    (its share of n, private under add-remove). A bar of "images done / images total", or a percent
    updated per batch, would give the count away (73 images in batches of 16 move the percent in
    steps of 16/73, and the number of distinct values is the number of batches, ceil(n / 16)).
    Here the values sent are the fixed grid 0, 100/k, ..., 100, each sent exactly once and in that
    order, whatever the count and the batch size: when one batch crosses several grid points, every
    crossed point is sent, one after the other, and `finish()` sends any still missing. So the
    sequence of values is the same for every dataset. What is not hidden is timing: updates are sent
    when batches finish, so a shard of fewer than k batches sends several grid points at once. Timing
    is visible in Prefect anyway (every task run's start and end), and it is no count that is printed,
    logged or stored. `k` (default 10) is a constant of the code.
    `description` must be public (here: the shard index and the custodian's declared shard count).
    """

    def __init__(self, key: str, description: str, *, steps: int = 10):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        self.steps = steps
        self._progress = RunProgress(key, description, min_percent=0.0, min_interval_s=0.0)
        self._reported = 0
        self._progress.update(0.0)

    @property
    def sent(self) -> list[float]:
        return self._progress.sent

    def update(self, done: int, total: int) -> None:
        """`done` of `total` (private numbers, never sent): send every grid point now crossed."""
        crossed = self.steps if total <= 0 else min(self.steps, (done * self.steps) // total)
        while self._reported < crossed:
            self._reported += 1
            self._progress.update(100.0 * self._reported / self.steps, force=True)

    def finish(self) -> None:
        self.update(1, 1)


def artifacts_of_flow_run(flow_run_id: UUID | str) -> list[dict]:
    """The artifacts linked to a flow run (its own and its tasks'), oldest first, as dicts with `key`,
    `type`, `description`, `data` (markdown text, table rows, progress percent) and `task_run_id`.
    Reads the API that PREFECT_API_URL (or the ephemeral server) names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(flow_run_id))])),
            sort=ArtifactSort.CREATED_DESC)
    out = []
    for a in reversed(found):
        data = a.data
        if a.type == "table" and isinstance(data, str):
            import json

            data = json.loads(data)
        out.append({"id": str(a.id), "key": a.key, "type": a.type, "description": a.description, "data": data,
                    "task_run_id": str(a.task_run_id) if a.task_run_id else None})
    return out
