"""Evaluation tasks: public data only (a real test split) and the synthetic dataset.

Nothing here feeds back into training or checkpoint choice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from prefect import get_run_logger, task

from mepf_core.classifiers import downstream_accuracy
from mepf_core.fid import activation_statistics, frechet_distance
from mepf_core.inception import images_to_inception_activations, load_fid_inception
from storage.datasets import canonical_dataset_id, open_dataset
from storage.metrics import load_or_compute_reference_stats
from storage.synthetic import read_synthetic


def parse_reference(reference: str) -> tuple[str, str]:
    """'fashion-mnist:test' -> ('fashion-mnist', 'test'); the split defaults to test."""
    name, _, split = reference.rpartition(":") if reference.endswith((":test", ":train")) else (reference, "", "test")
    return name, split


def reads_training_records(reference: str, data_root: str | None = None) -> bool:
    """Whether `reference` reads the records of a training split, which may be private.

    True for `X:train`, and for an imagefolder whose test split falls back to the same folder as
    its train split (no `test/` subfolder): the folder actually read decides, not the spelling.
    """
    name, split = parse_reference(reference)
    return split == "train" or canonical_dataset_id(name, split, data_root) == canonical_dataset_id(name, "train", data_root)


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
