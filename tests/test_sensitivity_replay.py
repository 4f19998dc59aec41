"""Replay worst-case neighbouring datasets through the production path and check each part's
un-noised change against its stated sensitivity (relative slack 1e-6)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mepf_core.embedding import FeatureSums
from mepf_core.privacy.sensitivity import Neighbouring, count_sensitivity, sum_sensitivity
from tests.helpers import fmnist_subset, frob, sums_of

K = 4  # classes in the toy dataset
N = 12
SLACK = 1 + 1e-6
KINDS = ("zeros", "constant", "saturated", "random", "nan", "inf", "duplicate", "other-label")


def _record(kind: str, base: torch.Tensor, base_labels: torch.Tensor, j: int, g: torch.Generator):
    """(image, label) of the record that makes the neighbour."""
    label = int(torch.randint(0, K, (1,), generator=g))
    if kind == "zeros":
        return torch.zeros(1, 28, 28), label
    if kind == "constant":
        return torch.full((1, 28, 28), float(torch.rand(1, generator=g))), label
    if kind == "saturated":
        return torch.ones(1, 28, 28), label
    if kind == "random":
        return torch.rand((1, 28, 28), generator=g), label
    if kind == "nan":
        x = torch.rand((1, 28, 28), generator=g)
        x[0, :14] = float("nan")
        return x, label
    if kind == "inf":
        x = torch.rand((1, 28, 28), generator=g)
        x[0, ::2] = float("inf")
        x[0, 1::4] = -float("inf")
        return x, label
    if kind == "duplicate":
        return base[j].clone(), int(base_labels[j])
    if kind == "other-label":
        return base[j].clone(), (int(base_labels[j]) + 1 + label % (K - 1)) % K
    raise ValueError(kind)


@pytest.fixture(scope="module")
def base():
    images, labels = fmnist_subset(N)
    return images, labels % K


def _pairs(images, labels, relation: Neighbouring, seed: int):
    """Yield (name, D images, D labels, D' images, D' labels) for every kind at 7 positions."""
    g = torch.Generator().manual_seed(seed)
    for kind, j in itertools.product(KINDS, range(7)):
        x, y = _record(kind, images, labels, j, g)
        if relation is Neighbouring.ADD_REMOVE:  # D' = D plus the record (also covers removal)
            yield kind, images, labels, torch.cat([images, x[None]]), torch.cat([labels, torch.tensor([y])])
        else:  # D' = D with record j replaced
            img2, lab2 = images.clone(), labels.clone()
            img2[j], lab2[j] = x, y
            yield kind, images, labels, img2, lab2


@pytest.mark.parametrize("relation", list(Neighbouring))
@pytest.mark.parametrize("labelled", [True, False])
def test_each_part_moves_at_most_its_sensitivity(base, relation, labelled):
    images, labels = base
    c1, c2 = 1.0, 0.7
    bound = {"moment1": sum_sensitivity(relation, c1), "moment2": sum_sensitivity(relation, c2),
             "counts": count_sensitivity(relation, labelled=labelled)}
    ref = sums_of(images, labels if labelled else None, num_classes=K, norm_bound=c1, second_moment_bound=c2)
    checked = 0
    for kind, _, _, img2, lab2 in _pairs(images, labels, relation, seed=10 * list(Neighbouring).index(relation) + labelled):
        other = sums_of(img2, lab2 if labelled else None, num_classes=K, norm_bound=c1, second_moment_bound=c2)
        for name, value in ref.values().items():
            assert np.all(np.isfinite(other.values()[name])), f"{kind}: {name} not finite"
            change = frob(value, other.values()[name])
            assert change <= bound[name] * SLACK + 1e-12, f"{relation.value} {kind}: {name} moved {change} > {bound[name]}"
        checked += 1
    assert checked == len(KINDS) * 7  # 56 pairs here, 224 over the four parametrisations


def test_sum_bound_is_attained_by_antipodal_features():
    """The 2C bound under replace-one is tight for phi_1 (entries of any sign): not an over-estimate
    hiding a wrong derivation, and the accumulator adds exactly what it is given."""
    c = 1.0
    u = torch.zeros(1, 5, dtype=torch.float64)
    u[0, 0] = c
    a, b = FeatureSums.zeros(1, 5, 1, norm_bound=1.0), FeatureSums.zeros(1, 5, 1, norm_bound=1.0)
    a.add(u, None, None)
    b.add(-u, None, None)
    assert math.isclose(frob(a.values()["moment1"], b.values()["moment1"]), sum_sensitivity(Neighbouring.REPLACE_ONE, c))
    # add-remove: one record of norm C moves the sum by exactly C, and the count by 1
    z = FeatureSums.zeros(1, 5, 1, norm_bound=1.0)
    assert math.isclose(frob(a.values()["moment1"], z.values()["moment1"]), sum_sensitivity(Neighbouring.ADD_REMOVE, c))
    assert math.isclose(frob(a.counts, z.counts), count_sensitivity(Neighbouring.ADD_REMOVE, labelled=False))


def test_label_change_moves_two_counts():
    a, b = FeatureSums.zeros(3, 2, 1, norm_bound=1.0), FeatureSums.zeros(3, 2, 1, norm_bound=1.0)
    phi = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    a.add(phi, None, torch.tensor([0]))
    b.add(phi, None, torch.tensor([2]))
    assert math.isclose(frob(a.counts, b.counts), count_sensitivity(Neighbouring.REPLACE_ONE, labelled=True))
    assert frob(a.values()["moment1"], b.values()["moment1"]) <= sum_sensitivity(Neighbouring.REPLACE_ONE, 1.0)
