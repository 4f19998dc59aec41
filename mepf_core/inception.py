"""FID Inception features: images -> pool3 activations (N x 2048), preprocessed exactly as pytorch-fid.

Only the maths lives here: input checks, pytorch-fid's preprocessing and the batched forward pass.
Getting the network (finding, converting and writing its weights offline, patching pytorch-fid's
loader) is provisioning and lives in `storage.weights` (`load_fid_inception`, `provision_fid_weights`);
the statistics and the distance are in `mepf_core.fid`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

POOL3_DIM = 2048  # width of pytorch-fid's pool3 features, the activations FID is computed on


# --- images -> activations --------------------------------------------------------------------


def _as_image_tensor(images) -> torch.Tensor:
    """Validate N x C x H x W (C in {1, 3}), uint8 or float in [0, 1]; no copy of the data."""
    if isinstance(images, np.ndarray):
        with warnings.catch_warnings():  # read-only arrays (np.frombuffer) are fine: never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(images)
    else:
        tensor = images
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if tensor.ndim != 4:
        raise ValueError(f"images must be N x C x H x W, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError("images must hold at least one image, got 0")
    if tensor.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {tensor.shape[1]}")
    if tensor.dtype == torch.uint8:
        return tensor
    if not tensor.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ValueError("images contain NaN or infinite values")
    low, high = tensor.min().item(), tensor.max().item()
    if low < 0.0 or high > 1.0:
        raise ValueError(f"float images must be in [0, 1], got range [{low}, {high}]")
    return tensor


def images_to_inception_activations(
    model: nn.Module,
    images,
    *,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Pool3 activations (N x 2048 float32 numpy array) of images, preprocessed exactly as pytorch-fid does.

    images: N x C x H x W numpy array or torch tensor, C in {1, 3}, any H and W; uint8 (0..255) or
    float in [0, 1]. Not copied; each batch is moved to `device`. uint8 images are scaled by 1/255;
    grayscale is repeated to 3 channels; the model (from ``storage.weights.load_fid_inception``) then
    resizes bilinearly to 299x299 and maps [0, 1] to [-1, 1]. Each image's activations depend on that
    image alone (eval mode), so batch_size changes speed and memory, not values (beyond float
    rounding). progress: show a tqdm bar over batches.
    Raises ValueError for batch_size <= 0, a wrong shape, channel count or dtype, no images,
    non-finite values, or float values outside [0, 1]; TypeError for anything but an array or tensor.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    tensor = _as_image_tensor(images)
    n = tensor.shape[0]
    out = np.empty((n, POOL3_DIM), dtype=np.float32)
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="inception", unit="batch")
    with torch.inference_mode():
        for start in starts:
            batch = tensor[start : start + batch_size].to(device)
            batch = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            features = model(batch)[0]
            out[start : start + batch.shape[0]] = features.reshape(batch.shape[0], -1).cpu().numpy()
    return out
