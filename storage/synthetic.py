"""Synthetic-dataset files: the generator's samples plus what they are (budget, release, encoder).

Two formats, chosen by extension:

- ``.h5``: datasets ``images`` (uint8, N x C x H x W) and, when labelled, ``labels`` (int64, N);
  the metadata as JSON in the file attribute ``metadata_json``.
- ``.parquet``: one row per image. Column ``image`` holds a lossless PNG (grayscale for C = 1, RGB
  for C = 3) so any Parquet reader can view the data; column ``label`` (int64) exists only for
  labelled data. The metadata JSON is in the schema metadata under ``metadata_json``, the image
  shape (C, H, W) under ``image_shape``.

The metadata is a storage.provenance.SyntheticInfo (the release's claim and id, the encoder's name,
the class names, the training steps, the checkpoint and seed): checked on writing and on reading, so a
file lacking a field is refused with ProvenanceError instead of being read with a made-up value.
Both are written atomically (temporary file in the same folder, fsync, rename).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mepf_core.errors import InvalidArgumentError, PathNotFoundError
from storage.atomic import atomic_path
from storage.provenance import SyntheticInfo

METADATA_KEYS = SyntheticInfo.REQUIRED  # ("epsilon", "delta", "release_id", "encoder", "class_names", "steps")
SUFFIXES = (".h5", ".parquet")
_META_ATTR = "metadata_json"
_SHAPE_KEY = "image_shape"


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InvalidArgumentError(f"synthetic dataset must end in one of {SUFFIXES}, got {path.name!r}")
    return suffix


@dataclass(frozen=True)
class SyntheticDataset:
    """A synthetic dataset read back: images uint8 (N x C x H x W), labels int64 (N,) or None, provenance."""

    images: np.ndarray
    labels: np.ndarray | None
    info: SyntheticInfo


def quantise(images) -> np.ndarray:
    """Generator images in [0, 1] (float torch tensor or array, N x C x H x W) -> uint8 pixels.

    Each value becomes round(255 x) (half to even), clipped to [0, 255]: the one quantisation of
    synthetic data, so an image written to .h5 and to .parquet holds the same pixels.
    """
    import torch

    tensor = torch.as_tensor(images).detach().cpu()
    if not tensor.is_floating_point():
        raise InvalidArgumentError(f"images to quantise must be floating point in [0, 1], got {tensor.dtype}")
    return (tensor * 255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def _validate(images: np.ndarray, labels, info: SyntheticInfo) -> tuple[np.ndarray, np.ndarray | None]:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 numpy array, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be N x C x H x W with C in {{1, 3}}, got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image, got 0")
    if labels is None:
        return images, None
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},) to match images, got {labels.shape}")
    if labels.min() < 0:
        raise ValueError(f"labels must be non-negative, got {int(labels.min())}")
    class_names = info.class_names
    if class_names is not None and labels.max() >= len(class_names):
        raise ValueError(f"label {int(labels.max())} has no entry in class_names ({len(class_names)} names)")
    return images, labels.astype(np.int64)


def _metadata_json(info: SyntheticInfo) -> str:
    try:
        return json.dumps(info.to_dict(), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"metadata must be JSON-serialisable with finite numbers: {err}") from err


def write_synthetic(path: str | os.PathLike, images: np.ndarray, labels,
                    metadata: SyntheticInfo | Mapping) -> Path:
    """Write a synthetic dataset (format by extension) atomically; returns the path.

    images: uint8 N x C x H x W (C in {1, 3}); labels: integers (N,) indexing class_names, or None;
    metadata: a SyntheticInfo, or a mapping with its keys (ProvenanceError when one is missing).
    Raises InvalidArgumentError (ValueError) for bad input; nothing is written then.
    """
    path = Path(path)
    suffix = _suffix(path)
    info = metadata if isinstance(metadata, SyntheticInfo) else SyntheticInfo.from_dict(metadata)
    images, labels = _validate(images, labels, info)
    meta_json = _metadata_json(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if suffix == ".h5":
            _write_h5(tmp, images, labels, meta_json)
        else:
            _write_parquet(tmp, images, labels, meta_json)
    return path


def read_synthetic(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Read (images uint8 N x C x H x W, labels int64 N or None, metadata dict: SyntheticInfo.to_dict())."""
    data = read_synthetic_dataset(path)
    return data.images, data.labels, data.info.to_dict()


def read_synthetic_dataset(path: str | os.PathLike) -> SyntheticDataset:
    """Read a synthetic dataset with its typed provenance; ProvenanceError when its metadata lacks a field."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise PathNotFoundError(f"synthetic dataset {path} does not exist")
    images, labels, metadata = _read_h5(path) if suffix == ".h5" else _read_parquet(path)
    return SyntheticDataset(images, labels, SyntheticInfo.from_dict(metadata, where=f"{path}: metadata"))


# --- HDF5 -------------------------------------------------------------------------------------


def _write_h5(tmp: Path, images: np.ndarray, labels, meta_json: str) -> None:
    import h5py

    with h5py.File(tmp, "w") as f:
        chunks = (min(len(images), 256), *images.shape[1:])
        f.create_dataset("images", data=images, compression="gzip", chunks=chunks)
        if labels is not None:
            f.create_dataset("labels", data=labels)
        f.attrs[_META_ATTR] = meta_json


def _read_h5(path: Path):
    import h5py

    with h5py.File(path, "r") as f:
        if "images" not in f or _META_ATTR not in f.attrs:
            raise InvalidArgumentError(f"{path} is not a synthetic dataset (needs 'images' and '{_META_ATTR}')")
        images = f["images"][...]
        labels = f["labels"][...].astype(np.int64) if "labels" in f else None
        metadata = json.loads(f.attrs[_META_ATTR])
    if images.dtype != np.uint8 or images.ndim != 4:
        raise InvalidArgumentError(f"{path}: images must be uint8 N x C x H x W, got {images.dtype} {images.shape}")
    if labels is not None and labels.shape != (images.shape[0],):
        raise InvalidArgumentError(f"{path}: {labels.shape[0]} labels for {images.shape[0]} images")
    return images, labels, metadata


# --- Parquet ----------------------------------------------------------------------------------


def _encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    pil = Image.fromarray(image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0)))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def _decode_png(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    from PIL import Image

    array = np.asarray(Image.open(io.BytesIO(data)))
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    if array.shape != shape or array.dtype != np.uint8:
        raise InvalidArgumentError(f"PNG decodes to {array.dtype} {array.shape}, expected uint8 {shape}")
    return array


def _write_parquet(tmp: Path, images: np.ndarray, labels, meta_json: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"image": pa.array([_encode_png(im) for im in images], type=pa.binary())}
    if labels is not None:
        columns["label"] = pa.array(labels, type=pa.int64())
    schema_meta = {_META_ATTR: meta_json, _SHAPE_KEY: json.dumps(list(images.shape[1:]))}
    table = pa.table(columns).replace_schema_metadata(schema_meta)
    pq.write_table(table, tmp)


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    if not {_META_ATTR.encode(), _SHAPE_KEY.encode()} <= set(meta) or "image" not in table.column_names:
        raise InvalidArgumentError(f"{path} is not a synthetic dataset (needs column 'image' and schema metadata)")
    if table.num_rows == 0:
        raise InvalidArgumentError(f"{path} holds no images")
    shape = tuple(json.loads(meta[_SHAPE_KEY.encode()]))
    images = np.stack([_decode_png(b, shape) for b in table.column("image").to_pylist()])
    labels = None
    if "label" in table.column_names:
        column = table.column("label")
        if column.null_count:
            raise InvalidArgumentError(f"{path}: column 'label' has {column.null_count} missing values")
        labels = column.to_numpy().astype(np.int64)
    return images, labels, json.loads(meta[_META_ATTR.encode()])
