"""Which floating-point precision a training run's forward pass uses: `TrainConfig.precision`.

"fp32" runs everything in float32. "bf16" autocasts the generator's and the encoder's forward pass
to bfloat16; the norm bound, the class means, the released targets and the loss stay float32
(`PublicFeatureMap.class_means` upcasts the stage outputs first), and the optimiser's weights stay
float32. "auto" picks bf16 only where both of these hold:

1. the hardware runs bf16 faster: a CUDA device that supports it, or a CPU with native bf16
   instructions (AVX-512 BF16 or AMX, read from /proc/cpuinfo at run time). Without them oneDNN
   emulates bf16 and a step gets slower;
2. a quality A/B (bench/bench_quality.py, FID and downstream accuracy, >= 3 seeds each side) showed
   no drop for the encoder: the encoders in `BF16_QUALITY_CHECKED`.

Measured (bench/results/training_step.json, variant bf16): on a 2-core AMD EPYC with AVX-512 BF16,
1.71x faster on the CIFAR-10 configuration (VGG19) but 0.65x on Fashion-MNIST (EfficientNet-Lite0:
small depthwise convolutions, batch 100); its effect on quality has not been measured for either
encoder yet, so `BF16_QUALITY_CHECKED` is empty and "auto" resolves to fp32 everywhere. Pass
`precision="bf16"` (`mepf train --precision bf16`) to opt in.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from mepf_core.errors import InvalidArgumentError
from mepf_core.train_config import PRECISIONS

logger = logging.getLogger(__name__)

# Encoders whose bf16 training was shown not to lower quality (FID and CNN accuracy, >= 3 seeds each
# side, bench/bench_quality.py). Add a name only with that evidence recorded in bench/results/.
BF16_QUALITY_CHECKED: frozenset[str] = frozenset()
# bf16 was measured slower than fp32 for these encoders even on CPUs with native bf16 (0.65x):
BF16_SLOWER_ON_CPU: frozenset[str] = frozenset({"efficientnet-lite0"})
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU advertises AVX-512 BF16 or AMX-BF16 (Linux /proc/cpuinfo); False elsewhere."""
    try:
        flags = set()
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether `device` runs bf16 natively (so autocast can be faster than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_precision(precision: str, device: torch.device, encoder: str) -> torch.dtype | None:
    """The autocast dtype for a run: torch.bfloat16, or None for plain float32.

    precision: "auto", "fp32" or "bf16"; device: where the run trains; encoder: the release's
    encoder name (e.g. "vgg19"). "bf16" is honoured on any device (slow where emulated); "auto"
    gives bf16 only when `bf16_is_fast(device)`, the encoder is in BF16_QUALITY_CHECKED and, on the
    CPU, not in BF16_SLOWER_ON_CPU. Raises InvalidArgumentError for another precision.
    """
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        if not bf16_is_fast(device):
            logger.warning("precision bf16 on %s without native bf16 support: expect slower steps than fp32", device)
        return torch.bfloat16
    fast = bf16_is_fast(device) and not (device.type == "cpu" and encoder in BF16_SLOWER_ON_CPU)
    return torch.bfloat16 if fast and encoder in BF16_QUALITY_CHECKED else None
