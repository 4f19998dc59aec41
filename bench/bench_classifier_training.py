"""Is the evaluator the limit? Train mepf's SmallCNN differently on one synthetic set, score both halves.

    OMP_NUM_THREADS=1 python bench/bench_classifier_training.py runs/X/run/synthetic.h5 cnn:5 cnn:10 cnn:10:aug

Each variant is MODEL:EPOCHS[:aug][:cos]: MODEL `cnn` (mepf's `SmallCNN`) or `drop` (the same with dropout
0.25 / 0.5 before its two linear layers); `aug`: random horizontal flips and shifts of up to 2 pixels;
`cos`: a cosine learning-rate schedule. `cnn:5` is what `mepf evaluate`'s cnn classifier does (Adam 1e-3,
batch 64, 5 epochs). The selection half decides; the report half is recorded beside it. Rows are printed
(and appended to results/levers.jsonl with --record).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from bench.bench_levers import LEVERS, test_halves  # noqa: E402
from mepf_core.classifiers import SmallCNN, _predict, _to_tensor  # noqa: E402
from storage.synthetic import read_synthetic  # noqa: E402


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels (background -1 fills the border)."""
    n, _, h, w = x.shape
    x = torch.where((torch.rand(n, generator=gen) < 0.5)[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx, dy = torch.randint(0, 5, (n,), generator=gen), torch.randint(0, 5, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


class DropoutCNN(SmallCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.dropout(F.relu(self.fc1(F.dropout(x.flatten(1), 0.25, self.training))), 0.5, self.training)
        return self.fc2(x)


def train(model, images, labels, *, epochs: int, aug: bool, cosine: bool, seed: int, lr=1e-3, batch_size=64):
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    total = epochs * -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, total) if cosine else None
    x, y = _to_tensor(images), torch.from_numpy(labels.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(augment(x[idx], gen) if aug else x[idx]), y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if schedule is not None:
                schedule.step()
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("synthetic", type=Path)
    p.add_argument("variants", nargs="+")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", action="store_true", help="append rows to results/levers.jsonl")
    p.add_argument("--note", default="")
    args = p.parse_args()
    images, labels, _ = read_synthetic(args.synthetic)
    halves = test_halves()
    for variant in args.variants:
        model_name, epochs, *flags = variant.split(":")
        model = (DropoutCNN if model_name == "drop" else SmallCNN)(*images.shape[1:], 10)
        start = time.perf_counter()
        train(model, images, labels, epochs=int(epochs), aug="aug" in flags, cosine="cos" in flags, seed=args.seed)
        row = {"lever": "classifier-training", "variant": variant, "images": str(args.synthetic), "n_synthetic": len(images),
               "classifier_s": {"cnn": round(time.perf_counter() - start, 1)}, "note": args.note,
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "python " + shlex.join(sys.argv)}
        for half, (x, y) in halves.items():
            row[half] = {"cnn": round(float((_predict(model, x, "cpu") == y).mean()), 4)}
        print(json.dumps(row), flush=True)
        if args.record:
            with open(LEVERS, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
