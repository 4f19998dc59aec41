"""Extraction benchmark: images/s and peak RSS of the custodian's streaming pass, by n and encoder.

Each (encoder, n) runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own; memory must
stay flat in n because only K x D float64 sums are kept. Repeats give a median rate.

    python bench/bench_extraction.py [--sizes 10000 30000 60000] [--encoders efficientnet-lite0 vgg19] [--repeats 1]

VGG19 uses random weights when its ImageNet file is absent offline (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import median, table, write_result  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import torch
from mepf_core.encoders import EncoderWeightsMissingError, build_feature_map
from flows.release_params import ReleaseParams
from tasks.custodian import extract_shard
import tasks.custodian as tc
encoder, n = sys.argv[1], int(sys.argv[2])
random_init = False
try:
    build_feature_map(encoder)
except EncoderWeightsMissingError:
    random_init = True
    tc._feature_map = lambda p: build_feature_map(p.encoder, random_init=True)
params = ReleaseParams(target_epsilon=1.0, out="unused.h5", limit=n, encoder=encoder, labelled=True)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 60_000])
    ap.add_argument("--encoders", nargs="+", default=["efficientnet-lite0"])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
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
                         "peak_rss_mib": round(rss, 1), "rss_vs_smallest": round(rss / base_rss, 3)})
            print(table(rows[-1:], list(rows[-1])), flush=True)
    path = write_result("extraction", {"command": "python " + " ".join(sys.argv), "rows": rows})
    print(table(rows, list(rows[0])))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
