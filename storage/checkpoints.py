"""Run-directory files of a generator training run: checkpoints, run.json, loss curve, sample grid.

A run directory holds

    checkpoint_latest.pt   the most recent training state (resume from here)
    checkpoint_best.pt     the state with the lowest release-based criterion (sample from here)
    run.json               a small JSON summary (config, release, progress, best step)
    owner.json             which orchestrator run began the folder ({"flow_run": ID, "task_run": ID}; Prefect
                           ids, written by tasks.public.train_task), so a retry of that run may resume it
    loss.png, samples.png  the loss curve and a sample grid, refreshed at each checkpoint

Each checkpoint carries its own config and release description (a storage.provenance.ReleaseInfo
under "release"), so it can be sampled from or resumed without anything else. Every file is written
atomically: a crash leaves the previous version, never a partial one.

The run-folder policy lives here too (`open_run`): a folder holding a run is never trained into
again unless resuming, a resumed run must come from the same release, and a resume keeps the
checkpoint's config except for the fields in RESUMABLE_OVERRIDES.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mepf_core.errors import (InvalidArgumentError, MepfError, NotAFolderError, NotWritableError, PathExistsError,
                              PathNotFoundError, file_access_error)
from mepf_core.training import TrainConfig
from storage.atomic import atomic_path
from storage.provenance import ReleaseInfo

if TYPE_CHECKING:
    from mepf_core.training import Trainer

FORMAT = "dp-mepf-checkpoint"
FORMAT_VERSION = 1
LATEST = "checkpoint_latest.pt"
BEST = "checkpoint_best.pt"
RUN_JSON = "run.json"
LOSS_PNG = "loss.png"
SAMPLES_PNG = "samples.png"
OWNER_JSON = "owner.json"
# Config fields a resumed run may change. None alters the numbers of the steps already planned,
# except `steps` under the cosine schedule, whose remaining decay stretches to the new length.
RESUMABLE_OVERRIDES = ("steps", "device", "precision", "checkpoint_every")
GRID_COLUMNS = 10


class CheckpointError(MepfError):
    """A checkpoint file is unreadable, truncated or not a dp-mepf checkpoint."""


def save_checkpoint(path: str | os.PathLike, *, state: dict, config: Mapping, release: ReleaseInfo | Mapping) -> Path:
    """Write {format, version, config, release, state} atomically with torch.save.

    `release` is the run's ReleaseInfo (written as its to_dict()); a plain mapping is written as is.
    """
    path = Path(path)
    release = release.to_dict() if isinstance(release, ReleaseInfo) else dict(release)
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "config": dict(config), "release": release, "state": state}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)  # a file object: a full disk is an OSError with its errno, not torch's RuntimeError
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and check a checkpoint; raises CheckpointError for anything that is not a valid one, and a
    `mepf_core.errors.FileAccessError` (PermissionDeniedError, ...) when the environment refuses the read."""
    path = Path(path)
    if not path.is_file():
        raise PathNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as exc:  # permission denied, an I/O error...: the environment, not a damaged file
        mapped = file_access_error(exc, f"cannot read checkpoint {path}", path)
        if mapped is None:
            raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
        raise mapped from exc
    except Exception as exc:  # torch raises RuntimeError/EOFError/UnpicklingError on damaged files
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dp-mepf checkpoint")
    if payload.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} is not supported (expected {FORMAT_VERSION})")
    missing = [k for k in ("config", "release", "state") if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    return payload


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The run's latest checkpoint, or None when it has none yet."""
    path = Path(run_dir) / LATEST
    return path if path.is_file() else None


def best_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The run's best checkpoint by the release-based criterion, else its latest, else None."""
    path = Path(run_dir) / BEST
    return path if path.is_file() else latest_checkpoint(run_dir)


def write_run_summary(run_dir: str | os.PathLike, summary: dict) -> Path:
    """run.json: small, human-readable; non-finite numbers are written as null."""
    path = Path(run_dir) / RUN_JSON
    text = json.dumps(_finite(summary), indent=2, sort_keys=True, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return path


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def save_loss_curve(path: str | os.PathLike, history: list[float], criteria: list[tuple[int, float]]) -> Path:
    """PNG of the per-step squared distance (and its running mean) with the criterion at checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if history:
            steps = np.arange(1, len(history) + 1)
            ax.plot(steps, history, lw=0.5, alpha=0.4, color="tab:blue", label="batch squared distance")
            window = max(1, len(history) // 50)
            if window > 1:
                smooth = np.convolve(history, np.ones(window) / window, mode="valid")
                ax.plot(steps[window - 1 :], smooth, lw=1.5, color="tab:blue", label=f"running mean ({window} steps)")
        if criteria:
            s, v = zip(*criteria)
            ax.plot(s, v, "o-", color="tab:red", ms=3, label="criterion (fixed sample vs release)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("squared distance to the release")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path


def save_sample_grid(path: str | os.PathLike, images: torch.Tensor, per_row: int) -> Path:
    """PNG grid of images in [0, 1] (N x C x H x W), `per_row` per row (one row per class)."""
    from torchvision.utils import save_image

    path = Path(path)
    with atomic_path(path) as tmp:
        save_image(images.clamp(0, 1), tmp, nrow=per_row, padding=2, pad_value=1.0, format="png")
    return path


@dataclass(frozen=True)
class TrainingCheckpoint:
    """A checkpoint read back with its provenance typed: config (TrainConfig.to_dict() form), release, state."""

    path: Path
    config: dict
    release: ReleaseInfo
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])


def load_training_checkpoint(path: str | os.PathLike) -> TrainingCheckpoint:
    """`load_checkpoint` plus a typed release; raises CheckpointError when its "release" lacks a field."""
    payload = load_checkpoint(path)
    from storage.provenance import ProvenanceError

    try:
        release = ReleaseInfo.from_dict(payload["release"], where=f"{path}: release")
    except ProvenanceError as exc:
        raise CheckpointError(str(exc)) from None
    return TrainingCheckpoint(Path(path), payload["config"], release, payload["state"])


# --- run-folder policy --------------------------------------------------------------------------

def check_writable_dir(path: str | os.PathLike) -> Path:
    """Fail now, before any work, if `path` cannot become a writable folder; create nothing.

    Returns the absolute path; raises NotAFolderError (a file is in the way), NotWritableError, or
    ReadOnlyFileSystemError / DiskFullError (`mepf_core.errors.file_access_error`) for those causes.
    """
    path = Path(path).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotAFolderError(f"output folder {path} cannot be created: {existing} is not a folder")
    try:  # a real write probe: os.access is not enough on read-only mounts or for root
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:  # a read-only file system, a full disk...: named as such; else "not writable"
        mapped = file_access_error(exc, f"output folder {path} cannot be written ({existing})")
        if mapped is None or isinstance(mapped, PermissionError):
            raise NotWritableError(
                f"output folder {path} is not writable ({existing}: {exc.strerror or exc})") from exc
        raise mapped from exc
    return path


def merge_resume_config(saved: Mapping, requested: TrainConfig, explicit: set[str]) -> TrainConfig:
    """The checkpoint's config with the RESUMABLE_OVERRIDES taken from `requested`.

    `explicit` names the fields the caller set on purpose; one outside RESUMABLE_OVERRIDES that differs
    from the checkpoint's would change the run's trajectory and raises InvalidArgumentError.
    """
    saved_cfg = TrainConfig.from_dict(dict(saved))
    conflicts = [
        f"{name}: checkpoint has {getattr(saved_cfg, name)!r}, requested {getattr(requested, name)!r}"
        for name in sorted(explicit - set(RESUMABLE_OVERRIDES))
        if hasattr(saved_cfg, name) and getattr(saved_cfg, name) != getattr(requested, name)
    ]
    if conflicts:
        raise InvalidArgumentError(
            "resume would change the run's trajectory; start a new run instead (" + "; ".join(conflicts) + ")")
    overrides = {name: getattr(requested, name) for name in RESUMABLE_OVERRIDES}
    return TrainConfig.from_dict({**saved_cfg.to_dict(), **overrides})


@dataclass(frozen=True)
class RunStart:
    """Where a training run starts: its folder (absolute), its config, and the state to resume (or None)."""

    run_dir: Path
    config: TrainConfig
    state: dict | None


def open_run(run_dir: str | os.PathLike, release: ReleaseInfo, config: TrainConfig, *, resume: bool,
             explicit: set[str]) -> RunStart:
    """Apply the run-folder policy; creates nothing.

    A folder holding a checkpoint is refused (PathExistsError) unless `resume`; a resumed checkpoint
    must be of the same release (InvalidArgumentError) and keeps its config (`merge_resume_config`).
    `resume` on a folder without a checkpoint starts a new run.
    """
    run_dir = check_writable_dir(run_dir)
    previous = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if previous is None:
        return RunStart(run_dir, config, None)
    if not resume:
        raise PathExistsError(f"{run_dir} already holds a training run ({previous.name}); pass resume=True or choose "
                              f"another output folder")
    checkpoint = load_training_checkpoint(previous)
    if checkpoint.release.release_id != release.release_id:
        raise InvalidArgumentError(
            f"{previous} was trained on release {checkpoint.release.release_id}, "
            f"not on {release.release_id} ({release.path}); use another output folder"
        )
    return RunStart(run_dir, merge_resume_config(checkpoint.config, config, explicit), checkpoint.state)


def write_run_owner(run_dir: str | os.PathLike, owner: Mapping[str, str]) -> Path:
    """OWNER_JSON: the ids of the orchestrator run that began this folder (strings), written atomically.

    Read back by `read_run_owner`: a retry of that same run (tasks.public.train_task) resumes the
    folder instead of being refused as a folder that holds a run.
    """
    path = Path(run_dir) / OWNER_JSON
    text = json.dumps({str(k): str(v) for k, v in owner.items()}, sort_keys=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return path


def read_run_owner(run_dir: str | os.PathLike) -> dict[str, str] | None:
    """The ids `write_run_owner` recorded, or None when the folder has none (or an unreadable one)."""
    path = Path(run_dir) / OWNER_JSON
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {str(k): str(v) for k, v in owner.items()} if isinstance(owner, dict) else None


def grid_labels(num_classes: int, labelled: bool, cells_per_class: int = 1) -> tuple[torch.Tensor, int]:
    """Generator rows of the sample grid and images per grid row: one grid row per class (GRID_COLUMNS
    each, cycling through the class's cells when the release has cells); unlabelled 8 x 8."""
    if not labelled:
        return torch.zeros(64, dtype=torch.long), 8
    classes = torch.arange(num_classes).repeat_interleave(GRID_COLUMNS)
    return classes * cells_per_class + torch.arange(GRID_COLUMNS).repeat(num_classes) % cells_per_class, GRID_COLUMNS


def run_summary(run_dir: Path, trainer: "Trainer", config: TrainConfig, release: ReleaseInfo) -> dict:
    """run.json's content: config, release summary, encoder name, progress, best step, criteria, time."""
    recent = trainer.history[-50:]
    return {
        "run_dir": str(run_dir),
        "config": config.to_dict(),
        "release": release.summary_dict(),
        "encoder": release.encoder.name,
        "steps_done": trainer.step,
        "final_loss": float(np.mean(recent)) if recent else None,
        "best_step": trainer.best_step,
        "best_criterion": trainer.best_criterion,
        "criteria": [list(c) for c in trainer.criteria],
        "train_seconds": trainer.train_seconds,
    }


def write_training_state(run_dir: Path, trainer: "Trainer", config: TrainConfig, release: ReleaseInfo, *,
                         is_best: bool, grid: torch.Tensor, per_row: int) -> None:
    """At a checkpoint: the latest (and best) checkpoint, loss curve, sample grid (`grid`: images in
    [0, 1], N x C x H x W) and run.json, each atomically."""
    state = trainer.state_dict()
    save_checkpoint(run_dir / LATEST, state=state, config=config.to_dict(), release=release)
    if is_best:
        save_checkpoint(run_dir / BEST, state=state, config=config.to_dict(), release=release)
    save_loss_curve(run_dir / LOSS_PNG, trainer.history, trainer.criteria)
    save_sample_grid(run_dir / SAMPLES_PNG, grid, per_row)
    write_run_summary(run_dir, run_summary(run_dir, trainer, config, release))
