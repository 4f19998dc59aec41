"""Which records a public reference split reads: the containment test behind `allow_private_reference`.

A reference is `DATASET[:test|train]` (the split defaults to test). Plain functions of the spec and
the file system, shared by the evaluate parameters (`storage.params.EvaluateParams`, which refuses
a private reference before any work) and the evaluation tasks (`tasks.evaluation`).
"""

from __future__ import annotations

import os
from pathlib import Path


def parse_reference(reference: str) -> tuple[str, str]:
    """'fashion-mnist:test' -> ('fashion-mnist', 'test'); the split defaults to test."""
    name, _, split = reference.rpartition(":") if reference.endswith((":test", ":train")) else (reference, "", "test")
    return name, split


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
