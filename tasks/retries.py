"""When a task is retried: only on transient failures, never on user errors, never after a charge.

Prefect 3 retries a task in the same process (`@task(retries=, retry_delay_seconds=)`) when it raises
and `retry_condition_fn(task, task_run, state)` returns True. `transient_failure` is that condition:

* retried: `OSError` (a network file system, a full or busy disk, a dropped connection while a
  dataset or weights are fetched), `RuntimeError` (CUDA errors, `torch.OutOfMemoryError`, a lost
  NCCL/driver context), `MemoryError` and `TimeoutError`: failures of the machine, which a second
  attempt may not meet;
* never retried: any `mepf_core.errors.MepfError` (invalid arguments, missing inputs, an existing
  output, a refused or corrupt release, a spent budget: the same call fails the same way, so a retry
  would only fail three times and bury the message), pydantic's `ValidationError`, and every other
  exception (a `TypeError` or `KeyError` is a bug, not bad luck). `MepfError`s that are also
  `OSError`s (`PathNotFoundError`, `PathExistsError`, ...) are user errors: checked first;
* a `mepf_core.errors.FileAccessError` (an OSError of the environment, named for the user: a full
  disk, a lock, permission denied) is retried when its `transient` says so (a full disk, a lock, an
  I/O error), never for permission denied or a read-only file system.

The retry settings are constants, not parameters: they describe how the tasks behave, not a choice a
user makes per run (declaring them in `storage.params` would put them in every deployment's schema).
A deployment that needs others can wrap a task with `task.with_options(retries=..., retry_delay_seconds=...)`.

Timeouts (`timeout_seconds`) are left None on every task, on purpose: training, sampling and
evaluation take from seconds to hours depending on the steps, the number of images and the hardware
(10,000 steps take 8 minutes on 2 CPU cores; VGG19 on CIFAR-10 at 1.1 s/step takes hours), so any
fixed limit would kill healthy runs; and Prefect enforces a sync task's timeout by raising into its
thread, which cannot interrupt a running torch kernel. Limit a whole run where it is deployed instead
(the work pool's or `prefect deployment run`'s timeout, `scripts/local_stack.py --run-timeout`).

The custodian's `charge-noise-release` task never retries (`retries=0`, see its docstring): a retry
after the ledger charge would charge twice, or write a release from a second noise draw.
"""

from __future__ import annotations

import gc

from mepf_core.errors import FileAccessError, MepfError

TRANSIENT = (OSError, RuntimeError, MemoryError, TimeoutError)

# Training: resumes from its latest checkpoint on a retry (tasks.public.train_task), so a retry loses
# at most `checkpoint_every` steps. Two retries, 30 s apart, give a busy GPU or file server time to recover.
TRAIN_RETRIES = 2
TRAIN_RETRY_DELAY_SECONDS = 30
# Sampling, evaluation and reading the release (files, Inception, classifiers): cheap to redo from the start.
RETRIES = 2
RETRY_DELAY_SECONDS = 10


def failure_exception(state) -> BaseException | None:
    """The exception a Failed task state holds (Prefect puts the raised exception in `state.data`)."""
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return data
    try:
        result = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - a state whose result cannot be read: no exception to judge
        return None
    return result if isinstance(result, BaseException) else None


def is_transient(exc: BaseException | None) -> bool:
    """True for a failure of the machine (TRANSIENT) that is not a user error (MepfError, ValidationError)."""
    from pydantic import ValidationError

    if isinstance(exc, FileAccessError):  # the environment: a full disk or a lock may pass, a permission will not
        return exc.transient
    if exc is None or isinstance(exc, (MepfError, ValidationError)):
        return False
    return isinstance(exc, TRANSIENT)


def transient_failure(task, task_run, state) -> bool:
    """`retry_condition_fn` for Prefect tasks: retry only when `is_transient` says the failure may pass.

    Before a retry it also collects garbage and empties CUDA's cache, so a retry after an
    out-of-memory error starts with the failed attempt's tensors freed.
    """
    transient = is_transient(failure_exception(state))
    if transient:
        release_memory()
    return transient


def release_memory() -> None:
    """Collect garbage and return cached CUDA memory (no-op without CUDA)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - freeing memory is best effort
        pass


def retry_options(retries: int = RETRIES, delay: float = RETRY_DELAY_SECONDS) -> dict:
    """`@task` keyword arguments for a task retried on transient failures only (`transient_failure`)."""
    return {"retries": retries, "retry_delay_seconds": delay, "retry_condition_fn": transient_failure,
            "timeout_seconds": None}
