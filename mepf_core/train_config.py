"""The training run's configuration, free of torch so the CLI and the parameter models load fast.

`TrainConfig` is what defines a training run besides the release; it is saved in every checkpoint.
`mepf_core.training` runs it; `storage.params.TrainParams` takes every default from it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from mepf_core.errors import InvalidArgumentError

LOSS_MODES = ("mavg", "mmd")  # moving-average gap (the paper's, GFMN) or plain squared distance
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("constant", "cosine")
PAPER_CONV28_CHANNELS = 16  # the paper's 28x28 generator (and every run saved before `conv28_channels`)
PRECISIONS = ("auto", "fp32", "bf16")  # forward-pass precision; mepf_core.precision decides what "auto" means


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run besides the release (saved in every checkpoint)."""

    steps: int  # total generator updates; a resumed run continues up to this many
    batch_size: int = 100  # generated images per step (the paper: 100 for MNIST/FMNIST, 128 otherwise)
    conv28_channels: int = PAPER_CONV28_CHANNELS  # width of the 28x28 generator (`Conv28Generator`): its
    # two convolutions have conv28_channels and conv28_channels // 2 input channels (the paper's: 16, so 16
    # and 8); the 32x32 / 64x64 ResNet generator keeps the paper's width. 32 costs the same step time on
    # the CPU and scored CNN 78.4 / 77.2% against 76.7 / 77.2% for 16 at 3,000 steps (seeds 0 / 1, selection
    # half): not beyond the seed spread, so the paper's width stays (bench/results/levers.jsonl, "generator")
    lr_gen: float = 2e-3  # generator Adam learning rate (the start of the cosine schedule)
    lr_mavg: float = 1e-3  # Adam learning rate of the moving-average gaps ("LRmavg"; "mavg" loss only)
    beta1: float = 0.5  # Adam beta1 of the generator (the paper: 0.5)
    loss: str = "mavg"  # "mavg" (moving-average gap, the paper's) or "mmd" (plain squared distance)
    lr_schedule: str = "cosine"  # "cosine" (lr_gen decays to 0 at `steps`; resuming with more steps
    # stretches what remains) or "constant". At 4,000 steps cosine from 2e-3 gave FID 69.6 against
    # 77.9 for constant 1e-3 (bench/README.md, training choices)
    seed: int = 0  # seeds the generator's initial weights and every code and label drawn in training
    device: str = "auto"  # "auto" (cuda when available), "cpu" or "cuda"
    precision: str = "auto"  # "fp32", "bf16" (autocast the generator and encoder forward) or "auto": bf16
    # only where the hardware runs it natively and a quality A/B showed no drop (mepf_core.precision)
    checkpoint_every: int = 500  # steps between checkpoints (the criterion is evaluated at each)
    eval_samples: int = 2000  # fixed-seed, class-balanced images behind the selection criterion
    ema_decay: float = 0.0  # exponential moving average of the generator's weights (and batch-norm
    # statistics) for sampling, the criterion and the grids: w_ema <- d w_ema + (1 - d) w after each
    # step; 0 = off (sample the trained weights). bench/results/levers.jsonl holds its A/B

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "eval_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgumentError(f"{name} must be an integer > 0, got {value!r}")
        for name in ("lr_gen", "lr_mavg"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InvalidArgumentError(f"{name} must be a finite number > 0, got {value!r}")
        if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float)) or not 0 <= self.ema_decay < 1:
            raise InvalidArgumentError(f"ema_decay must be in [0, 1) (0 = off), got {self.ema_decay!r}")
        if not 0 <= self.beta1 < 1:
            raise InvalidArgumentError(f"beta1 must be in [0, 1), got {self.beta1!r}")
        if self.loss not in LOSS_MODES:
            raise InvalidArgumentError(f"loss must be one of {LOSS_MODES}, got {self.loss!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InvalidArgumentError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.device not in DEVICES:
            raise InvalidArgumentError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise InvalidArgumentError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidArgumentError(f"seed must be an integer >= 0, got {self.seed!r}")
        width = self.conv28_channels
        if isinstance(width, bool) or not isinstance(width, int) or not 2 <= width <= 512:
            raise InvalidArgumentError(f"conv28_channels must be an integer in [2, 512], got {self.conv28_channels!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        if "mixed_precision" in d and "precision" not in d:  # checkpoints written before `precision`
            d["precision"] = "auto" if d.pop("mixed_precision") else "fp32"
        d.setdefault("conv28_channels", PAPER_CONV28_CHANNELS)  # checkpoints written before the field
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidArgumentError(f"unknown TrainConfig field(s) {unknown}")
        return cls(**d)
