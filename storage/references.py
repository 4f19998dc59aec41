"""Which records a public reference split reads: the containment test behind `allow_private_reference`.

A reference is `DATASET[:test|train|test-select|test-report]` (the split defaults to test). Plain
functions of the spec and the file system, shared by the evaluate parameters
(`storage.params.EvaluateParams`, which refuses a private reference before any work) and the
evaluation tasks (`tasks.evaluation`).

`test-select` and `test-report` are the two halves of the public test split, fixed once
(`split_half_indices`): choices (hyperparameters, checkpoints, classifier schedules) are made on the
selection half only and figures are reported on the report half only, so no reported figure has
been tuned on the images it is measured on (bench/README.md, quality).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mepf_core.errors import MepfError

TEST_HALVES = ("test-select", "test-report")
SPLIT_SEED = 15  # the seed of the one fixed test-split permutation; changing it changes every reported figure


def parse_reference_half(reference: str) -> tuple[str, str, str | None]:
    """'fashion-mnist:test-report' -> ('fashion-mnist', 'test', 'test-report'); 'mnist' -> ('mnist',
    'test', None). The split read from disk ('test' or 'train'), and the half of it, if any."""
    for half in TEST_HALVES:
        if reference.endswith(":" + half):
            return reference[: -len(half) - 1], "test", half
    name, _, split = reference.rpartition(":") if reference.endswith((":test", ":train")) else (reference, "", "test")
    return name, split, None


def parse_reference(reference: str) -> tuple[str, str]:
    """'fashion-mnist:test' -> ('fashion-mnist', 'test'); the split defaults to test; a half of the
    test split ('DATASET:test-select', 'DATASET:test-report') reads the test split."""
    name, split, _ = parse_reference_half(reference)
    return name, split


def split_half_indices(labels: np.ndarray | None, n: int, half: str) -> np.ndarray:
    """Sorted indices (int64) of the records of a test split of `n` records that form `half`.

    Stratified by class when `labels` (int, shape (n,)) are given: within each class, the class's
    records are permuted by a generator seeded with SPLIT_SEED and the first floor(n_c / 2) go to
    'test-select', the rest to 'test-report' (Fashion-MNIST's 1,000 test images per class: 500 and
    500). Without labels, one seeded permutation of all n records is halved the same way. The two
    halves are disjoint, cover the split, and are the same on every call and machine (numpy's
    PCG64 stream for a fixed seed). Raises ValueError for an unknown half or mismatched labels.
    """
    if half not in TEST_HALVES:
        raise ValueError(f"half must be one of {TEST_HALVES}, got {half!r}")
    rng = np.random.default_rng(SPLIT_SEED)
    if labels is None:
        groups = [np.arange(n)]
    else:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
        groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    chosen = []
    for members in groups:
        members = rng.permutation(members)
        cut = len(members) // 2
        chosen.append(members[:cut] if half == "test-select" else members[cut:])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def reference_records(source, reference: str, limit: int | None = None):
    """(images uint8 N x C x H x W, labels int64 (N,) or None) of reference split `reference`, read from
    `source` (its split opened by `storage.datasets.open_dataset`), the first `limit`.

    A half of the test split (`DATASET:test-select`, `DATASET:test-report`) is the whole test split
    indexed by `split_half_indices` (class-stratified, fixed seed), in file order.
    """
    half = parse_reference_half(reference)[2]
    if half is None:
        return source.load_all(limit)
    images, labels = source.load_all(None)
    keep = split_half_indices(labels, len(images), half)[:limit]
    return images[keep], None if labels is None else labels[keep]


def _training_folders(path: str) -> list[str]:
    """The resolved folders whose images a training (release) split of `imagefolder:PATH` reads.

    `PATH/train` when it exists. Otherwise the train split reads PATH itself (every visible subfolder
    a class), except in a split layout holding only `test/`: there the training records are the
    other visible subfolders of PATH, if any (a `test/` folder alone is a public test split).
    """
    from storage.datasets import is_hidden_name

    root = Path(path)
    if (root / "train").is_dir():
        return [os.path.realpath(root / "train")]
    if not (root / "test").is_dir():
        return [os.path.realpath(root)]
    return [os.path.realpath(d) for d in sorted(root.iterdir())
            if d.name != "test" and not is_hidden_name(d.name) and d.is_dir()]


def _overlaps(a: str, b: str) -> bool:
    """Whether resolved folder `a` contains `b`, or is contained in it (or is it)."""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def reads_training_records(reference: str, data_root: str | None = None) -> bool:
    """Whether `reference` reads (or may read) the records of a training split, which may be private.

    True for `X:train`. For `imagefolder:PATH[:test]` by containment, not by equality of ids: the
    folder the reference actually reads (resolved: symlinks and `..` followed, see
    `storage.datasets.imagefolder_root`) is private when it contains, is contained in, or is a
    training folder of PATH (`_training_folders`). So `imagefolder:data` and `imagefolder:data:test`
    when data/ holds only `train/` (the reference would read data/ with `train` as a class), a folder
    without `test/` (its test split is its training folder), and any spelling of `data/train` or of a
    class folder below it are all private; `imagefolder:data` with its own `data/test/` beside
    `data/train/` is not. `data_root` is accepted for symmetry with the loaders (named datasets'
    test splits are separate file sets wherever they live).
    """
    from storage.datasets import imagefolder_root

    name, split = parse_reference(reference)
    if split == "train":
        return True
    if not name.startswith("imagefolder:"):
        return False  # named datasets: the test split is a separate file set
    path = name.split(":", 1)[1]
    read = os.path.realpath(imagefolder_root(path, split))
    return any(_overlaps(read, folder) for folder in _training_folders(path))


# --- label spaces: the reference must describe what the synthetic dataset describes --------------------


class LabelSpaceMismatchError(MepfError, ValueError):
    """The reference split and the synthetic dataset differ in image shape, number of classes or class names."""


def reference_image_mode(reference: str, synthetic_shape) -> dict:
    """The image mode to open `reference` in, as `open_dataset` keyword arguments.

    An image folder is decoded at the synthetic images' shape (C, S, S) when that is a mode a release
    can have (channels 1 or 3, S in 28, 32, 64): the way the release decoded its own folder, so a
    test folder of the released data compares like with like. A named dataset keeps its own format
    ({}): a different shape is refused by `check_label_space`, never resized.
    """
    from storage.datasets import CHANNELS, IMAGE_SIZES

    name, _ = parse_reference(reference)
    shape = tuple(int(s) for s in synthetic_shape)
    if name.startswith("imagefolder:") and len(shape) == 3 and shape[0] in CHANNELS and shape[1] == shape[2] \
            and shape[1] in IMAGE_SIZES:
        return {"channels": shape[0], "image_size": shape[1]}
    return {}


def _shape_text(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _names_text(names) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:10])
    return f"[{shown}{', ...' if len(names) > 10 else ''}]"


def check_label_space(reference: str, reference_classes, reference_shape, synthetic_classes, synthetic_shape,
                      synthetic_name: str = "the synthetic dataset") -> None:
    """Refuse a reference that does not describe what the synthetic dataset describes, naming both sides.

    reference_classes: the reference split's class names (in label order); reference_shape and
    synthetic_shape: (C, H, W); synthetic_classes: the release's class names (label order), or None
    for an unlabelled synthetic dataset (then only the shape is compared). Checked: the image shape
    (FID and the classifiers compare images of one shape; nothing is resized or recoloured here), the
    number of classes and the names in label order (a label k must mean the same class on both sides).
    Raises LabelSpaceMismatchError.
    """
    ref_shape, syn_shape = tuple(int(s) for s in reference_shape), tuple(int(s) for s in synthetic_shape)
    if ref_shape != syn_shape:
        raise LabelSpaceMismatchError(
            f"image shapes differ: {synthetic_name} holds {_shape_text(syn_shape)} images (C x H x W), the reference "
            f"{reference} holds {_shape_text(ref_shape)}; evaluate against a split of the released dataset "
            "(images are never resized or recoloured to make them comparable)")
    if synthetic_classes is None:
        return
    syn, ref = tuple(synthetic_classes), tuple(reference_classes)
    if len(syn) != len(ref):
        raise LabelSpaceMismatchError(
            f"numbers of classes differ: {synthetic_name} has {len(syn)} classes {_names_text(syn)}, the reference "
            f"{reference} has {len(ref)} {_names_text(ref)}; evaluate against a split of the released dataset")
    if syn != ref:
        differ = [i for i, (a, b) in enumerate(zip(syn, ref)) if a != b]
        raise LabelSpaceMismatchError(
            f"class names differ (label {differ[0]}: {syn[differ[0]]!r} vs {ref[differ[0]]!r}): {synthetic_name} has "
            f"{_names_text(syn)}, the reference {reference} has {_names_text(ref)}; a label must mean the same class "
            "on both sides: evaluate against a split of the released dataset")
