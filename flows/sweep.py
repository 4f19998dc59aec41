"""`dp-mepf-sweep`: the whole pipeline at several epsilons against one budget ledger, then one report.

For each epsilon, in the order given, the `dp-mepf-pipeline` flow runs as a subflow in OUT/eps-<e>/
(release.h5, run/, report/), charging its release to the sweep's ledger (OUT/ledger.jsonl, or
`ledger`). Then OUT/report/ gets the combined table (metrics.parquet, metrics.json, report.md) and
plot (metrics.png) of every finished epsilon (`storage.combined_report`), and OUT/sweep.json what
happened to each epsilon.

Refusals: a release the budget cannot afford is refused by the ledger before any image is read
(`BudgetExceededError`; nothing is charged). The sweep reports it (status "refused" with the
ledger's reason, in the result, the log, sweep.json and report.md) and CONTINUES with the next
epsilon: a smaller epsilon later in the list may still fit the remaining budget, and finishing the
others costs nothing extra. Any other error stops the sweep, after the combined report of the
epsilons finished so far is written.

Nothing finished is lost or paid twice: an epsilon whose folder holds an evaluation (report/metrics.*)
is reused as it is (status "reused"; delete its folder to recompute it); one whose folder holds a
release but no evaluation (an earlier sweep stopped during training, say) continues from that release
without a new charge (the public subflows: training resumes from its latest checkpoint, then sample
(unless the training was already complete and its synthetic set is there), and evaluate; status "resumed").

The real-data ceiling (`ceiling` with `allow_private_reference`: classifiers trained on the real
training split, which may be the private data) is computed once, by the first epsilon evaluated.

Every epsilon's parameters are validated, and the ledger's budget checked, before anything runs.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from prefect import flow, get_run_logger

from flows.evaluate import evaluate
from flows.pipeline import dp_mepf_pipeline
from flows.train_generator import sample, train_generator
from mepf_core.errors import InvalidArgumentError
from storage.atomic import atomic_write_bytes
from storage.combined_report import REPORT_FOLDER, metrics_folder, read_run_rows, write_combined_report
from storage.ledger import BudgetExceededError, BudgetLedger
from storage.params import EvaluateParams, PipelineParams, SampleParams, SweepParams, TrainParams
from storage.release import read_release

SWEEP_JSON = "sweep.json"


def finished(folder: Path) -> bool:
    """Whether an epsilon's folder holds an evaluation (its report's metrics files)."""
    try:
        metrics_folder(folder / REPORT_FOLDER)
    except FileNotFoundError:
        return False
    return True


def _holds_ceiling(folder: Path) -> bool:
    return finished(folder) and any(r.epsilon is None and r.release_id == "" for r in read_run_rows(folder))


def check_budget_set(params: SweepParams) -> None:
    """Refuse (InvalidArgumentError) a sweep whose ledger has no budget for the dataset and no `budget`
    to set one: every release would be refused."""
    if params.budget is not None:
        return
    release, _, _ = params.pipeline_params(params.epsilons[0]).stage_params()
    dataset = release.resolved_dataset_id
    known = {b.dataset_id: b for b in BudgetLedger(params.resolved_ledger).summary()}
    if dataset not in known or known[dataset].budget_epsilon is None:
        raise InvalidArgumentError(f"ledger {params.resolved_ledger} holds no budget for dataset {dataset!r}; pass "
                                   "--budget EPSILON (the total the sweep's releases may spend)")


def _resume_public(pipeline: PipelineParams) -> dict:
    """The public stages of one epsilon from its existing release.h5 (no new charge)."""
    release_params, train, evaluation = pipeline.stage_params()
    release = read_release(release_params.out)  # verified: checksums and the recomputed claim
    if release.metadata.target_epsilon != pipeline.target_epsilon:
        raise InvalidArgumentError(
            f"{release_params.out} was released at epsilon {release.metadata.target_epsilon:g}, not "
            f"{pipeline.target_epsilon:g}; move it away to release this epsilon again")
    trained = train_generator(TrainParams(release=release_params.out, resume=True, **train))
    synthetic = Path(train["out"]) / "synthetic.h5"  # written atomically: present means complete
    if synthetic.is_file() and trained["steps_trained"] == 0:  # drawn after this training had finished
        sampled = {"path": str(synthetic)}
    else:
        sampled = sample(SampleParams(run=train["out"], n=pipeline.n_samples))
    evaluated = evaluate(EvaluateParams(**evaluation))
    return {"release": release_params.out, "run": trained, "samples": sampled, "report": evaluated["report"],
            "metrics": evaluated["metrics"]}


def _refusal_lines(entries: list[dict]) -> str:
    refused = [e for e in entries if e["status"] == "refused"]
    if not refused:
        return ""
    lines = ["", "## Refused by the budget", ""]
    lines += [f"- epsilon {e['epsilon']:g}: {e['reason']}" for e in refused]
    return "\n".join(lines) + "\n"


def write_sweep_outputs(params: SweepParams, entries: list[dict]) -> str | None:
    """OUT/sweep.json (every epsilon's status) and, when any epsilon finished, the combined report in
    OUT/report/ with the refusals appended to report.md; returns report.md's path or None."""
    out = Path(params.out)
    done = [params.folder(e["epsilon"]) for e in entries if e["status"] in ("done", "reused", "resumed")]
    report = None
    if done:
        report = write_combined_report(done, out / REPORT_FOLDER)
        extra = _refusal_lines(entries)
        if extra:
            atomic_write_bytes(report, (report.read_text() + extra).encode())
        report = str(report)
    summary = {"out": str(out), "ledger": params.resolved_ledger, "report": report, "epsilons": entries}
    atomic_write_bytes(out / SWEEP_JSON, (json.dumps(summary, indent=2) + "\n").encode())
    return report


@flow(name="dp-mepf-sweep")
def dp_mepf_sweep(params: SweepParams) -> dict:
    """Run the pipeline per epsilon (module docstring); returns {"out", "ledger", "report", "epsilons"}
    where each epsilon is {"epsilon", "folder", "status": done | reused | resumed | refused, "metrics"
    (not for refused), "reason" (refused only)}."""
    logger = get_run_logger()
    out = Path(params.out)
    out.mkdir(parents=True, exist_ok=True)
    for epsilon in params.epsilons:  # every stage of every epsilon valid before anything runs
        params.pipeline_params(epsilon).stage_params()
    check_budget_set(params)
    ceiling_held = any(_holds_ceiling(params.folder(e)) for e in params.epsilons)
    entries: list[dict] = []
    try:
        for epsilon in params.epsilons:
            folder = params.folder(epsilon)
            entry = {"epsilon": epsilon, "folder": str(folder)}
            if finished(folder):
                metrics = {r.metric: r.value for r in read_run_rows(folder / REPORT_FOLDER)
                           if r.class_name is None and r.epsilon is not None}
                entries.append({**entry, "status": "reused", "metrics": metrics})
                logger.info("epsilon %g: %s already evaluated, reused", epsilon, folder)
                continue
            pipeline = params.pipeline_params(epsilon, ceiling=params.ceiling and not ceiling_held)
            try:
                if (folder / "release.h5").exists():
                    logger.info("epsilon %g: continuing from the release in %s (no new charge)", epsilon, folder)
                    result, status = _resume_public(pipeline), "resumed"
                else:
                    result, status = dp_mepf_pipeline(pipeline), "done"
            except BudgetExceededError as exc:
                logger.warning("epsilon %g refused, nothing charged: %s", epsilon, exc)
                entries.append({**entry, "status": "refused", "reason": str(exc)})
                with contextlib.suppress(OSError):
                    folder.rmdir()  # the pipeline's empty folder; never a folder holding anything
                continue
            ceiling_held = ceiling_held or pipeline.ceiling
            entries.append({**entry, "status": status, "metrics": result["metrics"]})
    except Exception:
        try:  # keep what finished, then let the error stop the sweep
            write_sweep_outputs(params, entries)
        except Exception as exc:  # noqa: BLE001 - the original error matters more; this one is logged
            logger.error("could not write the combined report of the finished epsilons: %s", exc)
        raise
    report = write_sweep_outputs(params, entries)
    return {"out": str(out), "ledger": params.resolved_ledger, "report": report, "epsilons": entries}
