"""`custodian-release`: private images -> one noisy embedding release (the sensitive stage)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from mepf_core.errors import MepfError, PathNotFoundError
from storage.params import ReleaseParams
from tasks.custodian import (_feature_map, calibrate, charge_noise_and_release, check_budget, describe_dataset,
                             extract_shard, reduce_sums)


class OutputExistsError(MepfError, FileExistsError):
    """The release path is taken; releases are never overwritten."""


def preflight(params: ReleaseParams) -> None:
    """Checks that need no private data, so a bad call fails before any work or budget is spent."""
    out = Path(params.out)
    if out.exists():
        raise OutputExistsError(f"{out} already exists; releases are never overwritten, choose another --out")
    if not out.parent.resolve().is_dir():
        raise PathNotFoundError(f"output folder {out.parent} does not exist")
    if params.ledger is not None and not Path(params.ledger).parent.resolve().is_dir():
        raise PathNotFoundError(f"ledger folder {Path(params.ledger).parent} does not exist")
    if params.encoder_weights is not None and not Path(params.encoder_weights).is_file():
        raise PathNotFoundError(f"encoder weights file {params.encoder_weights} does not exist")
    _feature_map(params)  # weights present and loadable; built once, the tasks reuse it


# Dask. What travels between processes: the ReleaseParams (public) to each worker, and each shard's
# UN-NOISED partial FeatureSums (per-class sums of bounded features and the per-class counts: private)
# back to the flow's process, where `reduce-sums` adds them and noise is drawn once. Images never
# leave the worker that reads them. A worker holding results above its memory "target"/"spill"
# fraction writes them to its local directory; for these results that would put private sums on disk,
# so custodian workers run with both turned off (they pause or are restarted instead).
WORKER_NO_SPILL = {"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False}


def private_dask_runner(**cluster_kwargs):
    """A DaskTaskRunner on a local cluster whose workers never spill results to disk.

    `cluster_kwargs` go to `distributed.LocalCluster` (processes=True unless given). The setting
    is made in this process's dask config (which local workers and the nannies that start them
    inherit) and passed to the nannies explicitly. For a cluster started elsewhere
    (`DaskTaskRunner(address=...)`), set the same two keys in the workers' dask config; README,
    "Beyond one machine: Dask", also shows TLS.
    """
    import dask
    from prefect_dask import DaskTaskRunner

    dask.config.set(WORKER_NO_SPILL)
    kwargs = {"processes": True, "dashboard_address": None, **cluster_kwargs}
    if kwargs["processes"]:
        kwargs["config"] = {**kwargs.get("config", {}), **WORKER_NO_SPILL}
    return DaskTaskRunner(cluster_kwargs=kwargs)


def extract_sums(params: ReleaseParams):
    """Fan out one extraction task per shard (on whatever task runner the flow has), then reduce."""
    partials = [extract_shard.submit(params, shard) for shard in range(params.shards)]
    return reduce_sums([p.result() for p in partials])


@flow(name="custodian-release", log_prints=False)
def custodian_release(params: ReleaseParams) -> dict:
    """Calibrate, check the dataset and the budget, extract in shards, reduce, charge, noise once, write.

    The dataset is described (and a labelled release with an empty or single class refused) before the
    budget check, which may write the ledger's budget line: a refused dataset leaves the ledger as it was.
    Runs unchanged on a Dask cluster: `custodian_release.with_options(task_runner=private_dask_runner(...))`.
    """
    preflight(params)
    mechanism = calibrate(params)
    info = describe_dataset(params)
    check_budget(params, mechanism)
    sums = extract_sums(params)
    return charge_noise_and_release(params, mechanism, sums, info)
