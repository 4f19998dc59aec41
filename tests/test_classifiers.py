"""Downstream classifiers reach sane accuracy on real Fashion-MNIST and reject bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from mepf_core.classifiers import CLASSIFIERS, downstream_accuracy, resnet9_accuracy

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _idx_images(path: Path, n: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]


def _idx_labels(path: Path, n: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    return np.frombuffer(data, np.uint8, offset=8).astype(np.int64)[:n]


@pytest.fixture(scope="module")
def fashion():
    """3,000 train and 1,000 test images of Fashion-MNIST (Debian's dataset-fashion-mnist)."""
    return (
        _idx_images(FASHION / "train-images-idx3-ubyte.gz", 3000),
        _idx_labels(FASHION / "train-labels-idx1-ubyte.gz", 3000),
        _idx_images(FASHION / "t10k-images-idx3-ubyte.gz", 1000),
        _idx_labels(FASHION / "t10k-labels-idx1-ubyte.gz", 1000),
    )


@pytest.fixture(scope="module")
def fashion_accuracy(fashion):
    return downstream_accuracy(*fashion, classifiers=("logreg", "mlp", "cnn"), seed=0)


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn"])
def test_classifier_trained_on_real_fashion_mnist_is_sane(fashion_accuracy, name):
    # Seen when written (3k train / 1k test, seed 0): logreg 0.822, mlp 0.841, cnn 0.832.
    assert fashion_accuracy[name] > 0.7, f"{name} accuracy {fashion_accuracy[name]:.3f}"


def test_training_is_deterministic_and_leaves_caller_rng_alone(fashion):
    train_x, train_y, test_x, test_y = (a[:400] for a in fashion)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = downstream_accuracy(train_x, train_y, test_x, test_y, classifiers=("cnn", "mlp"), seed=7)
    assert torch.equal(torch.rand(3), expected_next), "classifier training consumed the caller's RNG"
    second = downstream_accuracy(train_x, train_y, test_x, test_y, classifiers=("cnn", "mlp"), seed=7)
    assert first == second


def test_resnet9_learns_a_separable_rgb_task():
    # Class = which colour channel is bright; trivially separable, so a working net gets ~100%.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=480)
    images = rng.integers(0, 80, size=(480, 3, 32, 32)).astype(np.uint8)
    images[np.arange(480), labels] += 150
    # 3 epochs of 12 steps: enough for batch-norm running statistics to settle (1.0 seen for seeds 0-4).
    accuracy = resnet9_accuracy(images[:360], labels[:360], images[360:], labels[360:], num_classes=3,
                                seed=0, epochs=3, batch_size=32, width=8)
    assert accuracy > 0.9


def test_registry_names_the_five_classifiers():
    assert set(CLASSIFIERS) == {"logreg", "mlp", "cnn", "resnet9", "resnet"}


def _ok():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 1, 8, 8), dtype=np.uint8)
    return images, np.arange(20) % 2, images.copy(), np.arange(20) % 2


def test_unknown_classifier_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown classifier\(s\) \['svm'\]; known: \['cnn', 'logreg', 'mlp', 'resnet', 'resnet9'\]"):
        downstream_accuracy(*_ok(), classifiers=("logreg", "svm"))
    with pytest.raises(ValueError, match="at least one"):
        downstream_accuracy(*_ok(), classifiers=())


@pytest.mark.parametrize(
    ("position", "value", "message"),
    [
        (0, np.zeros((20, 1, 8, 8), np.float32), "train_images must be a uint8"),
        (0, np.zeros((20, 2, 8, 8), np.uint8), "C in"),
        (2, np.zeros((20, 1, 9, 9), np.uint8), "differ in C x H x W"),
        (2, np.zeros((0, 1, 8, 8), np.uint8), "test_images must hold at least one image, got 0"),
        (1, np.arange(19) % 2, r"train_labels must have shape \(20,\)"),
        (3, -(np.arange(20) % 2), "test_labels must be non-negative, got -1"),
        (1, np.zeros(20, np.int64), "at least 2 classes, got 1"),
        (1, np.linspace(0, 1, 20), "train_labels must be integers"),
    ],
)
def test_bad_input_is_rejected(position, value, message):
    args = list(_ok())
    args[position] = value
    with pytest.raises(ValueError, match=message):
        downstream_accuracy(*args, classifiers=("logreg",))
