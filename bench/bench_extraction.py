"""Extraction benchmark: images/s and peak RSS of the custodian's streaming pass, by n and encoder.

Each (encoder, n) runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own; memory must
stay flat in n because only K x D float64 sums are kept (target: peak RSS at the largest n within
10% of the smallest n's, reported per encoder as `memory_flat`). Repeats give a median rate.

    python bench/bench_extraction.py [--sizes 10000 30000 60000] [--encoders efficientnet-lite0 vgg19] [--repeats 1]

Results merge into bench/results/extraction.json by (encoder, n, env), so slow encoders can run with
smaller sizes in a separate invocation; each row keeps the command that produced it and the OpenMP
environment it ran under (`env`; on a shared machine OMP_WAIT_POLICY=PASSIVE changes the rate a lot).

VGG19 uses random weights when its ImageNet file is absent offline (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.common import command_line, env_label, environment, median, table, write_result  # noqa: E402

ENV_KEYS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "LD_PRELOAD")  # threading and allocator settings recorded per row
FLAT_TOLERANCE = 0.10  # peak RSS may grow at most 10% from the smallest to the largest n

CHILD = r"""
import json, resource, sys, time
import torch
from mepf_core.encoders import EncoderWeightsMissingError, build_feature_map
from storage.params import ReleaseParams
from tasks.custodian import extract_shard
import tasks.custodian as tc
encoder, n = sys.argv[1], int(sys.argv[2])
random_init = False
try:
    build_feature_map(encoder)
except EncoderWeightsMissingError:
    random_init = True
    tc._feature_map = lambda p: build_feature_map(p.encoder, random_init=True)
params = ReleaseParams(target_epsilon=1.0, out="unused.h5", limit=n, encoder=encoder, labelled=True,
                       neighbouring="replace-one")  # the first N: refused under add-remove
t = time.perf_counter()
sums = extract_shard.fn(params, 0)
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "random_init": random_init, "feature_dim": int(sums.moment1.shape[1])}))
"""


def run(encoder: str, n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, encoder, str(n)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Earlier rows for other (encoder, n, env) keys are kept, so one file holds every encoder's run."""
    key = lambda r: (r["encoder"], r["n"], r.get("env", "default"))  # noqa: E731
    fresh = {key(r) for r in new}
    kept = [r for r in old if key(r) not in fresh]
    return sorted(kept + new, key=lambda r: (r.get("env", "default"), r["encoder"], r["n"]))


def memory_flat(rows: list[dict]) -> dict:
    """Per encoder (and OpenMP environment): peak RSS at the largest n over the smallest n's."""
    out = {}
    for env, encoder in sorted({(r.get("env", "default"), r["encoder"]) for r in rows}):
        mine = sorted((r for r in rows if r["encoder"] == encoder and r.get("env", "default") == env),
                      key=lambda r: r["n"])
        ratio = mine[-1]["peak_rss_mib"] / mine[0]["peak_rss_mib"]
        out[encoder if env == "default" else f"{encoder} ({env})"] = {
            "n_from": mine[0]["n"], "n_to": mine[-1]["n"], "rss_ratio": round(ratio, 3),
            "within_10pct": ratio <= 1 + FLAT_TOLERANCE}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 60_000])
    ap.add_argument("--encoders", nargs="+", default=["efficientnet-lite0"])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    command = command_line(ENV_KEYS)
    env = env_label(environment(ENV_KEYS))
    rows = []
    for encoder in args.encoders:
        base_rss = None
        for n in args.sizes:
            runs = [run(encoder, n) for _ in range(args.repeats)]
            rss = median([r["peak_rss_mib"] for r in runs])
            base_rss = base_rss or rss
            rows.append({"encoder": encoder, "n": n, "feature_dim": runs[0]["feature_dim"],
                         "random_init": runs[0]["random_init"],
                         "images_per_s": round(median([n / r["seconds"] for r in runs]), 1),
                         "wall_s": round(median([r["seconds"] for r in runs]), 1),
                         "peak_rss_mib": round(rss, 1), "rss_vs_smallest": round(rss / base_rss, 3),
                         "repeats": args.repeats, "env": env, "command": command})
            print(table(rows[-1:], [c for c in rows[-1] if c != "command"]), flush=True)
    previous = common.RESULTS / "extraction.json"  # read at call time, so tests can redirect it
    old = json.loads(previous.read_text()).get("rows", []) if previous.is_file() else []
    rows = merge_rows(old, rows)
    commands = list(dict.fromkeys(r["command"] for r in rows))
    path = write_result("extraction", {"commands": commands, "rows": rows, "memory_flat": memory_flat(rows)})
    print(table(rows, [c for c in rows[0] if c != "command"]))
    for encoder, check in memory_flat(rows).items():
        print(f"{encoder}: peak RSS x{check['rss_ratio']} from n={check['n_from']} to n={check['n_to']} "
              f"({'within' if check['within_10pct'] else 'OUTSIDE'} the 10% target)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
