"""Release file: round trip, and every kind of damage raises a named error."""

import h5py
import numpy as np
import pytest

from mepf_core.embedding import FeatureSums, sums_to_noisy_parts
from mepf_core.encoders import EncoderSpec
from mepf_core.privacy.mechanism import design_mechanism
from mepf_core.privacy.sensitivity import Neighbouring
from storage.release import (PartRecord, ReleaseCorruptError, ReleaseError, ReleaseMetadata, ReleaseSchemaError,
                             embedding_to_release, read_release)

K, D = 3, 50


def make_release(path, moments=2):
    mech = design_mechanism(target_epsilon=2.0, target_delta=1e-5, relation=Neighbouring.ADD_REMOVE, labelled=True,
                            moments=moments, norm_bound=1.0, second_moment_bound=1.0)
    rng = np.random.default_rng(0)
    sums = FeatureSums(rng.normal(size=(K, D)), rng.normal(size=(K, D)) if moments == 2 else None, np.full(K, 100.0))
    noisy = sums_to_noisy_parts(sums, mech)
    meta = ReleaseMetadata(
        dataset_id="toy", neighbouring=mech.relation.value, epsilon=mech.epsilon, delta=mech.target_delta,
        target_epsilon=2.0, norm_bound=1.0, second_moment_bound=1.0 if moments == 2 else None, moments=moments,
        labelled=True, class_names=("a", "b", "c"), image_shape=(1, 28, 28),
        encoder=EncoderSpec("efficientnet-lite0", ("stem",), 32, (0.5,) * 3, (0.5,) * 3, weights_sha256="ab" * 32),
        parts=tuple(PartRecord(p.name, noisy[p.name].shape, p.sensitivity, p.sigma, p.noise_multiplier)
                    for p in mech.parts),
    )
    embedding_to_release(path, meta, noisy)
    return meta, noisy


def test_round_trip(tmp_path):
    meta, noisy = make_release(tmp_path / "r.h5")
    rel = read_release(tmp_path / "r.h5")
    assert rel.metadata.release_id == meta.release_id and rel.metadata.encoder == meta.encoder
    for name in noisy:
        np.testing.assert_array_equal(rel.noisy[name], noisy[name])
    means = rel.mean_embeddings()
    np.testing.assert_allclose(means["moment1"], noisy["moment1"] / np.maximum(noisy["counts"], 1)[:, None])
    assert [p.name for p in tmp_path.iterdir()] == ["r.h5"]  # no temporary file left


def test_truncated_file(tmp_path):
    make_release(tmp_path / "r.h5")
    data = (tmp_path / "r.h5").read_bytes()
    for frac in (0.1, 0.5, 0.9, 0.99):
        (tmp_path / "t.h5").write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(ReleaseError):
            read_release(tmp_path / "t.h5")


def test_byte_flips_never_read_as_valid(tmp_path):
    make_release(tmp_path / "r.h5")
    data = bytearray((tmp_path / "r.h5").read_bytes())
    rng = np.random.default_rng(1)
    for i in rng.choice(len(data), size=40, replace=False):
        flipped = bytearray(data)
        flipped[i] ^= 0xFF
        (tmp_path / "f.h5").write_bytes(bytes(flipped))
        try:
            rel = read_release(tmp_path / "f.h5")
        except ReleaseError:
            continue
        # a flip in unused padding may leave the content intact; then it must read back identically
        for name, arr in read_release(tmp_path / "r.h5").noisy.items():
            np.testing.assert_array_equal(rel.noisy[name], arr)


@pytest.mark.parametrize("damage,error", [
    (lambda f: f.__delitem__("moment2"), ReleaseSchemaError),
    (lambda f: f.attrs.__delitem__("metadata_json"), ReleaseSchemaError),
    (lambda f: f.attrs.__setitem__("schema_version", 99), ReleaseSchemaError),
    (lambda f: f["moment1"].__setitem__((0, 0), 123.0), ReleaseCorruptError),
    (lambda f: f["moment1"].__setitem__((0, 0), np.nan), ReleaseCorruptError),
    (lambda f: (f.__delitem__("counts"), f.create_dataset("counts", data=np.zeros(K, np.float32))), ReleaseSchemaError),
    (lambda f: (f.__delitem__("counts"), f.create_dataset("counts", data=np.zeros(K + 1))), ReleaseSchemaError),
    (lambda f: f.create_dataset("clean_means", data=np.zeros(3)), ReleaseSchemaError),
])
def test_field_damage_raises_named_errors(tmp_path, damage, error):
    make_release(tmp_path / "r.h5")
    with h5py.File(tmp_path / "r.h5", "r+") as f:
        damage(f)
    with pytest.raises(error):
        read_release(tmp_path / "r.h5")


def test_metadata_tamper_is_caught(tmp_path):
    make_release(tmp_path / "r.h5")
    with h5py.File(tmp_path / "r.h5", "r+") as f:
        f.attrs["metadata_json"] = f.attrs["metadata_json"].replace('"epsilon": 1.99', '"epsilon": 0.1')
        text = f.attrs["metadata_json"]
        f.attrs["metadata_json"] = text.replace('"target_epsilon": 2.0', '"target_epsilon": 0.5')
    with pytest.raises(ReleaseCorruptError, match="metadata checksum"):
        read_release(tmp_path / "r.h5")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_release(tmp_path / "nope.h5")
