"""Within-class cells: each class's records split by public constants, one released row per (class, cell).

A release with M = 2^B cells per class holds K x M rows instead of K: record i goes to row
r(x_i, y_i) = y_i * M + cell(x_i, y_i). Two public rules place the cells (a release reads no data to
place them):
- Voronoi cells (the default with a cell reference, `VoronoiSplit`, at the end of this module): class y's
  own M centroids, tabulated once from a public split's images (`PUBLIC_CENTROIDS`); the nearest wins.
- Hyperplanes (without a reference, and releases made before Voronoi cells): cell(x) = sum_j 2^j
  [phi1(x) . w_j > b_j], w_1..w_B in R^D public Gaussian normals drawn from a recorded seed
  (`hyperplane_normals`), b_1..b_B public offsets: 0, or (older releases) the constants in `PUBLIC_OFFSETS`
  (median projections of a public split's images, made once).
phi1(x) is the record's bounded first-moment features (norm <= C1, the ones its sums hold). The release's
rows are then

    S1[r] = sum_{i: r(x_i, y_i) = r} phi1(x_i)   (K M x D),   N[r] = #{i: r(x_i, y_i) = r}   (K M,)

A record's cell must be a function of that record ALONE. A threshold turns the last bits of a float
into a different row, and the encoder's float32 features of one image change in the last bits with
the size of the batch it is computed in (up to 8e-8 between 15 and 16 images): a DP review added one
record, which changed the last batch's size, and moved 10 copies of an image lying near a hyperplane
to another cell (counts and sums moved by 14.2 against a claimed 1). So the custodian computes every
batch at exactly `batch_size` images (`mepf_core.features.fixed_batch_features`: zeros pad the tail),
where a row's features are bitwise independent of its position and of the other rows, and, from
`MIN_CELL_BATCH` = 16 rows up, of the thread count (tests/test_cells.py), and projects in fixed point (`projections`: each product rounded to a
multiple of 2^-32 and the integers added, exactly, in any order or thread). Then no record's row
depends on any other record. (The bits may differ between CPU types, library builds and even encoder
instances in a process with a different history (2.6e-8 measured): a release uses one encoder instance
per process (`tasks.custodian._feature_map`); run every shard of one release on one kind of machine
and one build, as `scripts/setup.sh` installs.)

Sensitivity (`mepf_core.privacy.sensitivity` holds the general derivation). With rows functions of
their records,
    add-remove: D' = D + (x, y) changes exactly one row r(x, y), by phi1(x): ||dS1||_F <= C1, ||dN|| = 1;
    replace-one: (x, y) -> (x', y') changes at most the two rows r(x, y), r(x', y'): same row,
        ||phi1(x') - phi1(x)|| <= 2 C1 and dN = 0; two rows, sqrt(C1^2 + C1^2) <= 2 C1 and ||dN|| = sqrt 2;
the per-class release's sensitivities, with one change: with more than one row the counts are never
public under replace-one (a replaced record can move between cells), even without labels.

What it buys (bench/README.md, within-class cells): the per-row means pin down M points of each
class's feature distribution instead of its centre (Fashion-MNIST, epsilon 10, 8 cells, 10,000 steps:
CNN accuracy of the synthetic data 80.7 +- 0.5% against 76.0 +- 1.5%); the noise per mean grows
M-fold, so at small epsilon cells hurt and `cells_for_epsilon` chooses M from the (public) epsilon.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import NamedTuple
from importlib import resources

import numpy as np
import torch

from mepf_core.errors import InvalidArgumentError

CELLS_PER_CLASS = (1, 2, 4, 8, 16)  # M = 2^B, B = 0..4 hyperplanes
DEFAULT_CELLS = 8  # the default at epsilon >= CELLS_MIN_EPSILON (bench/README.md: within-class cells)
# Chosen on the selection half (bench/results/statistics.jsonl, 3,000-step screens, CNN): epsilon 0.5:
# 1 / 2 / 4 / 8 hyperplane cells 73.8 / 77.0 / 77.5 / 77.2%; epsilon 0.2: 8 cells 68.2%, 2 hyperplane
# cells 74.9%, 1 cell 76.9 / 75.8% (seeds 0 / 1), 2 Voronoi cells 78.1 / 77.6%, 4 Voronoi cells 76.7%.
CELLS_MIN_EPSILON = 0.5
# Below it the default stays 1 cell: 2 Voronoi cells at epsilon 0.2 won the 3,000-step screens above but
# not at 10,000 steps on the report half (CNN 75.5 / 74.9% against 1 cell's 76.0 / 77.5%, seeds 0 / 1;
# bench/README.md, within-class cells), the confirmation the change waited for.
# Smallest extraction batch with cells. At 16 rows and more a row's features are the same bits at any
# thread count (tests/test_cells.py, 1-4 threads); below it they are not (a DP review, 1 vs 2 threads:
# batches of 2-15 rows differ by up to 3.2e-8, 1,888 fixed-point units of a projection; oneDNN and the
# plain convolution take turns there), so a record on a shard run at another thread count could change cell.
MIN_CELL_BATCH = 16

# Offsets tabulated once from PUBLIC images, never computed at release time: a release reads no data to
# place its cells, so no --data-root can make private images set them, and a reader checks a release's
# offsets exactly (storage.release). Key: (reference, encoder name, its weights' SHA-256, image shape
# C x H x W, norm bound C1, cell_seed, cells_per_class); value: `median_offsets` of the reference's bounded
# features (`fixed_batch_features`, batches of 256) under `hyperplane_normals(D, cells_per_class,
# cell_seed)`. fashion-mnist:test-select is the fixed selection half (storage.references) of the
# official Fashion-MNIST test split, whose decompressed t10k-images file has SHA-256
# PUBLIC_TEST_SHA256["fashion-mnist"]; tests/test_cells.py recomputes every entry from that file.
PUBLIC_TEST_SHA256 = {"fashion-mnist": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"}
LITE0_SHA256 = "c8d774fe1ecb47f855f08d1c515fd387798b7a4d1b53ab1f6612bcf44ec00f75"  # efficientnet-lite0's packaged weights


class TableKey(NamedTuple):
    """Key of `PUBLIC_OFFSETS` and `PUBLIC_CENTROIDS`: the public settings a table was made for."""
    reference: str  # public split of the images (storage.references)
    encoder: str  # encoder name
    encoder_sha256: str  # SHA-256 of its weights file
    image_shape: tuple[int, int, int]  # C x H x W
    norm_bound: float  # C1
    cell_seed: int
    cells_per_class: int

    @classmethod
    def of(cls, reference: str, encoder: str, encoder_sha256: str, image_shape, norm_bound: float, seed: int,
           cells_per_class: int) -> "TableKey":
        """The key with its fields in canonical types (ints, a tuple shape, a float bound)."""
        return cls(reference, encoder, encoder_sha256, tuple(int(v) for v in image_shape), float(norm_bound),
                   int(seed), int(cells_per_class))


def _fmnist(cells_per_class: int) -> TableKey:
    return TableKey("fashion-mnist:test-select", "efficientnet-lite0", LITE0_SHA256, (1, 28, 28), 1.0, 1,
                    cells_per_class)


PUBLIC_OFFSETS: dict[TableKey, tuple[float, ...]] = {
    _fmnist(2): (-0.11025606538169086,),
    _fmnist(4): (-0.8690621431451291, -0.7737186523154378),
    _fmnist(8): (0.4459965240675956, 0.7146274384576827, -0.7181547172367573),
    _fmnist(16): (-0.5119542174506932, 0.5192786005791277, 0.6080305317882448, -0.27437580609694123),
}


def tabulated_offsets(reference: str, encoder: str, encoder_sha256: str, image_shape, norm_bound: float, seed: int,
                      cells_per_class: int) -> tuple[float, ...] | None:
    """The `PUBLIC_OFFSETS` entry for these settings (encoder: its name), None when there is none."""
    key = TableKey.of(reference, encoder, encoder_sha256, image_shape, norm_bound, seed, cells_per_class)
    return PUBLIC_OFFSETS.get(key)


def tabulated_references(seed: int, cells_per_class: int, *, encoder: str | None = None,
                          image_shape: tuple[int, int, int] | None = None, norm_bound: float | None = None) -> list[str]:
    """The references `PUBLIC_CENTROIDS` holds centroids of for this seed and number of cells (a new release's
    cell reference; `PUBLIC_OFFSETS` only verifies releases made with hyperplane cells before); with
    encoder (name), image_shape (C, H, W) or norm_bound given, only entries made for those settings."""
    want = {"cell_seed": int(seed), "cells_per_class": int(cells_per_class), "encoder": encoder,
            "norm_bound": None if norm_bound is None else float(norm_bound),
            "image_shape": None if image_shape is None else tuple(int(v) for v in image_shape)}
    return sorted({k.reference for k in PUBLIC_CENTROIDS
                   if all(v is None or getattr(k, field) == v for field, v in want.items())})


def validate_cells(cells_per_class: int) -> int:
    """`cells_per_class` if it is one of CELLS_PER_CLASS (an int, not a bool); InvalidArgumentError otherwise."""
    if isinstance(cells_per_class, bool) or cells_per_class not in CELLS_PER_CLASS:
        raise InvalidArgumentError(f"cells_per_class must be one of {', '.join(map(str, CELLS_PER_CLASS))}, "
                                   f"got {cells_per_class!r}")
    return int(cells_per_class)


def cells_for_epsilon(target_epsilon: float, labelled: bool, batch_size: int) -> int:
    """The default number of cells per class: DEFAULT_CELLS for a labelled release at target_epsilon >=
    CELLS_MIN_EPSILON extracted in batches of at least MIN_CELL_BATCH, else 1. Depends on public
    settings only."""
    return DEFAULT_CELLS if labelled and target_epsilon >= CELLS_MIN_EPSILON and batch_size >= MIN_CELL_BATCH else 1


def hyperplane_normals(dim: int, cells_per_class: int, seed: int) -> torch.Tensor:
    """D x B float64 normals w_j ~ N(0, I_D), B = log2(cells_per_class), from torch's CPU generator at
    `seed` (the same on every machine for the same arguments, so the seed recorded in a release defines
    its cells). Raises InvalidArgumentError for dim < 1, a cells_per_class outside CELLS_PER_CLASS, or a
    seed outside [0, 2^63)."""
    return _seeded_gaussian(dim, int(math.log2(validate_cells(cells_per_class))), seed)


def _seeded_gaussian(dim: int, columns: int, seed: int) -> torch.Tensor:
    """D x columns float64 N(0, 1) entries from torch's CPU generator at `seed`; InvalidArgumentError for
    dim < 1 or a seed outside [0, 2^63)."""
    if dim < 1:
        raise InvalidArgumentError(f"dim must be >= 1, got {dim}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidArgumentError(f"seed must be an integer in [0, 2^63), got {seed!r}")
    return torch.randn(dim, columns, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


FIXED_POINT = 2**32  # projections are sums of products rounded to multiples of 2^-32, added as int64


def projections(phi: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """N x B int64 projections phi . w_j in fixed point (units of 2^-32): each product phi_d w_jd, computed
    in float64 (one correctly rounded IEEE multiply) and scaled by 2^32 (exact), is rounded to an integer,
    and the integers are added. Integer addition is associative, so a row's projection is the same
    whatever the summation order, the number of rows, its position or the thread count (torch splits a
    float reduction of one row across threads, which rounds differently: a DP review moved cells that
    way with VGG19 features). phi: N x D features of norm <= C; normals: D x B float64; the caller checks
    `check_fixed_point_range(C, normals)` on public values first (sum_d |phi_d w_jd| <= C ||w_j|| by
    Cauchy-Schwarz, so no sum can overflow; nothing here depends on the data)."""
    phi = phi.detach().to(torch.float64)
    out = []
    for j in range(normals.shape[1]):
        products = phi * normals[:, j].to(torch.float64)
        out.append(products.mul_(FIXED_POINT).round_().to(torch.int64).sum(dim=1))
    return torch.stack(out, dim=1) if out else torch.zeros(len(phi), 0, dtype=torch.int64)


def check_fixed_point_range(norm_bound: float, normals: torch.Tensor) -> None:
    """Refuse, from public values only, settings whose projections could overflow the int64 fixed-point
    sum: |phi . w_j| <= C ||w_j||_2 (Cauchy-Schwarz) must stay below 2^30, i.e. 2^62 units, with room for
    D / 2 units of rounding. A check on the data itself would let one record decide whether a release
    fails (and a failed release is charged nothing): a DP review did that with one all-zero image.
    Raises InvalidArgumentError."""
    reach = float(norm_bound) * float(normals.to(torch.float64).norm(dim=0).max()) if normals.numel() else 0.0
    if not reach < 2**30:
        raise InvalidArgumentError(f"norm_bound {norm_bound} is too large for within-class cells (projections up to "
                                   f"{reach:.3g} >= 2^30); lower it or use cells_per_class 1")


def fixed_point(offsets: torch.Tensor | tuple[float, ...]) -> torch.Tensor:
    """(B,) int64 offsets in the units of `projections` (b * 2^32, rounded half to even)."""
    return torch.as_tensor(offsets, dtype=torch.float64).mul(FIXED_POINT).round().to(torch.int64)


def cell_of(phi: torch.Tensor, normals: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(N,) int64 cell in [0, 2^B) of each row of phi (N x D bounded features): bit j is [phi . w_j > b_j],
    compared exactly in fixed point (`projections`, `fixed_point`)."""
    above = (projections(phi, normals) > fixed_point(offsets)).long()
    return (above << torch.arange(normals.shape[1])).sum(dim=1)


def median_offsets(phi: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """(B,) float64 offsets b_j = the (lower) median over the rows of phi (N x D, PUBLIC images' bounded
    features) of phi . w_j, so each hyperplane halves those images: how `PUBLIC_OFFSETS` was made. Never
    call it on private features: offsets are written into the release unprotected."""
    if phi.shape[0] < 1:
        raise InvalidArgumentError("median offsets need at least one public image")
    return projections(phi, normals).median(dim=0).values.to(torch.float64) / FIXED_POINT  # exact: |median| < 2^53


def row_shares(counts: np.ndarray, cells_per_class: int) -> np.ndarray:
    """(K M,) float64: each row's share of its class, from the released noisy counts (K M,).

    Post-processing of the release: negative noisy counts count as 0; a class whose counts are all
    <= 0 shares equally. Each class's M shares sum to 1 (M = 1: all ones)."""
    m = validate_cells(cells_per_class)
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size % m:
        raise InvalidArgumentError(f"counts must be a vector of K x {m} rows, got shape {list(counts.shape)}")
    per_class = np.clip(counts, 0.0, None).reshape(-1, m)
    totals = per_class.sum(axis=1, keepdims=True)
    shares = np.where(totals > 0, per_class / np.where(totals > 0, totals, 1.0), 1.0 / m)
    return shares.reshape(-1)


def draw_rows(classes: torch.Tensor, shares: np.ndarray | None, cells_per_class: int, seed: int) -> torch.Tensor:
    """(N,) int64 release rows for class labels `classes` (N,): class c's images spread over its rows
    c M .. c M + M - 1 by `shares` (`row_shares`), drawn with a numpy generator at `seed`.
    With one cell (or shares None) the rows are the classes."""
    m = validate_cells(cells_per_class)
    if m == 1 or shares is None:
        return classes.to(torch.long)
    rng = np.random.default_rng(seed)
    shares = np.asarray(shares, dtype=np.float64).reshape(-1, m)
    labels = classes.cpu().numpy()
    cells = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        cells[where] = rng.choice(m, size=len(where), p=shares[c] / shares[c].sum())
    return torch.as_tensor(labels.astype(np.int64) * m + cells)


@dataclass(frozen=True, repr=False)
class CellSplit:
    """The public definition of a release's cells: M = cells_per_class, the normals' seed, the B offsets
    and where they came from (`reference`: the public split whose tabulated median projections they
    are, `PUBLIC_OFFSETS`; None for offsets 0). normals: D x B float64 (`hyperplane_normals(D, M,
    seed)`); offsets: (B,) float64."""

    cells_per_class: int
    seed: int
    normals: torch.Tensor
    offsets: torch.Tensor
    reference: str | None

    def __repr__(self) -> str:
        return f"CellSplit(cells_per_class={self.cells_per_class}, seed={self.seed}, reference={self.reference!r})"

    def rows(self, phi1: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N,) int64 release row label * M + cell(phi1) of each record (phi1: N x D bounded features from
        `mepf_core.features.fixed_batch_features`; labels: (N,) class indices, zeros when unlabelled)."""
        return labels.to(torch.long) * self.cells_per_class + cell_of(phi1, self.normals, self.offsets)


# ---- Voronoi cells: each class split by its own public centroids ------------------------------------------
#
# Hyperplanes shared by all classes split some classes into a few large and several nearly empty cells
# (epsilon 10, 8 cells: a class's smallest cell held 29-417 of its ~6,000 records, its largest 989-3,233),
# and a nearly empty cell's mean is mostly noise. Class y's records are instead split among the M public
# centroids c_{y,1..M} of that class, record (x, y) going to the nearest in a public projection:
#
#     cell(x, y) = argmin_j ||phi1(x) P - c_{y,j}||^2 = argmax_j  phi1(x) . (P c_{y,j}) - ||c_{y,j}||^2 / 2
#
# (the ||phi1 P||^2 term is the same for every j). P is a D x CENTROID_DIM Gaussian matrix from the recorded
# cell_seed (`centroid_projection`); the centroids are k-means centroids of a public split's projected
# features, per class, tabulated once (`PUBLIC_CENTROIDS`, files in mepf_core/cell_tables, SHA-256 pinned).
# A record's cell is a function of that record alone: the scores phi1 . w_{y,j} are `projections` (exact
# fixed point) onto directions w_{y,j} = P c_{y,j}, computed from public constants only, minus the fixed-point
# offsets; ties go to the lowest j. So the rows, the sums and the counts move exactly as with hyperplane cells,
# and the sensitivities above hold unchanged. Measured (bench/README.md, Voronoi cells): epsilon 10, 8 cells,
# 3,000 steps, CNN on the report half 81.8% against 79.1-79.3% with hyperplanes.

CENTROID_DIM = 64  # dimension of the public projection the centroids live in
CENTROID_KMEANS_INIT = 4  # k-means restarts (scikit-learn's n_init) when a table is made
_CENTROID_FILES = {m: f"fashion-mnist-test-select_efficientnet-lite0_1x28x28_c1_seed1_m{m}.npy" for m in (2, 4, 8, 16)}
# Key: as PUBLIC_OFFSETS; value: (file in mepf_core/cell_tables, its SHA-256). Each file holds a float64
# array K x M x CENTROID_DIM made by `public_centroids` from the same features as PUBLIC_OFFSETS
# (tests/test_cells.py recomputes every one from the pinned official test file).
PUBLIC_CENTROIDS: dict[TableKey, tuple[str, str]] = {
    _fmnist(2): (_CENTROID_FILES[2], "b5342361ffd8657847315460e046a5d6e560eac4d49574062571a79138da2168"),
    _fmnist(4): (_CENTROID_FILES[4], "f08e0dd3b08018a269e620226b08d460c034f99852b3b568227cb93e19a0b8fa"),
    _fmnist(8): (_CENTROID_FILES[8], "cdd983ce1f6fa06e1f22e104d3429b362dd7e3a41f5f8e36f984889007d19503"),
    _fmnist(16): (_CENTROID_FILES[16], "fd585ff06e2f0baf2fddbfd145604a2f3e1b679acdb571421189f7de25ba8c05"),
}


def centroid_projection(dim: int, seed: int) -> torch.Tensor:
    """D x CENTROID_DIM float64 P ~ N(0, 1/CENTROID_DIM) from torch's CPU generator at `seed` (the same on
    every machine for the same arguments; E||phi P||^2 = ||phi||^2). InvalidArgumentError for dim < 1 or a
    seed outside [0, 2^63)."""
    return _seeded_gaussian(dim, CENTROID_DIM, seed) / math.sqrt(CENTROID_DIM)


def public_centroids(phi: torch.Tensor, labels: torch.Tensor, num_classes: int, cells_per_class: int,
                     projection: torch.Tensor) -> np.ndarray:
    """K x M x CENTROID_DIM float64: per class, the M k-means centroids (scikit-learn `KMeans`, random_state
    0, CENTROID_KMEANS_INIT restarts) of PUBLIC images' projected features phi P (phi: N x D bounded
    features, labels (N,) in [0, K)): how `PUBLIC_CENTROIDS` was made. Never call it on private features:
    the centroids define the release's cells unprotected. InvalidArgumentError when a class has fewer than M
    images."""
    from sklearn.cluster import KMeans

    m = validate_cells(cells_per_class)
    z = (phi.detach().to(torch.float64) @ projection).numpy()
    labels = np.asarray(labels)
    out = np.empty((num_classes, m, projection.shape[1]))
    for c in range(num_classes):
        members = z[labels == c]
        if len(members) < m:
            raise InvalidArgumentError(f"class {c} has {len(members)} public images, fewer than {m} centroids")
        out[c] = KMeans(n_clusters=m, n_init=CENTROID_KMEANS_INIT, random_state=0).fit(members).cluster_centers_
    return out


def tabulated_centroids(reference: str, encoder: str, encoder_sha256: str, image_shape, norm_bound: float,
                        seed: int, cells_per_class: int) -> tuple[np.ndarray, str] | None:
    """(K x M x CENTROID_DIM float64 centroids, their file's SHA-256) of the `PUBLIC_CENTROIDS` entry for
    these settings, None when there is none. Raises RuntimeError when the packaged file's bytes are not the
    pinned ones (a damaged or altered installation)."""
    key = TableKey.of(reference, encoder, encoder_sha256, image_shape, norm_bound, seed, cells_per_class)
    if key not in PUBLIC_CENTROIDS:
        return None
    name, sha256 = PUBLIC_CENTROIDS[key]
    data = resources.files("mepf_core").joinpath("cell_tables", name).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RuntimeError(f"mepf_core/cell_tables/{name} is not the pinned file (SHA-256 {sha256[:12]}...): "
                           "reinstall dp-mepf")
    return np.load(io.BytesIO(data), allow_pickle=False), sha256


@dataclass(frozen=True, repr=False)
class VoronoiSplit:
    """The public definition of a release's Voronoi cells: M = cells_per_class, the projection's seed, the
    reference whose tabulated centroids they are and that table's SHA-256. directions: K x M x D float64
    (w_{y,j} = P c_{y,j}, `voronoi_directions`); offsets: K x M float64 (||c_{y,j}||^2 / 2)."""

    cells_per_class: int
    seed: int
    directions: torch.Tensor
    offsets: torch.Tensor
    reference: str
    centroids_sha256: str

    def __repr__(self) -> str:
        return (f"VoronoiSplit(cells_per_class={self.cells_per_class}, seed={self.seed}, reference={self.reference!r}, "
                f"centroids_sha256={self.centroids_sha256[:12]!r})")

    def rows(self, phi1: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N,) int64 release row y * M + cell(x, y) of each record (phi1: N x D bounded features from
        `mepf_core.features.fixed_batch_features`; labels: (N,) class indices < K, the table's classes)."""
        labels = labels.to(torch.long)
        cells = torch.zeros(len(labels), dtype=torch.long)
        for c in labels.unique().tolist():  # only the record's own class's M scores: N x M x D products
            members = labels == c
            scores = projections(phi1[members], self.directions[c].T) - fixed_point(self.offsets[c])
            cells[members] = scores.argmax(dim=1)  # the first maximum on a tie (torch.argmax)
        return labels * self.cells_per_class + cells


def voronoi_directions(projection: torch.Tensor, centroids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(K x M x D directions P c_{y,j}, K x M offsets ||c_{y,j}||^2 / 2), float64, from public values only.
    Each direction is accumulated over the CENTROID_DIM columns in a fixed order with elementwise float64
    operations (correctly rounded, no reduction split across threads), so it is the same bits in every
    process, shard and thread count of a release."""
    c = torch.as_tensor(centroids, dtype=torch.float64)
    directions = torch.zeros(c.shape[0], c.shape[1], projection.shape[0], dtype=torch.float64)
    for k in range(c.shape[2]):
        directions += c[:, :, k, None] * projection[:, k]
    offsets = torch.zeros(c.shape[:2], dtype=torch.float64)
    for k in range(c.shape[2]):
        offsets += c[:, :, k] * c[:, :, k]
    return directions, offsets / 2
