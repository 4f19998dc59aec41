"""Synthetic-dataset files round-trip in both formats and are written atomically."""

from __future__ import annotations

import io

import numpy as np
import pytest

from storage import synthetic
from storage.synthetic import read_synthetic, write_synthetic

META = {
    "epsilon": 1.0,
    "delta": 1e-5,
    "release_id": "rel-123",
    "encoder": "efficientnet-lite0",
    "class_names": ["a", "b", "c"],
    "steps": 4000,
}


def _data(channels: int, size: int, n: int = 7):
    rng = np.random.default_rng(channels)
    images = rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)
    return images, rng.integers(0, 3, size=n).astype(np.int64)


@pytest.mark.parametrize("suffix", [".h5", ".parquet", ".npz"])
@pytest.mark.parametrize(("channels", "size", "labelled"), [(1, 28, True), (3, 8, False)])
def test_round_trip(tmp_path, suffix, channels, size, labelled):
    images, labels = _data(channels, size)
    path = tmp_path / f"synthetic{suffix}"
    write_synthetic(path, images, labels if labelled else None, META)
    got_images, got_labels, got_meta = read_synthetic(path)
    assert got_images.dtype == np.uint8
    np.testing.assert_array_equal(got_images, images)
    if labelled:
        assert got_labels.dtype == np.int64
        np.testing.assert_array_equal(got_labels, labels)
    else:
        assert got_labels is None
    assert got_meta == META
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "temporary file left behind"


def test_parquet_is_one_png_row_per_image(tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    images, labels = _data(3, 8)
    path = write_synthetic(tmp_path / "s.parquet", images, labels, META)
    table = pq.read_table(path)
    assert table.num_rows == len(images) and table.column_names == ["image", "label"]
    first = np.asarray(Image.open(io.BytesIO(table.column("image")[0].as_py()["bytes"])))
    np.testing.assert_array_equal(first, images[0].transpose(1, 2, 0))
    assert table.column("label").to_pylist() == labels.tolist()


@pytest.mark.parametrize("suffix", [".h5", ".parquet", ".npz"])
def test_failed_write_keeps_the_old_file_and_leaves_no_tmp(tmp_path, monkeypatch, suffix):
    images, labels = _data(1, 8)
    path = write_synthetic(tmp_path / f"s{suffix}", images, labels, META)
    before = path.read_bytes()

    def half_write(tmp, *args):
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, f"_write_{suffix[1:]}", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic(path, images[:3], labels[:3], META)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_unknown_extension_is_rejected(tmp_path):
    images, labels = _data(1, 8)
    with pytest.raises(ValueError, match=r"must end in one of \('.h5', '.parquet', '.npz'\) or '/' \(an image "
                                         r"folder\), got 'x.npy'"):
        write_synthetic(tmp_path / "x.npy", images, labels, META)
    with pytest.raises(ValueError, match="must end in one of"):
        read_synthetic(tmp_path / "x.csv")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("images", "labels", "meta", "message"),
    [
        (np.zeros((2, 1, 4, 4), np.float32), None, META, "uint8"),
        (np.zeros((2, 4, 4), np.uint8), None, META, "N x C x H x W"),
        (np.zeros((2, 1, 4, 4), np.uint8), np.array([0, 5]), META, "label 5 has no entry in class_names"),
        (np.zeros((2, 1, 4, 4), np.uint8), np.array([0]), META, r"labels must have shape \(2,\)"),
        (np.zeros((2, 1, 4, 4), np.uint8), None, {"epsilon": 1.0}, "metadata lacks"),
        (np.zeros((2, 1, 4, 4), np.uint8), None, {**META, "epsilon": float("inf")}, "JSON"),
    ],
)
def test_bad_input_is_rejected_and_writes_nothing(tmp_path, images, labels, meta, message):
    with pytest.raises(ValueError, match=message):
        write_synthetic(tmp_path / "s.h5", images, labels, meta)
    assert list(tmp_path.iterdir()) == []


# --- typed provenance (issue 12) --------------------------------------------------------------------

def test_provenance_is_typed_and_a_missing_field_is_a_named_error(tmp_path):
    import h5py

    from storage.provenance import ProvenanceError, SyntheticInfo
    from storage.synthetic import read_synthetic_dataset

    images, labels = _data(1, 8)
    full = SyntheticInfo(release_id="rel-123", epsilon=1.0, delta=1e-5, encoder="efficientnet-lite0",
                         class_names=("a", "b", "c"), steps=4000, dataset_id="fashion-mnist:train",
                         checkpoint="checkpoint_best.pt", seed=0, neighbouring="add-remove")
    for suffix in (".h5", ".parquet"):
        data = read_synthetic_dataset(write_synthetic(tmp_path / f"t{suffix}", images, labels, full))
        assert data.info == full and SyntheticInfo.from_dict(full.to_dict()) == full
    # a file written before a field existed reads with the documented None, not a made-up value
    old = read_synthetic_dataset(write_synthetic(tmp_path / "old.h5", images, labels, META)).info
    assert old.dataset_id is None and old.seed is None and old.steps == 4000
    # a file lacking a required field is refused on reading, naming the file and the field
    path = tmp_path / "t.h5"
    with h5py.File(path, "r+") as f:
        f.attrs["metadata_json"] = '{"epsilon": 1.0, "delta": 1e-05, "release_id": "r", "encoder": "e", "class_names": null}'
    with pytest.raises(ProvenanceError, match=r"t.h5: metadata lacks \['steps'\]"):
        read_synthetic(path)
    with pytest.raises(ProvenanceError, match="steps must be an integer >= 0"):
        SyntheticInfo.from_dict({**META, "steps": "many"})


def test_quantise_rounds_half_to_even_and_clips():
    import torch

    from storage.synthetic import quantise

    x = torch.tensor([[[[0.0, 1.0, 1.2, -0.1, 0.5 / 255, 1.5 / 255, 0.4]]]])
    assert quantise(x).tolist() == [[[[0, 255, 255, 0, 0, 2, 102]]]] and quantise(x).dtype == np.uint8
    with pytest.raises(ValueError, match="floating point"):
        quantise(torch.zeros(1, 1, 2, 2, dtype=torch.uint8))
