"""Public-stage tasks: release -> trained generator (run directory) -> synthetic dataset.

Only the release file and public things (encoder weights) are read here; the private dataset is
never opened. Each task is a thin wrapper over a plain function of the same job, so the functions
can be called (and tested) without Prefect. Training and sampling write files, so their tasks are
never cached; their small JSON-able results may be persisted.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from mepf_core.errors import InvalidArgumentError, PathNotFoundError
from mepf_core.generators import build_generator
from mepf_core.public_map import EncoderMismatchError, build_public_map
from mepf_core.cells import draw_rows
from mepf_core.training import TrainConfig, Trainer, balanced_labels, build_trainer, generate, resolve_device
from storage.checkpoints import (
    BEST,
    LATEST,
    RESUMABLE_OVERRIDES,  # noqa: F401 - re-exported: the resume rule's public name
    best_checkpoint,
    check_writable_dir,
    grid_labels,
    latest_checkpoint,
    load_training_checkpoint,
    open_run,
    read_run_owner,
    run_summary,
    write_run_owner,
    write_run_summary,
    write_training_state,
)
from storage.provenance import ReleaseInfo, SyntheticInfo
from tasks.artifacts import TRAINING_PROGRESS_KEY, RunProgress
from storage.release import Release, read_release
from storage.dataset_card import write_dataset_card
from storage.synthetic import export_format, quantise, write_synthetic
from tasks.retries import TRAIN_RETRIES, TRAIN_RETRY_DELAY_SECONDS, retry_options

logger = logging.getLogger(__name__)

GRID_SEED = 1  # fixed codes for the sample grid, so grids of successive checkpoints compare
SYNTHETIC_SEED = 0


# --- training -----------------------------------------------------------------------------------

def _release_trainer(release: Release, config: TrainConfig, encoder_weights) -> Trainer:
    """A Trainer matching the release's embedding with the feature map rebuilt from its encoder spec."""
    m = release.metadata
    public_map = build_public_map(m.encoder, norm_bound=m.norm_bound, second_moment_bound=m.second_moment_bound,
                                  moments=m.moments, weights_path=encoder_weights)
    released_dim = release.noisy["moment1"].shape[1]
    if public_map.feature_map.feature_dim != released_dim:  # the spec matched, so the file's D is forged
        raise EncoderMismatchError(f"the release's embedding has D = {released_dim}, but its encoder "
                                   f"{m.encoder.name!r} produces D = {public_map.feature_map.feature_dim}")
    # build_trainer also prepares the process (on the CPU glibc reuses freed memory: 1.12x faster steps)
    return build_trainer(config, public_map, release.mean_embeddings(), image_shape=m.image_shape, labelled=m.labelled)


def train_generator(
    release: Release,
    run_dir: str | os.PathLike,
    config: TrainConfig,
    *,
    resume: bool = False,
    explicit: set[str] | None = None,
    encoder_weights: str | os.PathLike | None = None,
    progress: bool = True,
    log: logging.Logger | logging.LoggerAdapter = logger,
    owner: dict[str, str] | None = None,
) -> dict:
    """Train (or resume) a generator on `release` into `run_dir`; returns run.json's summary (JSON-able).

    `explicit` names the config fields the caller set on purpose: on resume, those that would
    change the trajectory must agree with the checkpoint's; the rest are taken from it
    (storage.checkpoints.open_run holds the run-folder policy and its errors). `owner` (orchestrator
    run ids) is recorded in a folder this call begins (storage.checkpoints.write_run_owner), so that
    a retry of the same run resumes it (`train_task`).
    """
    info = ReleaseInfo.from_release(release)
    run = open_run(run_dir, info, config, resume=resume, explicit=set(explicit or ()))
    run_dir, config = run.run_dir, run.config
    if resume and run.state is None:
        log.info("no checkpoint in %s yet: starting a new run", run_dir)
    resolve_device(config.device)  # a bad device fails here, before the encoder is built
    trainer = _release_trainer(release, config, encoder_weights)
    if run.state is not None:
        trainer.load_state_dict(run.state)
        log.info("resuming %s at step %d of %d", run_dir, trainer.step, config.steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    if owner is not None and run.state is None:
        write_run_owner(run_dir, owner)
    labels, per_row = grid_labels(info.num_classes, info.labelled, info.cells_per_class)

    def on_checkpoint(trainer: Trainer, is_best: bool) -> None:
        grid = generate(trainer.sampling_generator, labels, seed=GRID_SEED)
        write_training_state(run_dir, trainer, config, info, is_best=is_best, grid=grid, per_row=per_row)
        best = " (best so far)" if is_best else ""
        log.info("step %d: criterion %.4e%s", trainer.step, trainer.criteria[-1][1], best)

    # Inside a Prefect run: a progress artifact, steps done / total steps (both public), throttled to
    # every 2% and 2 s (tasks.artifacts.RunProgress); shown whether or not the console bar is on.
    ui = RunProgress(TRAINING_PROGRESS_KEY, f"training {run_dir.name}: steps done of {config.steps}")
    ui.fraction(min(trainer.step, config.steps), config.steps)
    start_step, start = trainer.step, time.perf_counter()
    if trainer.step < config.steps:
        log.info("training %d steps on %s (batch %d, %s loss, lr %g %s)", config.steps - trainer.step, trainer.device,
                 config.batch_size, config.loss, config.lr_gen, config.lr_schedule)
        trainer.train(on_checkpoint=on_checkpoint, progress=progress,
                      on_step=lambda step, until: ui.fraction(step, config.steps))
    else:
        log.info("%s already holds %d steps (>= %d requested): nothing to train", run_dir, trainer.step, config.steps)
    ui.finish()
    trained = trainer.step - start_step
    steps_per_second = trained / (time.perf_counter() - start) if trained else 0.0
    best = best_checkpoint(run_dir)
    summary = {**run_summary(run_dir, trainer, config, info), "chosen_checkpoint": str(best) if best else None,
               "steps_trained": trained, "steps_per_second": steps_per_second,
               "images_per_second": steps_per_second * config.batch_size}
    write_run_summary(run_dir, summary)
    return summary


# --- sampling -----------------------------------------------------------------------------------

def sample_synthetic(
    run_dir: str | os.PathLike,
    n: int,
    out_path: str | os.PathLike | None = None,
    *,
    seed: int = SYNTHETIC_SEED,
    device: str = "cpu",
    log: logging.Logger | logging.LoggerAdapter = logger,
) -> dict:
    """n images from the run's best checkpoint (else its latest), class-balanced when labelled (with cells,
    a class's images drawn among its cells in proportion to their released noisy counts),
    written as uint8 to `out_path` (default RUN/synthetic.h5; .h5, .parquet, .npz, or DIR/ for an image
    folder: storage.synthetic) with their provenance (SyntheticInfo), and its DATASET_CARD.md beside it
    (storage.dataset_card). The result's "card" is the card's path."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise InvalidArgumentError(f"n must be an integer > 0, got {n!r}")
    run_dir = Path(run_dir)
    out_path = out_path if out_path is not None else run_dir / "synthetic.h5"
    export_format(out_path)  # InvalidArgumentError before any work; kept as given: a trailing "/" names a folder
    check_writable_dir(Path(out_path).parent)
    path = best_checkpoint(run_dir)
    if path is None:
        raise PathNotFoundError(f"{run_dir} holds no checkpoint ({BEST} or {LATEST}); train first")
    checkpoint = load_training_checkpoint(path)
    info = checkpoint.release
    config = TrainConfig.from_dict(checkpoint.config)
    generator = build_generator(info.image_shape, info.rows, info.labelled, conv28_channels=config.conv28_channels)
    state = checkpoint.state  # a run trained with ema_decay > 0 samples its weight average
    generator.load_state_dict(state["generator_ema"]["weights"] if "generator_ema" in state else state["generator"])
    generator.to(resolve_device(device))
    labels = balanced_labels(n, info.num_classes) if info.labelled else torch.zeros(n, dtype=torch.long)
    # with cells, each class's images spread over its cells by the released noisy counts (mepf_core.cells)
    rows = draw_rows(labels, info.row_shares, info.cells_per_class, seed)
    provenance = SyntheticInfo.from_release(info, steps=checkpoint.step, checkpoint=path.name, seed=seed)
    images = quantise(generate(generator, rows, seed=seed))
    written = write_synthetic(out_path, images, labels.numpy() if info.labelled else None, provenance)
    card = write_dataset_card(written, provenance, count=n, image_shape=tuple(images.shape[1:]), run=run_dir)
    log.info("wrote %d images from %s (step %d) to %s (card %s)", n, path.name, checkpoint.step, written, card.name)
    return {"path": str(Path(written).resolve()), "n": n, "steps": checkpoint.step, "checkpoint": str(path),
            "card": str(card.resolve())}


# --- Prefect tasks ------------------------------------------------------------------------------

@task(name="load-release", persist_result=False, cache_policy=NO_CACHE, **retry_options())
def load_release_task(path: str, trusted_keys: tuple[str, ...] = ()) -> Release:
    """Read and validate the release (structure, checksums, schema, recomputed epsilon, signature).

    With `trusted_keys` (PEM public key files), a release that is unsigned or signed by another key
    is refused (ReleaseUntrustedError). The public stage's only input. Retried (tasks.retries) only
    when reading fails for a transient reason (an OSError of a network file system), never for a
    refused release (ReleaseError).
    """
    release = read_release(path, trusted_keys=list(trusted_keys) if trusted_keys else None)
    m, sig = release.metadata, release.signature
    get_run_logger().info(
        "release %s: %s, epsilon %.4g at delta %.2g (recomputed from its noise), %d class(es), encoder %s, %s",
        m.release_id, m.dataset_id, m.epsilon, m.delta, m.num_classes, m.encoder.name,
        f"signed by {sig.fingerprint}" + (" (trusted)" if sig.trusted else "") if sig.signed else "unsigned",
    )
    return release


def _prefect_run() -> tuple[dict[str, str] | None, int, int]:
    """(owner ids {"flow_run", "task_run"}, the task run's attempt, the flow run's attempt) of the current
    Prefect task run; (None, 1, 1) outside one (the plain function, `train_task.fn`)."""
    from prefect.context import FlowRunContext, TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is None or ctx.task_run is None:
        return None, 1, 1
    flow_ctx = FlowRunContext.get()
    flow_attempt = flow_ctx.flow_run.run_count if flow_ctx is not None and flow_ctx.flow_run is not None else 1
    owner = {"flow_run": str(ctx.task_run.flow_run_id), "task_run": str(ctx.task_run.id)}
    return owner, ctx.task_run.run_count, flow_attempt


def _resume_on_retry(run_dir: str, resume: bool, owner: dict[str, str] | None, task_attempt: int,
                     flow_attempt: int, log) -> bool:
    """`resume` for this attempt of the train-generator task: True on a retry of the run that began the folder.

    A fresh run records who began it (`owner.json`: the Prefect flow run and task run). A retry, that
    is the task's attempt > 1 (Prefect's task retries) or the flow run's attempt > 1 (a flow run
    retried from the UI or the API after its worker died), finds its own flow run there and resumes
    from the latest checkpoint: never from step 0, so a retry never overwrites the checkpoints
    (`checkpoint_best.pt` included) the failed attempt wrote, and the checkpoint's config is the
    requested one, so the resume rules (`storage.checkpoints.merge_resume_config`) accept it. A folder
    begun by anyone else is refused as before (PathExistsError, a user error, never retried): a retry
    never continues another run. A new command (`mepf train` again) is a new flow run: pass `--resume`.
    """
    if resume or owner is None or (task_attempt <= 1 and flow_attempt <= 1) or latest_checkpoint(run_dir) is None:
        return resume
    recorded = read_run_owner(run_dir)
    if recorded is None or recorded.get("flow_run") != owner["flow_run"]:
        return resume
    log.warning("train-generator attempt %d (flow run attempt %d): resuming %s from its latest checkpoint",
                task_attempt, flow_attempt, run_dir)
    return True


@task(name="train-generator", persist_result=True, cache_policy=NO_CACHE,
      **retry_options(TRAIN_RETRIES, TRAIN_RETRY_DELAY_SECONDS))
def train_task(
    release: Release,
    run_dir: str,
    config: TrainConfig,
    resume: bool,
    explicit: list[str],
    encoder_weights: str | None,
    progress: bool = True,
) -> dict:
    """`train_generator` as a Prefect task that resumes when it is retried.

    Retries (tasks.retries): TRAIN_RETRIES (2), TRAIN_RETRY_DELAY_SECONDS (30 s) apart, on transient
    failures only (OSError, RuntimeError such as CUDA out of memory, MemoryError, TimeoutError); user
    errors (MepfError: a taken folder, a changed trajectory, a damaged checkpoint) fail at once. A retry
    continues from the latest checkpoint (`_resume_on_retry`), losing at most `checkpoint_every` steps,
    and ends at the same final step. The same holds when the flow run itself is retried (from the UI or
    API, e.g. after its worker process was killed): its own folder is resumed. No timeout: a run takes
    minutes to hours. The public stage charges no privacy budget, so a retry costs nothing but time.
    A new invocation (`mepf train` again after a SIGKILL) is a new flow run: pass `--resume`.
    """
    log = get_run_logger()
    owner, task_attempt, flow_attempt = _prefect_run()
    resume = _resume_on_retry(run_dir, resume, owner, task_attempt, flow_attempt, log)
    try:
        return train_generator(
            release, run_dir, config, resume=resume, explicit=set(explicit), encoder_weights=encoder_weights,
            progress=progress, log=log, owner=owner,
        )
    except Exception as exc:
        # The traceback's frames hold the failed attempt's trainer (on a GPU, gigabytes): clear their
        # locals so a retry after an out-of-memory error starts with that memory free.
        traceback.clear_frames(exc.__traceback__)
        raise


@task(name="sample-synthetic", persist_result=True, cache_policy=NO_CACHE, **retry_options())
def sample_task(run_dir: str, n: int, out_path: str | None, seed: int, device: str) -> dict:
    """`sample_synthetic` as a Prefect task: retried from the start (RETRIES, RETRY_DELAY_SECONDS apart) on
    transient failures only (tasks.retries); the set is written atomically and is a function of (checkpoint,
    n, seed), so a retry writes the same images. No timeout: its time grows with n."""
    return sample_synthetic(run_dir, n, out_path, seed=seed, device=device, log=get_run_logger())
