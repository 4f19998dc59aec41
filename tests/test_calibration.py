"""Calibration with autodp: pinned values and a property test that the target is never exceeded."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mepf_core.privacy.calibration import calibrate_parts, effective_noise_multiplier, epsilon_spent
from mepf_core.privacy.mechanism import design_mechanism
from mepf_core.privacy.sensitivity import Neighbouring
from tests.helpers import zcdp_epsilon


def test_pinned_discrete_gaussian_sigma():
    # sensitivity 1, delta 1e-5, epsilon 1: the discrete Gaussian (zCDP, rho = 1 / (2 z^2)) needs z = 4.0451,
    # 8 % above the continuous analytic Gaussian's 3.7306, which a computer cannot draw (mepf_core.privacy.lattice)
    z = effective_noise_multiplier(target_epsilon=1.0, target_delta=1e-5)
    assert z == pytest.approx(4.0451, abs=1e-4)
    for epsilon, delta in ((1.0, 1e-5), (10.0, 1e-5), (0.2, 1e-5), (1.0, 1e-9)):
        z = effective_noise_multiplier(target_epsilon=epsilon, target_delta=delta)
        assert zcdp_epsilon(z, delta) == pytest.approx(epsilon, rel=1e-6)


def test_composition_of_gaussians_is_one_gaussian():
    # two parts with z = 5 each compose to a single Gaussian with z = 5 / sqrt(2)
    assert epsilon_spent([5.0, 5.0], delta=1e-5) == pytest.approx(epsilon_spent([5 / math.sqrt(2)], delta=1e-5), rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    eps=st.floats(0.1, 10.0),
    delta=st.sampled_from([1e-5, 1e-6]),
    weights=st.lists(st.floats(0.05, 1.0), min_size=1, max_size=3),
)
def test_spent_epsilon_never_exceeds_target(eps, delta, weights):
    shares = {f"part{i}": w / sum(weights) for i, w in enumerate(weights)}
    shares[f"part{len(weights) - 1}"] += 1.0 - sum(shares.values())  # exact sum 1 after rounding
    z = calibrate_parts(shares, target_epsilon=eps, target_delta=delta)
    spent = epsilon_spent(list(z.values()), delta=delta)
    assert spent <= eps
    assert spent >= eps * (1 - 1e-6)  # and it is tight: no budget wasted


def test_mechanism_parts_and_sigmas():
    m = design_mechanism(target_epsilon=1.0, target_delta=1e-5, relation=Neighbouring.ADD_REMOVE, labelled=True,
                         moments=2, norm_bound=2.0, second_moment_bound=1.0)
    assert [p.name for p in m.parts] == ["moment1", "moment2", "counts"]
    assert m.part("moment1").sensitivity == 2.0 and m.part("counts").sensitivity == 1.0
    assert m.part("moment1").sigma == pytest.approx(2.0 * m.part("moment1").noise_multiplier)
    assert m.epsilon <= 1.0
    assert m.effective_noise_multiplier == pytest.approx(4.0451, abs=1e-4)
    r = design_mechanism(target_epsilon=1.0, target_delta=1e-5, relation=Neighbouring.REPLACE_ONE, labelled=False,
                         moments=1, norm_bound=1.0, second_moment_bound=1.0)
    assert not r.part("counts").noised and r.part("moment1").sensitivity == 2.0
    assert r.part("moment1").noise_multiplier == pytest.approx(4.0451, abs=1e-4)


@pytest.mark.parametrize("eps,delta,msg", [
    (0.0, 1e-5, "epsilon must be a finite number > 0, got 0.0"),
    (-1.0, 1e-5, "epsilon must be a finite number > 0, got -1.0"),
    (1.0, 1.5, r"delta must be in \(0, 1\), got 1.5"),
    (1.0, 0.0, r"delta must be in \(0, 1\), got 0.0"),
    (float("inf"), 1e-5, "epsilon must be a finite number > 0, got inf"),
])
def test_bad_privacy_parameters(eps, delta, msg):
    with pytest.raises(ValueError, match=msg):
        effective_noise_multiplier(target_epsilon=eps, target_delta=delta)


def test_delta_floor_is_the_smallest_normal_double():
    """Deltas are refused below 2.2250738585072014e-308 (autodp fails on subnormal deltas)."""
    from mepf_core.privacy.calibration import MIN_DELTA

    assert MIN_DELTA == 2.2250738585072014e-308
    z = effective_noise_multiplier(target_epsilon=1.0, target_delta=MIN_DELTA)
    assert z == pytest.approx(37.4340, abs=1e-4)
    assert epsilon_spent([z], delta=MIN_DELTA) == pytest.approx(1.0, rel=1e-6)
    for subnormal in (5e-324, 1e-320, 1e-309):
        with pytest.raises(ValueError, match=r"target_delta must be >= 2.22507e-308 \(the smallest normal double"):
            effective_noise_multiplier(target_epsilon=1.0, target_delta=subnormal)


def test_autodp_failure_becomes_a_value_error_naming_target_delta(monkeypatch):
    from autodp.mechanism_zoo import DiscreteGaussianMechanism

    def fail(self, delta):
        raise RuntimeError("Failed to find epsilon: convergence error")

    monkeypatch.setattr(DiscreteGaussianMechanism, "get_approxDP", fail)
    with pytest.raises(ValueError, match="autodp could not compute epsilon at target_delta 1e-05: Failed to find"):
        effective_noise_multiplier(target_epsilon=1.0, target_delta=1e-5)
