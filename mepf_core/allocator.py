"""Keep freed memory in glibc's heap while training on the CPU.

Why: glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh mmap'd pages
and unmaps them on free. A VGG19 training step at batch 128 allocates and frees dozens of
activation tensors of that size, so every step page-faults and zero-fills them anew. Turning off
mmap for large blocks and trimming only above 2 GiB lets the heap reuse them: 1.12x faster steps
on the CIFAR-10 configuration (bench/results/training_step.json, variant malloc_heap; 1.46x before
the public map stopped building the B x D feature matrix), 1.00x on Fashion-MNIST. The cost
is that the process keeps its peak heap until it exits, which a training process does anyway.
"""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: the largest value it accepts


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
    the run's resolved `torch.device` (or its type as a string). On the CPU, glibc keeps freed memory
    (`keep_freed_memory`); on other devices nothing changes. Call it after the encoder is built, so
    building's transient memory (weights files, construction) is returned to the system.
    """
    kind = getattr(device, "type", device)
    return {"keep_freed_memory": keep_freed_memory() if kind == "cpu" else False}
