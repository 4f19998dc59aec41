"""Issue 14: `mepf evaluate --run RUN` on a run that was never sampled draws RUN/synthetic.h5 from the
run's best checkpoint (n = what the evaluation uses, the seed recorded), and reuses an existing set.

Inception is replaced by a cheap stand-in (the first three pixels of each image), as in
tests/test_issue13_fid.py: what is tested is which images are evaluated, not Inception.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tasks.evaluation
from flows.cli import main
from mepf_core.training import TrainConfig
from storage.checkpoints import BEST, load_training_checkpoint
from storage.params import EvaluateParams
from storage.release import read_release
from storage.synthetic import read_synthetic_dataset
from tests.helpers import tiny_release, write_image_folder


@pytest.fixture
def trained_run(tmp_path, monkeypatch):
    """A 4-step run of a 2-class release (no synthetic set), a public test split of 2 x 6 images, a
    fresh HOME (FID cache) and the Inception stand-in."""
    from tasks.public import train_generator

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEPF_CACHE_DIR", raising=False)
    monkeypatch.setattr(tasks.evaluation, "load_fid_inception", lambda device: None)
    monkeypatch.setattr(tasks.evaluation, "images_to_inception_activations",
                        lambda model, images, device, progress: np.asarray(images, np.float64).reshape(len(images), -1)[:, :3])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared cores: numbers, not speed, are tested
    release = read_release(tiny_release(tmp_path / "release.h5"))
    run = tmp_path / "run"
    train_generator(release, run, TrainConfig(steps=4, batch_size=10, checkpoint_every=2, eval_samples=10,
                                              device="cpu"), progress=False)
    reference = write_image_folder(tmp_path / "ref" / "test", per_class=6, seed=1).parent
    yield {"run": run, "reference": reference, "tmp": tmp_path}
    torch.set_num_threads(threads)


def _evaluate(s, out: str, *extra: str) -> list[str]:
    return ["evaluate", "--run", str(s["run"]), "--reference", f"imagefolder:{s['reference']}", "--classifiers",
            "logreg", "--allow-small-fid", "--out", str(s["tmp"] / out), "--json", *extra]


def test_samples_to_draw_is_what_the_evaluation_uses():
    assert EvaluateParams(run="r", out="o").samples_to_draw == 10_000  # classifiers on "all": the default
    assert EvaluateParams(run="r", out="o", fid_samples=3000, train_samples=500).samples_to_draw == 3000
    assert EvaluateParams(run="r", out="o", fid_samples=0, train_samples=700).samples_to_draw == 700
    assert EvaluateParams(run="r", out="o", classifiers="", fid_samples=2500).samples_to_draw == 2500
    assert EvaluateParams(run="r", out="o", draw_samples=50).samples_to_draw == 50


def test_evaluate_draws_a_missing_set_then_reuses_it(trained_run, capsys):
    s, synthetic = trained_run, trained_run["run"] / "synthetic.h5"
    assert not synthetic.exists()
    # the first evaluation draws max(fid_samples 30, train_samples 100) = 100 images with seed 3
    assert main(_evaluate(s, "r1", "--fid-samples", "30", "--train-samples", "100", "--seed", "3")) == 0
    first = json.loads(capsys.readouterr().out)
    data = read_synthetic_dataset(synthetic)
    best = load_training_checkpoint(s["run"] / BEST)
    assert data.images.shape == (100, 1, 28, 28) and np.bincount(data.labels).tolist() == [50, 50]
    assert (data.info.seed, data.info.checkpoint, data.info.steps) == (3, BEST, best.step)
    assert first["fid_synthetic_count"] == 30 and 0 <= first["metrics"]["acc_logreg"] <= 1

    # a second evaluation reuses the set as it is, even when it asks for more (FID then uses all 100)
    before = synthetic.read_bytes()
    assert main(_evaluate(s, "r2", "--fid-samples", "200", "--draw-samples", "500", "--seed", "4")) == 0
    second = json.loads(capsys.readouterr().out)
    assert synthetic.read_bytes() == before
    assert second["fid_synthetic_count"] == 100


def test_a_named_synthetic_file_that_is_missing_is_an_error_not_a_draw(trained_run, capsys):
    s = trained_run
    missing = s["tmp"] / "elsewhere.h5"
    assert main(_evaluate(s, "r", "--fid-samples", "30", "--synthetic", str(missing))) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "elsewhere.h5 does not exist" in err
    assert not missing.exists() and not (s["run"] / "synthetic.h5").exists()


def test_an_untrained_run_is_refused_with_the_reason(trained_run, capsys):
    s = {**trained_run, "run": trained_run["tmp"] / "never-trained"}
    s["run"].mkdir()
    assert main(_evaluate(s, "r", "--fid-samples", "30")) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoint" in err and "train first" in err
