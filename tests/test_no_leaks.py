"""Nothing un-noised about the private data leaves the custodian: not in logs (at DEBUG), stdout,
stderr, Prefect's home (database, result storage), the ledger or the release file.

The private set is an imagefolder of Fashion-MNIST images with unusual class sizes, so that its
size n is private (no `limit`: it is refused under add-remove, see tests/test_record_selection.py). The release runs
in a fresh process with Prefect at DEBUG and results persisted by default, the settings most
likely to write something out; the test recomputes the clean statistics itself and looks for
them in every byte the run wrote.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from mepf_core.encoders import EncoderSpec
from mepf_core.features import sanitize_images
from mepf_core.privacy.mechanism import design_mechanism
from mepf_core.privacy.sensitivity import Neighbouring
from storage.datasets import open_dataset
from storage.release import PartRecord, ReleaseMetadata
from tests.helpers import fmnist_subset, lite0, sums_of

CLASS_SIZES = {"coat": 23, "dress": 31, "sandal": 19}  # n = 73; FMNIST labels 4, 3, 5
LABELS = {"coat": 4, "dress": 3, "sandal": 5}
TARGET_EPSILON = 1.0
MOMENTS = 2


@pytest.fixture(scope="module")
def private_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("private")
    images, labels = fmnist_subset(600)
    for name, size in CLASS_SIZES.items():
        (root / name).mkdir()
        picked = torch.nonzero(labels == LABELS[name]).flatten()[:size]
        assert len(picked) == size
        for i, idx in enumerate(picked):
            pixels = (images[idx, 0] * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


RUNNER = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)  # third-party chatter (SQL) stays quiet
    for name in ("mepf_core", "storage", "tasks", "flows", "mepf"):  # the project's own loggers at DEBUG
        logging.getLogger(name).setLevel(logging.DEBUG)
    from flows.custodian_release import custodian_release
    from storage.params import ReleaseParams
    params = ReleaseParams(**json.loads(sys.argv[1]))
    result = custodian_release(params)
    # The run's artifacts as the Prefect API serves them to the UI (release summary, extraction progress).
    from prefect.client.orchestration import get_client
    from tasks.artifacts import artifacts_of_flow_run
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    with open(sys.argv[2], "w") as f:
        json.dump([a for r in runs for a in artifacts_of_flow_run(r.id)], f)
    sys.stdout.write(json.dumps(result, default=str) + "\\n")
""")


@pytest.fixture(scope="module")
def run(private_folder, tmp_path_factory) -> dict:
    """One release in a fresh process; everything it wrote, as bytes."""
    work = tmp_path_factory.mktemp("run")
    home, out_dir = work / "prefect-home", work / "out"
    home.mkdir()
    out_dir.mkdir()
    params = {"dataset": f"imagefolder:{private_folder}", "target_epsilon": TARGET_EPSILON, "labelled": True,
              "moments": MOMENTS, "out": str(out_dir / "release.h5"),
              "ledger": str(out_dir / "ledger.jsonl"), "budget": 3.0, "batch_size": 16}
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "DEBUG",
           "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(params), str(out_dir / "artifacts.json")],
                          capture_output=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    files = {p: p.read_bytes() for d in (home, out_dir) for p in sorted(d.rglob("*")) if p.is_file()}
    return {"stdout": proc.stdout, "stderr": proc.stderr, "files": files, "release": out_dir / "release.h5",
            "home": home, "result": json.loads(proc.stdout.decode().strip().splitlines()[-1]),
            "artifacts": json.loads((out_dir / "artifacts.json").read_text())}


@pytest.fixture(scope="module")
def clean(private_folder) -> dict:
    """The un-noised statistics a careless custodian might print, computed here the same way."""
    source = open_dataset(f"imagefolder:{private_folder}")
    fm = lite0()
    images, labels = next(source.iter_batches(len(source)))
    with torch.no_grad():
        raw = fm(sanitize_images(images)).to(torch.float64)
    sums = sums_of(images, labels, num_classes=source.num_classes, moments=MOMENTS, batch_size=16)  # as the flow
    values = sums.values()  # feature units: what a careless custodian would print
    sums1, sums2, counts = values["moment1"], values["moment2"], values["counts"]
    mech = design_mechanism(target_epsilon=TARGET_EPSILON, target_delta=1e-5, relation=Neighbouring.ADD_REMOVE,
                            labelled=True, moments=MOMENTS, norm_bound=1.0, second_moment_bound=1.0)
    sigma1, d = mech.part("moment1").sigma, fm.feature_dim
    means1 = sums1 / counts[:, None]
    floats = [
        *raw.norm(dim=1).tolist(),  # per-example feature norms before bounding
        *np.linalg.norm(sums1, axis=1), *np.linalg.norm(sums2, axis=1),  # clean per-class sums
        *np.linalg.norm(means1, axis=1), float(np.linalg.norm(sums1.sum(0) / counts.sum())),  # clean means
        *(np.linalg.norm(sums1, axis=1) / (sigma1 * np.sqrt(d))),  # signal-to-noise ratios
        *(np.linalg.norm(means1, axis=1) / (sigma1 / counts * np.sqrt(d))),
        *(np.linalg.norm(sums1, axis=1) ** 2 / (sigma1**2 * d)),
    ]
    return {"floats": floats, "counts": counts.astype(int).tolist(), "n": int(counts.sum()),
            "sums": [sums1, sums2], "images": images}


def _float_forms(x: float) -> set[str]:
    """How a float is usually printed: repr, %.6f, %.6g, %.4g, %.5e (only forms with 4+ digits)."""
    forms = {repr(x), f"{x:.6f}", f"{x:.6g}", f"{x:.4g}", f"{x:.5e}"}
    return {f for f in forms if len(f.strip("-0.")) >= 4}


def _count_patterns(counts: list[int], n: int) -> list[str]:
    """Class counts as a list, and n where a log or a progress bar would put it."""
    listed = [", ".join(map(str, counts)), ", ".join(f"{c}.0" for c in counts), " ".join(f"{c}." for c in counts)]
    around_n = [rf"(?<!\d)\d+/{n}(?!\d)", rf"\bn\s*[=:]\s*{n}\b",
                rf"(?<![\d.]){n} (?:images?|img|examples?|records?|samples?|items?)\b",
                rf"(?:total|size|count|len)\W{{0,3}}{n}\b"]
    return [re.escape(s) for s in listed] + around_n


def _texts(run) -> dict[str, str]:
    out = {"stdout": run["stdout"].decode(errors="replace"), "stderr": run["stderr"].decode(errors="replace")}
    out.update({str(p): data.decode("latin-1") for p, data in run["files"].items()})
    return out


def test_no_clean_statistic_in_any_output(run, clean):
    texts = _texts(run)
    forms = {f for x in clean["floats"] for f in _float_forms(float(x))}
    found = set()
    for where, text in texts.items():
        for form in forms:
            if form in text:  # a cheap filter, then the exact check: a whole number, not part of one
                for m in re.finditer(rf"(?<![\w.]){re.escape(form)}(?!\d)", text):
                    found.add((where, m.group(0)))
        for pattern in _count_patterns(clean["counts"], clean["n"]):
            found |= {(where, m.group(0)) for m in re.finditer(pattern, text)}
    assert not found, f"un-noised statistics found: {sorted(found)[:10]}"
    assert len(texts) >= 4 and any("prefect.db" in w for w in texts)  # the scan saw the database too


def test_no_clean_array_bytes_in_any_file(run, clean):
    """Pickled or raw copies of the clean sums (or of the images) would contain these bytes."""
    needles = [s[c, j:j + 4].tobytes() for s in clean["sums"] for c in range(s.shape[0]) for j in (0, 100)]
    needles += [s[c, j:j + 4].astype(np.float32).tobytes() for s in clean["sums"] for c in range(s.shape[0])
                for j in (0, 100)]
    for img in clean["images"][:8]:
        row = (img[0, 14] * 255).round().to(torch.uint8).numpy()
        if len(set(row.tolist())) >= 10:
            needles.append(row.tobytes())
    assert len(needles) > 20
    for path, data in run["files"].items():
        for needle in needles:
            assert needle not in data, f"clean bytes found in {path}"


def test_release_file_holds_only_the_documented_fields(run, clean):
    with h5py.File(run["release"], "r") as f:
        assert set(f.keys()) == {"moment1", "moment2", "counts"}
        assert set(f.attrs.keys()) == {"schema_version", "metadata_json", "metadata_sha256"}
        meta = json.loads(f.attrs["metadata_json"])
        noisy_counts = f["counts"][()]
    assert set(meta) == {fld.name for fld in dataclasses.fields(ReleaseMetadata)}
    assert set(meta["encoder"]) == {fld.name for fld in dataclasses.fields(EncoderSpec)}
    for part in meta["parts"]:
        assert set(part) == {fld.name for fld in dataclasses.fields(PartRecord)}
    assert meta["n_public"] is None  # add-remove: n is private
    assert meta["class_names"] == sorted(CLASS_SIZES)
    assert not np.array_equal(noisy_counts, np.asarray(clean["counts"], dtype=float))
    assert all(c == round(c) for c in noisy_counts)  # integer counts plus integer (discrete Gaussian) noise


def test_the_artifacts_show_public_fields_and_no_count(run, clean):
    """Issue 14: the custodian flow's artifacts, read back from the Prefect API (what the UI shows): the
    release summary holds the public claim and no count; the extraction progress sent only the fixed
    grid (final 100). No artifact text holds n or a class count as a whole number, or a clean statistic."""
    from tasks.artifacts import EXTRACTION_PROGRESS_KEY, RELEASE_KEY

    by_key = {}
    for a in run["artifacts"]:
        if a["key"] is not None:  # keyless: Prefect's own records of state results (scanned below too)
            by_key.setdefault(a["key"], []).append(a)
    assert set(by_key) == {RELEASE_KEY, EXTRACTION_PROGRESS_KEY}, [(a["key"], a["type"], str(a["data"])[:200])
                                                                  for a in run["artifacts"]]
    (summary,) = by_key[RELEASE_KEY]
    result = run["result"]
    for public in (result["release_id"], f"{result['epsilon']:.6g}", "add-remove", "efficientnet-lite0",
                   result["encoder_weights_sha256"], f"| moment1 | {3 * 8} x {clean['sums'][0].shape[1]} |",
                   "| cells per class | 8 "):  # epsilon 1, labelled: 8 cells per class (mepf_core.cells)
        assert public and public in summary["data"], public
    (progress,) = by_key[EXTRACTION_PROGRESS_KEY]  # one shard
    assert progress["type"] == "progress" and float(progress["data"]) == 100.0
    private = {clean["n"], *clean["counts"]}
    forms = {f for x in clean["floats"] for f in _float_forms(float(x))}
    for a in run["artifacts"]:
        # pytest's temporary root ("/tmp/pytest-of-root/pytest-23/...") is in Prefect's result-record paths:
        # its number is the test session's, not the data's
        text = f"{a['data']} {a['description']}".replace(str(run["home"].parents[1]), "<tmp>")
        numbers = {int(m) for m in re.findall(r"(?<![\w.])\d+(?!\w|\.\d)", text)}  # whole numbers, not hex digits
        assert not numbers & private, (a["key"], numbers & private)
        assert not [f for f in forms if f in text], a["key"]


def test_the_run_wrote_logs_at_debug(run):
    """The scan is only meaningful if the run was verbose."""
    assert b"DEBUG" in run["stderr"] and run["result"]["path"] == str(run["release"].resolve())


# --- an error on one record names no record (issue 11, item 6) --------------------------------------

TOKEN = "zq7personXJ4name"  # a file name nobody else would print


CLI_RUNNER = textwrap.dedent("""
    import logging, sys
    for name in ("mepf_core", "storage", "tasks", "flows", "mepf"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    from flows.cli import main
    raise SystemExit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("fault", ["corrupt", "hidden-corrupt"])
def test_a_corrupt_record_is_never_named_outside_the_custodians_terminal(private_folder, tmp_path, fault):
    """Before: `cannot decode image .../<name>.png` in the exception, Prefect's task state and logs.
    Now (since the fifth DP review) a corrupt record has zero features and the release is made either
    way; the token is nowhere in stdout, stderr, Prefect's home (database, logs) or the ledger. A corrupt
    file in a hidden folder is not a record at all, and that release names nothing either."""
    data = tmp_path / "data"
    for cls in ("coat", "dress"):
        (data / cls).mkdir(parents=True)
        for src in sorted((private_folder / cls).glob("*.png"))[:6]:
            (data / cls / src.name).write_bytes(src.read_bytes())
    bad_dir = data / "dress" / (".ipynb_checkpoints" if fault == "hidden-corrupt" else "")
    bad_dir.mkdir(exist_ok=True)
    (bad_dir / f"{TOKEN}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    home, out = tmp_path / "prefect-home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "DEBUG",
           "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    argv = ["release", "--dataset", f"imagefolder:{data}", "--target-epsilon", "1", "--labelled",
            "--out", str(out / "r.h5"), "--ledger", str(out / "ledger.jsonl"), "--budget", "3", "--batch-size", "4"]
    proc = subprocess.run([sys.executable, "-c", CLI_RUNNER, *argv], capture_output=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, stderr[-3000:]  # a corrupt record has zero features; it stops no release
    assert (out / "r.h5").exists()
    written = {p: p.read_bytes() for d in (home, out) for p in sorted(d.rglob("*")) if p.is_file()}
    assert any("prefect.db" in str(p) for p in written) and b"DEBUG" in proc.stderr
    for where, data_bytes in [("stdout", proc.stdout), ("stderr", proc.stderr), *written.items()]:
        assert TOKEN.encode() not in data_bytes, f"the record's name reached {where}"
        assert TOKEN.encode("utf-16-le") not in data_bytes, f"the record's name reached {where}"


# --- any error in a custodian task names no record (review finding 5) --------------------------------

FLOW_FAULT_RUNNER = textwrap.dedent("""
    import json, logging, os, sys, traceback
    for name in ("mepf_core", "storage", "tasks", "flows", "mepf"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    token = sys.argv[1]
    real = os.scandir
    def scandir(path="."):  # as if a folder holding the token were chmod 000 (the tests run as root)
        if token in os.fspath(path) and "unlistable" in os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)
    os.scandir = scandir
    from flows.custodian_release import custodian_release
    from storage.params import ReleaseParams
    results = []
    for params in json.loads(sys.argv[2]):
        try:
            custodian_release(ReleaseParams(**params))
            results.append({"raised": None})
        except Exception as exc:
            results.append({"raised": type(exc).__name__, "text": str(exc) + repr(exc),
                            "traceback": "".join(traceback.format_exception(exc)),
                            "cause": repr(exc.__cause__), "context": repr(exc.__context__)})
    sys.stdout.write(json.dumps(results) + "\\n")
""")


def test_no_error_in_a_custodian_task_names_a_record(private_folder, tmp_path):
    """Before: a PermissionError on an unreadable class subfolder and `[Errno 36] File name too long`
    named the record in describe-dataset's state, Prefect's logs and the flow's exception. Now: the
    flow (run as deployed, without the CLI's local pre-check) fails on the unlistable folder with one
    sanitized error, releases the too-long record as one that cannot be read, and the token is nowhere
    in stdout, stderr, Prefect's home (database, logs), the ledger, the release or the exception."""
    from tests.test_record_selection import _too_long_record

    runs = []
    for case in ("unlistable", "too-long"):
        data = tmp_path / case
        for cls in ("coat", "dress"):
            (data / cls).mkdir(parents=True)
            for src in sorted((private_folder / cls).glob("*.png"))[:3]:
                (data / cls / src.name).write_bytes(src.read_bytes())
        if case == "unlistable":
            hidden_in = data / "dress" / f"unlistable_{TOKEN}"
            hidden_in.mkdir()
            (hidden_in / "x.png").write_bytes((private_folder / "coat" / "000.png").read_bytes())
        else:
            _too_long_record(data / "dress", (private_folder / "coat" / "000.png").read_bytes(), TOKEN)
        runs.append({"dataset": f"imagefolder:{data}", "target_epsilon": 1.0, "labelled": True, "batch_size": 4,
                     "out": str(tmp_path / f"{case}.h5"), "ledger": str(tmp_path / "ledger.jsonl"), "budget": 5.0})
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "DEBUG",
           "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    proc = subprocess.run([sys.executable, "-c", FLOW_FAULT_RUNNER, TOKEN, json.dumps(runs)], capture_output=True,
                          env=env, cwd=Path(__file__).resolve().parents[1], timeout=500)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    results = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    # A file whose path is too long is a record that cannot be read (zero features): released. A folder
    # that cannot be listed refuses the dataset.
    assert results[1] == {"raised": None}, results[1]
    assert (tmp_path / "too-long.h5").is_file()
    for r in results[:1]:
        assert r["raised"] == "ExtractionError", r
        assert "describe-dataset failed on the private dataset;" in r["text"] and "DatasetCheckError" not in r["text"]
        assert "mepf check-data" in r["text"] and r["cause"] == "None" and r["context"] == "None"
        assert TOKEN not in r["text"] + r["traceback"]
    assert b"describe-dataset" in proc.stderr and b"DEBUG" in proc.stderr  # the task ran, verbosely
    written = {p: p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file()}
    written.update({p: p.read_bytes() for p in tmp_path.glob("*.*") if p.is_file()})  # ledger, if any
    assert any("prefect.db" in str(p) for p in written)
    for where, data_bytes in [("stdout", proc.stdout), ("stderr", proc.stderr), *written.items()]:
        assert TOKEN.encode() not in data_bytes, f"the record's name reached {where}"
        assert TOKEN.encode("utf-16-le") not in data_bytes, f"the record's name reached {where}"
    assert not (tmp_path / "unlistable.h5").exists()


@pytest.mark.parametrize("fault", [
    PermissionError(13, "Permission denied", f"/data/b/scans/{TOKEN}.png"),
    OSError(36, "File name too long", f"/data/b/{TOKEN}.png"),
    FileNotFoundError(2, "No such file", f"/data/{TOKEN}"),
    UnicodeDecodeError("utf-8", TOKEN.encode(), 0, 1, TOKEN),
    RuntimeError(f"mat1 and mat2 shapes cannot be multiplied (73x{TOKEN})"),
    KeyError(TOKEN),
    ValueError(f"cannot decode image {TOKEN}.png"),
])
@pytest.mark.parametrize("where", ["describe-open", "describe-encoder", "shard-open", "shard-batch", "shard-encoder"])
def test_every_custodian_error_is_sanitized(tmp_path, monkeypatch, fault, where):
    """Any exception type, raised anywhere in a custodian task body (opening or listing the dataset, the
    labelled check, the encoder, the batch loop), leaves as one error without the record, unchained."""
    import traceback

    import tasks.custodian as custodian
    from storage.params import ReleaseParams
    from storage.datasets import ExtractionError

    data = tmp_path / "d"
    for k, cls in enumerate("ab"):
        (data / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * k + i, np.uint8)).save(data / cls / f"{i}.png")
    params = ReleaseParams(dataset=f"imagefolder:{data}", target_epsilon=1.0, labelled=True, batch_size=2)

    def boom(*args, **kwargs):
        raise fault

    target = {"describe-open": "_source", "shard-open": "_source", "describe-encoder": "_feature_map",
              "shard-encoder": "_feature_map", "shard-batch": "fixed_batch_features"}[where]
    monkeypatch.setattr(custodian, target, boom)
    with pytest.raises(ExtractionError) as info:
        if where.startswith("describe"):
            custodian.describe_dataset.fn(params)
        else:
            custodian.shard_sums(params, 0)
    exc = info.value
    text = str(exc) + repr(exc) + "".join(traceback.format_exception(exc))
    assert TOKEN not in text and exc.__cause__ is None and exc.__context__ is None
    assert type(fault).__name__ not in str(exc) and "mepf check-data" in str(exc)  # the class is the record's too


def test_reduce_sums_errors_print_no_sums(monkeypatch):
    """Merging mismatched partial sums used to print their repr (the counts); now one sanitized error."""
    import traceback

    from mepf_core.embedding import FeatureSums
    from storage.datasets import ExtractionError
    from tasks.custodian import reduce_sums

    a = FeatureSums.zeros(2, 4, 1, norm_bound=1.0)
    a.counts[:] = [12345.0, 67890.0]
    with pytest.raises(ExtractionError) as info:
        reduce_sums.fn([a, FeatureSums.zeros(3, 4, 1, norm_bound=1.0)])
    text = "".join(traceback.format_exception(info.value))
    assert "12345" not in text and "67890" not in text and info.value.__context__ is None
