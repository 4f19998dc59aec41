"""Quality benchmark: Fashion-MNIST, labelled, delta 1e-5, several epsilons under one CPU budget.

For each epsilon: `mepf release` (full 60k train split) -> `mepf train` (the same --steps for all)
-> `mepf sample` -> `mepf evaluate` (FID against the real test split; logreg, MLP and CNN trained on
synthetic images, tested on the real test split). With --ceiling, the first run also trains the
same classifiers on real training images: the non-private ceiling. Every number in the result file comes with the
command that produced it.

    python bench/bench_quality.py [--epsilons 0.2 1 10] [--steps 10000] [--n-samples 10000] [--fid-samples 5000]
                                  [--fid-reference N] [--from-run DIR] [--ceiling] [--fid-floor N]

Rows merge into bench/results/quality.json by epsilon (a new row replaces an old one of the same
epsilon), each with the commands that produced it.
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

from bench.common import RESULTS, table, write_result  # noqa: E402
from storage.metrics import FID_MIN_SAMPLES  # noqa: E402

MEPF = str(Path(sys.executable).with_name("mepf"))


def mepf(*args: str) -> tuple[dict, float, str]:
    cmd = [MEPF, *args, "--json"]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"})
    if out.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{out.stderr[-3000:]}")
    text = out.stdout
    return json.loads(text[text.index("{"):]), time.perf_counter() - start, "mepf " + shlex.join(cmd[1:])


def release_run(eps: float, d: Path, args) -> dict:
    """release -> train -> sample -> evaluate at one epsilon; the row with its four commands."""
    d.mkdir(parents=True)
    rel, t_rel, c1 = mepf("release", "--dataset", "fashion-mnist", "--labelled", "--target-epsilon", f"{eps:g}",
                          "--target-delta", "1e-5", "--out", str(d / "release.h5"))
    run, t_train, c2 = mepf("train", "--release", rel["path"], "--out", str(d / "run"), "--steps", str(args.steps))
    _, _, c3 = mepf("sample", "--run", str(d / "run"), "--n", str(args.n_samples), "--out", str(d / "run" / "synthetic.h5"))
    ev_args = ["evaluate", "--run", str(d / "run"), "--reference", "fashion-mnist:test", "--fid-samples",
               str(args.fid_samples), "--classifiers", "logreg,mlp,cnn", "--out", str(d / "report")]
    if args.fid_reference:
        ev_args += ["--fid-reference", str(args.fid_reference)]
    if 0 < min(args.fid_samples, args.fid_reference or args.fid_samples) < FID_MIN_SAMPLES:
        ev_args.append("--allow-small-fid")  # the quality rows use 1,000 vs 1,000: comparable with each other only
    ev, _, c4 = mepf(*ev_args)
    return {"epsilon": eps, "epsilon_spent": round(rel["epsilon"], 6), "steps": run["steps_done"],
            "train_minutes": round(t_train / 60, 1), "release_minutes": round(t_rel / 60, 1),
            **{k: round(v, 4) for k, v in ev["metrics"].items()}, "commands": [c1, c2, c3, c4]}


def pipeline_row(out_dir: Path) -> dict:
    """The row of a finished `mepf run --out-dir DIR` (its report and run.json)."""
    run = json.loads((out_dir / "run" / "run.json").read_text())
    metrics = {r["metric"]: r["value"] for r in json.loads((out_dir / "report" / "metrics.json").read_text())}
    eps = run["release"]["epsilon"]
    return {"epsilon": round(eps, 6), "epsilon_spent": round(eps, 6), "steps": run["steps_done"],
            "train_minutes": round(run["train_seconds"] / 60, 1),
            **{k: round(v, 4) for k, v in metrics.items()}, "commands": [f"mepf run --out-dir {out_dir}"]}


def ceiling_row(run_dir: Path, args) -> dict:
    """The same classifiers trained on as many real training images as the run has synthetic ones."""
    ev, _, cmd = mepf("evaluate", "--run", str(run_dir), "--reference", "fashion-mnist:test", "--fid-samples", "0",
                      "--classifiers", "logreg,mlp,cnn", "--ceiling", "--allow-private-reference",  # the ceiling trains on
                      "--out", str(run_dir.parent / "report-ceiling"))  # Fashion-MNIST's training split (public here)
    return {"epsilon": "real data (ceiling)", **{k: round(v, 4) for k, v in ev["ceiling"].items()}, "commands": [cmd]}


def fid_floor_row(n: int, reference_n: int) -> dict:
    """FID of n real training images against the reference: what this FID estimator gives real data."""
    from storage.datasets import open_dataset
    from tasks.evaluation import fid_against_reference

    train_x, _ = open_dataset("fashion-mnist", "train", None).load_all(n)
    test_x, _ = open_dataset("fashion-mnist", "test", None).load_all(reference_n)
    fid = fid_against_reference(train_x, test_x, "fashion-mnist:test", n)
    return {"epsilon": "real data (FID floor)", "fid": round(fid, 4), "commands": ["python " + shlex.join(sys.argv)],
            "note": f"{n} real training images vs {reference_n} real test images"}


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """New rows replace old rows of the same epsilon (or the same real-data row); the rest stay."""
    replaced = {str(r["epsilon"]) for r in new}
    return [r for r in old if str(r["epsilon"]) not in replaced] + new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilons", type=float, nargs="*", default=[0.2, 1.0, 10.0])
    ap.add_argument("--steps", type=int, default=10_000, help="the same for every epsilon (the pipeline's default)")
    ap.add_argument("--n-samples", type=int, default=10_000)
    ap.add_argument("--fid-samples", type=int, default=5000)
    ap.add_argument("--fid-reference", type=int, default=None, help="real test images for the FID statistics")
    ap.add_argument("--from-run", type=Path, help="also take the row of a finished `mepf run --out-dir DIR`")
    ap.add_argument("--ceiling", action="store_true",
                    help="train the classifiers on real images too (against the first run's synthetic set size)")
    ap.add_argument("--fid-floor", type=int, metavar="N", help="FID of N real training images (needs --fid-reference)")
    ap.add_argument("--workdir", default="runs/bench-quality")
    args = ap.parse_args()
    if args.fid_floor and not args.fid_reference:
        ap.error("--fid-floor needs --fid-reference (the reference the synthetic FIDs use)")
    work = Path(args.workdir) / time.strftime("%Y%m%d-%H%M%S")
    rows = [pipeline_row(args.from_run)] if args.from_run else []
    for eps in args.epsilons:
        rows.append(release_run(eps, work / f"eps{eps:g}", args))
        print(table(rows[-1:], [k for k in rows[-1] if k != "commands"]), flush=True)
    first_run = args.from_run / "run" if args.from_run else (work / f"eps{args.epsilons[0]:g}" / "run" if args.epsilons else None)
    if args.ceiling and first_run is not None:
        rows.append(ceiling_row(first_run, args))
    if args.fid_floor:
        rows.append(fid_floor_row(args.fid_floor, args.fid_reference))
    previous = RESULTS / "quality.json"
    old = json.loads(previous.read_text()) if previous.is_file() else {}
    path = write_result("quality", {"commands": list(dict.fromkeys([*old.get("commands", []), "python " + shlex.join(sys.argv)])),
                                    "rows": merge(old.get("rows", []), rows)})
    cols = ["epsilon", "steps", "train_minutes", "fid", "acc_logreg", "acc_mlp", "acc_cnn"]
    print(table(json.loads(path.read_text())["rows"], cols))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
