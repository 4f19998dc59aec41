"""The integer lattice: every record's point has integer L2 norm <= B, whatever its floats; worst-case
neighbours move the integer sums by at most the sensitivity in lattice steps; the noise scale's exact bound."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from mepf_core.embedding import FeatureSums
from mepf_core.errors import InvalidArgumentError
from mepf_core.privacy.lattice import LATTICE_NORM, integer_scale, lattice_unit, to_lattice
from mepf_core.privacy.mechanism import design_mechanism
from mepf_core.privacy.sensitivity import Neighbouring, sum_sensitivity

B = LATTICE_NORM
D = 16_960  # the Fashion-MNIST encoder's feature dimension


def _exact_sq_norms(k: torch.Tensor) -> list[int]:
    return [sum(int(v) ** 2 for v in row) for row in k.tolist()]  # Python integers: no overflow, no rounding


def _adversarial_rows(c: float, d: int) -> torch.Tensor:
    """Float rows at or just over the norm bound, built so that rounding each coordinate goes up."""
    rng = np.random.default_rng(0)
    even = np.full(d, c / math.sqrt(d))  # every coordinate rounds up by up to half a step
    half_up = np.full(d, (math.floor(c / math.sqrt(d) / lattice_unit(c)) + 0.5) * lattice_unit(c))  # exact .5 ties
    direction = rng.normal(size=d)
    rows = [
        even, -even, even * (1 + 1e-12), half_up, half_up * -1,
        direction / np.linalg.norm(direction) * c,
        np.eye(1, d, 0)[0] * c, np.eye(1, d, 0)[0] * c * 1.5,  # all in one coordinate, then over the bound
        np.full(d, 1e300), np.full(d, -1e300),  # absurd values clamp, then shrink
        np.where(np.arange(d) % 2 == 0, np.nan, c / math.sqrt(d / 2)),  # non-finite entries count as 0
        np.where(np.arange(d) % 3 == 0, np.inf, -c / math.sqrt(d)),
        np.zeros(d),
    ]
    return torch.tensor(np.stack(rows), dtype=torch.float64)


@pytest.mark.parametrize("c", [1.0, 0.3, 7.5, 1e-3])
def test_every_lattice_point_is_within_the_integer_bound(c):
    rows = _adversarial_rows(c, D)
    k = to_lattice(rows, c)
    assert k.dtype == torch.int64
    assert all(sq <= B * B for sq in _exact_sq_norms(k))
    assert _exact_sq_norms(k)[0] > (B - D) ** 2  # a row of norm C keeps (nearly) its norm: not zeroed
    # a function of each row alone: the batch's rows equal the rows mapped one at a time
    for i in range(len(rows)):
        assert torch.equal(to_lattice(rows[i:i + 1], c)[0], k[i])


def test_the_lattice_unit_is_exact():
    for c in (1.0, 0.3, 7.5, 1e-3, 123.456):
        unit = lattice_unit(c)
        assert unit * B == c
        assert sum_sensitivity(Neighbouring.ADD_REMOVE, c) / unit == B
        assert sum_sensitivity(Neighbouring.REPLACE_ONE, c) / unit == 2 * B
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(InvalidArgumentError, match="norm_bound must be a finite number > 0"):
            lattice_unit(bad)


def test_oversized_dimension_is_refused():
    with pytest.raises(InvalidArgumentError, match="above 4194304"):
        to_lattice(torch.zeros(1, 2**22 + 1), 1.0)


@pytest.mark.parametrize("relation", list(Neighbouring))
def test_worst_case_neighbours_move_the_integer_sums_by_at_most_the_sensitivity(relation):
    """Replays the worst cases on the integer sums: add-remove adds one adversarial record; replace-one
    replaces it by its antipode (same row) or moves it to another row. Exact integer norms."""
    c = 1.0
    rows = _adversarial_rows(c, 64)
    bound_sq = (sum_sensitivity(relation, c) / lattice_unit(c)) ** 2
    base = torch.tensor(np.random.default_rng(3).normal(size=(20, 64)), dtype=torch.float64)
    base = base / base.norm(dim=1, keepdim=True) * c
    labels = torch.arange(20) % 2

    def sums(extra: torch.Tensor | None, row: int) -> np.ndarray:
        s = FeatureSums.zeros(2, 64, 1, norm_bound=c)
        s.add(base, None, labels)
        if extra is not None:
            s.add(extra[None], None, torch.tensor([row]))
        return s.moment1

    worst = 0
    for x in rows:
        if relation is Neighbouring.ADD_REMOVE:
            pairs = [(sums(x, 0), sums(None, 0))]
        else:
            pairs = [(sums(x, 0), sums(-x, 0)), (sums(x, 0), sums(x, 1)), (sums(x, 0), sums(-x, 1))]
        for a, b in pairs:
            moved = sum(int(v) ** 2 for v in (a - b).ravel())
            assert moved <= bound_sq
            worst = max(worst, moved)
    assert worst > 0.99 * bound_sq  # the bound is attained, up to the rounding of one record


@pytest.mark.parametrize("z,delta_units", [(0.5296, B), (4.0451, 2 * B), (17.9, 1.0), (0.07, math.sqrt(2)),
                                           (1 / 3, B), (123.456789, 2 * B)])
def test_integer_scale_is_the_smallest_float_meeting_the_exact_bound(z, delta_units):
    s = integer_scale(z, delta_units)
    need = Fraction(z) ** 2 * Fraction(delta_units) ** 2
    assert Fraction(s) ** 2 >= need
    assert Fraction(math.nextafter(s, 0)) ** 2 < need
    rho = Fraction(delta_units) ** 2 / (2 * Fraction(s) ** 2)
    assert rho <= 1 / (2 * Fraction(z) ** 2)


def test_float_sqrt2_is_above_sqrt2():
    """The replace-one labelled counts' sensitivity is sqrt 2; the float used is at or above it, so
    the scale computed from it is never too small."""
    assert Fraction(math.sqrt(2)) ** 2 >= 2


def test_every_noised_part_has_an_exact_scale():
    for relation in Neighbouring:
        mech = design_mechanism(target_epsilon=1.0, target_delta=1e-5, relation=relation, labelled=True, moments=2,
                                norm_bound=0.7, second_moment_bound=2.5, cells_per_class=8)
        rho = 0
        for p in mech.parts:
            if not p.noised:
                continue
            units = Fraction(p.sensitivity / p.lattice_unit)
            rho += units**2 / (2 * Fraction(p.integer_scale) ** 2)
        assert rho <= 1 / (2 * Fraction(mech.effective_noise_multiplier) ** 2) * (1 + Fraction(1, 10**12))
        assert mech.epsilon <= 1.0


def test_settings_whose_noise_would_overflow_int64_are_refused_before_any_data():
    """DP review: count_share 1e-40 gave the counts a scale of 4e20 steps; OpenDP saturated at the int64
    range and numpy wrapped the sum, so the "noisy" counts revealed n to within about 1,024."""
    with pytest.raises(InvalidArgumentError, match="above 2\\^46"):
        design_mechanism(target_epsilon=1.0, target_delta=1e-5, relation=Neighbouring.ADD_REMOVE, labelled=True,
                         moments=1, norm_bound=1.0, second_moment_bound=1.0, count_share=1e-40)
    with pytest.raises(InvalidArgumentError, match="above 2\\^46"):
        integer_scale(2.0**27, B)
    assert integer_scale(2.0**26, B) == 2.0**46  # the largest scale accepted


def test_norm_bounds_whose_unit_is_not_a_normal_float_are_refused():
    """DP review: lattice_unit(1e-320) was 0, phi / 0 was NaN, NaN cast to -2^63, whose square wrapped to 0."""
    for tiny in (1e-320, 2.0**-1003):
        with pytest.raises(InvalidArgumentError, match="2\\^-1002"):
            lattice_unit(tiny)
        with pytest.raises(InvalidArgumentError, match="2\\^-1002"):
            to_lattice(torch.zeros(1, 4), tiny)
    c = 2.0**-1002 * 1.5  # the smallest accepted range: the unit is exact and the bound still holds
    k = to_lattice(_adversarial_rows(c, 256), c)
    assert all(sq <= B * B for sq in _exact_sq_norms(k))
    assert sum_sensitivity(Neighbouring.ADD_REMOVE, c) / lattice_unit(c) == B


def test_rows_over_the_bound_keep_their_norm_and_huge_bounds_are_refused():
    """Second DP review: a row 0.1% over C ran out of trim passes and was zeroed (out of contract, but a
    record lost for nothing); norm bounds near 1e154 overflowed the reader's norm check after the charge."""
    g = torch.tensor(np.random.default_rng(5).normal(size=(1, D)), dtype=torch.float64)
    g = g / g.norm()
    for over in (1.0, 1.0001, 1.001, 1.02, 1.5, 1e300):
        k = to_lattice(g * over, 1.0)
        norm_sq = _exact_sq_norms(k)[0]
        assert norm_sq <= B * B and norm_sq > (B - 2) ** 2, over
    with pytest.raises(InvalidArgumentError, match="2\\^100"):
        lattice_unit(1e154)
