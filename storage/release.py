"""The release file: the noisy embedding and everything the public side needs, in HDF5.

Layout (schema version 1):

    /moment1   float64 K x D   noisy per-class sums of phi_1
    /moment2   float64 K x D   noisy per-class sums of phi_2 (only when moments = 2)
    /counts    float64 K       noisy per-class counts (exact only when public under the relation)
    attrs: schema_version (int), metadata_json (str), metadata_sha256 (str)

`metadata_json` records each dataset's SHA-256, so any byte change is caught on reading.
Only the fields listed in `ReleaseMetadata` are written: nothing un-noised about the private
data except what the neighbouring relation makes public.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from mepf_core import __version__
from mepf_core.encoders import EncoderSpec
from mepf_core.embedding import mean_embeddings
from storage.atomic import atomic_path

SCHEMA_VERSION = 1
PART_NAMES = ("moment1", "moment2", "counts")


class ReleaseError(Exception):
    """Base class: the file is not a valid dp-mepf release."""


class ReleaseCorruptError(ReleaseError):
    """Unreadable, truncated, or a checksum does not match."""


class ReleaseSchemaError(ReleaseError):
    """Readable, but a field is missing, of the wrong type, shape or version."""


@dataclass(frozen=True)
class PartRecord:
    name: str
    shape: tuple[int, ...]
    sensitivity: float
    sigma: float
    noise_multiplier: float | None  # None when released exactly (sensitivity 0)
    sha256: str = ""


@dataclass(frozen=True)
class ReleaseMetadata:
    dataset_id: str
    neighbouring: str
    epsilon: float  # epsilon actually spent (<= target) at delta
    delta: float
    target_epsilon: float
    norm_bound: float
    second_moment_bound: float | None
    moments: int
    labelled: bool
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]  # C, H, W of the dataset's images (public format)
    encoder: EncoderSpec
    parts: tuple[PartRecord, ...]
    n_public: int | None = None  # only when the relation makes n public (replace-one)
    release_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    code_version: str = __version__
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        d = asdict(self)
        d["encoder"] = self.encoder.to_dict()
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ReleaseMetadata":
        try:
            d = json.loads(text)
            d["encoder"] = EncoderSpec.from_dict(d["encoder"])
            d["parts"] = tuple(PartRecord(**{**p, "shape": tuple(p["shape"])}) for p in d["parts"])
            d["class_names"] = tuple(d["class_names"])
            d["image_shape"] = tuple(d["image_shape"])
            return cls(**d)
        except (KeyError, TypeError, ValueError) as exc:
            raise ReleaseSchemaError(f"release metadata is malformed: {type(exc).__name__}: {exc}") from None

    def part(self, name: str) -> PartRecord:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)


@dataclass(frozen=True)
class Release:
    path: Path
    metadata: ReleaseMetadata
    noisy: dict[str, np.ndarray]  # the released arrays, by part name

    def mean_embeddings(self) -> dict[str, np.ndarray]:
        """Per-class mean embeddings (post-processing): {"moment1": K x D, ["moment2": K x D]}."""
        return mean_embeddings(self.noisy)


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float64).tobytes()).hexdigest()


def embedding_to_release(path: str | os.PathLike, metadata: ReleaseMetadata, noisy: dict[str, np.ndarray]) -> Path:
    """Write the release atomically; checksums of every array go into the metadata."""
    names = {p.name for p in metadata.parts}
    if set(noisy) != names:
        raise ValueError(f"arrays {sorted(noisy)} do not match metadata parts {sorted(names)}")
    parts = []
    for p in metadata.parts:
        arr = np.asarray(noisy[p.name], dtype=np.float64)
        if arr.shape != tuple(p.shape):
            raise ValueError(f"part {p.name} has shape {arr.shape}, metadata says {p.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"part {p.name} holds non-finite values; refusing to write a release")
        parts.append(PartRecord(**{**asdict(p), "shape": tuple(p.shape), "sha256": _sha256(arr)}))
    meta = ReleaseMetadata(**{**metadata.__dict__, "parts": tuple(parts)})
    text = meta.to_json()
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for p in meta.parts:
                f.create_dataset(p.name, data=np.asarray(noisy[p.name], dtype=np.float64))
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["metadata_json"] = text
            f.attrs["metadata_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return path


def read_release(path: str | os.PathLike) -> Release:
    """Read and fully validate a release; raise ReleaseCorruptError / ReleaseSchemaError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"release file {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: f.attrs[k] for k in f.attrs}
            arrays = {}
            for name in f:
                if name not in PART_NAMES:
                    raise ReleaseSchemaError(f"{path}: unexpected dataset {name!r}")
                ds = f[name]
                if not isinstance(ds, h5py.Dataset):
                    raise ReleaseSchemaError(f"{path}: {name!r} is not a dataset")
                if ds.dtype != np.float64:
                    raise ReleaseSchemaError(f"{path}: dataset {name!r} has dtype {ds.dtype}, expected float64")
                arrays[name] = ds[()]
    except ReleaseError:
        raise
    except Exception as exc:  # h5py raises OSError/KeyError/RuntimeError on damaged files
        raise ReleaseCorruptError(f"{path} is not a readable release file ({type(exc).__name__}: {exc})") from None
    try:
        meta = _validate(path, attrs, arrays)
    except ReleaseError:
        raise
    except Exception as exc:  # damaged attribute bytes: bad UTF-8, non-numeric version, ...
        raise ReleaseCorruptError(f"{path}: damaged metadata ({type(exc).__name__})") from None
    return Release(path, meta, arrays)


def _validate(path: Path, attrs: dict, arrays: dict[str, np.ndarray]) -> ReleaseMetadata:
    version = attrs.get("schema_version")
    if version is None or "metadata_json" not in attrs or "metadata_sha256" not in attrs:
        missing = [k for k in ("schema_version", "metadata_json", "metadata_sha256") if k not in attrs]
        raise ReleaseSchemaError(f"{path}: missing attribute(s) {', '.join(missing)}")
    if int(version) != SCHEMA_VERSION:
        raise ReleaseSchemaError(f"{path}: schema version {version} is not supported (expected {SCHEMA_VERSION})")
    text = attrs["metadata_json"]
    text = text.decode() if isinstance(text, bytes) else str(text)
    if hashlib.sha256(text.encode()).hexdigest() != str(attrs["metadata_sha256"]):
        raise ReleaseCorruptError(f"{path}: metadata checksum does not match")
    meta = ReleaseMetadata.from_json(text)
    for p in meta.parts:
        if p.name not in arrays:
            raise ReleaseSchemaError(f"{path}: dataset {p.name!r} is missing")
        if arrays[p.name].shape != tuple(p.shape):
            raise ReleaseSchemaError(f"{path}: dataset {p.name!r} has shape {arrays[p.name].shape}, expected {p.shape}")
        if _sha256(arrays[p.name]) != p.sha256:
            raise ReleaseCorruptError(f"{path}: checksum of dataset {p.name!r} does not match")
        if not np.all(np.isfinite(arrays[p.name])):
            raise ReleaseCorruptError(f"{path}: dataset {p.name!r} holds non-finite values")
    if set(arrays) != {p.name for p in meta.parts}:
        raise ReleaseSchemaError(f"{path}: datasets {sorted(arrays)} do not match metadata")
    expected = {"moment1", "counts"} | ({"moment2"} if meta.moments == 2 else set())
    if {p.name for p in meta.parts} != expected:
        raise ReleaseSchemaError(f"{path}: parts {sorted(arrays)} do not match moments={meta.moments}")
    k = meta.num_classes
    if arrays["counts"].shape != (k,) or arrays["moment1"].shape[0] != k:
        raise ReleaseSchemaError(f"{path}: array shapes do not match {k} classes")
    return meta
