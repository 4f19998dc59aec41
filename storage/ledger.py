"""Persistent, append-only privacy budget ledger (one JSON object per line), per dataset id.

Lines are of two kinds:
  {"kind": "budget", "dataset_id", "epsilon", "delta", "source", "time"} sets a dataset's total
    budget, the pair (epsilon, delta), once. Lines written before budgets had a delta hold
    "delta": null and read as DEFAULT_BUDGET_DELTA.
  {"kind": "charge", "dataset_id", "release_id", "epsilon", "delta", "noise_multiplier",
    "neighbouring", "source", "time"} records one release: its own (epsilon, delta), for information,
    its effective noise multiplier z = sigma / sensitivity (what the account uses), and its
    neighbouring relation ("add-remove" or "replace-one").
"dataset_id" names the budget (the custodian's --dataset-id, else the canonical id); "source"
describes the records read (storage.datasets.dataset_source): `imagefolder:` + the real path of the
folder read, `idx:sha256:HEX` for MNIST-format files (the SHA-256 of the decompressed image file, so
one set of images is one source whatever its folder, file name, compression or dataset name), else
`NAME:SPLIT`.

One set of records, one budget
------------------------------
The epsilon of a budget only means something if no record is charged to two budgets. So, under the
ledger's lock, a charge (or a new budget) whose source OVERLAPS the source of any line of ANOTHER
dataset id is refused with DatasetOverlapError, which names the dataset id already holding those
records (pass --dataset-id THAT to charge it):
  * imagefolder sources overlap when their paths are equal or one is an ancestor of the other
    (os.path.commonpath): `imagefolder:` reads every image under each class folder, so a parent folder
    holds all records of its children, and a child folder is a subset of its parent. This covers a
    parent and a child folder, `imagefolder:data` split train (reads data/train) against split test
    without data/test (reads data, with "train" as a class), and --dataset-id X against the default
    id of the same folder. Sibling folders (data/train, data/test) do not overlap.
  * any other sources overlap when they are equal strings.
Charging the same source under the same dataset id composes, as always; charging different sources
under one dataset id (--dataset-id) composes them under one budget, which only over-counts.
Not detected (paths and hashes are all the ledger sees): a copy of an image folder elsewhere, files
reached through hard links or bind mounts from another folder (paths differ), a subset of an idx file
saved as a new file (hashes differ).

Lines written before sources were recorded (no "source" key) get one inferred from their dataset id:
  * `imagefolder:PATH:train|test` (the previous code's key: the spec as spelled + ":" + split, when no
    folder has that literal name): the real path of the folder that split of PATH reads now
    (storage.datasets.imagefolder_root); `imagefolder:PATH` (canonical ids written before sources):
    the real path of PATH.
  * A relative PATH (e.g. `imagefolder:data:train`) was relative to a working directory the ledger
    never recorded. It is resolved against the current working directory (the likeliest one: a
    custodian runs releases from one place) when that folder exists there; otherwise it has NO
    source and cannot be compared by path. Either way such ids are also caught by key: a release
    whose previous-code key f"{dataset}:{split}" (ReleaseParams.legacy_dataset_id) equals the dataset
    id of a line without source, under another dataset id, is refused with DatasetOverlapError
    telling the custodian to pass --dataset-id THAT legacy id, so recorded spend is never lost. (If
    the legacy id named other records, written from another working directory, spell the new path
    differently, e.g. absolute, from a directory where the legacy path does not exist.)
  * any other id: the id itself (`fashion-mnist:train` was the previous key of named datasets, and is
    still their default id, so their old and new charges compose under one id).

Accounting (mepf_core.privacy.accountant holds the derivation)
--------------------------------------------------------------
Each charge line is one GaussianRelease event (its "noise_multiplier" z and its "neighbouring"
relation, None for lines written before relations were recorded); a dataset's spend is the exact
composition of its events read at the budget's delta (GaussianAccountant.get_epsilon). No delta is
summed and no release's own delta enters the account, so spent epsilon never decreases.

Relations. A dataset's relation is that of its first charge; a charge of the other relation is
refused (RelationMismatchError), never converted. Charge lines without a relation count at z / 2
under replace-one and cannot be bounded under add-remove, so an add-remove release on such a dataset
is refused (the accountant's relation rule). A dataset holding only legacy charges reports relation
"unknown" and its replace-one spend; one holding both relations (a hand-edited ledger) "mixed" and
infinite spend.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mepf_core.errors import FileLockedError, InvalidArgumentError, MepfError, PathNotFoundError, file_access_error
from mepf_core.privacy import accountant
from mepf_core.privacy.accountant import UNKNOWN  # noqa: F401 - re-exported for readers of summaries
from mepf_core.privacy.accountant import MIXED, GaussianAccountant, GaussianRelease
from mepf_core.privacy.calibration import MAX_TARGET_DELTA, validate_delta
from mepf_core.privacy.sensitivity import Neighbouring

# Default delta budget of a dataset (probability, no unit): the same as the default target_delta of
# one release (ReleaseParams.target_delta), so with the defaults a single release's reported epsilon
# is exactly what the ledger charges; keep it below 1/n (n = number of records).
DEFAULT_BUDGET_DELTA = 1e-5

ADD_REMOVE, REPLACE_ONE = Neighbouring.ADD_REMOVE.value, Neighbouring.REPLACE_ONE.value
# UNKNOWN ("unknown": only legacy charges, no relation recorded) and MIXED ("mixed": both relations
# recorded, only possible in a hand-edited ledger; spend is infinite) come from the accountant.


class BudgetExceededError(MepfError):
    """The release would spend more than the dataset's remaining budget."""


class RelationMismatchError(BudgetExceededError):
    """The release's neighbouring relation differs from the one the dataset's charges were made under."""


class DatasetOverlapError(BudgetExceededError):
    """The release's records are (partly) already charged to another dataset id (see the module docstring)."""


class LedgerError(MepfError):
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
    sources: tuple[str, ...] = ()  # the sources recorded on its lines (lines written before sources: none)

    @property
    def remaining_epsilon(self) -> float | None:
        """budget_epsilon - spent_epsilon, floored at 0; None when no budget is set."""
        return None if self.budget_epsilon is None else max(self.budget_epsilon - self.spent_epsilon, 0.0)

    def as_dict(self) -> dict:
        """JSON-ready dict with remaining_epsilon (one row of `mepf budget --json`)."""
        return {**self.__dict__, "remaining_epsilon": self.remaining_epsilon}


def composed_epsilon(charges: list[dict], delta: float = DEFAULT_BUDGET_DELTA) -> tuple[float, float]:
    """(epsilon, delta) of the exact composition of these charges' Gaussian mechanisms, at `delta`.

    Uses only each charge's "noise_multiplier" (mepf_core.privacy.accountant.composed_epsilon); no
    relation handling here. Raises ValueError for a bad noise multiplier or delta.
    """
    zs = [c["noise_multiplier"] for c in charges]
    return accountant.composed_epsilon(zs, delta=delta, name="budget_delta"), delta


def _event(charge: dict) -> GaussianRelease:
    """The accountant's event for one charge line (relation None: written before relations were recorded)."""
    return GaussianRelease(charge["noise_multiplier"], charge.get("neighbouring"))


def _positive(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _budget_delta(line: dict) -> float:
    return DEFAULT_BUDGET_DELTA if line.get("delta") is None else float(line["delta"])


_IMAGEFOLDER = "imagefolder:"
_OLD_IMAGEFOLDER_KEY = re.compile(r"imagefolder:(.+):(train|test)")


def _inferred_source(dataset_id: str) -> str | None:
    """The source of a line written before sources were recorded (module docstring), or None."""
    if not dataset_id.startswith(_IMAGEFOLDER):
        return dataset_id
    path = dataset_id[len(_IMAGEFOLDER):]
    m = _OLD_IMAGEFOLDER_KEY.fullmatch(dataset_id)
    if m and not os.path.isdir(path):  # the previous code's key: the spec as spelled + ":" + split
        from storage.datasets import imagefolder_root

        path, relative = str(imagefolder_root(m[1], m[2])), not os.path.isabs(m[1])
    else:
        relative = not os.path.isabs(path)
    if relative and not os.path.isdir(path):
        return None  # relative to a working directory that is not this one: caught by key only
    return _IMAGEFOLDER + os.path.realpath(path)


def sources_overlap(a: str | None, b: str | None) -> bool:
    """Whether two sources may share a record: image folders when equal or one holds the other, others when equal."""
    if a is None or b is None:
        return False
    if a.startswith(_IMAGEFOLDER) and b.startswith(_IMAGEFOLDER):
        pa, pb = a[len(_IMAGEFOLDER):], b[len(_IMAGEFOLDER):]
        if os.path.isabs(pa) and os.path.isabs(pb):
            return os.path.commonpath([pa, pb]) in (pa, pb)
    return a == b


# A ledger's lock is held for one read-check-append (milliseconds); one held this long belongs to a
# process that is stuck or stopped (Ctrl-Z), and waiting for it silently would hang the command.
LOCK_TIMEOUT_SECONDS = 60.0
_LOCK_POLL_SECONDS = 0.05


def _lock(f, kind: int, path: Path) -> None:
    """flock `f` (`kind`: LOCK_EX or LOCK_SH), waiting up to LOCK_TIMEOUT_SECONDS for another holder;
    then FileLockedError naming the ledger."""
    deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
    while True:
        try:
            fcntl.flock(f.fileno(), kind | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise FileLockedError(
                    f"ledger {path} is locked by another process (a release or `mepf budget` that holds it for "
                    f"more than {LOCK_TIMEOUT_SECONDS:g} s is stuck or stopped) [EAGAIN]; let that process finish or "
                    f"end it (`fuser -v {path}` names it), then run again") from None
            time.sleep(_LOCK_POLL_SECONDS)


class BudgetLedger:
    """The append-only JSON-lines ledger at `path` (format: module docstring), under an exclusive lock.

    Every read-check-append happens under one `fcntl` lock on the file, so concurrent releases on one
    machine cannot both spend the last of a budget (`summary` reads under a shared lock, read-only).
    Raises PathNotFoundError when the ledger's folder does not exist; LedgerError when the file is
    unreadable or inconsistent; FileLockedError when another process holds the lock for more than
    LOCK_TIMEOUT_SECONDS; PermissionDeniedError / ReadOnlyFileSystemError / DiskFullError
    (`mepf_core.errors.file_access_error`) when the environment refuses the open or the append.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise PathNotFoundError(f"ledger folder {self.path.parent} does not exist")

    @contextlib.contextmanager
    def _locked(self, shared: bool = False) -> Iterator[object]:
        """The open ledger under its lock: exclusive (read-check-append, "a+b"), or shared for a read
        (`summary`, opened read-only, so a ledger on a read-only share can still be read)."""
        try:
            f = open(self.path, "rb" if shared else "a+b", buffering=0)  # unbuffered: no write is left for close()
        except OSError as exc:  # permission denied, a read-only file system...: one line naming the ledger
            mapped = file_access_error(exc, f"cannot {'read' if shared else 'update'} ledger {self.path}", self.path)
            if mapped is None:
                raise
            raise mapped from exc
        with f:
            _lock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, self.path)
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
        try:
            line = memoryview(json.dumps(entry, sort_keys=True).encode() + b"\n")
            while line:
                line = line[f.write(line):]
            os.fsync(f.fileno())
        except OSError as exc:  # a full disk...: a cut line is dropped by every reader; no release follows
            mapped = file_access_error(exc, f"cannot append to ledger {f.name} (no release was written)", f.name)
            if mapped is None:
                raise
            raise mapped from exc

    def _summary(self, entries: list[dict], dataset_id: str) -> DatasetBudget:
        budgets = [e for e in entries if e["kind"] == "budget" and e["dataset_id"] == dataset_id]
        charges = [e for e in entries if e["kind"] == "charge" and e["dataset_id"] == dataset_id]
        b = budgets[0] if budgets else {}
        delta = _budget_delta(b)
        account = GaussianAccountant.from_history(_event(c) for c in charges)
        eps = account.get_epsilon(delta, name="budget_delta")
        sources = tuple(sorted({e["source"] for e in budgets + charges if e.get("source")}))
        return DatasetBudget(dataset_id, b.get("epsilon"), delta if b else None, eps, delta, len(charges),
                             account.relation, account.legacy_events, sources)

    @staticmethod
    def _check_records(entries: list[dict], dataset_id: str, source: str | None, legacy_id: str | None) -> None:
        """Refuse (DatasetOverlapError) when these records are already charged to another dataset id."""
        if legacy_id is not None and legacy_id != dataset_id and any(
                e["dataset_id"] == legacy_id and not e.get("source") for e in entries):
            raise DatasetOverlapError(
                f"the ledger already holds dataset id {legacy_id!r}, written before dataset ids were canonical, "
                f"for the dataset this release names; its recorded spend must not be lost, so pass "
                f"--dataset-id {legacy_id} to charge this release to that budget (this release's id would be "
                f"{dataset_id!r})")
        if source is None:
            return
        inferred: dict[str, str | None] = {}  # one inference (filesystem look-up) per legacy dataset id
        holders = set()
        for e in entries:
            if e["dataset_id"] == dataset_id or e["dataset_id"] in holders:
                continue
            if e.get("source"):
                other = e["source"]
            else:
                if e["dataset_id"] not in inferred:
                    inferred[e["dataset_id"]] = _inferred_source(e["dataset_id"])
                other = inferred[e["dataset_id"]]
            if sources_overlap(source, other):
                holders.add(e["dataset_id"])
        holders = sorted(holders)
        if holders:
            if len(holders) == 1:
                hint = f"pass --dataset-id {holders[0]} to charge that budget"
            else:  # charging any one of them would still overlap the others
                hint = "no single budget holds them all, so release each part under its own dataset id"
            raise DatasetOverlapError(
                f"the records this release reads ({source}) are already charged, in whole or in part, to dataset "
                f"id{'s' if len(holders) > 1 else ''} {', '.join(repr(h) for h in holders)}; one set of records has "
                f"one budget, so {hint} (this release's id would be {dataset_id!r})")

    def set_budget(self, dataset_id: str, *, epsilon: float, delta: float | None = None, source: str | None = None,
                   legacy_id: str | None = None) -> None:
        """Set a dataset's total budget (epsilon, delta) once; setting a different one later is refused.

        `delta` must lie in [MIN_DELTA, MAX_TARGET_DELTA]; None means "the budget's delta if it is set,
        else DEFAULT_BUDGET_DELTA (1e-5)", so re-passing --budget without --budget-delta is accepted
        whatever delta the budget was set with. `source` and `legacy_id` are checked as in `charge`
        (a budget for records another dataset id holds is refused, DatasetOverlapError) and `source`
        is recorded on a new budget line.
        """
        if not _positive(epsilon):
            raise InvalidArgumentError(f"budget epsilon must be a finite number > 0, got {epsilon}")
        if delta is not None:
            delta = validate_delta(delta, name="budget_delta", cap=MAX_TARGET_DELTA)
        with self._locked() as f:
            entries = self._entries(f)
            self._check_records(entries, dataset_id, source, legacy_id)
            current = self._summary(entries, dataset_id)
            if current.budget_epsilon is None:
                line = {"kind": "budget", "dataset_id": dataset_id, "epsilon": float(epsilon),
                        "delta": DEFAULT_BUDGET_DELTA if delta is None else delta, "time": time.time()}
                if source is not None:
                    line["source"] = source
                self._append(f, line)
            elif current.budget_epsilon != float(epsilon) or (delta is not None and current.budget_delta != delta):
                asked = f"epsilon {epsilon}" + ("" if delta is None else f", delta {delta:g}")
                raise LedgerError(
                    f"dataset {dataset_id!r} already has budget (epsilon {current.budget_epsilon}, delta "
                    f"{current.budget_delta:g}); the ledger is append-only and does not change budgets "
                    f"(asked for {asked})"
                )

    def charge(self, dataset_id: str, *, release_id: str, epsilon: float, delta: float,
               noise_multiplier: float, neighbouring: Neighbouring | str = Neighbouring.ADD_REMOVE,
               record: bool = True, source: str | None = None, legacy_id: str | None = None) -> DatasetBudget:
        """Record a release's cost, or raise BudgetExceededError (RelationMismatchError, DatasetOverlapError)
        and record nothing.

        `epsilon` and `delta` are the release's own claim, kept for information; the account uses
        `noise_multiplier` (z = sigma / sensitivity, unitless) and `neighbouring` (the relation the
        sensitivities were derived for; the default is the project's default relation, add-remove).
        `source` describes the records read (storage.datasets.dataset_source) and is recorded; a source
        overlapping one of another dataset id is refused. `legacy_id` is the key the previous code gave
        this dataset (ReleaseParams.legacy_dataset_id); naming another dataset id's source-less lines,
        it is refused (module docstring). With record=False only checks that it would fit (used before
        extraction starts).
        """
        relation = Neighbouring(neighbouring).value  # ValueError on anything but the two relations
        if not _positive(epsilon):
            raise InvalidArgumentError(f"charge epsilon must be a finite number > 0, got {epsilon}")
        validate_delta(delta, name="target_delta")
        if not _positive(noise_multiplier):
            raise InvalidArgumentError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier}")
        with self._locked() as f:
            entries = self._entries(f)
            self._check_records(entries, dataset_id, source, legacy_id)
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
            if source is not None:
                charge["source"] = source
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
        """Every dataset's account (`DatasetBudget`), sorted by dataset id; [] when the file does not exist."""
        if not self.path.exists():
            return []
        with self._locked(shared=True) as f:
            entries = self._entries(f)
        ids = sorted({e["dataset_id"] for e in entries})
        return [self._summary(entries, i) for i in ids]
