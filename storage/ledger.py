"""Persistent, append-only privacy budget ledger (one JSON object per line), per dataset id.

Lines are of two kinds: {"kind": "budget", "dataset_id", "epsilon", "delta"} sets a dataset's total
budget once; {"kind": "charge", "dataset_id", "release_id", "epsilon", "delta",
"noise_multiplier", "time"} records one release. Every read-check-append happens under an
exclusive `flock`, and a charge is fsynced BEFORE the release file is written, so two processes
never overspend and a crash can only leave the ledger recording more than was released.

Spending across releases is the tighter of (a) basic composition, sum of epsilons, and (b) the
exact composition of all releases' Gaussian mechanisms (autodp) at delta = the sum of their deltas.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mepf_core.privacy.calibration import epsilon_spent


class BudgetExceededError(Exception):
    """The release would spend more than the dataset's remaining budget."""


class LedgerError(Exception):
    """The ledger is unreadable or inconsistent."""


@dataclass(frozen=True)
class DatasetBudget:
    dataset_id: str
    budget_epsilon: float | None
    budget_delta: float | None
    spent_epsilon: float
    spent_delta: float
    releases: int

    @property
    def remaining_epsilon(self) -> float | None:
        return None if self.budget_epsilon is None else max(self.budget_epsilon - self.spent_epsilon, 0.0)

    def as_dict(self) -> dict:
        return {**self.__dict__, "remaining_epsilon": self.remaining_epsilon}


def composed_epsilon(charges: list[dict]) -> tuple[float, float]:
    """(epsilon, delta) spent by these charges together."""
    if not charges:
        return 0.0, 0.0
    delta = sum(c["delta"] for c in charges)
    basic = sum(c["epsilon"] for c in charges)
    if delta >= 1:
        return basic, delta
    exact = epsilon_spent([c["noise_multiplier"] for c in charges], delta=delta)
    return min(basic, exact), delta


class BudgetLedger:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"ledger folder {self.path.parent} does not exist")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[object]:
        with open(self.path, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield f
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def _entries(f) -> list[dict]:
        f.seek(0)
        data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line cut by a crash never got its release
        entries = []
        for lineno, line in enumerate(complete.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                raise LedgerError(f"ledger line {lineno} is not valid JSON") from None
        return entries

    @staticmethod
    def _append(f, entry: dict) -> None:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size:
            f.seek(0)
            data = f.read()
            keep = data.rfind(b"\n") + 1
            if keep != size:  # drop a partial line left by a killed writer
                f.truncate(keep)
        f.seek(0, os.SEEK_END)
        f.write(json.dumps(entry, sort_keys=True).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())

    def _summary(self, entries: list[dict], dataset_id: str) -> DatasetBudget:
        budgets = [e for e in entries if e["kind"] == "budget" and e["dataset_id"] == dataset_id]
        charges = [e for e in entries if e["kind"] == "charge" and e["dataset_id"] == dataset_id]
        eps, delta = composed_epsilon(charges)
        b = budgets[0] if budgets else {}
        return DatasetBudget(dataset_id, b.get("epsilon"), b.get("delta"), eps, delta, len(charges))

    def set_budget(self, dataset_id: str, *, epsilon: float, delta: float | None = None) -> None:
        """Set a dataset's total budget once; setting a different one later is refused."""
        if not (epsilon > 0):
            raise ValueError(f"budget epsilon must be > 0, got {epsilon}")
        with self._locked() as f:
            current = self._summary(self._entries(f), dataset_id)
            if current.budget_epsilon is None:
                self._append(f, {"kind": "budget", "dataset_id": dataset_id, "epsilon": float(epsilon),
                                 "delta": delta, "time": time.time()})
            elif current.budget_epsilon != float(epsilon):
                raise LedgerError(
                    f"dataset {dataset_id!r} already has budget epsilon {current.budget_epsilon}; "
                    f"the ledger is append-only and does not change budgets (asked for {epsilon})"
                )

    def charge(self, dataset_id: str, *, release_id: str, epsilon: float, delta: float,
               noise_multiplier: float, record: bool = True) -> DatasetBudget:
        """Record a release's cost, or raise BudgetExceededError and record nothing.

        With record=False only checks that it would fit (used before extraction starts).
        """
        with self._locked() as f:
            entries = self._entries(f)
            before = self._summary(entries, dataset_id)
            if before.budget_epsilon is None:
                raise BudgetExceededError(
                    f"dataset {dataset_id!r} has no budget in ledger {self.path}; set one with --budget"
                )
            charge = {"kind": "charge", "dataset_id": dataset_id, "release_id": release_id,
                      "epsilon": float(epsilon), "delta": float(delta),
                      "noise_multiplier": float(noise_multiplier), "time": time.time()}
            after = self._summary(entries + [charge], dataset_id)
            over_delta = before.budget_delta is not None and after.spent_delta > before.budget_delta
            if after.spent_epsilon > before.budget_epsilon + 1e-12 or over_delta:
                raise BudgetExceededError(
                    f"release would spend epsilon {epsilon:.4g} (delta {delta:.2g}) on dataset {dataset_id!r}: "
                    f"total epsilon {after.spent_epsilon:.4g} (delta {after.spent_delta:.2g}) exceeds the budget "
                    f"{before.budget_epsilon:.4g} (delta {before.budget_delta}); already spent {before.spent_epsilon:.4g}"
                )
            if record:
                self._append(f, charge)
            return after

    def summary(self) -> list[DatasetBudget]:
        if not self.path.exists():
            return []
        with self._locked() as f:
            entries = self._entries(f)
        ids = sorted({e["dataset_id"] for e in entries})
        return [self._summary(entries, i) for i in ids]
