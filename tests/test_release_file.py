"""Release file: round trip, every kind of damage raises a named error, and writes never overwrite."""

import contextlib
import json
import re
import shutil
import threading

import h5py
import numpy as np
import pytest

from mepf_core.embedding import sums_to_noisy_parts
from mepf_core.encoders import EncoderSpec
from mepf_core.privacy.mechanism import design_mechanism
from mepf_core.privacy.sensitivity import Neighbouring
from storage.atomic import TargetExistsError, atomic_path, atomic_write_bytes
from storage.release import (PartRecord, ReleaseCorruptError, ReleaseError, ReleaseExistsError, ReleaseMetadata,
                             ReleaseSchemaError, embedding_to_release, read_release)
from tests.helpers import lattice_sums

K, D = 3, 50


def make_release(path, moments=2):
    mech = design_mechanism(target_epsilon=2.0, target_delta=1e-5, relation=Neighbouring.ADD_REMOVE, labelled=True,
                            moments=moments, norm_bound=1.0, second_moment_bound=1.0)
    rng = np.random.default_rng(0)
    sums = lattice_sums(rng.normal(size=(K, D)), rng.normal(size=(K, D)) if moments == 2 else None, np.full(K, 100.0))
    noisy = sums_to_noisy_parts(sums, mech)
    meta = ReleaseMetadata(
        dataset_id="toy", neighbouring=mech.relation.value, epsilon=mech.epsilon, delta=mech.target_delta,
        target_epsilon=2.0, norm_bound=1.0, second_moment_bound=1.0 if moments == 2 else None, moments=moments,
        labelled=True, class_names=("a", "b", "c"), image_shape=(1, 28, 28),
        encoder=EncoderSpec("efficientnet-lite0", ("stem",), 32, (0.5,) * 3, (0.5,) * 3, weights_sha256="ab" * 32),
        parts=tuple(PartRecord.of(p, noisy[p.name].shape)
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


# --- the final step never overwrites (issue 11, item 4) --------------------------------------------

def test_exclusive_write_refuses_a_target_created_during_the_write(tmp_path):
    target = tmp_path / "r.bin"
    with pytest.raises(TargetExistsError, match="created by another writer"):
        with atomic_path(target, exclusive=True) as tmp:
            tmp.write_bytes(b"loser")
            target.write_bytes(b"winner")  # another process finishes first, after our existence check
    assert target.read_bytes() == b"winner"
    assert [p.name for p in tmp_path.iterdir()] == ["r.bin"]  # the loser's temporary file is gone


def test_exclusive_write_refuses_an_existing_target_and_a_dangling_symlink(tmp_path):
    (tmp_path / "a").write_bytes(b"old")
    (tmp_path / "b").symlink_to(tmp_path / "nowhere")
    for name in ("a", "b"):
        with pytest.raises(TargetExistsError, match="already exists"):
            with atomic_path(tmp_path / name, exclusive=True) as tmp:
                tmp.write_bytes(b"new")
    assert (tmp_path / "a").read_bytes() == b"old" and (tmp_path / "b").is_symlink()
    assert not (tmp_path / "nowhere").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    atomic_write_bytes(tmp_path / "a", b"replaced")  # the default mode still replaces (checkpoints, tables)
    assert (tmp_path / "a").read_bytes() == b"replaced"


def test_exclusive_writers_racing_for_one_name_exactly_one_wins(tmp_path):
    target, writers = tmp_path / "r.bin", 6
    barrier, outcomes = threading.Barrier(writers), []

    def write(i: int) -> None:
        try:
            with atomic_path(target, exclusive=True) as tmp:
                tmp.write_bytes(f"writer {i}".encode())
                barrier.wait(30)  # every writer has passed its existence check and written its file
            outcomes.append(("won", i))
        except TargetExistsError:
            outcomes.append(("lost", i))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    won = [i for kind, i in outcomes if kind == "won"]
    assert len(won) == 1 and len(outcomes) == writers
    assert target.read_bytes() == f"writer {won[0]}".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["r.bin"]


def test_release_loser_gets_a_clear_error_winner_intact_and_its_charge_stays(tmp_path, monkeypatch):
    """The custodian's task path: charge, noise, write; another writer takes the name mid-write."""
    from prefect.logging import disable_run_logger

    import storage.release
    from storage.params import ReleaseParams
    from tasks.custodian import calibrate, charge_noise_and_release, check_budget

    winner_meta, _ = make_release(tmp_path / "winner.h5")
    out, ledger = tmp_path / "r.h5", tmp_path / "ledger.jsonl"
    real_atomic_path = storage.release.atomic_path

    @contextlib.contextmanager
    def racing(target, **kwargs):
        with real_atomic_path(target, **kwargs) as tmp:
            yield tmp  # the loser writes its complete file here ...
            shutil.copyfile(tmp_path / "winner.h5", target)  # ... and the winner's appears before its final step

    monkeypatch.setattr(storage.release, "atomic_path", racing)
    params = ReleaseParams(target_epsilon=1.0, out=str(out), ledger=str(ledger), budget=5.0, dataset_id="ds",
                           labelled=True, moments=2)
    sums = lattice_sums(np.random.default_rng(2).normal(size=(K, D)), np.random.default_rng(3).random((K, D)),
                       np.full(K, 30.0))
    info = {"class_names": ("a", "b", "c"), "image_shape": (1, 28, 28), "encoder": winner_meta.encoder}
    with disable_run_logger():
        mech = calibrate.fn(params)
        check_budget.fn(params, mech)  # sets the budget, as the flow does
        with pytest.raises(FileExistsError, match=r"release ([0-9a-f]{32}) was not written: .* created by another "
                                                  "writer") as err:
            charge_noise_and_release.fn(params, mech, sums, info)
    assert isinstance(err.value, ReleaseExistsError)
    loser_id = re.search(r"release ([0-9a-f]{32})", str(err.value)).group(1)
    assert out.read_bytes() == (tmp_path / "winner.h5").read_bytes()
    assert read_release(out).metadata.release_id == winner_meta.release_id != loser_id
    charges = [json.loads(line) for line in ledger.read_text().splitlines() if '"charge"' in line]
    assert [c["release_id"] for c in charges] == [loser_id]  # never under-count: the loser's charge stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.jsonl", "r.h5", "winner.h5"]
