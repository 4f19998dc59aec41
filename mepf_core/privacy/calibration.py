"""Calibrate the noise of several parts released together, with autodp.

All parts of one release are computed from the same data, so a neighbouring pair moves every part
at once. Each part k is a discrete Gaussian mechanism on its integer lattice with noise multiplier
z_k = sigma_k / Delta_k, which is rho_k-zCDP with rho_k = 1 / (2 z_k^2) (`mepf_core.privacy.lattice`
derives it; Canonne, Kamath & Steinke 2020, Prop. 5). zCDP composes by adding rho, so the release is
rho-zCDP with rho = 1 / (2 z^2), 1/z^2 = sum_k 1/z_k^2 (Bun & Steinke 2016, Lemma 2.3), and rho-zCDP
gives (epsilon, delta)-DP by autodp's Renyi-to-approximate-DP conversion (autodp DiscreteGaussianMechanism:
zCDP with rho = 0.5 / z^2; the conversion of Balle et al. 2020, "Hypothesis testing interpretations and
Renyi DP", Thm 21). We find the smallest z for the target, then give part k the share w_k of the
"precision" 1/z^2: z_k = z / sqrt(w_k).

Why not the analytic Gaussian curve (Balle & Wang 2018) the continuous Gaussian has: its exact curve is
proven for real-valued noise, which a computer cannot draw (the floating-point attack,
`mepf_core.privacy.lattice`); for the multivariate discrete Gaussian only the zCDP bound is proven (the
comment in autodp's DiscreteGaussianMechanism says the same). It costs 6-10 % more noise at the same
target (z at delta 1e-5: 0.530 against 0.500 at epsilon 10, 4.05 against 3.73 at 1, 17.9 against 16.3 at 0.2).

Delta limits (probabilities, no unit):
  MIN_DELTA = the smallest normal double, 2.2250738585072014e-308: a floor kept from the analytic
  calibration, which failed on subnormal deltas (the zCDP conversion does not, but a delta below 1e-308
  means nothing a custodian could want, and ledgers already hold this limit); smaller deltas are refused
  with a ValueError.
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

import numpy as np
from autodp.mechanism_zoo import DiscreteGaussianMechanism

from mepf_core.errors import InvalidArgumentError


MIN_DELTA = sys.float_info.min  # 2.2250738585072014e-308: the smallest normal double
MAX_TARGET_DELTA = 1e-3  # per release (and per budget): delta must stay far below 1/n


def validate_delta(delta: float, *, name: str = "delta", cap: float | None = None) -> float:
    """Check a delta: in (0, 1), at least MIN_DELTA (what autodp can calibrate) and at most `cap`.

    The messages name `name` (for example "target_delta") so the user sees which setting is wrong.
    """
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise InvalidArgumentError(f"{name} must be in (0, 1), got {delta}")
    if delta < MIN_DELTA:
        raise InvalidArgumentError(f"{name} must be >= {MIN_DELTA:g} (the smallest normal double), got {delta:g}")
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
    """Epsilon at `delta` of the composition of discrete Gaussian mechanisms with these z = sigma / Delta.

    The composition is rho-zCDP with rho = sum_k 1 / (2 z_k^2) (module docstring), and its epsilon at
    `delta` is autodp's conversion of that zCDP guarantee (DiscreteGaussianMechanism at the composed z).
    Any failure inside autodp becomes a ValueError naming `name`.
    """
    if not noise_multipliers:
        raise InvalidArgumentError("noise_multipliers must not be empty")
    for z in noise_multipliers:
        if not (math.isfinite(z) and z > 0):
            raise InvalidArgumentError(f"every noise multiplier must be a finite number > 0, got {z}")
    validate_delta(delta, name=name)
    try:
        composed_z = 1.0 / math.sqrt(math.fsum(1.0 / z**2 for z in noise_multipliers))
        with np.errstate(invalid="ignore"):  # scipy's Brent step inside autodp divides 0 by 0 harmlessly
            eps = float(DiscreteGaussianMechanism(sigma=composed_z).get_approxDP(delta))
    except (RuntimeError, ValueError, ArithmeticError) as exc:  # autodp: "Failed to find epsilon", overflow
        raise InvalidArgumentError(f"autodp could not compute epsilon at {name} {delta:g}: {str(exc)[:120]}") from None
    if not (math.isfinite(eps) and eps >= 0):
        raise InvalidArgumentError(f"autodp returned epsilon {eps} at {name} {delta:g}; choose another {name}")
    return eps


def effective_noise_multiplier(*, target_epsilon: float, target_delta: float) -> float:
    """Smallest z (to 1e-9 relative) of one discrete Gaussian mechanism that is (target_epsilon, target_delta)-DP."""
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
