"""Empirical privacy auditing: turn an attack's error counts into a lower bound on epsilon.

A release that is (epsilon, delta)-DP forces EVERY test of a dataset D against a neighbour D' to
satisfy (Kairouz, Oh & Viswanath 2015)

    1 - delta - FNR <= e^epsilon * FPR      and      1 - delta - FPR <= e^epsilon * FNR.

So upper confidence bounds on a test's FPR and FNR (Clopper-Pearson, exact) give a lower confidence
bound on the epsilon the mechanism really has (Jagielski et al. 2020; Nasr et al. 2021). If that
bound exceeds the claimed epsilon, the claim is false; if it does not, the audit found no bug.

The test. Each released part is a sum S_p plus N(0, sigma_p^2 I). Between D and D' the sums move
by Delta_p, so by Neyman-Pearson the most powerful test projects the release onto Delta_p and
divides by sigma_p: u_p ~ N(0, 1) under D and N(|Delta_p| / sigma_p, 1) under D'. The joint test
weights the parts by |Delta_p| / sigma_p (the likelihood ratio of the whole release); per-part
tests catch a bug confined to one part (e.g. a part released without noise), which the joint
statistic would dilute.

Multiple thresholds. Every (test, threshold) pair comes from a grid fixed before any draw, and all
confidence bounds hold simultaneously (Bonferroni over the 2 x pairs rate intervals), so reporting
the best pair is not a selection bias.

White-box check (`gaussian_shift_check`). The black-box bound needs the rare tail events that a
large epsilon is made of, so at a few thousand draws it cannot refute a claim that is off by a
factor 2 (sigma halved at epsilon 1: true epsilon 2.15, bound about 0.9). But the auditor knows
more: the release is a sum plus Gaussian noise (discrete Gaussian on a lattice of 2^20 steps per norm
bound, so hundreds of thousands of steps per sigma: Gaussian to far below what any number of draws can
resolve), so each test's score is a LINEAR function of that noise, hence Gaussian, with the same
variance under D and D' (the noise does not depend on the data). So the scores are N(a, s^2) under D and N(b, s^2) under D', and the whole pair is a
Gaussian mechanism of shift mu = (b - a) / s (Nasr et al. 2021, "Adversary instantiation", and
Nasr et al. 2023, "Tight auditing of differentially private machine learning", audit DP-SGD the
same way: fit Gaussians to the canary's scores and read off their mu). The score is
post-processing of one release, so if the release is (epsilon, delta)-DP, so is this shift
mechanism. The claim's calibration (`effective_noise_multiplier`: zCDP of the discrete Gaussian, turned
into (epsilon, delta)) allows |mu| <= mu*(epsilon, delta) = 1 / z*(epsilon, delta), z* being the smallest
noise multiplier it finds for the claim; the epsilon it gives grows with mu, so a larger shift is less
noise than the claim was calibrated for. (A continuous Gaussian of shift mu is (epsilon, delta)-DP iff
Phi(mu / 2 - epsilon / mu) - e^epsilon Phi(-mu / 2 - epsilon / mu) <= delta, Balle & Wang 2018, Thm 8; the
zCDP calibration allows a smaller mu than that curve, so the check is on the strict side.)
A confidence interval for mu whose lower end exceeds mu* refutes the claim. It only needs means and
variances, so 5,000 draws measure mu to a few percent and catch a factor-2 mistake at epsilon >= 1.
What it trusts is the noise's form (additive, Gaussian, independent of the data): that is the
mechanism's design, and the black-box bound, which assumes nothing, stays next to it.

Also here: the statistics of a membership-inference smoke test (AUC, TPR at a low FPR, and the
largest AUC any (epsilon, delta)-DP release allows). Uses scipy for the Beta, t and chi-square
quantiles only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.special import betaincinv, ndtr
from scipy.stats import chi2, t as student_t

from mepf_core.privacy.calibration import effective_noise_multiplier, epsilon_spent

# Threshold offsets, in units of the noise's standard deviation, around the midpoint between the
# two hypotheses' means. Wide enough to reach the tails that make a bound large at small epsilon.
THRESHOLD_OFFSETS = tuple(x / 2 for x in range(-7, 8))  # -3.5, -3.0, ..., 3.5


def _check_confidence(confidence: float) -> None:
    if not (isinstance(confidence, float) and 0 < confidence < 1):
        raise ValueError(f"confidence must be a float in (0, 1), got {confidence!r}")


def clopper_pearson(successes, trials, *, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-sided interval for a binomial proportion (vectorised over `successes`)."""
    _check_confidence(confidence)
    k = np.asarray(successes, dtype=np.float64)
    n = float(trials)
    if not (n >= 1 and n == int(n)):
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")
    if np.any((k < 0) | (k > n) | (k != np.floor(k))):
        raise ValueError(f"successes must be integers in [0, {int(n)}], got {successes!r}")
    tail = (1.0 - confidence) / 2.0
    with np.errstate(invalid="ignore"):
        lo = np.where(k > 0, betaincinv(k, n - k + 1, tail), 0.0)
        hi = np.where(k < n, betaincinv(k + 1, n - k, 1.0 - tail), 1.0)
    return lo, hi


def epsilon_from_rates(fpr, fnr, *, delta: float) -> np.ndarray:
    """Largest epsilon the DP inequalities certify from these error rates (0 when none; inf when
    an error rate is 0 but the other inequality is not slack)."""
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    fpr, fnr = np.asarray(fpr, dtype=np.float64), np.asarray(fnr, dtype=np.float64)

    def one(num_rate, den_rate):
        num = 1.0 - delta - num_rate
        with np.errstate(divide="ignore", invalid="ignore"):
            val = np.log(num / den_rate)
        return np.where(num > 0, np.where(den_rate > 0, val, np.inf), 0.0)

    return np.maximum(np.maximum(one(fnr, fpr), one(fpr, fnr)), 0.0)


class ShiftTest:
    """The optimal test of D against D' for a Gaussian release: projections onto Delta / sigma.

    `centre` holds the un-noised sums of D, `difference` the sums of D' minus those of D, `sigma`
    the CLAIMED noise of each part. Scores are centred at the midpoint of the two hypotheses: under
    the claim they are N(-m/2, 1) for D and N(+m/2, 1) for D', m = shift of that test.
    """

    def __init__(self, centre: Mapping[str, np.ndarray], difference: Mapping[str, np.ndarray],
                 sigma: Mapping[str, float]):
        if set(centre) != set(difference):
            raise ValueError(f"centre has parts {sorted(centre)}, difference {sorted(difference)}")
        self._centre = {k: np.asarray(v, dtype=np.float64) for k, v in centre.items()}
        self._unit, self.shifts = {}, {}
        for name, diff in difference.items():
            norm = float(np.linalg.norm(diff))
            if norm == 0:
                continue  # the part does not depend on the differing record: nothing to test
            s = float(sigma[name])
            if not (math.isfinite(s) and s > 0):
                raise ValueError(f"part {name!r} differs between the datasets but its claimed sigma is {s}")
            self._unit[name] = np.asarray(diff, dtype=np.float64) / (norm * s)
            self.shifts[name] = norm / s
        if not self.shifts:
            raise ValueError("the two datasets give identical sums: there is nothing to audit")
        self.joint_shift = math.sqrt(sum(m * m for m in self.shifts.values()))
        self.shifts["joint"] = self.joint_shift

    @property
    def names(self) -> tuple[str, ...]:
        """The tests, in order: one per differing part, then "joint"."""
        return tuple(self.shifts)

    def scores(self, release: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Centred scores of one release for every test (the parts', then the joint one)."""
        # elementwise product and sum, not np.vdot: a BLAS dot here ran 1000x slower on busy cores
        raw = {name: float(((release[name] - self._centre[name]) * u).sum()) for name, u in self._unit.items()}
        joint = sum(self.shifts[name] * u for name, u in raw.items()) / self.joint_shift
        out = {name: u - self.shifts[name] / 2 for name, u in raw.items()}
        out["joint"] = joint - self.joint_shift / 2
        return out


@dataclass(frozen=True)
class EpsilonBound:
    """The best (test, threshold) pair of an audit and what it certifies about epsilon."""

    test: str
    threshold: float  # reject "D" when the centred score exceeds this
    false_positives: int  # draws from D that the test called D'
    false_negatives: int  # draws from D' that the test called D
    null_draws: int
    alternative_draws: int
    epsilon: float | None  # what this pair certifies, from the raw rates (None: unbounded)
    lower: float  # lower confidence bound of that (simultaneous over all pairs): the mechanism's epsilon is >= it
    upper: float | None  # upper end of the interval for what this pair certifies (None: unbounded)
    confidence: float
    hypotheses: int  # (test, threshold) pairs tried

    def as_dict(self) -> dict:
        """JSON-ready dict of every field."""
        return dict(self.__dict__)


def audit_epsilon(null: Mapping[str, np.ndarray], alternative: Mapping[str, np.ndarray], *, delta: float,
                  confidence: float = 0.95, offsets: tuple[float, ...] = THRESHOLD_OFFSETS) -> EpsilonBound:
    """Epsilon lower bound from centred scores of releases of D (`null`) and of D' (`alternative`).

    Each dict maps test name -> 1-d array of scores, one per independent release.
    """
    _check_confidence(confidence)
    if set(null) != set(alternative) or not null:
        raise ValueError(f"null tests {sorted(null)} and alternative tests {sorted(alternative)} must match")
    if not offsets:
        raise ValueError("offsets must hold at least one threshold")
    n0, n1 = {len(v) for v in null.values()}, {len(v) for v in alternative.values()}
    if len(n0) != 1 or len(n1) != 1 or min(n0 | n1) < 1:
        raise ValueError("every test needs the same number (>= 1) of draws per hypothesis")
    n0, n1 = n0.pop(), n1.pop()
    grid = np.asarray(offsets, dtype=np.float64)
    pairs = len(null) * len(grid)
    level = 1.0 - (1.0 - confidence) / (2 * pairs)  # 2 rates per pair, each two-sided at this level
    best = None
    for name in sorted(null):
        s0, s1 = np.sort(np.asarray(null[name])), np.sort(np.asarray(alternative[name]))
        fp = n0 - np.searchsorted(s0, grid, side="right")  # D draws above the threshold
        fn = np.searchsorted(s1, grid, side="right")  # D' draws at or below it
        fpr_lo, fpr_hi = clopper_pearson(fp, n0, confidence=level)
        fnr_lo, fnr_hi = clopper_pearson(fn, n1, confidence=level)
        lower = epsilon_from_rates(fpr_hi, fnr_hi, delta=delta)
        i = int(np.argmax(lower))
        if best is None or lower[i] > best[0]:
            point = float(epsilon_from_rates(fp[i] / n0, fn[i] / n1, delta=delta))
            upper = float(epsilon_from_rates(fpr_lo[i], fnr_lo[i], delta=delta))
            best = (float(lower[i]), name, float(grid[i]), int(fp[i]), int(fn[i]), point, upper)
    lower, name, threshold, fp, fn, point, upper = best
    return EpsilonBound(name, threshold, fp, fn, n0, n1, point if math.isfinite(point) else None, lower,
                        upper if math.isfinite(upper) else None, confidence, pairs)


# --- white-box check: the Gaussian shift of the scores ------------------------------------------

@functools.lru_cache(maxsize=64)  # a bisection of autodp calls: about a second each time
def allowed_shift(epsilon: float, delta: float) -> float:
    """Largest shift mu = Delta / sigma that the release calibration allows at (epsilon, delta).

    `effective_noise_multiplier` finds the smallest z = 1 / mu whose zCDP guarantee (rho = mu^2 / 2) gives
    (epsilon, delta) (autodp, to 1e-10, on the safe side), so this is mu* to 1e-10 relative, never above it.
    """
    return 1.0 / effective_noise_multiplier(target_epsilon=epsilon, target_delta=delta)


def implied_epsilon(shift: float, *, delta: float) -> float | None:
    """Epsilon at `delta` the calibration gives a mechanism of this shift (zCDP, rho = shift^2 / 2; 0 for
    shift 0, None when unbounded)."""
    mu = abs(float(shift))
    if math.isnan(mu):
        raise ValueError(f"shift must be a number, got {shift}")
    if mu == 0:
        return 0.0
    if not math.isfinite(mu) or mu > 1e3:  # noise 1e-3 of the sensitivity or less: autodp gives up
        return None
    return epsilon_spent([1.0 / mu], delta=delta)


@dataclass(frozen=True)
class GaussianShift:
    """Shift of one test's scores between D and D', in units of their own standard deviation."""

    test: str
    shift: float  # (mean under D' - mean under D) / pooled standard deviation; +-inf when the scores do not vary
    lower: float  # confidence interval of the shift (simultaneous over every test of the check)
    upper: float
    noise_std: float  # pooled standard deviation of the scores; 1 when the noise is what the test assumed
    mean_difference: float


def _gaussian_shift(test: str, s0: np.ndarray, s1: np.ndarray, level: float) -> GaussianShift:
    """Point estimate and interval of (b - a) / s from N(a, s^2) and N(b, s^2) samples.

    With n0 + n1 - 2 = f degrees of freedom and pooled variance S^2: f S^2 / s^2 ~ chi2(f) and
    (Dbar - (b - a)) / (S sqrt(1/n0 + 1/n1)) ~ t(f), Dbar the difference of the means. Each gets a
    two-sided interval at 1 - (1 - level) / 2; by Bonferroni both hold at `level`, and then
    (b - a) / s lies between the extreme ratios of the two intervals' ends.
    """
    n0, n1 = len(s0), len(s1)
    dof = n0 + n1 - 2
    diff = float(s1.mean() - s0.mean())
    std = math.sqrt((float(((s0 - s0.mean()) ** 2).sum()) + float(((s1 - s1.mean()) ** 2).sum())) / dof)
    if std == 0:  # the scores do not vary: the part was released without noise
        shift = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return GaussianShift(test, shift, shift, shift, 0.0, diff)
    tail = (1.0 - level) / 4.0  # each of the two intervals is two-sided at 1 - (1 - level) / 2
    half = float(student_t.ppf(1.0 - tail, dof)) * std * math.sqrt(1.0 / n0 + 1.0 / n1)
    d_lo, d_hi = diff - half, diff + half
    s_lo = std * math.sqrt(dof / float(chi2.ppf(1.0 - tail, dof)))
    s_hi = std * math.sqrt(dof / float(chi2.ppf(tail, dof)))
    lower = d_lo / s_hi if d_lo >= 0 else d_lo / s_lo
    upper = d_hi / s_lo if d_hi >= 0 else d_hi / s_hi
    return GaussianShift(test, diff / std, lower, upper, std, diff)


@dataclass(frozen=True)
class ShiftCheck:
    """The white-box check: the measured shift of the most telling test against what the claim allows."""

    estimate: GaussianShift
    allowed_shift: float  # mu* of the claimed (epsilon, delta)
    epsilon: float  # the claim
    delta: float
    confidence: float
    tests: int  # tests measured (the Bonferroni split)

    @property
    def passed(self) -> bool:
        """False when the whole interval lies beyond +-mu*: the shift is larger than the claim allows."""
        return not (self.estimate.lower > self.allowed_shift or self.estimate.upper < -self.allowed_shift)

    def as_dict(self) -> dict:
        """JSON-ready: infinite shifts (a part without noise) are reported as None, "unbounded"."""
        e = self.estimate

        def num(x: float) -> float | None:
            return x if math.isfinite(x) else None

        low_mag = max(e.lower, -e.upper, 0.0)  # the interval of |mu|
        high_mag = max(abs(e.lower), abs(e.upper))
        return {
            "test": e.test,
            "shift": num(e.shift),
            "ci": [num(e.lower), num(e.upper)],
            "noise_std": e.noise_std,
            "allowed_shift": self.allowed_shift,
            "implied_epsilon": implied_epsilon(e.shift, delta=self.delta),
            "implied_epsilon_ci": [implied_epsilon(low_mag, delta=self.delta),
                                   implied_epsilon(high_mag, delta=self.delta)],
            "confidence": self.confidence,
            "tests": self.tests,
            "pass": self.passed,
        }


def gaussian_shift_check(null: Mapping[str, np.ndarray], alternative: Mapping[str, np.ndarray], *, epsilon: float,
                         delta: float, confidence: float = 0.999) -> ShiftCheck:
    """White-box check of a claimed (epsilon, delta) from the same scores `audit_epsilon` takes.

    Every test's shift is measured with an interval; the intervals hold simultaneously at
    `confidence` (Bonferroni over the tests), and the test reported is the one whose interval lies
    furthest beyond zero. For a mechanism that keeps its claim (|true shift| <= mu*) the check fails
    only when an interval misses its true shift on the side away from zero, so with probability at
    most 1 - confidence (less in practice: at 90%, 1.45% of 2,000 simulated releases exactly at the
    boundary failed, tests/test_audit_white_box.py). The default 0.999 makes a false alarm a
    1-in-1,000 event at most, while 5,000 draws still measure mu to about 5% at that level.
    """
    _check_confidence(confidence)
    if set(null) != set(alternative) or not null:
        raise ValueError(f"null tests {sorted(null)} and alternative tests {sorted(alternative)} must match")
    for name in null:
        if min(len(null[name]), len(alternative[name])) < 2:
            raise ValueError(f"test {name!r} needs >= 2 draws per hypothesis to measure a variance, got "
                             f"{len(null[name])} and {len(alternative[name])}")
        if not (np.all(np.isfinite(null[name])) and np.all(np.isfinite(alternative[name]))):
            raise ValueError(f"test {name!r} has scores that are not finite numbers")
    allowed = allowed_shift(epsilon, delta)
    level = 1.0 - (1.0 - confidence) / len(null)
    shifts = [_gaussian_shift(name, np.asarray(null[name], dtype=np.float64),
                              np.asarray(alternative[name], dtype=np.float64), level) for name in sorted(null)]
    best = max(shifts, key=lambda e: max(e.lower, -e.upper))
    return ShiftCheck(best, allowed, float(epsilon), float(delta), confidence, len(shifts))


# --- membership inference ------------------------------------------------------------------------

def roc_auc(member_scores, nonmember_scores) -> float:
    """P(member score > non-member score) + half the ties (Mann-Whitney), higher = more member-like."""
    a, b = np.ravel(member_scores).astype(np.float64), np.ravel(nonmember_scores).astype(np.float64)
    if not (a.size and b.size):
        raise ValueError(f"need scores of both groups, got {a.size} members and {b.size} non-members")
    both = np.concatenate([a, b])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(both.size)
    sorted_vals = both[order]
    # average ranks over ties
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], both.size]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[: a.size].sum() - a.size * (a.size + 1) / 2.0
    return float(u / (a.size * b.size))


def tpr_at_fpr(member_scores, nonmember_scores, *, fpr: float) -> tuple[int, int, int, int]:
    """(true positives, members, false positives, non-members) at the lowest threshold whose
    empirical false-positive rate is at most `fpr` (members are called when score > threshold)."""
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    a, b = np.ravel(member_scores), np.sort(np.ravel(nonmember_scores))
    allowed = int(math.floor(fpr * b.size))  # false positives we may make
    threshold = b[b.size - 1 - allowed]  # scores strictly above it: at most `allowed` non-members
    return int(np.sum(a > threshold)), int(a.size), int(np.sum(b > threshold)), int(b.size)


def max_auc(epsilon: float, delta: float) -> float:
    """Largest AUC of any membership test against an (epsilon, delta)-DP release.

    The best trade-off is TPR(a) = min(e^eps a + delta, 1 - e^-eps (1 - delta - a), 1): piecewise
    linear with corners at a* = (1 - delta) / (1 + e^eps) and 1 - delta, so the trapezoid rule on
    those corners is exact.
    """
    if not (math.isfinite(epsilon) and epsilon >= 0) or not 0 <= delta < 1:
        raise ValueError(f"need a finite epsilon >= 0 and delta in [0, 1), got {epsilon}, {delta}")
    corners = np.array([0.0, (1 - delta) / (1 + math.exp(epsilon)), 1 - delta, 1.0])
    tpr = np.minimum.reduce([math.exp(epsilon) * corners + delta,
                             1 - math.exp(-epsilon) * (1 - delta - corners), np.ones(4)])
    return float(np.sum((corners[1:] - corners[:-1]) * (tpr[1:] + tpr[:-1]) / 2))


def gaussian_auc(shift: float) -> float:
    """AUC of the optimal test between N(0, 1) and N(shift, 1): Phi(shift / sqrt 2)."""
    return float(ndtr(shift / math.sqrt(2.0)))


def clustered_bootstrap_auc(positive_scores: np.ndarray, negative_scores: np.ndarray, *, rng: np.random.Generator,
                            resamples: int = 1000, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the AUC of two score tables that share their rows.

    Rows are what both tables share (the releases candidates were scored against, or the
    candidates themselves), columns the scores within a row. Scores in one row are dependent, so
    the resampling draws rows for both tables together and columns of each with replacement: an
    interval that treated every score as independent would be too narrow.
    """
    _check_confidence(confidence)
    a, b = np.atleast_2d(positive_scores), np.atleast_2d(negative_scores)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"the two tables need the same rows, got shapes {a.shape} and {b.shape}")
    if resamples < 10:
        raise ValueError(f"resamples must be >= 10, got {resamples}")
    r, m, k = a.shape[0], a.shape[1], b.shape[1]
    stats = np.empty(resamples)
    for i in range(resamples):
        rows = rng.integers(0, r, r)
        stats[i] = roc_auc(a[np.ix_(rows, rng.integers(0, m, m))], b[np.ix_(rows, rng.integers(0, k, k))])
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [tail, 1 - tail])
    return float(lo), float(hi)
