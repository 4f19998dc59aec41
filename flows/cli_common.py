"""What every `mepf` subcommand module shares: the user-error type, output, parameter models.

Imported by `flows.cli` and by the subcommand modules it registers (`flows.cli_audit`, ...), so no
subcommand module needs to import `flows.cli` (no import cycle).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

from mepf_core.errors import MepfError, file_access_error

VERBOSE = False  # `mepf -v`: set by flows.cli.main; tracebacks of user errors are shown only then


class CliError(MepfError):
    """A user error: printed as one line, exit status 2."""


def _emit(result: dict, as_json: bool, human: Callable[[dict], str]) -> None:
    """Print `result` as JSON or as `human` text. A file name that is not valid in the terminal's
    encoding (bytes Python keeps as surrogates) prints escaped (backslashreplace), never raises."""
    text = json.dumps(result, indent=2, default=str) if as_json else human(result)
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    sys.stdout.write(text.encode(encoding, "backslashreplace").decode(encoding) + "\n")


def _describe_error(e: dict) -> str:
    where = ".".join(str(x) for x in e["loc"]) or "arguments"
    msg = e["msg"].removeprefix("Value error, ")
    if e.get("type") != "value_error" and "input" in e:  # pydantic's own messages omit the value
        msg += f" (got {e['input']!r})"
    return f"{where}: {msg}"


def _model(cls, values: dict, check: Callable | None = None):
    """Build a parameter model (and run `check` on it); validation errors become one CliError line."""
    from pydantic import ValidationError

    try:
        model = cls(**values)
        if check is not None:
            check(model)
        return model
    except ValidationError as exc:
        msgs = "; ".join(_describe_error(e) for e in exc.errors())
        raise CliError(msgs) from None


def user_error(exc: BaseException) -> MepfError | None:
    """`exc` as the one-line user error it stands for, or None when it is a bug.

    A MepfError is itself; an OSError of the environment (permission denied, read-only file system,
    full disk, a lock, an I/O error: `mepf_core.errors.file_access_error`) becomes the matching
    FileAccessError; anything else (an OSError without an errno included) is None.
    """
    if isinstance(exc, MepfError):
        return exc
    if isinstance(exc, OSError):
        return file_access_error(exc)
    return None


class _UserErrorTracebacks(logging.Filter):
    """Drops, unless -v, the console records that repeat a user error the command prints as its one
    line: Prefect logs a failed task or flow run with the error's traceback (`exc_info`), then
    "Finished in state Failed('... <the error's message>')". Prefect's API log (the UI) keeps both.
    A retry announced for a user error (a full disk, a lock: `tasks.retries`) is shown, without
    the traceback. Records of any other exception (a bug) pass."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: list[str] = []  # the start of each user error's message met in a traceback record

    def filter(self, record: logging.LogRecord) -> bool:
        if VERBOSE:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            error = user_error(exc)
            if error is None:
                return True
            if str(exc):
                self._seen.append(str(exc)[:80])
            message = record.getMessage()
            if "Retry" in message and "exhausted" not in message:  # a retry to come (a full disk, a lock): say so
                record.exc_info, record.exc_text = None, None  # the API handler has had the record already
                return True
            return False
        message = record.getMessage()
        return not (message.startswith("Finished in state Failed(") and any(s in message for s in self._seen))


def quiet_user_error_tracebacks() -> None:
    """Install `_UserErrorTracebacks` on Prefect's console handlers (call once Prefect is imported:
    importing it configures logging). Idempotent."""
    # Prefect's records reach the console through its own console handler or, where they propagate,
    # the CLI's root handler (logging.basicConfig); both are StreamHandlers. The API handler (the UI's
    # copy) is not one, so the UI keeps every record.
    for handler in (*logging.getLogger().handlers, *logging.getLogger("prefect").handlers):
        if isinstance(handler, logging.StreamHandler) and \
                not any(isinstance(f, _UserErrorTracebacks) for f in handler.filters):
            handler.addFilter(_UserErrorTracebacks())
