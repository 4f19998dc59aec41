"""The accountant (mepf_core.privacy.accountant): pinned epsilons and the relation rule."""

from __future__ import annotations

import math

import pytest

from mepf_core.privacy.accountant import (MIXED, UNKNOWN, GaussianAccountant, GaussianRelease,
                                          RelationMixingError, composed_epsilon)
from mepf_core.privacy.calibration import effective_noise_multiplier

Z1 = effective_noise_multiplier(target_epsilon=1.0, target_delta=1e-5)  # 4.0451: one epsilon-1 release


def test_pinned_values():
    # zCDP of the discrete Gaussian (mepf_core.privacy.calibration); the composed values were also checked
    # against an independent evaluation of the rho -> (epsilon, delta) conversion (tests/test_calibration.py)
    assert Z1 == pytest.approx(4.0451, abs=1e-4)
    one = GaussianAccountant([GaussianRelease(Z1, "add-remove")])
    assert one.get_epsilon(1e-5) == pytest.approx(1.0, abs=1e-6)
    two = one.compose(GaussianRelease(Z1, "add-remove"))
    assert two.get_epsilon(1e-5) == pytest.approx(1.4600, abs=1e-4)
    assert two.get_epsilon(2e-5) == pytest.approx(1.4016, abs=1e-4)
    assert composed_epsilon([Z1, Z1], delta=1e-5) == two.get_epsilon(1e-5)
    assert GaussianAccountant().get_epsilon(1e-5) == 0.0 and GaussianAccountant().relation is None


def test_composition_is_one_gaussian_and_never_decreases():
    # 1/z^2 adds up: five releases at z equal one at z / sqrt 5
    five = GaussianAccountant([GaussianRelease(Z1, "replace-one")] * 5)
    assert five.get_epsilon(1e-5) == pytest.approx(GaussianAccountant([GaussianRelease(Z1 / 5 ** 0.5, "replace-one")])
                                                   .get_epsilon(1e-5), rel=1e-9)
    account, spent = GaussianAccountant(), 0.0
    for z in (10.0, 3.0, 50.0, 1.0):
        account = account.compose(GaussianRelease(z, "add-remove"))
        assert account.get_epsilon(1e-5) > spent
        spent = account.get_epsilon(1e-5)


def test_relation_mixing_is_refused():
    add = GaussianAccountant([GaussianRelease(Z1, "add-remove")])
    with pytest.raises(RelationMixingError, match="add-remove and the event is replace-one"):
        add.compose(GaussianRelease(Z1, "replace-one"))
    with pytest.raises(RelationMixingError, match="unknown relation cannot be bounded under add-remove"):
        add.compose(GaussianRelease(Z1, None))
    with pytest.raises(RelationMixingError):
        GaussianAccountant([GaussianRelease(Z1, "replace-one"), GaussianRelease(Z1, "add-remove")])
    mixed = GaussianAccountant.from_history([GaussianRelease(Z1, "replace-one"), GaussianRelease(Z1, "add-remove")])
    assert mixed.relation == MIXED and mixed.get_epsilon(1e-5) == math.inf


def test_unknown_relation_counts_at_half_z_and_refuses_add_remove():
    legacy = GaussianAccountant([GaussianRelease(Z1, None)])
    assert legacy.relation == UNKNOWN and legacy.legacy_events == 1
    assert legacy.get_epsilon(1e-5) == pytest.approx(composed_epsilon([Z1 / 2], delta=1e-5), rel=1e-12)
    with pytest.raises(RelationMixingError, match="cannot be bounded under add-remove"):
        legacy.compose(GaussianRelease(Z1, "add-remove"))
    both = legacy.compose(GaussianRelease(Z1, "replace-one"))
    assert both.relation == "replace-one"
    assert both.get_epsilon(1e-5) == pytest.approx(composed_epsilon([Z1 / 2, Z1], delta=1e-5), rel=1e-12)
    recorded = GaussianAccountant.from_history([GaussianRelease(Z1, None), GaussianRelease(Z1, "add-remove")])
    assert recorded.get_epsilon(1e-5) == math.inf


@pytest.mark.parametrize(("z", "relation", "message"), [
    (0.0, "add-remove", "finite number > 0, got 0.0"), (math.inf, "add-remove", "finite number > 0"),
    (True, "add-remove", "finite number > 0"), (1.0, "swap", "swap"),
])
def test_bad_events_are_refused(z, relation, message):
    with pytest.raises(ValueError, match=message):
        GaussianRelease(z, relation)


def test_events_are_frozen():
    event = GaussianRelease(Z1, "add-remove")
    with pytest.raises(AttributeError):
        event.noise_multiplier = 1.0
