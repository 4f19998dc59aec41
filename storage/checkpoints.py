"""Run-directory files of a generator training run: checkpoints, run.json, loss curve, sample grid.

A run directory holds

    checkpoint_latest.pt   the most recent training state (resume from here)
    checkpoint_best.pt     the state with the lowest release-based criterion (sample from here)
    run.json               a small JSON summary (config, release, progress, best step)
    loss.png, samples.png  the loss curve and a sample grid, refreshed at each checkpoint

Each checkpoint carries its own config and release description, so it can be sampled from or
resumed without anything else. Every file is written atomically: a crash leaves the previous
version, never a partial one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from storage.atomic import atomic_path

FORMAT = "dp-mepf-checkpoint"
FORMAT_VERSION = 1
LATEST = "checkpoint_latest.pt"
BEST = "checkpoint_best.pt"
RUN_JSON = "run.json"
LOSS_PNG = "loss.png"
SAMPLES_PNG = "samples.png"


class CheckpointError(Exception):
    """A checkpoint file is unreadable, truncated or not a dp-mepf checkpoint."""


def save_checkpoint(path: str | os.PathLike, *, state: dict, config: dict, release: dict) -> Path:
    """Write {format, version, config, release, state} atomically with torch.save."""
    path = Path(path)
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "config": dict(config), "release": dict(release), "state": state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and check a checkpoint; raises CheckpointError for anything that is not a valid one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
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


def read_run_summary(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        raise FileNotFoundError(f"run summary {path} does not exist")
    return json.loads(path.read_text())


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
