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
    target_delta: float = Field(1e-5, strict=True, description="delta of this release, in [MIN_DELTA, MAX_TARGET_DELTA] "
                                "(mepf_core.privacy.calibration: 2.2e-308 and 1e-3)")
    labelled: bool = Field(True, strict=True, description="one embedding per class (labels are private too)")
    moments: Literal[1, 2] = Field(1, description="1: mean of features; 2: also mean of squared features")
    encoder: str = "efficientnet-lite0"
    encoder_weights: str | None = Field(None, description="weights file for the encoder (default: packaged or cached)")
    norm_bound: float = Field(1.0, strict=True, description="L2 norm C of each example's first-moment features")
    second_moment_bound: float = Field(1.0, strict=True, description="L2 norm of each example's second-moment features")
    neighbouring: Neighbouring = Neighbouring.ADD_REMOVE
    count_share: float = Field(0.1, strict=True, description="share of the privacy precision spent on the class counts")
    dataset_id: str | None = Field(None, description="ledger key for this dataset (default: canonical id, "
                                   "see storage.datasets.canonical_dataset_id)")
    ledger: str | None = Field(None, description="budget ledger file (JSON lines)")
    budget: float | None = Field(None, strict=True, description="total epsilon budget of the dataset (sets it in a new ledger)")
    budget_delta: float | None = Field(None, strict=True, description="total delta budget of the dataset, with --budget "
                                       "(default: the ledger's, or storage.ledger.DEFAULT_BUDGET_DELTA = 1e-5, the "
                                       "default target_delta, for a new budget)")
    batch_size: int = Field(256, strict=True, ge=1, le=65536)
    shards: int = Field(1, strict=True, ge=1, le=1024, description="extraction tasks; each returns partial sums")
    limit: int | None = Field(None, strict=True, description="use only the first LIMIT images (replace-one only)")
    signing_key: str | None = Field(None, description="Ed25519 private key (`mepf keygen`) to sign the release with")
    signer_name: str | None = Field(None, description="name signed along with the release (needs signing_key)")

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
        from mepf_core.privacy.calibration import MAX_TARGET_DELTA, validate_delta

        return validate_delta(v, name="target_delta", cap=MAX_TARGET_DELTA)

    @field_validator("budget_delta")
    @classmethod
    def _budget_delta(cls, v: float | None) -> float | None:
        from mepf_core.privacy.calibration import MAX_TARGET_DELTA, validate_delta

        return None if v is None else validate_delta(v, name="budget_delta", cap=MAX_TARGET_DELTA)

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

    @field_validator("signing_key")
    @classmethod
    def _signing_key(cls, v: str | None) -> str | None:
        """The key must load now (exists, Ed25519, mode 0600), before any image is read or budget spent."""
        if v is not None:
            from storage.signing import load_private_key

            load_private_key(v)  # SigningKeyError (a ValueError) names the problem
        return v

    @field_validator("signer_name")
    @classmethod
    def _signer_name(cls, v: str | None) -> str | None:
        from storage.signing import validate_signer_name

        return None if v is None else validate_signer_name(v)

    @field_validator("out")
    @classmethod
    def _out(cls, v: str) -> str:
        p = Path(v)
        if p.suffix not in (".h5", ".hdf5"):
            raise ValueError(f"out must end in .h5 or .hdf5, got {v!r}")
        return v

    @model_validator(mode="after")
    def _signer_needs_key(self) -> "ReleaseParams":
        if self.signer_name is not None and self.signing_key is None:
            raise ValueError("--signer-name needs --signing-key (the name is signed with the key)")
        return self

    @model_validator(mode="after")
    def _ledger_budget(self) -> "ReleaseParams":
        if self.budget is not None and self.ledger is None:
            raise ValueError("--budget needs --ledger (where the budget is kept)")
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget > 0):
            raise ValueError(f"budget must be a finite number > 0, got {self.budget}")
        if self.budget_delta is not None and self.budget is None:
            raise ValueError("--budget-delta needs --budget (a budget is the pair epsilon, delta)")
        return self

    @model_validator(mode="after")
    def _limit_keeps_relation(self) -> "ReleaseParams":
        """`limit` (the first N records) is refused under add-remove, allowed under replace-one.

        Add-remove: adding one record x to D can push another record y out of the window, so the
        windows W(D) and W(D + x) differ by one record in and one out, a replace-one change: the
        first-moment sums move by phi(x) - phi(y), up to 2C, and the labelled counts by sqrt 2, against
        the claimed C and 1 (measured 1.4142 and 1.4142 on 2 classes x 4 images, --limit 6:
        tests/test_record_selection.py). A release claiming epsilon 1 would really spend about 2.

        Replace-one: D and D' have the same size n and differ in one record (x replaced by x'; the
        order is by file name or position). W is the N first records. If neither x nor x' is among the
        first N, W(D) = W(D'). Otherwise x leaves (if it was in W) and x' enters (if it sorts into W),
        and the window's size min(n, N) is the same for both, so whichever of them is missing is made
        up by the record at the window's edge: W(D) and W(D') differ by exactly one replaced record,
        which is the replace-one relation on the window with the same sensitivities (2C for the sums,
        sqrt 2 for labelled counts). The window's size min(n, N) is a function of n, which the relation
        makes public, so an unlabelled replace-one release may record it as n_public.
        """
        if self.limit is not None and self.neighbouring is Neighbouring.ADD_REMOVE:
            raise ValueError(
                f"limit={self.limit} (the first N images) is not a per-record selection: under add-remove, "
                "adding one image can push another out of the window, which doubles the sensitivity. "
                "Drop --limit, or use --neighbouring replace-one (where the window keeps the relation)")
        return self

    @property
    def resolved_dataset_id(self) -> str:
        """The ledger key: --dataset-id, else the canonical id (one id however the path is spelled)."""
        from storage.datasets import canonical_dataset_id

        return self.dataset_id or canonical_dataset_id(self.dataset, self.split, self.data_root)

    @property
    def source(self) -> str:
        """The records this release reads, as the ledger compares them (storage.datasets.dataset_source):
        recorded on every charge; records already charged to another dataset id are refused."""
        from storage.datasets import dataset_source

        return dataset_source(self.dataset, self.split, self.data_root)

    @property
    def legacy_dataset_id(self) -> str:
        """The key the code before canonical ids gave this dataset (the spec as spelled + ":" + split), so
        the ledger can refuse to lose what was charged under it (storage.ledger, legacy lines)."""
        return f"{self.dataset}:{self.split}"

    @property
    def published_dataset_id(self) -> str:
        """The dataset id written into the (public) release: --dataset-id, else the canonical id with an
        image folder's path replaced by a 16-hex SHA-256 of it. The custodian's path (user names,
        project names) is no business of the public side; the ledger keeps the readable path."""
        import hashlib

        dataset_id = self.resolved_dataset_id
        if self.dataset_id is None and dataset_id.startswith("imagefolder:"):
            path = dataset_id.split(":", 1)[1]
            return f"imagefolder:sha256-{hashlib.sha256(path.encode()).hexdigest()[:16]}"
        return dataset_id
