"""Gaussian noise in float64 from the operating system's cryptographically secure source.

A real release takes no seed: uniforms come from `os.urandom` (53 random bits each) and are turned
into normals by the Box-Muller transform, so two releases of the same data always differ and
nobody can reproduce the noise. `generator` exists for statistical tests of the transform only.
"""

from __future__ import annotations

import os

import numpy as np

_TWO_53 = float(2**53)


def _secure_uniform53(n: int) -> np.ndarray:
    """n uniforms on the grid {0, 1, ..., 2^53 - 1} / 2^53, from os.urandom."""
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return (words >> np.uint64(11)).astype(np.float64) / _TWO_53


def secure_standard_normal(shape: tuple[int, ...] | int) -> np.ndarray:
    """Standard normal float64 samples of `shape` (Box-Muller on secure uniforms)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n = int(np.prod(shape, dtype=np.int64))
    if n < 0:
        raise ValueError(f"shape must be non-negative, got {shape}")
    half = (n + 1) // 2
    u1 = 1.0 - _secure_uniform53(half)  # in (0, 1]: log is finite
    u2 = _secure_uniform53(half)
    r = np.sqrt(-2.0 * np.log(u1))
    theta = 2.0 * np.pi * u2
    z = np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:n]
    return z.reshape(shape)


def gaussian_noise(shape: tuple[int, ...] | int, *, sigma: float) -> np.ndarray:
    """N(0, sigma^2) float64 noise of `shape` from the secure source; ValueError unless 0 <= sigma < inf."""
    if not (np.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    return sigma * secure_standard_normal(shape)
