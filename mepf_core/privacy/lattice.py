"""The integer lattice a release is computed on: why no floating-point bit can leak.

Floating-point Gaussian noise added to floating-point sums is not the Gaussian mechanism: the set of
values `fl(S + fl(sigma * z))` can reach depends on S in its low-order bits, which an attacker who
knows all records but one can test (Mironov 2012, "On significance of the least significant bits for
differential privacy"; Jin et al. 2022 for Gaussian samplers). The release therefore never adds noise
to a float. Every record's bounded feature vector is mapped to an integer vector of L2 norm at most
LATTICE_NORM (`to_lattice`), the per-row sums are exact int64 additions, and the noise is an exact
discrete Gaussian on the integers (`mepf_core.privacy.noise`, OpenDP's sampler). The file stores
`(integer sum + integer noise) x lattice_unit`: a fixed function of an integer vector, so whatever its
float bits show is post-processing of the integer mechanism.

Sensitivity on the lattice (derivation; `mepf_core.privacy.sensitivity` gives it in feature units):
every record's integer vector k(x) satisfies sum_j k_j(x)^2 <= B^2 with B = LATTICE_NORM, checked in
exact integer arithmetic (`to_lattice`), whatever the float input. So under add-remove one row moves by
k(x): ||.||_2 <= B; under replace-one one row moves by k(x') - k(x) (<= 2B) or two rows by k(x) and
k(x') (sqrt(2) B <= 2B). With lattice_unit = C / B (C the feature norm bound) this is exactly the
feature-unit sensitivity (C or 2C) divided by lattice_unit. Counts are integers already (unit 1).

Privacy of the discrete Gaussian (derivation). For integers mu, nu and N_Z(mu, s^2) the distribution
proportional to exp(-(x - mu)^2 / (2 s^2)) on Z, and alpha > 1:
    alpha (x - mu)^2 + (1 - alpha) (x - nu)^2 = (x - c)^2 + alpha (1 - alpha) (mu - nu)^2,
    c = alpha mu + (1 - alpha) nu, so
    exp((alpha - 1) D_alpha) = exp(alpha (alpha - 1) (mu - nu)^2 / (2 s^2)) * Theta(c) / Theta(0),
with Theta(c) = sum_x exp(-(x - c)^2 / (2 s^2)), which is largest at integer c (Poisson summation:
Theta(c) = sqrt(2 pi) s sum_k exp(-2 pi^2 s^2 k^2) cos(2 pi k c)). Hence D_alpha <= alpha (mu - nu)^2 /
(2 s^2) (Canonne, Kamath & Steinke 2020, Prop. 5). Independent coordinates add Renyi divergences, so
integer vectors at L2 distance Delta give D_alpha <= alpha Delta^2 / (2 s^2): rho-zCDP with
rho = Delta^2 / (2 s^2) for every alpha. `integer_scale` picks s with s^2 >= z^2 Delta^2 in exact rational
arithmetic, so each part is rho-zCDP with rho <= 1 / (2 z^2), exactly the continuous Gaussian's rho;
parts add rho, and `mepf_core.privacy.calibration` turns the total into (epsilon, delta).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from mepf_core.errors import InvalidArgumentError

LATTICE_NORM = 2**20  # B: a record's integer feature vector has L2 norm <= B (steps of C / B: 1e-6 of C)
_MAX_DIM = 2**22  # sum_j k_j^2 with |k_j| <= B = 2^20 stays below 2^63 for D <= 2^22 (exact int64)
MIN_NORM_BOUND = 2.0**-1002  # C / 2^20 is then a normal float: the unit, and Delta / unit = B or 2B, are exact
MAX_NORM_BOUND = 2.0**100  # sums of int64 steps x unit, and their squares in the reader's norm check, stay finite
# Largest noise scale in lattice steps. Noise beyond 2^62 would overflow int64 (OpenDP saturates, numpy
# wraps: a "noisy" value that no longer hides anything); at scale 2^46, |noise| > 2^52 needs a 64-sigma
# draw (probability < 1e-890), so sums of fewer than 2^29 records plus noise stay below 2^51 steps, where
# the float64 file values are exact and `storage.release.on_lattice` recognises every one of them.
# Only absurd settings reach the cap (epsilon ~ 1e-7, count_share ~ 1e-27).
MAX_INTEGER_SCALE = 2.0**46


def lattice_unit(norm_bound: float) -> float:
    """Feature units per lattice step for features of L2 norm <= `norm_bound`: C / LATTICE_NORM (exact:
    a division by a power of two that stays a normal float). InvalidArgumentError unless norm_bound is
    finite and in [MIN_NORM_BOUND, MAX_NORM_BOUND] = [2^-1002, 2^100]."""
    if not (math.isfinite(norm_bound) and norm_bound > 0):
        raise InvalidArgumentError(f"norm_bound must be a finite number > 0, got {norm_bound}")
    if norm_bound < MIN_NORM_BOUND:
        raise InvalidArgumentError(f"norm_bound must be >= 2^-1002 (its lattice unit must be a normal float), got {norm_bound}")
    if norm_bound > MAX_NORM_BOUND:
        raise InvalidArgumentError(f"norm_bound must be <= 2^100 (sums and their norms must stay finite), got {norm_bound}")
    return float(norm_bound) / LATTICE_NORM


@torch.no_grad()
def to_lattice(phi: torch.Tensor, norm_bound: float) -> torch.Tensor:
    """Each row of `phi` (N x D, any float dtype, feature units) as an int64 row k with sum_j k_j^2 <= B^2.

    k = round(phi / lattice_unit) clamped to [-B, B] (non-finite entries count as 0); a row whose exact
    integer squared norm exceeds B^2 (a float row of norm C rounds over it by a step about half the time)
    has its largest entries lowered by one step each until it fits (`_trim`; a row more than 16 steps over
    is first scaled back to about B), and a row still over the bound after that (none was found by fuzzing)
    becomes all zeros.
    Each output row is a function of its input row alone, and the bound holds for every input (module docstring).
    Raises InvalidArgumentError for D > 2^22 (the exact int64 norm would overflow) or a bad norm_bound.
    """
    if phi.ndim != 2:
        raise InvalidArgumentError(f"phi must be N x D, got shape {tuple(phi.shape)}")
    if phi.shape[1] > _MAX_DIM:
        raise InvalidArgumentError(f"feature dimension {phi.shape[1]} is above {_MAX_DIM}: the exact norm check would overflow")
    unit = lattice_unit(norm_bound)
    b = LATTICE_NORM
    x = torch.nan_to_num(phi.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0) / unit
    k = x.round().clamp_(-b, b).to(torch.int64)
    far = (k * k).sum(dim=1) > (b + 16) ** 2  # more than 16 steps over (outside the contract): scale back to about B
    if bool(far.any()):
        factor = b / torch.sqrt((k[far] * k[far]).sum(dim=1).to(torch.float64))
        k[far] = (k[far].to(torch.float64) * factor[:, None]).round().to(torch.int64)
    # each pass lowers |k_j| by 1 on as many of the largest entries as the exact excess needs, among the
    # 256 largest first (enough for a row that rounded over by a step), then among all of them
    for width in (256, 256, None, None):
        sq = (k * k).sum(dim=1)
        over = sq > b * b
        if not bool(over.any()):
            return k
        k[over] = _trim(k[over], sq[over] - b * b, width)
    k[(k * k).sum(dim=1) > b * b] = 0
    return k


def _trim(k: torch.Tensor, excess: torch.Tensor, width: int | None) -> torch.Tensor:
    """Rows of int64 `k` with |k_j| lowered by 1 (toward 0) on their largest entries, in order, until the
    squared norm has dropped by at least `excess` (or all `width` largest, None: all entries, were lowered):
    exact integers, so the norm ends within a step of the bound (lowering |k_j| by 1 removes 2 |k_j| - 1).
    Entries are ranked by the key |k_j| D + (D - 1 - j), distinct for every entry (equal magnitudes: the
    lower index first), so which entries are lowered is a function of the row alone."""
    d = k.shape[1]
    key = k.abs() * d + torch.arange(d - 1, -1, -1)  # < 2^43: |k_j| <= 2^20, D <= 2^22
    ranked = key.topk(d if width is None else min(width, d), dim=1, sorted=True).values
    magnitude, order = ranked // d, d - 1 - ranked % d
    removed = (2 * magnitude - 1).clamp_min(0).cumsum(dim=1)
    count = (removed < excess[:, None]).sum(dim=1, keepdim=True) + 1  # entries to lower, per row
    chosen = (torch.arange(order.shape[1]) < count).to(torch.int64)
    lower = torch.zeros_like(k).scatter_(1, order, chosen)
    return k - lower * k.sign()


def integer_scale(noise_multiplier: float, sensitivity_units: float) -> float:
    """The discrete Gaussian's scale s (lattice steps) for a part: the smallest float with
    s^2 >= z^2 Delta^2 exactly (rational arithmetic), so rho = Delta^2 / (2 s^2) <= 1 / (2 z^2).

    noise_multiplier: z > 0, finite; sensitivity_units: Delta, the part's L2 sensitivity in lattice steps
    (a float at or above the true value: B, 2B, 1 or float(sqrt 2) > sqrt 2). InvalidArgumentError otherwise,
    and when s would exceed MAX_INTEGER_SCALE (int64 overflow, above).
    """
    for name, v in (("noise_multiplier", noise_multiplier), ("sensitivity_units", sensitivity_units)):
        if not (math.isfinite(v) and v > 0):
            raise InvalidArgumentError(f"{name} must be a finite number > 0, got {v}")
    need = Fraction(noise_multiplier) ** 2 * Fraction(sensitivity_units) ** 2
    s = noise_multiplier * sensitivity_units
    while Fraction(s) ** 2 < need:
        s = math.nextafter(s, math.inf)
    if s > MAX_INTEGER_SCALE:
        raise InvalidArgumentError(f"the noise would be {s:.3g} lattice steps, above 2^46 (int64 sums would overflow): "
                                   f"noise multiplier {noise_multiplier:.3g} is too large; raise the part's share of "
                                   "the budget (count_share) or target_epsilon")
    return s
