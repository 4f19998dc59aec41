"""`custodian-release`: private images -> one noisy embedding release (the sensitive stage)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.release_params import ReleaseParams
from mepf_core.encoders import build_feature_map
from tasks.custodian import calibrate, charge_noise_and_release, check_budget, describe_dataset, extract_shard, reduce_sums


class OutputExistsError(FileExistsError):
    """The release path is taken; releases are never overwritten."""


def preflight(params: ReleaseParams) -> None:
    """Checks that need no private data, so a bad call fails before any work or budget is spent."""
    out = Path(params.out)
    if out.exists():
        raise OutputExistsError(f"{out} already exists; releases are never overwritten, choose another --out")
    if not out.parent.resolve().is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")
    if params.ledger is not None and not Path(params.ledger).parent.resolve().is_dir():
        raise FileNotFoundError(f"ledger folder {Path(params.ledger).parent} does not exist")
    if params.encoder_weights is not None and not Path(params.encoder_weights).is_file():
        raise FileNotFoundError(f"encoder weights file {params.encoder_weights} does not exist")
    build_feature_map(params.encoder, weights_path=params.encoder_weights)  # weights present and loadable


def extract_sums(params: ReleaseParams):
    """Fan out one extraction task per shard (on whatever task runner the flow has), then reduce."""
    partials = [extract_shard.submit(params, shard) for shard in range(params.shards)]
    return reduce_sums([p.result() for p in partials])


@flow(name="custodian-release", log_prints=False)
def custodian_release(params: ReleaseParams) -> dict:
    """Calibrate, check the budget, extract in shards, reduce, charge, noise once, write.

    Runs unchanged on a Dask cluster: `custodian_release.with_options(task_runner=DaskTaskRunner(...))`.
    """
    preflight(params)
    mechanism = calibrate(params)
    check_budget(params, mechanism)
    info = describe_dataset(params)
    sums = extract_sums(params)
    return charge_noise_and_release(params, mechanism, sums, info)
