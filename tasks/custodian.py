"""Custodian tasks: the only code that touches private images.

Un-noised `FeatureSums` pass between these tasks in memory only: `persist_result=False` and
`NO_CACHE` keep Prefect from writing them to result storage or hashing them into cache keys, and
nothing here logs a statistic of the data (not even n, which is private under add-remove).
"""

from __future__ import annotations

import functools
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

import torch

from mepf_core.cells import (CellSplit, VoronoiSplit, centroid_projection, check_fixed_point_range, hyperplane_normals,
                             tabulated_centroids, voronoi_directions)
from mepf_core.embedding import FeatureSums, sums_to_noisy_parts
from mepf_core.errors import FileAccessError, InvalidArgumentError
from mepf_core.encoders import FeatureMap, build_feature_map
from mepf_core.features import fixed_batch_features
from mepf_core.privacy.mechanism import ReleaseMechanism, design_mechanism
from storage.datasets import DatasetCheckError, ExtractionError, ImageSource, open_dataset
from storage.ledger import BudgetLedger
from storage.params import ReleaseParams
from storage.release import (PartRecord, ReleaseMetadata, check_metadata, check_room_for_release,
                             embedding_to_release)
from storage.signing import fingerprint, load_private_key
from tasks.artifacts import EXTRACTION_PROGRESS_KEY, FixedStepProgress

_PRIVATE = dict(persist_result=False, cache_policy=NO_CACHE)


def _source(params: ReleaseParams) -> ImageSource:
    # the mode is inferred from released records only; no image at all is a dataset too (the neighbour of one)
    return open_dataset(params.dataset, params.split, params.data_root, image_size=params.image_size,
                        channels=params.channels, limit=params.limit, allow_empty=True)


def check_data_hint(params: ReleaseParams) -> str:
    """The local command that tells the custodian (on their terminal, never through Prefect) what failed."""
    cmd = f"mepf check-data --dataset {params.dataset} --split {params.split}"
    if params.data_root is not None:
        cmd += f" --data-root {params.data_root}"
    if params.labelled:
        cmd += " --labelled"
    if params.limit is not None:
        cmd += f" --limit {params.limit}"
    return f"run `{cmd}` on the custodian's machine for details"


def _safe(exc: BaseException) -> BaseException:
    """Mark an error whose message was written here to name no record and no private count."""
    exc.mepf_sanitized = True
    return exc


def sanitize_errors(what: str):
    """Run a custodian task body so that any error leaving it names no record and no private count.

    Whatever a custodian task raises reaches Prefect (task and flow state messages, logs, a failed
    result), which users of a shared server can read; errors raised on the private data often name a
    record (`PermissionError: ... data/b/scans/<name>.png`, `[Errno 36] File name too long: ...`,
    `cannot decode image ...`) or print a private value (shapes, labels, counts). Any `Exception`
    becomes one `ExtractionError` naming the task and the `mepf check-data` hint (not the original's
    class), raised OUTSIDE the `except` block so the original is neither chained (`__cause__`) nor
    attached as `__context__`. Errors built here with a safe message (`_safe`) pass unchanged. The CLI
    runs the same dataset checks locally before Prefect starts, with the detailed message.
    """
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            failure: BaseException | None = None
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - replaced by a message without private values, below
                if getattr(exc, "mepf_sanitized", False):
                    raise
                params = next((a for a in (*args, *kwargs.values()) if isinstance(a, ReleaseParams)), None)
                hint = check_data_hint(params) if params is not None else \
                    "run `mepf check-data` on the custodian's machine for details"
                # Not even the error's class: which class a record provokes is a function of its bytes.
                failure = _safe(ExtractionError(f"{what} failed on the private dataset; {hint}"))
            raise failure
        return wrapper
    return decorate


def check_labelled(params: ReleaseParams, src: ImageSource) -> None:
    """Refuse a labelled release of fewer than 2 classes (before any budget moves).

    The class list is the dataset's structure (a named dataset's classes, an image folder's class
    subfolders, empty or not), never its records: a check on the records would make the outcome,
    refused and free or released and charged, a function of one record. An empty class was refused here
    until a DP review showed that removing a class's only image turned a charged release into a free
    refusal; it is now released (its row is noise) and the CLI warns the custodian on the terminal.
    """
    if params.labelled and src.num_classes < 2:
        raise _safe(DatasetCheckError(
            f"a labelled release needs at least 2 classes, the dataset has {src.num_classes}; "
            f"{check_data_hint(params)}"))


@functools.lru_cache(maxsize=4)
def _build_once(encoder: str, weights_path: str | None) -> FeatureMap:
    return build_feature_map(encoder, weights_path=weights_path)


def _feature_map(params: ReleaseParams) -> FeatureMap:
    """The release's encoder, built (and its weights hashed) once per process: the preflight, the
    describe-dataset task and every shard share it. Safe to share: a FeatureMap is frozen and always
    in eval mode, so its forward pass has no state (concurrent shards only read it)."""
    return _build_once(params.encoder, params.encoder_weights)


def shard_range(n: int, shard: int, shards: int) -> tuple[int, int]:
    return n * shard // shards, n * (shard + 1) // shards


@task(name="calibrate", persist_result=False)
def calibrate(params: ReleaseParams) -> ReleaseMechanism:
    """Sensitivities and autodp calibration: depends on public settings only."""
    mech = design_mechanism(
        target_epsilon=params.target_epsilon,
        target_delta=params.target_delta,
        relation=params.neighbouring,
        labelled=params.labelled,
        moments=params.moments,
        norm_bound=params.norm_bound,
        second_moment_bound=params.second_moment_bound,
        count_share=params.count_share,
        cells_per_class=params.cells,
    )
    get_run_logger().info(
        "calibrated: epsilon %.4g at delta %.2g, sigmas %s",
        mech.epsilon, mech.target_delta, {p.name: round(p.sigma, 6) for p in mech.parts},
    )
    return mech


@task(name="check-budget", persist_result=False)
def check_budget(params: ReleaseParams, mechanism: ReleaseMechanism) -> None:
    """Refuse early, before any image is read, if the ledger cannot afford this release."""
    if params.ledger is None:
        return
    ledger = BudgetLedger(params.ledger)
    records = {"source": params.source, "legacy_id": params.legacy_dataset_id}  # one set of records, one budget
    if params.budget is not None:
        ledger.set_budget(params.resolved_dataset_id, epsilon=params.budget, delta=params.budget_delta, **records)
    ledger.charge(params.resolved_dataset_id, release_id="(check)", epsilon=mechanism.epsilon,
                  delta=mechanism.target_delta, noise_multiplier=mechanism.effective_noise_multiplier,
                  neighbouring=mechanism.relation, record=False, **records)


@task(name="describe-dataset", persist_result=False)
@sanitize_errors("describe-dataset")
def describe_dataset(params: ReleaseParams) -> dict:
    """Public facts about the dataset's format (classes, image shape); never its size in logs.

    Runs before the budget check: a labelled release of a single class is refused here, so nothing is
    charged or written (an empty class is not: `check_labelled`). Any error is sanitized (`sanitize_errors`).
    """
    src = _source(params)
    check_labelled(params, src)
    fm = _feature_map(params)
    # image_shape and image_mode_source are public: declared by the flags, a named dataset's format, or
    # (an image folder without --channels) the one data-dependent bit the custodian declares public.
    return {"class_names": src.class_names if params.labelled else ("all",), "image_shape": src.image_shape,
            "image_mode_source": src.image_mode_source, "feature_dim": fm.feature_dim, "encoder": fm.spec}


def cell_split(params: ReleaseParams, image_shape: tuple[int, int, int],
               num_classes: int | None = None) -> CellSplit | VoronoiSplit | None:
    """The release's cells (mepf_core.cells) for images of `image_shape` (C, H, W, public), None with one
    cell per class. Reads NO data. With a reference (`params.resolved_cell_reference`): Voronoi cells, each
    class split by its own centroids, tabulated once from that public split (`PUBLIC_CENTROIDS`), in the
    projection from params.cell_seed; without one: hyperplanes through 0 from params.cell_seed.
    num_classes (public: the dataset's class list) must be the table's when given.
    Raises InvalidArgumentError when the table has no entry for the encoder's weights, the image shape and
    the norm bound (ReleaseParams checked the reference, seed and cells; the rest is known only now), or
    for settings whose fixed-point projections could overflow."""
    if params.cells == 1:
        return None
    fm = _feature_map(params)
    reference = params.resolved_cell_reference
    if reference is None:
        normals = hyperplane_normals(fm.feature_dim, params.cells, params.cell_seed)
        check_fixed_point_range(params.norm_bound, normals)
        return CellSplit(params.cells, params.cell_seed, normals, torch.zeros(normals.shape[1], dtype=torch.float64),
                         None)
    table = tabulated_centroids(reference, fm.spec.name, fm.spec.weights_sha256, image_shape, params.norm_bound,
                                params.cell_seed, params.cells)
    if table is None:
        raise InvalidArgumentError(
            f"cell_reference {reference!r} has no tabulated centroids for encoder {fm.spec.name} (weights "
            f"{fm.spec.weights_sha256[:12]}...), images of shape {list(image_shape)} and norm_bound "
            f"{params.norm_bound}: use --cell-reference none (no public constants)")
    centroids, sha256 = table
    if num_classes is not None and num_classes != centroids.shape[0]:
        raise InvalidArgumentError(f"cell_reference {reference!r} has centroids for {centroids.shape[0]} classes, "
                                   f"the dataset has {num_classes}: use --cell-reference none")
    directions, offsets = voronoi_directions(centroid_projection(fm.feature_dim, params.cell_seed), centroids)
    check_fixed_point_range(params.norm_bound, directions.reshape(-1, fm.feature_dim).T)
    return VoronoiSplit(params.cells, params.cell_seed, directions, offsets, reference, sha256)


@task(name="place-cells", persist_result=False)
def place_cells(params: ReleaseParams, image_shape: tuple[int, int, int],
                num_classes: int | None = None) -> CellSplit | VoronoiSplit | None:
    """`cell_split` as a task: public settings only (no data is read), so its errors are shown as raised."""
    return cell_split(params, tuple(image_shape), num_classes)


@sanitize_errors("extraction")
def shard_sums(params: ReleaseParams, shard: int, progress: bool = False, cells: CellSplit | VoronoiSplit | None = None) -> FeatureSums:
    """The release's extraction of one shard: records chosen by `open_dataset`, bounded features, exact
    integer sums of their lattice points (`mepf_core.privacy.lattice`).

    `progress`: inside a Prefect run, show the shard's progress as a progress artifact that reports only
    the fixed steps 0, 10, ..., 100 % (tasks.artifacts.FixedStepProgress: the same sequence for every
    dataset, so it reveals no count); its description names only the shard and the declared shard count.

    The only extraction loop: the `extract-shard` task and the privacy audit (`tasks.audit`) both call
    it, so a record-selection fault would show in the audit too. Returns UN-NOISED sums (private).

    Records are what `open_dataset` lists (storage.datasets: hidden files, symlinks and extra names
    of one file are never records). `limit` keeps the first N of them; ReleaseParams refuses it under
    add-remove and derives why it is sound under replace-one (`_limit_keeps_relation`).

    A record whose file cannot be decoded is not an error: it is released as a record with zero features
    (its count stays), a function of that record alone (so the sensitivities hold). Refusing the release
    instead made the outcome (released and charged, or refused and free) a function of one record's bytes,
    which no epsilon covers (fifth DP review; likewise an empty class, `check_labelled`). So is a file that
    cannot be read (any OS error: permission denied, a name too long, an I/O error; sixth and seventh DP
    reviews), one over a decoding limit, and any error a decoder raises on a file's bytes
    (`storage.datasets._decode_image`). `mepf check-data` lists such files for the custodian, locally.

    Errors: this runs inside a Prefect task, whose state, logs and exception text a public user of a
    shared server can read. Any other error (a shape or label error prints batch sizes or label values)
    is replaced by one that names neither the record nor a count, raised outside the `except` block so
    the original is not chained to it; `mepf check-data` gives the custodian the details locally. Errors
    outside the batch loop (opening and listing the folder in `_source(params)`, building the encoder)
    are sanitized the same way by `sanitize_errors`.

    Each shard opens (and so lists) the dataset itself and takes its index range of that listing: the
    folder must not change while a release runs (a file added or removed mid-release shifts the
    shard ranges, so a record could be read twice or not at all). Copy the data to a folder nobody
    writes to, or snapshot it, before releasing.
    """
    src = _source(params)
    n = len(src) if params.limit is None else min(params.limit, len(src))
    start, stop = shard_range(n, shard, params.shards)
    fm = _feature_map(params)
    k = src.num_classes if params.labelled else 1
    if cells is None:
        cells = cell_split(params, src.image_shape, src.num_classes)
    given = (1, None, None) if cells is None else (cells.cells_per_class, cells.seed, cells.reference)
    wanted = (params.cells, params.cell_seed if params.cells > 1 else None, params.resolved_cell_reference)
    if given != wanted:
        raise _safe(ValueError(f"the cells given ({cells!r}) are not this release's: {wanted}"))
    bound2 = params.second_moment_bound if params.moments == 2 else None
    sums = FeatureSums.zeros(k * params.cells, fm.feature_dim, params.moments, norm_bound=params.norm_bound,
                             second_moment_bound=bound2)
    ui = FixedStepProgress(EXTRACTION_PROGRESS_KEY, f"extraction, shard {shard + 1} of {params.shards} "
                           "(fixed 10% steps: no count is shown)") if progress else None
    done = 0
    # The bar shows a percentage and times only: image counts would print n, which is private.
    try:
        with tqdm(total=stop - start, desc=f"extract shard {shard + 1}/{params.shards}", leave=False,
                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}") as bar:
            for images, labels, decoded in src.iter_record_batches(params.batch_size, start, stop):
                # a fixed batch shape: a record's features (and so its cell) do not depend on its batch
                phi1, phi2 = fixed_batch_features(fm, images, params.batch_size, norm_bound=params.norm_bound,
                                                  second_moment_bound=bound2)
                # A record whose file cannot be decoded has zero features (its count stays): a function of
                # that record alone, so the sensitivities hold, and the release is made either way. So has
                # a labelled record whose label is outside the K classes (a damaged idx label byte, a DP
                # review: it made the release fail, uncharged); it counts in class 0.
                if params.labelled:
                    known = (labels >= 0) & (labels < k)
                    decoded, rows = decoded & known, torch.where(known, labels, 0)
                else:
                    rows = torch.zeros(len(images), dtype=torch.long)
                phi1 = torch.where(decoded[:, None], phi1, 0.0)
                phi2 = None if phi2 is None else torch.where(decoded[:, None], phi2, 0.0)
                sums.add(phi1, phi2, rows if cells is None else cells.rows(phi1, rows))
                bar.update(len(images))
                if ui is not None:
                    done += len(images)
                    ui.update(done, stop - start)  # sends grid points only, never `done` or the total
    finally:
        # Success or failure, the artifact ends at 100%: a failed shard left at 30% would say where, among
        # the shard's sorted records, the first unreadable one lies (a rank statistic of the
        # private data, and a release that fails is charged nothing, so it could be probed for free).
        if ui is not None:
            ui.finish()
    return sums  # any error is replaced by `sanitize_errors`


@task(name="extract-shard", **_PRIVATE)
def extract_shard(params: ReleaseParams, shard: int, cells: CellSplit | VoronoiSplit | None = None) -> FeatureSums:
    """One streaming pass over a shard: bounded features added into int64 lattice sums per row (rows: classes,
    or (class, cell) pairs with `cells`)."""
    return shard_sums(params, shard, progress=True, cells=cells)


@task(name="reduce-sums", **_PRIVATE)
@sanitize_errors("reduce-sums")
def reduce_sums(partials: list[FeatureSums]) -> FeatureSums:
    total = partials[0]
    for p in partials[1:]:
        total = total.merge(p)
    return total


@sanitize_errors("noise")
def _noisy_parts(params: ReleaseParams, sums: FeatureSums, mechanism: ReleaseMechanism) -> dict:
    """`sums_to_noisy_parts`, whose errors could print un-noised sums, behind `sanitize_errors`."""
    return sums_to_noisy_parts(sums, mechanism)


# retries=0, stated on purpose: see the docstring. Never give this task retries (nor with_options).
@task(name="charge-noise-release", persist_result=False, cache_policy=NO_CACHE, retries=0)
def charge_noise_and_release(params: ReleaseParams, mechanism: ReleaseMechanism, sums: FeatureSums,
                             info: dict, cells: CellSplit | VoronoiSplit | None = None) -> dict:
    """Charge the ledger (fsynced), then draw noise once, then write the release atomically and exclusively
    (signed when params.signing_key is set); a name taken meanwhile raises ReleaseExistsError, charge kept.

    Never retried (`retries=0`), unlike the public tasks (tasks.retries): once the charge is written, a
    second attempt would either charge the ledger again for the same data (a release id is drawn per
    attempt, so the ledger cannot tell the two apart) or, were it made to skip the charge, draw the
    noise a second time. Two noise draws of the same sums leak more than the one that was paid for: an
    observer who saw both (a partial file, a log, a second release) averages them, halving the noise's
    variance, which is a release at a larger epsilon than the ledger records. A failure after the charge
    therefore fails the flow, keeps the charge (spent budget is never under-counted) and leaves no
    release; the custodian decides whether to pay for a new one.
    """
    n_public = None
    if not mechanism.part("counts").noised:  # replace-one, unlabelled: n is public by the relation
        n_public = int(round(float(sums.counts.sum())))
    parts = tuple(PartRecord.of(p, sums.parts()[p.name].shape) for p in mechanism.parts)
    meta = ReleaseMetadata(
        dataset_id=params.published_dataset_id, neighbouring=mechanism.relation.value, epsilon=mechanism.epsilon,
        delta=mechanism.target_delta, target_epsilon=mechanism.target_epsilon, norm_bound=params.norm_bound,
        second_moment_bound=params.second_moment_bound if params.moments == 2 else None, moments=params.moments,
        labelled=params.labelled, class_names=tuple(info["class_names"]), image_shape=tuple(info["image_shape"]),
        encoder=info["encoder"], parts=parts, n_public=n_public, image_mode_source=info.get("image_mode_source"),
        **({} if cells is None else dict(
            cells_per_class=cells.cells_per_class, cell_seed=cells.seed, cell_reference=cells.reference,
            **(dict(cell_centroids_sha256=cells.centroids_sha256) if isinstance(cells, VoronoiSplit) else dict(
                cell_offsets=tuple(float(b) for b in cells.offsets))))),
    )
    # Before the charge: a key that cannot sign, or metadata whose claim the reader would refuse,
    # must not cost budget (the key is loaded here, never passed through Prefect).
    signing_key = load_private_key(params.signing_key) if params.signing_key is not None else None
    check_metadata(meta)
    check_room_for_release(params.out, {p.name: p.shape for p in parts})  # a full disk costs no budget
    if params.ledger is not None:
        BudgetLedger(params.ledger).charge(
            params.resolved_dataset_id, release_id=meta.release_id, epsilon=mechanism.epsilon,
            delta=mechanism.target_delta, noise_multiplier=mechanism.effective_noise_multiplier,
            neighbouring=mechanism.relation, source=params.source, legacy_id=params.legacy_dataset_id,
        )
    noisy = _noisy_parts(params, sums, mechanism)
    try:
        path = embedding_to_release(params.out, meta, noisy, signing_key=signing_key, signer_name=params.signer_name)
    except FileAccessError as exc:  # a full disk, a folder made read-only meanwhile: nothing was written
        if params.ledger is not None:
            exc.args = (f"{exc}; release {meta.release_id} stays charged in the ledger {params.ledger} (spent "
                        "budget is never under-counted, a new release is charged again)",)
        raise
    get_run_logger().info("release %s written to %s", meta.release_id, path)
    return {
        "path": str(Path(path).resolve()),
        "release_id": meta.release_id,
        "epsilon": mechanism.epsilon,
        "delta": mechanism.target_delta,
        "neighbouring": mechanism.relation.value,
        "sigmas": {p.name: p.sigma for p in mechanism.parts},
        "shapes": {name: list(v.shape) for name, v in noisy.items()},
        "cells_per_class": meta.cells_per_class,  # public: recorded in the release
        "signed_by": fingerprint(signing_key.public_key()) if signing_key is not None else None,
        "encoder": meta.encoder.name,  # public: recorded in the release
        "encoder_weights_sha256": meta.encoder.weights_sha256 or None,
        "image_mode_source": meta.image_mode_source,  # public: recorded in the release
    }
