"""Budget ledger: refusal, crash consistency, and no overspending under concurrency."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from mepf_core.privacy.calibration import effective_noise_multiplier
from storage.ledger import BudgetExceededError, BudgetLedger, LedgerError, composed_epsilon


def _charge(ledger: BudgetLedger, eps=0.3, rid="r"):
    # a consistent (eps, delta, z), at the default budget delta 1e-5 so the ledger charges exactly eps
    z = effective_noise_multiplier(target_epsilon=eps, target_delta=1e-5)
    return ledger.charge("ds", release_id=rid, epsilon=eps, delta=1e-5, noise_multiplier=z)


def _affordable(eps: float, budget: float) -> int:
    """How many releases of `eps` fit in `budget` under the ledger's composition."""
    z = effective_noise_multiplier(target_epsilon=eps, target_delta=1e-5)
    k = 0
    while composed_epsilon([{"epsilon": eps, "delta": 1e-5, "noise_multiplier": z}] * (k + 1))[0] <= budget:
        k += 1
    return k


def test_refuses_beyond_budget_and_records_nothing(tmp_path):
    ledger = BudgetLedger(tmp_path / "l.jsonl")
    ledger.set_budget("ds", epsilon=1.0)
    _charge(ledger, 0.8, "a")
    before = (tmp_path / "l.jsonl").read_bytes()
    with pytest.raises(BudgetExceededError, match="exceeds the budget"):
        _charge(ledger, 0.8, "b")
    assert (tmp_path / "l.jsonl").read_bytes() == before
    [summary] = ledger.summary()
    assert summary.releases == 1 and summary.spent_epsilon == pytest.approx(0.8)


def test_no_budget_is_refused(tmp_path):
    with pytest.raises(BudgetExceededError, match="has no budget"):
        _charge(BudgetLedger(tmp_path / "l.jsonl"))


def test_budget_cannot_be_changed(tmp_path):
    ledger = BudgetLedger(tmp_path / "l.jsonl")
    ledger.set_budget("ds", epsilon=1.0)
    ledger.set_budget("ds", epsilon=1.0)  # idempotent
    with pytest.raises(LedgerError, match="append-only"):
        ledger.set_budget("ds", epsilon=5.0)
    with pytest.raises(LedgerError, match=r"already has budget \(epsilon 1.0, delta 1e-05\)"):
        ledger.set_budget("ds", epsilon=1.0, delta=1e-6)  # a different delta budget is refused too


def test_joint_composition_is_never_worse_than_the_sum():
    charges = [{"epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 3.7306316351127937}] * 4
    eps, delta = composed_epsilon(charges)
    assert delta == 1e-5  # always evaluated at the (default) budget delta, never at a sum of deltas
    assert eps == pytest.approx(2.3400, abs=1e-4)  # zCDP: rho adds (four charges of an old epsilon-1 ledger)
    assert eps < 4.0  # composing rho at delta 1e-5 beats basic composition even at delta 4e-5


def test_partial_line_from_a_killed_writer_is_dropped(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger = BudgetLedger(path)
    ledger.set_budget("ds", epsilon=1.0)
    with open(path, "ab") as f:
        f.write(b'{"kind": "charge", "dataset_id": "ds", "epsi')  # cut mid-line
    assert ledger.summary()[0].releases == 0
    _charge(ledger)
    lines = path.read_text().splitlines()
    assert all(json.loads(line) for line in lines) and len(lines) == 2


def _worker(path, results):
    ledger = BudgetLedger(path)
    try:
        _charge(ledger, 0.5, f"p{os.getpid()}")
        results.put(True)
    except BudgetExceededError:
        results.put(False)


def test_concurrent_releases_never_overspend(tmp_path):
    path = tmp_path / "l.jsonl"
    BudgetLedger(path).set_budget("ds", epsilon=1.0)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(path, results)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    granted = [results.get(timeout=5) for _ in procs]
    expected = _affordable(0.5, 1.0)
    assert 2 < expected < len(procs)  # joint composition fits more than 2 x 0.5, but not all 8
    assert sum(granted) == expected
    [summary] = BudgetLedger(path).summary()
    assert summary.releases == expected and summary.spent_epsilon <= 1.0


def test_process_killed_after_charge_leaves_a_consistent_ledger(tmp_path):
    """Charge, then SIGKILL before the release is written: the ledger records the charge (never
    less than was released) and stays readable; no release file exists."""
    path = tmp_path / "l.jsonl"
    BudgetLedger(path).set_budget("ds", epsilon=1.0)
    script = textwrap.dedent(f"""
        import os, signal
        from storage.ledger import BudgetLedger
        BudgetLedger({str(path)!r}).charge("ds", release_id="x", epsilon=0.5, delta=1e-6, noise_multiplier=5.0)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd())
    assert proc.returncode == -signal.SIGKILL
    [summary] = BudgetLedger(path).summary()
    # charged by its noise, not its claim: z = 5 is epsilon 0.7943 at the budget delta 1e-5 (zCDP)
    assert summary.releases == 1 and summary.spent_epsilon == pytest.approx(0.7943, abs=1e-4)
    assert not list(tmp_path.glob("*.h5"))
