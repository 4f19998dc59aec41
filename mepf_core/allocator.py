"""The process's memory allocator on the CPU: tcmalloc where installed, else glibc keeping freed memory.

tcmalloc (gperftools' minimal build; Debian/Ubuntu package libtcmalloc-minimal4): the `mepf` command
re-runs itself once with it preloaded (`reexec_with_tcmalloc`, before anything is imported that
allocates much). Measured side by side against the same step under glibc with `keep_freed_memory`
(bench/bench_training_step.py, variant `glibc`; bench/results/training_step.json): peak RSS of the
CIFAR-10 step 1,701 -> 1,393 MiB (1,700-1,742 -> 1,390-1,397 in four runs); speed the same within
this loaded host's noise (CIFAR-10 0.96-1.00x, Fashion-MNIST median 0.99x over five runs, peak RSS
+0-20 MiB there; idle, one run: 0.974x). The custodian's extraction runs ~2.0x faster under it
(bench/bench_extraction.py --sizes 20000, idle, four alternating pairs; bench/results/extraction.json).
glibc fragments its heap under the step's mix of large activation tensors and small ones (~300 MiB
above the live peak); tcmalloc's page-heap spans reuse them. `MEPF_MALLOC=system` keeps the C
library's malloc.

glibc, when tcmalloc is not there. Why: glibc serves allocations above its mmap threshold (at most
32 MiB) with fresh mmap'd pages and unmaps them on free. A VGG19 training step at batch 128 allocates and frees dozens of
activation tensors of that size, so every step page-faults and zero-fills them anew. Turning off
mmap for large blocks and trimming only above 2 GiB lets the heap reuse them: 1.12x faster steps
on the CIFAR-10 configuration (bench/results/training_step.json, variant malloc_heap; 1.46x before
the public map stopped building the B x D feature matrix), 1.00x on Fashion-MNIST. The cost
is that the process keeps its peak heap until it exits, which a training process does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Mapping

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: the largest value it accepts


ALLOCATOR_ENV = "MEPF_MALLOC"  # "tcmalloc" (the default: preloaded where installed) or "system"
ALLOCATORS = ("tcmalloc", "system")
TCMALLOC = "tcmalloc_minimal"  # the library's name for ctypes.util.find_library (libtcmalloc_minimal.so.4)


def _address(library, symbol: str) -> int | None:
    """Address `symbol` resolves to through a ctypes library handle; None where it is not defined."""
    try:
        return ctypes.cast(getattr(library, symbol), ctypes.c_void_p).value
    except AttributeError:
        return None


def tcmalloc_loaded() -> bool:
    """Whether tcmalloc serves this process's malloc: `malloc` in the global namespace is tcmalloc's
    `tc_malloc` (loaded behind another preloaded allocator, it serves nothing)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return False
    tc_malloc = _address(process, "tc_malloc")
    return tc_malloc is not None and tc_malloc == _address(process, "malloc")


def malloc_replaced() -> bool:
    """Whether something ahead of the C library serves this process's malloc: an allocator or a
    sanitizer the user preloaded (jemalloc, ASan, which must come first in LD_PRELOAD, or tcmalloc).
    False elsewhere than Linux with glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return _address(ctypes.CDLL(None), "malloc") != _address(ctypes.CDLL("libc.so.6"), "malloc")
    except OSError:
        return False


def tcmalloc_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment that runs a process under tcmalloc (LD_PRELOAD), or None where nothing changes.

    environ: the environment to start from (e.g. `os.environ`); its LD_PRELOAD entries are kept after
    tcmalloc's. None when: not Linux; `MEPF_MALLOC=system`; this process's malloc is already served
    by a preloaded library, tcmalloc or one the user chose (`malloc_replaced`); libtcmalloc_minimal
    is not installed; or it is already in LD_PRELOAD without being loaded (a preload the loader refused: re-running
    would loop). Raises ValueError for a MEPF_MALLOC other than "tcmalloc" or "system".
    """
    choice = environ.get(ALLOCATOR_ENV, "tcmalloc")
    if choice not in ALLOCATORS:
        raise ValueError(f"{ALLOCATOR_ENV} must be one of {', '.join(ALLOCATORS)}, got {choice!r}")
    if choice == "system" or not sys.platform.startswith("linux"):
        return None
    if malloc_replaced():  # tcmalloc already, or the user's own allocator (ahead of it: overridden, ASan aborts)
        logger.debug("malloc already served by a preloaded library: kept")
        return None
    library = ctypes.util.find_library(TCMALLOC)
    preload = environ.get("LD_PRELOAD", "")
    if library is None:
        logger.debug("libtcmalloc_minimal not installed: the C library's malloc stays")
        return None
    if library in preload.replace(":", " ").split():
        logger.warning("%s is in LD_PRELOAD but was not loaded: the C library's malloc stays", library)
        return None
    return {**environ, "LD_PRELOAD": " ".join(filter(None, [library, preload]))}


def reexec_with_tcmalloc() -> None:
    """Replace this process by the same command under tcmalloc (`tcmalloc_env`); returns only where
    nothing changes. For a program's entry point (the `mepf` console script), before it starts work:
    the process image is replaced, so nothing done before the call survives. Never re-runs a program
    read from stdin or typed at the prompt (sys.argv[0] "-" or ""): it would come back empty."""
    env = tcmalloc_env(os.environ)
    if env is not None and sys.argv[0] not in ("", "-"):
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks for reuse; True when it agreed, False elsewhere (no-op)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded into this process
    except (OSError, AttributeError):
        logger.debug("no mallopt in this C library (not glibc?): allocator left as it is")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    logger.debug("glibc keeps freed memory for reuse: %s", applied)
    return applied


def prepare_training_process(device) -> dict[str, bool]:
    """The process-wide settings a training run applies before building its Trainer; what was applied.

    The one place that decides them: `tasks.public._release_trainer` (what `mepf train` runs) and
    bench/bench_training_step.py both call it, so the benchmark times the production step. device:
    the run's resolved `torch.device` (or its type as a string). On the CPU under glibc's malloc, it
    keeps freed memory (`keep_freed_memory`; under tcmalloc, which `mepf` preloads, nothing to do); on
    other devices nothing changes. Returns {"tcmalloc": bool, "keep_freed_memory": bool}. Call it after the encoder is built, so
    building's transient memory (weights files, construction) is returned to the system.
    """
    kind = getattr(device, "type", device)
    tcmalloc = tcmalloc_loaded()
    kept = keep_freed_memory() if kind == "cpu" and not tcmalloc else False
    logger.info("memory allocator: %s", "tcmalloc" if tcmalloc else "glibc, keeping freed memory" if kept else "the C library's")
    return {"tcmalloc": tcmalloc, "keep_freed_memory": kept}
