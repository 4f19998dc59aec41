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
from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from mepf_core.allocator import keep_freed_memory
from mepf_core.errors import InvalidArgumentError, PathNotFoundError
from mepf_core.generators import build_generator
from mepf_core.public_map import EncoderMismatchError, build_public_map
from mepf_core.training import TrainConfig, Trainer, balanced_labels, generate, resolve_device
from storage.checkpoints import (
    BEST,
    LATEST,
    RESUMABLE_OVERRIDES,  # noqa: F401 - re-exported: the resume rule's public name
    best_checkpoint,
    check_writable_dir,
    grid_labels,
    load_training_checkpoint,
    open_run,
    run_summary,
    write_run_summary,
    write_training_state,
)
from storage.provenance import ReleaseInfo, SyntheticInfo
from storage.release import Release, read_release
from storage.synthetic import SUFFIXES, quantise, write_synthetic

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
    if resolve_device(config.device).type == "cpu":
        keep_freed_memory()  # reuse freed activation memory: 1.12x faster CPU steps with VGG19
    return Trainer(config, public_map, release.mean_embeddings(), image_shape=m.image_shape, labelled=m.labelled)


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
) -> dict:
    """Train (or resume) a generator on `release` into `run_dir`; returns run.json's summary (JSON-able).

    `explicit` names the config fields the caller set on purpose: on resume, those that would
    change the trajectory must agree with the checkpoint's; the rest are taken from it
    (storage.checkpoints.open_run holds the run-folder policy and its errors).
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
    labels, per_row = grid_labels(info.num_classes, info.labelled)

    def on_checkpoint(trainer: Trainer, is_best: bool) -> None:
        grid = generate(trainer.generator, labels, seed=GRID_SEED)
        write_training_state(run_dir, trainer, config, info, is_best=is_best, grid=grid, per_row=per_row)
        best = " (best so far)" if is_best else ""
        log.info("step %d: criterion %.4e%s", trainer.step, trainer.criteria[-1][1], best)

    start_step, start = trainer.step, time.perf_counter()
    if trainer.step < config.steps:
        log.info("training %d steps on %s (batch %d, %s loss, lr %g %s)", config.steps - trainer.step, trainer.device,
                 config.batch_size, config.loss, config.lr_gen, config.lr_schedule)
        trainer.train(on_checkpoint=on_checkpoint, progress=progress)
    else:
        log.info("%s already holds %d steps (>= %d requested): nothing to train", run_dir, trainer.step, config.steps)
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
    """n images from the run's best checkpoint (else its latest), class-balanced when labelled,
    written as uint8 to `out_path` (default RUN/synthetic.h5) with their provenance (SyntheticInfo)."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise InvalidArgumentError(f"n must be an integer > 0, got {n!r}")
    run_dir = Path(run_dir)
    out_path = Path(out_path) if out_path is not None else run_dir / "synthetic.h5"
    if out_path.suffix.lower() not in SUFFIXES:
        raise InvalidArgumentError(f"synthetic dataset must end in .h5 or .parquet, got {out_path.name!r}")
    check_writable_dir(out_path.parent)
    path = best_checkpoint(run_dir)
    if path is None:
        raise PathNotFoundError(f"{run_dir} holds no checkpoint ({BEST} or {LATEST}); train first")
    checkpoint = load_training_checkpoint(path)
    info = checkpoint.release
    generator = build_generator(info.image_shape, info.num_classes, info.labelled)
    generator.load_state_dict(checkpoint.state["generator"])
    generator.to(resolve_device(device))
    labels = balanced_labels(n, info.num_classes) if info.labelled else torch.zeros(n, dtype=torch.long)
    provenance = SyntheticInfo.from_release(info, steps=checkpoint.step, checkpoint=path.name, seed=seed)
    written = write_synthetic(out_path, quantise(generate(generator, labels, seed=seed)),
                              labels.numpy() if info.labelled else None, provenance)
    log.info("wrote %d images from %s (step %d) to %s", n, path.name, checkpoint.step, written)
    return {"path": str(Path(written).resolve()), "n": n, "steps": checkpoint.step, "checkpoint": str(path)}


# --- Prefect tasks ------------------------------------------------------------------------------

@task(name="load-release", persist_result=False, cache_policy=NO_CACHE)
def load_release_task(path: str, trusted_keys: tuple[str, ...] = ()) -> Release:
    """Read and validate the release (structure, checksums, schema, recomputed epsilon, signature).

    With `trusted_keys` (PEM public key files), a release that is unsigned or signed by another key
    is refused (ReleaseUntrustedError). The public stage's only input.
    """
    release = read_release(path, trusted_keys=list(trusted_keys) if trusted_keys else None)
    m, sig = release.metadata, release.signature
    get_run_logger().info(
        "release %s: %s, epsilon %.4g at delta %.2g (recomputed from its noise), %d class(es), encoder %s, %s",
        m.release_id, m.dataset_id, m.epsilon, m.delta, m.num_classes, m.encoder.name,
        f"signed by {sig.fingerprint}" + (" (trusted)" if sig.trusted else "") if sig.signed else "unsigned",
    )
    return release


@task(name="train-generator", persist_result=True, cache_policy=NO_CACHE)
def train_task(
    release: Release,
    run_dir: str,
    config: TrainConfig,
    resume: bool,
    explicit: list[str],
    encoder_weights: str | None,
    progress: bool = True,
) -> dict:
    return train_generator(
        release, run_dir, config, resume=resume, explicit=set(explicit), encoder_weights=encoder_weights,
        progress=progress, log=get_run_logger(),
    )


@task(name="sample-synthetic", persist_result=True, cache_policy=NO_CACHE)
def sample_task(run_dir: str, n: int, out_path: str | None, seed: int, device: str) -> dict:
    return sample_synthetic(run_dir, n, out_path, seed=seed, device=device, log=get_run_logger())
