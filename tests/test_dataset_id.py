"""One dataset, one budget (issue 11, item 4): however `imagefolder:PATH` is spelled, the ledger sees one id."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from flows.cli import main


def test_three_spellings_share_one_budget(tmp_path, capsys, monkeypatch):
    """Before: `imagefolder:data`, `imagefolder:./data/` and `imagefolder:$PWD/data` were three ledger
    keys, all three epsilon-1 releases were accepted with budget 1, and `mepf budget` showed three
    datasets. Now the second and third are refused, and the ledger holds one charge on one dataset."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
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
