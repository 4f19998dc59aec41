"""Issue 11, items 2 and 3 through `mepf`: delta limits at the parameter boundary, the delta budget,
the relation, and what `mepf budget` shows."""

import json

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from mepf_core.privacy.calibration import effective_noise_multiplier
from storage.ledger import BudgetLedger


def _release(tmp_path, *extra):
    return ["release", "--dataset", "fashion-mnist", "--target-epsilon", "1", "--out", str(tmp_path / "r.h5"),
            "--labelled", *extra]


@pytest.mark.parametrize("flags,message", [
    (("--target-delta", "5e-324"), "target_delta must be >= 2.22507e-308 (the smallest normal double), "
                                   "got 4.94066e-324"),
    (("--target-delta", "1e-309"), "target_delta must be >= 2.22507e-308"),
    (("--target-delta", "0.3"), "target_delta must be <= 0.001"),
    (("--target-delta", "0.5"), "target_delta must be <= 0.001"),
    (("--target-delta", "1.5"), "target_delta must be in (0, 1), got 1.5"),
    (("--ledger", "L.jsonl", "--budget", "2", "--budget-delta", "0.5"), "budget_delta must be <= 0.001"),
    (("--ledger", "L.jsonl", "--budget", "2", "--budget-delta", "5e-324"), "budget_delta must be >= 2.22507e-308"),
    (("--ledger", "L.jsonl", "--budget-delta", "1e-6"), "--budget-delta needs --budget"),
])
def test_delta_out_of_limits_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    assert main(_release(tmp_path, *flags)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert ("target_delta" in err) or ("budget_delta" in err) or ("budget-delta" in err)
    assert not (tmp_path / "r.h5").exists() and list(tmp_path.iterdir()) == []  # no ledger, no release


def test_smallest_normal_delta_is_accepted_at_the_boundary():
    from storage.params import ReleaseParams

    p = ReleaseParams(target_epsilon=1.0, target_delta=2.2250738585072014e-308, out="x.h5")
    assert p.target_delta == 2.2250738585072014e-308
    assert ReleaseParams(target_epsilon=1.0, target_delta=1e-3, out="x.h5").target_delta == 1e-3


def _tiny_folder(root):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / c / f"{i}.png")
    return f"imagefolder:{root}"


def test_add_remove_then_replace_one_on_one_dataset_is_refused(tmp_path, capsys):
    dataset, ledger = _tiny_folder(tmp_path / "data"), tmp_path / "ledger.jsonl"
    common = ["release", "--dataset", dataset, "--dataset-id", "faces", "--target-epsilon", "1", "--labelled",
              "--ledger", str(ledger), "--batch-size", "8", "--json"]
    assert main([*common, "--out", str(tmp_path / "ar.h5"), "--budget", "10", "--budget-delta", "1e-6",
                 "--neighbouring", "add-remove"]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "ro.h5"), "--neighbouring", "replace-one"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # Prefect logs the task failure above it
    assert last.startswith("mepf release: error: RelationMismatchError: dataset 'faces' was charged under the "
                           "add-remove relation and this release is replace-one")
    assert not (tmp_path / "ro.h5").exists()
    charges = [json.loads(x) for x in ledger.read_text().splitlines() if '"charge"' in x]
    assert len(charges) == 1 and charges[0]["neighbouring"] == "add-remove"
    [budget] = [json.loads(x) for x in ledger.read_text().splitlines() if '"budget"' in x]
    assert budget["epsilon"] == 10.0 and budget["delta"] == 1e-6


def test_budget_shows_spend_at_budget_delta_relation_and_remaining(tmp_path, capsys):
    path = tmp_path / "l.jsonl"
    ledger = BudgetLedger(path)
    z = effective_noise_multiplier(target_epsilon=1.0, target_delta=1e-5)
    ledger.set_budget("ds", epsilon=2.0)
    for rid in ("a", "b"):
        ledger.charge("ds", release_id=rid, epsilon=1.0, delta=1e-5, noise_multiplier=z, neighbouring="replace-one")
    assert main(["budget", "--ledger", str(path), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["datasets"]
    assert row["spent_epsilon"] == pytest.approx(1.4600, abs=1e-4) and row["spent_delta"] == 1e-5
    assert row["budget_epsilon"] == 2.0 and row["budget_delta"] == 1e-5
    assert row["neighbouring"] == "replace-one" and row["releases"] == 2 and row["legacy_charges"] == 0
    assert row["remaining_epsilon"] == pytest.approx(0.5400, abs=1e-4)
    assert main(["budget", "--ledger", str(path)]) == 0
    assert capsys.readouterr().out == (
        "ds: spent epsilon 1.4600 at delta 1e-05 in 2 release(s) (replace-one); budget (epsilon 2, delta 1e-05), "
        "remaining epsilon 0.5400\n")
