"""Quality benchmark: Fashion-MNIST, labelled, delta 1e-5, several epsilons under one CPU budget.

For each epsilon and training seed: `mepf release` (full 60k train split) -> `mepf train` (the same
--steps for all) -> `mepf sample` -> `mepf evaluate` against the **report half** of the public test
split (`fashion-mnist:test-report`: FID against its first --fid-reference images; logreg, MLP and
CNN trained on the synthetic images, tested on its 5,000 images). The selection half
(`fashion-mnist:test-select`) is the only data any choice looks at: here, the `resnet` classifier's
fixed schedule (--resnet: `mepf_core.classifiers.resnet_select`, DPImageBench's protocol: a
ResNet-style network on the synthetic images, the best (learning rate, epoch) on validation data);
hyperparameters are chosen with bench/bench_levers.py on the selection half. No choice looks at the
private training split. With --ceiling, the first run also trains the same classifiers on real
training images: the non-private ceiling (--resnet-ceiling: the `resnet` classifier on --resnet-samples
real training images). Every number in the result file comes with the command
that produced it.

    python bench/bench_quality.py [--epsilons 0.2 1 10] [--seeds 0 1 2] [--steps 10000] [--n-samples 10000]
        [--fid-samples 1000] [--fid-reference 1000] [--ema-decay D] [--cells-per-class M] [--resnet]
        [--resnet-samples 60000] [--ceiling] [--ceiling-from DIR] [--resnet-ceiling] [--fid-floor N]
        [--tag NAME]
    python bench/bench_quality.py --add-resnet DIR... [--resnet-samples 60000]   # finished runs' rows

Rows merge into bench/results/quality_split.json by (epsilon, seed, tag): a new row replaces an old
one with the same key. bench/results/quality.json holds the rows measured before the split (chosen
and reported on the same test images), kept for the record.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, table, write_result  # noqa: E402
from storage.metrics import FID_MIN_SAMPLES  # noqa: E402

MEPF = str(Path(sys.executable).with_name("mepf"))
REPORT = "fashion-mnist:test-report"  # every reported figure
SELECT = "fashion-mnist:test-select"  # every choice
RESULT = "quality_split"


def mepf(*args: str) -> tuple[dict, float, str]:
    cmd = [MEPF, *args, "--json"]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"})
    if out.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{out.stderr[-3000:]}")
    text = out.stdout
    return json.loads(text[text.index("{"):]), time.perf_counter() - start, "mepf " + shlex.join(cmd[1:])


def resnet_row(run_dir: Path, n: int) -> dict:
    """DPImageBench-style classifier: `resnet_select` on n images sampled from the finished `mepf train`
    run `run_dir` (DPImageBench: 60,000), the schedule's (lr, epoch) chosen on the selection half, the
    accuracy of that choice on the report half. The row's update includes the `mepf sample` command."""
    from storage.synthetic import read_synthetic

    synthetic = run_dir / f"synthetic-resnet-{n}.h5"
    _, _, sample_cmd = mepf("sample", "--run", str(run_dir), "--n", str(n), "--out", str(synthetic))
    images, labels, _ = read_synthetic(synthetic)
    return resnet_scores(images, labels, [sample_cmd])


def resnet_scores(images, labels, commands: list[str]) -> dict:
    """`resnet_select` trained on (images uint8 N x 1 x 28 x 28, labels (N,)): the (lr, epoch) chosen on the
    selection half, its accuracy on the report half, the minutes it took and the commands."""
    from mepf_core.classifiers import resnet_select
    from tasks.evaluation import load_reference

    select_x, select_y = load_reference.fn(SELECT)
    report_x, report_y = load_reference.fn(REPORT)
    start = time.perf_counter()
    chosen = resnet_select(images, labels, select_x, select_y, report_x, num_classes=10, seed=0)
    return {"acc_resnet": round(float((chosen.predictions == report_y).mean()), 4),
            "resnet_choice": {"lr": chosen.lr, "epoch": chosen.epoch,
                              "select_acc": round(chosen.select_accuracy[(chosen.lr, chosen.epoch)], 4)},
            "resnet_train_images": len(images), "resnet_minutes": round((time.perf_counter() - start) / 60, 1),
            "resnet_commands": [*commands, "python " + shlex.join(sys.argv) + "  (mepf_core.classifiers.resnet_select)"]}


def resnet_ceiling_row(n: int, args) -> dict:
    """The `resnet` classifier's non-private ceiling: the same schedule and choice on the first n real
    training images (Fashion-MNIST's training split is public here; n = --resnet-samples)."""
    from tasks.evaluation import load_reference

    images, labels = load_reference.fn("fashion-mnist:train", limit=n)
    return {"epsilon": "real data (resnet ceiling)", "seed": None, "tag": args.tag, "reference": REPORT,
            **resnet_scores(images, labels, [])}


def release_run(eps: float, seed: int, d: Path, args) -> dict:
    """release -> train -> sample -> evaluate at one epsilon and seed; the row with its commands."""
    d.mkdir(parents=True)
    rel, t_rel, c1 = mepf("release", "--dataset", "fashion-mnist", "--labelled", "--target-epsilon", f"{eps:g}",
                          "--target-delta", "1e-5", "--out", str(d / "release.h5"),
                          *(["--cells-per-class", str(args.cells_per_class)] if args.cells_per_class else []))
    train = ["train", "--release", rel["path"], "--out", str(d / "run"), "--steps", str(args.steps), "--seed", str(seed)]
    if args.ema_decay is not None:
        train += ["--ema-decay", f"{args.ema_decay:g}"]
    run, t_train, c2 = mepf(*train)
    _, _, c3 = mepf("sample", "--run", str(d / "run"), "--n", str(args.n_samples), "--out", str(d / "run" / "synthetic.h5"))
    ev_args = ["evaluate", "--run", str(d / "run"), "--reference", REPORT, "--fid-samples",
               str(args.fid_samples), "--classifiers", "logreg,mlp,cnn", "--out", str(d / "report")]
    if args.fid_reference:
        ev_args += ["--fid-reference", str(args.fid_reference)]
    if 0 < min(args.fid_samples, args.fid_reference or args.fid_samples) < FID_MIN_SAMPLES:
        ev_args.append("--allow-small-fid")  # the quality rows use 1,000 vs 1,000: comparable with each other only
    ev, _, c4 = mepf(*ev_args)
    row = {"epsilon": eps, "seed": seed, "tag": args.tag, "reference": REPORT, "epsilon_spent": round(rel["epsilon"], 6),
           "steps": run["steps_done"], "ema_decay": args.ema_decay or 0.0,
           "fid_counts": [ev["fid_synthetic_count"], ev["fid_reference_count"]],
           "train_minutes": round(t_train / 60, 1), "release_minutes": round(t_rel / 60, 1),
           **{k: round(v, 4) for k, v in ev["metrics"].items()}, "commands": [c1, c2, c3, c4]}
    if args.resnet:
        row.update(resnet_row(d / "run", args.resnet_samples))
    return row


def pipeline_row(out_dir: Path) -> dict:
    """The row of a finished `mepf run --out-dir DIR` (its report and run.json). For quality_split.json
    the run must have been evaluated on the report half (`mepf run --reference fashion-mnist:test-report`)."""
    run = json.loads((out_dir / "run" / "run.json").read_text())
    metrics = {r["metric"]: r["value"] for r in json.loads((out_dir / "report" / "metrics.json").read_text())
               if r.get("class_name") is None}  # class-wise accuracies (class_acc_*) are not columns here
    fid = [r for r in json.loads((out_dir / "report" / "metrics.json").read_text()) if r["metric"] == "fid"]
    eps = run["release"]["epsilon"]
    return {"epsilon": round(eps, 6), "epsilon_spent": round(eps, 6), "seed": run["config"]["seed"],
            "steps": run["steps_done"], "reference": REPORT,
            **({"fid_counts": [fid[0]["fid_synthetic_count"], fid[0]["fid_reference_count"]]} if fid else {}),
            "train_minutes": round(run["train_seconds"] / 60, 1),
            **{k: round(v, 4) for k, v in metrics.items()}, "commands": [f"mepf run --out-dir {out_dir}"]}


def ceiling_row(run_dir: Path, args) -> dict:
    """The same classifiers trained on as many real training images as the run has synthetic ones."""
    ev, _, cmd = mepf("evaluate", "--run", str(run_dir), "--reference", REPORT, "--fid-samples", "0",
                      "--classifiers", "logreg,mlp,cnn", "--ceiling", "--allow-private-reference",  # the ceiling trains on
                      "--out", str(run_dir.parent / "report-ceiling"))  # Fashion-MNIST's training split (public here)
    return {"epsilon": "real data (ceiling)", "seed": None, "tag": args.tag, "reference": REPORT,
            **{k: round(v, 4) for k, v in ev["ceiling"].items()}, "commands": [cmd]}


def fid_floor_row(n: int, reference_n: int, args) -> dict:
    """FID of n real training images against the report half's first reference_n: this estimator's floor."""
    from storage.datasets import open_dataset
    from tasks.evaluation import fid_against_reference, load_reference, reference_cache_key

    train_x, _ = open_dataset("fashion-mnist", "train", None).load_all(n)
    test_x, _ = load_reference.fn(REPORT, None, reference_n)
    fid = fid_against_reference(train_x, test_x, reference_cache_key(REPORT), n)
    return {"epsilon": "real data (FID floor)", "seed": None, "tag": args.tag, "reference": REPORT,
            "fid": round(fid, 4), "commands": ["python " + shlex.join(sys.argv)],
            "note": f"{n} real training images vs the first {reference_n} images of the report half"}


def key(row: dict) -> tuple:
    return str(row["epsilon"]), row.get("seed"), row.get("tag")


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """New rows replace old rows of the same (epsilon, seed, tag); the rest stay."""
    replaced = {key(r) for r in new}
    return [r for r in old if key(r) not in replaced] + new


def spread(rows: list[dict]) -> list[dict]:
    """Per (epsilon, tag) with >= 2 seeds: mean, sample standard deviation, min and max of each metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if isinstance(r["epsilon"], (int, float)):
            groups.setdefault((r["epsilon"], r.get("tag")), []).append(r)
    out = []
    for (eps, tag), members in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        if len(members) < 2:
            continue
        summary = {"epsilon": eps, "tag": tag, "seeds": sorted(m["seed"] for m in members)}
        by_counts: dict[str, list[float]] = {}  # FIDs at different sample sizes are not comparable
        for m in members:
            if "fid" in m and m.get("fid_counts"):
                by_counts.setdefault("fid@{}v{}".format(*m["fid_counts"]), []).append(m["fid"])
        for metric in (*sorted(by_counts), "acc_logreg", "acc_mlp", "acc_cnn", "acc_resnet"):
            values = by_counts.get(metric) or [m[metric] for m in members if metric in m]
            if len(values) >= 2:
                summary[metric] = {"mean": round(statistics.mean(values), 4), "sd": round(statistics.stdev(values), 4),
                                   "min": min(values), "max": max(values), "n": len(values)}
        out.append(summary)
    return out


def add_resnet(run_dirs: list[Path], n: int) -> None:
    """Add `resnet_row` to the rows of quality_split.json whose commands name each finished run's folder."""
    path = RESULTS / f"{RESULT}.json"
    data = json.loads(path.read_text())
    for d in run_dirs:
        mine = [r for r in data["rows"] if any(str(d / "release.h5") in c for c in r.get("commands", []))]
        if len(mine) != 1:
            raise SystemExit(f"{d}: {len(mine)} rows of {path} name {d / 'release.h5'} in their commands, need exactly 1")
        mine[0].update(resnet_row(d / "run", n))
        data["spread"] = spread(data["rows"])
        write_result(RESULT, data)
        print(d, {k: mine[0][k] for k in ("epsilon", "seed", "tag", "acc_cnn", "acc_resnet", "resnet_choice",
                                          "resnet_minutes")}, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilons", type=float, nargs="*", default=[0.2, 1.0, 10.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (mepf train --seed)")
    ap.add_argument("--steps", type=int, default=10_000, help="the same for every epsilon (the pipeline's default)")
    ap.add_argument("--n-samples", type=int, default=10_000)
    ap.add_argument("--fid-samples", type=int, default=1000)
    ap.add_argument("--fid-reference", type=int, default=1000, help="report-half images for the FID statistics")
    ap.add_argument("--cells-per-class", type=int, help="mepf release --cells-per-class (default: release's)")
    ap.add_argument("--ema-decay", type=float, default=None, help="mepf train --ema-decay (default: train's)")
    ap.add_argument("--resnet", action="store_true",
                    help="add the DPImageBench-style classifier (schedule chosen on the selection half)")
    ap.add_argument("--from-run", type=Path, help="also take the row of a finished `mepf run --out-dir DIR` "
                    "(evaluated with --reference fashion-mnist:test-report)")
    ap.add_argument("--ceiling", action="store_true",
                    help="train the classifiers on real images too (against the first run's synthetic set size)")
    ap.add_argument("--ceiling-from", type=Path, metavar="DIR",
                    help="the same as --ceiling against a finished run of this script (DIR: its eps<E>-seed<S> folder)")
    ap.add_argument("--resnet-ceiling", action="store_true",
                    help="train the --resnet classifier on --resnet-samples real training images (its ceiling)")
    ap.add_argument("--fid-floor", type=int, metavar="N", help="FID of N real training images (needs --fid-reference)")
    ap.add_argument("--tag", default="defaults", help="configuration label; rows merge by (epsilon, seed, tag)")
    ap.add_argument("--workdir", default="runs/bench-quality")
    ap.add_argument("--resnet-samples", type=int, default=60_000,
                    help="synthetic images the --resnet classifier trains on (DPImageBench: 60,000)")
    ap.add_argument("--add-resnet", type=Path, nargs="+", metavar="DIR",
                    help="add the --resnet classifier to the existing rows of finished runs of this script "
                         "(DIR: a run's folder, eps<E>-seed<S>, named in the row's commands); runs nothing else")
    args = ap.parse_args()
    if args.fid_floor and not args.fid_reference:
        ap.error("--fid-floor needs --fid-reference (the reference the synthetic FIDs use)")
    if args.add_resnet:
        return add_resnet(args.add_resnet, args.resnet_samples)
    work = Path(args.workdir) / time.strftime("%Y%m%d-%H%M%S")
    rows = [{**pipeline_row(args.from_run), "tag": args.tag}] if args.from_run else []
    for eps in args.epsilons:
        for seed in args.seeds:
            rows.append(release_run(eps, seed, work / f"eps{eps:g}-seed{seed}", args))
            print(table(rows[-1:], [k for k in rows[-1] if k not in ("commands", "resnet_choice")]), flush=True)
    if args.ceiling and args.epsilons:
        rows.append(ceiling_row(work / f"eps{args.epsilons[0]:g}-seed{args.seeds[0]}" / "run", args))
    if args.ceiling_from:
        rows.append(ceiling_row(args.ceiling_from / "run", args))
    if args.resnet_ceiling:
        rows.append(resnet_ceiling_row(args.resnet_samples, args))
    if args.fid_floor:
        rows.append(fid_floor_row(args.fid_floor, args.fid_reference, args))
    previous = RESULTS / f"{RESULT}.json"
    old = json.loads(previous.read_text()) if previous.is_file() else {}
    merged = merge(old.get("rows", []), rows)
    path = write_result(RESULT, {
        "protocol": f"figures on {REPORT} (5,000 images, 500 per class), choices on {SELECT}; "
                    "halves fixed by storage.references.split_half_indices",
        "commands": list(dict.fromkeys([*old.get("commands", []), "python " + shlex.join(sys.argv)])),
        "rows": merged, "spread": spread(merged)})
    cols = ["epsilon", "seed", "tag", "steps", "train_minutes", "fid", "acc_logreg", "acc_mlp", "acc_cnn", "acc_resnet"]
    print(table(json.loads(path.read_text())["rows"], cols))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
