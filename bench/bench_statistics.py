"""Richer released statistics as A/Bs (issue 15): which EfficientNet-Lite0 stages, and how each is normalised.

Two steps, so that the variants' trainings can run in parallel processes:

    python bench/bench_statistics.py extract --epsilon 10 --variants base6-joint base6-layer all16-joint all16-layer
    python bench/bench_statistics.py train --variant all16-layer [--steps 3000] [--classifiers logreg cnn]

`extract` streams the Fashion-MNIST training split once through Lite0 with all 16 MBConv blocks
(production preprocessing, sanitised pixels, float64 sums), computes every variant's per-class sums
of its bounded feature vector, and noises each one with the project's own mechanism
(`design_mechanism`: add-remove, labelled, first moment, norm bound 1, count share 0.1) at the given
epsilon, delta 1e-5. Only the noisy embeddings are written (`runs/statistics/eps<E>/<variant>.npz`).
`train` trains the production `Trainer` (paper's 28x28 generator, cosine schedule) on a variant's
noisy embedding with the same feature map built for generated images, draws `--n` class-balanced
images and scores the downstream classifiers on both fixed halves of the test split (bench_levers.score);
decisions use `select`, `report` is recorded. One JSON line per run goes to results/statistics.jsonl.

A variant is STAGES-NORM[-covK][-lshB[z]]. STAGES: `base6` = stem + blocks 0-5 (production today, D = 16,960 at 32x32),
`all16` = stem + all 16 blocks (D = 20,032). NORM:
`joint` = the whole vector scaled to norm C (production today); `layer` = each stage's block scaled to
norm C / sqrt(L) (L stages), so the vector's norm is at most C. Sensitivity: a record's feature vector
has norm <= C under both, so the per-class sum's L2 sensitivity is C (add-remove), the same as today's,
and the same mechanism applies unchanged.

`-covK` adds a within-class diversity statistic (issue 15): a sketch of each class's second-moment
matrix in a K-dimensional random projection. With P a fixed D x K Gaussian matrix scaled 1/sqrt(K)
(drawn from COV_SEED: public, data-independent; E||phi P||^2 = ||phi||^2), a record contributes
z = phi P scaled to norm 1 (K-vector; as the production bound scales phi; 0 stays 0) and vec(z z^T) (K^2 entries), whose Frobenius norm is
||z||^2 <= 1. The released vector per record is [sqrt(COV_SHARE') * phi, sqrt(COV_SHARE) * vec(z z^T)]
with COV_SHARE' = 1 - COV_SHARE, so its norm is <= sqrt(COV_SHARE' * C^2 + COV_SHARE * 1) = 1 = C
(C = NORM_BOUND = 1): the per-class sum again has L2 sensitivity C under add-remove (adding or removing
one record changes one class's sum by that record's vector), and the same mechanism applies unchanged.
The generator then matches, per class, the mean of phi and the mean of z z^T: the spread of its
samples along K random directions of feature space, which a mean alone does not constrain.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.bench_levers import score, test_halves  # noqa: E402
from bench.common import RESULTS  # noqa: E402
from mepf_core import encoders  # noqa: E402
from mepf_core.embedding import FeatureSums, mean_embeddings, sums_to_noisy_parts  # noqa: E402
from mepf_core.encoders import run_stages  # noqa: E402
from mepf_core.features import sanitize_images  # noqa: E402
from mepf_core.fused_encoder import fuse_feature_map  # noqa: E402
from mepf_core import cells  # noqa: E402
from mepf_core.privacy.mechanism import design_mechanism  # noqa: E402
from mepf_core.privacy.sensitivity import Neighbouring  # noqa: E402
from mepf_core.lean_autograd import stage_means  # noqa: E402
from mepf_core.public_map import _bound_scale, _joint_norm  # noqa: E402
from mepf_core.training import Trainer, TrainConfig, balanced_labels, generate  # noqa: E402
from storage.datasets import open_dataset  # noqa: E402
from storage.synthetic import quantise  # noqa: E402

OUT = Path("runs/statistics")
ROWS = RESULTS / "statistics.jsonl"
STAGE_SETS = {"base6": list(range(7)), "all16": list(range(17))}
NORMS = ("joint", "layer")
NORM_BOUND = 1.0
COV_SEED = 0  # the projection of -covK variants: public, from this seed, the same at extraction and training
LSH_SEED = 1  # the hyperplanes of -lshB variants: public, from this seed
COV_SHARE = 0.5  # share of the squared norm bound given to the second-moment sketch (the rest to phi)


def parse_variant(name: str) -> tuple[list[int], str, int]:
    """(stage indices, norm, K of the covariance sketch or 0) of a variant name STAGES-NORM[-covK][-lshB]."""
    stages, _, rest = name.partition("-")
    norm, _, cov = rest.partition("-")
    cov = "" if cov.startswith(("lsh", "vor")) else cov.partition("-")[0]
    cov_dim = int(cov[3:]) if cov.startswith("cov") and cov[3:].isdigit() and int(cov[3:]) > 0 else None
    if stages not in STAGE_SETS or norm not in NORMS or (cov and cov_dim is None) or lsh_bits(name) is None:
        raise SystemExit(f"variant must be STAGES-NORM[-covK][-lshB] with STAGES in {sorted(STAGE_SETS)}, NORM in "
                         f"{NORMS} and K, B positive integers, got {name!r}")
    return STAGE_SETS[stages], norm, cov_dim or 0


def lsh_bits(name: str) -> int | None:
    """B of a variant's -lshB[z] suffix (0 without one; None when malformed)."""
    if "-vor" in name:
        return 0 if vor_cells(name) else None
    if "-lsh" not in name:
        return 0
    bits = name.rpartition("-lsh")[2].removesuffix("z")
    return int(bits) if bits.isdigit() and 0 < int(bits) <= 4 else None


def vor_cells(name: str) -> int:
    """K of a variant's -vorK[p] suffix (0 without one or when malformed)."""
    k = name.rpartition("-vor")[2].removesuffix("p") if "-vor" in name else ""
    return int(k) if k.isdigit() and 1 < int(k) <= 64 else 0


def cells_per_class(name: str) -> int:
    """Rows per class of a variant: K with -vorK, 2^B with -lshB, else 1."""
    return vor_cells(name) or 2 ** lsh_bits(name)


def public_centroids(m: "VariantMap", k: int, projected: bool = False) -> torch.Tensor:
    """Per class, K k-means centroids (scikit-learn, seeded) of the bounded features of the selection
    half's public test images of that class (-vorK variants: public data only): 10 x K x D float64; with
    `projected` (-vorKp) production's rule (`mepf_core.cells`: the centroids of phi P, P from LSH_SEED), as
    (directions P c 10 x K x D, offsets ||c||^2 / 2 10 x K).

    A record (x, y) goes to cell argmin_j ||phi(x) - c_{y,j}||, a function of that record alone, and adds
    its bounded vector to exactly one (class, cell) sum and 1 to its count: the per-class release's
    sensitivities (C and 1, add-remove), so the mechanism is unchanged."""
    from sklearn.cluster import KMeans

    images, labels = test_halves()["select"]
    x = sanitize_images(torch.as_tensor(images, dtype=torch.float32) / 255.0)
    with torch.no_grad():
        phi = torch.cat([m.features([o.double() for o in m.stage_outputs(x[i : i + 500])]) for i in range(0, len(x), 500)])
    if projected:
        projection = cells.centroid_projection(phi.shape[1], LSH_SEED)
        return cells.voronoi_directions(projection, cells.public_centroids(phi, labels, 10, k, projection))
    out = []
    for c in range(10):
        km = KMeans(n_clusters=k, n_init=4, random_state=0).fit(phi[torch.as_tensor(labels) == c].numpy())
        out.append(torch.as_tensor(km.cluster_centers_, dtype=torch.float64))
    return torch.stack(out)


def voronoi_cells(phi: torch.Tensor, labels: torch.Tensor, centroids) -> torch.Tensor:
    """(N,) int64: each row's nearest centroid of its own class (centroids 10 x K x D), i.e. the argmax over
    j of phi . c_j - ||c_j||^2 / 2; projected (-vorKp): centroids = (directions 10 x K x D, offsets 10 x K)."""
    directions, offsets = centroids if isinstance(centroids, tuple) else (centroids, 0.5 * (centroids * centroids).sum(dim=2))
    scores = torch.einsum("nd,nkd->nk", phi.double(), directions[labels.long()]) - offsets[labels.long()]
    return scores.argmax(dim=1)


def lsh_planes(dim: int, bits: int) -> torch.Tensor:
    """D x B Gaussian hyperplane normals from LSH_SEED (public; production's `hyperplane_normals`),
    splitting each class into 2^B cells (-lshB variants; offsets: `public_lsh_planes`).

    A record's cell is a function of that record alone, and it adds its bounded vector (norm <= C) to
    exactly one (class, cell) sum and 1 to that cell's count: the sensitivities are those of the
    per-class release (C and 1, add-remove), so the mechanism is unchanged.
    """
    return cells.hyperplane_normals(dim, 2**bits, LSH_SEED)


def lsh_cells(phi: torch.Tensor, normals: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(B,) int64 cell index in [0, 2^bits) of each row of phi (N x D)."""
    above = (phi.double() @ normals > offsets).long()
    return (above * (2 ** torch.arange(normals.shape[1]))).sum(dim=1)


def lite0_all_blocks(image_size: int) -> encoders.FeatureMap:
    """The registry's EfficientNet-Lite0 map with all 16 blocks (weights and preprocessing unchanged)."""
    saved = encoders._LITE0_BLOCKS
    encoders._LITE0_BLOCKS = 16
    try:
        return encoders.build_feature_map("efficientnet-lite0", image_size=image_size)
    finally:
        encoders._LITE0_BLOCKS = saved


class VariantMap(nn.Module):
    """A variant's bounded feature map with the production trainer's interface (stage_outputs,
    class_means, forward -> {"moment1": B x D}); `raw` is the (fused) all-blocks Lite0."""

    def __init__(self, raw: nn.Module, spec, stages: list[int], norm: str, cov_dim: int = 0, bound: float = NORM_BOUND):
        super().__init__()
        self.raw, self.spec, self.stages, self.norm, self.bound, self.cov_dim = raw, spec, stages, norm, bound, cov_dim
        self.projection: torch.Tensor | None = None  # D x K, made on first use (D is known then)

    def stage_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        preprocess = getattr(self.raw, "original", self.raw).preprocess
        outs = run_stages(self.raw.stages[: max(self.stages) + 1], preprocess(images))
        return [outs[i] for i in self.stages]

    def _scales(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per stage, the 1 x B scale each example's block is multiplied by."""
        if self.norm == "joint":
            scale = _bound_scale(_joint_norm(outs), self.bound)
            return [scale] * len(outs)
        share = self.bound / math.sqrt(len(outs))  # L blocks of norm <= C / sqrt(L): total norm <= C
        return [_bound_scale(_joint_norm([o]), share) for o in outs]

    def class_means(self, outputs: list[torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = [o.float() for o in outputs]
        if self.cov_dim:  # B x (D + K^2) is small for Lite0: the plain product
            return {"moment1": weights @ self.features(outs)}
        return {"moment1": torch.cat([stage_means(o, weights * s) for o, s in zip(outs, self._scales(outs))], dim=1)}

    def _sketch(self, phi: torch.Tensor) -> torch.Tensor:
        """B x K^2: vec(z z^T) of z = phi P scaled to norm 1 per row (Frobenius norm ||z||^2 <= 1)."""
        if self.projection is None or self.projection.shape[0] != phi.shape[1]:
            g = torch.Generator().manual_seed(COV_SEED)
            self.projection = torch.randn(phi.shape[1], self.cov_dim, generator=g, dtype=torch.float64) / math.sqrt(self.cov_dim)
        z = phi @ self.projection.to(phi.dtype)
        z = z * _bound_scale(z.norm(dim=1), 1.0).T  # to norm 1 (0 stays 0), as the production bound does phi
        return (z[:, :, None] * z[:, None, :]).reshape(len(z), -1)

    def features(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """B x D bounded feature vectors (the custodian's per-record phi); with -covK, B x (D + K^2):
        [sqrt(1 - COV_SHARE) phi, sqrt(COV_SHARE) vec(z z^T)], each row of norm <= NORM_BOUND."""
        phi = torch.cat([o.reshape(o.shape[0], -1) * s.T for o, s in zip(outputs, self._scales(outputs))], dim=1)
        if not self.cov_dim:
            return phi
        return torch.cat([math.sqrt(1 - COV_SHARE) * phi, math.sqrt(COV_SHARE) * self._sketch(phi)], dim=1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"moment1": self.features([o.float() for o in self.stage_outputs(images)])}


def public_lsh_planes(m: "VariantMap", bits: int, zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(normals, offsets): lsh_planes, each offset the median of phi . r_j over the selection half of
    the public test split (a setting chosen on public data; the private training split is not read),
    so each cut halves the public images; with `zero` (-lshBz), offsets 0: no data at all."""
    if zero:
        with torch.no_grad():
            dim = m.features([o.double() for o in m.stage_outputs(torch.zeros(1, 1, 28, 28))]).shape[1]
        return lsh_planes(dim, bits), torch.zeros(bits, dtype=torch.float64)
    images, _ = test_halves()["select"]
    x = sanitize_images(torch.as_tensor(images, dtype=torch.float32) / 255.0)  # uint8 N x 1 x 28 x 28
    with torch.no_grad():
        phi = torch.cat([m.features([o.double() for o in m.stage_outputs(x[i : i + 500])]) for i in range(0, len(x), 500)])
    normals = lsh_planes(phi.shape[1], bits)
    return normals, (phi @ normals).median(dim=0).values


def cell_labels(n: int, counts: np.ndarray, cells: int, seed: int = 0) -> torch.Tensor:
    """n (class, cell) labels in random order, n // 10 per class (as balanced_labels), split among a class's
    cells in proportion to their noisy released counts (negative counts as 0), drawn with a seeded generator."""
    rng = np.random.default_rng(seed)
    per_class = np.asarray(balanced_labels(n, 10).bincount(minlength=10))
    labels = []
    for c in range(10):
        share = np.clip(counts[c * cells : (c + 1) * cells], 0, None)
        share = share / share.sum() if share.sum() > 0 else np.full(cells, 1 / cells)
        labels.append(c * cells + rng.choice(cells, size=per_class[c], p=share))
    return torch.as_tensor(rng.permutation(np.concatenate(labels)))  # classes mixed: any prefix holds all


def extract(args) -> None:
    torch.set_num_threads(args.threads)
    fm = lite0_all_blocks(args.image_size)
    variants = {name: VariantMap(fm, fm.spec, *parse_variant(name)) for name in args.variants}
    src = open_dataset("fashion-mnist", "train")
    n = len(src) if args.limit is None else args.limit
    sums: dict[str, FeatureSums] = {}  # variant -> class sums, sized by its first batch
    per_class = {v: cells_per_class(v) for v in variants}  # rows per class: 1 without -lshB / -vorK
    planes = {v: public_lsh_planes(m, lsh_bits(v), zero=v.endswith("z")) for v, m in variants.items() if lsh_bits(v)}
    centroids = {v: public_centroids(m, vor_cells(v), v.endswith("p")) for v, m in variants.items() if vor_cells(v)}
    start = time.perf_counter()
    with torch.no_grad():
        for images, labels in src.iter_batches(500, 0, n):
            outs = [o.double() for o in run_stages(fm.stages, fm.preprocess(sanitize_images(images)))]
            outs = [torch.nan_to_num(o, nan=0.0, posinf=0.0, neginf=0.0) for o in outs]
            for v, m in variants.items():
                feats = m.features([outs[i] for i in m.stages])
                if v not in sums:
                    sums[v] = FeatureSums.zeros(10 * per_class[v], feats.shape[1], 1, norm_bound=NORM_BOUND)
                if v in planes:
                    rows = labels.long() * per_class[v] + lsh_cells(feats, *planes[v])
                elif v in centroids:
                    rows = labels.long() * per_class[v] + voronoi_cells(feats, labels, centroids[v])
                else:
                    rows = labels
                sums[v].add(feats, None, rows)
    for epsilon in args.epsilon:  # one pass over the data, one noisy embedding per epsilon
        mech = design_mechanism(target_epsilon=epsilon, target_delta=1e-5, relation=Neighbouring.ADD_REMOVE,
                                labelled=True, moments=1, norm_bound=NORM_BOUND, second_moment_bound=1.0)
        out = OUT / f"eps{epsilon:g}"
        out.mkdir(parents=True, exist_ok=True)
        for v, s in sums.items():
            noisy = sums_to_noisy_parts(s, mech)
            means = mean_embeddings(noisy)
            np.savez(out / f"{v}.npz", moment1=means["moment1"], counts=noisy["counts"], epsilon=mech.epsilon,
                     image_size=args.image_size)
            print(v, "D =", s.moment1.shape[1], "sigma =", {p.name: round(p.sigma, 4) for p in mech.parts}, flush=True)
            if per_class[v] > 1:  # noisy counts per (class, cell): how evenly the cells split each class
                print(np.round(noisy["counts"].reshape(10, per_class[v])).astype(int), flush=True)
    print(f"extraction {time.perf_counter() - start:.0f} s for {n} images", flush=True)


def train(args) -> None:
    torch.set_num_threads(args.threads)
    saved = np.load(OUT / f"eps{args.epsilon:g}" / f"{args.variant}.npz")
    fm = lite0_all_blocks(int(saved["image_size"]))
    fused = fuse_feature_map(fm) or fm
    public = VariantMap(fused, fm.spec, *parse_variant(args.variant))
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr_gen=args.lr, seed=args.seed,
                         checkpoint_every=args.steps)
    trainer = Trainer(config, public, {"moment1": saved["moment1"]}, image_shape=(1, 28, 28), labelled=True)
    start = time.perf_counter()
    trainer.train(progress=args.progress)
    train_s = time.perf_counter() - start
    cells = cells_per_class(args.variant)
    drawn = cell_labels(args.n, saved["counts"], cells) if cells > 1 else balanced_labels(args.n, 10)
    images = quantise(generate(trainer.generator, drawn, seed=0))
    labels = drawn // cells  # a (class, cell) label's class
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.save / f"{args.variant}.npz", images=images, labels=labels.numpy())
    halves = test_halves()
    scores = score(images, labels.numpy(), halves, args.classifiers)
    fid = None
    if args.fid:  # N synthetic (class-balanced draw, first N) vs the report half's first N images
        from tasks.evaluation import fid_against_reference

        fid = round(fid_against_reference(images, halves["report"][0][: args.fid], "fashion-mnist:test#test-report",
                                          args.fid), 2)
    row = {"variant": args.variant, "epsilon": float(saved["epsilon"]), "image_size": int(saved["image_size"]),
           "dim": int(saved["moment1"].shape[1]), "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
           "seed": args.seed, "n_synthetic": args.n, "train_s": round(train_s), "select": scores["select"],
           "report": scores["report"], "classifier_s": scores["seconds"], f"fid_report_{args.fid}": fid, "note": args.note,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "python " + shlex.join(sys.argv)}
    print(json.dumps(row), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(ROWS, "a") as f:
        f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--epsilon", type=float, nargs="+", default=[10.0])
    e.add_argument("--variants", nargs="+", default=["base6-joint", "base6-layer", "all16-joint", "all16-layer"])
    e.add_argument("--image-size", type=int, default=32)
    e.add_argument("--limit", type=int)
    e.add_argument("--threads", type=int, default=2)
    t = sub.add_parser("train")
    t.add_argument("--variant", required=True)
    t.add_argument("--epsilon", type=float, default=10.0)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--batch-size", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--n", type=int, default=10_000)
    t.add_argument("--classifiers", nargs="+", default=["logreg", "cnn"])
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--fid", type=int, default=0, help="FID of N synthetic vs N report-half images (0: off)")
    t.add_argument("--save", type=Path)
    t.add_argument("--progress", action="store_true")
    t.add_argument("--note", default="")
    args = ap.parse_args()
    extract(args) if args.cmd == "extract" else train(args)


if __name__ == "__main__":
    main()
