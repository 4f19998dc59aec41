"""`mepf run --config FILE`: the whole pipeline on a tiny slice of Fashion-MNIST."""

import json
from pathlib import Path

import yaml

from flows.cli import main
from storage.release import read_release
from storage.synthetic import read_synthetic


def test_pipeline_end_to_end(tmp_path, capsys):
    config = {"out_dir": str(tmp_path / "out"), "limit": 300, "neighbouring": "replace-one", "steps": 20, "checkpoint_every": 10,
              "eval_samples": 100, "n_samples": 300, "fid_samples": 100, "fid_reference": 200,
              "classifiers": ["logreg"], "target_epsilon": 5.0}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(tmp_path / "tiny.yaml"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)

    release = read_release(result["release"])
    assert release.metadata.epsilon <= 5.0 and release.metadata.labelled
    assert result["run"]["steps_done"] == 20
    images, labels, meta = read_synthetic(result["samples"]["path"])
    assert images.shape == (300, 1, 28, 28) and images.dtype.name == "uint8"
    assert meta["release_id"] == release.metadata.release_id and meta["epsilon"] == release.metadata.epsilon
    assert sorted(set(labels.tolist())) == list(range(10))
    assert set(result["metrics"]) == {"fid", "acc_logreg"}
    assert result["metrics"]["fid"] > 0 and 0 <= result["metrics"]["acc_logreg"] <= 1
    report = Path(result["report"])
    for name in ("report.md", "metrics.parquet", "metrics.json", "metrics.png"):
        assert (report.parent / name).is_file()

    # the public commands on their own, from the same run: resume, sample to Parquet, evaluate
    run_dir = result["run"]["run_dir"]
    assert main(["train", "--release", result["release"], "--out", run_dir, "--steps", "25", "--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps_done"] == 25
    parquet = tmp_path / "synthetic.parquet"
    assert main(["sample", "--run", run_dir, "--n", "60", "--out", str(parquet), "--json"]) == 0
    capsys.readouterr()
    images, labels, meta = read_synthetic(parquet)
    assert images.shape == (60, 1, 28, 28) and meta["release_id"] == release.metadata.release_id
    assert main(["evaluate", "--run", run_dir, "--synthetic", str(parquet), "--fid-samples", "0",
                 "--classifiers", "logreg", "--out", str(tmp_path / "eval"), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["metrics"]) == {"acc_logreg"}


def test_bad_config_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"out_dir": str(tmp_path / "out"), "target_epsilon": -1}))
    assert main(["run", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "target_epsilon must be a finite number > 0, got -1.0" in capsys.readouterr().err
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"stepz": 5}))
    assert main(["run", "--config", str(tmp_path / "typo.yaml")]) == 2
    assert "stepz" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
