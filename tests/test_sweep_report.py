"""Issue 14, section 3: class-wise accuracy, `mepf report` over finished runs, `mepf sweep` against one ledger.

Inception is replaced by the cheap stand-in of `tests.helpers.cheap_evaluation_run` (three pixel values
per image): what is tested is what the report and the sweep read, write and charge, not FID.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mepf_core.classifiers as classifiers
from flows.cli import main
from mepf_core.classifiers import ClassifierScore, downstream_accuracy, downstream_scores
from storage.metrics import MetricRow, named_classes, read_metrics_parquet
from storage.report_plots import plot_data
from storage.synthetic import write_synthetic
from tests.helpers import cheap_evaluation_run, write_image_folder

# --- class-wise accuracy ------------------------------------------------------------------------


def test_class_wise_accuracy_of_a_classifier_right_on_class_0_only(monkeypatch):
    """A classifier that always answers 0: right on every test image of class 0, wrong on all others."""
    monkeypatch.setitem(classifiers.CLASSIFIERS, "zero",
                        lambda train_x, train_y, test_x, *, num_classes, seed: np.zeros(len(test_x), np.int64))
    images = np.zeros((7, 1, 4, 4), np.uint8)
    train_y = np.array([0, 1, 2, 3, 0, 1, 2])  # label 3 is never tested: no accuracy for it
    test_y = np.array([0, 0, 1, 1, 1, 2, 0])
    (score,) = downstream_scores(images, train_y, images, test_y, classifiers=("zero",)).values()
    assert score.accuracy == 3 / 7
    assert score.per_class[:3] == (1.0, 0.0, 0.0) and math.isnan(score.per_class[3]) and len(score.per_class) == 4
    assert downstream_accuracy(images, train_y, images, test_y, classifiers=("zero",)) == {"zero": 3 / 7}
    assert named_classes(score.per_class, ["shirt", "shoe"]) == [("shirt", 1.0), ("shoe", 0.0), ("2", 0.0)]
    # a mixed case by hand: class 0 two of three right, class 1 one of two right
    mixed = ClassifierScore.of_predictions(np.array([0, 0, 1, 1, 0]), np.array([0, 0, 0, 1, 1]), 2)
    assert (mixed.accuracy, mixed.per_class) == (3 / 5, (2 / 3, 1 / 2))
    with pytest.raises(ValueError, match=r"predictions must have shape \(5,\)"):
        ClassifierScore.of_predictions(np.zeros(4), np.zeros(5), 2)


def test_overall_accuracy_is_the_mean_of_right_predictions_as_before():
    """The registry now returns predictions; the accuracy is still (predicted == test_y).mean()."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 1, 6, 6), dtype=np.uint8)
    y = np.arange(40) % 2
    x[y == 1] //= 2  # separable by brightness
    scores = downstream_scores(x[:30], y[:30], x[30:], y[30:], classifiers=("logreg",))
    predicted = classifiers.logreg_predictions(x[:30], y[:30], x[30:], num_classes=2, seed=0)
    assert scores["logreg"].accuracy == float((predicted == y[30:]).mean())
    assert classifiers.logreg_accuracy(x[:30], y[:30], x[30:], y[30:], num_classes=2, seed=0) == scores["logreg"].accuracy
    assert scores["logreg"].per_class == tuple(float((predicted[y[30:] == k] == k).mean()) for k in (0, 1))


def test_class_rows_are_validated():
    common = dict(run="r", value=0.5, epsilon=1.0, delta=1e-5, encoder="e", steps=1, release_id="x")
    with pytest.raises(ValueError, match="class_name must be a non-empty string"):
        MetricRow(metric="class_acc_logreg", **common)
    with pytest.raises(ValueError, match="not a class-wise accuracy"):
        MetricRow(metric="acc_logreg", class_name="a", **common)


# --- mepf report ---------------------------------------------------------------------------------


def _evaluated_run(tmp_path: Path, reference: Path, epsilon: float, seed: int, *extra: str) -> Path:
    """DIR/eps-<e>/run/synthetic.h5 (12 images of the reference's shape, labels a/b), evaluated into
    DIR/eps-<e>/report by `mepf evaluate`, as the pipeline lays it out. Returns DIR/eps-<e>."""
    folder = tmp_path / f"eps-{epsilon:g}"
    (folder / "run").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    write_synthetic(folder / "run" / "synthetic.h5", rng.integers(0, 256, (12, 1, 28, 28), dtype=np.uint8),
                    np.arange(12) % 2, {"epsilon": epsilon, "delta": 1e-5, "release_id": f"r{seed}",
                                        "encoder": "efficientnet-lite0", "class_names": ["a", "b"], "steps": 7})
    assert main(["evaluate", "--run", str(folder / "run"), "--reference", f"imagefolder:{reference}:test",
                 "--classifiers", "logreg", "--fid-samples", "10", "--allow-small-fid",
                 "--out", str(folder / "report"), "--json", *extra]) == 0
    return folder


def test_report_rebuilds_the_table_and_plot_from_finished_runs(tmp_path, monkeypatch, capsys):
    cheap_evaluation_run(tmp_path, monkeypatch)  # the stand-in for Inception and a fresh FID cache
    reference = tmp_path / "ref"
    write_image_folder(reference / "test", per_class=5, seed=1)
    write_image_folder(reference / "train", per_class=8, seed=3)
    sweep = tmp_path / "sweep"
    runs = [_evaluated_run(sweep, reference, 2.0, 5, "--ceiling", "--allow-private-reference"),
            _evaluated_run(sweep, reference, 0.5, 6)]
    capsys.readouterr()
    own = {run.name: json.loads((run / "report" / "metrics.json").read_text()) for run in runs}
    assert {r["class_name"] for r in own["eps-2"] if r["metric"] == "class_acc_logreg"} == {"a", "b"}

    # the evaluation folder of one run and the pipeline folder of the other: both are accepted
    assert main(["report", str(runs[0]), str(runs[1] / "report"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    out = sweep / "report"
    assert Path(result["report"]) == out / "report.md"
    rows = read_metrics_parquet(out / "metrics.parquet")
    assert json.loads((out / "metrics.json").read_text()) == json.loads(
        json.dumps([{**r.__dict__} for r in rows]))

    expected = {(label if r["run"] == "run" else r["run"], r["metric"], r["class_name"]): r["value"]
                for label, run_rows in own.items() for r in run_rows}
    assert {(r.run, r.metric, r.class_name): r.value for r in rows} == expected
    assert {r.run for r in rows} == {"eps-2", "eps-0.5", "real-data-ceiling"}
    value = {(r.run, r.metric, r.class_name): r.value for r in rows}

    data = plot_data(rows)
    assert data.accuracy == {"acc_logreg": ((0.5, value[("eps-0.5", "acc_logreg", None)]),
                                            (2.0, value[("eps-2", "acc_logreg", None)]))}
    assert data.accuracy_levels == {"acc_logreg: real-data-ceiling": value[("real-data-ceiling", "acc_logreg", None)]}
    assert data.fid == {"fid (10 synth / 10 ref)": ((0.5, value[("eps-0.5", "fid", None)]),
                                                   (2.0, value[("eps-2", "fid", None)]))}
    wise = data.class_wise["acc_logreg"]
    assert wise.classes == ("a", "b")
    assert wise.runs == {f"epsilon {e}": tuple(value[(f"eps-{e}", "class_acc_logreg", c)] for c in "ab")
                         for e in ("0.5", "2")}
    assert list(wise.runs) == ["epsilon 0.5", "epsilon 2"]  # ordered by epsilon
    assert wise.ceiling == {"real-data-ceiling": tuple(value[("real-data-ceiling", "class_acc_logreg", c)] for c in "ab")}
    with Image.open(out / "metrics.png") as plot:
        assert plot.format == "PNG" and plot.height > plot.width * 0.6  # accuracy/FID row plus a class-wise panel
    text = (out / "report.md").read_text()
    assert "| eps-0.5 | 0.5 |" in text and "## Class-wise accuracy on the real test split" in text
    assert f"| eps-2 | 2 | logreg | {value[('eps-2', 'class_acc_logreg', 'a')]:.4f} |" in text

    # nothing was recomputed: the runs' own files are untouched, and a run without an evaluation is refused
    assert {run.name: json.loads((run / "report" / "metrics.json").read_text()) for run in runs} == own
    (sweep / "eps-9").mkdir()
    assert main(["report", str(runs[0]), str(sweep / "eps-9")]) == 2
    assert "holds no finished evaluation" in capsys.readouterr().err


# --- mepf sweep ----------------------------------------------------------------------------------


def _charges(ledger: Path) -> list[dict]:
    return [line for line in map(json.loads, ledger.read_text().splitlines()) if line["kind"] == "charge"]


def test_sweep_charges_each_release_once_and_reports_the_refused_one(tmp_path, monkeypatch, capsys):
    cheap_evaluation_run(tmp_path, monkeypatch)
    data = tmp_path / "data"
    write_image_folder(data / "train", per_class=6, seed=0)
    write_image_folder(data / "test", per_class=5, seed=1)
    out = tmp_path / "sweep"
    # epsilon 1 and 2 compose to about 2.3 at delta 1e-5: within a budget of 4; epsilon 50 is not
    command = ["sweep", "--epsilons", "1", "2", "50", "--budget", "4", "--out", str(out),
               "--dataset", f"imagefolder:{data}", "--reference", f"imagefolder:{data}:test",
               "--steps", "2", "--batch-size", "4", "--checkpoint-every", "1", "--eval-samples", "8",
               "--n-samples", "10", "--fid-samples", "10", "--classifiers", "logreg", "--device", "cpu",
               "--cells-per-class", "1", "--json"]  # batches of 4 hold 2 classes x 1 cell
    assert main(command) == 0
    result = json.loads(capsys.readouterr().out)

    assert [(e["epsilon"], e["status"]) for e in result["epsilons"]] == [(1.0, "done"), (2.0, "done"),
                                                                       (50.0, "refused")]
    assert "exceeds the budget 4" in result["epsilons"][2]["reason"]
    assert [c["epsilon"] for c in _charges(out / "ledger.jsonl")] == [pytest.approx(1.0), pytest.approx(2.0)]
    assert not (out / "eps-50").exists()
    assert sorted(p.name for p in out.iterdir()) == ["eps-1", "eps-2", "ledger.jsonl", "report", "sweep.json"]

    rows = [r for r in read_metrics_parquet(out / "report" / "metrics.parquet") if r.class_name is None]
    assert sorted((r.run, r.metric) for r in rows) == [("eps-1", "acc_logreg"), ("eps-1", "fid"),
                                                       ("eps-2", "acc_logreg"), ("eps-2", "fid")]
    assert {r.run: r.epsilon for r in rows} == {"eps-1": pytest.approx(1.0, rel=1e-3), "eps-2": pytest.approx(2.0, rel=1e-3)}
    for entry in result["epsilons"][:2]:  # the combined table holds each run's own numbers
        assert {r.metric: r.value for r in rows if r.run == Path(entry["folder"]).name} == entry["metrics"]
    assert "## Refused by the budget" in (out / "report" / "report.md").read_text()
    assert "- epsilon 50: release would spend" in (out / "report" / "report.md").read_text()
    assert (out / "report" / "metrics.png").stat().st_size > 0
    assert json.loads((out / "sweep.json").read_text())["epsilons"] == result["epsilons"]

    # run again: the finished epsilons are reused, not recharged; the refused one is refused again
    assert main(command) == 0
    again = json.loads(capsys.readouterr().out)
    assert [e["status"] for e in again["epsilons"]] == ["reused", "reused", "refused"]
    assert len(_charges(out / "ledger.jsonl")) == 2

    # a sweep stopped after a release (no evaluation yet) continues from that release, charging nothing
    shutil.rmtree(out / "eps-2" / "report")
    assert main(command) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert [e["status"] for e in resumed["epsilons"]] == ["reused", "resumed", "refused"]
    assert set(resumed["epsilons"][1]["metrics"]) == {"fid", "acc_logreg"}
    assert len(_charges(out / "ledger.jsonl")) == 2
