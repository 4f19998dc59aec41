"""The audit extracts D and D' the way a release does, so it sees a record-selection fault.

`mepf audit` writes D and D' as image folders and sums them with `tasks.custodian.shard_sums`; D'
also holds a hidden Jupyter copy of the canary (`.ipynb_checkpoints/0000-canary-checkpoint.png`).
With the release's record rule the copy is no record and D' moves every sum by one record. With a
listing that counts hidden files (the fault of issue 11, item 1) the canary counts twice: the
release claims sensitivity C while the data move by 2C, and the audit must fail at epsilon 1 and 10.
"""

from __future__ import annotations

import pytest
import torch

import storage.datasets
from storage.datasets import open_dataset
from tasks.audit import CANARY, run_audit, write_image_folder


def test_the_audit_folders_hold_a_hidden_copy_that_is_no_record(tmp_path):
    images = torch.rand(3, 1, 28, 28)
    spec = write_image_folder(tmp_path, images, torch.tensor([0, 1, 1]), ["a.png", "b.png", CANARY],
                              hidden_copies=(2,))
    assert (tmp_path / "class-1" / ".ipynb_checkpoints" / "0000-canary-checkpoint.png").is_file()
    source = open_dataset(spec)
    assert len(source) == 3 and source.class_names == ("class-0", "class-1")
    with pytest.raises(ValueError, match="one label and one name per image"):
        write_image_folder(tmp_path, images, torch.tensor([0, 1]), ["a.png", "b.png", "c.png"])


def _count_hidden_files(monkeypatch):
    """The fault: a listing for which no name is hidden (.ipynb_checkpoints/ is read like any folder)."""
    monkeypatch.setattr(storage.datasets, "is_hidden_name", lambda name: False)


@pytest.mark.parametrize("epsilon", [1.0, 10.0])
def test_a_hidden_copy_counted_doubles_the_sensitivity_and_fails_the_audit(monkeypatch, epsilon):
    _count_hidden_files(monkeypatch)
    report = run_audit(target_epsilon=epsilon, broken=False)
    # the canary is summed twice: the data move by 2C and 2 counts against claimed sensitivities 1 and 1
    assert report["movement"]["moment1"]["moved"] == pytest.approx(2.0, rel=1e-5)  # the lattice keeps a norm-C record to within about a step of 2^20 (1e-6)
    assert report["movement"]["counts"]["moved"] == pytest.approx(2.0, rel=1e-9)
    assert not report["within_sensitivity"]
    assert report["shift"] == pytest.approx(2 * report["shift_bound"], rel=1e-5)
    # the white-box check measures the doubled shift from the draws alone, and refutes the claim
    white = report["white_box"]
    assert not white["pass"] and white["ci"][0] > white["allowed_shift"]
    assert white["noise_std"] == pytest.approx(1.0, rel=0.05)  # the noise is right; the data moved too far
    assert white["implied_epsilon_ci"][0] > report["claimed_epsilon"]
    assert not report["pass"]


def test_without_the_fault_the_same_folders_pass(monkeypatch):
    """Control for the test above, cheap: the record rule leaves the hidden copy out."""
    report = run_audit(target_epsilon=1.0, draws=200, broken=False)
    assert report["movement"]["moment1"]["moved"] == pytest.approx(1.0, rel=1e-5)  # the lattice keeps a norm-C record to within about a step of 2^20 (1e-6)
    assert report["within_sensitivity"] and report["pass"]
