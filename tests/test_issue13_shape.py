"""Issue 13, image folders: size and colour. `mepf release --image-size {28,32,64} --channels {1,3}`;
without --channels an image folder is 1 channel when every image is grayscale, else 3 (28 x 28 for
grayscale, 32 x 32 for RGB); the release records the shape and how it was chosen (`image_mode_source`),
and the public stage builds the matching generator. An impossible choice is refused before anything
is read, written or charged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from flows.cli import main
from mepf_core.features import images_to_features
from mepf_core.public_map import PublicFeatureMap
from mepf_core.train_config import TrainConfig
from storage.datasets import open_dataset
from storage.params import ReleaseParams
from storage.release import ReleaseMetadata, read_release
from tasks.custodian import describe_dataset
from tasks.public import _release_trainer
from tests.helpers import lite0, write_image_folder


def _colour_folder(root: Path, per_class: int = 3, size=(40, 30)) -> Path:
    """ROOT/{a,b}/<i>.png: random RGB images (not square: decoding resizes)."""
    rng = np.random.default_rng(5)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _release(tmp_path: Path, folder: Path, *extra: str) -> list[str]:
    return ["release", "--dataset", f"imagefolder:{folder}", "--target-epsilon", "1", "--out", str(tmp_path / "r.h5"),
            "--batch-size", "4", "--ledger", str(tmp_path / "ledger.jsonl"), "--budget", "5", "--cells-per-class", "1",
            "--json", *extra]  # one cell per class: the generators below train with batches of 4


def _inspect(path: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_grayscale_folder_is_released_as_1x28x28_and_says_it_was_inferred(tmp_path, capsys, caplog):
    folder = write_image_folder(tmp_path / "digits", per_class=3, size=(20, 20))
    assert main(_release(tmp_path, folder)) == 0
    meta = _inspect(tmp_path / "r.h5", capsys)
    assert meta["image_shape"] == [1, 28, 28] and meta["image_mode_source"] == "inferred-from-data"
    assert "grayscale" not in caplog.text.lower()  # the inference logs nothing (no counts, no verdict)
    release = read_release(tmp_path / "r.h5")
    trainer = _release_trainer(release, TrainConfig(steps=1, batch_size=4, device="cpu", eval_samples=4), None)
    assert trainer.generator.image_shape == (1, 28, 28)  # the paper's conv 28x28 generator


def test_a_colour_folder_at_64_builds_a_3x64x64_generator(tmp_path, capsys):
    folder = _colour_folder(tmp_path / "faces")
    assert main(_release(tmp_path, folder, "--image-size", "64", "--channels", "3")) == 0
    meta = _inspect(tmp_path / "r.h5", capsys)
    assert meta["image_shape"] == [3, 64, 64] and meta["image_mode_source"] == "flag"
    release = read_release(tmp_path / "r.h5")
    config = TrainConfig(steps=2, batch_size=4, device="cpu", eval_samples=4, checkpoint_every=2)
    trainer = _release_trainer(release, config, None)
    trainer.train(progress=False)  # two steps against the release's embedding
    assert trainer.step == 2
    with torch.no_grad():
        images = trainer.generator.generate(torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 64, 64)


def test_defaults_and_conversions_of_the_image_mode(tmp_path):
    colour = _colour_folder(tmp_path / "colour")
    grey = write_image_folder(tmp_path / "grey", per_class=2, size=(20, 20))

    def described(folder, **mode):
        params = ReleaseParams(dataset=f"imagefolder:{folder}", target_epsilon=1.0, **mode)
        info = describe_dataset.fn(params)
        return tuple(info["image_shape"]), info["image_mode_source"]

    assert described(colour) == ((3, 32, 32), "inferred-from-data")
    assert described(grey) == ((1, 28, 28), "inferred-from-data")
    assert described(colour, channels=1) == ((1, 28, 28), "flag")
    assert described(grey, channels=3) == ((3, 32, 32), "flag")
    assert described(grey, channels=1, image_size=64) == ((1, 64, 64), "flag")
    assert described(colour, image_size=28) == ((3, 28, 28), "inferred-from-data")
    assert open_dataset("fashion-mnist", "test").image_mode_source == "dataset-default"
    assert open_dataset("fashion-mnist", "test", channels=1, image_size=28).image_shape == (1, 28, 28)

    # --channels 1 on a colour folder converts with Pillow's luma (ITU-R 601), then resizes
    images, _ = open_dataset(f"imagefolder:{colour}", channels=1).load_all()
    with Image.open(colour / "a" / "0.png") as img:
        expected = np.asarray(img.convert("L").resize((28, 28), Image.BILINEAR))
    assert images.shape == (6, 1, 28, 28) and np.array_equal(images[0, 0], expected)
    # --channels 3 on a grey folder repeats the grey value in R, G and B
    images, _ = open_dataset(f"imagefolder:{grey}", channels=3).load_all()
    assert images.shape == (4, 3, 32, 32) and np.array_equal(images[:, 0], images[:, 1])


def test_one_colour_image_makes_the_folder_rgb(tmp_path):
    grey = write_image_folder(tmp_path / "grey", per_class=2, size=(20, 20))
    Image.fromarray(np.full((20, 20, 3), (200, 10, 10), np.uint8)).save(grey / "b" / "9.png")
    assert open_dataset(f"imagefolder:{grey}").image_shape == (3, 32, 32)


@pytest.mark.parametrize("extra,message", [
    (("--image-size", "48"), "image_size must be one of 28, 32, 64, got 48"),
    (("--channels", "2"), "channels must be 1 (grayscale) or 3 (RGB), got 2"),
])
def test_an_impossible_mode_is_refused_before_anything_is_read_or_charged(tmp_path, capsys, monkeypatch, extra,
                                                                          message):
    import storage.datasets

    folder = write_image_folder(tmp_path / "d", per_class=2)
    monkeypatch.setattr(storage.datasets, "_decode_image", lambda *a, **k: pytest.fail("an image was decoded"))
    capsys.readouterr()
    assert main(_release(tmp_path, folder, *extra)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "r.h5").exists() and not (tmp_path / "ledger.jsonl").exists()


def test_a_named_dataset_keeps_its_public_format(tmp_path, capsys):
    with pytest.raises(ValidationError, match="fashion-mnist images are 1x28x28"):
        ReleaseParams(dataset="fashion-mnist", target_epsilon=1.0, channels=3)
    assert ReleaseParams(dataset="fashion-mnist", target_epsilon=1.0, channels=1, image_size=28).channels == 1
    assert main(["release", "--dataset", "mnist", "--target-epsilon", "1", "--out", str(tmp_path / "r.h5"),
                 "--image-size", "32", "--ledger", str(tmp_path / "l.jsonl"), "--budget", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "mnist images are 1x28x28" in err
    assert list(tmp_path.iterdir()) == []


def test_grayscale_reaches_the_encoder_repeated_to_3_channels_on_both_sides():
    """The custodian's features (float64 sums) and the public map's (generated images) of a 1-channel
    image equal those of the same image repeated to 3 channels."""
    fm = lite0()
    grey = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    rgb = grey.repeat(1, 3, 1, 1)
    custodian_grey, _ = images_to_features(fm, grey, norm_bound=1.0)
    custodian_rgb, _ = images_to_features(fm, rgb, norm_bound=1.0)
    assert torch.allclose(custodian_grey, custodian_rgb, rtol=0, atol=1e-6)
    public = PublicFeatureMap(fm, norm_bound=1.0, second_moment_bound=None, moments=1)
    with torch.no_grad():
        public_grey, public_rgb = public(grey)["moment1"], public(rgb)["moment1"]
    assert torch.allclose(public_grey, public_rgb, rtol=0, atol=1e-6)
    assert torch.allclose(public_grey.double(), custodian_grey, rtol=0, atol=1e-4)


def test_older_releases_without_the_field_still_read():
    meta = json.loads(_metadata_json())
    meta.pop("image_mode_source")
    assert ReleaseMetadata.from_json(json.dumps(meta)).image_mode_source is None


def _metadata_json() -> str:
    from mepf_core.encoders import EncoderSpec
    from storage.release import PartRecord

    spec = EncoderSpec(name="efficientnet-lite0", layers=("stem",), image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    parts = (PartRecord("moment1", (2, 4), 1.0, 1.0, 1.0, 2.0**-20), PartRecord("counts", (2,), 1.0, 1.0, 1.0, 1.0))
    return ReleaseMetadata(dataset_id="x", neighbouring="add-remove", epsilon=1.0, delta=1e-5, target_epsilon=1.0,
                           norm_bound=1.0, second_moment_bound=None, moments=1, labelled=True, class_names=("a", "b"),
                           image_shape=(1, 28, 28), encoder=spec, parts=parts,
                           image_mode_source="inferred-from-data").to_json()
