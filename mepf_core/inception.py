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
import torch.nn.functional as F
from torch import nn

POOL3_DIM = 2048  # width of pytorch-fid's pool3 features, the activations FID is computed on
DEFAULT_BATCH_SIZE = 50  # images per forward pass (bench/bench_inception.py: batch 100 was not faster on the CPU)


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


def _is_pytorch_fid_inception(model: nn.Module) -> bool:
    """pytorch-fid's InceptionV3 (what `load_fid_inception` builds): its preprocessing can be done here."""
    return all(hasattr(model, a) for a in ("blocks", "resize_input", "normalize_input", "output_blocks",
                                           "last_needed_block"))


def _preprocess(batch: torch.Tensor, *, resize: bool, normalize: bool) -> torch.Tensor:
    """pytorch-fid's preprocessing, same values with less work: N x C x H x W uint8 or float in [0, 1]
    -> N x 3 x 299 x 299 float32, channels-last. A grayscale batch is resized as one channel and
    repeated to three afterwards (bilinear resizing acts per channel, so the values are the same as
    resizing three equal channels), and [0, 1] -> [-1, 1] runs in place."""
    x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
    if resize:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    if normalize:
        x = x.mul_(2).sub_(1) if x.data_ptr() != batch.data_ptr() else 2 * x - 1
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous(memory_format=torch.channels_last)


def _pool3(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's InceptionV3.forward after its preprocessing: the first requested block's output."""
    for idx, block in enumerate(model.blocks):
        x = block(x)
        if idx in model.output_blocks:
            return x
    raise ValueError("the Inception model requests no output block")


def images_to_inception_activations(
    model: nn.Module,
    images,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    progress: bool = False,
    fast: bool = False,
) -> np.ndarray:
    """Pool3 activations (N x 2048 float32 numpy array) of images, preprocessed exactly as pytorch-fid does.

    images: N x C x H x W numpy array or torch tensor, C in {1, 3}, any H and W; uint8 (0..255) or
    float in [0, 1]. Not copied; each batch is moved to `device`. uint8 images are scaled by 1/255;
    grayscale is repeated to 3 channels; the model (from ``storage.weights.load_fid_inception``) then
    resizes bilinearly to 299x299 and maps [0, 1] to [-1, 1]. Each image's activations depend on that
    image alone (eval mode), so batch_size changes speed and memory, not values (beyond float
    rounding). progress: show a tqdm bar over batches.
    fast (off by default: bench/results/inception.json measured it 0.71x at batch 50 and 0.87x at
    batch 100 against the reference on a loaded AVX2 CPU, so it is not adopted): for pytorch-fid's InceptionV3, do its preprocessing here with fewer copies
    (grayscale resized as one channel, in-place scaling) and run the network channels-last (the
    model's weights are converted to channels-last in place: same values, another memory layout);
    the activations equal the reference path's (`fast=False`: the model's own forward on NCHW
    batches) to float32 rounding (tests/test_fid.py, FID within 0.1). Other models always take
    the reference path.
    Raises ValueError for batch_size <= 0, a wrong shape, channel count or dtype, no images,
    non-finite values, or float values outside [0, 1]; TypeError for anything but an array or tensor.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    tensor = _as_image_tensor(images)
    n = tensor.shape[0]
    out = np.empty((n, POOL3_DIM), dtype=np.float32)
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="inception", unit="batch")
    fast = fast and _is_pytorch_fid_inception(model)
    if fast:
        model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for start in starts:
            batch = tensor[start : start + batch_size].to(device)
            if fast:
                x = _preprocess(batch, resize=model.resize_input, normalize=model.normalize_input)
                features = _pool3(model, x)
            else:
                batch = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
                if batch.shape[1] == 1:
                    batch = batch.expand(-1, 3, -1, -1)
                features = model(batch)[0]
            out[start : start + batch.shape[0]] = features.reshape(batch.shape[0], -1).float().cpu().numpy()
    return out
