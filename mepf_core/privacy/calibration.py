"""Calibrate Gaussian noise for several parts released together, with autodp.

All parts of one release are computed from the same data, so a neighbouring pair moves every part
at once: the release is the composition of Gaussian mechanisms with noise multipliers z_k =
sigma_k / Delta_k. Composition of Gaussians is exactly a Gaussian with 1/z^2 = sum_k 1/z_k^2
(autodp's ComposeGaussian); its (epsilon, delta) curve is the analytic Gaussian mechanism's
(Balle & Wang 2018, autodp's ExactGaussianMechanism). We find the smallest such z for the target,
then give part k the share w_k of the "precision" 1/z^2: z_k = z / sqrt(w_k).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from autodp.mechanism_zoo import ExactGaussianMechanism
from autodp.transformer_zoo import ComposeGaussian


def validate_epsilon_delta(epsilon: float, delta: float) -> None:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon}")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def epsilon_spent(noise_multipliers: Sequence[float], *, delta: float) -> float:
    """Epsilon at `delta` of the composition of Gaussian mechanisms with these z = sigma / Delta."""
    if not noise_multipliers:
        raise ValueError("noise_multipliers must not be empty")
    for z in noise_multipliers:
        if not (math.isfinite(z) and z > 0):
            raise ValueError(f"every noise multiplier must be a finite number > 0, got {z}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    mechs = [ExactGaussianMechanism(sigma=z) for z in noise_multipliers]
    composed = mechs[0] if len(mechs) == 1 else ComposeGaussian()(mechs, [1] * len(mechs))
    return float(composed.get_approxDP(delta))


def effective_noise_multiplier(*, target_epsilon: float, target_delta: float) -> float:
    """Smallest z (to 1e-9 relative) of one Gaussian mechanism that is (target_epsilon, target_delta)-DP."""
    validate_epsilon_delta(target_epsilon, target_delta)

    def eps(z: float) -> float:
        return epsilon_spent([z], delta=target_delta)

    lo, hi = 1e-3, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e7:
            raise ValueError(f"cannot reach epsilon {target_epsilon} at delta {target_delta}")
    while hi / lo > 1 + 1e-10:  # bisection in log space; `hi` always satisfies the target
        mid = math.sqrt(lo * hi)
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def calibrate_parts(
    shares: Mapping[str, float], *, target_epsilon: float, target_delta: float
) -> dict[str, float]:
    """Noise multiplier per part so that the joint release is (target_epsilon, target_delta)-DP.

    `shares` maps part name -> fraction of the privacy "precision" it gets (positive, sums to 1).
    """
    if not shares:
        raise ValueError("shares must name at least one part")
    for name, w in shares.items():
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"share of part {name!r} must be > 0, got {w}")
    total = sum(shares.values())
    if abs(total - 1.0) > 1e-9:
        raise ValueError(f"shares must sum to 1, got {total}")
    z = effective_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta)
    while True:  # guard against float rounding in the split: never overshoot the target
        multipliers = {name: z / math.sqrt(w) for name, w in shares.items()}
        if epsilon_spent(list(multipliers.values()), delta=target_delta) <= target_epsilon:
            return multipliers
        z *= 1 + 1e-9
