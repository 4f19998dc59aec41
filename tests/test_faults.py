"""Fault injection: damaged release files, SIGKILL during every kind of write, concurrent releases.

Killed writers run in forked children (the parent's imports are inherited, so a round costs
milliseconds, not an interpreter start); each is SIGKILLed at a random moment of its write loop.
"""

from __future__ import annotations

import hashlib

import json
import multiprocessing as mp
import os
import random
import signal
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from prefect.logging import disable_run_logger

from mepf_core.embedding import sums_to_noisy_parts
from mepf_core.encoders import EncoderSpec
from mepf_core.privacy.calibration import effective_noise_multiplier
from mepf_core.privacy.mechanism import design_mechanism
from mepf_core.privacy.sensitivity import Neighbouring
from storage.atomic import atomic_path
from storage.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from storage.ledger import BudgetExceededError, BudgetLedger, composed_epsilon
from storage.params import ReleaseParams
from storage.release import (PartRecord, ReleaseCorruptError, ReleaseError, ReleaseMetadata, ReleaseSchemaError,
                             embedding_to_release, read_release)
from tasks.custodian import calibrate, charge_noise_and_release, check_budget
from tests.helpers import lattice_sums

FORK = mp.get_context("fork")
SPEC = EncoderSpec("efficientnet-lite0", ("stem",), 32, (0.5,) * 3, (0.5,) * 3, weights_sha256="ab" * 32)
MECH = design_mechanism(target_epsilon=1.0, target_delta=1e-5, relation=Neighbouring.ADD_REMOVE, labelled=True,
                        moments=2, norm_bound=1.0, second_moment_bound=1.0)


def _metadata(shape: tuple[int, int], dataset_id: str = "toy") -> ReleaseMetadata:
    k = shape[0]
    parts = tuple(PartRecord.of(p, shape if p.name != "counts" else (k,)) for p in MECH.parts)
    return ReleaseMetadata(dataset_id=dataset_id, neighbouring=MECH.relation.value, epsilon=MECH.epsilon,
                           delta=MECH.target_delta, target_epsilon=1.0, norm_bound=1.0, second_moment_bound=1.0,
                           moments=2, labelled=True, class_names=tuple(f"c{i}" for i in range(k)),
                           image_shape=(1, 28, 28), encoder=SPEC, parts=parts)


def _generation(k: int, d: int, gen: int) -> dict[str, np.ndarray]:
    """Arrays whose every entry says which generation wrote them (counts gen x d: as many records as the
    sums' norms need under the unit bounds, see storage.release.check_sums_within_bounds)."""
    return {"moment1": np.full((k, d), float(gen)), "moment2": np.full((k, d), float(gen)),
            "counts": np.full(k, float(gen) * d)}


@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "r.h5"
    rng = np.random.default_rng(0)
    sums = lattice_sums(rng.normal(size=(3, 64)), rng.random((3, 64)), np.full(3, 40.0))
    embedding_to_release(path, _metadata((3, 64)), sums_to_noisy_parts(sums, MECH))
    return path


def _same(a, b) -> bool:
    return a.metadata == b.metadata and a.noisy.keys() == b.noisy.keys() and all(
        np.array_equal(a.noisy[k], b.noisy[k]) for k in a.noisy)


# --- damaged files -------------------------------------------------------------------------------


def test_ten_truncation_points_all_raise(release_file, tmp_path):
    data = release_file.read_bytes()
    cuts = sorted({0, 1, 8, 512, *np.linspace(1024, len(data) - 1, 6).astype(int)})
    assert len(cuts) == 10
    for cut in cuts:
        (tmp_path / "t.h5").write_bytes(data[:cut])
        with pytest.raises(ReleaseError):
            read_release(tmp_path / "t.h5")


def test_hundred_byte_flips_never_read_silently_wrong(release_file, tmp_path):
    original = read_release(release_file)
    data = release_file.read_bytes()
    rng = np.random.default_rng(7)
    raised = identical = wrong = 0
    for pos in rng.choice(len(data), size=100, replace=False):
        damaged = bytearray(data)
        damaged[pos] ^= int(rng.integers(1, 256))
        (tmp_path / "f.h5").write_bytes(bytes(damaged))
        try:
            rel = read_release(tmp_path / "f.h5")
        except ReleaseError:
            raised += 1
            continue
        if _same(rel, original):
            identical += 1  # the flip hit unused padding or a field the reader never uses
        else:
            wrong += 1
    assert wrong == 0 and raised + identical == 100
    assert raised >= 20  # about 40 in practice: HDF5 leaves much of a small file as padding


def test_flips_inside_arrays_and_metadata_always_raise(release_file, tmp_path):
    """The bytes that carry content are all covered by a checksum: 60 flips there, 60 errors."""
    data = release_file.read_bytes()
    with h5py.File(release_file, "r") as f:
        regions = [(f[n].id.get_offset(), f[n].id.get_storage_size()) for n in ("moment1", "moment2", "counts")]
        text = f.attrs["metadata_json"]
    text = text.encode() if isinstance(text, str) else bytes(text)
    regions.append((data.find(text), len(text)))
    assert all(start > 0 for start, _ in regions)
    rng = np.random.default_rng(8)
    for start, size in regions:
        for pos in start + rng.choice(size, size=15, replace=False):
            damaged = bytearray(data)
            damaged[pos] ^= int(rng.integers(1, 256))
            (tmp_path / "f.h5").write_bytes(bytes(damaged))
            with pytest.raises(ReleaseCorruptError):
                read_release(tmp_path / "f.h5")


@pytest.mark.parametrize("damage,error,message", [
    (lambda f: f.__delitem__("counts"), ReleaseSchemaError, "'counts' is missing"),
    (lambda f: (f.__delitem__("moment1"), f.create_dataset("moment1", data=np.zeros((3, 64), np.float32))),
     ReleaseSchemaError, "dtype float32"),
    (lambda f: (f.__delitem__("moment2"), f.create_dataset("moment2", data=np.zeros((3, 65)))),
     ReleaseSchemaError, "shape"),
    (lambda f: f["moment2"].__setitem__((1, 1), np.nan), ReleaseCorruptError, "checksum"),
    (lambda f: f["counts"].__setitem__(0, np.inf), ReleaseCorruptError, "checksum"),
])
def test_field_damage_names_the_fault(release_file, tmp_path, damage, error, message):
    path = tmp_path / "d.h5"
    path.write_bytes(release_file.read_bytes())
    with h5py.File(path, "r+") as f:
        damage(f)
    with pytest.raises(error, match=message):
        read_release(path)


def test_nan_is_refused_by_the_writer_and_by_the_reader_even_with_valid_checksums(tmp_path):
    arrays = _generation(2, 8, 1)
    arrays["moment1"][0, 3] = np.nan
    with pytest.raises(ValueError, match="moment1 holds non-finite values"):
        embedding_to_release(tmp_path / "n.h5", _metadata((2, 8)), arrays)
    assert list(tmp_path.iterdir()) == []
    # a file forged with NaN and re-computed checksums is still refused on reading
    arrays["moment1"][0, 3] = 0.0
    embedding_to_release(tmp_path / "n.h5", _metadata((2, 8)), arrays)
    with h5py.File(tmp_path / "n.h5", "r+") as f:
        data = f["moment1"][()]
        data[0, 3] = np.nan
        f["moment1"][...] = data
        meta = json.loads(f.attrs["metadata_json"])
        for part in meta["parts"]:
            if part["name"] == "moment1":
                part["sha256"] = hashlib.sha256(data.astype(np.float64).tobytes()).hexdigest()
        text = json.dumps(meta, sort_keys=True)
        f.attrs["metadata_json"] = text
        f.attrs["metadata_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    with pytest.raises(ReleaseCorruptError, match="'moment1' holds non-finite values"):
        read_release(tmp_path / "n.h5")


# --- SIGKILL during writes -----------------------------------------------------------------------


def _kill_rounds(target, args, rounds: int, max_delay: float, check, in_write: float | None = None) -> None:
    """Start `target(*args, writing)` in a forked child, SIGKILL it after a random delay, then `check()`.

    With `in_write`, every other round waits until the child reports that a write has begun and
    kills it within `in_write` seconds after, so some kills surely land inside a write.
    """
    rng = random.Random(1234)
    for i in range(rounds):
        writing = FORK.Event()
        proc = FORK.Process(target=target, args=(*args, writing), daemon=True)
        proc.start()
        if in_write is not None and i % 2:
            assert writing.wait(30), "the child never started writing"
            time.sleep(rng.uniform(0.0, in_write))
        else:
            time.sleep(rng.uniform(0.0, max_delay))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        check()


def _signal_on_call(module, name: str, writing) -> None:
    """In this (forked) child only: set `writing` whenever module.name is called."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        writing.set()
        return real(*args, **kwargs)

    setattr(module, name, wrapper)


def _write_releases_forever(folder: Path, k: int, d: int, writing) -> None:
    """Releases are written create-exclusive, never over another: each generation gets a new name."""
    _signal_on_call(h5py, "File", writing)
    gen = int(time.time() * 1000)
    while True:
        embedding_to_release(folder / f"r-{gen}.h5", _metadata((k, d), dataset_id=f"gen-{gen}"), _generation(k, d, gen))
        gen += 1


def test_sigkill_during_release_writes_leaves_complete_files_never_partial(tmp_path):
    k, d = 4, 250_000  # 16 MB of arrays per release
    start = time.perf_counter()
    embedding_to_release(tmp_path / "probe.h5", _metadata((k, d)), _generation(k, d, 0))
    write_seconds = time.perf_counter() - start
    (tmp_path / "probe.h5").unlink()
    seen = {"complete": 0, "mid_write": 0}

    def check():
        names = {p.name for p in tmp_path.iterdir()}
        leftovers = {n for n in names if n.startswith(".r-") and n.endswith(".tmp")}
        releases = {n for n in names if n.startswith("r-") and n.endswith(".h5")}
        assert names == leftovers | releases, f"unexpected files {names - leftovers - releases}"
        seen["mid_write"] += bool(leftovers)
        for n in leftovers:  # a killed writer's temporary file is never at a release's path
            (tmp_path / n).unlink()
        for n in releases:
            rel = read_release(tmp_path / n)  # complete and valid: raises otherwise
            gen = float(rel.metadata.dataset_id.removeprefix("gen-"))
            assert n == f"r-{int(gen)}.h5", "a file holds another generation's release"
            assert all(np.array_equal(rel.noisy[name], a) for name, a in _generation(k, d, int(gen)).items()), \
                "arrays of one generation, metadata of another"
            seen["complete"] += 1
            (tmp_path / n).unlink()

    _kill_rounds(_write_releases_forever, (tmp_path, k, d), rounds=10, max_delay=3 * write_seconds + 0.3, check=check,
                 in_write=write_seconds)
    assert seen["mid_write"] >= 1, seen  # some kills really landed inside writes
    assert seen["complete"] >= 1, seen


def _charge_forever(ledger_path: Path, released_path: Path, writing) -> None:
    ledger = BudgetLedger(ledger_path)
    z = effective_noise_multiplier(target_epsilon=0.01, target_delta=1e-9)
    while True:
        rid = uuid.uuid4().hex
        ledger.charge("ds", release_id=rid, epsilon=0.01, delta=1e-9, noise_multiplier=z)
        with open(released_path, "a") as f:  # the release goes out only after its charge is durable
            f.write(rid + "\n")
            f.flush()
            os.fsync(f.fileno())
        writing.set()  # at least one release is out: the in-write rounds kill only after this


def _complete_lines(path: Path) -> list[str]:
    data = path.read_bytes() if path.exists() else b""
    return data[: data.rfind(b"\n") + 1].decode().splitlines()


def test_sigkill_during_ledger_updates_never_records_less_than_released(tmp_path):
    ledger_path, released_path = tmp_path / "ledger.jsonl", tmp_path / "released.txt"
    BudgetLedger(ledger_path).set_budget("ds", epsilon=1e6)
    partial_lines = 0

    def check():
        nonlocal partial_lines
        partial_lines += not ledger_path.read_bytes().endswith(b"\n")
        [summary] = BudgetLedger(ledger_path).summary()  # parseable, a cut last line ignored
        charged = {json.loads(line)["release_id"] for line in _complete_lines(ledger_path)
                   if json.loads(line)["kind"] == "charge"}
        released = set(_complete_lines(released_path))
        assert released <= charged, f"{len(released - charged)} releases were never charged"
        assert summary.releases == len(charged) >= len(released)

    _kill_rounds(_charge_forever, (ledger_path, released_path), rounds=10, max_delay=0.4, check=check, in_write=0.4)
    assert len(_complete_lines(released_path)) >= 5  # the 5 in-write rounds each released at least once
    before = BudgetLedger(ledger_path).summary()[0].releases
    BudgetLedger(ledger_path).charge("ds", release_id="after", epsilon=0.01, delta=1e-9, noise_multiplier=400.0)
    assert BudgetLedger(ledger_path).summary()[0].releases == before + 1  # still usable after the kills


def _save_checkpoints_forever(path: Path, writing) -> None:
    _signal_on_call(torch, "save", writing)
    gen = int(time.time() * 1000)
    while True:  # tensors from numpy: a torch op could deadlock in a child forked after OpenMP ran
        weights = torch.from_numpy(np.full(2_000_000, float(gen), dtype=np.float32))
        save_checkpoint(path, state={"gen": gen, "weights": weights},
                        config={"gen": gen}, release={"release_id": str(gen)})
        gen += 1


def test_sigkill_during_checkpoint_writes_leaves_old_or_new(tmp_path):
    path = tmp_path / "checkpoint_latest.pt"
    outcomes = {"complete": 0, "absent": 0}

    def check():
        if not path.exists():
            outcomes["absent"] += 1
            return
        try:
            payload = load_checkpoint(path)
        except CheckpointError as exc:
            pytest.fail(f"a killed writer left a partial checkpoint: {exc}")
        gen = payload["state"]["gen"]
        assert np.all(payload["state"]["weights"].numpy() == np.float32(gen)) and payload["config"]["gen"] == gen
        outcomes["complete"] += 1

    _kill_rounds(_save_checkpoints_forever, (path,), rounds=10, max_delay=0.6, check=check, in_write=0.05)
    assert outcomes["complete"] >= 1, outcomes
    with atomic_path(tmp_path / "x.pt") as tmp:  # the property is atomic_path's: a raise leaves nothing
        torch.save({"a": 1}, tmp)
    assert (tmp_path / "x.pt").exists()
    with pytest.raises(RuntimeError, match="boom"), atomic_path(tmp_path / "y.pt") as tmp:
        torch.save({"a": 1}, tmp)
        raise RuntimeError("boom")
    assert not (tmp_path / "y.pt").exists() and not list(tmp_path.glob(".y.pt.*"))


# --- concurrency: the custodian tasks' own check-then-charge path ------------------------------


def _release_worker(params: ReleaseParams, barrier, results) -> None:
    """calibrate -> check_budget -> (all workers together) charge_noise_and_release, as the flow does."""
    with disable_run_logger():
        mech = calibrate.fn(params)
        try:
            check_budget.fn(params, mech)
            early = False
        except BudgetExceededError:
            early = True
        barrier.wait(60)  # every worker has passed its early check before anyone charges
        if early:
            results.put((params.out, "refused-early"))
            return
        rng = np.random.default_rng()
        sums = lattice_sums(rng.normal(size=(2, 8)), None, np.full(2, 5.0))
        info = {"class_names": ("a", "b"), "image_shape": (1, 28, 28), "encoder": SPEC}
        try:
            result = charge_noise_and_release.fn(params, mech, sums, info)
            results.put((params.out, result["release_id"]))
        except BudgetExceededError:
            results.put((params.out, "refused"))


def test_concurrent_releases_through_the_task_path_never_overspend(tmp_path):
    ledger, workers, eps = tmp_path / "ledger.jsonl", 8, 0.5
    z = effective_noise_multiplier(target_epsilon=eps, target_delta=1e-5)
    charge = {"epsilon": eps, "delta": 1e-5, "noise_multiplier": z}
    affordable = max(k for k in range(1, workers + 1) if composed_epsilon([charge] * k)[0] <= 1.0)
    assert 1 < affordable < workers
    barrier, results = FORK.Barrier(workers), FORK.Queue()
    procs = []
    for i in range(workers):
        params = ReleaseParams(target_epsilon=eps, out=str(tmp_path / f"r{i}.h5"), ledger=str(ledger), budget=1.0,
                               dataset_id="ds", labelled=True)
        procs.append(FORK.Process(target=_release_worker, args=(params, barrier, results)))
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    granted = {out: rid for out, rid in outcomes.items() if not rid.startswith("refused")}
    assert len(granted) == affordable
    assert "refused-early" not in outcomes.values()  # every refusal came from the race at charge time
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == sorted(Path(o).name for o in granted)
    for out, rid in granted.items():
        assert read_release(out).metadata.release_id == rid
    [summary] = BudgetLedger(ledger).summary()
    assert summary.releases == affordable and summary.spent_epsilon <= 1.0 and summary.budget_epsilon == 1.0
    charged = {json.loads(line)["release_id"] for line in _complete_lines(ledger) if '"charge"' in line}
    assert charged == set(granted.values())
