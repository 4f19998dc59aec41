"""Whole-pipeline benchmark: `mepf run` (README's main job, Fashion-MNIST defaults), wall time and where it goes.

Runs `mepf run --out-dir DIR --json [EXTRA...]` as a subprocess under its own PREFECT_HOME (a temporary
one unless --prefect-home names one; PREFECT_API_URL is removed from its environment, so the run uses an
ephemeral server over that home's database), then reads the run back from Prefect's own records
(`prefect.client.orchestration.get_client`: `read_flow_runs` for the `dp-mepf-pipeline` flow run and its
subflows, `read_task_runs` for their task runs) and groups the durations (`total_run_time`, the time each
run spent in a Running state) into stages:

    release      the `custodian-release` subflow (calibrate, describe-dataset, check-budget, extract-shard
                 x shards, reduce-sums, charge-noise-release; the rest of the subflow is `untracked`)
    training     the `train-generator` subflow (load-release, train-generator)
    sampling     the `sample` subflow (sample-synthetic)
    evaluation   the `evaluate` subflow, split into fid (the `fid` task), classifiers (the
                 `downstream-accuracy-NAME` task runs, one per classifier) and other (load-synthetic,
                 load-reference, the report)
    overhead     subprocess wall time minus the four subflows: interpreter start, imports, the ephemeral
                 Prefect server's start, parameter checks, the pipeline flow's own bookkeeping

Each classifier is its own task run (`downstream-accuracy-logreg`, ...): `classifiers` in the row gives
Prefect's seconds for each. `classifiers_from_log` keeps the seconds `mepf_core.classifiers` logs
("logreg: test accuracy 0.75 (12.3 s)", from the subprocess's stderr) beside them, as a cross-check.

    python bench/bench_pipeline.py [--out-dir runs/bench-pipeline/TIMESTAMP] [--tag NAME]
        [--prefect-home DIR] [-- EXTRA mepf run ARGS, e.g. --steps 50 --config smoke.yaml]

Each row also carries the 1-minute load average before and after, the peak RSS of the largest process
the run started, the machine facts and both command lines (this script's and the `mepf run` it ran;
the text of a `--config` file passed through). Rows merge into bench/results/pipeline.json by `tag`
(default: the out-dir's name): a new row replaces an old one with the same tag.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MEPF = str(Path(sys.executable).with_name("mepf"))
RESULT = "pipeline"
ENV_KEYS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")
PIPELINE_FLOW = "dp-mepf-pipeline"
# subflow name -> stage name
STAGES = {"custodian-release": "release", "train-generator": "training", "sample": "sampling",
          "evaluate": "evaluation"}
CLASSIFIER_LINE = re.compile(r"\b(\w+): test accuracy [0-9.]+ \(([0-9.]+) s\)")
LOG_TIME = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*"
SERVER_START = re.compile(LOG_TIME + "Starting temporary server", re.M)
FLOW_BEGINS = re.compile(LOG_TIME + f"Beginning flow run .* for flow '{PIPELINE_FLOW}'", re.M)


def server_start_from_log(stderr: str) -> float | None:
    """Seconds from the CLI's "Starting temporary server" log line to the pipeline flow run's
    "Beginning flow run" line (the ephemeral Prefect server's start-up, a part of the overhead);
    None when either line is missing (e.g. a PREFECT_API_URL server)."""
    from datetime import datetime

    start, begin = SERVER_START.search(stderr), FLOW_BEGINS.search(stderr)
    if not (start and begin):
        return None
    t_start, t_begin = (datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for m in (start, begin))
    return round((t_begin - t_start).total_seconds(), 3)


def run_pipeline(out_dir: Path, extra: list[str], prefect_home: Path) -> dict:
    """Run `mepf run` in a subprocess; its wall time, exit status, JSON result and stderr (also written
    to OUT_DIR/bench-pipeline.stderr.log)."""
    cmd = [MEPF, "run", "--out-dir", str(out_dir), *extra, "--json"]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(prefect_home)
    started = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-pipeline.stderr.log").write_text(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    text = proc.stdout
    result = json.loads(text[text.index("{"):])
    return {"command": "mepf " + shlex.join(cmd[1:]), "wall_s": wall, "started": started, "result": result,
            "stderr": proc.stderr}


async def prefect_records(started: float) -> tuple[dict, list[dict], list[dict]]:
    """(pipeline flow run, its subflow runs, the subflows' task runs) as dicts, read from the Prefect
    API of this process's PREFECT_HOME: the latest `dp-mepf-pipeline` run that started after `started`
    (Unix seconds)."""
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterParentFlowRunId, FlowRunFilterStartTime,
        TaskRunFilter, TaskRunFilterFlowRunId)
    from prefect.client.schemas.sorting import FlowRunSort

    after = datetime.fromtimestamp(started - 1, tz=timezone.utc)
    async with get_client() as client:
        top = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[PIPELINE_FLOW])),
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=after)),
            sort=FlowRunSort.START_TIME_DESC, limit=1)
        if not top:
            raise SystemExit(f"no {PIPELINE_FLOW} flow run found in PREFECT_HOME={os.environ['PREFECT_HOME']}")
        pipeline = top[0]
        subflows = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[pipeline.id])))
        flows = {f.id: f.name for f in await client.read_flows()}
        tasks = await client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[s.id for s in subflows])))
    t_zero = pipeline.start_time

    def record(r, name: str) -> dict:
        return {"name": name, "state": r.state_type.value if r.state_type else None,
                "seconds": r.total_run_time.total_seconds(),
                "start_s": (r.start_time - t_zero).total_seconds() if r.start_time else None,
                "end_s": (r.end_time - t_zero).total_seconds() if r.end_time else None, "id": str(r.id)}

    subflow_of = {s.id: flows.get(s.flow_id, s.name) for s in subflows}
    return (record(pipeline, PIPELINE_FLOW), [record(s, subflow_of[s.id]) for s in subflows],
            [{**record(t, task_name(t)),
              "task_run_name": t.name, "subflow": subflow_of[t.flow_run_id]} for t in tasks])


def task_name(task_run) -> str:
    """The task's own name: Prefect names a task run `{task name}-{dynamic_key}` or, as in these flows,
    `{task name}-{dynamic_key[:3]}`."""
    head, _, tail = task_run.name.rpartition("-")
    return head if head and tail and (task_run.dynamic_key or "").startswith(tail) else task_run.name


def breakdown(wall: float, pipeline: dict, subflows: list[dict], tasks: list[dict], stderr: str) -> dict:
    """Seconds per stage (see the module docstring), with the task runs each stage is made of."""
    stages: dict[str, dict] = {}
    for sub in sorted(subflows, key=lambda s: s["start_s"] or 0.0):
        stage = STAGES.get(sub["name"], sub["name"])
        own = sorted((t for t in tasks if t["subflow"] == sub["name"]), key=lambda t: t["start_s"] or 0.0)
        by_name: dict[str, dict] = {}
        for t in own:
            entry = by_name.setdefault(t["name"], {"seconds": 0.0, "runs": 0})
            entry["seconds"] = round(entry["seconds"] + t["seconds"], 3)
            entry["runs"] += 1
        # tasks inside a subflow may run concurrently (extract-shard), so their sum may exceed the subflow
        untracked = sub["seconds"] - sum(t["seconds"] for t in own)
        stages[stage] = {"subflow": sub["name"], "seconds": round(sub["seconds"], 3), "state": sub["state"],
                         "start_s": sub["start_s"], "tasks": by_name, "untracked_s": round(untracked, 3)}
    ev = stages.get("evaluation")
    if ev:
        from flows.evaluate import CLASSIFIER_RUN_NAME  # one task run per classifier: RUN_NAME-CLASSIFIER

        prefix = f"{CLASSIFIER_RUN_NAME}-"
        fid = ev["tasks"].get("fid", {}).get("seconds", 0.0)
        ev["classifiers"] = {k.removeprefix(prefix): v["seconds"] for k, v in ev["tasks"].items()
                             if k.startswith(prefix)}
        clf = round(sum(ev["classifiers"].values()), 3)
        ev["fid_s"], ev["classifiers_s"] = fid, clf
        ev["other_s"] = round(ev["seconds"] - fid - clf, 3)
    in_subflows = sum(s["seconds"] for s in stages.values())
    per_classifier = {name: float(s) for name, s in CLASSIFIER_LINE.findall(stderr)}
    return {
        "wall_s": round(wall, 3), "pipeline_flow_s": round(pipeline["seconds"], 3),
        "release_s": stages.get("release", {}).get("seconds"), "training_s": stages.get("training", {}).get("seconds"),
        "sampling_s": stages.get("sampling", {}).get("seconds"),
        "evaluation_s": ev["seconds"] if ev else None, "fid_s": ev["fid_s"] if ev else None,
        "classifiers_s": ev["classifiers_s"] if ev else None, "classifiers": ev["classifiers"] if ev else None,
        "evaluation_other_s": ev["other_s"] if ev else None,
        "overhead_s": round(wall - in_subflows, 3),
        "overhead_outside_flow_s": round(wall - pipeline["seconds"], 3),
        "classifiers_from_log": per_classifier or None,
        "server_start_from_log_s": server_start_from_log(stderr),
        "notes": [
            "seconds are Prefect's total_run_time (time in Running) of each flow/task run",
            "overhead_s = wall - the four subflows: process start, imports, ephemeral Prefect server start, "
            "the pipeline flow's own work; overhead_outside_flow_s = wall - the dp-mepf-pipeline flow run",
            "classifiers: Prefect's seconds of each downstream-accuracy-NAME task run; classifiers_from_log: "
            "the seconds mepf_core.classifiers logs on stderr (a cross-check)",
            "untracked_s of a stage = its subflow minus its task runs (negative when tasks ran concurrently)",
            "server_start_from_log_s: from the 'Starting temporary server' to the 'Beginning flow run' log line",
        ],
        "stages": stages,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="mepf run --out-dir (default runs/bench-pipeline/TIMESTAMP)")
    ap.add_argument("--tag", default=None, help="row key in pipeline.json (default: the out-dir's name)")
    ap.add_argument("--prefect-home", type=Path, default=None,
                    help="PREFECT_HOME of the run (kept); default a temporary one, removed afterwards")
    ap.add_argument("extra", nargs="*", help="after `--`: further `mepf run` arguments (e.g. --steps 50)")
    args = ap.parse_args()
    out_dir = args.out_dir or Path("runs/bench-pipeline") / time.strftime("%Y%m%d-%H%M%S")
    home = args.prefect_home or Path(tempfile.mkdtemp(prefix="bench-pipeline-prefect-"))
    home.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(home.resolve())  # this process reads the same database back
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    config_text = None
    if "--config" in args.extra:
        config_path = Path(args.extra[args.extra.index("--config") + 1])
        config_text = config_path.read_text() if config_path.is_file() else None

    load_before = os.getloadavg()[0]
    run = run_pipeline(out_dir, args.extra, home)
    load_after = os.getloadavg()[0]
    peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
    pipeline, subflows, tasks = asyncio.run(prefect_records(run["started"]))
    if args.prefect_home is None:
        shutil.rmtree(home, ignore_errors=True)

    from bench.common import RESULTS, command_line, env_label, environment, machine, table, write_result
    from mepf_core.openmp import bounded_spin_env

    result = run["result"]
    # what the child ran under: the mepf CLI sets its OpenMP wait when none is set (mepf_core/openmp.py)
    child_env = dict(bounded_spin_env({k: v for k, v in environment(ENV_KEYS).items() if v is not None}))
    row = {"tag": args.tag or out_dir.name, **breakdown(run["wall_s"], pipeline, subflows, tasks, run["stderr"]),
           "metrics": result.get("metrics"), "fid_counts": [result.get("fid_synthetic_count"),
                                                            result.get("fid_reference_count")],
           "peak_rss_mib": round(peak_rss_mib), "loadavg_1min": f"{load_before:.1f}-{load_after:.1f}",
           "env": env_label(child_env), "machine": machine(),
           "command": command_line(ENV_KEYS), "mepf_command": run["command"], "config": config_text,
           "flow_runs": [pipeline, *subflows], "task_runs": tasks}
    previous = RESULTS / f"{RESULT}.json"
    old = json.loads(previous.read_text()).get("rows", []) if previous.is_file() else []
    rows = [r for r in old if r.get("tag") != row["tag"]] + [row]
    path = write_result(RESULT, {"rows": rows})
    cols = ["tag", "wall_s", "release_s", "training_s", "sampling_s", "fid_s", "classifiers_s",
            "evaluation_other_s", "overhead_s", "loadavg_1min"]
    print(table([row], cols))
    for name, stage in row["stages"].items():
        print(f"  {name}: {stage['seconds']:.1f} s, tasks " +
              ", ".join(f"{k} {v['seconds']:.1f} s" + (f" x{v['runs']}" if v["runs"] > 1 else "")
                        for k, v in stage["tasks"].items()) + f", untracked {stage['untracked_s']:.1f} s")
    print(f"  overhead: {row['overhead_s']:.1f} s (outside the pipeline flow run {row['overhead_outside_flow_s']:.1f} s; "
          f"ephemeral server start from the log: {row['server_start_from_log_s']} s)")
    if row["classifiers_from_log"]:
        print("  classifiers (from the log): " + ", ".join(f"{k} {v:.1f} s" for k, v in
                                                          row["classifiers_from_log"].items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
