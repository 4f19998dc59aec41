"""Evaluation tasks: public data only (a real test split) and the synthetic dataset.

Nothing here feeds back into training or checkpoint choice.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from prefect import get_run_logger, task

from mepf_core.classifiers import downstream_accuracy
from mepf_core.fid import activation_statistics, frechet_distance
from mepf_core.inception import images_to_inception_activations, load_fid_inception
from storage.datasets import canonical_dataset_id, imagefolder_root, open_dataset
from storage.metrics import load_or_compute_reference_stats
from storage.synthetic import read_synthetic


def parse_reference(reference: str) -> tuple[str, str]:
    """'fashion-mnist:test' -> ('fashion-mnist', 'test'); the split defaults to test."""
    name, _, split = reference.rpartition(":") if reference.endswith((":test", ":train")) else (reference, "", "test")
    return name, split


def _training_folders(path: str) -> list[str]:
    """The resolved folders whose images a training (release) split of `imagefolder:PATH` reads.

    `PATH/train` when it exists. Otherwise the train split reads PATH itself (every visible subfolder
    a class), except in a split layout holding only `test/`: there the training records are the
    other visible subfolders of PATH, if any (a `test/` folder alone is a public test split).
    """
    from storage.datasets import is_hidden_name

    root = Path(path)
    if (root / "train").is_dir():
        return [os.path.realpath(root / "train")]
    if not (root / "test").is_dir():
        return [os.path.realpath(root)]
    return [os.path.realpath(d) for d in sorted(root.iterdir())
            if d.name != "test" and not is_hidden_name(d.name) and d.is_dir()]


def _overlaps(a: str, b: str) -> bool:
    """Whether resolved folder `a` contains `b`, or is contained in it (or is it)."""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def reads_training_records(reference: str, data_root: str | None = None) -> bool:
    """Whether `reference` reads (or may read) the records of a training split, which may be private.

    True for `X:train`. For `imagefolder:PATH[:test]` by containment, not by equality of ids: the
    folder the reference actually reads (resolved: symlinks and `..` followed, see
    `storage.datasets.imagefolder_root`) is private when it contains, is contained in, or is a
    training folder of PATH (`_training_folders`). So `imagefolder:data` and `imagefolder:data:test`
    when data/ holds only `train/` (the reference would read data/ with `train` as a class), a folder
    without `test/` (its test split is its training folder), and any spelling of `data/train` or of a
    class folder below it are all private; `imagefolder:data` with its own `data/test/` beside
    `data/train/` is not.
    """
    name, split = parse_reference(reference)
    if split == "train":
        return True
    if not name.startswith("imagefolder:"):
        return False  # named datasets: the test split is a separate file set
    path = name.split(":", 1)[1]
    read = os.path.realpath(imagefolder_root(path, split))
    return any(_overlaps(read, folder) for folder in _training_folders(path))


def reference_cache_key(reference: str, data_root: str | None = None) -> str:
    """The FID cache's name for a reference split: canonical, so two folders spelled alike never share stats."""
    name, split = parse_reference(reference)
    return canonical_dataset_id(name, split, data_root)


@task(name="load-synthetic", persist_result=False)
def load_synthetic(path: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
    return read_synthetic(path)


@task(name="load-reference", persist_result=False)
def load_reference(reference: str, data_root: str | None = None, limit: int | None = None):
    name, split = parse_reference(reference)
    return open_dataset(name, split, data_root).load_all(limit)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def fid_against_reference(images: np.ndarray, reference_images: np.ndarray, reference_key: str, n: int,
                          cache: bool = True) -> float:
    """FID of the first `n` images against the reference split's statistics, cached per key.

    `cache=False` (a reference that reads training records, see `reads_training_records`): the
    statistics, un-noised functions of possibly private images, are computed in memory and never
    written to the cache under the user's home.
    """
    model = load_fid_inception(_device())
    key = f"{reference_key}|n={len(reference_images)}|pytorch-fid-pool3|gray->rgb|bilinear299"

    def compute():
        return activation_statistics(
            images_to_inception_activations(model, reference_images, device=_device(), progress=True))

    mu_r, sigma_r = load_or_compute_reference_stats(key, compute) if cache else compute()
    acts = images_to_inception_activations(model, images[:n], device=_device(), progress=True)
    return frechet_distance(*activation_statistics(acts), mu_r, sigma_r)


@task(name="fid", persist_result=False)
def fid_task(synthetic: np.ndarray, reference_images: np.ndarray, reference_key: str, fid_samples: int,
             cache: bool = True) -> float:
    """FID of up to `fid_samples` synthetic images against (cached, unless `cache=False`) reference statistics."""
    fid = fid_against_reference(synthetic, reference_images, reference_key, fid_samples, cache=cache)
    get_run_logger().info("FID %.2f on %d synthetic images against %s", fid, min(fid_samples, len(synthetic)),
                          reference_key)
    return fid


@task(name="downstream-accuracy", persist_result=False)
def accuracy_task(train_images, train_labels, test_images, test_labels, classifiers: list[str], seed: int = 0) -> dict:
    if train_labels is None:
        raise ValueError("downstream accuracy needs a labelled synthetic dataset (release made with --labelled)")
    return downstream_accuracy(train_images, train_labels, test_images, test_labels, classifiers=classifiers, seed=seed)


def synthetic_path_for(run_dir: str) -> Path:
    return Path(run_dir) / "synthetic.h5"
