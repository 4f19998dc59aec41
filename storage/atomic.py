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

from mepf_core.errors import (MepfError, NotWritableError, PathNotFoundError, PermissionDeniedError,
                              ReadOnlyFileSystemError, file_access_error)

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


def check_writable_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Fail before any work if `folder` cannot receive a new file; creates nothing. Returns it as a Path.

    Raises PathNotFoundError (no such folder), ReadOnlyFileSystemError (the file system is mounted
    read-only: `statvfs` says so, for every user, root included) or NotWritableError (this user may
    not create files there; root may everywhere). A full disk cannot be told in advance: see
    `storage.release.check_room_for_release` for a file of known size.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PathNotFoundError(f"{what} {folder} does not exist")
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise ReadOnlyFileSystemError(
            f"cannot create files in {what} {folder}: the file system is mounted read-only [EROFS]; write to a "
            "folder on a writable file system (choose another output path) or remount it read-write")
    if not os.access(folder, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise NotWritableError(
            f"cannot create files in {what} {folder}: permission denied [EACCES]; give this user access "
            f"(`ls -ld {folder}`, then chmod/chown), run as a user who has it, or choose another output path")
    return folder


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """Fail before any work if `path` (an existing file to append to, or a new file) cannot be written.

    A missing `path` needs a writable folder (`check_writable_folder`, "WHAT folder"); an existing
    one needs a writable file system and write permission on the file itself. Raises
    PathNotFoundError, ReadOnlyFileSystemError or PermissionDeniedError; creates nothing.
    """
    path = Path(path)
    if not path.exists():
        check_writable_folder(path.parent if str(path.parent) else Path("."), f"{what} folder")
        return path
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        raise ReadOnlyFileSystemError(
            f"cannot write {what} {path}: the file system is mounted read-only [EROFS]; move it to a writable "
            "file system or remount it read-write")
    if not os.access(path, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
        raise PermissionDeniedError(
            f"cannot write {what} {path}: permission denied [EACCES]; give this user write access "
            f"(`ls -l {path}`, then chmod/chown) or run as its owner")
    return path


def _mapped(exc: OSError, what: str, path: Path) -> BaseException:
    """`exc` as the user error naming `what` (mepf_core.errors.file_access_error), or `exc` itself."""
    if isinstance(exc, MepfError):
        return exc
    return file_access_error(exc, what, path) or exc


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes `target`, on error it is removed.

    exclusive=False: an existing `target` is replaced atomically.
    exclusive=True: `target` must not exist, neither before (checked first, TargetExistsError) nor at
    the final step (checked atomically by the link itself, TargetExistsError); an existing file of
    that name is never touched.
    Raises PathNotFoundError / ReadOnlyFileSystemError / NotWritableError for a missing, read-only or
    unwritable folder (`check_writable_folder`), before the body runs. An OSError of the environment
    raised while writing (by the body, fsync or the final rename: a full disk, a lost permission, an
    I/O error) becomes the matching `mepf_core.errors.FileAccessError` ("writing TARGET failed,
    nothing was written: ..."), chained to the original; the temporary file is removed and `target`
    is left as it was. Any other exception propagates unchanged.
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    check_writable_folder(folder)
    if exclusive and _taken(target):
        raise TargetExistsError(f"{target} already exists; files written exclusively are never overwritten")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _mapped(exc, f"cannot create a file in output folder {folder}", target) from exc
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
    except OSError as exc:
        with contextlib.suppress(OSError):  # the folder may have become unwritable: best effort
            tmp_path.unlink(missing_ok=True)
        mapped = _mapped(exc, f"writing {target} failed, nothing was written", target)
        if mapped is exc:
            raise
        raise mapped from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: str | os.PathLike, data: bytes, *, exclusive: bool = False) -> None:
    with atomic_path(target, exclusive=exclusive) as tmp:
        tmp.write_bytes(data)
