"""Per-example features with a hard L2 norm bound: the step that makes the sensitivity finite.

The bound must hold for every input, including all-zero, constant, saturated and non-finite
images; so pixels are sanitised before the encoder, non-finite activations are zeroed, and the
scaling is done in float64 with an all-zero vector left at zero (norm 0 <= C), never NaN.
"""

from __future__ import annotations

import torch

from mepf_core.encoders import FeatureMap
from mepf_core.errors import InvalidArgumentError


def sanitize_images(images: torch.Tensor) -> torch.Tensor:
    """Map any pixel values into [0, 1]: NaN -> 0, +inf -> 1, -inf -> 0, then clamp."""
    x = images.to(torch.float32)
    return torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0)


def bound_norm(features: torch.Tensor, norm_bound: float) -> torch.Tensor:
    """Scale each row to L2 norm exactly `norm_bound`; all-zero rows stay zero.

    Differentiable (used on generated images too). Non-finite entries are zeroed first.
    """
    if not norm_bound > 0:
        raise InvalidArgumentError(f"norm_bound must be > 0, got {norm_bound}")
    f = torch.nan_to_num(features, nan=0.0, posinf=0.0, neginf=0.0)
    norms = f.norm(dim=1, keepdim=True)
    scale = torch.where(norms > 0, norm_bound / norms.clamp_min(torch.finfo(f.dtype).tiny), torch.zeros_like(norms))
    return f * scale


def second_moment(features: torch.Tensor) -> torch.Tensor:
    """The second-moment feature: elementwise squares (bound its norm separately afterwards)."""
    return features * features


@torch.no_grad()
def images_to_features(
    feature_map: FeatureMap,
    images: torch.Tensor,
    *,
    norm_bound: float,
    second_moment_bound: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Custodian path: images -> (phi_1, phi_2 or None), float64, each row of norm <= its bound."""
    raw = feature_map(sanitize_images(images)).to(torch.float64)
    raw = torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
    phi1 = bound_norm(raw, norm_bound)
    phi2 = None if second_moment_bound is None else bound_norm(second_moment(phi1), second_moment_bound)
    return phi1, phi2


@torch.no_grad()
def fixed_batch_features(
    feature_map: FeatureMap,
    images: torch.Tensor,
    batch_size: int,
    *,
    norm_bound: float,
    second_moment_bound: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`images_to_features` of N <= batch_size images, computed in a batch of exactly `batch_size` (zeros
    pad the tail and are dropped), so a record's features are the same bits whatever else is in its batch.

    The encoder's float32 kernels choose their blocking by batch size: one image's features differ in the
    last bits between batches of 15 and 16 (measured up to 8e-8), so without a fixed batch a record's
    features, and any decision taken on them (its within-class cell, mepf_core.cells), would depend on
    how many records share its batch, which one added record changes. Within one batch size the rows
    are bitwise independent of their position and of the other rows (tests/test_cells.py).
    Raises InvalidArgumentError when N > batch_size.
    """
    n = len(images)
    if n > batch_size:
        raise InvalidArgumentError(f"{n} images do not fit a batch of {batch_size}")
    if n < batch_size:
        images = torch.cat([images, images.new_zeros((batch_size - n, *images.shape[1:]))])
    phi1, phi2 = images_to_features(feature_map, images, norm_bound=norm_bound, second_moment_bound=second_moment_bound)
    return phi1[:n], None if phi2 is None else phi2[:n]
