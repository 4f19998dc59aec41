"""Issue 13, evaluation: the reference split must describe what the synthetic dataset describes.

Number of classes, class names (in label order) and image shape are compared before any image is
decoded or Inception and the classifiers run; a mismatch is one line naming both sides (exit 2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tasks.evaluation
from flows.cli import main
from storage.references import LabelSpaceMismatchError, check_label_space
from storage.synthetic import write_synthetic
from tests.helpers import cheap_evaluation_run, write_image_folder

TEN = [f"digit-{i}" for i in range(10)]


def _synthetic(run: Path, shape=(3, 32, 32), names=("a", "b")) -> None:
    rng = np.random.default_rng(0)
    (run / "synthetic.h5").unlink(missing_ok=True)
    write_synthetic(run / "synthetic.h5", rng.integers(0, 256, (20, *shape), dtype=np.uint8), np.arange(20) % len(names),
                    {"epsilon": 1.0, "delta": 1e-5, "release_id": "rel-1", "encoder": "efficientnet-lite0",
                     "class_names": list(names), "steps": 1})


@pytest.fixture
def setup(tmp_path, monkeypatch):
    s = cheap_evaluation_run(tmp_path, monkeypatch)

    def tripwire(*args, **kwargs):
        raise AssertionError("Inception or a classifier ran before the label spaces were compared")

    monkeypatch.setattr(tasks.evaluation, "images_to_inception_activations", tripwire)
    monkeypatch.setattr(tasks.evaluation, "downstream_scores", tripwire)
    return s


def _refused(s, reference: str, capsys) -> str:
    capsys.readouterr()
    code = main(["evaluate", "--run", str(s["run"]), "--reference", reference, "--fid-samples", "10",
                 "--allow-small-fid", "--classifiers", "logreg", "--out", str(s["tmp"] / "report")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "LabelSpaceMismatchError" in err and "rel-1" in err and reference in err
    assert not (s["tmp"] / "report").exists() and not s["cache"].exists()
    return err


def test_ten_classes_against_a_three_class_reference_is_refused(setup, capsys):
    _synthetic(setup["run"], names=TEN)
    ref = write_image_folder(setup["tmp"] / "ref" / "test", classes=("a", "b", "c"), per_class=2).parent
    err = _refused(setup, f"imagefolder:{ref}", capsys)
    assert "has 10 classes ['digit-0'" in err and "has 3 ['a', 'b', 'c']" in err


def test_same_count_different_names_is_refused(setup, capsys):
    _synthetic(setup["run"], names=("cat", "dog"))
    ref = write_image_folder(setup["tmp"] / "ref" / "test", classes=("car", "dog"), per_class=2).parent
    err = _refused(setup, f"imagefolder:{ref}", capsys)
    assert "label 0: 'cat' vs 'car'" in err and "['cat', 'dog']" in err and "['car', 'dog']" in err


def test_a_reference_of_another_shape_is_refused_not_resized(setup, capsys):
    from storage.datasets import FASHION_CLASSES

    _synthetic(setup["run"], shape=(3, 32, 32), names=FASHION_CLASSES)
    err = _refused(setup, "fashion-mnist:test", capsys)
    assert "holds 3x32x32 images" in err and "fashion-mnist:test holds 1x28x28" in err


def test_matching_spaces_pass_and_a_folder_is_read_at_the_synthetic_shape(tmp_path):
    from storage.datasets import FASHION_CLASSES

    check_label_space("fashion-mnist:test", FASHION_CLASSES, (1, 28, 28), FASHION_CLASSES, (1, 28, 28))
    check_label_space("fashion-mnist:test", FASHION_CLASSES, (1, 28, 28), None, (1, 28, 28))  # unlabelled: shape only
    with pytest.raises(LabelSpaceMismatchError, match="1x28x28 images.*holds 3x32x32"):
        check_label_space("imagefolder:x", ("a",), (3, 32, 32), None, (1, 28, 28))
    # an image folder reference is decoded as the release decoded its folder: at the synthetic shape
    ref = write_image_folder(tmp_path / "ref" / "test", per_class=2, size=(20, 20)).parent
    for shape in ((1, 28, 28), (3, 64, 64)):
        images, labels = tasks.evaluation.load_reference.fn(f"imagefolder:{ref}", synthetic_shape=shape,
                                                            synthetic_classes=("a", "b"))
        assert images.shape == (4, *shape) and labels.tolist() == [0, 0, 1, 1]
