"""Issue 15: the DPImageBench-style `resnet` classifier and its fixed schedule chosen on selection data,
and the quality bench's row bookkeeping (merge by epsilon/seed/tag, spread over seeds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mepf_core.classifiers import CLASSIFIERS, SmallResNet, downstream_accuracy, resnet_select


def _separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes of 8x8 images: bright left half vs bright right half, with noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.integers(0, 60, size=(n, 1, 8, 8))
    x[y == 0, :, :, :4] += 180
    x[y == 1, :, :, 4:] += 180
    return x.clip(0, 255).astype(np.uint8), y.astype(np.int64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_small_resnet_shapes():
    for blocks, convs in ((1, 1 + 3 * 2 + 2), (3, 1 + 9 * 2 + 2)):  # stem, 2 per block, 2 projections
        model = SmallResNet(1, 10, width=4, blocks=blocks)
        assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
        assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == convs


def test_resnet_is_registered_and_learns_a_separable_task():
    assert "resnet" in CLASSIFIERS
    train_x, train_y = _separable(512, 0)  # 4 batches of 128 per epoch: batch-norm statistics settle
    test_x, test_y = _separable(40, 1)
    accuracy = downstream_accuracy(train_x, train_y, test_x, test_y, classifiers=("resnet",), seed=0)["resnet"]
    assert accuracy >= 0.9


def test_resnet_select_chooses_on_selection_data_only():
    train_x, train_y = _separable(64, 0)
    select_x, select_y = _separable(20, 2)
    test_x, test_y = _separable(30, 3)
    kwargs = dict(num_classes=2, seed=0, lrs=(1e-3, 1e-2), epochs=2, batch_size=16, width=4)
    chosen = resnet_select(train_x, train_y, select_x, select_y, test_x, **kwargs)
    assert set(chosen.select_accuracy) == {(1e-3, 1), (1e-3, 2), (1e-2, 1), (1e-2, 2)}
    best = max(chosen.select_accuracy.values())
    assert chosen.select_accuracy[(chosen.lr, chosen.epoch)] == best
    first_best = next(k for k, v in chosen.select_accuracy.items() if v == best)
    assert (chosen.lr, chosen.epoch) == first_best  # ties: the earlier point of the schedule
    assert chosen.predictions.shape == (30,) and chosen.predictions.dtype == np.int64
    # the test images never influence the choice: other test images, same choice and selection scores
    other = resnet_select(train_x, train_y, select_x, select_y, test_x[::-1].copy(), **kwargs)
    assert (other.lr, other.epoch) == (chosen.lr, chosen.epoch) and other.select_accuracy == chosen.select_accuracy
    assert np.array_equal(other.predictions, chosen.predictions[::-1])
    with pytest.raises(ValueError, match=r"resnet needs images of at least 4x4, got \(2, 2\)"):
        resnet_select(train_x[:, :, :2, :2], train_y, select_x[:, :, :2, :2], select_y, test_x[:, :, :2, :2], **kwargs)


def test_quality_rows_merge_by_epsilon_seed_tag_and_report_the_seed_spread():
    from bench.bench_quality import merge, spread

    old = [{"epsilon": 10.0, "seed": 0, "tag": "defaults", "acc_cnn": 0.7},
           {"epsilon": 10.0, "seed": 1, "tag": "defaults", "acc_cnn": 0.8},
           {"epsilon": "real data (ceiling)", "seed": None, "tag": "defaults", "acc_cnn": 0.9}]
    new = [{"epsilon": 10.0, "seed": 1, "tag": "defaults", "acc_cnn": 0.76},
           {"epsilon": 10.0, "seed": 2, "tag": "defaults", "acc_cnn": 0.74},
           {"epsilon": 10.0, "seed": 0, "tag": "ema", "acc_cnn": 0.5}]
    rows = merge(old, new)
    assert [(r["seed"], r["tag"], r["acc_cnn"]) for r in rows if r["epsilon"] == 10.0] == [
        (0, "defaults", 0.7), (1, "defaults", 0.76), (2, "defaults", 0.74), (0, "ema", 0.5)]
    (summary,) = spread(rows)  # the single-seed "ema" group and the real-data row have no spread
    assert summary["tag"] == "defaults" and summary["seeds"] == [0, 1, 2]
    assert summary["acc_cnn"] == {"mean": 0.7333, "sd": 0.0306, "min": 0.7, "max": 0.76, "n": 3}
