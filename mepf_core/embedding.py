"""Streaming per-row sums of bounded features on the integer lattice, and their noisy release.

Memory is O(K x D) int64 whatever the number of images: batches are added and dropped.
`FeatureSums` holds UN-NOISED private statistics: its repr shows shapes only, and it must never
be logged, persisted or returned past the custodian's noise step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mepf_core.privacy.lattice import LATTICE_NORM, lattice_unit, to_lattice
from mepf_core.privacy.mechanism import ReleaseMechanism
from mepf_core.privacy.noise import discrete_gaussian_noise


@dataclass(repr=False)
class FeatureSums:
    """Un-noised per-row sums of bounded features, in integer lattice steps: the private statistics a release noises.

    moment1: K x D int64 sums of first-moment features, each record's row `to_lattice(phi1, C1)` (integer
    L2 norm <= 2^20, steps of units["moment1"] = C1 / 2^20); moment2: the same for second-moment features
    (bound C2), or None with moments 1; counts: (K,) int64 records per row (K = classes, or (class, cell)
    pairs; 1 when unlabelled); units: feature units per lattice step of each part (counts: 1). PRIVATE:
    never log, persist or return it past the noise step (its repr shows shapes only). Paper: DP-MEPF
    (Harder et al., "Pre-trained Perceptual Features Improve Differentially Private Image Generation",
    TMLR 2023) releases these, noised, as mean embeddings.
    """

    moment1: np.ndarray  # K x D int64 lattice steps
    moment2: np.ndarray | None  # K x D int64, or None when only the first moment is released
    counts: np.ndarray  # K int64
    units: dict[str, float]  # part name -> feature units per lattice step

    @classmethod
    def zeros(cls, num_classes: int, dim: int, moments: int, *, norm_bound: float,
              second_moment_bound: float | None = None) -> "FeatureSums":
        """Empty sums for K = num_classes rows of D = dim features; the bounds fix each part's lattice."""
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got {num_classes}, {dim}")
        if moments == 2 and second_moment_bound is None:
            raise ValueError("moments 2 needs second_moment_bound")
        units = {"moment1": lattice_unit(norm_bound), "counts": 1.0}
        if moments == 2:
            units["moment2"] = lattice_unit(second_moment_bound)
        zeros = np.zeros((num_classes, dim), dtype=np.int64)
        return cls(zeros, zeros.copy() if moments == 2 else None, np.zeros(num_classes, dtype=np.int64), units)

    def __repr__(self) -> str:  # shapes only: the values are private
        return f"FeatureSums(classes={self.moment1.shape[0]}, dim={self.moment1.shape[1]}, moments={1 + (self.moment2 is not None)})"

    def add(self, phi1: torch.Tensor, phi2: torch.Tensor | None, labels: torch.Tensor | None) -> None:
        """Add a batch: phi (B x D float, norms <= the bounds) to the rows of their labels (row 0 when
        unlabelled), each record first mapped to its lattice point (`to_lattice`)."""
        k = self.moment1.shape[0]
        if labels is None:
            labels = torch.zeros(phi1.shape[0], dtype=torch.long)
        labels = labels.to(torch.long)
        if labels.numel() and (labels.min() < 0 or labels.max() >= k):
            # no label values or counts in the message: it can reach Prefect's logs from a custodian task
            raise ValueError(f"labels must be in [0, {k}); this batch holds a label outside that range")
        self._add_rows(self.moment1, phi1, "moment1", labels)
        if self.moment2 is not None:
            if phi2 is None:
                raise ValueError("second-moment features are required: this accumulator has moments=2")
            self._add_rows(self.moment2, phi2, "moment2", labels)
        self.counts += torch.bincount(labels, minlength=k).numpy()

    def _add_rows(self, sums: np.ndarray, phi: torch.Tensor, part: str, labels: torch.Tensor) -> None:
        steps = to_lattice(phi, self.units[part] * LATTICE_NORM)  # unit x B = the norm bound, exactly
        torch.from_numpy(sums).index_add_(0, labels, steps)  # exact integer sums, in place (shares memory)

    def merge(self, other: "FeatureSums") -> "FeatureSums":
        if (self.moment1.shape != other.moment1.shape or (self.moment2 is None) != (other.moment2 is None)
                or self.units != other.units):
            raise ValueError(f"cannot merge {self!r} with {other!r}")
        return FeatureSums(
            self.moment1 + other.moment1,
            None if self.moment2 is None else self.moment2 + other.moment2,
            self.counts + other.counts,
            dict(self.units),
        )

    def parts(self) -> dict[str, np.ndarray]:
        """The integer sums by part name (int64 lattice steps; counts in records)."""
        out = {"moment1": self.moment1, "counts": self.counts}
        if self.moment2 is not None:
            out["moment2"] = self.moment2
        return out

    def values(self) -> dict[str, np.ndarray]:
        """The sums in feature units (float64 steps x lattice unit), by part name: what the release noises."""
        return {name: v.astype(np.float64) * self.units[name] for name, v in self.parts().items()}


def sums_to_noisy_parts(sums: FeatureSums, mechanism: ReleaseMechanism,
                        noise: Callable[..., np.ndarray] = discrete_gaussian_noise) -> dict[str, np.ndarray]:
    """Each part's noisy release, drawn once: (integer sums + discrete Gaussian noise) x lattice_unit, float64.

    Noise of scale `part.integer_scale` lattice steps (sigma / lattice_unit, `mepf_core.privacy.lattice`)
    is added to the int64 sums exactly; parts of sensitivity 0 are released exactly. `noise(shape, scale=s)`
    draws it: OpenDP's exact sampler for every release; only the privacy audit, which draws thousands of
    releases of public images, passes a fast stand-in (`mepf_core.privacy.audit_run.audit_noise`).
    ValueError when the sums' parts or lattices are not the mechanism's.
    """
    values = sums.parts()
    expected = {p.name for p in mechanism.parts}
    if set(values) != expected:
        raise ValueError(f"sums have parts {sorted(values)}, mechanism expects {sorted(expected)}")
    noisy = {}
    for part in mechanism.parts:
        if sums.units[part.name] != part.lattice_unit:
            raise ValueError(f"part {part.name!r}: the sums' lattice unit is not the mechanism's (different norm bounds)")
        steps = values[part.name]
        if part.noised:
            steps = steps + noise(steps.shape, scale=part.integer_scale)
        noisy[part.name] = steps.astype(np.float64) * part.lattice_unit  # post-processing; exact below 2^51 steps
    return noisy


def mean_embeddings(noisy: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Post-processing on the public side: per-class mean = noisy sum / max(noisy count, 1)."""
    counts = np.maximum(noisy["counts"], 1.0)[:, None]
    return {name: v / counts for name, v in noisy.items() if name != "counts"}
