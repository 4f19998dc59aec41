"""One set of records, one budget (issue 11 item 4, review finding 1): the ledger records which records
each charge read (`source`) and refuses to charge them to a second dataset id, however they are named.

These run the custodian's own budget check (`tasks.custodian.check_budget`) and then the charge it
makes after extraction, on real folders but without reading any image; the end-to-end runs through
`mepf release` are in tests/test_dataset_id.py.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mepf_core.privacy.mechanism import design_mechanism
from mepf_core.privacy.sensitivity import Neighbouring
from storage.datasets import DEBIAN_FASHION_MNIST, dataset_source
from storage.ledger import (BudgetExceededError, BudgetLedger, DatasetOverlapError, LedgerError,
                            RelationMismatchError, sources_overlap)
from storage.params import ReleaseParams
from tasks.custodian import check_budget


def _mechanism(eps: float = 1.0, relation: Neighbouring = Neighbouring.ADD_REMOVE):
    return design_mechanism(target_epsilon=eps, target_delta=1e-5, relation=relation, labelled=True, moments=1,
                            norm_bound=1.0, second_moment_bound=1.0)


def _release(ledger: Path, rid: str = "r", eps: float = 1.0, budget: float | None = 1.0, **kw) -> None:
    """The custodian's ledger steps of one release: check_budget, then the recorded charge."""
    params = ReleaseParams(target_epsilon=eps, out="r.h5", ledger=str(ledger), budget=budget, **kw)
    mech = _mechanism(eps, params.neighbouring)
    check_budget.fn(params, mech)
    BudgetLedger(ledger).charge(params.resolved_dataset_id, release_id=rid, epsilon=mech.epsilon,
                                delta=mech.target_delta, noise_multiplier=mech.effective_noise_multiplier,
                                neighbouring=mech.relation, source=params.source, legacy_id=params.legacy_dataset_id)


def _lines(ledger: Path) -> list[dict]:
    return [json.loads(line) for line in ledger.read_text().splitlines()]


def _charges(ledger: Path) -> list[dict]:
    return [e for e in _lines(ledger) if e["kind"] == "charge"]


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    """tmp/data/train/{a,b}: the reviewer's t2 layout (no data/test). Only folders: no image is read here."""
    monkeypatch.chdir(tmp_path)
    for c in ("a", "b"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
    return tmp_path / "data"


@pytest.mark.parametrize("a,b,overlap", [
    ("imagefolder:/d/train", "imagefolder:/d/train", True),
    ("imagefolder:/d/train", "imagefolder:/d", True),  # a parent holds its children's records
    ("imagefolder:/d", "imagefolder:/d/train/a", True),
    ("imagefolder:/d/train", "imagefolder:/d/test", False),  # siblings
    ("imagefolder:/d/train", "imagefolder:/d/train2", False),  # a name prefix is not a parent
    ("imagefolder:/", "imagefolder:/anything", True),
    ("fashion-mnist:train", "fashion-mnist:train", True),
    ("fashion-mnist:train", "fashion-mnist:test", False),
    ("idx:sha256:ab", "idx:sha256:ab", True),
    ("idx:sha256:ab", "idx:sha256:cd", False),
    ("imagefolder:/d", "idx:sha256:ab", False),
    ("imagefolder:/d", None, False),
])
def test_overlap_rule(a, b, overlap):
    assert sources_overlap(a, b) is overlap and sources_overlap(b, a) is overlap


def test_reviewer_t2_split_and_parent_are_refused(data, tmp_path):
    """Before: budget 1; `imagefolder:data` (reads data/train), then `--split test` (no data/test: reads
    data, with "train" as a class), then the parent folder: three epsilon-1 releases of the same 6
    images accepted under three ids. Now the second and third are refused, the ledger holds one charge
    and one budget, and the message names the id holding the records."""
    ledger = tmp_path / "l.jsonl"
    train = os.path.realpath(data / "train")
    _release(ledger, "first", dataset="imagefolder:data")
    for kw in ({"dataset": "imagefolder:data", "split": "test"}, {"dataset": f"imagefolder:{tmp_path}"},
               {"dataset": "imagefolder:data/train/a"}, {"dataset": f"imagefolder:{tmp_path}/", "split": "test"},
               {"dataset": "imagefolder:data/../data", "split": "test"}):
        before = ledger.read_bytes()
        with pytest.raises(DatasetOverlapError, match=f"already charged.*'imagefolder:{train}'.*"
                                                      f"pass --dataset-id imagefolder:{train} "):
            _release(ledger, "again", **kw)
        assert ledger.read_bytes() == before  # neither a budget line nor a charge
    for spelling in ("imagefolder:./data/train/", f"imagefolder:{data}/"):  # the same folder: the same id, spent
        with pytest.raises(BudgetExceededError, match="exceeds the budget 1; already spent 1"):
            _release(ledger, "same", dataset=spelling)
    [charge] = _charges(ledger)
    assert charge["dataset_id"] == charge["source"] == f"imagefolder:{train}"
    assert [e["kind"] for e in _lines(ledger)] == ["budget", "charge"]
    [summary] = BudgetLedger(ledger).summary()
    assert summary.sources == (f"imagefolder:{train}",) and summary.releases == 1


def test_a_symlink_to_the_folder_is_the_same_records(data, tmp_path):
    ledger = tmp_path / "l.jsonl"
    os.symlink(data, tmp_path / "alias")
    _release(ledger, dataset="imagefolder:data", dataset_id="X")
    with pytest.raises(DatasetOverlapError, match="pass --dataset-id X "):
        _release(ledger, dataset="imagefolder:alias")


def test_sibling_splits_are_two_budgets(data, tmp_path):
    (data / "test" / "a").mkdir(parents=True)
    ledger = tmp_path / "l.jsonl"
    _release(ledger, "train", dataset="imagefolder:data")
    _release(ledger, "test", dataset="imagefolder:data", split="test")
    assert sorted(c["source"] for c in _charges(ledger)) == [f"imagefolder:{os.path.realpath(data / s)}"
                                                             for s in ("test", "train")]


@pytest.mark.parametrize("first,second,holder", [
    ({"dataset_id": "X"}, {}, "X"),  # --dataset-id X, then the default id of the same folder
    ({}, {"dataset_id": "X"}, "DEFAULT"),
    ({"dataset_id": "imagefolder:data"}, {}, "imagefolder:data"),  # an id spelled like a spec
    ({"dataset_id": "X"}, {"dataset_id": "Y"}, "X"),
])
def test_explicit_dataset_id_cannot_open_a_second_budget(data, tmp_path, first, second, holder):
    ledger = tmp_path / "l.jsonl"
    holder = f"imagefolder:{os.path.realpath(data / 'train')}" if holder == "DEFAULT" else holder
    _release(ledger, "first", dataset="imagefolder:data", **first)
    with pytest.raises(DatasetOverlapError, match=f"pass --dataset-id {holder} "):
        _release(ledger, "second", dataset="imagefolder:data", **second)
    assert len(_charges(ledger)) == 1


def test_a_parent_of_two_budgets_is_refused_under_either(data, tmp_path):
    (data / "test" / "a").mkdir(parents=True)
    ledger = tmp_path / "l.jsonl"
    _release(ledger, "train", dataset="imagefolder:data", dataset_id="TR")
    _release(ledger, "test", dataset="imagefolder:data", split="test", dataset_id="TE")
    for dataset_id in (None, "TR", "TE"):  # reads data/test and data/train: neither budget may take it
        with pytest.raises(DatasetOverlapError, match=r"dataset ids 'TE', 'TR'|dataset id 'T[ER]'; one set"):
            _release(ledger, dataset=f"imagefolder:{tmp_path}", dataset_id=dataset_id)
    with pytest.raises(DatasetOverlapError, match="no single budget holds them all"):
        _release(ledger, dataset=f"imagefolder:{tmp_path}")
    assert len(_charges(ledger)) == 2


def test_same_records_same_id_compose_as_before(data, tmp_path):
    ledger = tmp_path / "l.jsonl"
    _release(ledger, "a", eps=0.5, dataset="imagefolder:data", dataset_id="X")
    _release(ledger, "b", eps=0.5, dataset="imagefolder:./data/", dataset_id="X")
    [summary] = BudgetLedger(ledger).summary()
    assert summary.releases == 2 and 0.5 < summary.spent_epsilon < 1.0
    with pytest.raises(BudgetExceededError, match="exceeds the budget") as err:
        _release(ledger, "c", eps=1.0, dataset="imagefolder:data", dataset_id="X")
    assert not isinstance(err.value, DatasetOverlapError)


def test_refused_budget_line_never_blocks_the_holder(data, tmp_path):
    """set_budget checks the records first: a refused new id leaves no line that could later make the
    holder's own releases look like an overlap."""
    ledger = tmp_path / "l.jsonl"
    _release(ledger, "a", eps=0.5, budget=2.0, dataset="imagefolder:data")
    with pytest.raises(DatasetOverlapError):
        _release(ledger, "b", eps=0.5, budget=2.0, dataset="imagefolder:data", dataset_id="X")
    _release(ledger, "c", eps=0.5, budget=2.0, dataset="imagefolder:data")
    assert {e["dataset_id"] for e in _lines(ledger)} == {f"imagefolder:{os.path.realpath(data / 'train')}"}


# --- ledgers written before canonical ids (no "source") ------------------------------------------

def _legacy_ledger(path: Path, dataset_id: str = "imagefolder:data:train", relation: str | None = None,
                   budget: float = 1.0) -> bytes:
    """The reviewer's t6 ledger: budget 1 (delta null), one epsilon-1 charge, no relation, no source."""
    charge = {"dataset_id": dataset_id, "delta": 1e-05, "epsilon": 1.0, "kind": "charge",
              "noise_multiplier": 3.730631634, "release_id": "old", "time": 1700000001.0}
    if relation:
        charge["neighbouring"] = relation
    path.write_text(json.dumps({"dataset_id": dataset_id, "delta": None, "epsilon": budget, "kind": "budget",
                                "time": 1700000000.0}) + "\n" + json.dumps(charge) + "\n")
    return path.read_bytes()


@pytest.mark.parametrize("spelling", ["imagefolder:data", "imagefolder:./data/", "ABS", "imagefolder:data/a"])
def test_legacy_key_keeps_its_spend(tmp_path, monkeypatch, spelling):
    """Before: a ledger line `imagefolder:data:train` spent 1 of budget 1, and a new release of the same
    folder got a fresh budget under `imagefolder:/abs/data`. Now it is refused with the --dataset-id
    hint; with that id it is charged to the old budget, and refused because that budget is spent."""
    monkeypatch.chdir(tmp_path)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
    ledger = tmp_path / "l.jsonl"
    before = _legacy_ledger(ledger)
    spec = f"imagefolder:{tmp_path}/data" if spelling == "ABS" else spelling
    with pytest.raises(DatasetOverlapError, match="--dataset-id imagefolder:data:train"):
        _release(ledger, dataset=spec)
    with pytest.raises(DatasetOverlapError, match="--dataset-id imagefolder:data:train"):
        _release(ledger, dataset=spec, budget=None)
    # with the hinted id: the old budget, already spent (the legacy charge counts at z / 2 under
    # replace-one, and cannot be bounded under add-remove)
    with pytest.raises(BudgetExceededError, match=r"total epsilon .* exceeds the budget 1; already spent 2.34"):
        _release(ledger, dataset=spec, dataset_id="imagefolder:data:train", neighbouring="replace-one")
    with pytest.raises(RelationMismatchError, match="recorded without a relation"):
        _release(ledger, dataset=spec, dataset_id="imagefolder:data:train")
    assert ledger.read_bytes() == before


def test_legacy_relative_key_from_another_directory_is_caught_by_key(tmp_path, monkeypatch):
    """Where the legacy relative path does not exist (another working directory), it cannot be compared
    by path: the previous-code key still catches the same spelling."""
    (tmp_path / "elsewhere" / "data" / "a").mkdir(parents=True)
    ledger = tmp_path / "l.jsonl"
    _legacy_ledger(ledger, "imagefolder:other:train")
    monkeypatch.chdir(tmp_path / "elsewhere")
    _release(ledger, "fresh", dataset="imagefolder:data")  # other records: its own budget
    os.rename(tmp_path / "elsewhere" / "data", tmp_path / "elsewhere" / "other")
    with pytest.raises(DatasetOverlapError, match="--dataset-id imagefolder:other:train"):
        _release(ledger, dataset="imagefolder:other", dataset_id="Z")


@pytest.mark.parametrize("legacy_id", ["ABS:train", "ABS"])
def test_legacy_absolute_ids_are_compared_by_path(tmp_path, monkeypatch, legacy_id):
    """`imagefolder:/abs/data:train` (previous code, absolute spelling) and `imagefolder:/abs/data`
    (canonical id written before sources) are located on disk and compared like sources."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "a").mkdir(parents=True)
    ledger = tmp_path / "l.jsonl"
    legacy_id = legacy_id.replace("ABS", f"imagefolder:{tmp_path}/data")
    _legacy_ledger(ledger, legacy_id, relation="add-remove")
    with pytest.raises(DatasetOverlapError, match=f"pass --dataset-id {legacy_id} "):
        _release(ledger, dataset="imagefolder:./data/a", dataset_id="Y")


def test_legacy_named_dataset_id_keeps_its_spend(tmp_path, monkeypatch):
    """Named datasets keep their default id `NAME:SPLIT`, so old and new charges compose; another id
    for them is refused while the legacy lines exist."""
    monkeypatch.chdir(tmp_path)
    _write_idx(tmp_path / "fm", np.arange(4 * 28 * 28, dtype=np.uint8).reshape(4, 28, 28))
    ledger = tmp_path / "l.jsonl"
    _legacy_ledger(ledger, "fashion-mnist:train", relation="add-remove", budget=3.0)
    with pytest.raises(DatasetOverlapError, match="--dataset-id fashion-mnist:train"):
        _release(ledger, dataset="fashion-mnist", data_root="fm", dataset_id="F", budget=3.0)
    _release(ledger, eps=0.5, budget=None, dataset="fashion-mnist", data_root="fm")  # composes with the old charge
    assert [c["dataset_id"] for c in _charges(ledger)] == ["fashion-mnist:train"] * 2


# --- named (idx) datasets ----------------------------------------------------------------------

def _write_idx(folder: Path, images: np.ndarray, split: str = "train", gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stem = "train" if split == "train" else "t10k"
    n, rows, cols = images.shape
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(folder / f"{stem}-images-idx3-ubyte{suffix}", "wb") as f:
        f.write((2051).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, rows, cols)) + images.tobytes())
    with opener(folder / f"{stem}-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(n))


def test_idx_source_is_the_images_content(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "a", imgs)
    _write_idx(tmp_path / "b", imgs, gz=False)  # a decompressed copy elsewhere
    _write_idx(tmp_path / "a", imgs[::-1].copy(), split="test")
    src = dataset_source("mnist", "train", tmp_path / "a")
    assert src.startswith("idx:sha256:") and len(src) == len("idx:sha256:") + 64
    assert dataset_source("fashion-mnist", "train", tmp_path / "b") == src
    assert dataset_source("mnist", "test", tmp_path / "a") != src
    assert dataset_source("cifar10", "train", tmp_path / "a") == "cifar10:train"


def test_mnist_flag_on_fashion_mnist_files_is_one_budget(tmp_path, monkeypatch):
    """Before (review 1b): `--dataset mnist --data-root DIR` on Fashion-MNIST files and `--dataset
    fashion-mnist` were two budgets for the same images. Now the second is refused, and so is a copy."""
    monkeypatch.chdir(tmp_path)
    imgs = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "fm", imgs)
    shutil.copytree(tmp_path / "fm", tmp_path / "copy")
    ledger = tmp_path / "l.jsonl"
    _release(ledger, dataset="fashion-mnist", data_root="fm")
    for kw in ({"dataset": "mnist", "data_root": "fm"}, {"dataset": "mnist", "data_root": "copy/"},
               {"dataset": "fashion-mnist", "data_root": "copy", "dataset_id": "other"}):
        with pytest.raises(DatasetOverlapError, match="pass --dataset-id fashion-mnist:train "):
            _release(ledger, **kw)
    _write_idx(tmp_path / "fm", imgs[::-1].copy(), split="test")
    _release(ledger, "t", dataset="mnist", data_root="fm", split="test")  # other images: its own budget
    assert [c["dataset_id"] for c in _charges(ledger)] == ["fashion-mnist:train", "mnist:test"]


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="needs the Debian fashion-mnist package")
def test_reviewer_t11_mnist_root_on_debian_fashion_mnist(tmp_path):
    assert dataset_source("mnist", "train", DEBIAN_FASHION_MNIST) == dataset_source("fashion-mnist", "train")
    assert dataset_source("fashion-mnist", "test") != dataset_source("fashion-mnist", "train")


# --- the delta of a budget re-passed without --budget-delta ------------------------------------

def test_budget_without_budget_delta_means_the_ledgers(tmp_path):
    """Before: `--budget 1` without `--budget-delta` on a budget set with delta 1e-6 was refused with
    "asked for ... delta 1e-05", a value the user never gave. Now unset means the ledger's delta."""
    ledger = BudgetLedger(tmp_path / "l.jsonl")
    ledger.set_budget("ds", epsilon=1.0, delta=1e-6)
    ledger.set_budget("ds", epsilon=1.0)  # accepted: the budget's delta
    ledger.set_budget("ds", epsilon=1.0, delta=1e-6)
    assert [e["delta"] for e in _lines(tmp_path / "l.jsonl")] == [1e-6]
    with pytest.raises(LedgerError, match=r"already has budget \(epsilon 1.0, delta 1e-06\).*asked for epsilon 1.0, "
                                          r"delta 1e-05\)"):
        ledger.set_budget("ds", epsilon=1.0, delta=1e-5)
    with pytest.raises(LedgerError, match=r"asked for epsilon 2.0\)$"):
        ledger.set_budget("ds", epsilon=2.0)  # the message names only what was asked
    ledger.set_budget("new", epsilon=1.0)  # a new budget: the default delta
    assert {b.dataset_id: b.budget_delta for b in ledger.summary()} == {"ds": 1e-6, "new": 1e-5}


def test_release_rerun_with_budget_only_after_a_non_default_delta(data, tmp_path):
    ledger = tmp_path / "l.jsonl"
    BudgetLedger(ledger).set_budget(f"imagefolder:{os.path.realpath(data / 'train')}", epsilon=3.0, delta=1e-6)
    _release(ledger, "a", budget=3.0, dataset="imagefolder:data")  # no --budget-delta: accepted
    [summary] = BudgetLedger(ledger).summary()
    assert summary.budget_delta == 1e-6 and summary.spent_delta == 1e-6 and summary.releases == 1
