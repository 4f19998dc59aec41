#!/usr/bin/env python
"""Bring up the DP-MEPF deployments on one machine, run them in order, and tear everything down.

What it does, all under --workdir (its own PREFECT_HOME, logs, outputs):

1. starts a Prefect server on 127.0.0.1 (a free port unless --port) and waits for /api/health;
2. creates the process work pools `custodian` and `gpu` and deploys prefect.yaml (`prefect deploy --all`);
3. starts one worker per pool (`prefect worker start --pool ...`);
4. runs custodian-release -> train-generator -> sample -> evaluate as deployment runs, each waiting for
   the previous one to finish; the custodian worker is stopped as soon as the release is written, so
   the public stage demonstrably runs without it;
5. prints a summary (also written to WORKDIR/summary.json) and stops every process it started
   (workers before the server), also on errors, Ctrl-C or SIGTERM.

With --release PATH the custodian is skipped entirely (no custodian worker; the private data is not
needed): the public stage trains, samples and evaluates from that file. --rerun also retrains from the
release once more, into a fresh folder, after the public stage. Exit status: 0 when every run ended
Completed, 1 when a run did not, 2 for bad arguments, 130 when interrupted.

    .venv/bin/python scripts/local_stack.py --tiny                     # minutes, 200 private images
    .venv/bin/python scripts/local_stack.py --release runs/x/release.h5 --workdir runs/retrain
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mepf_core.allocator import tcmalloc_env
from mepf_core.openmp import bounded_spin_env

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "prefect.yaml"
POOLS = ("custodian", "gpu")
DEPLOYMENTS = {
    "custodian-release": "custodian-release/default",
    "train-generator": "train-generator/default",
    "sample": "sample/default",
    "evaluate": "evaluate/default",
}
SERVER_START_TIMEOUT_S = 300.0
DEPLOY_TIMEOUT_S = 600.0
STOP_GRACE_S = 20.0
SETTLE_S = 30.0  # for a finished run's process to exit before its worker is stopped
POLL_S = 1.0

logger = logging.getLogger("local_stack")


class StackError(RuntimeError):
    """The stack could not be brought up or a run could not be followed."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP, handled like Ctrl-C."""


# --- arguments ------------------------------------------------------------------------------------

def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1024 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1024..65535, got {value}")
    return value


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a variable name, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="local_stack.py",
        description="Local Prefect stack for DP-MEPF: server, work pools, deployments, workers, and one pipeline run.",
    )
    parser.add_argument("--workdir", type=Path, default=None,
                        help="new or empty folder for outputs, logs and PREFECT_HOME (default runs/local-stack/TIMESTAMP)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny job: 200 private images, 10 training steps, 200 samples, logistic regression only, no FID")
    parser.add_argument("--release", type=Path, default=None,
                        help="existing release file: skip the custodian, train/sample/evaluate from it (no private data needed)")
    parser.add_argument("--rerun", action="store_true",
                        help="after the public stage, retrain once more from the same release into WORKDIR/rerun/run")
    parser.add_argument("--epsilon", type=_positive_float, default=10.0, help="target epsilon of the release (default 10)")
    parser.add_argument("--budget", type=_positive_float, default=None,
                        help="epsilon budget of the dataset in WORKDIR/budget-ledger.jsonl (default: twice --epsilon)")
    parser.add_argument("--port", type=_port, default=None, help="server port (default: a free one)")
    parser.add_argument("--public-env", type=_env_pair, action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the gpu worker and its flow runs (repeatable), e.g. CUDA_VISIBLE_DEVICES=0")
    parser.add_argument("--run-timeout", type=_positive_float, default=None,
                        help="seconds each run may take before the script gives up (default 600 with --tiny, else 14400)")
    parser.add_argument("--ui", action=argparse.BooleanOptionalAction, default=True, help="serve the Prefect UI (default on)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Turn every bad combination into one clear message (exit 2) before anything starts."""
    if not PREFECT_FILE.is_file():
        parser.error(f"{PREFECT_FILE} is missing; run this from a complete checkout")
    if args.workdir is None:
        args.workdir = REPO / "runs" / "local-stack" / time.strftime("%Y%m%d-%H%M%S")
    args.workdir = args.workdir.expanduser().absolute()
    if args.workdir.exists():
        if not args.workdir.is_dir():
            parser.error(f"--workdir {args.workdir} exists and is not a folder")
        if any(args.workdir.iterdir()):
            parser.error(f"--workdir {args.workdir} is not empty; choose a new folder (runs and releases are never overwritten)")
    else:
        parent = next(p for p in args.workdir.parents if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            parser.error(f"--workdir {args.workdir} cannot be created under {parent}")
    if args.release is not None:
        args.release = args.release.expanduser().absolute()
        if not args.release.is_file():
            parser.error(f"--release {args.release} does not exist or is not a file")
        if args.release.suffix not in (".h5", ".hdf5"):
            parser.error(f"--release must be a .h5/.hdf5 release file, got {args.release.name}")
    if args.budget is None:
        args.budget = 2 * args.epsilon
    if args.budget < args.epsilon:
        parser.error(f"--budget {args.budget:g} is below --epsilon {args.epsilon:g}: the release would be refused")
    if args.port is not None and not _port_free(args.port):
        parser.error(f"--port {args.port} is in use on 127.0.0.1")
    if args.run_timeout is None:
        args.run_timeout = 600.0 if args.tiny else 4 * 3600.0


# --- the jobs -------------------------------------------------------------------------------------

# Each stage's parameters: the paths of this stack and --epsilon/--budget, the --tiny job's sizes, and
# otherwise the models' defaults (storage.params; tests/test_params_single_source.py checks it).

def release_params(args: argparse.Namespace, out: Path) -> dict:
    params = {"out": str(out), "target_epsilon": args.epsilon, "ledger": str(args.workdir / "budget-ledger.jsonl"),
              "budget": args.budget}
    if args.tiny:
        params.update(limit=200, neighbouring="replace-one")  # the first N: refused under add-remove
    return params


def train_params(args: argparse.Namespace, release: Path, out: Path) -> dict:
    params = {"release": str(release), "out": str(out), "progress": False}  # no progress bar in a worker's log
    if args.tiny:
        params.update(steps=10, batch_size=80, checkpoint_every=5, eval_samples=100)
    return params  # otherwise TrainParams' defaults, as `mepf train` uses


def sample_params(args: argparse.Namespace, run: Path) -> dict:
    return {"run": str(run), "n": 200 if args.tiny else 10_000}


def evaluate_params(args: argparse.Namespace, run: Path, out: Path) -> dict:
    params = {"run": str(run), "out": str(out)}
    if args.tiny:
        params.update(fid_samples=0, classifiers=["logreg"])
    return params  # otherwise EvaluateParams' defaults, as `mepf evaluate` uses


# --- processes ------------------------------------------------------------------------------------

def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """All living descendants of `pid` (flow-run processes may sit in their own sessions)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, sig: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, sig)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is as good as gone
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path


@dataclass
class Stack:
    """The processes this script started, stopped in reverse order of start (server last)."""

    workdir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        log_path = self.workdir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # own group: we signal it
        child = Child(name, proc, log_path)
        self.children.append(child)
        logger.info("started %s (pid %d), log %s", name, proc.pid, log_path)
        return child

    def stop(self, child: Child, settle: float = 0.0, grace: float = STOP_GRACE_S) -> None:
        """Stop a child: let its own children finish (up to `settle` s), SIGTERM its group, wait `grace` s,
        then SIGKILL the group and any descendant still alive (flow runs sit in their own sessions)."""
        proc = child.proc
        family = _descendants(proc.pid)
        deadline = time.monotonic() + settle
        while any(_alive(pid) for pid in family) and time.monotonic() < deadline:
            time.sleep(0.2)  # a run reported final may still be exiting: don't cut it short
        if proc.poll() is None:
            logger.info("stopping %s (pid %d)", child.name, proc.pid)
            _signal(proc.pid, signal.SIGTERM, group=True)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s: killing it", child.name, grace)
                _signal(proc.pid, signal.SIGKILL, group=True)
                proc.wait()
        _signal(proc.pid, signal.SIGKILL, group=True)  # stragglers of its group, if any
        survivors = [pid for pid in family if _alive(pid)]
        for pid in survivors:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while any(_alive(pid) for pid in survivors) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in survivors:
            if _alive(pid):
                logger.warning("killing leftover process %d of %s", pid, child.name)
                _signal(pid, signal.SIGKILL)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self, settle: float = 0.0) -> None:
        """Workers first (each given `settle` s for its finished runs to exit), the server last."""
        for child in reversed(list(self.children)):
            try:
                self.stop(child, settle=settle if child.name.startswith("worker-") else 0.0)
            except Exception:  # keep going: every other process must still be stopped
                logger.exception("could not stop %s", child.name)

    def check_alive(self, *names: str) -> None:
        for child in self.children:
            if child.name in names and child.proc.poll() is not None:
                raise StackError(f"{child.name} exited with status {child.proc.returncode}; see {child.log}")


def wait_for_health(api_url: str, server: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise StackError(f"the Prefect server exited with status {server.proc.returncode}; see {server.log}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise StackError(f"the Prefect server did not answer {api_url}/health within {timeout:.0f} s; see {server.log}")


def prefect_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


# --- runs -----------------------------------------------------------------------------------------

@dataclass
class RunRecord:
    stage: str
    deployment: str
    flow_run_id: str
    flow_run_name: str
    state: str
    state_name: str
    message: str
    seconds: float


def create_pools() -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        for pool in POOLS:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template), overwrite=True)
            logger.info("work pool %s (process) ready", pool)


def describe_deployments() -> dict:
    """What the server holds for each deployment (pool, pull steps, schedules), for the summary."""
    from prefect.client.orchestration import get_client

    described = {}
    with get_client(sync_client=True) as client:
        for name in DEPLOYMENTS.values():
            dep = client.read_deployment_by_name(name)
            described[name] = {
                "id": str(dep.id),
                "work_pool": dep.work_pool_name,
                "entrypoint": dep.entrypoint,
                "enforce_parameter_schema": dep.enforce_parameter_schema,
                "pull_steps": dep.pull_steps,
                "schedules": [{"slug": s.slug, "active": s.active, "schedule": s.schedule.model_dump(mode="json")}
                              for s in dep.schedules or []],
            }
    return described


def run_deployment_and_wait(stack: Stack, stage: str, params: dict, worker: str, timeout: float) -> RunRecord:
    """Create a run of the stage's deployment and follow it to a final state (watching its worker)."""
    from prefect.client.orchestration import get_client

    deployment = DEPLOYMENTS[stage]
    start = time.monotonic()
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        run = client.create_flow_run_from_deployment(dep.id, parameters={"params": params})
        logger.info("%s: flow run %s (%s) created", deployment, run.name, run.id)
        state = run.state
        while state is None or not state.is_final():
            if time.monotonic() - start > timeout:
                raise StackError(f"{deployment} run {run.name} not finished after {timeout:.0f} s (state {state and state.name})")
            stack.check_alive("server", worker)
            time.sleep(POLL_S)
            run = client.read_flow_run(run.id)
            if run.state is not None and (state is None or run.state.name != state.name):
                logger.info("%s: %s", deployment, run.state.name)
            state = run.state
        record = RunRecord(stage, deployment, str(run.id), run.name, state.type.value, state.name,
                           state.message or "", round(time.monotonic() - start, 1))
        if not state.is_completed():
            _log_run_failure(client, run.id, deployment, state)
    return record


def _log_run_failure(client, flow_run_id, deployment: str, state) -> None:
    logger.error("%s ended %s: %s", deployment, state.name, state.message or "(no message)")
    try:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        for entry in logs[-15:]:
            logger.error("  | %s", entry.message)
    except Exception as exc:  # diagnostics only
        logger.debug("could not read the run's logs: %s", exc)


# --- main -----------------------------------------------------------------------------------------

def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def bring_up_and_run(args: argparse.Namespace, stack: Stack, summary: dict) -> bool:
    workdir = args.workdir
    prefect_home = workdir / "prefect-home"
    prefect_home.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    base = dict(os.environ)
    base.pop("PREFECT_API_KEY", None)
    base.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
                PREFECT_CLI_PROMPT="false")
    base.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
    server_env = {k: v for k, v in base.items() if k != "PREFECT_API_URL"}
    server_env["PREFECT_SERVER_UI_ENABLED"] = "true" if args.ui else "false"
    server_env["PREFECT_UI_API_URL"] = api_url  # the dashboard's browser side calls this (default: port 4200)
    client_env = {**base, "PREFECT_API_URL": api_url}
    summary.update(api_url=api_url, port=port, prefect_home=str(prefect_home))

    server = stack.start("server", prefect_argv("server", "start", "--host", "127.0.0.1", "--port", str(port)), server_env)
    summary["processes"].append({"name": "server", "pid": server.proc.pid})
    os.environ.update(client_env)  # this process's own client talks to the new server (set before importing prefect)
    import prefect.client.orchestration  # noqa: F401  (slow: import while the server starts)
    import prefect.workers.process  # noqa: F401
    wait_for_health(api_url, server, SERVER_START_TIMEOUT_S)
    logger.info("Prefect server up at %s", api_url.removesuffix("/api"))

    create_pools()
    deploy = stack.start("deploy", prefect_argv("deploy", "--all", "--no-prompt", "--prefect-file", str(PREFECT_FILE)),
                         client_env)
    workers = {}
    for pool in POOLS:
        if pool == "custodian" and args.release is not None:
            continue  # rerun without raw data: nothing runs on the custodian's side
        env = {**client_env, **dict(args.public_env)} if pool == "gpu" else client_env
        env = tcmalloc_env(env) or env  # the worker and its flow runs under tcmalloc, as `mepf` runs
        env = bounded_spin_env(dict(env))  # and with the CLI's OpenMP wait (mepf_core/openmp.py)
        workers[pool] = stack.start(f"worker-{pool}", prefect_argv(
            "worker", "start", "--pool", pool, "--type", "process", "--name", f"local-{pool}"), env)
        summary["processes"].append({"name": f"worker-{pool}", "pid": workers[pool].proc.pid})
    try:
        rc = deploy.proc.wait(DEPLOY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise StackError(f"`prefect deploy --all` did not finish within {DEPLOY_TIMEOUT_S:.0f} s; see {deploy.log}") from None
    stack.children.remove(deploy)
    if rc != 0:
        raise StackError(f"`prefect deploy --all` failed with status {rc}; see {deploy.log}")
    summary["deployments"] = describe_deployments()
    logger.info("deployed %s", ", ".join(DEPLOYMENTS.values()))

    def run(stage: str, params: dict, pool: str) -> bool:
        record = run_deployment_and_wait(stack, stage, params, f"worker-{pool}", args.run_timeout)
        summary["runs"].append(record.__dict__)
        return record.state == "COMPLETED"

    if args.release is None:
        release = workdir / "release.h5"
        if not run("custodian-release", release_params(args, release), "custodian"):
            return False
        stack.stop(workers.pop("custodian"), settle=SETTLE_S)  # the public stage needs nothing from the custodian's side
        logger.info("custodian worker stopped: the public stage runs from %s alone", release.name)
    else:
        release = args.release
    summary["release"] = str(release)
    run_dir, report = workdir / "run", workdir / "report"
    summary.update(run=str(run_dir), report=str(report))
    if not (run("train-generator", train_params(args, release, run_dir), "gpu")
            and run("sample", sample_params(args, run_dir), "gpu")
            and run("evaluate", evaluate_params(args, run_dir, report), "gpu")):
        return False
    if args.rerun:
        rerun_dir = workdir / "rerun" / "run"
        summary["rerun"] = str(rerun_dir)
        if not run("train-generator", train_params(args, release, rerun_dir), "gpu"):
            return False
    return True


def print_summary(summary: dict) -> None:
    verdict = "all runs Completed" if summary["ok"] else "FAILED"
    if str(summary.get("error") or "").startswith("interrupted"):
        verdict = "INTERRUPTED"
    lines = ["", f"DP-MEPF local stack: {verdict}"]
    for r in summary["runs"]:
        lines.append(f"  {r['deployment']:<28} {r['state_name']:<10} {r['seconds']:>7.1f} s  {r['flow_run_name']}")
    for key in ("release", "run", "report", "rerun"):
        if summary.get(key) and Path(summary[key]).exists():
            lines.append(f"  {key + ':':<9}{summary[key]}")
    metrics = Path(summary.get("report") or "/nonexistent") / "metrics.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        for row in json.loads(metrics.read_text()):
            if row.get("class_name") is not None:  # class-wise accuracies: see report.md
                continue
            lines.append(f"  {row['metric']}: {row['value']:.4f} (epsilon {row['epsilon']:.4g})")
    if summary.get("error"):
        lines.append(f"  error: {summary['error']}")
    lines.append(f"  logs:    {summary['workdir']}/logs")
    sys.stdout.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    try:  # MEPF_MALLOC, before anything starts (the workers run under tcmalloc_env)
        tcmalloc_env(os.environ)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    args.workdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(args.workdir)
    summary: dict = {"ok": False, "workdir": str(args.workdir), "runs": [], "processes": [], "error": None}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
    status, settle = 1, SETTLE_S
    try:
        summary["ok"] = bring_up_and_run(args, stack, summary)
        status = 0 if summary["ok"] else 1
    except (KeyboardInterrupt, Interrupted) as exc:
        summary["error"] = f"interrupted ({str(exc) or 'SIGINT'})"
        logger.warning("interrupted: stopping everything")
        status, settle = 130, 0.0
    except StackError as exc:
        settle = 0.0
        summary["error"] = str(exc)
        logger.error("%s", exc)
    except Exception as exc:
        settle = 0.0
        summary["error"] = f"{type(exc).__name__}: {exc}"
        logger.exception("unexpected error")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # cleanup is bounded; don't cut it short
            signal.signal(sig, signal.SIG_IGN)
        stack.stop_all(settle=settle)
        (args.workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_summary(summary)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
