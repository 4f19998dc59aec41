"""Issue 15: the public test split is halved once, deterministically and class-balanced, into a
selection half (choices) and a report half (figures), reachable as `DATASET:test-select` and
`DATASET:test-report` wherever a reference is accepted."""

from __future__ import annotations

import numpy as np
import pytest

from storage.references import (
    SPLIT_SEED,
    TEST_HALVES,
    parse_reference,
    parse_reference_half,
    reads_training_records,
    split_half_indices,
)

# The first records of Fashion-MNIST's test split in the selection half (SPLIT_SEED 15): the split
# must never move, or figures reported before and after a change would be on different images.
EXPECTED_SELECT_HEAD = [0, 2, 3, 4, 8, 9, 12, 13]


def test_parse_reference_halves():
    assert parse_reference_half("fashion-mnist:test-select") == ("fashion-mnist", "test", "test-select")
    assert parse_reference_half("fashion-mnist:test-report") == ("fashion-mnist", "test", "test-report")
    assert parse_reference_half("fashion-mnist:test") == ("fashion-mnist", "test", None)
    assert parse_reference_half("fashion-mnist:train") == ("fashion-mnist", "train", None)
    assert parse_reference_half("mnist") == ("mnist", "test", None)
    assert parse_reference_half("imagefolder:/data/x:test-report") == ("imagefolder:/data/x", "test", "test-report")
    assert parse_reference("fashion-mnist:test-report") == ("fashion-mnist", "test")  # reads the test split
    assert not reads_training_records("fashion-mnist:test-select")
    assert not reads_training_records("fashion-mnist:test-report")


def test_halves_are_disjoint_cover_and_stratified_on_uneven_classes():
    labels = np.repeat(np.arange(4), [7, 10, 1, 4])[np.random.default_rng(3).permutation(22)]
    select = split_half_indices(labels, len(labels), "test-select")
    report = split_half_indices(labels, len(labels), "test-report")
    assert select.dtype == np.int64 and np.all(np.diff(select) > 0) and np.all(np.diff(report) > 0)
    assert np.intersect1d(select, report).size == 0
    assert np.array_equal(np.sort(np.concatenate([select, report])), np.arange(22))
    # per class: floor(n_c / 2) selection, the rest report
    assert np.bincount(labels[select], minlength=4).tolist() == [3, 5, 0, 2]
    assert np.bincount(labels[report], minlength=4).tolist() == [4, 5, 1, 2]
    # stable across calls; without labels one seeded permutation is halved
    assert np.array_equal(select, split_half_indices(labels.copy(), 22, "test-select"))
    unlabelled = split_half_indices(None, 9, "test-select")
    assert len(unlabelled) == 4 and np.array_equal(unlabelled, split_half_indices(None, 9, "test-select"))
    assert len(split_half_indices(None, 9, "test-report")) == 5


def test_bad_half_or_labels_are_refused():
    with pytest.raises(ValueError, match=r"half must be one of \('test-select', 'test-report'\), got 'test-x'"):
        split_half_indices(np.zeros(4, dtype=int), 4, "test-x")
    with pytest.raises(ValueError, match=r"labels must have shape \(5,\), got \(4,\)"):
        split_half_indices(np.zeros(4, dtype=int), 5, "test-select")


def test_fashion_mnist_halves_are_fixed_balanced_and_load_through_the_evaluation_task():
    """Fashion-MNIST's 10,000 test images: 500 + 500 per class, the same records on every call. The
    first indices pin the split: changing SPLIT_SEED or the algorithm changes every reported figure."""
    from tasks.evaluation import load_reference, reference_cache_key

    assert SPLIT_SEED == 15 and TEST_HALVES == ("test-select", "test-report")
    full_x, full_y = load_reference.fn("fashion-mnist:test")
    halves = {h: load_reference.fn(f"fashion-mnist:{h}") for h in TEST_HALVES}
    index = {h: split_half_indices(full_y, len(full_y), h) for h in TEST_HALVES}
    for h, (x, y) in halves.items():
        assert x.shape == (5000, 1, 28, 28) and x.dtype == np.uint8
        assert np.bincount(y, minlength=10).tolist() == [500] * 10
        assert np.array_equal(x, full_x[index[h]]) and np.array_equal(y, full_y[index[h]])
    assert np.intersect1d(index["test-select"], index["test-report"]).size == 0
    assert len(np.union1d(index["test-select"], index["test-report"])) == 10_000
    assert index["test-select"][:8].tolist() == EXPECTED_SELECT_HEAD
    limited_x, limited_y = load_reference.fn("fashion-mnist:test-report", None, 100)
    assert np.array_equal(limited_x, halves["test-report"][0][:100]) and np.array_equal(limited_y, halves["test-report"][1][:100])
    keys = {reference_cache_key(f"fashion-mnist:{h}") for h in (*TEST_HALVES, "test")}
    assert len(keys) == 3  # FID statistics of a half never stand for the whole split's


def test_evaluate_params_accept_the_halves():
    from storage.params import EvaluateParams

    for half in TEST_HALVES:
        params = EvaluateParams(run=".", reference=f"fashion-mnist:{half}", out="report")
        assert params.reference == f"fashion-mnist:{half}" and not params.private_reference

