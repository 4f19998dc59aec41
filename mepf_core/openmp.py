"""How PyTorch's OpenMP threads wait between parallel regions: spin briefly, then sleep.

GNU OpenMP (the runtime of PyTorch's CPU wheels) reads its wait settings once, when the library
loads, so `bounded_spin_env` must run before `import torch` in the process it is for (or on the
environment handed to a child process). libgomp's choices (GCC manual, "GOMP_SPINCOUNT"): with
neither variable set a waiting thread spins 300,000 iterations before sleeping; OMP_WAIT_POLICY=PASSIVE
sleeps at once; GOMP_SPINCOUNT=N spins N iterations.

Why 10,000 (measured, Fashion-MNIST training step of `mepf train`, tcmalloc, `tasks.public._release_trainer`
on a release, 100 timed steps after 10, alternating): idle, 60.2 ms/step vs 107.6 passive and 69.5 with
the default spin; with two other busy processes on the 2 cores, 124.7-137.8 ms vs 154.9-187.7 passive,
183.5-199.8 default, 156.6 at 3,000 and 146.7 at 30,000. Passive waiting sends every thread to sleep
after each of the step's hundreds of small parallel regions (a futex wake each time); an unbounded spin
starves other processes on a shared machine (extraction at 165-205 images/s spinning vs 1,180-1,310
passive on 2 busy cores, bench/results/extraction.json); a short spin catches the next region without
holding a core for long. Extraction under the same load: 1,276-1,484 images/s vs 1,016-1,407 passive
(bench/bench_extraction.py --sizes 10000, three alternating pairs). See bench/README.md.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_COUNT = "10000"  # GOMP_SPINCOUNT: busy-wait iterations before a waiting OpenMP thread sleeps
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # a user's own setting of either wins


def bounded_spin_env(environ: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set GOMP_SPINCOUNT to SPIN_COUNT in `environ` (default: os.environ) unless OMP_WAIT_POLICY or
    GOMP_SPINCOUNT is already set there; returns `environ`. Takes effect only for an OpenMP runtime
    loaded after it (a child process, or torch imported later in this one)."""
    environ = os.environ if environ is None else environ
    if not any(name in environ for name in WAIT_VARIABLES):
        environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return environ
