"""A release proves its own claim (issue 11, item 5): epsilon recomputed on every read, and untrusted
HDF5 refused before any array is read.

Forged files are written with h5py directly, with SHA-256 checksums recomputed, so every integrity
check passes and only the claim or the storage checks can catch them.
"""

from __future__ import annotations

import hashlib
import json
import math
import tracemalloc
from dataclasses import replace

import h5py
import numpy as np
import pytest

from flows.cli import main
from mepf_core.embedding import sums_to_noisy_parts
from mepf_core.encoders import EncoderSpec, build_feature_map
from mepf_core.privacy.calibration import epsilon_spent
from mepf_core.privacy.mechanism import design_mechanism
from mepf_core.privacy.sensitivity import Neighbouring
from storage.release import (SCHEMA_VERSION, PartRecord, ReleaseClaimError, ReleaseMetadata, ReleaseSchemaError,
                             ReleaseStorageError, embedding_to_release, on_lattice, read_release)
from tests.helpers import lattice_sums

K, D = 3, 50
LITE_STEM = EncoderSpec("efficientnet-lite0", ("stem",), 32, (0.5,) * 3, (0.5,) * 3, weights_sha256="ab" * 32)
VGG_ALL_512 = EncoderSpec("vgg19", tuple(f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)), 512, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def honest_metadata(*, relation=Neighbouring.ADD_REMOVE, labelled=True, moments=1, target_epsilon=1.0,
                    k=K, d=D, encoder=LITE_STEM, n=120) -> tuple[ReleaseMetadata, dict]:
    """Metadata and noisy arrays exactly as the custodian makes them (tasks.custodian)."""
    k = k if labelled else 1
    mech = design_mechanism(target_epsilon=target_epsilon, target_delta=1e-5, relation=relation, labelled=labelled,
                            moments=moments, norm_bound=1.0, second_moment_bound=1.0)
    rng = np.random.default_rng(0)
    sums = lattice_sums(rng.normal(size=(k, d)), rng.random((k, d)) if moments == 2 else None,
                       np.full(k, n / k))
    noisy = sums_to_noisy_parts(sums, mech)
    meta = ReleaseMetadata(
        dataset_id="toy", neighbouring=relation.value, epsilon=mech.epsilon, delta=1e-5,
        target_epsilon=target_epsilon, norm_bound=1.0, second_moment_bound=1.0 if moments == 2 else None,
        moments=moments, labelled=labelled, class_names=("a", "b", "c")[:k] if labelled else ("all",),
        image_shape=(1, 28, 28), encoder=encoder,
        parts=tuple(PartRecord.of(p, noisy[p.name].shape) for p in mech.parts),
        n_public=None if mech.part("counts").noised else n,
    )
    return meta, noisy


def forge(path, meta: ReleaseMetadata | dict, arrays: dict, skip: tuple[str, ...] = (), **dataset_kwargs) -> None:
    """Write a release the way a forger would: any metadata, checksums recomputed, any HDF5 options.

    Parts named in `skip` are checksummed but not written (the caller writes them its own way)."""
    d = json.loads(meta.to_json()) if isinstance(meta, ReleaseMetadata) else meta
    for p in d["parts"]:
        p["sha256"] = hashlib.sha256(np.ascontiguousarray(arrays[p["name"]], dtype=np.float64).tobytes()).hexdigest()
    text = json.dumps(d, sort_keys=True)
    with h5py.File(path, "w") as f:
        for name, a in arrays.items():
            if name in skip:
                continue
            f.create_dataset(name, data=a, **dataset_kwargs.get(name, {}))
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["metadata_json"] = text
        f.attrs["metadata_sha256"] = hashlib.sha256(text.encode()).hexdigest()


def with_parts(meta: ReleaseMetadata, **changes) -> ReleaseMetadata:
    """`changes` maps part name -> dict of PartRecord fields to replace."""
    return replace(meta, parts=tuple(replace(p, **changes.get(p.name, {})) for p in meta.parts))


def exact_sums_tiny_sigma(path) -> None:
    """The issue's reproduction: exact sums, sigma 1e-300, a claimed epsilon of 0.01."""
    meta, _ = honest_metadata(target_epsilon=0.01)
    rng = np.random.default_rng(5)
    exact = {"moment1": rng.normal(size=(K, D)), "counts": np.array([40.0, 41.0, 42.0])}
    forged = with_parts(meta, **{p.name: {"sigma": 1e-300, "noise_multiplier": 1e-300 / p.sensitivity}
                                 for p in meta.parts})
    forge(path, replace(forged, epsilon=0.01, target_epsilon=0.01), exact)


# --- the claim ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("relation", list(Neighbouring))
@pytest.mark.parametrize("labelled", [True, False])
@pytest.mark.parametrize("moments,target", [(1, 0.2), (2, 1.0), (2, 10.0)])
def test_honest_releases_prove_their_epsilon(tmp_path, relation, labelled, moments, target):
    meta, noisy = honest_metadata(relation=relation, labelled=labelled, moments=moments, target_epsilon=target)
    embedding_to_release(tmp_path / "r.h5", meta, noisy)
    rel = read_release(tmp_path / "r.h5")
    multipliers = [p.noise_multiplier for p in meta.parts if p.noise_multiplier is not None]
    assert rel.epsilon_recomputed == epsilon_spent(multipliers, delta=1e-5) == meta.epsilon
    assert rel.epsilon_recomputed <= target
    exact = [p.name for p in rel.metadata.parts if p.noise_multiplier is None]
    assert exact == (["counts"] if relation is Neighbouring.REPLACE_ONE and not labelled else [])


def test_the_issue_forgery_is_refused_by_read_inspect_and_train(tmp_path, capsys):
    exact_sums_tiny_sigma(tmp_path / "forged.h5")
    with pytest.raises(ReleaseClaimError, match="epsilon cannot be recomputed from noise multipliers"):
        read_release(tmp_path / "forged.h5")
    assert main(["inspect", str(tmp_path / "forged.h5")]) == 2
    assert main(["inspect", str(tmp_path / "forged.h5"), "--json"]) == 2
    assert main(["train", "--release", str(tmp_path / "forged.h5"), "--out", str(tmp_path / "run"),
                 "--steps", "1", "--device", "cpu"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mepf ")]
    assert [line.split(": /")[0] for line in lines] == [
        "mepf inspect: error: ReleaseClaimError", "mepf inspect: error: ReleaseClaimError",
        "mepf train: error: ReleaseClaimError"]
    assert all("epsilon cannot be recomputed from noise multipliers [1e-300, 1e-300]" in line for line in lines)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_tiny_recorded_norm_bound_cannot_hide_exact_sums(tmp_path):
    """Exact sums of unit-norm features, recorded as if C were 1e-30 (so sensitivity and sigma are
    tiny and epsilon recomputes to the claim): the sums are far larger than C x counts allows."""
    rng = np.random.default_rng(3)
    unit = rng.normal(size=(120, D))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    labels = np.arange(120) % K
    exact_sums = np.stack([unit[labels == c].sum(0) for c in range(K)])
    tiny = 2.0**-100  # a power of two: every float sum above 2^-68 lies on its lattice (unit 2^-120)
    mech = design_mechanism(target_epsilon=0.01, target_delta=1e-5, relation=Neighbouring.ADD_REMOVE,
                            labelled=True, moments=1, norm_bound=tiny, second_moment_bound=1.0)
    noisy = {"moment1": exact_sums, "counts": np.full(K, 40.0)}  # noise of sigma ~1e-28 would hide nothing
    meta, _ = honest_metadata(target_epsilon=0.01)
    meta = replace(meta, norm_bound=tiny, epsilon=mech.epsilon, parts=tuple(
        PartRecord.of(p, noisy[p.name].shape) for p in mech.parts))
    assert on_lattice(noisy["moment1"], mech.part("moment1").lattice_unit)  # the lattice check cannot see it
    forge(tmp_path / "tiny-c.h5", meta, noisy)
    with pytest.raises(ReleaseClaimError, match=r"part 'moment1', class \d: the released sum has norm .* at most"):
        read_release(tmp_path / "tiny-c.h5")
    with pytest.raises(ReleaseClaimError, match="the recorded bound is not the one the sums were made with"):
        embedding_to_release(tmp_path / "tiny-c-written.h5", meta, noisy)  # and the writer never makes one
    assert main(["inspect", str(tmp_path / "tiny-c.h5")]) == 2


@pytest.mark.parametrize("delta", [0.5, 0.3, 2e-3, 1e-320])
def test_the_reader_enforces_the_writers_delta_limits(tmp_path, delta):
    """A release at delta 0.5 (z = 0.8, epsilon 0) is as refused on reading as on writing."""
    meta, noisy = honest_metadata()
    meta = replace(meta, delta=delta, epsilon=0.0 if delta >= 0.3 else meta.epsilon)
    forge(tmp_path / "d.h5", meta, noisy)
    with pytest.raises(ReleaseClaimError, match=r"delta must be (<= 0.001|>= 2.22507e-308)"):
        read_release(tmp_path / "d.h5")


def _claims():
    """(name, forged metadata from an honest one, message): each breaks one link of the claim."""
    def part(m, name):
        return m.part(name)

    return [
        ("sigma is not z x sensitivity (z honest, sigma 1e-300)",
         lambda m: with_parts(m, moment1={"sigma": 1e-300}), r"sigma 1e-300 != noise_multiplier"),
        ("claimed epsilon below what the noise gives",
         lambda m: replace(m, epsilon=0.01), r"claims epsilon 0.01, but its noise multipliers .* give epsilon 0.99"),
        ("honest epsilon above the target",
         lambda m: replace(m, target_epsilon=0.5), r"exceeds the release's target_epsilon 0.5"),
        ("lattice unit that is not the bound's",
         lambda m: with_parts(m, moment1={"lattice_unit": 2.0**-19}), r"records lattice_unit 1.9073486328125e-06, but its bound gives"),
        ("norm bound below the lattice's range",
         lambda m: replace(m, norm_bound=1e-320), r"norm_bound must be >= 2\^-1002"),
        ("doubled norm bound, old sensitivity",
         lambda m: replace(m, norm_bound=2.0), r"records sensitivity 1.0, but add-remove with norm_bound 2.0 gives 2.0"),
        ("halved sensitivity and sigma (z unchanged)",
         lambda m: with_parts(m, moment1={"sensitivity": 0.5, "sigma": part(m, "moment1").sigma / 2}),
         r"records sensitivity 0.5, but add-remove with norm_bound 1.0 gives 1.0"),
        ("counts released exactly under add-remove",
         lambda m: with_parts(m, counts={"sensitivity": 0.0, "sigma": 0.0, "noise_multiplier": None}),
         r"'counts' records sensitivity 0.0, but labelled counts under add-remove gives 1.0"),
        ("noised part with no noise multiplier",
         lambda m: with_parts(m, moment1={"noise_multiplier": None}), r"records no noise"),
        ("relation relabelled replace-one",
         lambda m: replace(m, neighbouring="replace-one"), r"replace-one with norm_bound 1.0 gives 2.0"),
        ("unknown relation", lambda m: replace(m, neighbouring="add-one"), r"neighbouring must be one of"),
        ("delta 0.5 -> 1.5", lambda m: replace(m, delta=1.5), r"delta must be in \(0, 1\), got 1.5"),
        ("delta 0", lambda m: replace(m, delta=0.0), r"delta must be in \(0, 1\), got 0.0"),
        ("n recorded as public under add-remove", lambda m: replace(m, n_public=120), r"n is private"),
        ("epsilon as text", lambda m: replace(m, epsilon="0.99"), r"epsilon must be a finite number"),
        ("second-moment bound on a 1-moment release",
         lambda m: replace(m, second_moment_bound=1.0), r"1-moment release records second_moment_bound"),
    ]


@pytest.mark.parametrize("name,forge_meta,message", _claims(), ids=[c[0] for c in _claims()])
def test_every_broken_claim_is_refused(tmp_path, name, forge_meta, message):
    meta, noisy = honest_metadata(target_epsilon=1.0)
    assert 0.99 < meta.epsilon <= 1.0
    forge(tmp_path / "f.h5", forge_meta(meta), noisy)
    with pytest.raises(ReleaseClaimError, match=message):
        read_release(tmp_path / "f.h5")
    with pytest.raises(ReleaseClaimError, match=message):  # nor does the writer write such a claim
        embedding_to_release(tmp_path / "w.h5", forge_meta(meta), noisy)
    assert not (tmp_path / "w.h5").exists()


def test_exact_counts_only_where_the_relation_makes_n_public(tmp_path):
    meta, noisy = honest_metadata(relation=Neighbouring.REPLACE_ONE, labelled=False, n=120)
    noisy["counts"] = np.array([120.0])
    forge(tmp_path / "ok.h5", meta, noisy)
    assert read_release(tmp_path / "ok.h5").metadata.n_public == 120
    forge(tmp_path / "no-n.h5", replace(meta, n_public=None), noisy)
    with pytest.raises(ReleaseClaimError, match=r"parts \['counts'\] are exact .* but n_public is None"):
        read_release(tmp_path / "no-n.h5")
    forge(tmp_path / "other-n.h5", meta, {**noisy, "counts": np.array([121.0])})
    with pytest.raises(ReleaseClaimError, match="exact counts do not equal the recorded public n"):
        read_release(tmp_path / "other-n.h5")
    forge(tmp_path / "z-inf.h5", with_parts(meta, counts={"noise_multiplier": math.inf}), noisy)
    with pytest.raises(ReleaseClaimError, match="is exact .* sensitivity 0"):
        read_release(tmp_path / "z-inf.h5")


# --- shapes against the encoder and the classes -------------------------------------------------------

@pytest.mark.parametrize("change,message", [
    (lambda m: with_parts(m, moment1={"shape": (K, 10**9)}, counts={}), r"'moment1' has shape \(3, \d+\), expected \(3, 1000000000\)"),
    (lambda m: with_parts(m, moment1={"shape": (K + 1, D)}), r"expected \[3, D\] for 3 classes"),
    (lambda m: with_parts(m, counts={"shape": (K + 1,)}), r"counts have shape \[4\], expected \[3\]"),
    (lambda m: replace(m, labelled=False), r"an unlabelled release has 1 class, metadata names 3"),
    (lambda m: replace(m, moments=2), r"parts \['counts', 'moment1'\] do not match moments=2"),
])
def test_metadata_shapes_are_checked_before_any_array_is_read(tmp_path, monkeypatch, change, message):
    meta, noisy = honest_metadata()
    forge(tmp_path / "f.h5", change(meta), noisy)
    reads = _count_reads(monkeypatch)
    with pytest.raises(ReleaseSchemaError, match=message):
        read_release(tmp_path / "f.h5")
    assert reads == []


# --- untrusted HDF5: refused before reading ------------------------------------------------------------

def _count_reads(monkeypatch) -> list:
    """Record every read of dataset values (h5py's __getitem__ and read_direct)."""
    reads = []
    real_get, real_direct = h5py.Dataset.__getitem__, h5py.Dataset.read_direct

    def get(self, *args, **kwargs):
        reads.append(self.name)
        return real_get(self, *args, **kwargs)

    def direct(self, *args, **kwargs):
        reads.append(self.name)
        return real_direct(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", get)
    monkeypatch.setattr(h5py.Dataset, "read_direct", direct)
    return reads


def test_a_gzip_bomb_is_refused_without_being_read(tmp_path, monkeypatch):
    """16 MB of zeros in ~20 KB of gzip, with consistent metadata: refused by its filter, nothing read."""
    meta, _ = honest_metadata(labelled=False, encoder=VGG_ALL_512, d=2_000_000)
    bomb = {"moment1": np.zeros((1, 2_000_000)), "counts": np.array([5.0])}
    forge(tmp_path / "bomb.h5", meta, bomb, moment1={"compression": "gzip", "compression_opts": 9,
                                                      "chunks": (1, 500_000)})
    del bomb
    assert (tmp_path / "bomb.h5").stat().st_size < 100_000
    reads = _count_reads(monkeypatch)
    tracemalloc.start()
    try:
        with pytest.raises(ReleaseStorageError, match=r"'moment1' is filtered \(compression 'gzip'\)"):
            read_release(tmp_path / "bomb.h5")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reads == [] and peak < 2_000_000  # the data would be 16 MB (and 32 MB peak with the checksum copy)


def _external_link(f, data, tmp):
    with h5py.File(tmp / "other.h5", "w") as g:
        g.create_dataset("x", data=data)
    f["moment1"] = h5py.ExternalLink(str(tmp / "other.h5"), "/x")


def _soft_link(f, data, tmp):
    f["moment1"] = h5py.SoftLink("/counts")


def _external_storage(f, data, tmp):
    (tmp / "raw.bin").write_bytes(data.astype("<f8").tobytes())
    f.create_dataset("moment1", shape=data.shape, dtype="<f8", external=[(str(tmp / "raw.bin"), 0, data.nbytes)])


def _virtual(f, data, tmp):
    with h5py.File(tmp / "other.h5", "w") as g:
        g.create_dataset("x", data=data)
    layout = h5py.VirtualLayout(shape=data.shape, dtype="f8")
    layout[:] = h5py.VirtualSource(str(tmp / "other.h5"), "x", shape=data.shape)
    f.create_virtual_dataset("moment1", layout)


ATTACKS = {  # how moment1 is written (the metadata stays honest and checksummed) -> expected message
    "external link": (_external_link, r"'moment1' is a ExternalLink, not a dataset stored in the file"),
    "soft link": (_soft_link, r"'moment1' is a SoftLink"),
    "external storage": (_external_storage, r"stores its data in external files"),
    "virtual dataset": (_virtual, r"is virtual"),
    "chunked, unfiltered": (lambda f, data, tmp: f.create_dataset("moment1", data=data, chunks=(1, 10)),
                            r"not stored contiguously"),
    "shuffle filter": (lambda f, data, tmp: f.create_dataset("moment1", data=data, shuffle=True, chunks=(1, 10)),
                       r"is filtered"),
    "group": (lambda f, data, tmp: f.create_group("moment1"), r"'moment1' is not a dataset"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_foreign_hdf5_structures_are_refused_before_reading(tmp_path, monkeypatch, attack):
    write_moment1, message = ATTACKS[attack]
    meta, noisy = honest_metadata()
    forge(tmp_path / "f.h5", meta, noisy, skip=("moment1",))
    with h5py.File(tmp_path / "f.h5", "r+") as f:
        write_moment1(f, noisy["moment1"], tmp_path)
    reads = _count_reads(monkeypatch)
    with pytest.raises(ReleaseSchemaError, match=message):
        read_release(tmp_path / "f.h5")
    assert reads == [], f"{attack}: data was read before the refusal"


def test_a_stored_shape_or_size_that_disagrees_is_refused_before_reading(tmp_path, monkeypatch):
    meta, noisy = honest_metadata()
    forge(tmp_path / "f.h5", with_parts(meta, moment1={"shape": (K, D + 1)}),
          {**noisy, "moment1": np.zeros((K, D))})
    reads = _count_reads(monkeypatch)
    with pytest.raises(ReleaseSchemaError, match=r"'moment1' has shape \(3, 50\), expected \(3, 51\)"):
        read_release(tmp_path / "f.h5")
    forge(tmp_path / "g.h5", meta, noisy)
    with h5py.File(tmp_path / "g.h5", "r+") as f:
        f.attrs["comment"] = "extra"
    with pytest.raises(ReleaseSchemaError, match="unexpected attribute"):
        read_release(tmp_path / "g.h5")
    assert reads == []


def test_float_noise_and_schema_1_files_are_refused(tmp_path):
    """The floating-point attack's precondition: noise drawn in floats puts values off the lattice; the reader
    refuses them, and refuses schema-1 files (made with float noise) with a message that says why."""
    meta, noisy = honest_metadata()
    float_noised = {**noisy, "moment1": noisy["moment1"] + np.random.default_rng(0).normal(scale=1e-3, size=noisy["moment1"].shape)}
    forge(tmp_path / "float.h5", meta, float_noised)
    with pytest.raises(ReleaseClaimError, match="dataset 'moment1' holds values off its lattice"):
        read_release(tmp_path / "float.h5")
    with pytest.raises(ValueError, match="part moment1 holds values off its lattice"):
        embedding_to_release(tmp_path / "float-written.h5", meta, float_noised)
    forge(tmp_path / "v1.h5", meta, noisy)
    with h5py.File(tmp_path / "v1.h5", "a") as f:
        f.attrs["schema_version"] = 1
    with pytest.raises(ReleaseSchemaError, match="schema version 1 is no longer read: its noise was drawn in floating point"):
        read_release(tmp_path / "v1.h5")
