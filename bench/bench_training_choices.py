"""Training choices on one release: steps, learning-rate schedule, generator width, moments.

Trains with the production `Trainer` straight from a release file (no checkpoints, no Prefect),
draws 10,000 class-balanced images (or more, `--ns`), and reports what the quality benchmark
reports, more cheaply: logistic-regression and CNN accuracy on the real Fashion-MNIST test split
and FID of 1,000 synthetic images against 1,000 real test images (the statistics `mepf evaluate
--fid-reference 1000` caches, computed here if absent). One line of JSON per run is appended to
bench/results/training_choices.jsonl with its command.

    python bench/bench_training_choices.py --release R.h5 [--steps 10000] [--lr 2e-3]
        [--schedule cosine|constant] [--channels 16 8] [--hidden 500] [--ns 10000 60000] [--no-fid]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import RESULTS  # noqa: E402
from mepf_core import generators  # noqa: E402
from mepf_core.classifiers import downstream_accuracy  # noqa: E402
from mepf_core.public_map import build_public_map  # noqa: E402
from mepf_core.training import Trainer, TrainConfig, balanced_labels, generate  # noqa: E402
from storage.datasets import open_dataset  # noqa: E402
from storage.release import read_release  # noqa: E402
from tasks.evaluation import fid_against_reference  # noqa: E402

def widen_conv28(hidden: int, channels: tuple[int, int]) -> None:
    """Make build_generator's 28x28 generator use these widths (the paper's: 500, (16, 8))."""
    init = generators.Conv28Generator.__init__

    def wide_init(self, num_classes, labelled, **_ignored):
        init(self, num_classes, labelled, hidden=hidden, channels=channels)

    generators.Conv28Generator.__init__ = wide_init


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release", required=True)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    ap.add_argument("--channels", type=int, nargs=2, default=[16, 8])
    ap.add_argument("--hidden", type=int, default=500)
    ap.add_argument("--ns", type=int, nargs="+", default=[10_000], help="synthetic training-set sizes")
    ap.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    widen_conv28(args.hidden, tuple(args.channels))
    release = read_release(args.release)
    m = release.metadata
    public = build_public_map(m.encoder, norm_bound=m.norm_bound, second_moment_bound=m.second_moment_bound,
                              moments=m.moments)
    config = TrainConfig(steps=args.steps, lr_gen=args.lr, lr_schedule=args.schedule, checkpoint_every=args.steps)
    trainer = Trainer(config, public, release.mean_embeddings(), image_shape=m.image_shape, labelled=m.labelled)
    start = time.perf_counter()
    trainer.train(progress=False)
    train_s = time.perf_counter() - start
    labels = balanced_labels(max(args.ns), trainer.num_classes)
    images = (generate(trainer.generator, labels, seed=0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    test_x, test_y = open_dataset("fashion-mnist", "test", None).load_all(None)
    accuracy = {}
    for n in args.ns:
        names = ("logreg", "cnn") if n <= 10_000 else ("cnn",)
        got = downstream_accuracy(images[:n], labels.numpy()[:n], test_x, test_y, classifiers=names, seed=0)
        accuracy.update({f"{k}@{n}": v for k, v in got.items()})
    row = {"release": args.release, "moments": m.moments, "epsilon": m.epsilon, "steps": args.steps, "lr": args.lr,
           "schedule": args.schedule, "channels": args.channels, "hidden": args.hidden,
           "train_s": round(train_s), "steps_per_s": round(args.steps / train_s, 2),
           "criterion": trainer.best_criterion, "accuracy": accuracy,
           "fid_1000": fid_against_reference(images, test_x[:1000], "fashion-mnist:test", 1000) if args.fid else None,
           "command": "python " + shlex.join(sys.argv)}
    print(json.dumps(row))
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "training_choices.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
