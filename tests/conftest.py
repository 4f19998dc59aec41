"""Test-wide settings: an isolated Prefect home, no telemetry, quiet logs."""

import os
import tempfile

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="mepf-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


from mepf_core.openmp import bounded_spin_env  # noqa: E402 - before torch loads: a short spin, as `mepf` waits

bounded_spin_env()

import pytest  # noqa: E402 - after the environment above, which must be set before Prefect loads


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    those tests check numbers, not speed, and on a shared 2-core machine two threads per process
    oversubscribe the cores and OpenMP's waiting makes each step many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
