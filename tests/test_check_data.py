"""`mepf check-data` (local, no Prefect) and the labelled-release refusals it explains (issue 11, item 6)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from flows.cli_check_data import check_data

ROOT = Path(__file__).resolve().parents[1]


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(path)


@pytest.fixture
def messy(tmp_path) -> Path:
    """Classes a (3 images, one a byte copy of another), b (2 images, one corrupt), c (empty but for
    a hidden checkpoint folder), and a `__MACOSX` folder."""
    d = tmp_path / "messy"
    for c in "abc":
        (d / c).mkdir(parents=True)
    for i in range(3):
        _image(d / "a" / f"{i}.png", seed=i)
    (d / "a" / "copy-of-0.png").write_bytes((d / "a" / "0.png").read_bytes())
    _image(d / "b" / "0.png", seed=10)
    (d / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (d / "c" / ".ipynb_checkpoints").mkdir()
    _image(d / "c" / ".ipynb_checkpoints" / "0-checkpoint.png", seed=11)
    (d / "__MACOSX").mkdir()
    (d / "__MACOSX" / "._0.png").write_bytes(b"AppleDouble")
    return d


def test_check_data_lists_every_problem(messy, capsys):
    with pytest.raises(SystemExit) as info:
        main(["check-data", "--dataset", f"imagefolder:{messy}", "--labelled", "--json"])
    assert info.value.code == 1
    r = json.loads(capsys.readouterr().out)
    assert r["records"] == 6 and r["class_counts"] == {"a": 4, "b": 2, "c": 0} and r["empty_classes"] == ["c"]
    assert [Path(u["file"]).name for u in r["undecodable"]] == ["broken.png"]
    assert [sorted(Path(p).name for p in g) for g in r["duplicates"]] == [["0.png", "copy-of-0.png"]]
    assert sorted(Path(p).relative_to(messy).as_posix() for p in r["hidden_skipped"]) == ["__MACOSX", "c/.ipynb_checkpoints"]
    assert r["problems"] == ["1 undecodable image file(s): a release stops on the first",
                             "class 'c' holds no images (a labelled release would spend budget on pure noise)"]
    assert not r["ok"] and len(r["warnings"]) == 1


def test_check_data_passes_a_clean_dataset_and_unlabelled_ignores_classes(tmp_path, capsys):
    d = tmp_path / "clean"
    for k, c in enumerate("xy"):
        (d / c).mkdir(parents=True)
        _image(d / c / "0.png", seed=k)
    assert main(["check-data", "--dataset", f"imagefolder:{d}", "--labelled"]) == 0
    out = capsys.readouterr().out
    assert "2 records in 2 classes" in out and "OK: a release would accept this dataset" in out
    (d / "y" / "0.png").unlink()
    assert check_data(f"imagefolder:{d}", labelled=False)["ok"]  # unlabelled: an empty class is no problem
    assert check_data(f"imagefolder:{d}", labelled=True)["problems"] == [
        "class 'y' holds no images (a labelled release would spend budget on pure noise)"]


def test_check_data_runs_without_prefect(messy):
    code = ("import sys, contextlib, io\nfrom flows.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['check-data', '--dataset', sys.argv[1], '--json'])\n"
            "    except SystemExit:\n        pass\n"
            "assert not any(m == 'prefect' or m.startswith('prefect.') for m in sys.modules), 'prefect was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code, f"imagefolder:{messy}"], cwd=ROOT, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def _release(tmp_path: Path, spec: str, ledger: Path, *extra: str) -> list[str]:
    return ["release", "--dataset", spec, "--target-epsilon", "10", "--out", str(tmp_path / "out" / "r.h5"),
            "--labelled", "--ledger", str(ledger), "--encoder", "efficientnet-lite0", *extra]


@pytest.mark.parametrize("case", ["empty-class", "one-class"])
def test_labelled_release_refuses_empty_or_single_class_before_any_charge(tmp_path, capsys, case):
    """Today's fault: epsilon 10 spent and the empty class released as pure noise. Now: exit 2,
    nothing written, the ledger byte for byte as it was (no budget line added either)."""
    d = tmp_path / "d"
    (d / "a").mkdir(parents=True)
    for i in range(3):
        _image(d / "a" / f"{i}.png", seed=i)
    if case == "empty-class":
        (d / "b").mkdir()
        (d / "b" / ".ipynb_checkpoints").mkdir()
        _image(d / "b" / ".ipynb_checkpoints" / "0.png", seed=5)  # hidden: not a record
    (tmp_path / "out").mkdir()
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_bytes(b"")
    assert main(_release(tmp_path, f"imagefolder:{d}", ledger, "--budget", "20")) == 2
    err = capsys.readouterr().err
    expected = "class 'b' holds no images" if case == "empty-class" else "needs at least 2 classes, the dataset has 1"
    assert "DatasetCheckError" in err and expected in err and "mepf check-data" in err
    assert ledger.read_bytes() == b"" and list((tmp_path / "out").iterdir()) == []


def test_the_flow_itself_refuses_an_empty_class_without_naming_it(tmp_path):
    """Called directly (a deployment, the API), the flow refuses before the budget check, and its
    message (which reaches Prefect) names no class."""
    from flows.custodian_release import custodian_release
    from storage.params import ReleaseParams
    from storage.datasets import DatasetCheckError

    d = tmp_path / "d"
    (d / "secretclass").mkdir(parents=True)
    (d / "a").mkdir()
    _image(d / "a" / "0.png", seed=0)
    ledger = tmp_path / "ledger.jsonl"
    params = ReleaseParams(dataset=f"imagefolder:{d}", target_epsilon=1.0, labelled=True,
                           out=str(tmp_path / "r.h5"), ledger=str(ledger), budget=5.0)
    with pytest.raises(DatasetCheckError) as info:
        custodian_release(params)
    assert "secretclass" not in str(info.value) and "mepf check-data" in str(info.value)
    assert not ledger.exists() and not (tmp_path / "r.h5").exists()


# --- review findings 3, 5 (weaker: listing errors) and 6 ---------------------------------------------

def test_check_data_lists_tool_made_copies_and_warns_about_nested_folders(tmp_path, capsys):
    """An @eaDir layout of 8 images with 5 thumbnails each: 8 records, the thumbnail folders listed as
    skipped; a `$RECYCLE.BIN` copy is not counted; images in a nested subfolder give a warning."""
    d = tmp_path / "d"
    for k, c in enumerate("ab"):
        (d / c).mkdir(parents=True)
        for i in range(4):
            _image(d / c / f"{i}.png", seed=10 * k + i)
            thumbs = d / c / "@eaDir" / f"{i}.png"
            thumbs.mkdir(parents=True)
            for size in ("XL", "B", "M", "S", "SM"):
                Image.open(d / c / f"{i}.png").save(thumbs / f"SYNOFILE_THUMB_{size}.jpg")
    (d / "a" / "$RECYCLE.BIN" / "S-1-5-21").mkdir(parents=True)
    (d / "a" / "$RECYCLE.BIN" / "S-1-5-21" / "$R0A1B2C.png").write_bytes((d / "a" / "0.png").read_bytes())
    r = check_data(f"imagefolder:{d}", labelled=True)
    assert r["records"] == 8 and r["ok"] and r["duplicates"] == [] and r["nested_folders"] == []
    assert sorted(Path(p).relative_to(d).as_posix() for p in r["hidden_skipped"]) == [
        "a/$RECYCLE.BIN", "a/@eaDir", "b/@eaDir"]
    (d / "b" / "old" / "copies").mkdir(parents=True)
    _image(d / "b" / "old" / "copies" / "9.png", seed=99)
    assert main(["check-data", "--dataset", f"imagefolder:{d}", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["records"] == 9 and r["ok"]
    assert [(Path(f["folder"]).relative_to(d).as_posix(), f["class"], f["images"]) for f in r["nested_folders"]] \
        == [("b/old/copies", "b", 1)]
    assert any("nested subfolder" in w and "old/copies" in w for w in r["warnings"])
    assert main(["check-data", "--dataset", f"imagefolder:{d}"]) == 0
    out = capsys.readouterr().out
    assert "hidden or tool-made, skipped" in out and "@eaDir" in out and "$RECYCLE.BIN" in out


def test_check_data_reports_an_unreadable_folder(tmp_path, capsys, monkeypatch):
    """The walk no longer skips an unlistable subfolder silently: check-data names it and exits 1."""
    import os

    d = tmp_path / "d"
    for c in "ab":
        (d / c).mkdir(parents=True)
        _image(d / c / "0.png", seed=ord(c))
    (d / "b" / "scans").mkdir()
    _image(d / "b" / "scans" / "1.png", seed=3)
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", os.fspath(path))) if os.fspath(path).endswith("scans") else real(path))
    with pytest.raises(SystemExit) as info:
        main(["check-data", "--dataset", f"imagefolder:{d}", "--json"])
    assert info.value.code == 1
    r = json.loads(capsys.readouterr().out)
    assert [(Path(u["path"]).relative_to(d).as_posix(), u["error"]) for u in r["unreadable"]] == [
        ("b/scans", "PermissionError: Permission denied")]
    assert not r["ok"] and "could not be listed" in r["problems"][0]


def _ab4(tmp_path: Path) -> Path:
    d = tmp_path / "d"
    for k, c in enumerate("ab"):
        (d / c).mkdir(parents=True)
        for i in range(4):
            _image(d / c / f"{i}.png", seed=10 * k + i)
    return d


def test_limit_window_without_a_class_is_refused_before_any_charge(tmp_path, capsys):
    """Before: a:4, b:4 with `--labelled --neighbouring replace-one --limit 4` was released and charged,
    class b pure noise. Now: exit 2, the ledger byte for byte as it was, nothing written."""
    d = _ab4(tmp_path)
    (tmp_path / "out").mkdir()
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_bytes(b"")
    code = main(_release(tmp_path, f"imagefolder:{d}", ledger, "--budget", "20", "--neighbouring", "replace-one",
                         "--limit", "4"))
    err = capsys.readouterr().err
    assert code == 2 and "DatasetCheckError" in err and "class 'b' holds no images among the first 4" in err
    assert "--limit 4" in err
    assert ledger.read_bytes() == b"" and list((tmp_path / "out").iterdir()) == []
    # check-data says the same with --limit, and accepts a window that holds both classes
    r = check_data(f"imagefolder:{d}", labelled=True, limit=4)
    assert not r["ok"] and r["empty_classes_released"] == ["b"] and r["empty_classes"] == []
    assert check_data(f"imagefolder:{d}", labelled=True, limit=5)["ok"]
    assert check_data(f"imagefolder:{d}", labelled=False, limit=4)["ok"]
    with pytest.raises(SystemExit) as info:
        main(["check-data", "--dataset", f"imagefolder:{d}", "--labelled", "--limit", "4"])
    assert info.value.code == 1 and "among the first 4 records" in capsys.readouterr().out


def test_the_flow_checks_the_released_window_too(tmp_path):
    """describe_dataset (what a deployment runs) looks at the first `limit` records, and names no class."""
    from storage.params import ReleaseParams
    from storage.datasets import DatasetCheckError
    from tasks.custodian import describe_dataset

    d = _ab4(tmp_path)
    params = ReleaseParams(dataset=f"imagefolder:{d}", target_epsilon=1.0, labelled=True, limit=4,
                           neighbouring="replace-one", out=str(tmp_path / "r.h5"))
    with pytest.raises(DatasetCheckError) as info:
        describe_dataset.fn(params)
    assert "'b'" not in str(info.value) and "--limit 4" in str(info.value)
    assert describe_dataset.fn(params.model_copy(update={"limit": 5}))["class_names"] == ("a", "b")
