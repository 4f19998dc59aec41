"""The `mepf` console script: re-run under tcmalloc first, then the command line (`flows.cli.main`).

Kept apart from flows/cli.py so that the re-run happens before the command line's imports (pydantic,
the parameter models): a process that is about to be replaced imports nothing it does not need.
"""

from __future__ import annotations

import sys


def entry() -> None:
    """Re-run under tcmalloc where it is installed (`mepf_core.allocator.reexec_with_tcmalloc`: less
    memory, ~2x faster extraction; opt out with MEPF_MALLOC=system), then exit with `flows.cli.main()`'s
    status; 2 with a one-line message for a MEPF_MALLOC other than tcmalloc or system. Tests call
    `main` in-process, which never re-executes."""
    from mepf_core.allocator import reexec_with_tcmalloc

    try:
        reexec_with_tcmalloc()
    except ValueError as exc:
        sys.stderr.write(f"mepf: error: {exc}\n")
        raise SystemExit(2) from None
    import flows.cli

    raise SystemExit(flows.cli.main())
