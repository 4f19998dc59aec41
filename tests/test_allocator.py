"""The process allocator: `mepf` re-runs itself under tcmalloc where installed (mepf_core/allocator.py).

scripts/setup.sh installs Debian's libtcmalloc-minimal4, so these run the real library."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mepf_core import allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a clean start: no allocator choice or preload inherited from the shell running the tests
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ALLOCATOR_ENV)}


def _run(code: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**CLEAN_ENV, "PYTHONPATH": REPO, **env}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# flows.mepf_command.entry (the console script) with main replaced: prints the allocator the process ended up with
ENTRY = ("import flows.cli as cli\n"
         "from flows.mepf_command import entry\n"
         "from mepf_core.allocator import tcmalloc_loaded\n"
         "cli.main = lambda: print('tcmalloc' if tcmalloc_loaded() else 'system') or 0\n"
         "entry()\n")


def test_the_mepf_entry_point_reruns_itself_under_tcmalloc_once():
    assert _run(ENTRY) == "tcmalloc"


def test_mepf_malloc_system_keeps_the_c_library_malloc():
    assert _run(ENTRY, MEPF_MALLOC="system") == "system"


def test_the_console_script_is_the_entry_point():
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["mepf"] == "flows.mepf_command:entry"


def test_tcmalloc_env_prepends_the_library_and_keeps_other_preloads():
    env = allocator.tcmalloc_env({"LD_PRELOAD": "libfoo.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libfoo.so" and env["PATH"] == "/bin"


def test_a_preload_the_loader_refused_is_not_retried(caplog):
    """tcmalloc named in LD_PRELOAD but not loaded (this test process runs glibc): no re-run, which would loop."""
    assert not allocator.tcmalloc_loaded()
    assert allocator.tcmalloc_env({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}) is None
    assert "was not loaded" in caplog.text


def test_an_unknown_choice_is_refused_with_the_values_allowed():
    with pytest.raises(ValueError, match="MEPF_MALLOC must be one of tcmalloc, system, got 'jemalloc'"):
        allocator.tcmalloc_env({"MEPF_MALLOC": "jemalloc"})
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, cwd=REPO,
                         env={**CLEAN_ENV, "PYTHONPATH": REPO, "MEPF_MALLOC": "jemalloc"}, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("mepf: error: MEPF_MALLOC must be one of")


def test_training_settings_under_each_allocator():
    """Under glibc the training process keeps freed memory; under tcmalloc glibc's setting is not applied."""
    assert allocator.prepare_training_process("cpu") == {"tcmalloc": False, "keep_freed_memory": True}
    assert allocator.prepare_training_process("cuda") == {"tcmalloc": False, "keep_freed_memory": False}
    code = "from mepf_core.allocator import prepare_training_process as p; print(p('cpu'))"
    assert _run(code, LD_PRELOAD="libtcmalloc_minimal.so.4") == "{'tcmalloc': True, 'keep_freed_memory': False}"


def test_tcmalloc_is_detected_as_a_malloc_already_replaced():
    """What keeps a user's own preloaded allocator or sanitizer: malloc served by a library ahead of libc."""
    assert not allocator.malloc_replaced()  # this test process: the C library's malloc
    code = "from mepf_core import allocator as a; print(a.malloc_replaced(), a.tcmalloc_loaded())"
    assert _run(code, LD_PRELOAD="libtcmalloc_minimal.so.4", MEPF_MALLOC="system") == "True True"


def test_a_malloc_the_user_preloaded_is_kept(monkeypatch):
    """LD_PRELOAD=libasan.so.8 mepf ... aborted ("ASan runtime does not come first in initial library list")
    and LD_PRELOAD=libjemalloc.so.2 silently ran tcmalloc: tcmalloc went ahead of the user's preload."""
    monkeypatch.setattr(allocator, "malloc_replaced", lambda: True)
    assert allocator.tcmalloc_env({"LD_PRELOAD": "libasan.so.8"}) is None


def test_a_program_read_from_stdin_is_not_rerun():
    """`python -` re-executed would read an empty stdin and exit 0 without running main."""
    out = subprocess.run([sys.executable, "-"], input=ENTRY, capture_output=True, text=True, cwd=REPO,
                         env={**CLEAN_ENV, "PYTHONPATH": REPO}, timeout=120)
    assert (out.returncode, out.stdout.strip()) == (0, "system"), out.stderr
