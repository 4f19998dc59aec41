"""Issue 11, items 2 and 3: the budget is (epsilon, delta) and the relation is part of the account."""

import json

import pytest

from mepf_core.privacy.calibration import effective_noise_multiplier
from storage.ledger import (DEFAULT_BUDGET_DELTA, BudgetExceededError, BudgetLedger, LedgerError,
                            RelationMismatchError, composed_epsilon)

Z1 = effective_noise_multiplier(target_epsilon=1.0, target_delta=1e-5)  # 3.73063, the pinned sigma


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_issue_scenario_large_delta_release_cannot_lower_the_spend(tmp_path):
    """Budget 2: two epsilon-1 releases, one (0.01, 0.3) release, then 40 more epsilon-1 releases.

    Before: spend 1.40 (at the summed delta 2e-5), then 0.108 after the delta-0.3 release, and all 40
    accepted. After: spend is read at the budget delta 1e-5 only, and never drops.
    """
    path = tmp_path / "l.jsonl"
    ledger = BudgetLedger(path)
    ledger.set_budget("ds", epsilon=2.0)
    for rid in ("a", "b"):
        spent = ledger.charge("ds", release_id=rid, epsilon=1.0, delta=1e-5, noise_multiplier=Z1)
    assert spent.spent_delta == 1e-5
    assert spent.spent_epsilon == pytest.approx(1.4600, abs=1e-4)
    # the issue's "1.40" was the same composition read at the summed delta 2e-5
    assert composed_epsilon([{"noise_multiplier": Z1}] * 2, 2e-5)[0] == pytest.approx(1.4016, abs=1e-4)

    z_loose = effective_noise_multiplier(target_epsilon=0.01, target_delta=0.3)
    assert z_loose == pytest.approx(1.94903, abs=1e-4)  # little noise: (0.01, 0.3) is a weak claim
    with pytest.raises(BudgetExceededError, match=r"total epsilon 2.756 at the budget delta 1e-05 exceeds the budget 2"):
        ledger.charge("ds", release_id="loose", epsilon=0.01, delta=0.3, noise_multiplier=z_loose)

    granted, history = [], [ledger.summary()[0].spent_epsilon]
    for i in range(40):
        would_be = composed_epsilon([{"noise_multiplier": Z1}] * (len(granted) + 3))[0]
        try:
            ledger.charge("ds", release_id=f"c{i}", epsilon=1.0, delta=1e-5, noise_multiplier=Z1)
            granted.append(i)
            assert would_be <= 2.0
        except BudgetExceededError:
            assert would_be > 2.0  # refused exactly when it would exceed epsilon 2
        history.append(ledger.summary()[0].spent_epsilon)
    assert granted == [0]  # the third epsilon-1 release fits (1.825), a fourth would spend 2.139
    assert history == sorted(history)  # the reported spend never drops
    [summary] = ledger.summary()
    assert summary.releases == 3 and summary.spent_epsilon == pytest.approx(1.8246, abs=1e-4)
    assert summary.budget_epsilon == 2.0 and summary.budget_delta == DEFAULT_BUDGET_DELTA == 1e-5
    assert summary.remaining_epsilon == pytest.approx(0.1754, abs=1e-4)
    assert [e["release_id"] for e in _lines(path) if e["kind"] == "charge"] == ["a", "b", "c0"]


def test_spend_is_read_at_the_budget_delta(tmp_path):
    ledger = BudgetLedger(tmp_path / "l.jsonl")
    ledger.set_budget("ds", epsilon=3.0, delta=1e-7)
    after = ledger.charge("ds", release_id="a", epsilon=1.0, delta=1e-5, noise_multiplier=Z1)
    # the (1, 1e-5) release read at delta 1e-7: z 4.0451 costs more than its claim
    assert after.spent_delta == 1e-7 and after.spent_epsilon == pytest.approx(1.2459, abs=1e-4)
    assert after.budget_delta == 1e-7 and after.neighbouring == "add-remove"


def test_budget_delta_validation(tmp_path):
    ledger = BudgetLedger(tmp_path / "l.jsonl")
    with pytest.raises(ValueError, match=r"budget_delta must be in \(0, 1\), got 1.5"):
        ledger.set_budget("ds", epsilon=1.0, delta=1.5)
    with pytest.raises(ValueError, match=r"budget_delta must be <= 0.001"):
        ledger.set_budget("ds", epsilon=1.0, delta=0.01)
    with pytest.raises(ValueError, match=r"budget_delta must be >= 2.22507e-308"):
        ledger.set_budget("ds", epsilon=1.0, delta=5e-324)
    with pytest.raises(ValueError, match="budget epsilon must be a finite number > 0, got inf"):
        ledger.set_budget("ds", epsilon=float("inf"))
    assert not (tmp_path / "l.jsonl").exists() or (tmp_path / "l.jsonl").read_bytes() == b""


def test_legacy_budget_line_without_delta_reads_as_the_default(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text(json.dumps({"kind": "budget", "dataset_id": "ds", "epsilon": 2.0, "delta": None, "time": 0}) + "\n")
    ledger = BudgetLedger(path)
    [summary] = ledger.summary()
    assert summary.budget_delta == 1e-5 and summary.spent_delta == 1e-5
    ledger.set_budget("ds", epsilon=2.0)  # same budget (default delta): accepted, nothing appended
    with pytest.raises(LedgerError, match="does not change budgets"):
        ledger.set_budget("ds", epsilon=2.0, delta=1e-6)
    assert len(path.read_text().splitlines()) == 1


def test_mixing_relations_is_refused_and_records_nothing(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger = BudgetLedger(path)
    ledger.set_budget("ds", epsilon=10.0)
    ledger.charge("ds", release_id="ar", epsilon=1.0, delta=1e-5, noise_multiplier=Z1, neighbouring="add-remove")
    before = path.read_bytes()
    with pytest.raises(RelationMismatchError, match="charged under the add-remove relation and this release is replace-one"):
        ledger.charge("ds", release_id="ro", epsilon=1.0, delta=1e-5, noise_multiplier=Z1, neighbouring="replace-one")
    assert issubclass(RelationMismatchError, BudgetExceededError)
    assert path.read_bytes() == before
    [summary] = ledger.summary()
    assert summary.releases == 1 and summary.neighbouring == "add-remove"
    assert [e["neighbouring"] for e in _lines(path) if e["kind"] == "charge"] == ["add-remove"]
    # the same relation still composes normally
    after = ledger.charge("ds", release_id="ar2", epsilon=1.0, delta=1e-5, noise_multiplier=Z1)
    assert after.spent_epsilon == pytest.approx(1.4600, abs=1e-4)
    with pytest.raises(ValueError, match="'both' is not a valid Neighbouring"):
        ledger.charge("ds", release_id="x", epsilon=1.0, delta=1e-5, noise_multiplier=Z1, neighbouring="both")


def test_legacy_charges_never_under_count(tmp_path):
    """Charge lines with no relation: unbounded under add-remove (refused), z / 2 under replace-one."""
    path = tmp_path / "l.jsonl"
    legacy = {"kind": "charge", "dataset_id": "ds", "release_id": "old", "epsilon": 1.0, "delta": 1e-5,
              "noise_multiplier": Z1, "time": 0}
    path.write_text(json.dumps({"kind": "budget", "dataset_id": "ds", "epsilon": 6.0, "delta": None, "time": 0}) + "\n"
                    + json.dumps(legacy) + "\n")
    ledger = BudgetLedger(path)
    [summary] = ledger.summary()
    # replace-one worst case: z 4.0451 / 2 = 2.0226, epsilon 2.1390 at delta 1e-5 (not the 1.0 it claimed)
    assert summary.neighbouring == "unknown" and summary.legacy_charges == 1
    assert summary.spent_epsilon == pytest.approx(2.1390, abs=1e-4)
    with pytest.raises(RelationMismatchError, match="1 charge\\(s\\) recorded without a relation"):
        ledger.charge("ds", release_id="ar", epsilon=1.0, delta=1e-5, noise_multiplier=Z1, neighbouring="add-remove")
    after = ledger.charge("ds", release_id="ro", epsilon=1.0, delta=1e-5, noise_multiplier=Z1, neighbouring="replace-one")
    # composed: 1/z^2 = 4/Z1^2 + 1/Z1^2, z = Z1 / sqrt(5) = 1.8090 -> epsilon 2.4211
    assert after.spent_epsilon == pytest.approx(composed_epsilon([{"noise_multiplier": Z1 / 5 ** 0.5}])[0], rel=1e-9)
    assert after.spent_epsilon == pytest.approx(2.4211, abs=1e-4)
    assert after.neighbouring == "replace-one" and after.releases == 2


def test_charge_validates_its_inputs(tmp_path):
    ledger = BudgetLedger(tmp_path / "l.jsonl")
    ledger.set_budget("ds", epsilon=1.0)
    with pytest.raises(ValueError, match="target_delta must be >= 2.22507e-308"):
        ledger.charge("ds", release_id="x", epsilon=1.0, delta=5e-324, noise_multiplier=Z1)
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number > 0, got nan"):
        ledger.charge("ds", release_id="x", epsilon=1.0, delta=1e-5, noise_multiplier=float("nan"))
    assert ledger.summary()[0].releases == 0
