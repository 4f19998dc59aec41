"""The paper's generators: a small conv net for 28x28 grayscale, a ResNet for 32x32 / 64x64 RGB.

Each also serves the other channel count (1 or 3) with only its last convolution's output channels
changed: 3 x 28 x 28 by the conv net, 1 x 32 x 32 / 1 x 64 x 64 by the ResNet (`build_generator`).

Every generator maps a code (one-hot label concatenated with Gaussian noise when labelled, plain
noise otherwise) to images in [0, 1], the range the feature map expects. Codes are drawn by
`Generator.sample_codes` from an explicit `torch.Generator`, so a run is reproducible from its seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mepf_core.lean_autograd import bn_relu_conv
from mepf_core.train_config import PAPER_CONV28_CHANNELS

CODE_DIM = 100  # the paper's code size: K one-hot entries + (100 - K) noise entries when labelled
MIN_NOISE_DIM = 16  # with many classes the noise part never shrinks below this


class Generator(nn.Module):
    """Base class: owns the code layout (labels + noise) shared by all architectures."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, labelled: bool):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = int(num_classes)
        self.labelled = bool(labelled)
        label_dim = self.num_classes if self.labelled else 0
        self.noise_dim = max(CODE_DIM - label_dim, MIN_NOISE_DIM)
        self.code_dim = label_dim + self.noise_dim

    def sample_codes(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Codes for one image per entry of `labels` (int64 N; ignored when unlabelled except for N)."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.ndim != 1:
            raise ValueError(f"labels must be a 1-d tensor, got shape {tuple(labels.shape)}")
        n = labels.shape[0]
        device = next(self.parameters()).device
        # Drawn on the CPU from a CPU generator, then moved: the same codes on every device.
        noise = torch.randn(n, self.noise_dim, generator=generator).to(device)
        if not self.labelled:
            return noise
        if n and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"labels must be in [0, {self.num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
            )
        onehot = F.one_hot(labels.to(device), self.num_classes).to(noise.dtype)
        return torch.cat([onehot, noise], dim=1)

    def generate(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] (N x C x H x W) for the given labels."""
        return self(self.sample_codes(labels, generator))


class Conv28Generator(Generator):
    """The paper's 28x28 single-channel generator (`out_channels` 3 for 28x28 RGB).

    FC code-500 (BN, ReLU), FC 500-784 (BN, ReLU), reshape 16x7x7, bilinear x2, conv5 16->8 (BN,
    ReLU), bilinear x2, conv5 8->out_channels, sigmoid.
    """

    def __init__(self, num_classes: int, labelled: bool, hidden: int = 500, channels: tuple[int, int] = (16, 8),
                 out_channels: int = 1):
        if out_channels not in (1, 3):
            raise ValueError(f"out_channels must be 1 or 3, got {out_channels}")
        super().__init__((out_channels, 28, 28), num_classes, labelled)
        c0, c1 = channels
        self.c0 = c0
        self.fc = nn.Sequential(
            nn.Linear(self.code_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, c0 * 7 * 7),
            nn.BatchNorm1d(c0 * 7 * 7),
            nn.ReLU(inplace=True),
        )
        self.conv1 = nn.Sequential(nn.Conv2d(c0, c1, 5, padding=2), nn.BatchNorm2d(c1), nn.ReLU(inplace=True))
        self.conv2 = nn.Conv2d(c1, out_channels, 5, padding=2)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.fc(codes).view(codes.shape[0], self.c0, 7, 7)
        # channels-last makes both convolutions (their backward above all) ~1.5x faster on CPU
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.conv1(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        x = self.conv2(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return torch.sigmoid(x)


# Nearest 2x upsampling followed by a 3x3 convolution (padding 1), folded into one stride-2
# transposed convolution with a 4x4 kernel: the same function with 16 instead of 36 multiply-adds
# per input pixel and output channel, and no upsampled copy (1.5-2.2x faster forward+backward on
# CPU, measured on the three block sizes). In one dimension, output 2m + a of the upsampled-then-
# convolved signal is w0 u[2m+a-1] + w1 u[2m+a] + w2 u[2m+a+1] with u[j] = x[j // 2]:
#   a = 0: w0 x[m-1] + (w1 + w2) x[m];    a = 1: (w0 + w1) x[m] + w2 x[m+1].
# conv_transpose2d(stride 2, padding 1) computes y[2m+a] = sum_k K[k] x[i] over k = 2(m-i) + a + 1,
# so K = (w2, w1 + w2, w0 + w1, w0) = _FOLD @ w; in 2-d K = _FOLD w _FOLD^T. Borders agree: the
# upsampled signal's zero padding falls on the input's. tests/test_generators.py checks it.
_FOLD = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def folded_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The C_in x C_out x 4 x 4 transposed-convolution kernel (stride 2, padding 1) equal to 2x nearest
    upsampling followed by `weight` (C_out x C_in x 3 x 3, padding 1)."""
    fold = _FOLD.to(weight.device, weight.dtype)
    return torch.einsum("ka,oiab,lb->iokl", fold, weight, fold)


def upsample_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv2d(interpolate(x, 2x nearest), weight, padding=1) for a 3x3 weight, without the copy."""
    return F.conv_transpose2d(x, folded_kernel(weight), stride=2, padding=1)


class _UpBlock(nn.Module):
    """Residual up-block: BN-ReLU-upsample-conv3-BN-ReLU-conv3, plus upsample-conv1x1 skip.

    Computed as written but cheaper: upsample+conv3 by `upsample_conv3x3`, and the 1x1 skip
    before the (nearest) upsampling, with which it commutes. Each BN-ReLU-conv goes through
    `mepf_core.lean_autograd.bn_relu_conv`: in training, backward recomputes the ReLU output from
    the batch norm's input instead of keeping it (same values and gradients, half the saved bytes).
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = bn_relu_conv(x, self.bn1, folded_kernel(self.conv1.weight), stride=2, padding=1, transposed=True)
        h = bn_relu_conv(h, self.bn2, self.conv2.weight, self.conv2.bias, padding=1)
        return h + F.interpolate(self.skip(x), scale_factor=2, mode="nearest")

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block as the paper writes it (for tests)."""
        up = F.interpolate(x, scale_factor=2, mode="nearest")
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return h + self.skip(up)


class ResNetGenerator(Generator):
    """The paper's ResNet generator (ngf 64) for 3 x 32 x 32 and 3 x 64 x 64 images (`out_channels` 1
    for grayscale at those sizes).

    Transposed conv from the code to 512 x 4 x 4, then 3 (32x32) or 4 (64x64) residual up-blocks
    halving the channels, BN-ReLU-conv3 to out_channels, tanh mapped to [0, 1].
    """

    def __init__(self, image_size: int, num_classes: int, labelled: bool, ngf: int = 64, out_channels: int = 3):
        if out_channels not in (1, 3):
            raise ValueError(f"out_channels must be 1 or 3, got {out_channels}")
        super().__init__((out_channels, image_size, image_size), num_classes, labelled)
        n_blocks = {32: 3, 64: 4}.get(image_size)
        if n_blocks is None:
            raise ValueError(f"ResNetGenerator supports image sizes 32 and 64, got {image_size}")
        channels = [ngf * 8 // 2**i for i in range(n_blocks + 1)]
        self.project = nn.ConvTranspose2d(self.code_dim, channels[0], 4, 1, 0)
        self.blocks = nn.Sequential(*[_UpBlock(a, b) for a, b in zip(channels[:-1], channels[1:])])
        self.out = nn.Sequential(nn.BatchNorm2d(channels[-1]), nn.ReLU(inplace=True), nn.Conv2d(channels[-1], out_channels, 3, padding=1))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.project(codes[:, :, None, None]).contiguous(memory_format=torch.channels_last)  # ~1.3x on CPU
        bn, conv = self.out[0], self.out[2]  # BN-ReLU-conv3, its ReLU output recomputed in backward
        x = bn_relu_conv(self.blocks(x), bn, conv.weight, conv.bias, padding=conv.padding[0])
        return (torch.tanh(x) + 1.0) * 0.5


def build_generator(image_shape: tuple[int, int, int], num_classes: int, labelled: bool, *,
                    conv28_channels: int = PAPER_CONV28_CHANNELS) -> Generator:
    """The paper's generator for this image shape (C, H, W), C in {1, 3}: 28x28 -> the conv net
    (`Conv28Generator`, the paper's for 1x28x28, with channels (conv28_channels, conv28_channels // 2):
    training passes `TrainConfig.conv28_channels`); 32x32 / 64x64 -> the ResNet (the paper's for RGB).

    Raises ValueError naming the shape for any other shape.
    """
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 3 and shape[0] in (1, 3) and shape[1] == shape[2]:
        c, size = shape[0], shape[1]
        if size == 28:
            return Conv28Generator(num_classes, labelled, channels=(conv28_channels, conv28_channels // 2), out_channels=c)
        if size in (32, 64):
            return ResNetGenerator(size, num_classes, labelled, out_channels=c)
    raise ValueError(
        f"no generator for image shape {shape}; supported: C x 28 x 28, C x 32 x 32, C x 64 x 64 with C 1 or 3"
    )
