"""Issue 14, section 2: retries that resume, and a charge that never repeats.

* a training task that fails after a checkpoint is retried by Prefect and resumes (never from step 0);
* a training flow process killed with SIGKILL mid-run, then retried as a Prefect flow run (as the UI's
  "Retry" and a worker do), resumes from its checkpoint and ends at the requested step, checkpoint valid;
* user errors (MepfError) are never retried; transient ones are;
* the task that charges the ledger and writes the release has retries == 0, and a failure after the
  charge leaves exactly one charge and no release.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from prefect import flow

from mepf_core.errors import InvalidArgumentError, PathExistsError
from storage.checkpoints import BEST, LATEST, load_training_checkpoint, read_run_owner
from storage.params import TrainParams
from tests.helpers import lattice_sums, tiny_release

REPO = Path(__file__).resolve().parents[1]
FAST = dict(batch_size=10, eval_samples=10, device="cpu", progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def release_path(tmp_path_factory):
    return tiny_release(tmp_path_factory.mktemp("release") / "tiny.h5")


# --- which failures are retried ----------------------------------------------------------------

def test_only_transient_failures_are_retried():
    from pydantic import ValidationError

    from storage.ledger import BudgetExceededError
    from storage.release import ReleaseClaimError
    from tasks.retries import is_transient

    for exc in (OSError("stale NFS handle"), RuntimeError("CUDA error: out of memory"), MemoryError(),
                TimeoutError(), ConnectionResetError()):
        assert is_transient(exc), exc
    try:
        TrainParams(release="missing.h5", out="o")
    except ValidationError as exc:
        validation = exc
    for exc in (InvalidArgumentError("steps must be > 0"), PathExistsError("run exists"),  # PathExistsError is an OSError
                BudgetExceededError("spent"), ReleaseClaimError("forged"), validation, TypeError("a bug"),
                KeyError("a bug"), None):
        assert not is_transient(exc), exc


def test_task_retry_settings():
    from tasks.custodian import charge_noise_and_release
    from tasks.evaluation import accuracy_task, fid_task, load_reference, load_synthetic
    from tasks.public import load_release_task, sample_task, train_task
    from tasks.retries import TRAIN_RETRIES, transient_failure

    assert train_task.retries == TRAIN_RETRIES >= 1 and train_task.retry_condition_fn is transient_failure
    for t in (sample_task, load_release_task, load_synthetic, load_reference, fid_task, accuracy_task):
        assert t.retries >= 1 and t.retry_condition_fn is transient_failure, t.name
        assert t.timeout_seconds is None, t.name
    assert charge_noise_and_release.retries == 0 and charge_noise_and_release.retry_condition_fn is None


# --- the training task retries by resuming -------------------------------------------------------

def test_a_failure_after_a_checkpoint_is_retried_and_resumes(release_path, tmp_path, monkeypatch):
    import flows.train_generator as flows_train
    import tasks.public as public

    real, seen = public.write_training_state, []

    def fail_once_after_the_first_checkpoint(run_dir, trainer, *args, **kwargs):
        from prefect.runtime import task_run

        real(run_dir, trainer, *args, **kwargs)
        seen.append((task_run.run_count, trainer.step))
        if len(seen) == 1:
            raise RuntimeError("simulated worker fault (a transient kind)")

    monkeypatch.setattr(public, "write_training_state", fail_once_after_the_first_checkpoint)
    monkeypatch.setattr(flows_train, "train_task", public.train_task.with_options(retry_delay_seconds=0))
    out = tmp_path / "run"
    summary = flows_train.train_generator(TrainParams(release=str(release_path), out=str(out), steps=8,
                                                      checkpoint_every=4, **FAST))
    # attempt 1 wrote the checkpoint at step 4 and failed; attempt 2 (run_count 2) resumed at step 4
    assert seen == [(1, 4), (2, 8)]
    assert summary["steps_done"] == 8 and summary["steps_trained"] == 4
    assert load_training_checkpoint(out / LATEST).step == 8
    assert load_training_checkpoint(out / BEST).step in (4, 8)
    assert read_run_owner(out)["flow_run"]


def test_a_user_error_is_not_retried(release_path, tmp_path, monkeypatch):
    """A folder holding another run (no resume): PathExistsError once, no retry, the run untouched."""
    import flows.train_generator as flows_train
    import tasks.public as public

    out = tmp_path / "run"
    public.train_generator(public.read_release(release_path), out, TrainParams(
        release=str(release_path), out=str(out), steps=2, checkpoint_every=2, **FAST).train_config(), progress=False)
    before = (out / LATEST).read_bytes()
    calls = []
    real = public.train_generator
    monkeypatch.setattr(public, "train_generator", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(flows_train, "train_task", public.train_task.with_options(retry_delay_seconds=0))
    with pytest.raises(PathExistsError, match="already holds a training run"):
        flows_train.train_generator(TrainParams(release=str(release_path), out=str(out), steps=4,
                                                checkpoint_every=2, **FAST))
    assert calls == [1] and (out / LATEST).read_bytes() == before


def test_a_retry_never_resumes_a_folder_begun_by_another_flow_run(tmp_path):
    from tasks.public import _resume_on_retry
    from storage.checkpoints import write_run_owner

    class Log:
        def warning(self, *args):
            pass

    (tmp_path / LATEST).write_bytes(b"a checkpoint")
    write_run_owner(tmp_path, {"flow_run": "A", "task_run": "a1"})
    mine, other = {"flow_run": "A", "task_run": "a1"}, {"flow_run": "B", "task_run": "b1"}
    assert _resume_on_retry(str(tmp_path), False, mine, 2, 1, Log())  # a task retry of the run that began it
    assert _resume_on_retry(str(tmp_path), False, {**mine, "task_run": "a2"}, 1, 2, Log())  # a flow-run retry
    assert not _resume_on_retry(str(tmp_path), False, mine, 1, 1, Log())  # a first attempt: the policy refuses
    assert not _resume_on_retry(str(tmp_path), False, other, 2, 2, Log())  # someone else's folder
    assert not _resume_on_retry(str(tmp_path), False, None, 2, 2, Log())  # outside Prefect


# --- SIGKILL of the flow process, then a retry ---------------------------------------------------

TRAIN = """
import sys
from flows.train_generator import train_generator
from storage.params import TrainParams
train_generator(TrainParams(release=sys.argv[1], out=sys.argv[2], steps=int(sys.argv[3]), checkpoint_every=5,
                            batch_size=10, eval_samples=10, device="cpu", progress=False))
"""

# What a worker does for a flow run that is retried (the UI's "Retry" of a crashed run): the run goes to
# AwaitingRetry, and the engine runs the same flow run again with its stored parameters.
RETRY_FLOW_RUN = """
import json, sys, uuid
from prefect.client.orchestration import get_client
from prefect.flow_engine import load_flow_run, run_flow
from prefect.states import AwaitingRetry, Crashed
from flows.train_generator import train_generator
flow_run_id = uuid.UUID(sys.argv[1])
with get_client(sync_client=True) as client:
    client.set_flow_run_state(flow_run_id, Crashed(message="flow process killed"), force=True)
    client.set_flow_run_state(flow_run_id, AwaitingRetry(), force=True)
result = run_flow(train_generator, flow_run=load_flow_run(flow_run_id))
with get_client(sync_client=True) as client:
    run = client.read_flow_run(flow_run_id)
print(json.dumps({"summary": result, "state": run.state.type.value, "run_count": run.run_count}))
"""


@pytest.fixture(scope="module")
def api_env():
    """Environment for child processes: the test session's Prefect API (started once, shared), one thread."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start()
        url = server.api_url
    return {**os.environ, "PREFECT_API_URL": url, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "PREFECT_LOGGING_LEVEL": "WARNING"}


def _train_and_kill(release_path, out: Path, steps: int, env: dict) -> int:
    """Start the training flow in its own process, SIGKILL it once a checkpoint exists; returns its step."""
    proc = subprocess.Popen([sys.executable, "-c", TRAIN, str(release_path), str(out), str(steps)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (out / LATEST).is_file():
            assert proc.poll() is None, f"training exited early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    step = load_training_checkpoint(out / LATEST).step  # the last checkpoint is whole: written atomically
    assert 0 < step < steps
    return step


def test_sigkilled_training_flow_is_retried_and_resumes_to_the_same_final_step(release_path, tmp_path, api_env):
    steps, out = 20, tmp_path / "run"
    killed_at = _train_and_kill(release_path, out, steps, api_env)
    owner = read_run_owner(out)

    # the same flow run, retried: it finds its own folder and resumes without being told to (a new
    # `mepf train` is a new flow run and needs --resume: test_a_user_error_is_not_retried, test_training)
    done = subprocess.run([sys.executable, "-c", RETRY_FLOW_RUN, owner["flow_run"]], cwd=REPO, env=api_env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["state"] == "COMPLETED" and report["run_count"] == 2
    summary = report["summary"]
    assert summary["steps_done"] == steps
    assert summary["steps_trained"] == steps - killed_at  # continued from the checkpoint, not from step 0
    final = load_training_checkpoint(out / LATEST)
    assert final.step == steps and final.config["steps"] == steps
    assert load_training_checkpoint(out / BEST).step <= steps


# --- the charge never repeats --------------------------------------------------------------------

def test_a_failure_after_the_charge_is_not_retried_and_charges_once(tmp_path, monkeypatch):
    import tasks.custodian as custodian
    from mepf_core.encoders import EncoderSpec
    from storage.ledger import BudgetLedger
    from storage.params import ReleaseParams
    from tasks.retries import is_transient

    spec = EncoderSpec("efficientnet-lite0", ("stem",), 32, (0.5,) * 3, (0.5,) * 3, weights_sha256="ab" * 32)
    params = ReleaseParams(target_epsilon=1.0, out=str(tmp_path / "release.h5"), ledger=str(tmp_path / "ledger.jsonl"),
                           budget=10.0, dataset_id="ds", labelled=True)
    writes = []

    def disk_full(*args, **kwargs):  # after the charge and the noise: the write fails with a transient kind
        writes.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(custodian, "embedding_to_release", disk_full)
    assert is_transient(OSError(28, "No space left on device"))  # a retried task would run again

    @flow(name="release-that-fails-after-the-charge")
    def release_flow():
        mechanism = custodian.calibrate(params)
        custodian.check_budget(params, mechanism)
        rng = np.random.default_rng(0)
        sums = lattice_sums(rng.normal(size=(2, 8)), None, np.full(2, 5.0))
        info = {"class_names": ("a", "b"), "image_shape": (1, 28, 28), "encoder": spec}
        return custodian.charge_noise_and_release(params, mechanism, sums, info)

    with pytest.raises(OSError, match="No space left on device"):
        release_flow()
    assert writes == [1]  # one attempt
    [summary] = BudgetLedger(params.ledger).summary()
    assert summary.releases == 1 and summary.spent_epsilon == pytest.approx(1.0, rel=1e-3)
    charges = [json.loads(line) for line in Path(params.ledger).read_text().splitlines() if '"charge"' in line]
    assert len(charges) == 1
    assert not Path(params.out).exists()
