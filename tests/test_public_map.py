"""The public map's batched class means equal the reference path (concatenate, bound, average)."""

from __future__ import annotations

import pytest
import torch

from mepf_core.encoders import concat_features
from mepf_core.losses import class_weight_matrix
from mepf_core.public_map import PublicFeatureMap
from tests.helpers import lite0, random_images


def _public(moments: int, fused: bool = True) -> PublicFeatureMap:
    return PublicFeatureMap(lite0(), norm_bound=2.0, second_moment_bound=0.5 if moments == 2 else None,
                            moments=moments, fused=fused)


def _reference_and_fast(pm: PublicFeatureMap, images: torch.Tensor, labels: torch.Tensor):
    weights = class_weight_matrix(labels, 3)
    ref_in = images.clone().requires_grad_(True)
    ref = {k: weights @ f for k, f in pm(ref_in).items()}
    fast_in = images.clone().requires_grad_(True)
    fast = pm.class_means(pm.stage_outputs(fast_in), weights)
    probe = {k: torch.randn_like(v) for k, v in ref.items()}  # a random direction for the gradients
    sum((ref[k] * probe[k]).sum() for k in ref).backward()
    sum((fast[k] * probe[k]).sum() for k in fast).backward()
    return ref, fast, ref_in.grad, fast_in.grad


@pytest.mark.parametrize("moments", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_class_means_and_gradients_match_the_reference_path(moments, channels_last):
    pm = _public(moments)
    if channels_last:
        pm.to(memory_format=torch.channels_last)
    images = random_images(12, seed=3, shape=(3, 32, 32))
    labels = torch.arange(12) % 3
    ref, fast, g_ref, g_fast = _reference_and_fast(pm, images, labels)
    assert set(fast) == set(ref)
    for k in ref:
        assert fast[k].shape == ref[k].shape
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-4, atol=1e-7)
    # elementwise, gradients carry cancellation noise; as vectors they agree to float32 rounding
    assert float((g_fast - g_ref).norm() / g_ref.norm()) < 1e-4


def _stages(nonfinite: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    stages = [torch.rand(4, 2, 3, 3, generator=g), torch.rand(4, 5, generator=g)]
    for s in stages:
        s[0] = 0.0  # example 0 is all zero: its features must stay zero, not NaN
    if nonfinite:
        stages[1][2, 0] = float("inf")
    return stages


@pytest.mark.parametrize("nonfinite", [False, True])
def test_zero_examples_stay_zero_and_nonfinite_activations_take_the_reference_path(nonfinite):
    pm = _public(2, fused=False)
    outputs = _stages(nonfinite)
    weights = class_weight_matrix(torch.tensor([0, 1, 1, 2]), 3)
    ref = {k: weights @ f for k, f in pm._bounded(concat_features(outputs)).items()}
    fast = pm.class_means(outputs, weights)
    for k in ref:
        assert torch.isfinite(fast[k]).all()
        torch.testing.assert_close(fast[k], ref[k])
    assert fast["moment1"][0].abs().sum() == 0  # class 0 holds only the all-zero example


