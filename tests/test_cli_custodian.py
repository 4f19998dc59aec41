"""`mepf release / inspect / budget` end to end on a tiny dataset, and bad arguments."""

import json

import pytest

from flows.cli import main
from mepf_core.cells import LITE0_SHA256, PUBLIC_CENTROIDS


def _release_args(tmp_path, *extra):
    return ["release", "--dataset", "fashion-mnist", "--target-epsilon", "1", "--target-delta", "1e-5",
            "--out", str(tmp_path / "r.h5"), "--labelled", "--limit", "200", "--batch-size", "100",
            "--neighbouring", "replace-one", *extra]  # --limit (first N) is refused under add-remove


def test_release_inspect_budget_round_trip(tmp_path, capsys):
    ledger = str(tmp_path / "ledger.jsonl")
    assert main(_release_args(tmp_path, "--moments", "2", "--ledger", ledger, "--budget", "1.2", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    # epsilon 1, labelled: 8 cells per class by default (mepf_core.cells), 10 x 8 released rows
    assert out["epsilon"] <= 1.0 and out["shapes"]["moment1"] == [80, 16960] and out["shapes"]["moment2"] == [80, 16960]
    assert set(out["sigmas"]) == {"moment1", "moment2", "counts"} and out["cells_per_class"] == 8

    assert main(["inspect", str(tmp_path / "r.h5"), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["release_id"] == out["release_id"] and meta["encoder"]["name"] == "efficientnet-lite0"
    assert meta["n_public"] is None and meta["neighbouring"] == "replace-one"  # labelled: counts noised
    assert meta["cells_per_class"] == 8 and meta["cell_reference"] == "fashion-mnist:test-select"
    # Voronoi cells: named by the tabulated centroids' SHA-256, no offsets
    assert meta["cell_seed"] == 1 and meta["cell_offsets"] is None
    assert meta["cell_centroids_sha256"] == PUBLIC_CENTROIDS[("fashion-mnist:test-select", "efficientnet-lite0",
                                                              LITE0_SHA256, (1, 28, 28), 1.0, 1, 8)][1]

    assert main(["budget", "--ledger", ledger, "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["datasets"]
    assert row["spent_epsilon"] == pytest.approx(out["epsilon"]) and row["remaining_epsilon"] == pytest.approx(1.2 - out["epsilon"])

    # a second release of epsilon 1 would exceed 1.2 (jointly about 1.42): refused before extraction, nothing written
    (tmp_path / "second").mkdir()
    second = tmp_path / "second" / "r.h5"
    args = _release_args(tmp_path, "--ledger", ledger, "--json")
    args[args.index("--out") + 1] = str(second)
    assert main(args) == 2
    assert "exceeds the budget" in capsys.readouterr().err
    assert not second.exists() and list((tmp_path / "second").iterdir()) == []
    # and the existing release is never overwritten
    assert main(_release_args(tmp_path)) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("change,message", [
    (("--target-epsilon", "0"), "target_epsilon must be a finite number > 0, got 0.0"),
    (("--target-epsilon", "-2"), "got -2.0"),
    (("--target-delta", "1.5"), "target_delta must be in (0, 1), got 1.5"),
    (("--target-delta", "0"), "target_delta must be in (0, 1), got 0.0"),
    (("--encoder", "resnet1000"), "unknown encoder 'resnet1000'"),
    (("--dataset", "imagefolder:/nonexistent/images"), "does not exist"),
    (("--dataset", "svhn"), "unknown dataset 'svhn'"),
])
def test_bad_arguments_exit_nonzero_and_write_nothing(tmp_path, capsys, change, message):
    args = _release_args(tmp_path)
    flag, value = change
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
