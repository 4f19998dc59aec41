"""The deployments in prefect.yaml, run for real by scripts/local_stack.py (server, pools, workers).

One stack bring-up (the slowest test of the suite, about 1.5-3 minutes on 2 CPU cores) checks:

* the custodian deployment writes a release and the public deployments train, sample and evaluate
  from it, then train again from the same release (the rerun), all ending Completed;
* the public stage never opens the private dataset: the gpu worker and its flow runs get a
  `sitecustomize` that makes `storage.datasets.open_dataset("fashion-mnist", "train")` raise (and an
  empty MEPF_DATA_DIR), and the custodian worker is already stopped when they run;
* every process the script started is gone afterwards and its port is closed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "local_stack.py"
STACK_TIMEOUT_S = 900
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # as in storage.datasets

# Loaded by every Python process of the gpu worker (PYTHONPATH); blocks the private split.
GUARD = textwrap.dedent('''
    """Test guard: the public stage must never open the private dataset (see tests/test_deployments.py)."""
    import importlib.abc
    import json
    import os
    import sys

    _LOG = os.environ.get("MEPF_GUARD_LOG")
    _PRIVATE = {tuple(item.split(":", 1)) for item in os.environ.get("MEPF_GUARD_PRIVATE", "").split(",") if ":" in item}


    def _note(event, **extra):
        if _LOG:
            with open(_LOG, "a") as f:
                f.write(json.dumps({"event": event, "pid": os.getpid(),
                                    "flow_run_id": os.environ.get("PREFECT__FLOW_RUN_ID"), **extra}) + "\\n")


    def _guard(module):
        original = module.open_dataset

        def open_dataset(spec, split="train", root=None):
            if (spec, split) in _PRIVATE:
                _note("blocked", spec=spec, split=split)
                raise RuntimeError(f"private dataset opened: {spec}:{split}")
            return original(spec, split, root)

        module.open_dataset = open_dataset
        _note("armed")


    class _GuardFinder(importlib.abc.MetaPathFinder):
        """Wraps storage.datasets.open_dataset as soon as the module is executed, before anyone imports the name."""

        def find_spec(self, name, path, target=None):
            if name != "storage.datasets":
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    exec_module = spec.loader.exec_module

                    def exec_and_guard(module, _exec=exec_module):
                        _exec(module)
                        _guard(module)

                    spec.loader.exec_module = exec_and_guard
                    return spec
            return None


    sys.meta_path.insert(0, _GuardFinder())
    _note("loaded", argv=sys.argv[:3])
''')


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "outer-prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    return env


def _guard_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    guard_dir = tmp_path / "guard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "guard.jsonl"
    pythonpath = os.pathsep.join(p for p in (str(guard_dir), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": pythonpath, "MEPF_GUARD_LOG": str(log), "MEPF_GUARD_PRIVATE": "fashion-mnist:train"}
    if DEBIAN_FASHION_MNIST.is_dir():  # the public test split is found there: also hide the default data folder
        empty = tmp_path / "no-data"
        empty.mkdir()
        env["MEPF_DATA_DIR"] = str(empty)
    return env, log


def _leftovers(token: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.environ().get("MEPF_STACK_TOKEN") == token:
                found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])[:200]}")
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def test_prefect_yaml_declares_the_four_deployments():
    from prefect.cli.deploy._models import PrefectYamlModel

    config = PrefectYamlModel.model_validate(yaml.safe_load((REPO / "prefect.yaml").read_text()))
    pools = {d.entrypoint: d.work_pool.name for d in config.deployments}
    assert pools == {
        "flows/custodian_release.py:custodian_release": "custodian",
        "flows/train_generator.py:train_generator": "gpu",
        "flows/train_generator.py:sample": "gpu",
        "flows/evaluate.py:evaluate": "gpu",
    }
    assert all(d.enforce_parameter_schema and set(d.parameters) == {"params"} for d in config.deployments)
    assert [next(iter(step)) for step in config.pull] == ["prefect.deployments.steps.set_working_directory"]


def test_local_stack_rejects_bad_arguments_before_starting_anything(tmp_path):
    env = _clean_env(tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something").write_text("x")
    cases = [
        (["--release", str(tmp_path / "missing.h5")], "does not exist"),
        (["--workdir", str(busy)], "is not empty"),
        (["--epsilon", "-1"], "finite number > 0"),
        (["--epsilon", "5", "--budget", "1"], "below --epsilon"),
        (["--public-env", "1BAD=x"], "KEY=VALUE"),
        (["--port", "80"], "1024..65535"),
    ]
    for extra, message in cases:
        result = subprocess.run([sys.executable, str(SCRIPT), "--tiny", *extra], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr, (extra, result.stderr)
    assert not (tmp_path / "missing.h5").exists()


@pytest.mark.slow
def test_local_stack_runs_the_deployments_and_cleans_up(tmp_path):
    workdir = tmp_path / "stack"
    token = uuid.uuid4().hex
    guard, guard_log = _guard_env(tmp_path)
    env = {**_clean_env(tmp_path), "MEPF_STACK_TOKEN": token}

    # positive control, in parallel with the stack: the guard really blocks the private split
    control = subprocess.Popen(
        [sys.executable, "-c", "from storage.datasets import open_dataset; open_dataset('fashion-mnist', 'train')"],
        cwd=tmp_path, env={**_clean_env(tmp_path), **guard, "MEPF_GUARD_LOG": str(tmp_path / "control.jsonl")},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    argv = [sys.executable, str(SCRIPT), "--tiny", "--rerun", "--no-ui", "--workdir", str(workdir)]
    argv += [f"--public-env={key}={value}" for key, value in guard.items()]
    start = time.monotonic()
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=STACK_TIMEOUT_S)
    elapsed = time.monotonic() - start
    _, control_err = control.communicate(timeout=300)

    summary = json.loads((workdir / "summary.json").read_text())
    assert result.returncode == 0, f"{summary.get('error')}\n{result.stdout}\n{result.stderr[-6000:]}"
    print(f"local stack --tiny --rerun took {elapsed:.0f} s")

    # every run Completed, in order
    stages = [(r["deployment"], r["state"]) for r in summary["runs"]]
    assert stages == [("custodian-release/default", "COMPLETED"), ("train-generator/default", "COMPLETED"),
                      ("sample/default", "COMPLETED"), ("evaluate/default", "COMPLETED"),
                      ("train-generator/default", "COMPLETED")]
    assert "all runs Completed" in result.stdout

    # the deployments are the ones prefect.yaml describes
    deployments = summary["deployments"]
    assert {name: d["work_pool"] for name, d in deployments.items()} == {
        "custodian-release/default": "custodian", "train-generator/default": "gpu",
        "sample/default": "gpu", "evaluate/default": "gpu"}
    for d in deployments.values():
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        assert d["enforce_parameter_schema"]
    (nightly,) = deployments["train-generator/default"]["schedules"]
    assert nightly["active"] is False and nightly["schedule"]["cron"] == "30 2 * * *"

    # the custodian wrote a release; the public stage trained, sampled, evaluated and retrained from it
    release = Path(summary["release"])
    assert release == workdir / "release.h5" and release.is_file()
    assert (workdir / "run" / "run.json").is_file() and (workdir / "run" / "synthetic.h5").is_file()
    metrics = json.loads((workdir / "report" / "metrics.json").read_text())
    assert [row["metric"] for row in metrics if row["class_name"] is None] == ["acc_logreg"]
    assert {row["metric"] for row in metrics if row["class_name"] is not None} == {"class_acc_logreg"}
    rerun = json.loads((workdir / "rerun" / "run" / "run.json").read_text())
    assert rerun["steps_done"] == 10 and Path(rerun["release"]["path"]) == release

    # rerun without raw data: every public flow run carried the guard and nothing opened the private split
    events = [json.loads(line) for line in guard_log.read_text().splitlines()]
    assert not [e for e in events if e["event"] == "blocked"], events
    guarded_runs = {e["flow_run_id"] for e in events if e["event"] == "loaded" and e["flow_run_id"]}
    public_runs = {r["flow_run_id"] for r in summary["runs"] if r["deployment"] != "custodian-release/default"}
    assert public_runs <= guarded_runs, (public_runs, guarded_runs)
    assert any(e["event"] == "armed" for e in events)  # evaluate imported storage.datasets under the guard
    custodian_run = summary["runs"][0]["flow_run_id"]
    assert custodian_run not in guarded_runs
    assert control.returncode != 0 and "private dataset opened: fashion-mnist:train" in control_err, control_err

    # nothing left behind: no process carrying this test's token, no listener on the port
    deadline = time.monotonic() + 10
    while (left := _leftovers(token)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left
    assert {p["name"] for p in summary["processes"]} == {"server", "worker-custodian", "worker-gpu"}
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", summary["port"])) != 0
