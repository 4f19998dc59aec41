"""Issue 14 section 4: every synthetic export loads with the library a user would reach for.

torchvision ImageFolder (image folder), numpy.load (.npz), pyarrow and Hugging Face `datasets`
(.parquet), h5py (.h5); each carries its provenance, and `mepf evaluate` reads every format back.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest

from storage.provenance import SyntheticInfo
from storage.synthetic import class_folder_names, read_synthetic_dataset, write_synthetic

FMNIST_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
INFO = SyntheticInfo(release_id="rel-14", epsilon=2.0, delta=1e-5, encoder="efficientnet-lite0",
                     class_names=FMNIST_NAMES, steps=5, dataset_id="fashion-mnist:train", checkpoint="checkpoint_best.pt",
                     seed=0, neighbouring="add-remove", release_sha256="ab" * 32, encoder_weights_sha256="cd" * 32)
UNLABELLED = SyntheticInfo(release_id="rel-u", epsilon=1.0, delta=1e-5, encoder="efficientnet-lite0",
                           class_names=None, steps=3)


def _data(channels: int, n: int = 12, size: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)
    labels = np.array([1, 0, 9, 0, 3, 1, 9, 0, 1, 3, 9, 0][:n], dtype=np.int64)  # classes 2, 4-8 draw nothing
    return images, labels


# --- image folder: torchvision ImageFolder -----------------------------------------------------------

def test_image_folder_loads_with_torchvision_with_the_class_names(tmp_path):
    from PIL import Image
    from torchvision.datasets import ImageFolder

    images, labels = _data(1)
    out = write_synthetic(f"{tmp_path}/synthetic/", images, labels, INFO)  # a trailing "/" names a folder
    folders = class_folder_names(FMNIST_NAMES)
    assert folders[0] == "T-shirt_top" and folders[9] == "Ankle boot"
    ds = ImageFolder(str(out))
    assert ds.classes == sorted(["T-shirt_top", "Trouser", "Ankle boot", "Dress"])  # the classes drawn
    assert len(ds) == len(images)
    seen = set()
    for (path, target), (image, _) in zip(ds.samples, ds):
        row = int(path.rsplit("/", 1)[1].removesuffix(".png"))
        seen.add(row)
        assert ds.classes[target] == folders[labels[row]]  # the folder names the image's class
        np.testing.assert_array_equal(np.asarray(Image.open(path)), images[row, 0])
        np.testing.assert_array_equal(np.asarray(image.convert("L")), images[row, 0])  # ImageFolder's RGB loader
    assert seen == set(range(len(images)))
    record = json.loads((out / "provenance.json").read_text())
    assert record["metadata"] == INFO.to_dict() and record["class_folders"] == folders and record["count"] == 12
    back = read_synthetic_dataset(out)  # our reader restores the row order and the labels
    np.testing.assert_array_equal(back.images, images)
    np.testing.assert_array_equal(back.labels, labels)
    assert back.info == INFO
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"], "temporary folder left behind"


def test_unlabelled_rgb_image_folder_is_one_class(tmp_path):
    from torchvision.datasets import ImageFolder

    images, _ = _data(3, n=5)
    out = write_synthetic(f"{tmp_path}/u/", images, None, UNLABELLED)
    ds = ImageFolder(str(out))
    assert ds.classes == ["unlabelled"] and len(ds) == 5
    back = read_synthetic_dataset(out)
    np.testing.assert_array_equal(back.images, images)
    assert back.labels is None and back.info == UNLABELLED
    first = np.asarray(ds[0][0])  # H x W x 3
    np.testing.assert_array_equal(first, images[0].transpose(1, 2, 0))


def test_image_folder_replaces_only_an_empty_folder_or_an_earlier_export(tmp_path):
    from mepf_core.errors import PathExistsError

    images, labels = _data(1)
    existing = tmp_path / "empty"
    existing.mkdir()
    write_synthetic(existing, images, labels, INFO)  # an existing folder is an image-folder target
    write_synthetic(existing, images[:4], labels[:4], INFO)  # an earlier export is replaced whole
    assert len(read_synthetic_dataset(existing).images) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(PathExistsError, match="not empty and is not a synthetic image folder"):
        write_synthetic(foreign, images, labels, INFO)
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]


# --- .npz: numpy.load ------------------------------------------------------------------------------

def test_npz_loads_with_numpy_channels_last(tmp_path):
    images, labels = _data(3)
    path = write_synthetic(tmp_path / "s.npz", images, labels, INFO)
    with np.load(path) as data:  # allow_pickle=False: nothing in it needs pickle
        assert data["x"].dtype == np.uint8 and data["x"].shape == (12, 8, 8, 3)
        np.testing.assert_array_equal(data["x"], images.transpose(0, 2, 3, 1))
        assert data["y"].dtype == np.int64 and data["y"].tolist() == labels.tolist()
        assert data["class_names"].tolist() == list(FMNIST_NAMES)
        assert json.loads(str(data["metadata_json"])) == INFO.to_dict()
    gray = write_synthetic(tmp_path / "g.npz", images[:, :1], None, UNLABELLED)
    with np.load(gray) as data:
        assert data["x"].shape == (12, 8, 8, 1) and "y" not in data.files and "class_names" not in data.files
    back = read_synthetic_dataset(gray)
    np.testing.assert_array_equal(back.images, images[:, :1])
    assert back.labels is None and back.info == UNLABELLED


# --- .parquet: pyarrow and Hugging Face datasets ------------------------------------------------------

def test_parquet_image_column_is_the_hugging_face_image_struct(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, labels = _data(1)
    path = write_synthetic(tmp_path / "s.parquet", images, labels, INFO)
    schema = pq.read_schema(path)
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert schema.field("label").type == pa.int64()
    hf = json.loads(schema.metadata[b"huggingface"])
    assert hf["info"]["features"] == {"image": {"_type": "Image"},
                                      "label": {"names": list(FMNIST_NAMES), "_type": "ClassLabel"}}
    assert json.loads(schema.metadata[b"metadata_json"]) == INFO.to_dict()
    assert pq.read_table(path).column("image")[3].as_py()["path"] == "000003.png"


def test_parquet_decodes_as_an_image_feature_in_hugging_face_datasets(tmp_path):
    import datasets

    images, labels = _data(1)
    path = write_synthetic(tmp_path / "s.parquet", images, labels, INFO)
    ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "hf-cache"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert ds.features["label"].names == list(FMNIST_NAMES)
    assert len(ds) == 12
    for i in (0, 2, 11):
        row = ds[i]
        np.testing.assert_array_equal(np.asarray(row["image"]), images[i, 0])  # a decoded PIL image
        assert ds.features["label"].int2str(row["label"]) == FMNIST_NAMES[labels[i]]
    rgb = write_synthetic(tmp_path / "u.parquet", _data(3, n=3)[0], None, UNLABELLED)
    uds = datasets.Dataset.from_parquet(str(rgb), cache_dir=str(tmp_path / "hf-cache"))
    assert list(uds.features) == ["image"] and isinstance(uds.features["image"], datasets.Image)
    np.testing.assert_array_equal(np.asarray(uds[1]["image"]), _data(3, n=3)[0][1].transpose(1, 2, 0))


def test_parquet_of_the_first_layout_is_still_read(tmp_path):
    """Files written before issue 14 held raw PNG bytes in `image`: they read back unchanged."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    images, labels = _data(1, n=3)

    def png(a):
        buffer = io.BytesIO()
        Image.fromarray(a[0]).save(buffer, format="PNG")
        return buffer.getvalue()

    table = pa.table({"image": pa.array([png(a) for a in images], pa.binary()), "label": pa.array(labels)})
    table = table.replace_schema_metadata({"metadata_json": json.dumps(INFO.to_dict()), "image_shape": "[1, 8, 8]"})
    pq.write_table(table, tmp_path / "old.parquet")
    back = read_synthetic_dataset(tmp_path / "old.parquet")
    np.testing.assert_array_equal(back.images, images)
    np.testing.assert_array_equal(back.labels, labels)


# --- from a trained run: `mepf sample` writes each format and its card, evaluation reads each ---------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from mepf_core.training import TrainConfig
    from storage.release import read_release
    from tasks.public import train_generator
    from tests.helpers import tiny_release

    root = tmp_path_factory.mktemp("export-run")
    release_path = tiny_release(root / "release.h5", classes=("T-shirt/top", "Trouser"), per_class=2)
    train_generator(read_release(release_path), root / "run",
                    TrainConfig(steps=1, batch_size=4, checkpoint_every=1, eval_samples=4, device="cpu"), progress=False)
    return root


@pytest.mark.parametrize("out", ["synthetic.h5", "synthetic.parquet", "synthetic.npz", "images/"])
def test_sample_writes_each_format_with_its_card_and_evaluation_reads_it(trained_run, tmp_path, out):
    from storage.dataset_card import card_path
    from tasks.evaluation import load_synthetic
    from tasks.public import sample_synthetic
    from tests.helpers import lite0

    result = sample_synthetic(trained_run / "run", 6, f"{tmp_path}/{out}")
    images, labels, info = load_synthetic.fn(result["path"])
    assert images.shape == (6, 1, 28, 28) and labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert info.class_names == ("T-shirt/top", "Trouser") and info.steps == 1 and info.seed == 0
    assert info.release_sha256 == hashlib.sha256((trained_run / "release.h5").read_bytes()).hexdigest()
    assert info.encoder_weights_sha256 == lite0().spec.weights_sha256
    card = card_path(result["path"])
    assert result["card"] == str(card.resolve()) and card.is_file()
    assert card.name == ("DATASET_CARD.md" if out.endswith("/") else f"{out}.DATASET_CARD.md")
    text = card.read_text()
    assert f"| release id | `{info.release_id}` |" in text and info.release_sha256 in text
    assert "Not measured yet" in text
    if out.endswith("/"):
        from torchvision.datasets import ImageFolder

        assert ImageFolder(result["path"]).classes == ["T-shirt_top", "Trouser"]


def test_sample_refuses_an_unknown_format_before_any_work(tmp_path):
    from storage.params import SampleParams
    from tasks.public import sample_synthetic

    with pytest.raises(ValueError, match=r"or '/' \(an image folder\), got 'x.csv'"):
        sample_synthetic(tmp_path / "no-run", 3, tmp_path / "x.csv")  # before looking for a checkpoint
    with pytest.raises(ValueError, match="got 'x.csv'"):
        SampleParams(run="r", n=3, out="x.csv")
    assert SampleParams(run="r", n=3, out="dir/").out == "dir/"


def test_mepf_sample_cli_writes_an_image_folder_for_a_trailing_slash(trained_run, tmp_path, capsys):
    """`mepf sample --out DIR/`: the slash survives the CLI, the parameters and the flow."""
    from flows.cli import main

    out = f"{tmp_path}/fmnist-synthetic/"
    assert main(["sample", "--run", str(trained_run / "run"), "--n", "4", "--out", out, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    folder = tmp_path / "fmnist-synthetic"
    assert result["path"] == str(folder.resolve()) and result["card"] == str(folder.resolve() / "DATASET_CARD.md")
    assert sorted(p.name for p in folder.iterdir()) == ["DATASET_CARD.md", "T-shirt_top", "Trouser", "provenance.json"]
    assert main(["sample", "--run", str(trained_run / "run"), "--n", "4", "--out", f"{tmp_path}/x.csv"]) == 2
    assert "got 'x.csv'" in capsys.readouterr().err
