"""The parameters of each stage, declared once: release, train, sample, evaluate (and the pipeline).

One pydantic model per stage, validated at every boundary: the `mepf` command line builds its flags
from these models (`flows.cli.add_model_flag`: each flag's default and help are the field's), the
flows take them as their one `params` argument (so `prefect.yaml` deployments are validated against
their JSON schema), and the tasks read them. `tests/test_params_single_source.py` checks that the CLI,
`prefect.yaml` and `scripts/local_stack.py` repeat no default that differs from these.

Why in `storage/`: validating a parameter set reads the file system (the dataset names
`storage.datasets` knows, signing keys that must load now, whether an evaluation reference contains
training records), and `mepf_core` stays free of files. This module imports no Prefect, tasks or
flows. `TrainParams` takes each training field's default from `mepf_core.train_config.TrainConfig`.

Errors: invalid values raise `pydantic.ValidationError`, one entry per field, naming the value.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from mepf_core.privacy.sensitivity import Neighbouring
from mepf_core.train_config import DEVICES, LOSS_MODES, LR_SCHEDULES, PRECISIONS, TrainConfig
from storage.references import parse_reference, reads_training_records

# --- custodian-release ---------------------------------------------------------------------------

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
    image_size: int | None = Field(None, strict=True, description="side of the square images, 28 | 32 | 64 (default: "
                                   "a named dataset's own; an image folder: 28 when grayscale, else 32)")
    channels: int | None = Field(None, strict=True, description="1 (grayscale) | 3 (RGB) (default: a named dataset's "
                                 "own; an image folder: 1 when every image is grayscale, else 3, a choice made from "
                                 "the data and recorded as such in the release)")
    moments: Literal[1, 2] = Field(1, description="1: mean of features; 2: also mean of squared features")
    encoder: str = "efficientnet-lite0"
    encoder_weights: str | None = Field(None, description="weights file for the encoder (default: packaged or cached)")
    norm_bound: float = Field(1.0, strict=True, description="L2 norm C of each example's first-moment features")
    second_moment_bound: float = Field(1.0, strict=True, description="L2 norm of each example's second-moment features")
    neighbouring: Neighbouring = Neighbouring.ADD_REMOVE
    count_share: float = Field(0.1, strict=True, description="share of the privacy precision spent on the class counts")
    cells_per_class: int | None = Field(None, strict=True, description="within-class cells: released rows per class, "
                                        "1 | 2 | 4 | 8 | 16 (default: 8 for a labelled release at target_epsilon "
                                        ">= 0.5 with batch_size >= 16, else 1; mepf_core.cells)")
    cell_seed: int = Field(1, strict=True, ge=0, description="seed of the cells' public projection (Voronoi cells) "
                           "or hyperplane normals (1: the seed of the measured setting, bench/README.md)")
    cell_reference: str | None = Field(None, description="public split whose tabulated constants place the cells: "
                                       "its k-means centroids per class (Voronoi cells, mepf_core.cells."
                                       "PUBLIC_CENTROIDS), or 'none' for hyperplanes through 0 (default: "
                                       "fashion-mnist:test-select when releasing fashion-mnist's train split, else "
                                       "none; with an image folder it needs channels)")
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

    @model_validator(mode="after")
    def _image_mode(self) -> "ReleaseParams":
        """image_size in (28, 32, 64), channels in (1, 3), and a named dataset's own format (never resized),
        before anything is read or charged (storage.datasets.check_image_mode)."""
        from storage.datasets import check_image_mode

        check_image_mode(self.dataset, self.image_size, self.channels)
        return self

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
        from mepf_core.encoders import available_encoders

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

    @field_validator("cells_per_class")
    @classmethod
    def _cells(cls, v: int | None) -> int | None:
        from mepf_core.cells import validate_cells

        return None if v is None else validate_cells(v)

    @model_validator(mode="after")
    def _cells_need_labels(self) -> "ReleaseParams":
        from mepf_core.cells import MIN_CELL_BATCH

        if self.cells > 1 and not self.labelled:
            raise ValueError(f"cells_per_class={self.cells} needs a labelled release (cells split each class); "
                             "use cells_per_class=1 for an unlabelled one")
        if self.cells > 1 and self.batch_size < MIN_CELL_BATCH:
            raise ValueError(f"cells_per_class={self.cells} needs batch_size >= {MIN_CELL_BATCH} (below it a "
                             f"record's features, and so its cell, change with the thread count), got "
                             f"{self.batch_size}")
        return self

    @model_validator(mode="after")
    def _cell_reference_tabulated(self) -> "ReleaseParams":
        """A cell reference names constants made once from public images (mepf_core.cells.PUBLIC_CENTROIDS):
        the release reads no data to place its cells, so it must be one the table holds for this seed (and
        for this number of cells, when there is more than one), and it must not be drawn from the split
        being released (its constants would then be an unprotected function of private records)."""
        ref = self.cell_reference
        if ref is None or ref == "none":
            return self
        from mepf_core.cells import CELLS_PER_CLASS, tabulated_references

        counts = [self.cells] if self.cells > 1 else CELLS_PER_CLASS[1:]
        known = sorted({r for m in counts for r in tabulated_references(self.cell_seed, m)})
        if ref not in known:
            raise ValueError(f"cell_reference {ref!r} has no tabulated centroids for cell_seed {self.cell_seed} and "
                             f"{self.cells if self.cells > 1 else 'any number of'} cells per class (tabulated: "
                             f"{', '.join(known) or 'none'}); use cell_reference 'none' (no public constants)")
        if parse_reference(ref) == (self.dataset, self.split):
            raise ValueError(f"cell_reference {ref!r} is drawn from the {self.dataset} {self.split} split this release "
                             "protects: its centroids are not public constants for it; use cell_reference 'none'")
        return self

    @model_validator(mode="after")
    def _cell_reference_needs_a_declared_mode(self) -> "ReleaseParams":
        """Tabulated offsets exist for one image shape. An image folder's shape without --channels is
        inferred from the data (one colour image makes it 3 x 32 x 32), so whether the table held an
        entry, and so whether the release was made, was decided by one record (sixth DP review). With a
        cell reference, the shape must come from the settings (the preflight then looks the entry up)."""
        from storage.datasets import declared_image_shape

        if self.resolved_cell_reference is not None and declared_image_shape(
                self.dataset, self.image_size, self.channels) is None:
            raise ValueError(f"cell_reference {self.resolved_cell_reference!r} places the cells with offsets "
                             "tabulated for one image shape: an image folder must then declare its mode with "
                             "--channels (and --image-size), not leave it to be inferred from the images")
        return self

    @property
    def cells(self) -> int:
        """M, the rows per class: cells_per_class, or its default for this epsilon (mepf_core.cells)."""
        from mepf_core.cells import cells_for_epsilon

        if self.cells_per_class is not None:
            return self.cells_per_class
        return cells_for_epsilon(self.target_epsilon, self.labelled, self.batch_size)

    @property
    def resolved_cell_reference(self) -> str | None:
        """The public split whose tabulated centroids place the cells, None for hyperplanes through 0 (and with one cell):
        cell_reference, else fashion-mnist:test-select for fashion-mnist's train split when tabulated."""
        if self.cells == 1 or self.cell_reference == "none":
            return None
        return self.cell_reference or self._default_cell_reference()

    def _default_cell_reference(self) -> str | None:
        """fashion-mnist:test-select for fashion-mnist's train split where `PUBLIC_CENTROIDS` holds centroids
        made for the declared settings (encoder, its packaged weights, image shape, norm bound, cell_seed and
        the number of cells; the preflight checks the weights' hash), else None (hyperplanes through 0)."""
        from mepf_core.cells import tabulated_references
        from storage.datasets import declared_image_shape

        default = "fashion-mnist:test-select"
        if (self.dataset, self.split) != ("fashion-mnist", "train") or self.encoder_weights is not None:
            return None
        known = tabulated_references(self.cell_seed, self.cells, encoder=self.encoder, norm_bound=self.norm_bound,
                                     image_shape=declared_image_shape(self.dataset, self.image_size, self.channels))
        return default if default in known else None

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


# --- train-generator and sample --------------------------------------------------------------------

# Default length of a training run: on 2 CPU cores ~10 minutes for Fashion-MNIST. From 4,000 to
# 10,000 steps (cosine schedule, epsilon 10) FID fell from 69.6 to 56.0 and logistic-regression
# accuracy rose from 73.6% to 76.5% (bench/README.md, training choices).
DEFAULT_STEPS = 10_000

TRAIN_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))  # TrainParams' fields that form it


def _config_default(name: str):
    """`TrainConfig`'s default for field `name` (the one place training defaults are declared)."""
    default = TrainConfig.__dataclass_fields__[name].default
    if default is dataclasses.MISSING:
        raise TypeError(f"TrainConfig.{name} has no default")
    return default


def _positive(value: int, name: str) -> int:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


class TrainParams(BaseModel):
    """One training run of a generator on a release (defaults: `TrainConfig`'s, the tuned Fashion-MNIST
    setting, and DEFAULT_STEPS). The fields named in TRAIN_CONFIG_FIELDS form the `TrainConfig`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    release: str = Field(..., description="release file (.h5) written by the custodian")
    out: str = Field(..., description="run directory for checkpoints, run.json and images")
    steps: int = Field(DEFAULT_STEPS, description="total generator updates (a resumed run continues up to this)")
    batch_size: int = Field(_config_default("batch_size"), description="generated images per step")
    conv28_channels: int = Field(_config_default("conv28_channels"), strict=True,
                                 description="width of the 28x28 generator: channels of its two convolutions "
                                 "are this and half of it (the paper's: 16)")
    lr_gen: float = Field(_config_default("lr_gen"),
                          description="generator Adam learning rate (start of the cosine schedule)")
    lr_mavg: float = Field(_config_default("lr_mavg"), description="moving-average Adam learning rate (mavg loss)")
    beta1: float = Field(_config_default("beta1"), description="generator Adam beta1")
    loss: Literal[LOSS_MODES] = _config_default("loss")
    lr_schedule: Literal[LR_SCHEDULES] = _config_default("lr_schedule")
    seed: int = Field(_config_default("seed"), ge=0)
    device: Literal[DEVICES] = _config_default("device")
    precision: Literal[PRECISIONS] = Field(_config_default("precision"),
                                           description="forward-pass precision: fp32, bf16 (autocast) or auto "
                                           "(bf16 only where native and quality-checked)")
    checkpoint_every: int = Field(_config_default("checkpoint_every"), description="steps between checkpoints")
    eval_samples: int = Field(_config_default("eval_samples"),
                              description="fixed-seed images for the release-based selection criterion")
    ema_decay: float = Field(_config_default("ema_decay"), ge=0, lt=1,
                             description="moving average of the generator's weights used for sampling, "
                             "the criterion and grids (0 = off)")
    resume: bool = Field(False, description="continue the run in `out` from its latest checkpoint")
    encoder_weights: str | None = Field(None, description="encoder weights file (default: packaged or cached)")
    progress: bool = Field(True, description="show a console progress bar (a Prefect run also shows a progress artifact)")
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

    @model_validator(mode="after")
    def _valid_config(self) -> "TrainParams":
        """The rest of TrainConfig's own checks (beta1 in [0, 1)) at the boundary, not at the first step."""
        self.train_config()
        return self

    def train_config(self) -> TrainConfig:
        """The `TrainConfig` these parameters describe (raises ValueError where TrainConfig refuses one)."""
        return TrainConfig(**{name: getattr(self, name) for name in TRAIN_CONFIG_FIELDS})

    def explicit_fields(self) -> list[str]:
        """Config fields the caller set on purpose (they must agree with a resumed checkpoint)."""
        return sorted(set(self.model_fields_set) & set(TRAIN_CONFIG_FIELDS))


class SampleParams(BaseModel):
    """One synthetic dataset drawn from a trained run's best checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str = Field(..., description="run directory of a trained generator")
    n: int = Field(..., description="number of images to generate (class-balanced when labelled)")
    out: str | None = Field(None, description="synthetic dataset: .h5, .parquet (Hugging Face Image layout), .npz "
                            "(x N x H x W x C, y), or DIR/ (image folder, one PNG subfolder per class); "
                            "default RUN/synthetic.h5; a DATASET_CARD.md is written beside it")
    seed: int = Field(0, ge=0)
    device: Literal[DEVICES] = "cpu"

    @field_validator("n")
    @classmethod
    def _positive_n(cls, v: int, info) -> int:
        return _positive(v, info.field_name)

    @field_validator("out")
    @classmethod
    def _export_format(cls, v: str | None) -> str | None:
        from storage.synthetic import export_format

        if v is not None:
            export_format(v)  # ValueError: "synthetic dataset must end in one of ('.h5', ...) or '/' ..."
        return v


# --- evaluate --------------------------------------------------------------------------------------

# Synthetic images an evaluation trains its classifiers on when none were drawn yet, and the
# pipeline's `n_samples`: 10,000, Fashion-MNIST's test-split size (README, Results).
DEFAULT_EVALUATION_SAMPLES = 10_000

class EvaluateParams(BaseModel):
    """FID and downstream accuracy of a run's synthetic dataset against a real, public split.

    A reference or ceiling that reads training records (`storage.references.reads_training_records`)
    is refused unless `allow_private_reference` accepts it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str = Field(..., description="run directory of a trained generator (holds synthetic.h5 after sampling)")
    synthetic: str | None = Field(None, description="synthetic dataset: .h5, .parquet, .npz or image folder DIR/ "
                                  "(default RUN/synthetic.h5)")
    reference: str = Field("fashion-mnist:test", description="real public split: DATASET[:test|train|test-select|test-report]; test-select / test-report are the fixed halves of the test split (storage/references.py)")
    data_root: str | None = None
    out: str = Field(..., description="folder for metrics.parquet, metrics.json, report.md, metrics.png")
    fid_samples: int = Field(5000, ge=0, description="synthetic images for FID (0: skip FID)")
    fid_reference: int | None = Field(None, ge=100, description="real images for the FID statistics (default all)")
    classifiers: tuple[str, ...] = ("logreg", "mlp", "cnn")
    train_samples: int | None = Field(None, ge=100, description="synthetic images to train classifiers on (default all)")
    ceiling: bool = Field(False, description="also train the classifiers on real training images")
    allow_private_reference: bool = Field(False, description="accept a reference or ceiling that reads a "
                                          "training split (possibly private); its statistics are not cached")
    allow_small_fid: bool = Field(False, description="accept an FID from fewer than 2,048 synthetic or reference "
                                  "images (quick runs only: biased upwards, not comparable across sizes)")
    seed: int = Field(0, ge=0, description="seed of the classifiers and, when the run has no synthetic set yet, "
                      "of the codes it is drawn from")
    draw_samples: int | None = Field(None, ge=1, description="images to draw when the run has no synthetic set yet "
                                     "(RUN/synthetic.h5; default: as many as the evaluation uses, max(fid_samples, "
                                     "train_samples or 10,000)); an existing set is reused, never replaced")

    @property
    def samples_to_draw(self) -> int:
        """How many images `flows.evaluate` draws for a run that has no synthetic set: `draw_samples`, else
        the most any metric uses: max(fid_samples, train_samples or DEFAULT_EVALUATION_SAMPLES), where the
        classifiers' "all" (train_samples None) means DEFAULT_EVALUATION_SAMPLES."""
        if self.draw_samples is not None:
            return self.draw_samples
        train = (self.train_samples or DEFAULT_EVALUATION_SAMPLES) if self.classifiers else 0
        return max(self.fid_samples, train) or DEFAULT_EVALUATION_SAMPLES

    @field_validator("classifiers", mode="before")
    @classmethod
    def _split(cls, v):
        from mepf_core.classifiers import CLASSIFIERS

        names = tuple(x.strip() for x in v.split(",") if x.strip()) if isinstance(v, str) else tuple(v)
        unknown = [n for n in names if n not in CLASSIFIERS]
        if unknown:
            raise ValueError(f"unknown classifier(s) {unknown}; known: {', '.join(CLASSIFIERS)}")
        return names

    @field_validator("reference")
    @classmethod
    def _reference(cls, v: str) -> str:
        from storage.datasets import DATASETS

        name, _ = parse_reference(v)
        if name not in DATASETS and not name.startswith("imagefolder:"):
            raise ValueError(f"unknown reference dataset {name!r}; known: {', '.join(DATASETS)}")
        return v

    @model_validator(mode="after")
    def _small_fid(self) -> "EvaluateParams":
        from storage.metrics import FID_MIN_SAMPLES, small_fid_problem

        if self.allow_small_fid or self.fid_samples == 0:
            return self
        for name in ("fid_samples", "fid_reference"):
            count = getattr(self, name)
            if count is not None and count < FID_MIN_SAMPLES:
                raise ValueError(small_fid_problem(name, count))
        return self

    @model_validator(mode="after")
    def _private_reference(self) -> "EvaluateParams":
        if self.allow_private_reference:
            return self
        if reads_training_records(self.reference, self.data_root):
            raise ValueError(
                f"reference {self.reference!r} reads a training split, which may be the private data: its FID "
                "statistics are not differentially private. Use a test split, or pass --allow-private-reference "
                "(allow_private_reference=True) to accept it")
        if self.ceiling and self.classifiers:
            raise ValueError(
                "ceiling trains classifiers on the real training split, which may be the private data; pass "
                "--allow-private-reference (allow_private_reference=True) to accept it")
        return self

    @property
    def private_reference(self) -> bool:
        """Whether the reference reads training records (then its FID statistics are never cached)."""
        return reads_training_records(self.reference, self.data_root)


# --- dp-mepf-pipeline (all four stages) --------------------------------------------------------------

# The stage fields a pipeline configuration may set, by stage. Each keeps its stage model's type,
# default, description and constraints (the stage models validate them again in `stage_params`).
RELEASE_FIELDS = ("dataset", "data_root", "target_epsilon", "target_delta", "labelled", "neighbouring", "moments",
                  "encoder", "ledger", "budget", "limit", "image_size", "channels", "cells_per_class", "cell_seed",
                  "cell_reference")
TRAIN_FIELDS = ("steps", "batch_size", "conv28_channels", "lr_gen", "lr_mavg", "lr_schedule", "seed",
                "checkpoint_every", "eval_samples", "device")
EVALUATE_FIELDS = ("reference", "fid_samples", "fid_reference", "classifiers", "allow_small_fid", "ceiling",
                   "allow_private_reference")

# Where the pipeline's defaults differ from a stage model's, on purpose. The pipeline is the quick
# end-to-end job (about 20 minutes on 2 CPU cores, README): Inception runs about 10 images/s there,
# so FID uses 1,000 synthetic against 1,000 real test images (the bench's quality rows use the same,
# bench/README.md) instead of `mepf evaluate`'s 5,000 against the whole split. FIDs at different
# sample sizes are not comparable: compare runs with the same `fid_samples` and `fid_reference`.
PIPELINE_DEFAULTS = {
    "target_epsilon": 10.0,  # ReleaseParams has no default (a custodian chooses it); the demo's epsilon
    "fid_samples": 1000,
    "fid_reference": 1000,
    # 1,000 is below FID_MIN_SAMPLES (2,048): the quick pipeline accepts a small FID explicitly (its
    # counts are recorded in the report); a configuration may set allow_small_fid: false.
    "allow_small_fid": True,
}


def _stage_field(model: type[BaseModel], name: str) -> tuple:
    """`model`'s declaration of field `name` as a (type, FieldInfo) pair for `create_model`, with the
    default replaced where PIPELINE_DEFAULTS names the field."""
    info = model.model_fields[name]
    override = {"default": PIPELINE_DEFAULTS[name]} if name in PIPELINE_DEFAULTS else {}
    return info.annotation, FieldInfo.merge_field_infos(info, **override)


class _Pipeline(BaseModel):
    """The end-to-end job; defaults finish in about 20 minutes on 2 CPU cores (Fashion-MNIST).

    Flat keys (a `mepf run --config` file holds one mapping): the stage fields RELEASE_FIELDS,
    TRAIN_FIELDS and EVALUATE_FIELDS as their stage models declare them (defaults included, except
    PIPELINE_DEFAULTS), `out_dir` and `n_samples`. `stage_params` validates every stage up front.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    out_dir: str = Field(None, description="folder for release.h5, run/ and report/ (default runs/TIMESTAMP)")
    n_samples: int = Field(DEFAULT_EVALUATION_SAMPLES, description="synthetic images drawn for evaluation")

    @model_validator(mode="before")
    @classmethod
    def _default_out_dir(cls, values):
        if isinstance(values, dict) and not values.get("out_dir"):
            values = {**values, "out_dir": str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))}
        return values

    @model_validator(mode="after")
    def _batch_holds_every_row(self):
        """The generator's batch must hold one image per released row (classes x cells), or training fails
        after the release has spent its budget: refused up front for the named datasets (10 classes)."""
        try:
            release = ReleaseParams(**{name: getattr(self, name) for name in RELEASE_FIELDS})
        except ValueError:  # pydantic's ValidationError: stage_params reports it, naming the field
            return self
        rows = (10 if self.dataset in ("fashion-mnist", "mnist", "cifar10") else 0) * release.cells
        if self.labelled and self.batch_size < rows:
            raise ValueError(f"batch_size {self.batch_size} is smaller than the release's {rows} rows (10 classes x "
                             f"{release.cells} cells per class): raise batch_size or lower cells_per_class")
        return self

    def stage_params(self) -> tuple[ReleaseParams, dict, dict]:
        """Validate every stage's parameters up front, before any work is done.

        Returns the release parameters and the keyword arguments of TrainParams (without `release`,
        known only once the release is written) and of EvaluateParams. Raises pydantic's
        ValidationError naming the stage field that is refused.
        """
        out = Path(self.out_dir)
        release = ReleaseParams(out=str(out / "release.h5"), **{name: getattr(self, name) for name in RELEASE_FIELDS})
        train = dict(out=str(out / "run"), **{name: getattr(self, name) for name in TRAIN_FIELDS})
        evaluation = dict(run=str(out / "run"), out=str(out / "report"), data_root=None,
                          **{name: getattr(self, name) for name in EVALUATE_FIELDS})
        EvaluateParams(**evaluation)  # validates classifier names and the reference now
        return release, train, evaluation


PipelineParams = create_model(
    "PipelineParams",
    __base__=_Pipeline,
    __module__=__name__,
    __doc__=_Pipeline.__doc__,
    **{name: _stage_field(model, name)
       for model, names in ((ReleaseParams, RELEASE_FIELDS), (TrainParams, TRAIN_FIELDS),
                            (EvaluateParams, EVALUATE_FIELDS))
       for name in names},
)


# --- dp-mepf-sweep (the pipeline at several epsilons, one ledger) -------------------------------------

SWEEP_PIPELINE_FIELDS = tuple(name for name in PipelineParams.model_fields if name not in ("out_dir", "target_epsilon"))
SWEEP_LEDGER = "ledger.jsonl"  # the sweep's ledger, in its folder, unless `ledger` names another


def sweep_folder_name(epsilon: float) -> str:
    """`eps-<epsilon>` with %g formatting: eps-0.2, eps-1, eps-10."""
    return f"eps-{epsilon:g}"


class _Sweep(BaseModel):
    """The pipeline once per epsilon against one budget ledger (`flows.sweep.dp_mepf_sweep`).

    `epsilons` in the order they are released; each gets the pipeline folder OUT/eps-<e>/ (release.h5,
    run/, report/); the ledger is OUT/ledger.jsonl unless `ledger` is given. Every other field is the
    pipeline's (PipelineParams: same type, default and check), the same for every epsilon.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilons: tuple[float, ...] = Field(..., description="target epsilon of each release, in the order released")
    out: str = Field(..., description="sweep folder: eps-<e>/ per epsilon, ledger.jsonl, report/ (combined)")

    @field_validator("epsilons")
    @classmethod
    def _epsilons(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("epsilons must name at least one epsilon, got none")
        bad = [e for e in v if not (math.isfinite(e) and e > 0)]
        if bad:
            raise ValueError(f"every epsilon must be a finite number > 0, got {bad}")
        names = [sweep_folder_name(e) for e in v]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"epsilons must differ (each has its folder), got {', '.join(twice)} more than once")
        return v

    @property
    def resolved_ledger(self) -> str:
        """`ledger`, else OUT/ledger.jsonl."""
        return self.ledger or str(Path(self.out) / SWEEP_LEDGER)

    def folder(self, epsilon: float) -> Path:
        """OUT/eps-<epsilon>: that epsilon's pipeline folder."""
        return Path(self.out) / sweep_folder_name(epsilon)

    def pipeline_params(self, epsilon: float, **changes) -> "PipelineParams":
        """The pipeline of one epsilon: out_dir OUT/eps-<e>, the sweep's ledger, every other field as set
        here (`changes` override, e.g. ceiling=False once a run holds the ceiling). Raises pydantic's
        ValidationError where a stage refuses a value."""
        values = {name: getattr(self, name) for name in SWEEP_PIPELINE_FIELDS}
        values.update(out_dir=str(self.folder(epsilon)), target_epsilon=epsilon, ledger=self.resolved_ledger, **changes)
        return PipelineParams(**values)


def _sweep_field(name: str) -> tuple:
    info = PipelineParams.model_fields[name]
    if name == "ledger":
        return info.annotation, FieldInfo.merge_field_infos(
            info, description="budget ledger file (JSON lines) charged by every release (default OUT/ledger.jsonl)")
    return info.annotation, FieldInfo.merge_field_infos(info)


SweepParams = create_model(
    "SweepParams",
    __base__=_Sweep,
    __module__=__name__,
    __doc__=_Sweep.__doc__,
    **{name: _sweep_field(name) for name in SWEEP_PIPELINE_FIELDS},
)
