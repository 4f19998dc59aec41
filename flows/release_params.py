"""Parameters of the `custodian-release` flow, validated at the boundary (CLI, deployments, API)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mepf_core.encoders import available_encoders
from mepf_core.privacy.sensitivity import Neighbouring


class ReleaseParams(BaseModel):
    """Everything the custodian chooses for one release. All of it is public."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field("fashion-mnist", description="fashion-mnist | mnist | cifar10 | celeba | imagefolder:PATH")
    split: Literal["train", "test"] = "train"
    data_root: str | None = Field(None, description="folder holding the dataset files (default: standard places)")
    out: str = Field("release.h5", description="release file to write (must not exist)")
    target_epsilon: float = Field(..., strict=True, description="epsilon of this release, > 0")
    target_delta: float = Field(1e-5, strict=True, description="delta of this release, in (0, 1)")
    labelled: bool = Field(True, strict=True, description="one embedding per class (labels are private too)")
    moments: Literal[1, 2] = Field(1, description="1: mean of features; 2: also mean of squared features")
    encoder: str = "efficientnet-lite0"
    encoder_weights: str | None = Field(None, description="weights file for the encoder (default: packaged or cached)")
    norm_bound: float = Field(1.0, strict=True, description="L2 norm C of each example's first-moment features")
    second_moment_bound: float = Field(1.0, strict=True, description="L2 norm of each example's second-moment features")
    neighbouring: Neighbouring = Neighbouring.ADD_REMOVE
    count_share: float = Field(0.1, strict=True, description="share of the privacy precision spent on the class counts")
    dataset_id: str | None = Field(None, description="ledger key for this dataset (default: DATASET:SPLIT)")
    ledger: str | None = Field(None, description="budget ledger file (JSON lines)")
    budget: float | None = Field(None, strict=True, description="total epsilon budget of the dataset (sets it in a new ledger)")
    batch_size: int = Field(256, strict=True, ge=1, le=65536)
    shards: int = Field(1, strict=True, ge=1, le=1024, description="extraction tasks; each returns partial sums")
    limit: int | None = Field(None, strict=True, description="use only the first LIMIT images (for tests and benchmarks)")

    @field_validator("moments", mode="before")
    @classmethod
    def _moments(cls, v):
        if isinstance(v, bool) or v not in (1, 2):
            raise ValueError(f"moments must be 1 or 2, got {v!r}")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        from storage.datasets import DATASETS

        if v not in DATASETS[:-1] and not (v.startswith("imagefolder:") and len(v) > len("imagefolder:")):
            raise ValueError(f"unknown dataset {v!r}; known: {', '.join(DATASETS)}")
        return v

    @field_validator("dataset_id")
    @classmethod
    def _dataset_id(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError(f"dataset_id must be a non-empty name when given, got {v!r}")
        return v

    @field_validator("target_epsilon")
    @classmethod
    def _eps(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"target_epsilon must be a finite number > 0, got {v}")
        return v

    @field_validator("target_delta")
    @classmethod
    def _delta(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {v}")
        return v

    @field_validator("norm_bound", "second_moment_bound")
    @classmethod
    def _bound(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"norm bounds must be finite numbers > 0, got {v}")
        return v

    @field_validator("count_share")
    @classmethod
    def _share(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"count_share must be in (0, 1), got {v}")
        return v

    @field_validator("encoder")
    @classmethod
    def _encoder(cls, v: str) -> str:
        if v not in available_encoders():
            raise ValueError(f"unknown encoder {v!r}; available: {', '.join(available_encoders())}")
        return v

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"limit must be >= 1, got {v}")
        return v

    @field_validator("out")
    @classmethod
    def _out(cls, v: str) -> str:
        p = Path(v)
        if p.suffix not in (".h5", ".hdf5"):
            raise ValueError(f"out must end in .h5 or .hdf5, got {v!r}")
        return v

    @model_validator(mode="after")
    def _ledger_budget(self) -> "ReleaseParams":
        if self.budget is not None and self.ledger is None:
            raise ValueError("--budget needs --ledger (where the budget is kept)")
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget > 0):
            raise ValueError(f"budget must be a finite number > 0, got {self.budget}")
        return self

    @property
    def resolved_dataset_id(self) -> str:
        return self.dataset_id or f"{self.dataset}:{self.split}"
