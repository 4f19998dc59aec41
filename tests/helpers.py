"""Shared test helpers: tiny private datasets and un-noised sums through the production path."""

from __future__ import annotations

import functools

import numpy as np
import torch

from mepf_core.embedding import FeatureSums
from mepf_core.encoders import build_feature_map
from mepf_core.features import images_to_features


@functools.lru_cache(maxsize=None)
def lite0():
    return build_feature_map("efficientnet-lite0")


def sums_of(images: torch.Tensor, labels: torch.Tensor | None, *, num_classes: int, moments: int = 2,
            norm_bound: float = 1.0, second_moment_bound: float = 1.0, batch_size: int = 8) -> FeatureSums:
    """Un-noised per-class sums of a dataset, exactly as the custodian computes them (batched)."""
    fm = lite0()
    sums = FeatureSums.zeros(num_classes if labels is not None else 1, fm.feature_dim, moments)
    for lo in range(0, len(images), batch_size):
        x = images[lo : lo + batch_size]
        y = None if labels is None else labels[lo : lo + batch_size]
        phi1, phi2 = images_to_features(fm, x, norm_bound=norm_bound,
                                        second_moment_bound=second_moment_bound if moments == 2 else None)
        sums.add(phi1, phi2, y)
    return sums


def random_images(n: int, seed: int = 0, shape=(1, 28, 28)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g)


def fmnist_subset(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from storage.datasets import open_dataset

    images, labels = next(open_dataset("fashion-mnist", "train").iter_batches(n))
    return images, labels


def frob(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).sum()))
