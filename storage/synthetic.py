"""Synthetic-dataset files: the generator's samples plus what they are (budget, release, encoder).

Four formats, chosen by the output path (`export_format`): a path ending in `/` (or an existing
folder) is an image folder, otherwise the extension decides. Each carries the provenance, a
storage.provenance.SyntheticInfo, as JSON under the name ``metadata_json`` (or in `provenance.json`):

- ``.h5``: datasets ``images`` (uint8, N x C x H x W) and, when labelled, ``labels`` (int64, N);
  the metadata in the file attribute ``metadata_json``.
- ``.parquet``: one row per image, the layout Hugging Face ``datasets`` reads as an Image feature.
  Column ``image`` is the struct ``{bytes: binary, path: string}`` holding a lossless PNG (grayscale
  for C = 1, RGB for C = 3) and its file name (``000123.png``, the row index); column ``label``
  (int64) exists only for labelled data. Schema metadata: ``metadata_json``, ``image_shape`` (C, H, W
  as JSON) and ``huggingface`` (the ``datasets`` features: ``Image`` and ``ClassLabel`` with the
  class names), so ``datasets.load_dataset("parquet", data_files=...)`` decodes images and knows the
  label names. Files of the first layout (column ``image`` of raw PNG bytes) are still read.
- ``.npz`` (``numpy.load``, no pickle needed): ``x`` uint8 N x H x W x C (channels last, C in {1, 3});
  labelled only: ``y`` int64 (N,) and ``class_names`` (unicode, K). Unlabelled data has no ``y``
  (rather than a column of -1s a training loop would silently accept). ``metadata_json`` is a 0-d
  unicode array: ``json.loads(str(data["metadata_json"]))``.
- image folder ``DIR/`` (torchvision ``ImageFolder``, Hugging Face ``imagefolder``): one subfolder
  per class, named after the class (``class_folder_names``: path separators and characters Windows
  forbids become ``_``, e.g. Fashion-MNIST's ``T-shirt/top`` -> ``T-shirt_top``), holding PNGs named
  by the image's row index (``000123.png``), so reading the folder back restores the order; a class
  that drew no image has no folder (ImageFolder refuses empty class folders, and numbers the classes
  it finds in sorted order: map them with ``dataset.classes``). Unlabelled data: one folder,
  ``unlabelled``. ``DIR/provenance.json`` holds ``metadata`` (the SyntheticInfo), ``image_shape``,
  ``class_folders`` (label k's folder name), ``count`` and ``labelled``.

The metadata is checked on writing and on reading, so a file lacking a field is refused with
ProvenanceError instead of being read with a made-up value. Files are written atomically (temporary
file in the same folder, fsync, rename); an image folder is built in a temporary sibling folder and
renamed into place complete (it replaces only an empty folder or an earlier synthetic image folder,
recognised by its provenance.json; the PNGs are not fsynced one by one).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mepf_core.errors import InvalidArgumentError, NotWritableError, PathExistsError, PathNotFoundError
from storage.atomic import atomic_path, fsync_dir
from storage.provenance import SyntheticInfo

METADATA_KEYS = SyntheticInfo.REQUIRED  # ("epsilon", "delta", "release_id", "encoder", "class_names", "steps")
SUFFIXES = (".h5", ".parquet", ".npz")
FOLDER = "folder"  # export_format's name for an image folder
FORMATS = (*SUFFIXES, FOLDER)
PROVENANCE_FILE = "provenance.json"  # an image folder's provenance
UNLABELLED_FOLDER = "unlabelled"
_FOLDER_KIND = "dp-mepf synthetic image folder"
_META_ATTR = "metadata_json"
_SHAPE_KEY = "image_shape"
_HF_KEY = "huggingface"


def export_format(path: str | os.PathLike) -> str:
    """The format a synthetic-dataset path names: ".h5", ".parquet", ".npz", or FOLDER ("folder") for a
    path ending in "/" or an existing folder. Raises InvalidArgumentError for anything else."""
    text = os.fspath(path)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return FOLDER
    suffix = Path(text).suffix.lower()
    if suffix not in SUFFIXES:
        raise InvalidArgumentError(
            f"synthetic dataset must end in one of {SUFFIXES} or '/' (an image folder), got {Path(text).name!r}")
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
    synthetic data, so an image written in any format holds the same pixels.
    """
    import torch

    tensor = torch.as_tensor(images).detach().cpu()
    if not tensor.is_floating_point():
        raise InvalidArgumentError(f"images to quantise must be floating point in [0, 1], got {tensor.dtype}")
    return (tensor * 255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def class_folder_names(class_names: tuple[str, ...] | list[str] | None) -> list[str]:
    """One folder name per class, in label order (["unlabelled"] when class_names is None).

    A name keeps its characters except path separators, control characters and those Windows forbids
    (<>:"/\\|?*), which become "_"; leading dots and spaces are dropped (no hidden folders, no "..");
    an empty result becomes "class_K"; a name taken by an earlier class gets "_2", "_3"...
    """
    if class_names is None:
        return [UNLABELLED_FOLDER]
    out: list[str] = []
    for k, name in enumerate(class_names):
        clean = re.sub(r'[\x00-\x1f<>:"/\\|?*]', "_", name).lstrip(". ").rstrip(" ") or f"class_{k}"
        candidate, i = clean, 2
        while candidate.lower() in {o.lower() for o in out}:  # case-insensitive file systems
            candidate, i = f"{clean}_{i}", i + 1
        out.append(candidate)
    return out


def _validate(images: np.ndarray, labels, info: SyntheticInfo) -> tuple[np.ndarray, np.ndarray | None]:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise InvalidArgumentError(f"images must be a uint8 numpy array, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InvalidArgumentError(f"images must be N x C x H x W with C in {{1, 3}}, got shape {images.shape}")
    if images.shape[0] == 0:
        raise InvalidArgumentError("images must hold at least one image, got 0")
    if labels is None:
        return images, None
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise InvalidArgumentError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.shape != (images.shape[0],):
        raise InvalidArgumentError(f"labels must have shape ({images.shape[0]},) to match images, got {labels.shape}")
    if labels.min() < 0:
        raise InvalidArgumentError(f"labels must be non-negative, got {int(labels.min())}")
    class_names = info.class_names
    if class_names is not None and labels.max() >= len(class_names):
        raise InvalidArgumentError(f"label {int(labels.max())} has no entry in class_names ({len(class_names)} names)")
    return images, labels.astype(np.int64)


def _metadata_json(info: SyntheticInfo) -> str:
    try:
        return json.dumps(info.to_dict(), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(f"metadata must be JSON-serialisable with finite numbers: {err}") from err


def write_synthetic(path: str | os.PathLike, images: np.ndarray, labels,
                    metadata: SyntheticInfo | Mapping) -> Path:
    """Write a synthetic dataset (format by `export_format(path)`) atomically; returns the path.

    images: uint8 N x C x H x W (C in {1, 3}); labels: integers (N,) indexing class_names, or None;
    metadata: a SyntheticInfo, or a mapping with its keys (ProvenanceError when one is missing).
    Raises InvalidArgumentError (ValueError) for bad input, PathNotFoundError / NotWritableError for a
    missing or read-only parent folder, PathExistsError for an image folder that would replace a
    non-empty folder other than an earlier synthetic export; nothing is written then.
    """
    fmt = export_format(path)
    path = Path(path)
    info = metadata if isinstance(metadata, SyntheticInfo) else SyntheticInfo.from_dict(metadata)
    images, labels = _validate(images, labels, info)
    meta_json = _metadata_json(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == FOLDER:
        _write_folder(path, images, labels, info, meta_json)
        return path
    with atomic_path(path) as tmp:
        if fmt == ".h5":
            _write_h5(tmp, images, labels, meta_json)
        elif fmt == ".parquet":
            _write_parquet(tmp, images, labels, info, meta_json)
        else:
            _write_npz(tmp, images, labels, info, meta_json)
    return path


def read_synthetic(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Read (images uint8 N x C x H x W, labels int64 N or None, metadata dict: SyntheticInfo.to_dict())."""
    data = read_synthetic_dataset(path)
    return data.images, data.labels, data.info.to_dict()


def read_synthetic_dataset(path: str | os.PathLike) -> SyntheticDataset:
    """Read a synthetic dataset in any of the four formats with its typed provenance.

    Raises InvalidArgumentError for a path naming no format or a file that is not a synthetic dataset,
    PathNotFoundError when it does not exist, ProvenanceError when its metadata lacks a field.
    """
    fmt = export_format(path)
    path = Path(path)
    if not (path.is_dir() if fmt == FOLDER else path.is_file()):
        raise PathNotFoundError(f"synthetic dataset {path} does not exist")
    reader = {".h5": _read_h5, ".parquet": _read_parquet, ".npz": _read_npz, FOLDER: _read_folder}[fmt]
    images, labels, metadata = reader(path)
    return SyntheticDataset(images, labels, SyntheticInfo.from_dict(metadata, where=f"{path}: metadata"))


def _check_read(path: Path, images: np.ndarray, labels: np.ndarray | None) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InvalidArgumentError(f"{path}: images must be uint8 N x C x H x W (C 1 or 3), got {images.dtype} "
                                   f"{images.shape}")
    if labels is not None and labels.shape != (images.shape[0],):
        raise InvalidArgumentError(f"{path}: {labels.shape} labels for {images.shape[0]} images")


def _json(text, path: Path, what: str):
    try:
        return json.loads(text)
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"{path}: {what} is not valid JSON ({exc})") from None


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
        metadata = _json(f.attrs[_META_ATTR], path, _META_ATTR)
    _check_read(path, images, labels)
    return images, labels, metadata


# --- PNG (Parquet and image folders) ------------------------------------------------------------


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


def _file_names(n: int) -> list[str]:
    """Row index i -> "000123.png" (at least 6 digits, zero-padded so names sort in row order)."""
    width = max(6, len(str(n - 1)))
    return [f"{i:0{width}d}.png" for i in range(n)]


# --- Parquet ----------------------------------------------------------------------------------


def huggingface_features(class_names: tuple[str, ...] | None) -> dict:
    """The Hugging Face `datasets` features of our Parquet layout (as `datasets.Features.to_dict()` writes
    them): image -> Image, label -> ClassLabel with the class names (labelled data only)."""
    features: dict = {"image": {"_type": "Image"}}
    if class_names is not None:
        features["label"] = {"names": list(class_names), "_type": "ClassLabel"}
    return features


def _write_parquet(tmp: Path, images: np.ndarray, labels, info: SyntheticInfo, meta_json: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"bytes": _encode_png(im), "path": name} for im, name in zip(images, _file_names(len(images)))]
    columns = {"image": pa.array(rows, type=image_type)}
    if labels is not None:
        columns["label"] = pa.array(labels, type=pa.int64())
    hf = {"info": {"features": huggingface_features(info.class_names if labels is not None else None)}}
    schema_meta = {_META_ATTR: meta_json, _SHAPE_KEY: json.dumps(list(images.shape[1:])), _HF_KEY: json.dumps(hf)}
    table = pa.table(columns).replace_schema_metadata(schema_meta)
    pq.write_table(table, tmp)


def _read_parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    if not {_META_ATTR.encode(), _SHAPE_KEY.encode()} <= set(meta) or "image" not in table.column_names:
        raise InvalidArgumentError(f"{path} is not a synthetic dataset (needs column 'image' and schema metadata)")
    if table.num_rows == 0:
        raise InvalidArgumentError(f"{path} holds no images")
    shape = tuple(_json(meta[_SHAPE_KEY.encode()], path, _SHAPE_KEY))
    column = table.column("image").combine_chunks()
    if pa.types.is_struct(column.type):  # {bytes, path}: the Hugging Face Image layout
        column = column.field("bytes")
    elif not pa.types.is_binary(column.type):  # the first layout held raw PNG bytes
        raise InvalidArgumentError(f"{path}: column 'image' must be binary or {{bytes, path}}, got {column.type}")
    if column.null_count:
        raise InvalidArgumentError(f"{path}: column 'image' has {column.null_count} missing images")
    images = np.stack([_decode_png(b, shape) for b in column.to_pylist()])
    labels = None
    if "label" in table.column_names:
        label_column = table.column("label")
        if label_column.null_count:
            raise InvalidArgumentError(f"{path}: column 'label' has {label_column.null_count} missing values")
        labels = label_column.to_numpy().astype(np.int64)
    _check_read(path, images, labels)
    return images, labels, _json(meta[_META_ATTR.encode()], path, _META_ATTR)


# --- NumPy .npz -------------------------------------------------------------------------------------


def _write_npz(tmp: Path, images: np.ndarray, labels, info: SyntheticInfo, meta_json: str) -> None:
    arrays = {"x": np.ascontiguousarray(images.transpose(0, 2, 3, 1)), _META_ATTR: np.array(meta_json)}
    if labels is not None:
        arrays["y"] = labels
        if info.class_names is not None:
            arrays["class_names"] = np.array(list(info.class_names), dtype=str)
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
        np.savez_compressed(f, **arrays)


def _read_npz(path: Path):
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files or _META_ATTR not in data.files:
                raise InvalidArgumentError(f"{path} is not a synthetic dataset (needs arrays 'x' and '{_META_ATTR}')")
            x = data["x"]
            labels = data["y"].astype(np.int64) if "y" in data.files else None
            metadata = _json(str(data[_META_ATTR]), path, _META_ATTR)
    except (ValueError, OSError) as exc:  # not a zip, or an object array (pickle refused)
        if isinstance(exc, InvalidArgumentError):
            raise
        raise InvalidArgumentError(f"{path} is not a readable .npz synthetic dataset ({exc})") from None
    if x.ndim != 4:
        raise InvalidArgumentError(f"{path}: x must be N x H x W x C, got shape {x.shape}")
    images = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    _check_read(path, images, labels)
    return images, labels, metadata


# --- image folder -----------------------------------------------------------------------------------


def _write_folder(target: Path, images: np.ndarray, labels, info: SyntheticInfo, meta_json: str) -> None:
    parent = target.parent
    if not os.access(parent, os.W_OK):
        raise NotWritableError(f"output folder {parent} is not writable")
    replaces = False
    if target.exists() or target.is_symlink():
        if target.is_symlink() or not target.is_dir():
            raise PathExistsError(f"{target} exists and is not a folder; an image-folder export needs a new or "
                                  "empty folder")
        replaces = any(target.iterdir())
        if replaces and not (target / PROVENANCE_FILE).is_file():
            raise PathExistsError(f"{target} is not empty and is not a synthetic image folder (no {PROVENANCE_FILE}); "
                                  "choose a new or empty folder")
    if labels is None:
        folders = class_folder_names(None)
    elif info.class_names is None:  # labels without names (written by other code): class_0, class_1, ...
        folders = [f"class_{k}" for k in range(int(labels.max()) + 1)]
    else:
        folders = class_folder_names(info.class_names)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        tags = labels if labels is not None else np.zeros(len(images), dtype=np.int64)
        for k in np.unique(tags):
            (tmp / folders[k]).mkdir()
        for image, k, name in zip(images, tags, _file_names(len(images))):
            (tmp / folders[k] / name).write_bytes(_encode_png(image))
        record = {"format": _FOLDER_KIND, "metadata": json.loads(meta_json), _SHAPE_KEY: list(images.shape[1:]),
                  "class_folders": folders, "count": int(len(images)), "labelled": labels is not None}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        if replaces:  # move the earlier export aside, put the new one in place, then delete the old one
            old = parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)  # replaces an empty folder (POSIX)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_folder(path: Path):
    record_path = path / PROVENANCE_FILE
    if not record_path.is_file():
        raise InvalidArgumentError(f"{path} is not a synthetic image folder (no {PROVENANCE_FILE})")
    record = _json(record_path.read_text(), record_path, PROVENANCE_FILE)
    keys = ("metadata", _SHAPE_KEY, "class_folders", "count", "labelled")
    if not isinstance(record, dict) or any(k not in record for k in keys):
        raise InvalidArgumentError(f"{record_path} must be a JSON object with {list(keys)}")
    shape, folders, count = tuple(record[_SHAPE_KEY]), record["class_folders"], record["count"]
    metadata = record["metadata"]
    labelled = record["labelled"] is True
    found: dict[int, tuple[Path, int]] = {}
    for k, folder in enumerate(folders):
        if not isinstance(folder, str) or folder != Path(folder).name or folder in ("", ".", ".."):
            raise InvalidArgumentError(f"{record_path}: class folder {folder!r} is not a plain folder name")
        for f in sorted((path / folder).glob("*.png")) if (path / folder).is_dir() else ():
            if not f.stem.isdigit() or int(f.stem) in found:
                raise InvalidArgumentError(f"{f}: image files must be named by a unique row index (000123.png)")
            found[int(f.stem)] = (f, k)
    if sorted(found) != list(range(count)) or count == 0:
        raise InvalidArgumentError(f"{path}: holds {len(found)} images numbered {min(found, default=None)}.."
                                   f"{max(found, default=None)}, {PROVENANCE_FILE} says {count} (0..{count - 1})")
    images = np.stack([_decode_png(found[i][0].read_bytes(), shape) for i in range(count)])
    labels = np.array([found[i][1] for i in range(count)], dtype=np.int64) if labelled else None
    _check_read(path, images, labels)
    return images, labels, metadata
