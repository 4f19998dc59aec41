"""Metrics tables, the markdown report with its plot, and the FID reference-statistics cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from storage import metrics
from storage.metrics import (
    MetricRow,
    load_or_compute_reference_stats,
    read_metrics_parquet,
    reference_stats_path,
    write_report,
)


def _rows():
    rows = []
    for run, eps, fid, acc in [("eps1", 1.0, 60.0, 0.70), ("eps10", 10.0, 45.0, 0.75), ("nonpriv", None, 40.0, 0.76)]:
        common = dict(run=run, epsilon=eps, delta=1e-5, encoder="lite0", steps=4000, release_id=f"r-{run}")
        rows += [MetricRow(metric="fid", value=fid, fid_synthetic_count=5000, fid_reference_count=10000, **common),
                 MetricRow(metric="acc_logreg", value=acc, **common),
                 MetricRow(metric="acc_mlp", value=acc - 0.01, **common)]
    return rows


def test_report_over_several_runs(tmp_path):
    grid = tmp_path / "grid.png"
    Image.new("RGB", (20, 10), "white").save(grid)
    report = write_report(tmp_path / "out", _rows(), sample_grid_png=grid)
    out = report.parent
    assert report == out / "report.md"

    table = read_metrics_parquet(out / "metrics.parquet")
    assert table == _rows()
    import pyarrow.parquet as pq

    assert pq.read_table(out / "metrics.parquet").column_names == list(metrics.COLUMNS)
    as_json = json.loads((out / "metrics.json").read_text())
    assert len(as_json) == 9 and as_json[0] == {"run": "eps1", "metric": "fid", "value": 60.0, "epsilon": 1.0,
                                                "delta": 1e-5, "encoder": "lite0", "steps": 4000,
                                                "release_id": "r-eps1", "fid_synthetic_count": 5000,
                                                "fid_reference_count": 10000, "class_name": None}
    assert as_json[1]["fid_synthetic_count"] is None and as_json[1]["metric"] == "acc_logreg"
    assert [(r.fid_synthetic_count, r.fid_reference_count) for r in table if r.metric == "fid"] == [(5000, 10000)] * 3
    text = report.read_text()
    for needle in ["| eps10 | 10 |", "| nonpriv | non-private |", "45.0000 (5,000 synth / 10,000 ref)", "0.7500", "acc_mlp",
                   "![metrics](metrics.png)", "![samples](samples.png)"]:
        assert needle in text, needle
    with Image.open(out / "metrics.png") as plot:
        assert plot.format == "PNG" and plot.width > 500
    assert (out / "samples.png").read_bytes() == grid.read_bytes()
    assert not [p for p in out.iterdir() if p.suffix == ".tmp"]


def test_report_for_one_run_accepts_dict_rows(tmp_path):
    rows = [{"run": "solo", "metric": "fid", "value": 12.5, "epsilon": 2.0, "delta": 1e-6,
             "encoder": "vgg19", "steps": 10, "release_id": "r1", "fid_synthetic_count": 10, "fid_reference_count": 200}]
    report = write_report(tmp_path, rows)
    text = report.read_text()
    assert "12.5000 (10 synth / 200 ref)" in text and "samples" not in text
    assert "**Small FID**: solo/fid used fewer than 2,048 images" in text
    assert (tmp_path / "metrics.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"value": float("nan")}, "must be finite"),
        ({"epsilon": 0.0}, "epsilon of r must be positive or None, got 0.0"),
        ({"run": ""}, "non-empty"),
        ({"fid_synthetic_count": None}, "r/fid needs fid_synthetic_count and fid_reference_count"),
        ({"fid_reference_count": 1}, r"integers >= 2, got \(2048, 1\)"),
        ({"metric": "acc_mlp"}, "acc_mlp is not an FID: its fid counts must be None"),
    ],
)
def test_bad_rows_are_rejected(change, message):
    row = dict(run="r", metric="fid", value=1.0, epsilon=1.0, delta=1e-5, encoder="e", steps=1, release_id="x",
               fid_synthetic_count=2048, fid_reference_count=2048)
    with pytest.raises(ValueError, match=message):
        MetricRow(**{**row, **change})


def test_duplicate_and_malformed_rows_are_rejected(tmp_path):
    rows = _rows()
    with pytest.raises(ValueError, match="duplicate metric 'fid' for run 'eps1'"):
        write_report(tmp_path, rows + rows[:1])
    with pytest.raises(ValueError, match="needs exactly"):
        write_report(tmp_path, [{"run": "r", "metric": "fid", "value": 1.0}])
    with pytest.raises(ValueError, match="at least one metric"):
        write_report(tmp_path, [])


def test_reference_stats_are_computed_once_then_read(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.arange(3.0), np.eye(3) * 2

    key = "fashion-mnist/train/gray->rgb,bilinear299"
    mu, sigma = load_or_compute_reference_stats(key, compute, cache_dir=tmp_path)
    mu2, sigma2 = load_or_compute_reference_stats(key, compute, cache_dir=tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    files = [p.name for p in tmp_path.iterdir()]
    assert files == [reference_stats_path(key, tmp_path).name] and files[0].endswith(".npz")
    assert reference_stats_path("other", tmp_path) != reference_stats_path(key, tmp_path)


def test_reference_stats_cache_dir_follows_env_and_recovers_from_corruption(tmp_path, monkeypatch):
    monkeypatch.setenv("MEPF_CACHE_DIR", str(tmp_path))
    path = reference_stats_path("k")
    assert path.parent == tmp_path / "fid"
    path.parent.mkdir()
    path.write_bytes(b"not an npz")
    mu, _ = load_or_compute_reference_stats("k", lambda: (np.ones(2), np.eye(2)))
    np.testing.assert_array_equal(mu, np.ones(2))
    with np.load(path) as data:
        assert str(data["key"]) == "k"


def test_reference_stats_reject_bad_statistics(tmp_path):
    with pytest.raises(ValueError, match=r"need mu \(d,\) and sigma \(d, d\)"):
        load_or_compute_reference_stats("k", lambda: (np.ones(2), np.eye(3)), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="key must be a non-empty string"):
        load_or_compute_reference_stats("", lambda: (np.ones(2), np.eye(2)), cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_rows_take_provenance_from_the_synthetic_file_not_defaults():
    from storage.provenance import SyntheticInfo

    info = SyntheticInfo(release_id="r1", epsilon=2.0, delta=1e-5, encoder="lite0", class_names=None, steps=300)
    row = MetricRow.of_synthetic("run", "fid", 12, info, fid_counts=(1000, 10000))
    assert (row.epsilon, row.delta, row.encoder, row.steps, row.release_id, row.value) == (2.0, 1e-5, "lite0", 300, "r1", 12.0)
    assert (row.fid_synthetic_count, row.fid_reference_count) == (1000, 10000)
    ceiling = MetricRow.of_real_data("real-data-ceiling", "acc_mlp", 0.9)
    assert (ceiling.epsilon, ceiling.release_id, ceiling.steps) == (None, "", 0)
