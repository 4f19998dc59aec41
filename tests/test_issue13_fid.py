"""Issue 13, evaluation: an FID from too few images is refused unless `--allow-small-fid`, every FID
carries its synthetic and reference counts, and the reference-statistics cache follows the images'
content, not just the folder's path.

Inception is replaced by a cheap stand-in (the first three pixels of each image as its features):
what is tested is the counting, the refusal and the cache key, not Inception.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

import tasks.evaluation
from flows.cli import main
from mepf_core.errors import InvalidArgumentError
from storage.metrics import FID_MIN_SAMPLES
from storage.params import EvaluateParams, PipelineParams
from tests.helpers import cheap_evaluation_run, write_image_folder


def _write_reference(root: Path, seed: int, per_class: int = 6) -> Path:
    """ROOT/test/{a,b}/0.png..: a public test split (its own test/ folder), same names for any seed."""
    write_image_folder(root / "test", per_class=per_class, seed=seed)
    return root


@pytest.fixture
def setup(tmp_path, monkeypatch):
    return {**cheap_evaluation_run(tmp_path, monkeypatch), "reference": _write_reference(tmp_path / "ref", seed=1)}


def _evaluate(s, out: str, *extra: str) -> list[str]:
    return ["evaluate", "--run", str(s["run"]), "--reference", f"imagefolder:{s['reference']}", "--classifiers", "",
            "--out", str(s["tmp"] / out), "--json", *extra]


def test_fid_from_10_images_is_refused_without_the_flag(setup, capsys):
    assert main(_evaluate(setup, "report", "--fid-samples", "10")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "fid_samples 10 is below 2,048" in err and "--allow-small-fid" in err
    assert not (setup["tmp"] / "report").exists() and not setup["cache"].exists()
    with pytest.raises(ValidationError, match="fid_reference 100 is below 2,048"):
        EvaluateParams(run="r", out="o", fid_reference=100)
    assert EvaluateParams(run="r", out="o", fid_samples=0, fid_reference=100).fid_samples == 0  # no FID, no check
    assert EvaluateParams(run="r", out="o", fid_samples=FID_MIN_SAMPLES).fid_samples == 2048


def test_with_the_flag_the_fid_carries_its_counts(setup, capsys):
    assert main(_evaluate(setup, "report", "--fid-samples", "10", "--allow-small-fid")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["fid"] > 0
    assert (result["fid_synthetic_count"], result["fid_reference_count"]) == (10, 12)
    report = setup["tmp"] / "report"
    (row,) = json.loads((report / "metrics.json").read_text())
    assert (row["metric"], row["fid_synthetic_count"], row["fid_reference_count"]) == ("fid", 10, 12)
    (prow,) = pq.read_table(report / "metrics.parquet").to_pylist()
    assert (prow["fid_synthetic_count"], prow["fid_reference_count"]) == (10, 12)
    text = (report / "report.md").read_text()
    assert "(10 synth / 12 ref)" in text and "**Small FID**" in text


def test_counts_actually_available_are_checked_too(setup, capsys):
    """The default fid_samples (5,000) passes the parameters, but the synthetic set holds 20 images."""
    assert main(_evaluate(setup, "report")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "fid_samples 5000 with 20 synthetic images: synthetic count 20 is below 2,048" in err
    assert "--allow-small-fid" in err and not (setup["tmp"] / "report").exists()
    with pytest.raises(InvalidArgumentError, match="reference count 1, but an FID needs at least 2"):
        tasks.evaluation.fid_counts(20, 10, 1, allow_small_fid=True)
    assert tasks.evaluation.fid_counts(5000, 3000, 10000, allow_small_fid=False) == (3000, 10000)


def test_pipeline_quick_defaults_accept_a_small_fid_explicitly():
    assert PipelineParams.model_fields["allow_small_fid"].default is True
    _, _, evaluation = PipelineParams(out_dir="x").stage_params()
    assert evaluation["allow_small_fid"] is True and evaluation["fid_samples"] == 1000
    with pytest.raises(ValidationError, match="fid_samples 1000 is below 2,048"):
        PipelineParams(out_dir="x", allow_small_fid=False).stage_params()


def test_replacing_the_reference_images_in_place_gives_a_new_fid(setup, capsys):
    """Same folder path, same file names and count, other pixels: the cache must not return the old FID."""
    args = ("--fid-samples", "10", "--allow-small-fid")
    assert main(_evaluate(setup, "r1", *args)) == 0
    first = json.loads(capsys.readouterr().out)["metrics"]["fid"]
    assert main(_evaluate(setup, "r1b", *args)) == 0  # unchanged folder: the cached statistics, same FID
    assert json.loads(capsys.readouterr().out)["metrics"]["fid"] == first
    assert len(list(setup["cache"].glob("*.npz"))) == 1

    _write_reference(setup["reference"], seed=7)  # overwrite every file, same names
    assert main(_evaluate(setup, "r2", *args)) == 0
    second = json.loads(capsys.readouterr().out)["metrics"]["fid"]
    assert second != pytest.approx(first)
    assert len(list(setup["cache"].glob("*.npz"))) == 2

    for f in setup["cache"].glob("*.npz"):  # control: a fresh computation agrees with the new FID
        f.unlink()
    assert main(_evaluate(setup, "r3", *args)) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["fid"] == pytest.approx(second)


def test_content_fingerprint_follows_pixels_not_names():
    a = np.zeros((4, 1, 8, 8), np.uint8)
    b = a.copy()
    b[3, 0, 7, 7] = 1
    fp = tasks.evaluation.content_fingerprint
    assert fp(a) == fp(a.copy()) and fp(a) != fp(b) and fp(a) != fp(a.reshape(4, 8, 8, 1))
    assert len(fp(a)) == 16
