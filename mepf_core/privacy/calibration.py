"""Calibrate Gaussian noise for several parts released together, with autodp.

All parts of one release are computed from the same data, so a neighbouring pair moves every part
at once: the release is the composition of Gaussian mechanisms with noise multipliers z_k =
sigma_k / Delta_k. Composition of Gaussians is exactly a Gaussian with 1/z^2 = sum_k 1/z_k^2
(autodp's ComposeGaussian); its (epsilon, delta) curve is the analytic Gaussian mechanism's
(Balle & Wang 2018, autodp's ExactGaussianMechanism). We find the smallest such z for the target,
then give part k the share w_k of the "precision" 1/z^2: z_k = z / sqrt(w_k).

Delta limits (probabilities, no unit):
  MIN_DELTA = the smallest normal double, 2.2250738585072014e-308. Measured: for epsilon 0.001..100
  autodp's calibration at every delta from 1e-5 down to this value gives a z whose true delta (the
  analytic Gaussian curve of Balle & Wang 2018, Thm 8, evaluated with 400-digit mpmath) equals the
  target to 4 significant digits; at every subnormal delta (1e-309, 1e-320, 5e-324, ...) autodp raises
  "Failed to find epsilon". Smaller deltas are refused here with a ValueError instead.
  MAX_TARGET_DELTA = 1e-3: delta is the probability of a catastrophic leak ((0, delta)-DP allows
  publishing each record in full with probability delta, about n * delta records), so it must be far
  below 1/n; 1e-3 is a hard ceiling that refuses meaningless values, and the default 1e-5 is the
  value to use for n up to about 100,000. The ceiling applies to one release's target_delta and to a
  dataset's delta budget alike.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping, Sequence

from autodp.mechanism_zoo import ExactGaussianMechanism
from autodp.transformer_zoo import ComposeGaussian

from mepf_core.errors import InvalidArgumentError


MIN_DELTA = sys.float_info.min  # 2.2250738585072014e-308: autodp fails on every subnormal delta
MAX_TARGET_DELTA = 1e-3  # per release (and per budget): delta must stay far below 1/n


def validate_delta(delta: float, *, name: str = "delta", cap: float | None = None) -> float:
    """Check a delta: in (0, 1), at least MIN_DELTA (what autodp can calibrate) and at most `cap`.

    The messages name `name` (for example "target_delta") so the user sees which setting is wrong.
    """
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise InvalidArgumentError(f"{name} must be in (0, 1), got {delta}")
    if delta < MIN_DELTA:
        raise InvalidArgumentError(f"{name} must be >= {MIN_DELTA:g} (the smallest delta autodp calibrates), got {delta:g}")
    if cap is not None and delta > cap:
        raise InvalidArgumentError(f"{name} must be <= {cap:g} (delta is the probability of a catastrophic leak; keep it far "
                         f"below 1/n), got {delta:g}")
    return float(delta)


def validate_epsilon_delta(epsilon: float, delta: float) -> None:
    """Check one release's target (epsilon > 0, finite; MIN_DELTA <= delta < 1); messages name target_*."""
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise InvalidArgumentError(f"target_epsilon must be a finite number > 0, got {epsilon}")
    validate_delta(delta, name="target_delta")


def epsilon_spent(noise_multipliers: Sequence[float], *, delta: float, name: str = "delta") -> float:
    """Epsilon at `delta` of the composition of Gaussian mechanisms with these z = sigma / Delta.

    Exact: the composition is one Gaussian with 1/z^2 = sum 1/z_k^2 (autodp ComposeGaussian), and
    its epsilon at `delta` is read off the analytic Gaussian curve (Balle & Wang 2018; autodp
    ExactGaussianMechanism). Any failure inside autodp becomes a ValueError naming `name`.
    """
    if not noise_multipliers:
        raise InvalidArgumentError("noise_multipliers must not be empty")
    for z in noise_multipliers:
        if not (math.isfinite(z) and z > 0):
            raise InvalidArgumentError(f"every noise multiplier must be a finite number > 0, got {z}")
    validate_delta(delta, name=name)
    try:
        mechs = [ExactGaussianMechanism(sigma=z) for z in noise_multipliers]
        composed = mechs[0] if len(mechs) == 1 else ComposeGaussian()(mechs, [1] * len(mechs))
        eps = float(composed.get_approxDP(delta))
    except (RuntimeError, ValueError, ArithmeticError) as exc:  # autodp: "Failed to find epsilon", overflow
        raise InvalidArgumentError(f"autodp could not compute epsilon at {name} {delta:g}: {str(exc)[:120]}") from None
    if not (math.isfinite(eps) and eps >= 0):
        raise InvalidArgumentError(f"autodp returned epsilon {eps} at {name} {delta:g}; choose another {name}")
    return eps


def effective_noise_multiplier(*, target_epsilon: float, target_delta: float) -> float:
    """Smallest z (to 1e-9 relative) of one Gaussian mechanism that is (target_epsilon, target_delta)-DP."""
    validate_epsilon_delta(target_epsilon, target_delta)

    def eps(z: float) -> float:
        return epsilon_spent([z], delta=target_delta, name="target_delta")

    lo, hi = 1e-3, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e7:
            raise InvalidArgumentError(f"cannot reach epsilon {target_epsilon} at target_delta {target_delta}")
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
