"""`train-generator` (release -> run directory) and `sample` (run directory -> synthetic dataset).

Both flows are public-stage only: they read the release file and encoder weights, never the
private data, and can be rerun at no privacy cost. Parameters are validated at the boundary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mepf_core.training import TrainConfig
from tasks.public import load_release_task, sample_task, train_task

_TRAIN_FIELDS = (
    "steps", "batch_size", "lr_gen", "lr_mavg", "beta1", "loss", "lr_schedule", "seed", "device",
    "mixed_precision", "checkpoint_every", "eval_samples",
)


def _positive(value: int, name: str) -> int:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


# Default length of a training run: on 2 CPU cores ~10 minutes for Fashion-MNIST. From 4,000 to
# 10,000 steps (cosine schedule, epsilon 10) FID fell from 69.6 to 56.0 and logistic-regression
# accuracy rose from 73.6% to 76.5% (bench/README.md, training choices).
DEFAULT_STEPS = 10_000


class TrainParams(BaseModel):
    """One training run of a generator on a release (defaults: the tuned Fashion-MNIST setting)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    release: str = Field(..., description="release file (.h5) written by the custodian")
    out: str = Field(..., description="run directory for checkpoints, run.json and images")
    steps: int = Field(DEFAULT_STEPS, description="total generator updates (a resumed run continues up to this)")
    batch_size: int = Field(TrainConfig.batch_size, description="generated images per step")
    lr_gen: float = Field(TrainConfig.lr_gen, description="generator Adam learning rate (start of the cosine schedule)")
    lr_mavg: float = Field(TrainConfig.lr_mavg, description="moving-average Adam learning rate (mavg loss)")
    beta1: float = Field(TrainConfig.beta1, description="generator Adam beta1")
    loss: Literal["mavg", "mmd"] = TrainConfig.loss
    lr_schedule: Literal["constant", "cosine"] = TrainConfig.lr_schedule
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = Field(True, description="bfloat16 autocast on cuda")
    checkpoint_every: int = Field(500, description="steps between checkpoints")
    eval_samples: int = Field(2000, description="fixed-seed images for the release-based selection criterion")
    resume: bool = Field(False, description="continue the run in `out` from its latest checkpoint")
    encoder_weights: str | None = Field(None, description="encoder weights file (default: packaged or cached)")
    progress: bool = Field(True, description="show a progress bar")
    trusted_keys: tuple[str, ...] = Field((), description="Ed25519 public keys (PEM); when given, the release must "
                                          "be signed by one of them")

    @field_validator("steps", "batch_size", "checkpoint_every", "eval_samples")
    @classmethod
    def _positive_int(cls, v: int, info) -> int:
        return _positive(v, info.field_name)

    @field_validator("lr_gen", "lr_mavg")
    @classmethod
    def _positive_lr(cls, v: float, info) -> float:
        if not v > 0 or v == float("inf"):
            raise ValueError(f"{info.field_name} must be a finite number > 0, got {v}")
        return v

    @field_validator("release")
    @classmethod
    def _release_exists(cls, v: str) -> str:
        if not Path(v).is_file():
            raise ValueError(f"release file {v} does not exist")
        return v

    @field_validator("trusted_keys")
    @classmethod
    def _trusted_keys_load(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from storage.signing import load_public_key

        for key in v:
            load_public_key(key)  # SigningKeyError (a ValueError): missing, not PEM, not Ed25519
        return v

    @field_validator("encoder_weights")
    @classmethod
    def _weights_exist(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"encoder weights file {v} does not exist")
        return v

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{name: getattr(self, name) for name in _TRAIN_FIELDS})

    def explicit_fields(self) -> list[str]:
        """Config fields the caller set on purpose (they must agree with a resumed checkpoint)."""
        return sorted(set(self.model_fields_set) & set(_TRAIN_FIELDS))


class SampleParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str = Field(..., description="run directory of a trained generator")
    n: int = Field(..., description="number of images to generate (class-balanced when labelled)")
    out: str | None = Field(None, description="synthetic dataset (.h5 or .parquet; default RUN/synthetic.h5)")
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "cpu"

    @field_validator("n")
    @classmethod
    def _positive_n(cls, v: int, info) -> int:
        return _positive(v, info.field_name)


@flow(name="train-generator", persist_result=True)
def train_generator(params: TrainParams) -> dict:
    """Read the release, check its encoder, train (or resume), keep the best checkpoint."""
    release = load_release_task(params.release, params.trusted_keys)
    return train_task(
        release, params.out, params.train_config(), params.resume, params.explicit_fields(),
        params.encoder_weights, params.progress,
    )


@flow(name="sample", persist_result=True)
def sample(params: SampleParams) -> dict:
    """Generate a synthetic dataset from a run's best checkpoint."""
    return sample_task(params.run, params.n, params.out, params.seed, params.device)
