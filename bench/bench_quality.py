"""Quality benchmark: Fashion-MNIST, labelled, delta 1e-5, several epsilons under one CPU budget.

For each epsilon: `mepf release` (full 60k train split) -> `mepf train` (the same --steps for all)
-> `mepf sample` -> `mepf evaluate` (FID against the real test split; logreg, MLP and CNN trained on
synthetic images, tested on the real test split). With --ceiling, the first run also trains the
same classifiers on real training images: the non-private ceiling. Every number in the result file comes with the
command that produced it.

    python bench/bench_quality.py [--epsilons 0.2 1 10] [--steps 10000] [--n-samples 10000] [--fid-samples 5000]
                                  [--fid-reference N] [--ceiling]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import table, write_result  # noqa: E402

MEPF = str(Path(sys.executable).with_name("mepf"))


def mepf(*args: str) -> tuple[dict, float, str]:
    cmd = [MEPF, *args, "--json"]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"})
    if out.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{out.stderr[-3000:]}")
    text = out.stdout
    return json.loads(text[text.index("{"):]), time.perf_counter() - start, "mepf " + shlex.join(cmd[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[0.2, 1.0, 10.0])
    ap.add_argument("--steps", type=int, default=10_000, help="the same for every epsilon (the pipeline's default)")
    ap.add_argument("--n-samples", type=int, default=10_000)
    ap.add_argument("--fid-samples", type=int, default=5000)
    ap.add_argument("--fid-reference", type=int, default=None, help="real test images for the FID statistics")
    ap.add_argument("--ceiling", action="store_true", help="train the classifiers on real images too (first run)")
    ap.add_argument("--workdir", default="runs/bench-quality")
    args = ap.parse_args()
    work = Path(args.workdir) / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    rows, commands = [], []
    for i, eps in enumerate(args.epsilons):
        d = work / f"eps{eps:g}"
        d.mkdir()
        rel, t_rel, c1 = mepf("release", "--dataset", "fashion-mnist", "--labelled", "--target-epsilon", f"{eps:g}",
                              "--target-delta", "1e-5", "--out", str(d / "release.h5"))
        run, t_train, c2 = mepf("train", "--release", rel["path"], "--out", str(d / "run"), "--steps", str(args.steps))
        smp, t_smp, c3 = mepf("sample", "--run", str(d / "run"), "--n", str(args.n_samples), "--out", str(d / "run" / "synthetic.h5"))
        ev_args = ["evaluate", "--run", str(d / "run"), "--reference", "fashion-mnist:test", "--fid-samples",
                   str(args.fid_samples), "--classifiers", "logreg,mlp,cnn", "--out", str(d / "report")]
        if args.fid_reference:
            ev_args += ["--fid-reference", str(args.fid_reference)]
        if args.ceiling and i == 0:
            ev_args.append("--ceiling")
        ev, t_ev, c4 = mepf(*ev_args)
        commands += [c1, c2, c3, c4]
        row = {"epsilon": eps, "epsilon_spent": round(rel["epsilon"], 6), "steps": run["steps_done"],
               "train_minutes": round(t_train / 60, 1), "release_minutes": round(t_rel / 60, 1),
               **{k: round(v, 4) for k, v in ev["metrics"].items()}}
        rows.append(row)
        if ev.get("ceiling"):
            rows.append({"epsilon": "real data (ceiling)", **{k: round(v, 4) for k, v in ev["ceiling"].items()}})
        print(table(rows[-1:], list(rows[-1])), flush=True)
    path = write_result("quality", {"command": "python " + shlex.join(sys.argv), "workdir": str(work),
                                    "rows": rows, "commands": commands})
    cols = ["epsilon", "steps", "train_minutes", "fid", "acc_logreg", "acc_mlp", "acc_cnn"]
    print(table(rows, cols))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
