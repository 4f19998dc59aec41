"""Noise: standard normal (KS test), float64, secure and never repeated."""

import numpy as np
import pytest
from scipy import stats

from mepf_core.embedding import FeatureSums, sums_to_noisy_parts
from mepf_core.privacy.mechanism import design_mechanism
from mepf_core.privacy.noise import gaussian_noise, secure_standard_normal
from mepf_core.privacy.sensitivity import Neighbouring


def test_secure_normal_passes_ks():
    z = secure_standard_normal(200_000)
    assert z.dtype == np.float64
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01


def _mechanism():
    return design_mechanism(target_epsilon=1.0, target_delta=1e-5, relation=Neighbouring.ADD_REMOVE, labelled=True,
                            moments=2, norm_bound=1.0, second_moment_bound=1.0)


def test_release_noise_is_calibrated_and_standardises_to_normal():
    mech = _mechanism()
    rng = np.random.default_rng(0)
    sums = FeatureSums(rng.normal(size=(3, 5000)), rng.normal(size=(3, 5000)), np.array([10.0, 20.0, 30.0]))
    noisy = sums_to_noisy_parts(sums, mech)
    for part in mech.parts:
        if part.name == "counts":
            continue
        standardised = ((noisy[part.name] - sums.parts()[part.name]) / part.sigma).ravel()
        assert stats.kstest(standardised, "norm").pvalue > 1e-3, part.name


def test_two_releases_of_the_same_data_differ():
    mech = _mechanism()
    sums = FeatureSums(np.zeros((2, 100)), np.zeros((2, 100)), np.zeros(2))
    a, b = sums_to_noisy_parts(sums, mech), sums_to_noisy_parts(sums, mech)
    for name in a:
        assert not np.array_equal(a[name], b[name])


def test_sigma_validation():
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0, got -1"):
        gaussian_noise(3, sigma=-1)
