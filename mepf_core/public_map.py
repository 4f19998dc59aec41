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

from mepf_core.encoders import EncoderSpec, FeatureMap, build_feature_map, concat_features
from mepf_core.errors import InvalidArgumentError, MepfError
from mepf_core.features import bound_norm, second_moment
from mepf_core.fused_encoder import fuse_feature_map
from mepf_core.lean_autograd import scaled_class_means, stage_means


class EncoderMismatchError(MepfError, ValueError):
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
            raise InvalidArgumentError(f"moments must be 1 or 2, got {moments}")
        if moments == 2 and second_moment_bound is None:
            raise InvalidArgumentError("second_moment_bound is required when moments = 2, got None")
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
        return self._bounded(self.raw(images).float())

    def _bounded(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        phi1 = bound_norm(raw, self.norm_bound)
        if self.moments == 1:
            return {"moment1": phi1}
        return {"moment1": phi1, "moment2": bound_norm(second_moment(phi1), self.second_moment_bound)}

    def stage_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's raw per-stage activations: what `forward` flattens, concatenates and bounds."""
        return self.raw.stage_outputs(images)

    def class_means(self, outputs: list[torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """{moment: K x D} = weights @ forward(images)[moment], without the B x D feature matrix.

        Why: with VGG19 (D = 303,104, batch 128) concatenating, scaling and back-propagating
        through the per-example feature matrix cost about a fifth of a training step. Row scaling
        commutes with averaging, W @ diag(s) X = (W * s) @ X, so each example's scale
        s = C / ||x|| folds into the K x B weights and every stage is reduced where it lies (a
        channels-last stage through a view, its K means permuted back to C, H, W order after).
        For the second moment, phi_2 = C_2 x^2 / ||x^2|| (phi_1's scale cancels). A batch with a
        non-finite norm (some activation not finite) takes the reference path, which zeroes
        non-finite entries before bounding.
        """
        outs = [o.float() for o in outputs]
        parts = [(outs, self.norm_bound)]
        if self.moments == 2:
            parts.append(([o.square() for o in outs], self.second_moment_bound))
        with torch.no_grad():  # values only: scaled_class_means differentiates through the norms itself
            norms = [_joint_norm(tensors) for tensors, _ in parts]
        if not all(bool(torch.isfinite(n).all()) for n in norms):
            return {name: weights @ f for name, f in self._bounded(concat_features(outs)).items()}
        # = _scaled_means(tensors, weights * _bound_scale(norm, bound)) with autograd's gradient, but one
        # buffer per stage in backward (mepf_core/lean_autograd.py; issue 16, memory)
        return {f"moment{i + 1}": scaled_class_means(tensors, weights, bound, norm)
                for i, ((tensors, bound), norm) in enumerate(zip(parts, norms))}


def _joint_norm(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Per-example L2 norm (B) over all stages together, as if they were concatenated."""
    per_stage = [torch.linalg.vector_norm(o, dim=tuple(range(1, o.ndim))) for o in outputs]
    return torch.linalg.vector_norm(torch.stack(per_stage, dim=1), dim=1)


def _bound_scale(norms: torch.Tensor, bound: float) -> torch.Tensor:
    """bound / norm per example (1 x B), 0 for an all-zero example (as `bound_norm`)."""
    scale = torch.where(norms > 0, bound / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))
    return scale[None, :]


def _scaled_means(outputs: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """weights (K x B) @ the concatenated flattened outputs, one matrix product per stage."""
    return torch.cat([stage_means(o, weights) for o in outputs], dim=1)


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
