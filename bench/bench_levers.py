"""Quality levers as A/Bs on one release, measured on the selection half of the test split.

Trains with the production `Trainer` straight from a release file (no checkpoints, no Prefect),
draws `--n` class-balanced images (production quantisation, sampling seed 0) and trains the
downstream classifiers on them once; each classifier's predictions are scored on both fixed halves
of the real Fashion-MNIST test split (`storage.references.split_half_indices`). Decisions use the
`select` figures only; the `report` figures are recorded so a kept lever's reported figure needs no
second run. FID (optional, `--fid N`): N synthetic against the first N images of the selection half.

Weight averages (`--ema D1 D2 ...`) are tracked beside the same run (`mepf_core.training.WeightAverage`,
updated after every step), so "raw" and each "ema<D>" variant come from one trajectory at the same
CPU time (the averages' own update cost is recorded as `ema_update_s`). One JSON line per variant is
appended to bench/results/levers.jsonl with its command.

    python bench/bench_levers.py --release R.h5 --lever NAME [--steps 3000] [--lr 2e-3]
        [--schedule cosine|constant] [--batch-size 100] [--seed 0] [--ema 0.999 0.9999]
        [--hidden 500] [--channels 16 8] [--n 10000] [--classifiers logreg cnn] [--fid 1000] [--save DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import RESULTS  # noqa: E402
from mepf_core import generators  # noqa: E402
from mepf_core.classifiers import CLASSIFIERS  # noqa: E402
from mepf_core.public_map import build_public_map  # noqa: E402
from mepf_core.training import Trainer, TrainConfig, WeightAverage, balanced_labels, generate  # noqa: E402
from storage.release import read_release  # noqa: E402
from storage.synthetic import quantise, read_synthetic  # noqa: E402
from tasks.evaluation import fid_against_reference, load_reference  # noqa: E402

LEVERS = RESULTS / "levers.jsonl"


def test_halves() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'select': (images, labels), 'report': (images, labels)}: the two fixed halves of the test split."""
    return {short: load_reference.fn(f"fashion-mnist:test-{short}") for short in ("select", "report")}


def score(images: np.ndarray, labels: np.ndarray, halves: dict, classifiers: list[str], seed: int = 0) -> dict:
    """{half: {classifier: accuracy}} for classifiers trained once on (images, labels)."""
    test_x = np.concatenate([halves["select"][0], halves["report"][0]])
    cut = len(halves["select"][0])
    out: dict[str, dict[str, float]] = {"select": {}, "report": {}, "seconds": {}}
    for name in classifiers:
        start = time.perf_counter()
        predicted = CLASSIFIERS[name](images, labels, test_x, num_classes=10, seed=seed)
        out["seconds"][name] = round(time.perf_counter() - start, 1)
        for half, part in (("select", predicted[:cut]), ("report", predicted[cut:])):
            out[half][name] = round(float((part == halves[half][1]).mean()), 4)
    return out


def nearest_mean_step(trainer: Trainer, weight: float, temperature: float):
    """A train_step with a class-separation term built from the release alone (post-processing, no privacy cost).

    The released class means m_c (K x D) define a nearest-mean classifier in feature space: logits_c(phi) =
    -||phi - m_c||^2 / tau = (2 phi.m_c - ||m_c||^2 - ||phi||^2) / tau. Each generated image's bounded feature
    vector phi (B x D, norm C) gets the cross-entropy of its own label under these logits, weighted by `weight`
    beside the production matching loss; tau = `temperature` x the mean squared distance between two different
    classes' released means, so the term's scale does not depend on D or C.
    """
    import torch

    from mepf_core.encoders import concat_features
    from mepf_core.features import bound_norm
    from mepf_core.losses import class_weight_matrix

    means = trainer.loss.targets["moment1"]
    k = len(means)
    pair = torch.cdist(means.double(), means.double()).square()
    tau = float(temperature * pair.sum() / (k * (k - 1)))
    sq_means = (means * means).sum(dim=1)
    fm, gen = trainer.feature_map, trainer.generator

    def step():
        labels = trainer._step_labels()
        codes = gen.sample_codes(labels, trainer.rng)
        weights = class_weight_matrix(labels, k)
        for group in trainer.optimizer.param_groups:
            group["lr"] = trainer._learning_rate(trainer.step)
        outputs = [o.float() for o in fm.stage_outputs(gen(codes))]
        loss, distance = trainer.loss(fm.class_means(outputs, weights))
        phi = bound_norm(concat_features(outputs), fm.norm_bound)
        logits = (2 * phi @ means.T - sq_means) / tau
        loss = loss + weight * torch.nn.functional.cross_entropy(logits, labels)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        trainer.step += 1
        return distance

    return step


def widen_conv28(hidden: int, channels: tuple[int, int]) -> None:
    """Make build_generator's 28x28 generator use these widths (the paper's: 500, (16, 8))."""
    init = generators.Conv28Generator.__init__

    def wide_init(self, num_classes, labelled, **_ignored):
        init(self, num_classes, labelled, hidden=hidden, channels=channels)

    generators.Conv28Generator.__init__ = wide_init


def resnet_cost(args) -> None:
    """Seconds for one epoch of `resnet_select` (one learning rate) on N real training images, scoring
    both halves after it; the row extrapolates to the full schedule on 60,000 images."""
    from mepf_core.classifiers import RESNET_EPOCHS, RESNET_LRS, resnet_select
    from storage.datasets import open_dataset

    x, y = open_dataset("fashion-mnist", "train", None).load_all(args.resnet_cost)
    halves = test_halves()
    start = time.perf_counter()
    resnet_select(x, y, *halves["select"], halves["report"][0], num_classes=10, seed=0, lrs=RESNET_LRS[:1], epochs=1)
    seconds = time.perf_counter() - start
    row = {"lever": "resnet-cost", "n_train": args.resnet_cost, "epoch_s": round(seconds, 1),
           "full_schedule_60k_h_estimate": round(seconds * 60_000 / args.resnet_cost * RESNET_EPOCHS * len(RESNET_LRS)
                                                 / 3600, 1),
           "loadavg_1min": round(os.getloadavg()[0], 1),
           "note": args.note, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "python " + shlex.join(sys.argv)}
    print(json.dumps(row), flush=True)
    with open(LEVERS, "a") as f:
        f.write(json.dumps(row) + "\n")


def saved_images(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images N x C x H x W uint8, labels) of a --save file (VARIANT.npz: images, labels) or of a labelled
    dataset `mepf sample` wrote (.h5 / .npz / .parquet: storage.synthetic)."""
    if path.suffix == ".npz":
        with np.load(path) as data:
            if "images" in data:
                return data["images"], data["labels"]
    images, labels, _ = read_synthetic(path)
    if labels is None:
        raise SystemExit(f"{path} holds no labels: the classifiers need a labelled synthetic dataset")
    return images, labels


def score_saved(args) -> None:
    """Score saved images with --classifiers (and FID with --fid N against the selection half): each
    --save file (VARIANT.npz) or `mepf sample` dataset (.npz / .h5) in the folder; rows name the file."""
    halves = test_halves()
    command = "python " + shlex.join(sys.argv)
    paths = sorted(p for p in args.from_images.iterdir() if p.suffix in (".npz", ".h5"))
    for path in paths:
        if args.variants and path.stem not in args.variants:
            continue
        images, labels = saved_images(path)
        scores = score(images, labels, halves, args.classifiers)
        fid = (fid_against_reference(images, halves["select"][0][: args.fid],
                                     "fashion-mnist:test#test-select", args.fid) if args.fid else None)
        row = {"lever": args.lever, "variant": path.stem, "images": str(path), "n_synthetic": len(labels),
               "select": scores["select"], "report": scores["report"], "classifier_s": scores["seconds"],
               f"fid_select_{args.fid}": None if fid is None else round(fid, 2),
               "note": args.note, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command}
        print(json.dumps(row), flush=True)
        with open(LEVERS, "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release")
    ap.add_argument("--lever", default="", help="name of the lever (the A/B this run belongs to)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ema", type=float, nargs="*", default=[], help="weight-average decays tracked beside the run")
    ap.add_argument("--hidden", type=int, default=500)
    ap.add_argument("--channels", type=int, nargs=2, default=[16, 8])
    ap.add_argument("--n", type=int, default=10_000, help="synthetic training-set size")
    ap.add_argument("--classifiers", nargs="+", default=["logreg", "cnn"])
    ap.add_argument("--fid", type=int, default=0, help="FID of N synthetic vs N selection-half images (0: off)")
    ap.add_argument("--save", type=Path, help="folder for each variant's images and labels (VARIANT.npz)")
    ap.add_argument("--from-images", type=Path, metavar="DIR",
                    help="no training: score the VARIANT.npz files a --save run wrote (other classifiers later)")
    ap.add_argument("--variants", nargs="+", help="with --from-images: only these variants (file stems)")
    ap.add_argument("--progress", action="store_true", help="training progress bar on stderr")
    ap.add_argument("--resnet-cost", type=int, metavar="N",
                    help="no training: time one epoch of the resnet classifier on N real training images")
    ap.add_argument("--ncm-weight", type=float, default=0.0,
                    help="weight of the nearest-released-mean cross-entropy term (nearest_mean_step; 0: off)")
    ap.add_argument("--ncm-temperature", type=float, default=0.1,
                    help="its temperature, as a fraction of the mean squared distance between class means")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    if args.from_images:
        return score_saved(args)
    if args.resnet_cost:
        return resnet_cost(args)
    if not args.release or not args.lever:
        ap.error("training needs --release and --lever")
    if (args.hidden, tuple(args.channels)) != (500, (16, 8)):
        widen_conv28(args.hidden, tuple(args.channels))
    release = read_release(args.release)
    m = release.metadata
    public = build_public_map(m.encoder, norm_bound=m.norm_bound, second_moment_bound=m.second_moment_bound,
                              moments=m.moments)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr_gen=args.lr, lr_schedule=args.schedule,
                         seed=args.seed, checkpoint_every=args.steps)
    trainer = Trainer(config, public, release.mean_embeddings(), image_shape=m.image_shape, labelled=m.labelled)
    averages = {f"ema{d:g}": WeightAverage(trainer.generator, d) for d in args.ema}
    ema_seconds = 0.0
    plain_step = nearest_mean_step(trainer, args.ncm_weight, args.ncm_temperature) if args.ncm_weight else trainer.train_step

    def step_and_average():
        nonlocal ema_seconds
        distance = plain_step()
        start = time.perf_counter()
        for average in averages.values():
            average.update(trainer.generator)
        ema_seconds += time.perf_counter() - start
        return distance

    trainer.train_step = step_and_average
    start = time.perf_counter()
    trainer.train(progress=args.progress)
    train_s = time.perf_counter() - start
    halves = test_halves()
    labels = balanced_labels(args.n, trainer.num_classes)
    variants = {"raw": trainer.generator, **{k: a.module for k, a in averages.items()}}
    command = "python " + shlex.join(sys.argv)
    for variant, generator in variants.items():
        images = quantise(generate(generator, labels, seed=0))
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(args.save / f"{variant}.npz", images=images, labels=labels.numpy())
        scores = score(images, labels.numpy(), halves, args.classifiers)
        fid = (fid_against_reference(images, halves["select"][0][: args.fid], "fashion-mnist:test#test-select",
                                     args.fid) if args.fid else None)
        row = {"lever": args.lever, "variant": variant, "release": args.release, "epsilon": m.epsilon,
               "moments": m.moments, "steps": args.steps, "lr": args.lr, "schedule": args.schedule,
               "batch_size": args.batch_size, "seed": args.seed, "hidden": args.hidden, "channels": args.channels,
               "ncm_weight": args.ncm_weight, "ncm_temperature": args.ncm_temperature,
               "n_synthetic": args.n, "train_s": round(train_s), "ema_update_s": round(ema_seconds, 1),
               "select": scores["select"], "report": scores["report"], "classifier_s": scores["seconds"],
               f"fid_select_{args.fid}": None if fid is None else round(fid, 2),
               "note": args.note, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command}
        print(json.dumps(row), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(LEVERS, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
