"""Streaming per-class sums of bounded features, and turning them into a noisy embedding.

Memory is O(K x D) float64 whatever the number of images: batches are added and dropped.
`FeatureSums` holds UN-NOISED private statistics: its repr shows shapes only, and it must never
be logged, persisted or returned past the custodian's noise step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mepf_core.privacy.mechanism import ReleaseMechanism
from mepf_core.privacy.noise import gaussian_noise


@dataclass(repr=False)
class FeatureSums:
    """Un-noised per-class sums of bounded features: the private statistics a release noises.

    moment1: K x D float64 sums of first-moment features (each record's norm <= C1); moment2: K x D
    float64 sums of second-moment features, or None with moments 1; counts: (K,) float64 records per
    class (K = 1 when unlabelled). PRIVATE: never log, persist or return it past the noise step (its
    repr shows shapes only). Paper: DP-MEPF (Harder et al., "Pre-trained Perceptual Features Improve
    Differentially Private Image Generation", TMLR 2023) releases these, noised, as mean embeddings.
    """

    moment1: np.ndarray  # K x D float64
    moment2: np.ndarray | None  # K x D float64, or None when only the first moment is released
    counts: np.ndarray  # K float64

    @classmethod
    def zeros(cls, num_classes: int, dim: int, moments: int) -> "FeatureSums":
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got {num_classes}, {dim}")
        return cls(
            np.zeros((num_classes, dim)),
            np.zeros((num_classes, dim)) if moments == 2 else None,
            np.zeros(num_classes),
        )

    def __repr__(self) -> str:  # shapes only: the values are private
        return f"FeatureSums(classes={self.moment1.shape[0]}, dim={self.moment1.shape[1]}, moments={1 + (self.moment2 is not None)})"

    def add(self, phi1: torch.Tensor, phi2: torch.Tensor | None, labels: torch.Tensor | None) -> None:
        """Add a batch: phi (B x D float64) to the rows of their labels (row 0 when unlabelled)."""
        k = self.moment1.shape[0]
        if labels is None:
            labels = torch.zeros(phi1.shape[0], dtype=torch.long)
        labels = labels.to(torch.long)
        if labels.numel() and (labels.min() < 0 or labels.max() >= k):
            # no label values or counts in the message: it can reach Prefect's logs from a custodian task
            raise ValueError(f"labels must be in [0, {k}); this batch holds a label outside that range")
        onehot = torch.nn.functional.one_hot(labels, k).to(torch.float64)  # B x K
        self.moment1 += (onehot.T @ phi1.to(torch.float64)).numpy()
        if self.moment2 is not None:
            if phi2 is None:
                raise ValueError("second-moment features are required: this accumulator has moments=2")
            self.moment2 += (onehot.T @ phi2.to(torch.float64)).numpy()
        self.counts += onehot.sum(0).numpy()

    def merge(self, other: "FeatureSums") -> "FeatureSums":
        if self.moment1.shape != other.moment1.shape or (self.moment2 is None) != (other.moment2 is None):
            raise ValueError(f"cannot merge {self!r} with {other!r}")
        return FeatureSums(
            self.moment1 + other.moment1,
            None if self.moment2 is None else self.moment2 + other.moment2,
            self.counts + other.counts,
        )

    def parts(self) -> dict[str, np.ndarray]:
        out = {"moment1": self.moment1, "counts": self.counts}
        if self.moment2 is not None:
            out["moment2"] = self.moment2
        return out


def sums_to_noisy_parts(sums: FeatureSums, mechanism: ReleaseMechanism) -> dict[str, np.ndarray]:
    """Add each part's calibrated float64 Gaussian noise, once. Parts of sensitivity 0 are exact."""
    values = sums.parts()
    expected = {p.name for p in mechanism.parts}
    if set(values) != expected:
        raise ValueError(f"sums have parts {sorted(values)}, mechanism expects {sorted(expected)}")
    noisy = {}
    for part in mechanism.parts:
        v = values[part.name]
        noisy[part.name] = v + gaussian_noise(v.shape, sigma=part.sigma) if part.noised else v.copy()
    return noisy


def mean_embeddings(noisy: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Post-processing on the public side: per-class mean = noisy sum / max(noisy count, 1)."""
    counts = np.maximum(noisy["counts"], 1.0)[:, None]
    return {name: v / counts for name, v in noisy.items() if name != "counts"}
