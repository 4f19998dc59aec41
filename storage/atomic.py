"""Atomic file writes: a temporary file in the target's folder, fsync, rename, fsync the folder.

A reader (or a crash) sees either the old file or the complete new one, never a partial one.

Two final steps:
- replace (default, checkpoints and tables): `os.replace(tmp, target)`, an existing target is
  replaced atomically;
- exclusive (releases): `os.link(tmp, target)`, which fails with EEXIST if anything (a file, a
  folder, even a dangling symlink) already has the name, so the final step never overwrites,
  however late another process created the target. On a file system without hard links the name
  is first claimed with `open(O_CREAT | O_EXCL)` and the complete file then renamed over that claim.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mepf_core.errors import MepfError, NotWritableError, PathNotFoundError

# errno values meaning "this file system cannot make hard links" (then the O_EXCL claim is used)
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV, errno.ENOSYS}


class TargetExistsError(MepfError, FileExistsError):
    """The target of an exclusive write exists (or was created by someone else during the write)."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _taken(target: Path) -> bool:
    return target.exists() or target.is_symlink()


def _commit_exclusive(tmp_path: Path, target: Path) -> None:
    """Give the complete `tmp_path` the name `target` only if that name is free (never overwrites)."""
    try:
        os.link(tmp_path, target, follow_symlinks=False)
    except FileExistsError:
        raise TargetExistsError(
            f"{target} was created by another writer while this one was writing; it is left untouched "
            "and nothing was written (files written exclusively are never overwritten)") from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        try:  # no hard links here: claim the name atomically, then rename the complete file over the claim
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            raise TargetExistsError(
                f"{target} was created by another writer while this one was writing; it is left untouched "
                "and nothing was written (files written exclusively are never overwritten)") from None
        os.replace(tmp_path, target)
        return
    tmp_path.unlink()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes `target`, on error it is removed.

    exclusive=False: an existing `target` is replaced atomically.
    exclusive=True: `target` must not exist, neither before (checked first, TargetExistsError) nor at
    the final step (checked atomically by the link itself, TargetExistsError); an existing file of
    that name is never touched. Raises FileNotFoundError / PermissionError for a missing or
    read-only folder.
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise PathNotFoundError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise NotWritableError(f"output folder {folder} is not writable")
    if exclusive and _taken(target):
        raise TargetExistsError(f"{target} already exists; files written exclusively are never overwritten")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        if exclusive:
            _commit_exclusive(tmp_path, target)
        else:
            os.replace(tmp_path, target)
        fsync_dir(folder)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: str | os.PathLike, data: bytes, *, exclusive: bool = False) -> None:
    with atomic_path(target, exclusive=exclusive) as tmp:
        tmp.write_bytes(data)
