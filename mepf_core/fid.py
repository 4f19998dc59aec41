"""FID maths as a ladder: activations -> (mean, covariance) -> Frechet distance.

The distance itself is pytorch-fid's ``calculate_frechet_distance`` so numbers match the published
tool; this module adds float64 statistics and argument checks with messages that name the bad value
(pytorch-fid only asserts).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np

logger = logging.getLogger(__name__)


def activation_statistics(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d) of N x d activations, in float64."""
    acts = np.asarray(acts)
    if acts.ndim != 2:
        raise ValueError(f"acts must be a 2-D array N x d, got shape {acts.shape}")
    if acts.shape[0] < 2:
        raise ValueError(f"acts needs at least 2 rows for a covariance, got {acts.shape[0]}")
    if acts.shape[1] < 1:
        raise ValueError(f"acts needs at least 1 column, got {acts.shape[1]}")
    if not np.issubdtype(acts.dtype, np.number) or np.iscomplexobj(acts):
        raise ValueError(f"acts must be real numbers, got dtype {acts.dtype}")
    acts = acts.astype(np.float64, copy=False)
    if not np.isfinite(acts).all():
        raise ValueError(f"acts contain {int((~np.isfinite(acts)).sum())} NaN or infinite values")
    mu = acts.mean(axis=0)
    sigma = np.atleast_2d(np.cov(acts, rowvar=False))
    return mu, sigma


def validate_statistics(mu: np.ndarray, sigma: np.ndarray, name: str = "statistics") -> None:
    """Raise ValueError unless mu is (d,) and sigma is a finite symmetric (d, d) matrix."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.ndim != 1 or mu.shape[0] < 1:
        raise ValueError(f"{name}: mu must be a non-empty 1-D vector, got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ValueError(f"{name}: sigma must have shape ({d}, {d}) to match mu, got {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mu and sigma must be finite")
    if not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8):
        raise ValueError(f"{name}: sigma must be symmetric, max |sigma - sigma.T| = "
                         f"{float(np.abs(sigma - sigma.T).max()):.3g}")


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), via pytorch-fid."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    validate_statistics(mu1, sigma1, "first statistics")
    validate_statistics(mu2, sigma2, "second statistics")
    if np.shape(mu1) != np.shape(mu2):
        raise ValueError(f"dimensions differ: {np.shape(mu1)[0]} vs {np.shape(mu2)[0]}")
    args = [np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2)]
    # pytorch-fid prints (not logs) when it regularises a singular product; route that to logging.
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), warnings.catch_warnings():
        # pytorch-fid 0.3 passes scipy's deprecated `disp` flag; harmless, and not ours to fix.
        warnings.filterwarnings("ignore", message="The `disp` argument is deprecated",
                                category=DeprecationWarning)
        distance = float(calculate_frechet_distance(*args))
    if captured.getvalue().strip():
        logger.warning("pytorch-fid: %s", captured.getvalue().strip())
    return distance


def fid_from_activations(acts1: np.ndarray, acts2: np.ndarray) -> float:
    """FID between two sets of activations (N1 x d and N2 x d)."""
    return frechet_distance(*activation_statistics(acts1), *activation_statistics(acts2))
