"""What every `mepf` subcommand module shares: the user-error type, output, parameter models.

Imported by `flows.cli` and by the subcommand modules it registers (`flows.cli_audit`, ...), so no
subcommand module needs to import `flows.cli` (no import cycle).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from mepf_core.errors import MepfError


class CliError(MepfError):
    """A user error: printed as one line, exit status 2."""


def _emit(result: dict, as_json: bool, human: Callable[[dict], str]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(human(result) + "\n")


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
