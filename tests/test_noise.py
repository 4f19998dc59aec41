"""Noise: exact discrete Gaussian on the integer lattice (OpenDP), calibrated, secure and never repeated."""

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from mepf_core.embedding import sums_to_noisy_parts
from mepf_core.errors import InvalidArgumentError
from mepf_core.privacy.mechanism import design_mechanism
from mepf_core.privacy.noise import discrete_gaussian_noise
from mepf_core.privacy.sensitivity import Neighbouring
from storage.release import on_lattice
from tests.helpers import lattice_sums


def test_discrete_gaussian_has_the_scale_it_is_asked_for():
    scale = 3.7
    x = discrete_gaussian_noise(200_000, scale=scale)
    assert x.dtype == np.int64
    # N_Z(0, s^2) at s = 3.7: mean 0, variance s^2 to within 1e-13 (Poisson summation), so the sample
    # moments are within a few standard errors of them
    assert abs(x.mean()) < 5 * scale / math.sqrt(len(x))
    assert abs(x.var() / scale**2 - 1) < 5 * math.sqrt(2 / len(x))
    # the probabilities of the central integers are the discrete Gaussian's (chi-square on -8..8)
    support = np.arange(-8, 9)
    weights = np.exp(-np.arange(-60, 61) ** 2 / (2 * scale**2))
    probs = np.exp(-support**2 / (2 * scale**2)) / weights.sum()
    observed = np.array([(x == k).sum() for k in support])
    expected = probs * len(x)
    rest = len(x) - observed.sum(), len(x) - expected.sum()
    assert stats.chisquare([*observed, rest[0]], [*expected, rest[1]]).pvalue > 1e-4


def _mechanism():
    return design_mechanism(target_epsilon=1.0, target_delta=1e-5, relation=Neighbouring.ADD_REMOVE, labelled=True,
                            moments=2, norm_bound=1.0, second_moment_bound=1.0)


def test_release_noise_is_calibrated_and_on_the_lattice():
    mech = _mechanism()
    rng = np.random.default_rng(0)
    sums = lattice_sums(rng.normal(size=(3, 5000)), rng.random(size=(3, 5000)), np.array([10.0, 20.0, 30.0]))
    noisy = sums_to_noisy_parts(sums, mech)
    for part in mech.parts:
        assert on_lattice(noisy[part.name], part.lattice_unit), part.name
        steps = np.round(noisy[part.name] / part.lattice_unit).astype(np.int64) - sums.parts()[part.name]
        if part.name == "counts":
            continue
        assert part.integer_scale * part.lattice_unit == pytest.approx(part.sigma, rel=1e-12)
        standardised = (steps / part.integer_scale).ravel()
        assert stats.kstest(standardised, "norm").pvalue > 1e-3, part.name


def test_two_releases_of_the_same_data_differ():
    mech = _mechanism()
    sums = lattice_sums(np.zeros((2, 100)), np.zeros((2, 100)), np.zeros(2))
    a, b = sums_to_noisy_parts(sums, mech), sums_to_noisy_parts(sums, mech)
    for name in a:
        assert not np.array_equal(a[name], b[name])


def test_float_noise_is_off_the_lattice():
    """What the reader's lattice check refuses: sums with float Gaussian noise (the old mechanism)."""
    unit = 2.0**-20
    values = np.round(np.random.default_rng(1).normal(size=1000) / unit) * unit
    assert on_lattice(values, unit)
    assert not on_lattice(values + np.random.default_rng(2).normal(scale=0.5, size=1000), unit)


@pytest.mark.parametrize("scale", [0, -1, math.inf, math.nan])
def test_scale_validation(scale):
    with pytest.raises(InvalidArgumentError, match="scale must be a finite number > 0"):
        discrete_gaussian_noise(3, scale=scale)


def test_opendp_charges_what_our_derivation_says():
    """OpenDP's own privacy map for its discrete Gaussian (rho of zCDP at an integer L2 distance) equals
    Delta^2 / (2 s^2), the bound derived in mepf_core.privacy.lattice, at the scales a release uses."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    space = dp.vector_domain(dp.atom_domain(T="i64")), dp.l2_distance(T="i64")
    for part in _mechanism().parts:
        delta_units = part.sensitivity / part.lattice_unit
        if delta_units != int(delta_units):
            continue  # OpenDP takes integer distances; counts here have sensitivity 1
        rho = dp.m.make_gaussian(*space, scale=part.integer_scale).map(int(delta_units))
        ours = Fraction(int(delta_units)) ** 2 / (2 * Fraction(part.integer_scale) ** 2)
        assert ours <= Fraction(1) / (2 * Fraction(part.noise_multiplier) ** 2)
        assert rho == pytest.approx(float(ours), rel=1e-12) and rho >= float(ours) * (1 - 1e-15)
