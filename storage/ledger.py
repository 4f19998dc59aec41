"""Persistent, append-only privacy budget ledger (one JSON object per line), per dataset id.

Lines are of two kinds:
  {"kind": "budget", "dataset_id", "epsilon", "delta", "time"} sets a dataset's total budget, the
    pair (epsilon, delta), once. Lines written before budgets had a delta hold "delta": null and
    read as DEFAULT_BUDGET_DELTA.
  {"kind": "charge", "dataset_id", "release_id", "epsilon", "delta", "noise_multiplier",
    "neighbouring", "time"} records one release: its own (epsilon, delta), for information, its
    effective noise multiplier z = sigma / sensitivity (what the account uses), and its neighbouring
    relation ("add-remove" or "replace-one").
Every read-check-append happens under an exclusive `flock`, and a charge is fsynced BEFORE the
release file is written, so two processes never overspend and a crash can only leave the ledger
recording more than was released.

Accounting (why epsilon at the budget delta is a valid guarantee, whatever each release's delta)
-----------------------------------------------------------------------------------------------
Every release is a Gaussian mechanism: all its parts are sums with L2 sensitivity Delta_k under the
release's relation, noised with sigma_k, so it is ONE Gaussian mechanism with effective multiplier
z = (sum_k (sigma_k / Delta_k)^-2)^-1/2. A Gaussian mechanism is not "(epsilon, delta)" for one
pair: it satisfies (epsilon, delta(epsilon)) for EVERY epsilon >= 0 at once, where delta(.) is its
privacy profile, delta(eps) = Phi(1/(2z) - eps z) - e^eps Phi(-1/(2z) - eps z) (Balle & Wang 2018,
Thm 8; autodp ExactGaussianMechanism). The delta a release was calibrated at only picks the point
of that curve it reports; the mechanism, and so the privacy loss, is fixed by z alone.
Releases of one dataset compose (adaptively) to a Gaussian mechanism with 1/z^2 = sum_r 1/z_r^2
(the composition of Gaussian mechanisms is exactly Gaussian: Dong, Roth & Su 2019, mu-GDP with
mu = 1/z; autodp ComposeGaussian), which again satisfies (eps, delta(eps)) for every eps. Reading
the composed curve at delta = the budget's delta gives eps* with (eps*, delta_budget)-DP for all
releases together, which is what we compare with the budget epsilon. Consequences:
  * no delta is summed, and no release's own delta enters the account, so a release calibrated at
    a large delta is charged for the noise it really has (a small z costs a large eps* at the
    budget delta) and cannot make the reported spend drop;
  * adding a release only lowers the composed z, so spent epsilon never decreases;
  * the exact composition is never looser than basic composition (sum of epsilons at the sum of
    deltas), because the Gaussian profile is the tightest guarantee of the composed mechanism.

Relations. Sensitivities, and so z, are relative to one neighbouring relation, and the composition
above is only valid for releases of one relation. A dataset's relation is that of its first charge;
a charge of the other relation is refused (RelationMismatchError), never converted.
Charge lines written before relations were recorded (no "neighbouring" key) are counted by the one
rule that never under-counts: their relation is unknown, so
  * under replace-one they are charged at z / 2. A replace-one pair D, D' = D - x + x' is two
    add-remove steps (D -> D - x -> D'), so each part's mean moves by at most 2 Delta_add-remove
    (per part: sums 2C vs C, labelled counts sqrt 2 <= 2 x 1, unlabelled counts 0 <= 2); a release
    with add-remove multiplier z has replace-one multiplier >= z / 2, and one with replace-one
    multiplier z has z >= z / 2. Either way z / 2 over-counts or is exact.
  * under add-remove they cannot be bounded at all (a replace-one unlabelled release publishes n
    exactly, which add-remove must noise), so an add-remove release on such a dataset is refused.
  A dataset holding only legacy charges reports relation "unknown" and its replace-one spend.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mepf_core.privacy.calibration import MAX_TARGET_DELTA, epsilon_spent, validate_delta
from mepf_core.privacy.sensitivity import Neighbouring

# Default delta budget of a dataset (probability, no unit): the same as the default target_delta of
# one release (ReleaseParams.target_delta), so with the defaults a single release's reported epsilon
# is exactly what the ledger charges; keep it below 1/n (n = number of records).
DEFAULT_BUDGET_DELTA = 1e-5

ADD_REMOVE, REPLACE_ONE = Neighbouring.ADD_REMOVE.value, Neighbouring.REPLACE_ONE.value
UNKNOWN = "unknown"  # only legacy charges (no relation recorded)
MIXED = "mixed"  # both relations recorded: only possible in a hand-edited ledger; spend is infinite


class BudgetExceededError(Exception):
    """The release would spend more than the dataset's remaining budget."""


class RelationMismatchError(BudgetExceededError):
    """The release's neighbouring relation differs from the one the dataset's charges were made under."""


class LedgerError(Exception):
    """The ledger is unreadable or inconsistent."""


@dataclass(frozen=True)
class DatasetBudget:
    """One dataset's account. Epsilons are spent at `spent_delta`, which is always the budget delta
    (DEFAULT_BUDGET_DELTA when no budget is set); `neighbouring` is "add-remove", "replace-one",
    "unknown" (legacy charges only), "mixed" (hand-edited ledger) or None (no charge yet)."""

    dataset_id: str
    budget_epsilon: float | None
    budget_delta: float | None
    spent_epsilon: float
    spent_delta: float
    releases: int
    neighbouring: str | None = None
    legacy_charges: int = 0

    @property
    def remaining_epsilon(self) -> float | None:
        return None if self.budget_epsilon is None else max(self.budget_epsilon - self.spent_epsilon, 0.0)

    def as_dict(self) -> dict:
        return {**self.__dict__, "remaining_epsilon": self.remaining_epsilon}


def composed_epsilon(charges: list[dict], delta: float = DEFAULT_BUDGET_DELTA) -> tuple[float, float]:
    """(epsilon, delta) of the exact composition of these charges' Gaussian mechanisms, at `delta`.

    Uses only each charge's "noise_multiplier" (autodp ComposeGaussian + analytic Gaussian; see the
    module docstring); no relation handling here, the ledger converts legacy charges first.
    """
    if not charges:
        return 0.0, delta
    return epsilon_spent([c["noise_multiplier"] for c in charges], delta=delta, name="budget_delta"), delta


def _account(charges: list[dict], delta: float) -> tuple[float, str | None, int]:
    """(spent epsilon at `delta`, relation, number of legacy charges) under the module's relation rule."""
    legacy = [c for c in charges if c.get("neighbouring") is None]
    known = {c["neighbouring"] for c in charges if c.get("neighbouring") is not None}
    if not charges:
        return 0.0, None, 0
    if len(known) > 1:
        return math.inf, MIXED, len(legacy)
    relation = known.pop() if known else UNKNOWN
    if legacy and relation == ADD_REMOVE:
        return math.inf, relation, len(legacy)  # legacy charges are unbounded under add-remove
    zs = [{"noise_multiplier": c["noise_multiplier"] / 2 if c.get("neighbouring") is None else c["noise_multiplier"]}
          for c in charges]  # legacy: the replace-one worst case, z / 2
    return composed_epsilon(zs, delta)[0], relation, len(legacy)


def _positive(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _budget_delta(line: dict) -> float:
    return DEFAULT_BUDGET_DELTA if line.get("delta") is None else float(line["delta"])


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
        b = budgets[0] if budgets else {}
        delta = _budget_delta(b)
        eps, relation, legacy = _account(charges, delta)
        return DatasetBudget(dataset_id, b.get("epsilon"), delta if b else None, eps, delta, len(charges),
                             relation, legacy)

    def set_budget(self, dataset_id: str, *, epsilon: float, delta: float | None = None) -> None:
        """Set a dataset's total budget (epsilon, delta) once; setting a different one later is refused.

        `delta` defaults to DEFAULT_BUDGET_DELTA (1e-5) and must lie in [MIN_DELTA, MAX_TARGET_DELTA].
        """
        if not _positive(epsilon):
            raise ValueError(f"budget epsilon must be a finite number > 0, got {epsilon}")
        delta = DEFAULT_BUDGET_DELTA if delta is None else validate_delta(delta, name="budget_delta",
                                                                          cap=MAX_TARGET_DELTA)
        with self._locked() as f:
            current = self._summary(self._entries(f), dataset_id)
            if current.budget_epsilon is None:
                self._append(f, {"kind": "budget", "dataset_id": dataset_id, "epsilon": float(epsilon),
                                 "delta": delta, "time": time.time()})
            elif current.budget_epsilon != float(epsilon) or current.budget_delta != delta:
                raise LedgerError(
                    f"dataset {dataset_id!r} already has budget (epsilon {current.budget_epsilon}, delta "
                    f"{current.budget_delta:g}); the ledger is append-only and does not change budgets "
                    f"(asked for epsilon {epsilon}, delta {delta:g})"
                )

    def charge(self, dataset_id: str, *, release_id: str, epsilon: float, delta: float,
               noise_multiplier: float, neighbouring: Neighbouring | str = Neighbouring.ADD_REMOVE,
               record: bool = True) -> DatasetBudget:
        """Record a release's cost, or raise BudgetExceededError (RelationMismatchError) and record nothing.

        `epsilon` and `delta` are the release's own claim, kept for information; the account uses
        `noise_multiplier` (z = sigma / sensitivity, unitless) and `neighbouring` (the relation the
        sensitivities were derived for; the default is the project's default relation, add-remove).
        With record=False only checks that it would fit (used before extraction starts).
        """
        relation = Neighbouring(neighbouring).value  # ValueError on anything but the two relations
        if not _positive(epsilon):
            raise ValueError(f"charge epsilon must be a finite number > 0, got {epsilon}")
        validate_delta(delta, name="target_delta")
        if not _positive(noise_multiplier):
            raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier}")
        with self._locked() as f:
            entries = self._entries(f)
            before = self._summary(entries, dataset_id)
            if before.budget_epsilon is None:
                raise BudgetExceededError(
                    f"dataset {dataset_id!r} has no budget in ledger {self.path}; set one with --budget"
                )
            if before.neighbouring in (ADD_REMOVE, REPLACE_ONE, MIXED) and before.neighbouring != relation:
                raise RelationMismatchError(
                    f"dataset {dataset_id!r} was charged under the {before.neighbouring} relation and this release "
                    f"is {relation}; releases of one dataset must use one relation (their epsilons do not compose "
                    f"across relations), so use --neighbouring {before.neighbouring}"
                )
            if before.legacy_charges and relation == ADD_REMOVE:
                raise RelationMismatchError(
                    f"dataset {dataset_id!r} has {before.legacy_charges} charge(s) recorded without a relation; "
                    f"they cannot be bounded under add-remove (a replace-one release may publish n exactly), "
                    f"so only replace-one releases (which count them at half their noise multiplier) are accepted"
                )
            charge = {"kind": "charge", "dataset_id": dataset_id, "release_id": release_id,
                      "epsilon": float(epsilon), "delta": float(delta), "noise_multiplier": float(noise_multiplier),
                      "neighbouring": relation, "time": time.time()}
            after = self._summary(entries + [charge], dataset_id)
            if not after.spent_epsilon <= before.budget_epsilon + 1e-12:
                raise BudgetExceededError(
                    f"release would spend epsilon {epsilon:.4g} (delta {delta:.2g}, {relation}) on dataset "
                    f"{dataset_id!r}: total epsilon {after.spent_epsilon:.4g} at the budget delta "
                    f"{after.spent_delta:.2g} exceeds the budget {before.budget_epsilon:.4g}; already spent "
                    f"{before.spent_epsilon:.4g}"
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
