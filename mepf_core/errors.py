"""The one base class of the project's user-facing errors, and the generic ones built on it.

Every error a user can cause (a bad argument, a missing or existing file, a spent budget, a corrupt
release) is a `MepfError`; the command line (`flows.cli.main`) prints such an error as one line and
exits with status 2. Any other exception is a bug: it propagates with its traceback.

Each subclass keeps the built-in base that callers already catch (`ValueError`, `FileNotFoundError`,
...), so `except FileNotFoundError` and `pytest.raises(ValueError)` keep working. This module imports
nothing, so every package (`mepf_core`, `storage`, `tasks`, `flows`) can import it.
"""

from __future__ import annotations


class MepfError(Exception):
    """Base of every user-facing error: the message says what was wrong and how to fix it."""


class InvalidArgumentError(MepfError, ValueError):
    """A value given by the user (option, parameter, file content it names) is out of its domain."""


class PathNotFoundError(MepfError, FileNotFoundError):
    """A file or folder the user named (input, output folder, key, ledger folder) does not exist."""


class PathExistsError(MepfError, FileExistsError):
    """A file the user asked to create already exists; outputs are never overwritten."""


class NotWritableError(MepfError, PermissionError):
    """A folder the user asked to write into is not writable."""


class NotAFolderError(MepfError, NotADirectoryError):
    """A path the user gave as a folder (an output folder to create) is, or lies under, a file."""
