"""FID Inception pass benchmark: images per second of `images_to_inception_activations`, fast path
against the reference path, side by side.

Variants (each over the same fixed images, interleaved in rounds A B C, then B C A, ...; images/s is
the median over rounds, `ratio` the median per-round ratio against `reference`):

- reference: the model's own forward (pytorch-fid's preprocessing inside the model, NCHW), batch 50:
  what `mepf evaluate` runs.
- fast: this module's preprocessing (grayscale resized as one channel, in-place scaling) and a
  channels-last network, batch 50 (fast=True; not the default: measured slower on a loaded AVX2 CPU).
- fast_b100, fast_b200: the fast path with larger batches.
- fast_bf16 (`--bf16`): the fast path under bfloat16 autocast (only worth it with native bf16; the
  FID change is reported in `fid_vs_reference`, not adopted).

For each variant also: the largest absolute difference of its activations from the reference path's
and the FID between its activations and the reference's of the same images (0 would be identical).

    python bench/bench_inception.py [--n 100] [--repeats 3] [--gray] [--bf16] [--device cpu|cuda]

Writes bench/results/inception.json (rows keyed by device and variant, merged with earlier runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.common import command_line, env_label, environment, median, table, write_result  # noqa: E402
from mepf_core.fid import fid_from_activations  # noqa: E402
from mepf_core.inception import images_to_inception_activations  # noqa: E402
from storage.weights import load_fid_inception  # noqa: E402

ENV_KEYS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "LD_PRELOAD")


def variants(bf16: bool, device: str) -> dict[str, tuple[dict, contextlib.AbstractContextManager | None]]:
    out = {"reference": ({"fast": False, "batch_size": 50}, None),
           "fast": ({"fast": True, "batch_size": 50}, None),
           "fast_b100": ({"fast": True, "batch_size": 100}, None),
           "fast_b200": ({"fast": True, "batch_size": 200}, None)}
    if bf16:
        out["fast_bf16"] = ({"fast": True, "batch_size": 50}, lambda: torch.autocast(device, dtype=torch.bfloat16))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="images per pass")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--gray", action="store_true", help="28x28 grayscale uint8 images (Fashion-MNIST-like); "
                                                        "default 32x32 RGB uint8 (CIFAR-like)")
    ap.add_argument("--bf16", action="store_true", help="also time the fast path under bf16 autocast")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--only", nargs="+", help="variants to run (default all)")
    ap.add_argument("--out", default="inception", help="result name under bench/results/")
    args = ap.parse_args()
    if args.n < 2 or args.repeats < 1:
        ap.error("--n must be >= 2 and --repeats >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda requested but torch sees no CUDA device")
    shape = (1, 28, 28) if args.gray else (3, 32, 32)
    images = np.random.default_rng(0).integers(0, 256, size=(args.n, *shape), dtype=np.uint8)
    model = load_fid_inception(args.device)
    chosen = {k: v for k, v in variants(args.bf16, args.device).items() if not args.only or k in args.only}
    if "reference" not in chosen:
        ap.error("the reference variant is needed for the ratios")
    names = list(chosen)
    times = {k: [] for k in names}
    acts = {}
    load_before = os.getloadavg()[0]
    for r in range(args.repeats + 1):  # round 0 is the warm-up (oneDNN primitive caches), not timed
        for name in names[r % len(names):] + names[:r % len(names)]:
            kwargs, ctx = chosen[name]
            with ctx() if ctx else contextlib.nullcontext():
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                a = images_to_inception_activations(model, images, device=args.device, **kwargs)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t
            if r == 0:
                acts[name] = a
            else:
                times[name].append(elapsed)
    load = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
    command, env = command_line(ENV_KEYS), environment(ENV_KEYS)
    ref = acts["reference"]
    rows = []
    for name in names:
        s = median(times[name])
        rows.append({"device": args.device, "env": env_label(env), "images": f"{args.n} x {'x'.join(map(str, shape))} uint8",
                     "variant": name, **{k: v for k, v in chosen[name][0].items()},
                     "s_per_pass": round(s, 3), "images_per_s": round(args.n / s, 2),
                     "ratio": round(median([b / v for b, v in zip(times["reference"], times[name])]), 3),
                     "max_abs_diff_vs_reference": float(np.abs(acts[name] - ref).max()),
                     "fid_vs_reference": round(fid_from_activations(acts[name], ref), 4) if args.n > 2 else None,
                     "loadavg_1min": load, "command": command})
    print(table(rows, ["variant", "batch_size", "s_per_pass", "images_per_s", "ratio", "max_abs_diff_vs_reference",
                       "fid_vs_reference"]))
    previous = common.RESULTS / f"{args.out}.json"
    old = json.loads(previous.read_text()) if previous.is_file() else {}
    key = lambda row: (row.get("device"), row.get("env"), row.get("images"), row["variant"])  # noqa: E731
    fresh = {key(row) for row in rows}
    all_rows = [row for row in old.get("rows", []) if key(row) not in fresh] + rows
    path = write_result(args.out, {
        "columns": {"images_per_s": "images over the pass's wall time, median over rounds",
                    "ratio": "reference s/pass over this variant's, per round, median (> 1: faster)",
                    "max_abs_diff_vs_reference": "largest |activation difference| from the reference path, same images",
                    "fid_vs_reference": "FID between this variant's activations and the reference's of the same "
                                        "images (identical activations give ~0)"},
        "commands": list(dict.fromkeys(r["command"] for r in all_rows)), "rows": all_rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
