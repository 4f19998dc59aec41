"""Privacy review of this session's changes: each break found, as a test with its expected value.

1. An image folder's inferred image mode (1 channel when every image is grayscale) must be a function
   of the released records only: with `limit` (replace-one, the first N records) a colour image
   outside the window is not a record and must not decide the mode.
2. The extraction progress artifact of a shard that fails (a corrupt or unreadable record) must end
   on the same fixed grid as a shard that succeeds: a last value of 30% would say where in the
   shard's sorted records the bad file lies, a rank statistic of the private data that no budget pays.
3. `mepf run --config` sets the release's image mode (image_size, channels in RELEASE_FIELDS).
"""

from __future__ import annotations

import errno

import numpy as np
import pytest
from PIL import Image

import tasks.artifacts as artifacts
from storage.datasets import ExtractionError, open_dataset
from storage.params import PipelineParams, ReleaseParams

GRID = [10.0 * j for j in range(11)]  # FixedStepProgress's fixed sequence: 0, 10, ..., 100


def _grey_folder(root, per_class=4):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_inferred_image_mode_reads_only_the_records_inside_limit(tmp_path):
    data = _grey_folder(tmp_path / "d")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(data / "b" / "9.png")
    spec = f"imagefolder:{data}"
    whole = open_dataset(spec)
    assert whole.image_shape == (3, 32, 32)  # the colour image is a record of the whole folder
    assert str(whole._labels.tolist()) == str([0] * 4 + [1] * 5)  # and it is the last record
    window = open_dataset(spec, limit=8)  # the first 8 records: all grey
    assert window.image_shape == (1, 28, 28) and window.image_mode_source == "inferred-from-data"
    assert len(window) == 9  # the listing is unchanged; only the mode choice is limited
    # the custodian's tasks open the dataset with the release's limit (replace-one only)
    from tasks.custodian import _source

    params = ReleaseParams(dataset=spec, target_epsilon=1.0, neighbouring="replace-one", limit=8)
    assert _source(params).image_shape == (1, 28, 28)
    assert _source(params.model_copy(update={"limit": 9})).image_shape == (3, 32, 32)


@pytest.fixture
def fake_api(monkeypatch):
    calls = []
    monkeypatch.setattr(artifacts, "in_prefect_run", lambda: True)
    monkeypatch.setattr(artifacts, "_create_progress", lambda key, description, p: calls.append(p) or "id")
    monkeypatch.setattr(artifacts, "_update_progress", lambda artifact_id, p: calls.append(p) or True)
    return calls


def test_a_failed_shard_leaves_its_progress_on_the_fixed_grid(tmp_path, fake_api, monkeypatch):
    from tasks.custodian import shard_sums

    import storage.datasets

    data = _grey_folder(tmp_path / "d", per_class=5)
    decode = storage.datasets._decode_image

    def unreadable_record_8(path, *args):  # an error escaping the reader (a bug: no file's bytes or errno can)
        if path == data / "b" / "2.png":
            raise OSError(errno.EIO, "Input/output error", str(path))
        return decode(path, *args)

    monkeypatch.setattr(storage.datasets, "_decode_image", unreadable_record_8)  # record 8 of 10: fails at 70%
    params = ReleaseParams(dataset=f"imagefolder:{data}", target_epsilon=1.0, labelled=True, batch_size=1,
                           cells_per_class=1)  # batches of one image (cells need batch_size >= 16)
    with pytest.raises(ExtractionError):
        shard_sums(params, 0, progress=True)
    assert fake_api == GRID


def test_pipeline_config_sets_the_image_mode(tmp_path):
    values = dict(dataset=f"imagefolder:{tmp_path}", image_size=64, channels=3, out_dir=str(tmp_path / "o"))
    release, _, _ = PipelineParams(**values).stage_params()
    assert (release.image_size, release.channels) == (64, 3)
    with pytest.raises(ValueError, match="image_size must be one of 28, 32, 64"):
        PipelineParams(**{**values, "image_size": 30}).stage_params()


# 4. `--allow-private-reference`: every evaluation number is then an un-noised statistic of training
#    records (FID's reference count is n; a per-class accuracy k/n_c gives the class size away). They
#    stay in the report on disk; Prefect (a shared server) gets a note, and a refusal names no count.

def test_private_reference_numbers_never_reach_prefect_artifacts(tmp_path, monkeypatch):
    import flows.evaluate as ev
    from storage.metrics import MetricRow

    sent = []
    monkeypatch.setattr(ev, "publish_metrics_table", lambda table, description: sent.append(("table", table)))
    monkeypatch.setattr(ev, "publish_markdown", lambda text, key, description: sent.append(("md", text)))
    report = tmp_path / "report.md"
    report.write_text("| acc_logreg | 0.857143 |\n| fid | 12.5 (1234 reference) |\n")
    meta = type("Meta", (), {"neighbouring": "add-remove", "release_id": "r1"})()
    rows = [MetricRow(run="run", metric="acc_logreg", value=0.857143, epsilon=1.0, delta=1e-5, encoder="e", steps=1,
                      release_id="r1"),
            MetricRow(run="run", metric="fid", value=12.5, epsilon=1.0, delta=1e-5, encoder="e", steps=1,
                      release_id="r1", fid_synthetic_count=2048, fid_reference_count=1234)]
    ev.publish_evaluation(report, rows, meta, "run", private_reference=True)
    assert [kind for kind, _ in sent] == ["md"]
    text = sent[0][1]
    assert "0.857" not in text and "1234" not in text and "12.5" not in text and str(report) in text
    sent.clear()
    ev.publish_evaluation(report, rows, meta, "run")  # a public reference: table and report as before
    assert [kind for kind, _ in sent] == ["table", "md"] and sent[0][1][1]["fid_reference_count"] == 1234


def test_a_small_private_reference_is_refused_without_its_size():
    from mepf_core.errors import InvalidArgumentError
    from tasks.evaluation import fid_counts

    with pytest.raises(InvalidArgumentError) as info:
        fid_counts(5000, 3000, 1234, allow_small_fid=False, private_reference=True)
    assert "1234" not in str(info.value) and "reference count (not shown" in str(info.value)
    with pytest.raises(InvalidArgumentError, match="reference count 1234 is below 2,048"):
        fid_counts(5000, 3000, 1234, allow_small_fid=False)


# 5. An inferred image mode is one data-dependent bit outside epsilon (README, "Record selection"). The
#    release records it (`image_mode_source`); what is derived from the release must say so too, or it
#    claims more than it covers: the export's provenance and card, and the release summary artifact.

def test_card_and_summary_say_when_the_image_mode_was_inferred_from_data(tmp_path):
    from storage.dataset_card import render_card
    from storage.provenance import ReleaseInfo, SyntheticInfo

    base = dict(release_id="r", epsilon=1.0, delta=1e-5, encoder="efficientnet-lite0", class_names=None, steps=3)
    inferred = SyntheticInfo(**base, image_mode_source="inferred-from-data")
    assert SyntheticInfo.from_dict(inferred.to_dict()) == inferred  # the export keeps it
    assert "image_mode_source" not in SyntheticInfo(**base).to_dict()  # older files round-trip unchanged
    card = render_card(tmp_path / "s.h5", inferred, count=10, image_shape=(1, 28, 28), version="v")
    covered, not_covered = card.split("## What it does not cover")
    assert "`image_mode_source: inferred-from-data`" in not_covered.split("## Intended use")[0]
    for source in ("flag", "dataset-default", None):
        card = render_card(tmp_path / "s.h5", SyntheticInfo(**base, image_mode_source=source), count=10,
                           image_shape=(1, 28, 28), version="v")
        assert "inferred-from-data" not in card
    assert "image_mode_source" in ReleaseInfo.__dataclass_fields__  # read from the release (from_release)
    md = artifacts.release_summary_markdown({"release_id": "r", "epsilon": 1.0, "delta": 1e-5,
                                             "neighbouring": "add-remove", "sigmas": {"moment1": 2.0},
                                             "shapes": {"moment1": [1, 8]},
                                             "image_mode_source": "inferred-from-data"})
    assert "| image mode chosen by | inferred-from-data (one bit of the data, not covered by epsilon) |" in md
