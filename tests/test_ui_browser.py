"""Issue 14: the Prefect UI shows the work, checked in a real browser (headless Chromium via Selenium).

scripts/ui_check.py starts a local Prefect server (free port, its own PREFECT_HOME), runs a tiny
pipeline against it (200 private images, 10 training steps, 200 samples, logistic regression, FID on
200 vs 200 with a cheap stand-in for Inception), and opens the artifact pages as a person would. This
test checks what the browser rendered: the evaluate run's Artifacts tab lists the table and the
report; the table shows the FID row with its counts, the release id and the relation; every image
of the report is decoded (naturalWidth > 0: the data URIs render, no broken image); the release
summary and the training progress (100%) are shown. Then the server is gone and its port closed.
Needs Debian's chromium and chromium-driver (scripts/setup.sh installs them) and selenium (test extra).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.helpers import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_prefect_ui_renders_the_tables_images_summary_and_progress(tmp_path):
    from tasks.artifacts import (EXTRACTION_PROGRESS_KEY, METRICS_KEY, RELEASE_KEY, REPORT_KEY,
                                 TRAINING_PROGRESS_KEY)

    ui_check = load_script("ui_check")
    report = ui_check.run(tmp_path / "ui", cheap_fid=True, screenshot=tmp_path / "montage.png", timeout=600)
    assert report["ok"], report
    assert set(report["flow_runs"]) == {"custodian-release", "train-generator", "sample", "evaluate"}
    assert report["artifacts"] == {RELEASE_KEY: "markdown", EXTRACTION_PROGRESS_KEY: "progress",
                                   TRAINING_PROGRESS_KEY: "progress", METRICS_KEY: "table", REPORT_KEY: "markdown"}
    seen = report["seen"]
    assert seen["table_cells"] >= 2 * 9  # two rows (fid, acc_logreg) of nine columns
    assert len(seen["report_images"]) >= 2 and all(w > 0 for w in seen["report_images"])
    for shot in ("flow_run_tab", "table", "report", "release", "progress"):
        assert (tmp_path / "ui" / "screenshots" / seen[shot]).stat().st_size > 10_000, shot
    assert Path(report["screenshot"]).stat().st_size > 10_000
    port = int(report["ui"].rsplit(":", 1)[1])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # the server was stopped
