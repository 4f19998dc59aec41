"""`mepf evaluate` with a reference that reads training records (issue 11, item 6): refused without
`--allow-private-reference`; with it, nothing computed from it is cached under the user's home."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.cli import main
from storage.params import EvaluateParams
from tests.helpers import cheap_evaluation_run, write_image_folder


def _folder(root: Path) -> Path:
    return write_image_folder(root, per_class=6, seed=1)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A run with a synthetic set, a fresh HOME, and a cheap stand-in for Inception (the cache is the point)."""
    return cheap_evaluation_run(tmp_path, monkeypatch)


def _evaluate(s, reference: str, *extra: str) -> list[str]:
    return ["evaluate", "--run", str(s["run"]), "--reference", reference, "--classifiers", "",
            "--fid-samples", "20", "--allow-small-fid", "--out", str(s["tmp"] / "report"), "--json", *extra]


def test_private_reference_refused_without_the_flag(setup, capsys):
    private = _folder(setup["tmp"] / "private")  # no test/ subfolder: its "test" split is its training folder
    for reference in (f"imagefolder:{private}", f"imagefolder:{private}:train", "fashion-mnist:train"):
        assert main(_evaluate(setup, reference)) == 2
        err = capsys.readouterr().err
        assert "reads a training split" in err and "--allow-private-reference" in err
    with pytest.raises(ValidationError, match="ceiling trains classifiers on the real training split"):
        EvaluateParams(run="r", out="o", ceiling=True)
    assert EvaluateParams(run="r", out="o", ceiling=True, allow_private_reference=True).ceiling
    assert not setup["cache"].exists() and not (setup["tmp"] / "report").exists()


def test_with_the_flag_nothing_is_cached_but_a_public_split_is(setup, capsys):
    private = _folder(setup["tmp"] / "private")
    assert main(_evaluate(setup, f"imagefolder:{private}", "--allow-private-reference")) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["fid"] > 0
    assert not setup["cache"].exists() and not any(setup["home"].rglob("*.npz"))
    # the control: a real test split (its own test/ folder) is cached where the private one was not
    public = setup["tmp"] / "public"
    _folder(public / "test")
    assert main(_evaluate(setup, f"imagefolder:{public}")) == 0
    assert len(list(setup["cache"].glob("*.npz"))) == 1


# --- containment, not equality (review finding 4) -----------------------------------------------------

def test_the_guard_compares_folders_by_containment(tmp_path, monkeypatch):
    """data/ holds only train/: `imagefolder:data` and `imagefolder:data:test` read data/ (with "train"
    as a class), i.e. the training images. Before: both passed the guard. Now every spelling that
    reads, contains or lies in a training folder is private; a real test split beside it is not."""
    from storage.references import reads_training_records

    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "data" / "train")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    (tmp_path / "trainlink").symlink_to(tmp_path / "data" / "train")
    private = ["imagefolder:data", "imagefolder:data:test", "imagefolder:data/", "imagefolder:./data:test",
               "imagefolder:data/train", "imagefolder:data/train:test", "imagefolder:data:train",
               f"imagefolder:{tmp_path}/data", "imagefolder:elsewhere/../data", "imagefolder:data/train/../",
               "imagefolder:link", "imagefolder:link:test", "imagefolder:trainlink", "imagefolder:data/train/a",
               "imagefolder:link/train/b:test", "fashion-mnist:train"]
    assert [r for r in private if not reads_training_records(r)] == []
    for reference in private[:4]:
        with pytest.raises(ValidationError, match="reads a training split"):
            EvaluateParams(run="r", out="o", reference=reference)
    # a test split of its own beside train/ is public, however spelled (also through the symlink)
    _folder(tmp_path / "data" / "test")
    public = ["imagefolder:data", "imagefolder:data:test", "imagefolder:./data/", "imagefolder:link",
              "imagefolder:elsewhere/../data:test", "fashion-mnist:test", "fashion-mnist"]
    assert [r for r in public if reads_training_records(r)] == []
    # ... unless test/ is (a link to) the training folder
    (tmp_path / "data2").mkdir()
    _folder(tmp_path / "data2" / "train")
    (tmp_path / "data2" / "test").symlink_to(tmp_path / "data2" / "train")
    assert reads_training_records("imagefolder:data2") and reads_training_records("imagefolder:data2:test")


def test_a_contained_reference_is_refused_and_never_cached(setup, capsys, monkeypatch):
    """The reviewer's spellings through the CLI: exit 2 without the flag; with it, nothing cached."""
    monkeypatch.chdir(setup["tmp"])
    _folder(setup["tmp"] / "data" / "train")
    for reference in ("imagefolder:data", "imagefolder:data:test", "imagefolder:data/train/.."):
        assert main(_evaluate(setup, reference)) == 2
        err = capsys.readouterr().err
        assert "reads a training split" in err and "--allow-private-reference" in err
    # (imagefolder:data:test reads data/ with one class, `train`: refused as a label-space mismatch since
    # issue 13; data/train holds the synthetic dataset's classes a, b)
    assert main(_evaluate(setup, "imagefolder:data/train", "--allow-private-reference")) == 0
    capsys.readouterr()
    assert not setup["cache"].exists() and not any(setup["home"].rglob("*.npz"))
