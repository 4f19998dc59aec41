"""`custodian-release`: private images -> one noisy embedding release (the sensitive stage)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from mepf_core.errors import MepfError, MissingExtraError, PathNotFoundError
from storage.datasets import check_image_mode, declared_image_shape
from storage.atomic import check_writable_file, check_writable_folder
from storage.params import ReleaseParams
from storage.provenance import file_sha256
from tasks.artifacts import RELEASE_KEY, publish_markdown, release_summary_markdown
from tasks.custodian import (_feature_map, calibrate, cell_split, charge_noise_and_release,
                             check_budget, describe_dataset, extract_shard, place_cells, reduce_sums)


class OutputExistsError(MepfError, FileExistsError):
    """The release path is taken; releases are never overwritten."""


def preflight(params: ReleaseParams) -> None:
    """Checks that need no private data, so a bad call fails before any work or budget is spent.

    The image mode (--image-size, --channels) is checked again here (a generator exists for it; a
    named dataset keeps its own format): a `model_construct`ed parameter set skips pydantic.
    """
    check_image_mode(params.dataset, params.image_size, params.channels)
    out = Path(params.out)
    if out.exists():
        raise OutputExistsError(f"{out} already exists; releases are never overwritten, choose another --out")
    check_writable_folder(out.parent)  # missing, read-only or unwritable: refused before any budget is spent
    if params.ledger is not None:
        check_writable_file(params.ledger, "ledger")
    if params.encoder_weights is not None and not Path(params.encoder_weights).is_file():
        raise PathNotFoundError(f"encoder weights file {params.encoder_weights} does not exist")
    _feature_map(params)  # weights present and loadable; built once, the tasks reuse it
    if params.cells > 1:  # refused here from the settings, never after the budget check: cells whose fixed-point
        # projections could overflow, or a reference without tabulated centroids for the declared image shape
        # (ReleaseParams makes a reference need a declared shape)
        cell_split(params, declared_image_shape(params.dataset, params.image_size, params.channels))


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
    try:
        import dask
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise MissingExtraError(f"the Dask task runner needs prefect-dask ({exc.name} is not installed): "
                                "pip install 'dp-mepf[dask]'") from None

    dask.config.set(WORKER_NO_SPILL)
    kwargs = {"processes": True, "dashboard_address": None, **cluster_kwargs}
    if kwargs["processes"]:
        kwargs["config"] = {**kwargs.get("config", {}), **WORKER_NO_SPILL}
    return DaskTaskRunner(cluster_kwargs=kwargs)


def extract_sums(params: ReleaseParams, cells=None):
    """Fan out one extraction task per shard (on whatever task runner the flow has), then reduce.
    `cells`: the release's `mepf_core.cells.VoronoiSplit` or `CellSplit` (None: computed where needed, or one cell)."""
    partials = [extract_shard.submit(params, shard, cells) for shard in range(params.shards)]
    return reduce_sums([p.result() for p in partials])


@flow(name="custodian-release", log_prints=False)
def custodian_release(params: ReleaseParams) -> dict:
    """Calibrate, check the dataset and the budget, extract in shards, reduce, charge, noise once, write.

    The dataset is described (its image mode resolved, and a labelled release of a single class
    refused) before the budget check, which may write the ledger's budget line: a refused dataset leaves the ledger as it was.
    Runs unchanged on a Dask cluster: `custodian_release.with_options(task_runner=private_dask_runner(...))`.
    """
    preflight(params)
    mechanism = calibrate(params)
    info = describe_dataset(params)
    check_budget(params, mechanism)
    # Every shard decodes to the image mode resolved once by describe-dataset (an image folder's
    # inferred channels are not inferred again per shard); the release records how it was chosen.
    channels, size, _ = info["image_shape"]
    resolved = params.model_copy(update={"channels": channels, "image_size": size})
    cells = place_cells(resolved, info["image_shape"], len(info["class_names"]))  # public; every shard uses it; recorded in the release
    sums = extract_sums(resolved, cells)
    released = charge_noise_and_release(params, mechanism, sums, info, cells)
    publish_release_summary(released)
    return released


def publish_release_summary(released: dict) -> None:
    """The release summary as a markdown artifact: public fields of the release file only, no count, no n
    (tasks.artifacts.release_summary_markdown), with the release file's SHA-256."""
    summary = release_summary_markdown({**released, "release_sha256": file_sha256(released["path"])})
    publish_markdown(summary, key=RELEASE_KEY, description=f"release {released['release_id']}")
