"""One dataset, one budget (issue 11, item 4): however `imagefolder:PATH` is spelled, the ledger sees one id."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flows.cli import main
from tests.helpers import write_image_folder


def test_three_spellings_share_one_budget(tmp_path, capsys, monkeypatch):
    """Before: `imagefolder:data`, `imagefolder:./data/` and `imagefolder:$PWD/data` were three ledger
    keys, all three epsilon-1 releases were accepted with budget 1, and `mepf budget` showed three
    datasets. Now the second and third are refused, and the ledger holds one charge on one dataset."""
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "data")
    ledger = tmp_path / "ledger.jsonl"
    codes = []
    for i, spelling in enumerate(["imagefolder:data", "imagefolder:./data/", f"imagefolder:{tmp_path}/data"]):
        codes.append(main(["release", "--dataset", spelling, "--target-epsilon", "1", "--out", f"r{i}.h5",
                           "--labelled", "--ledger", str(ledger), "--budget", "1", "--encoder", "efficientnet-lite0",
                           "--batch-size", "8", "--json"]))
        if i:
            assert "BudgetExceededError" in capsys.readouterr().err
    assert codes == [0, 2, 2]
    assert Path("r0.h5").is_file() and not Path("r1.h5").exists() and not Path("r2.h5").exists()
    capsys.readouterr()
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    charges = [e for e in entries if e["kind"] == "charge"]
    canonical = f"imagefolder:{os.path.realpath(tmp_path / 'data')}"
    assert len(charges) == 1 and charges[0]["dataset_id"] == canonical
    assert main(["budget", "--ledger", str(ledger), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["datasets"]
    assert [r["dataset_id"] for r in rows] == [canonical] and rows[0]["releases"] == 1


def _images(folder: Path, classes=("a", "b"), k: int = 3) -> None:
    write_image_folder(folder, classes=classes, per_class=k, seed=1)


def _release(dataset: str, out: str, ledger: Path, *extra: str) -> int:
    return main(["release", "--dataset", dataset, "--target-epsilon", "1", "--out", out, "--ledger", str(ledger),
                 "--budget", "1", "--encoder", "efficientnet-lite0", "--batch-size", "8", "--no-labelled", "--json",
                 *extra])


def test_reviewer_t2_split_and_parent_folder_share_the_budget(tmp_path, capsys, monkeypatch):
    """Review finding 1a (t2_alias_e2e.sh). Before: with data/train/{a,b} and budget 1, `imagefolder:data`
    (reads data/train), `imagefolder:data --split test` (no data/test: reads data, "train" as a class)
    and `imagefolder:$T` (the parent) were all accepted, three datasets in `mepf budget`. Now the second
    and third are refused with DatasetOverlapError naming the id that holds the records; one charge."""
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "data" / "train")
    ledger = tmp_path / "ledger.jsonl"
    holder = f"imagefolder:{os.path.realpath(tmp_path / 'data' / 'train')}"
    codes = []
    for i, args in enumerate([("imagefolder:data",), ("imagefolder:data", "--split", "test"),
                              (f"imagefolder:{tmp_path}",)]):
        codes.append(_release(args[0], f"r{i}.h5", ledger, *args[1:]))
        err = capsys.readouterr().err
        if i:
            assert "DatasetOverlapError: the records this release reads" in err
            assert f"pass --dataset-id {holder} to charge that budget" in err
    assert codes == [0, 2, 2]
    assert Path("r0.h5").is_file() and not Path("r1.h5").exists() and not Path("r2.h5").exists()
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [(e["kind"], e["dataset_id"], e["source"]) for e in entries] == [("budget", holder, holder),
                                                                              ("charge", holder, holder)]
    assert main(["budget", "--ledger", str(ledger), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["datasets"]
    assert [(r["dataset_id"], r["releases"], r["sources"]) for r in rows] == [(holder, 1, [holder])]


def test_explicit_dataset_id_then_default_id_is_refused(tmp_path, capsys, monkeypatch):
    """Review finding 1d. Before: `--dataset-id X` and then the default id of the same folder were two
    budgets. Now the second release is refused and told to pass `--dataset-id X`."""
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "data")
    ledger = tmp_path / "ledger.jsonl"
    assert _release("imagefolder:data", "r0.h5", ledger, "--dataset-id", "X") == 0
    capsys.readouterr()
    assert _release("imagefolder:./data/", "r1.h5", ledger) == 2
    err = capsys.readouterr().err
    assert "DatasetOverlapError" in err and "pass --dataset-id X to charge that budget" in err
    assert not Path("r1.h5").exists()
    assert [json.loads(line)["dataset_id"] for line in ledger.read_text().splitlines()] == ["X", "X"]


def test_legacy_ledger_key_is_not_lost(tmp_path, capsys, monkeypatch):
    """Review finding 1c (t6_legacy_ledger.sh). Before: a ledger line `imagefolder:data:train` (previous
    code: spec as spelled + ":" + split) had spent 1 of budget 1, and a new release of `imagefolder:data`
    got a fresh budget under the canonical id. Now it is refused with the --dataset-id hint, and with
    that id it is refused because the budget is spent; the ledger is unchanged."""
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "data", k=2)
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(
        '{"dataset_id": "imagefolder:data:train", "delta": null, "epsilon": 1.0, "kind": "budget", "time": 1700000000.0}\n'
        '{"dataset_id": "imagefolder:data:train", "delta": 1e-05, "epsilon": 1.0, "kind": "charge", '
        '"noise_multiplier": 3.730631634, "release_id": "old", "time": 1700000001.0}\n')
    before = ledger.read_bytes()
    assert _release("imagefolder:data", "r.h5", ledger) == 2
    err = capsys.readouterr().err
    assert "DatasetOverlapError" in err and "pass --dataset-id imagefolder:data:train to charge" in err
    assert _release("imagefolder:data", "r.h5", ledger, "--dataset-id", "imagefolder:data:train",
                    "--neighbouring", "replace-one") == 2
    err = capsys.readouterr().err
    assert "BudgetExceededError: release would spend epsilon 1" in err and "exceeds the budget 1" in err
    assert ledger.read_bytes() == before and not Path("r.h5").exists()
