"""The `mepf` commands' contact with the Prefect API: a server that cannot be reached, or an ephemeral
server that does not start in time, is one line naming the setting to change (exit 2), not a traceback.

`run_flow(flow, *args)` checks, before the flow starts (so nothing is written and no budget is
charged), that the API named by PREFECT_API_URL answers `/health`; with no PREFECT_API_URL, Prefect
starts a temporary (ephemeral) server for the flow, and its start-up timeout becomes a one-line error
naming PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from flows.cli_common import CliError, quiet_user_error_tracebacks

EPHEMERAL_TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
_EPHEMERAL_TIMEOUT_TEXT = "Timed out while attempting to connect to ephemeral Prefect API server"


def check_prefect_api() -> None:
    """Raise CliError (one line) when PREFECT_API_URL is set and its `/health` does not answer.

    No PREFECT_API_URL (environment or Prefect profile): nothing to check, the flow starts an
    ephemeral server. The check takes one request (a refused connection returns at once).
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        reason = f"{type(problem).__name__}: {problem}".splitlines()[0]
        raise CliError(f"the Prefect API at PREFECT_API_URL={url} cannot be reached ({reason}); start that server "
                       "(`prefect server start`), or unset PREFECT_API_URL (`unset PREFECT_API_URL`, or "
                       "`prefect config unset PREFECT_API_URL` for a profile) to run on a temporary local server")


def run_flow(flow: Callable, *args):
    """`flow(*args)` after `check_prefect_api`; an ephemeral server's start-up timeout becomes a CliError
    naming PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (the CLI's default: 120 s)."""
    check_prefect_api()
    quiet_user_error_tracebacks()  # a failed run's user error is the command's one line, not a traceback
    try:
        return flow(*args)
    except RuntimeError as exc:
        if _EPHEMERAL_TIMEOUT_TEXT not in str(exc):
            raise
        seconds = os.environ.get(EPHEMERAL_TIMEOUT_SETTING, "Prefect's default")
        raise CliError(f"the temporary Prefect server did not start within {EPHEMERAL_TIMEOUT_SETTING}={seconds} s "
                       f"(a busy machine); raise it (e.g. `export {EPHEMERAL_TIMEOUT_SETTING}=300`) or start a "
                       "server (`prefect server start`) and set PREFECT_API_URL") from None
