"""Prefect artifacts (issue 14, section 1): builders, progress throttling, embedded report images, and the
evaluate flow's artifacts read back from Prefect.

The browser check (the UI renders the table and the images) is tests/test_ui_browser.py; the custodian
side's artifacts are scanned for private counts in tests/test_no_leaks.py.
"""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from PIL import Image

import tasks.artifacts as artifacts
from storage.metrics import MetricRow, embed_report_images
from storage.provenance import SyntheticInfo


@pytest.fixture
def fake_api(monkeypatch):
    """Record progress values instead of calling Prefect; pretend to be inside a run."""
    calls = []
    monkeypatch.setattr(artifacts, "in_prefect_run", lambda: True)
    monkeypatch.setattr(artifacts, "_create_progress", lambda key, description, p: calls.append(("create", p)) or "id")
    monkeypatch.setattr(artifacts, "_update_progress", lambda artifact_id, p: calls.append(("update", p)) or True)
    return calls


GRID = [10.0 * j for j in range(11)]  # 0, 10, ..., 100


@pytest.mark.parametrize("total", [1, 7, 16, 73, 1000])
@pytest.mark.parametrize("batch", [1, 16, 5000])
def test_extraction_progress_sends_the_same_values_whatever_the_private_count(fake_api, total, batch):
    """Per batch, a percent would move in steps of batch/total (73 images in batches of 16: 5 distinct values,
    ceil(73/16)). Reported: the fixed grid 0, 10, ..., 100, each once, in order, for every count."""
    progress = artifacts.FixedStepProgress("k", "shard 1 of 1")
    done = 0
    while done < total:
        done = min(total, done + batch)
        progress.update(done, total)
    progress.finish()
    assert progress.sent == GRID
    assert [c[1] for c in fake_api] == GRID and fake_api[0][0] == "create"


def test_extraction_progress_of_an_empty_shard_and_a_failed_one(fake_api):
    empty = artifacts.FixedStepProgress("k", "shard 2 of 2")
    empty.update(0, 0)
    assert empty.sent == GRID
    fake_api.clear()
    failed = artifacts.FixedStepProgress("k", "shard 1 of 2")
    failed.update(35, 100)  # then the shard fails: the last value is a grid point, not 35
    assert failed.sent == [0.0, 10.0, 20.0, 30.0]


def test_training_progress_is_throttled(fake_api):
    """10,000 steps, one every 10 ms: at most one update per 2 points and per 2 s, and 100 at the end."""
    clock = iter(np.arange(0, 1000, 0.01)).__next__
    progress = artifacts.RunProgress("k", "training", clock=clock)
    for step in range(10_001):
        progress.fraction(step, 10_000)
    progress.finish()
    sent = progress.sent
    assert sent[0] == 0.0 and sent[-1] == 100.0
    assert np.all(np.diff(sent) >= 2.0) and len(sent) <= 51
    assert len(sent) == len(fake_api) and 40 <= len(sent)  # 100 s of training: about one update per 2 s


def test_progress_outside_a_prefect_run_calls_nothing(monkeypatch):
    def boom(*args):
        raise AssertionError("no artifact call outside a run")

    monkeypatch.setattr(artifacts, "_create_progress", boom)
    progress = artifacts.RunProgress("k", "training")
    progress.fraction(3, 10)
    progress.finish()
    assert progress.sent == [] and artifacts.FixedStepProgress("k", "x").sent == []


def test_a_failing_artifact_api_never_fails_the_work(monkeypatch, caplog):
    monkeypatch.setattr(artifacts, "in_prefect_run", lambda: True)

    def broken(*args, **kwargs):
        raise ConnectionError("server gone")

    import prefect.artifacts

    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", broken)
    monkeypatch.setattr(prefect.artifacts, "create_table_artifact", broken)
    progress = artifacts.RunProgress("k", "training")
    progress.fraction(1, 2)
    progress.finish()
    assert progress.sent == [] and artifacts.publish_metrics_table([{"a": 1}], "d") is None
    assert "server gone" in caplog.text


def _png(path, value: int) -> bytes:
    Image.fromarray(np.full((6, 9), value, np.uint8)).save(path)
    return path.read_bytes()


def test_report_images_become_data_uris_in_the_artifact_only(tmp_path):
    plot, samples = _png(tmp_path / "metrics.png", 10), _png(tmp_path / "samples.png", 200)
    (tmp_path / "fake.png").write_text("not a png")
    (tmp_path.parent / "outside.png").write_bytes(plot)
    md = ("# r\n\n![metrics](metrics.png)\n\n![samples](samples.png \"grid\")\n![x](missing.png)\n"
          "![y](fake.png)\n![z](../outside.png)\n![w](https://example.org/a.png)\n")
    out = embed_report_images(md, tmp_path)
    uris = dict(re.findall(r"!\[(\w+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)", out))
    assert base64.b64decode(uris["metrics"]) == plot and base64.b64decode(uris["samples"]) == samples
    assert '"grid")' in out  # the title kept
    for kept in ("![x](missing.png)", "![y](fake.png)", "![z](../outside.png)", "![w](https://example.org/a.png)"):
        assert kept in out
    assert embed_report_images(md, tmp_path, max_bytes=10).count("data:") == 0  # too large: left a link


def _info(**kw) -> SyntheticInfo:
    return SyntheticInfo(release_id="r-1", epsilon=1.0, delta=1e-5, encoder="efficientnet-lite0",
                         class_names=("a", "b"), steps=5, neighbouring="add-remove", **kw)


def test_metrics_table_rows():
    info = _info()
    rows = [MetricRow.of_synthetic("run", "fid", 56.123456789, info, (1000, 2000)),
            MetricRow.of_synthetic("run", "acc_logreg", 0.75, info),
            MetricRow.of_real_data("real-data-ceiling", "acc_logreg", 0.82)]
    table = artifacts.metrics_table(rows, relation=info.neighbouring)
    assert table[0] == {"run": "run", "metric": "fid", "value": 56.123457, "fid_synthetic_count": 1000,
                        "fid_reference_count": 2000, "epsilon": 1.0, "delta": 1e-5, "relation": "add-remove",
                        "release_id": "r-1"}
    assert table[1]["fid_synthetic_count"] is None and table[1]["relation"] == "add-remove"
    assert table[2]["epsilon"] is None and table[2]["relation"] is None and table[2]["release_id"] is None
    assert all(tuple(r) == artifacts.TABLE_COLUMNS for r in table)
    with pytest.raises(ValueError, match="at least one"):
        artifacts.metrics_table([])


def test_release_summary_shows_public_fields_and_nothing_else():
    released = {"path": "/custodian/secret-folder/release.h5", "release_id": "abc123", "epsilon": 0.99999,
                "delta": 1e-5, "neighbouring": "replace-one", "sigmas": {"moment1": 7.25, "counts": 0.0},
                "shapes": {"moment1": [1, 16960], "counts": [1]}, "signed_by": None,
                "encoder": "efficientnet-lite0", "encoder_weights_sha256": "f" * 64, "n_public": 4242,
                "release_sha256": "e" * 64}
    md = artifacts.release_summary_markdown(released)
    for public in ("abc123", "0.99999", "1e-05", "replace-one", "| moment1 | 1 x 16960 | 7.25 |", "| counts | 1 | 0 |",
                   "efficientnet-lite0", "f" * 64, "e" * 64, "unsigned"):
        assert public in md, public
    assert "4242" not in md and "secret-folder" not in md
    with pytest.raises(KeyError, match="sigmas"):
        artifacts.release_summary_markdown({k: v for k, v in released.items() if k != "sigmas"})


def test_evaluate_flow_publishes_the_table_and_a_report_with_embedded_images(tmp_path, monkeypatch):
    """The evaluate flow, run for real (Prefect's ephemeral server; Inception replaced by the cheap stand-in
    of tests.helpers.cheap_evaluation_run), read back from the API: one table artifact with the FID's
    counts, epsilon, delta, relation and release id, and the report whose images are data URIs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    from flows.evaluate import evaluate
    from storage.params import EvaluateParams
    from tests.helpers import cheap_evaluation_run, write_image_folder

    s = cheap_evaluation_run(tmp_path, monkeypatch)
    write_image_folder(tmp_path / "ref" / "test", per_class=6, seed=1)
    _png(s["run"] / "samples.png", 128)  # a sample grid, as training writes one
    params = EvaluateParams(run=str(s["run"]), reference=f"imagefolder:{tmp_path / 'ref'}", classifiers=("logreg", "mlp"),
                            fid_samples=10, allow_small_fid=True, out=str(tmp_path / "report"))
    state = evaluate(params, return_state=True)
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:  # one task run per classifier: Prefect times each
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert {"downstream-accuracy-logreg", "downstream-accuracy-mlp"} <= {r.name for r in runs}
    found = {a["key"]: a for a in artifacts.artifacts_of_flow_run(state.state_details.flow_run_id)}
    assert {artifacts.METRICS_KEY, artifacts.REPORT_KEY} <= set(found)
    table = {r["metric"]: r for r in found[artifacts.METRICS_KEY]["data"]}
    assert set(table) == {"fid", "acc_logreg", "acc_mlp"}  # headline metrics; per-class rows stay in the files
    assert (table["fid"]["fid_synthetic_count"], table["fid"]["fid_reference_count"]) == (10, 12)
    assert table["acc_logreg"]["epsilon"] == 1.0 and table["acc_logreg"]["release_id"] == "x"
    report = found[artifacts.REPORT_KEY]["data"]
    assert report.count("](data:image/png;base64,") >= 2 and "](metrics.png)" not in report
    assert "](metrics.png)" in (tmp_path / "report" / "report.md").read_text()  # the file keeps its links
