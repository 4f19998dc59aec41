"""Issue 14: a DATASET_CARD.md beside every synthetic export, its utility filled in by `mepf evaluate`."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mepf_core.errors import InvalidArgumentError
from storage.dataset_card import (
    UTILITY_END,
    UTILITY_START,
    Utility,
    card_path,
    code_version,
    record_utility,
    render_card,
    write_dataset_card,
)
from storage.provenance import SyntheticInfo

INFO = SyntheticInfo(release_id="0f" * 16, epsilon=2.0, delta=1e-5, encoder="efficientnet-lite0",
                     class_names=("T-shirt/top", "Trouser"), steps=10_000, dataset_id="fashion-mnist:train",
                     checkpoint="checkpoint_best.pt", seed=7, neighbouring="replace-one",
                     release_sha256="ab" * 32, encoder_weights_sha256="cd" * 32)
VERSION = re.compile(r"dp-mepf \S+, git ([0-9a-f]{40}(, uncommitted changes)?|commit unknown \(.+\))")


def _section(text: str) -> str:
    return text[text.index(UTILITY_START):text.index(UTILITY_END)]


def test_card_path_is_inside_a_folder_and_beside_a_file(tmp_path):
    assert card_path(tmp_path / "run" / "synthetic.h5") == tmp_path / "run" / "synthetic.h5.DATASET_CARD.md"
    assert card_path(tmp_path / "s.parquet").name == "s.parquet.DATASET_CARD.md"
    assert card_path(f"{tmp_path}/images/") == tmp_path / "images" / "DATASET_CARD.md"
    assert card_path(tmp_path) == tmp_path / "DATASET_CARD.md"  # an existing folder
    with pytest.raises(InvalidArgumentError, match="got 'x.csv'"):
        card_path(tmp_path / "x.csv")


def test_card_states_the_claim_its_scope_and_that_utility_is_not_measured_yet(tmp_path):
    text = render_card(tmp_path / "synthetic.npz", INFO, count=1_000, image_shape=(1, 28, 28), run="runs/eps2")
    for expected in (
        "# Dataset card: `synthetic.npz`",
        "| epsilon | 2 |", "| delta | 1e-05 |",
        "| neighbouring relation | replace-one: neighbouring datasets have the same size and differ in one record",
        f"| release id | `{INFO.release_id}` |", f"| release SHA-256 (of the release file) | `{'ab' * 32}` |",
        "| encoder | `efficientnet-lite0` |", f"| encoder weights SHA-256 | `{'cd' * 32}` |",
        "| generator training steps | 10,000 |", "| checkpoint, sampling seed | `checkpoint_best.pt`, `7` |",
        "| images | 1,000 synthetic, 1 x 28 x 28 (C x H x W), uint8 |",
        "| labelled | yes, 2 classes: `T-shirt/top`, `Trouser` |",
        "NumPy .npz",
        "## What the guarantee covers", "post-processing of that release",
        "## What it does not cover", "The encoder's pretraining data", "The public evaluation split",
        "Hyperparameters and choices made on public data",
        "## Intended use and limitations", "Class-balanced",
        "Not measured yet",
        f"mepf evaluate --run runs/eps2 --synthetic {tmp_path / 'synthetic.npz'} --reference DATASET:test --out DIR",
    ):
        assert expected in text, expected
    (version,) = re.findall(r"\| code version \(sampling\) \| (.+) \|", text)
    assert VERSION.fullmatch(version), version
    old = SyntheticInfo(release_id="r", epsilon=1.0, delta=1e-5, encoder="vgg19", class_names=None, steps=3)
    text = render_card(tmp_path / "s.h5", old, count=5, image_shape=(3, 32, 32), version="dp-mepf 0.1.0, git x")
    assert "| release SHA-256 (of the release file) | not recorded |" in text
    assert "| neighbouring relation | not recorded" in text and "| labelled | no (one unlabelled set) |" in text
    assert "Class-balanced" not in text and "--run RUN --synthetic" in text


def test_code_version_never_fails_without_git(tmp_path, monkeypatch):
    assert VERSION.fullmatch(code_version())
    assert code_version(tmp_path).endswith("git commit unknown (not a git checkout)")
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable at all
    assert code_version().endswith("git commit unknown (FileNotFoundError)")


def test_record_utility_replaces_only_the_utility_section(tmp_path):
    export = tmp_path / "synthetic.h5"
    card = write_dataset_card(export, INFO, count=20, image_shape=(1, 28, 28), run="run")
    before = card.read_text()
    utility = Utility("fashion-mnist:test", {"fid": 53.912, "acc_logreg": 0.757, "acc_cnn": 0.7625}, (1000, 1000),
                      "out/report.md")
    assert record_utility(export, utility) == card
    after = card.read_text()
    assert after.replace(_section(after), "") == before.replace(_section(before), "")  # the rest unchanged
    section = _section(after)
    assert "Not measured yet" not in section and "`fashion-mnist:test`" in section
    assert "| FID (lower is better) | 53.91 (1,000 synthetic vs 1,000 reference images) |" in section
    assert "logistic regression trained on these images | 75.7% |" in section
    assert "CNN trained on these images | 76.2% |" in section and "`out/report.md`" in section
    record_utility(export, Utility("fashion-mnist:test", {"acc_mlp": 0.5}))  # a later evaluation replaces it
    again = card.read_text()
    assert again.count(UTILITY_START) == 1 and "53.91" not in again and "MLP trained on these images | 50.0% |" in again
    record_utility(export, Utility("fashion-mnist:train", {"fid": 20.0}, (10, 60_000), private_reference=True))
    private = _section(card.read_text())
    assert "not recorded in this card" in private and "60,000" not in private and "20.00" not in private


def test_record_utility_writes_a_missing_card_from_the_provenance(tmp_path):
    export = tmp_path / "old.parquet"
    with pytest.raises(InvalidArgumentError, match="no utility section to update; pass info"):
        record_utility(export, Utility("fashion-mnist:test", {"fid": 1.0}))
    path = record_utility(export, Utility("fashion-mnist:test", {"fid": 1.0}, (2, 2)), info=INFO, count=4,
                          image_shape=(1, 28, 28))
    text = path.read_text()
    assert path.name == "old.parquet.DATASET_CARD.md" and "| FID (lower is better) | 1.00 (2 synthetic" in text
    assert "| epsilon | 2 |" in text


def test_mepf_evaluate_fills_in_the_card(tmp_path, monkeypatch, capsys):
    """End to end through the CLI: the card beside RUN/synthetic.h5 gets the metrics the flow returned."""
    from flows.cli import main
    from tests.helpers import cheap_evaluation_run, write_image_folder

    s = cheap_evaluation_run(tmp_path, monkeypatch)
    write_image_folder(tmp_path / "ref" / "test", per_class=6, seed=1)
    export = s["run"] / "synthetic.h5"
    write_dataset_card(export, SyntheticInfo(release_id="x", epsilon=1.0, delta=1e-5, encoder="efficientnet-lite0",
                                             class_names=("a", "b"), steps=1),
                       count=20, image_shape=(3, 32, 32), run=s["run"])
    argv = ["evaluate", "--run", str(s["run"]), "--reference", f"imagefolder:{tmp_path / 'ref'}", "--classifiers",
            "logreg", "--fid-samples", "10", "--allow-small-fid", "--out", str(tmp_path / "report"), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    section = _section(card_path(export).read_text())
    fid, acc = result["metrics"]["fid"], result["metrics"]["acc_logreg"]
    assert f"| FID (lower is better) | {fid:.2f} (10 synthetic vs 12 reference images) |" in section
    assert f"logistic regression trained on these images | {100 * acc:.1f}% |" in section
    assert np.isfinite(fid) and "Not measured yet" not in section
