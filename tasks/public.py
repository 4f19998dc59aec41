"""Public-stage tasks: release -> trained generator (run directory) -> synthetic dataset.

Only the release file and public things (encoder weights) are read here; the private dataset is
never opened. Each task is a thin wrapper over a plain function of the same job, so the functions
can be called (and tested) without Prefect. Training and sampling write files, so their tasks are
never cached; their small JSON-able results may be persisted.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from mepf_core.allocator import keep_freed_memory
from mepf_core.generators import build_generator
from mepf_core.public_map import EncoderMismatchError, build_public_map
from mepf_core.training import TrainConfig, Trainer, balanced_labels, generate, resolve_device
from storage.checkpoints import (
    BEST,
    LATEST,
    LOSS_PNG,
    SAMPLES_PNG,
    best_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_loss_curve,
    save_sample_grid,
    write_run_summary,
)
from storage.release import Release, read_release

logger = logging.getLogger(__name__)

# Config fields a resumed run may change. None alters the numbers of the steps already planned,
# except `steps` under the cosine schedule, whose remaining decay stretches to the new length.
RESUMABLE_OVERRIDES = ("steps", "device", "mixed_precision", "checkpoint_every")
GRID_SEED = 1  # fixed codes for the sample grid, so grids of successive checkpoints compare
GRID_COLUMNS = 10
SYNTHETIC_SEED = 0


# --- checks at the boundary ---------------------------------------------------------------------

def check_writable_dir(path: str | os.PathLike) -> Path:
    """Fail now, before any work, if `path` cannot become a writable folder; create nothing."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"output folder {path} cannot be created: {existing} is not a folder")
    try:  # a real write probe: os.access is not enough on read-only mounts or for root
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise PermissionError(f"output folder {path} is not writable ({existing}: {exc.strerror or exc})") from None
    return path


def release_info(release: Release) -> dict:
    """What a checkpoint records about its release: enough to sample and label without the file."""
    m = release.metadata
    return {
        "path": str(Path(release.path).resolve()),
        "release_id": m.release_id,
        "dataset_id": m.dataset_id,
        "epsilon": m.epsilon,
        "delta": m.delta,
        "labelled": m.labelled,
        "class_names": list(m.class_names),
        "num_classes": m.num_classes,
        "image_shape": list(m.image_shape),
        "moments": m.moments,
        "norm_bound": m.norm_bound,
        "second_moment_bound": m.second_moment_bound,
        "encoder": m.encoder.to_dict(),
    }


def merge_resume_config(saved: dict, requested: TrainConfig, explicit: set[str]) -> TrainConfig:
    """The checkpoint's config with the allowed overrides; explicit trajectory changes are refused."""
    saved_cfg = TrainConfig.from_dict(saved)
    conflicts = [
        f"{name}: checkpoint has {getattr(saved_cfg, name)!r}, requested {getattr(requested, name)!r}"
        for name in sorted(explicit - set(RESUMABLE_OVERRIDES))
        if hasattr(saved_cfg, name) and getattr(saved_cfg, name) != getattr(requested, name)
    ]
    if conflicts:
        raise ValueError("resume would change the run's trajectory; start a new run instead (" + "; ".join(conflicts) + ")")
    return replace(saved_cfg, **{name: getattr(requested, name) for name in RESUMABLE_OVERRIDES})


# --- training -----------------------------------------------------------------------------------

def _grid_labels(num_classes: int, labelled: bool) -> tuple[torch.Tensor, int]:
    """One row per class (GRID_COLUMNS images each); unlabelled: an 8 x 8 grid."""
    if not labelled:
        return torch.zeros(64, dtype=torch.long), 8
    return torch.arange(num_classes).repeat_interleave(GRID_COLUMNS), GRID_COLUMNS


def _checkpoint_writer(run_dir: Path, config: TrainConfig, info: dict, log):
    """The on_checkpoint callback: latest (and best) checkpoint, run.json, loss curve, sample grid."""
    grid_labels, per_row = _grid_labels(info["num_classes"], info["labelled"])

    def write(trainer: Trainer, is_best: bool) -> None:
        state = trainer.state_dict()
        save_checkpoint(run_dir / LATEST, state=state, config=config.to_dict(), release=info)
        if is_best:
            save_checkpoint(run_dir / BEST, state=state, config=config.to_dict(), release=info)
        save_loss_curve(run_dir / LOSS_PNG, trainer.history, trainer.criteria)
        save_sample_grid(run_dir / SAMPLES_PNG, generate(trainer.generator, grid_labels, seed=GRID_SEED), per_row)
        write_run_summary(run_dir, _summary(run_dir, trainer, config, info))
        log.info(
            "step %d: criterion %.4e%s", trainer.step, trainer.criteria[-1][1], " (best so far)" if is_best else ""
        )

    return write


def _summary(run_dir: Path, trainer: Trainer, config: TrainConfig, info: dict) -> dict:
    recent = trainer.history[-50:]
    return {
        "run_dir": str(run_dir),
        "config": config.to_dict(),
        "release": {k: info[k] for k in ("path", "release_id", "dataset_id", "epsilon", "delta", "class_names")},
        "encoder": info["encoder"]["name"],
        "steps_done": trainer.step,
        "final_loss": float(np.mean(recent)) if recent else None,
        "best_step": trainer.best_step,
        "best_criterion": trainer.best_criterion,
        "criteria": [list(c) for c in trainer.criteria],
        "train_seconds": trainer.train_seconds,
    }


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
    """Train (or resume) a generator on `release` into `run_dir`; returns a JSON-able summary.

    `explicit` names the config fields the caller set on purpose: on resume, those that would
    change the trajectory must agree with the checkpoint's; the rest are taken from it.
    """
    run_dir = check_writable_dir(run_dir)
    previous = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if previous is not None and not resume:
        raise FileExistsError(f"{run_dir} already holds a training run ({previous.name}); pass resume=True or choose another output folder")
    m = release.metadata
    state = None
    if previous is not None:
        checkpoint = load_checkpoint(previous)
        if checkpoint["release"].get("release_id") != m.release_id:
            raise ValueError(
                f"{previous} was trained on release {checkpoint['release'].get('release_id')}, "
                f"not on {m.release_id} ({release.path}); use another output folder"
            )
        config = merge_resume_config(checkpoint["config"], config, set(explicit or ()))
        state = checkpoint["state"]
    elif resume:
        log.info("no checkpoint in %s yet: starting a new run", run_dir)
    resolve_device(config.device)  # a bad device fails here, before the encoder is built
    public_map = build_public_map(
        m.encoder,
        norm_bound=m.norm_bound,
        second_moment_bound=m.second_moment_bound,
        moments=m.moments,
        weights_path=encoder_weights,
    )
    released_dim = release.noisy["moment1"].shape[1]
    if public_map.feature_map.feature_dim != released_dim:  # the spec matched, so the file's D is forged
        raise EncoderMismatchError(f"the release's embedding has D = {released_dim}, but its encoder "
                                   f"{m.encoder.name!r} produces D = {public_map.feature_map.feature_dim}")
    if resolve_device(config.device).type == "cpu":
        keep_freed_memory()  # reuse freed activation memory: 1.12x faster CPU steps with VGG19
    trainer = Trainer(config, public_map, release.mean_embeddings(), image_shape=m.image_shape, labelled=m.labelled)
    if state is not None:
        trainer.load_state_dict(state)
        log.info("resuming %s at step %d of %d", run_dir, trainer.step, config.steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = release_info(release)
    start_step, start = trainer.step, time.perf_counter()
    if trainer.step < config.steps:
        log.info(
            "training %d steps on %s (batch %d, %s loss, lr %g %s)",
            config.steps - trainer.step, trainer.device, config.batch_size, config.loss, config.lr_gen,
            config.lr_schedule,
        )
        trainer.train(on_checkpoint=_checkpoint_writer(run_dir, config, info, log), progress=progress)
    else:
        log.info("%s already holds %d steps (>= %d requested): nothing to train", run_dir, trainer.step, config.steps)
    elapsed = time.perf_counter() - start
    trained = trainer.step - start_step
    steps_per_second = trained / elapsed if trained else 0.0
    summary = _summary(run_dir, trainer, config, info)
    best = best_checkpoint(run_dir)
    summary.update(
        chosen_checkpoint=str(best) if best else None,
        steps_trained=trained,
        steps_per_second=steps_per_second,
        images_per_second=steps_per_second * config.batch_size,
    )
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
    written as uint8 to `out_path` (default RUN/synthetic.h5) with the release's budget and id."""
    from storage.synthetic import write_synthetic  # written alongside; imported where needed

    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be an integer > 0, got {n!r}")
    run_dir = Path(run_dir)
    out_path = Path(out_path) if out_path is not None else run_dir / "synthetic.h5"
    if out_path.suffix.lower() not in (".h5", ".parquet"):
        raise ValueError(f"synthetic dataset must end in .h5 or .parquet, got {out_path.name!r}")
    check_writable_dir(out_path.parent)
    path = best_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint ({BEST} or {LATEST}); train first")
    checkpoint = load_checkpoint(path)
    info, state = checkpoint["release"], checkpoint["state"]
    generator = build_generator(tuple(info["image_shape"]), info["num_classes"], info["labelled"])
    generator.load_state_dict(state["generator"])
    generator.to(resolve_device(device))
    labels = balanced_labels(n, info["num_classes"]) if info["labelled"] else torch.zeros(n, dtype=torch.long)
    images = generate(generator, labels, seed=seed)
    pixels = (images * 255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    metadata = {
        "epsilon": info["epsilon"],
        "delta": info["delta"],
        "release_id": info["release_id"],
        "dataset_id": info["dataset_id"],
        "encoder": info["encoder"]["name"],
        "class_names": info["class_names"] if info["labelled"] else None,
        "steps": int(state["step"]),
        "checkpoint": path.name,
        "seed": seed,
    }
    written = write_synthetic(out_path, pixels, labels.numpy() if info["labelled"] else None, metadata)
    log.info("wrote %d images from %s (step %d) to %s", n, path.name, state["step"], written)
    return {"path": str(Path(written).resolve()), "n": n, "steps": int(state["step"]), "checkpoint": str(path)}


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
