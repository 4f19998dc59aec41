"""The public side's copy of the custodian's feature map, refused unless it matches bit-for-bit.

A release records its encoder (name, layers, image size, preprocessing, SHA-256 of the weights)
and its norm bounds. The public stage rebuilds the same map for generated images; if the rebuilt
encoder differs in any recorded way, matching its features to the release would be meaningless,
so `build_public_map` raises `EncoderMismatchError` naming what differs.
"""

from __future__ import annotations

import os
from dataclasses import asdict

import torch
from torch import nn

from mepf_core.encoders import EncoderSpec, FeatureMap, build_feature_map
from mepf_core.features import bound_norm, second_moment
from mepf_core.fused_encoder import fuse_feature_map


class EncoderMismatchError(ValueError):
    """The encoder available here is not the one the release was made with."""


def encoder_differences(expected: EncoderSpec, actual: EncoderSpec) -> list[str]:
    """Human-readable 'field: expected X, got Y' entries for every field that differs."""
    want, have = asdict(expected), asdict(actual)
    return [f"{key}: expected {want[key]!r}, got {have[key]!r}" for key in want if want[key] != have.get(key)]


def check_encoder(expected: EncoderSpec, actual: EncoderSpec) -> None:
    """Raise EncoderMismatchError unless the two specs agree in every field (hash included)."""
    diffs = encoder_differences(expected, actual)
    if diffs:
        raise EncoderMismatchError(
            f"the encoder built here does not match the release's encoder {expected.name!r} "
            f"(layers {list(expected.layers)}, image size {expected.image_size}): " + "; ".join(diffs)
        )


class PublicFeatureMap(nn.Module):
    """Images in [0, 1] -> {"moment1": phi_1, ["moment2": phi_2]}, float32, norm-bounded per row.

    The same map as the custodian's `images_to_features` (phi_1 = bound_norm(raw, C1), phi_2 =
    bound_norm(phi_1 ** 2, C2)), but differentiable and in float32: generated images are already
    in [0, 1], and the public side needs gradients, not the custodian's float64 sums. With
    `fused` (the default) the raw features come from the batch-norm-folded copy of the encoder,
    checked equal to float32 rounding when built.
    """

    def __init__(
        self,
        feature_map: FeatureMap,
        *,
        norm_bound: float,
        second_moment_bound: float | None,
        moments: int,
        fused: bool = True,
    ):
        super().__init__()
        if moments not in (1, 2):
            raise ValueError(f"moments must be 1 or 2, got {moments}")
        if moments == 2 and second_moment_bound is None:
            raise ValueError("second_moment_bound is required when moments = 2, got None")
        self.feature_map = feature_map
        # the batch-norm-folded copy computes the same function, faster (see fused_encoder.py)
        fast = fuse_feature_map(feature_map) if fused else None
        self.raw = fast if fast is not None else feature_map
        self.norm_bound = float(norm_bound)
        self.second_moment_bound = None if second_moment_bound is None else float(second_moment_bound)
        self.moments = moments

    @property
    def spec(self) -> EncoderSpec:
        return self.feature_map.spec

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raw = self.raw(images).float()
        phi1 = bound_norm(raw, self.norm_bound)
        if self.moments == 1:
            return {"moment1": phi1}
        return {"moment1": phi1, "moment2": bound_norm(second_moment(phi1), self.second_moment_bound)}


def build_public_map(
    encoder: EncoderSpec,
    *,
    norm_bound: float,
    second_moment_bound: float | None,
    moments: int,
    weights_path: str | os.PathLike | None = None,
    fused: bool = True,
) -> PublicFeatureMap:
    """Rebuild the release's feature map here and check it against the recorded spec."""
    fm = build_feature_map(
        encoder.name, weights_path=weights_path, random_init=encoder.random_init, image_size=encoder.image_size
    )
    check_encoder(encoder, fm.spec)
    return PublicFeatureMap(
        fm, norm_bound=norm_bound, second_moment_bound=second_moment_bound, moments=moments, fused=fused
    )
