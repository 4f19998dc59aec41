"""Shared benchmark plumbing: medians, machine facts, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def command_line(env_keys: tuple[str, ...]) -> str:
    """The exact invocation: the environment variables among `env_keys` that were set, then the
    interpreter (relative to the repository when inside it) and the arguments."""
    root = RESULTS.parent.parent
    exe = Path(sys.executable)
    exe = exe.relative_to(root) if exe.is_relative_to(root) else exe
    return " ".join([*(f"{k}={os.environ[k]}" for k in env_keys if k in os.environ), str(exe), *sys.argv])


def environment(env_keys: tuple[str, ...]) -> dict:
    """What decides CPU threading behaviour, recorded with every row (unset variables as None)."""
    return {key: os.environ.get(key) for key in env_keys}


def env_label(env: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in env.items() if v is not None) or "default"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(f"{r.get(c, '')}".ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)
