"""The one base class of the project's user-facing errors, and the generic ones built on it.

Every error a user can cause (a bad argument, a missing or existing file, a spent budget, a corrupt
release) is a `MepfError`; the command line (`flows.cli.main`) prints such an error as one line and
exits with status 2 (with -v, after its traceback). Any other exception is a bug: it propagates with
its traceback.

Failures of the environment (permission denied, a read-only file system, a full disk, a file locked
by another process, an I/O error) arrive as `OSError`s with an `errno`; `file_access_error` turns one
into the matching `FileAccessError` whose message names the path, what happened and what to do. The
writers and readers that know which file they were handling call it (`storage.atomic.atomic_path`,
`storage.release.read_release`, ...); `flows.cli.main` calls it for any `OSError` that reaches it.
An `OSError` without an errno, or with one that does not describe the environment (EINVAL, EBADF,
...), is not mapped: it is a bug or a damaged file, and the caller decides.

Each subclass keeps the built-in base that callers already catch (`ValueError`, `FileNotFoundError`,
`PermissionError`, ...), so `except FileNotFoundError` and `pytest.raises(ValueError)` keep working.
This module imports only the standard library, so every package (`mepf_core`, `storage`, `tasks`,
`flows`) can import it.
"""

from __future__ import annotations

import errno as _errno
import os
import re


class MepfError(Exception):
    """Base of every user-facing error: the message says what was wrong and how to fix it."""


class InvalidArgumentError(MepfError, ValueError):
    """A value given by the user (option, parameter, file content it names) is out of its domain."""


class PathNotFoundError(MepfError, FileNotFoundError):
    """A file or folder the user named (input, output folder, key, ledger folder) does not exist."""


class PathExistsError(MepfError, FileExistsError):
    """A file the user asked to create already exists; outputs are never overwritten."""


class NotAFolderError(MepfError, NotADirectoryError):
    """A path the user gave as a folder (an output folder to create) is, or lies under, a file."""


class MissingExtraError(MepfError, ImportError):
    """A feature needs an optional extra that is not installed; the message names the `pip install
    'dp-mepf[EXTRA]'` command (pyproject.toml: `dask`, `mnist-subset`)."""


# --- the environment refused a file operation -------------------------------------------------------

class FileAccessError(MepfError, OSError):
    """The operating system refused a file operation: the input is fine, the environment is not.

    `errno` is the operating system's error number (None when the check was made without a failed
    call), `path` the file or folder concerned. `transient` says whether the same call may succeed
    later without the user changing anything (a full disk being cleaned, a lock released, a network
    share back): `tasks.retries` retries those, never the others.
    """

    transient = True


class PermissionDeniedError(FileAccessError, PermissionError):
    """EACCES / EPERM: this user may not read, create or change the file or folder."""

    transient = False


class NotWritableError(PermissionDeniedError):
    """A folder the user asked to write into is not writable (by this user)."""


class ReadOnlyFileSystemError(FileAccessError):
    """EROFS: the file system holding the path is mounted read-only."""

    transient = False


class DiskFullError(FileAccessError):
    """ENOSPC / EDQUOT / EFBIG: no room left for the file (device full, quota, file size limit)."""


class FileLockedError(FileAccessError, BlockingIOError):
    """EAGAIN / EWOULDBLOCK on a lock, ETXTBSY: another process holds the file (open for writing)."""


class PathIsAFolderError(FileAccessError, IsADirectoryError):
    """EISDIR: a file was expected, the path is a folder."""

    transient = False


_HDF5_LOCK_HINT = ("; HDF5_USE_FILE_LOCKING=FALSE turns HDF5's lock off, safe only where nothing can write the "
                   "file meanwhile (a read-only share)")

# errno -> (error class, what happened, what to do); "{path}" / "{folder}" are filled in.
_KINDS: dict[int, tuple[type[MepfError], str, str]] = {
    _errno.EACCES: (PermissionDeniedError, "permission denied",
                    "give this user access (`ls -ld {path}`, then chmod/chown), run as a user who has it, or use "
                    "another path"),
    _errno.EROFS: (ReadOnlyFileSystemError, "the file system is mounted read-only",
                   "write to a folder on a writable file system (choose another output path) or remount it "
                   "read-write"),
    _errno.ENOSPC: (DiskFullError, "no space left on the device",
                    "free space there (`df -h {folder}`) or write to another file system, then run again"),
    _errno.EDQUOT: (DiskFullError, "the disk quota is exceeded",
                    "free space within your quota (`quota -s`) or write to another file system, then run again"),
    _errno.EFBIG: (DiskFullError, "the file is larger than the file system or `ulimit -f` allows",
                   "raise the limit or write to another file system, then run again"),
    _errno.EAGAIN: (FileLockedError, "it is locked by another process (which has it open for writing)",
                    "wait for that process to finish or close the file (`fuser -v {path}` names it), then run "
                    "again"),
    _errno.ETXTBSY: (FileLockedError, "it is busy (in use by another process)",
                     "wait for that process to finish (`fuser -v {path}` names it), then run again"),
    _errno.ENOLCK: (FileAccessError, "the file system does not support file locks",
                    "copy the file to a local disk and use the copy"),
    _errno.ENOENT: (PathNotFoundError, "it does not exist (removed or renamed meanwhile?)", "check the path"),
    _errno.ENOTDIR: (NotAFolderError, "a part of the path is a file, not a folder", "check the path"),
    _errno.EISDIR: (PathIsAFolderError, "it is a folder, not a file", "name a file"),
    _errno.EEXIST: (PathExistsError, "it already exists", "choose another name; outputs are never overwritten"),
    _errno.ENAMETOOLONG: (FileAccessError, "the name is too long for the file system", "use a shorter path"),
    _errno.ELOOP: (FileAccessError, "too many levels of symbolic links", "check the links on the path"),
    _errno.EMFILE: (FileAccessError, "this process has too many open files",
                    "raise the limit (`ulimit -n 4096`), then run again"),
    _errno.ENFILE: (FileAccessError, "the system has too many open files",
                    "close other programs or raise the system limit (fs.file-max), then run again"),
    _errno.EIO: (FileAccessError, "an input/output error (the disk or network share failed)",
                 "check the device (`dmesg`) or the share, then run again"),
    _errno.ESTALE: (FileAccessError, "a stale file handle (the network share was remounted or the file replaced)",
                    "run again"),
    _errno.ENOTCONN: (FileAccessError, "the mount is not connected (a network or FUSE file system went away)",
                      "remount it, then run again"),
}
_KINDS[_errno.EPERM] = _KINDS[_errno.EACCES]
_KINDS[_errno.EWOULDBLOCK] = _KINDS[_errno.EAGAIN]
_NOT_TRANSIENT = {_errno.ENOLCK, _errno.ENAMETOOLONG, _errno.ELOOP, _errno.EMFILE, _errno.ENFILE}

# h5py's OSError messages name the file inside HDF5's error text: "... name = '/x/r.h5', errno = 13 ..."
_HDF5_NAME = re.compile(r"(?:file)?name = '([^']+)'")


def _path_of(exc: OSError) -> str | None:
    if exc.filename is not None:
        return os.fsdecode(exc.filename)
    found = _HDF5_NAME.search(str(exc))
    return found.group(1) if found else None


def file_access_error(exc: OSError, what: str | None = None, path: str | os.PathLike | None = None) -> MepfError | None:
    """The one-line user error for an `OSError` caused by the environment, or None when it is not one.

    exc: the OSError (with `errno` set: h5py, pyarrow, torch given a file object and the standard
    library all set it). what: the operation and its path as the user knows it, e.g. "cannot write
    release /data/r.h5" (default: "cannot access PATH"); path: the file concerned (default: the
    error's filename, or the name in h5py's message), used in the advice. The message is
    "WHAT: WHAT HAPPENED [ERRNO NAME]; WHAT TO DO" on one line. Returns None for an errno that does
    not describe the environment (EINVAL, EBADF, ..., or none): the caller keeps the original.
    A lock error (EAGAIN) is mapped only when the error speaks of a lock; an unsupported lock (ENOSYS
    from a lock call) is mapped as ENOLCK.
    """
    code = exc.errno
    text = str(exc).lower()
    if code == _errno.ENOSYS and "lock" in text:
        code = _errno.ENOLCK
    if code == _errno.EAGAIN and "lock" not in text:
        return None  # "resource temporarily unavailable" from a fork or a non-blocking pipe: not a file lock
    if code not in _KINDS:
        return None
    cls, happened, todo = _KINDS[code]
    path = os.fspath(path) if path is not None else _path_of(exc)
    folder = os.path.dirname(path) or "." if path else "."
    todo = todo.format(path=path or "FILE", folder=folder)
    hdf5 = "hdf5" in text or "synchronously" in text or "unable to lock file" in text
    if code in (_errno.EAGAIN, _errno.ENOLCK) and hdf5:
        todo += _HDF5_LOCK_HINT
    what = what or f"cannot access {path if path else 'a file'}"
    error = cls(f"{what}: {happened} [{_errno.errorcode.get(code, code)}]; {todo}")
    error.errno = code
    error.path = path
    if isinstance(error, FileAccessError) and code in _NOT_TRANSIENT:
        error.transient = False
    return error
