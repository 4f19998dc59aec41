"""Evaluation tasks: public data only (a real test split) and the synthetic dataset.

Nothing here feeds back into training or checkpoint choice. Every task is retried from its start on
transient failures only (tasks.retries: an OSError reading a file or downloading a split, CUDA out
of memory), never on user errors (MepfError); none has a timeout (Inception's time grows with the
number of images and the hardware).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from prefect import get_run_logger, task

from mepf_core.classifiers import ClassifierScore, downstream_scores
from mepf_core.errors import InvalidArgumentError
from mepf_core.fid import activation_statistics, frechet_distance
from mepf_core.inception import images_to_inception_activations
from storage.datasets import canonical_dataset_id, open_dataset
from storage.metrics import FID_ABSOLUTE_MIN, FID_MIN_SAMPLES, load_or_compute_reference_stats, small_fid_problem
from storage.references import parse_reference, reads_training_records  # noqa: F401 - used by flows.evaluate
from storage.references import parse_reference_half, reference_records
from storage.references import check_label_space, reference_image_mode
from storage.provenance import SyntheticInfo
from storage.synthetic import read_synthetic_dataset
from storage.weights import load_fid_inception
from tasks.retries import retry_options


def reference_cache_key(reference: str, data_root: str | None = None) -> str:
    """The FID cache's name for a reference split: canonical, so two folders spelled alike never share stats."""
    name, split, half = parse_reference_half(reference)
    return canonical_dataset_id(name, split, data_root) + (f"#{half}" if half else "")


@task(name="load-synthetic", persist_result=False, **retry_options())
def load_synthetic(path: str) -> tuple[np.ndarray, np.ndarray | None, SyntheticInfo]:
    """(images uint8 N x C x H x W, labels int64 (N,) or None, provenance) of a synthetic export in any
    format `mepf sample` writes (.h5, .parquet, .npz, image folder); ProvenanceError when its metadata
    lacks a field (storage.synthetic.read_synthetic_dataset)."""
    data = read_synthetic_dataset(path)
    return data.images, data.labels, data.info


@task(name="load-reference", persist_result=False, **retry_options())
def load_reference(reference: str, data_root: str | None = None, limit: int | None = None, *,
                   synthetic_shape: tuple[int, ...] | None = None, synthetic_classes: tuple[str, ...] | None = None,
                   synthetic_name: str = "the synthetic dataset"):
    """(images uint8 N x C x H x W, labels int64 (N,) or None) of a reference split, the first `limit`.

    A half of the test split (`DATASET:test-select`, `DATASET:test-report`) is the whole test split
    indexed by `storage.references.split_half_indices` (class-stratified, fixed seed), in file order.
    With `synthetic_shape` (C, H, W), the split is first checked against the synthetic dataset
    (`storage.references.check_label_space`: shape, number and names of classes when
    `synthetic_classes` is given), before any image is decoded: LabelSpaceMismatchError names both
    sides. An image folder is then decoded at that shape (`reference_image_mode`).
    """
    mode = reference_image_mode(reference, synthetic_shape) if synthetic_shape is not None else {}
    source = open_dataset(*parse_reference(reference), data_root, **mode)
    if synthetic_shape is not None:
        check_label_space(reference, source.class_names, source.image_shape, synthetic_classes, synthetic_shape,
                          synthetic_name)
    return reference_records(source, reference, limit)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def fid_counts(n_synthetic: int, fid_samples: int, n_reference: int, allow_small_fid: bool, *,
               private_reference: bool = False) -> tuple[int, int]:
    """(synthetic, reference) image counts an FID will use: min(fid_samples, n_synthetic) and n_reference.

    Raises InvalidArgumentError when either is below FID_MIN_SAMPLES (2,048) and `allow_small_fid` is
    False, or below FID_ABSOLUTE_MIN (2: a covariance needs two images) in any case. With
    `private_reference` (the reference reads training records) the message does not print the
    reference count: the split's size is a private count and the error reaches Prefect.
    """
    counts = (min(fid_samples, n_synthetic), n_reference)
    names = (f"fid_samples {fid_samples} with {n_synthetic} synthetic images: synthetic count",
             "fid_reference (or the reference split's size): reference count")
    for i, (name, count) in enumerate(zip(names, counts)):
        shown = "(not shown: the reference reads training records)" if private_reference and i == 1 else count
        if count < FID_ABSOLUTE_MIN:
            raise InvalidArgumentError(f"{name} {shown}, but an FID needs at least {FID_ABSOLUTE_MIN} images")
        if count < FID_MIN_SAMPLES and not allow_small_fid:
            raise InvalidArgumentError(small_fid_problem(name, shown))
    return counts


def content_fingerprint(images: np.ndarray) -> str:
    """sha256 (first 16 hex digits) of an image array's dtype, shape and bytes: the reference statistics'
    cache key names the pixels they were computed from, so replacing the images of a folder (same path,
    same count, any mtimes) never returns the old statistics."""
    arr = np.ascontiguousarray(images)
    digest = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()[:16]


def fid_against_reference(images: np.ndarray, reference_images: np.ndarray, reference_key: str, n: int,
                          cache: bool = True) -> float:
    """FID of the first `n` images against the reference split's statistics, cached per key.

    The cache key is `reference_key` (the resolved path for an image folder, `reference_cache_key`),
    the reference count and the fingerprint of the reference pixels (`content_fingerprint`).
    `cache=False` (a reference that reads training records, see `reads_training_records`): the
    statistics, un-noised functions of possibly private images, are computed in memory and never
    written to the cache under the user's home.
    """
    model = load_fid_inception(_device())
    key = (f"{reference_key}|n={len(reference_images)}|sha256={content_fingerprint(reference_images)}"
           "|pytorch-fid-pool3|gray->rgb|bilinear299")

    def compute():
        return activation_statistics(
            images_to_inception_activations(model, reference_images, device=_device(), progress=True))

    mu_r, sigma_r = load_or_compute_reference_stats(key, compute) if cache else compute()
    acts = images_to_inception_activations(model, images[:n], device=_device(), progress=True)
    return frechet_distance(*activation_statistics(acts), mu_r, sigma_r)


@task(name="fid", persist_result=False, **retry_options())
def fid_task(synthetic: np.ndarray, reference_images: np.ndarray, reference_key: str, fid_samples: int,
             cache: bool = True) -> float:
    """FID of up to `fid_samples` synthetic images against (cached, unless `cache=False`) reference statistics."""
    fid = fid_against_reference(synthetic, reference_images, reference_key, fid_samples, cache=cache)
    get_run_logger().info("FID %.2f on %d synthetic images against %s", fid, min(fid_samples, len(synthetic)),
                          reference_key)
    return fid


@task(name="downstream-accuracy", persist_result=False, **retry_options())
def accuracy_task(train_images, train_labels, test_images, test_labels, classifiers: list[str],
                  seed: int = 0) -> dict[str, ClassifierScore]:
    """Classifier name -> ClassifierScore (accuracy on the whole test split and per test class; see
    mepf_core.classifiers.downstream_scores); InvalidArgumentError for an unlabelled training set."""
    if train_labels is None:
        raise InvalidArgumentError("downstream accuracy needs a labelled synthetic dataset (release made with --labelled)")
    return downstream_scores(train_images, train_labels, test_images, test_labels, classifiers=classifiers, seed=seed)


def synthetic_path_for(run_dir: str) -> Path:
    return Path(run_dir) / "synthetic.h5"
