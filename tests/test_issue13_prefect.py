"""Issue 13: a Prefect API that cannot be reached, and an ephemeral server that does not start in
time, end a `mepf` command with one line naming the setting (exit 2), before anything is written
or charged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _mepf(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PREFECT_HOME": str(cwd / "prefect-home"), "PREFECT_LOGGING_LEVEL": "WARNING", **env}
    full.pop("PREFECT_API_URL", None) if "PREFECT_API_URL" not in env else None
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=600)


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture
def custodian(tmp_path):
    data = _folder(tmp_path / "data")
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text("")  # an existing (empty) ledger: it must stay byte-identical
    out = tmp_path / "release.h5"
    args = ["release", "--dataset", f"imagefolder:{data}", "--target-epsilon", "1", "--labelled",
            "--out", str(out), "--ledger", str(ledger)]
    return {"args": args, "out": out, "ledger": ledger, "tmp": tmp_path}


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_release_with_an_unreachable_server_is_one_line_and_writes_nothing(custodian):
    before = custodian["ledger"].read_bytes()
    proc = _mepf(custodian["args"], custodian["tmp"], PREFECT_API_URL="http://127.0.0.1:9/api")
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert line.startswith("mepf release: error: CliError: the Prefect API at PREFECT_API_URL=http://127.0.0.1:9/api "
                           "cannot be reached")
    assert "unset PREFECT_API_URL" in line and "prefect server start" in line
    assert not custodian["out"].exists() and custodian["ledger"].read_bytes() == before
    assert proc.stdout == ""


def test_train_with_an_unreachable_server_is_one_line_and_writes_nothing(tmp_path):
    release = tmp_path / "release.h5"
    release.write_bytes(b"placeholder: the check comes before the flow opens it")
    out = tmp_path / "run"
    proc = _mepf(["train", "--release", str(release), "--out", str(out), "--steps", "1"], tmp_path,
                 PREFECT_API_URL="http://127.0.0.1:9/api")
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert line.startswith("mepf train: error: CliError: the Prefect API at PREFECT_API_URL=") and "unset" in line
    assert not out.exists()


def test_ephemeral_server_start_up_timeout_is_one_line_naming_the_setting(custodian):
    before = custodian["ledger"].read_bytes()
    proc = _mepf(custodian["args"], custodian["tmp"], PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert line.startswith("mepf release: error: CliError: the temporary Prefect server did not start within "
                           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=0 s")
    assert "export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=300" in line
    assert not custodian["out"].exists() and custodian["ledger"].read_bytes() == before


def test_a_user_error_inside_a_subflow_is_one_line_without_prefects_tracebacks(tmp_path):
    """`mepf run` into a folder that already holds a release: the custodian subflow refuses it. Prefect
    logs the failure of the subflow and of the pipeline flow with tracebacks; on the console (records
    that reach the CLI's own handler, as under `mepf run`) the command's one line says it, and -v shows
    the tracebacks. Before: two 20-line tracebacks above the line."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "release.h5").write_bytes(b"not overwritten")
    quiet = _mepf(["run", "--out-dir", str(out), "--steps", "10"], tmp_path, PREFECT_LOGGING_LEVEL="INFO")
    assert quiet.returncode == 2, quiet.stderr
    assert "Traceback" not in quiet.stderr and "Finished in state Failed" not in quiet.stderr, quiet.stderr
    errors = [line for line in quiet.stderr.splitlines() if line.startswith("mepf run: error:")]
    assert errors == [f"mepf run: error: OutputExistsError: {out / 'release.h5'} already exists; releases are never "
                      "overwritten, choose another --out"]
    verbose = _mepf(["-v", "run", "--out-dir", str(out), "--steps", "10"], tmp_path, PREFECT_LOGGING_LEVEL="INFO")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    assert (out / "release.h5").read_bytes() == b"not overwritten"
