"""Within-class cells: each class's records split by public hyperplanes, one released row per (class, cell).

A release with M = 2^B cells per class holds K x M rows instead of K: record i goes to row

    r(x_i, y_i) = y_i * M + cell(x_i),   cell(x) = sum_j 2^j [q(x) . w_j > b_j]

where q(x) in {0, ..., 255}^P are the record's pixel levels (P = C H W, the decoded image's 8-bit
values; `pixel_levels`), w_1..w_B in Z^P public integer normals drawn from a recorded seed
(`hyperplane_normals`) and b_1..b_B public integer offsets (0, or constants tabulated in `PUBLIC_OFFSETS`: the median
projections of a public reference split's images, `median_offsets`). The release's rows are then

    S1[r] = sum_{i: r(x_i, y_i) = r} phi1(x_i)   (K M x D),   N[r] = #{i: r(x_i, y_i) = r}   (K M,)

Why pixels and exact integers, not the encoder's features: a record's cell must be a function of that
record ALONE. The encoder's float32 features of one image differ in the last bits with the batch it is
computed in (measured: up to 8e-8 between batch sizes 15 and 16 on this CPU), so a threshold on them
lets one added record (which changes the batch sizes) move every copy of an image lying near a
hyperplane to another cell: an unbounded sensitivity (a DP review reproduced 10 copies moving,
counts and sums changing by 14.2 against a claimed 1). Integer dot products of 8-bit pixels are exact
(|q . w| <= 255 P max|w| < 2^63), so the cell of x is the same in any batch, shard, order or machine.

Sensitivity (`mepf_core.privacy.sensitivity` holds the general derivation). No record's row depends
on any other record, so
    add-remove: D' = D + (x, y) changes exactly one row r(x, y), by phi1(x): ||dS1||_F <= C1, ||dN|| = 1;
    replace-one: (x, y) -> (x', y') changes at most the two rows r(x, y), r(x', y'): same row,
        ||phi1(x') - phi1(x)|| <= 2 C1 and dN = 0; two rows, sqrt(C1^2 + C1^2) <= 2 C1 and ||dN|| = sqrt 2;
the per-class release's sensitivities, with one change: with more than one row the counts are never
public under replace-one (a replaced record can move between cells), even without labels.

What it buys (bench/README.md, within-class cells): the per-row means pin down M points of each
class's distribution instead of its centre; the noise per mean grows M-fold, so at small epsilon
cells hurt and `cells_for_epsilon` chooses M from the (public) epsilon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mepf_core.errors import InvalidArgumentError

CELLS_PER_CLASS = (1, 2, 4, 8, 16)  # M = 2^B, B = 0..4 hyperplanes
DEFAULT_CELLS = 8  # the default at epsilon >= CELLS_MIN_EPSILON (bench/README.md: within-class cells)
CELLS_MIN_EPSILON = 1.0  # below it the default is 1 cell (at epsilon 0.2 eight cells cost 9 points)


def validate_cells(cells_per_class: int) -> int:
    """`cells_per_class` if it is one of CELLS_PER_CLASS (an int, not a bool); InvalidArgumentError otherwise."""
    if isinstance(cells_per_class, bool) or cells_per_class not in CELLS_PER_CLASS:
        raise InvalidArgumentError(f"cells_per_class must be one of {', '.join(map(str, CELLS_PER_CLASS))}, "
                                   f"got {cells_per_class!r}")
    return int(cells_per_class)


def cells_for_epsilon(target_epsilon: float, labelled: bool) -> int:
    """The default number of cells per class: DEFAULT_CELLS for a labelled release at target_epsilon >=
    CELLS_MIN_EPSILON, else 1. Depends on public settings only."""
    return DEFAULT_CELLS if labelled and target_epsilon >= CELLS_MIN_EPSILON else 1


# Offsets tabulated once from PUBLIC images, never computed at release time: a release reads no data
# to place its cells, so no spelling of --data-root can make private images set them, and a reader
# can check a release's offsets exactly (storage.release). Key: (reference, image shape C x H x W,
# cell_seed, cells_per_class); value: `median_offsets` of that split's `pixel_levels` under
# `hyperplane_normals(C H W, cells_per_class, cell_seed)`. fashion-mnist:test-select is the fixed
# selection half (storage.references.split_half_indices) of the official Fashion-MNIST test split,
# t10k-images-idx3-ubyte of decompressed SHA-256 PUBLIC_TEST_SHA256["fashion-mnist"];
# tests/test_cells.py recomputes every entry from that file.
PUBLIC_TEST_SHA256 = {"fashion-mnist": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"}
PUBLIC_OFFSETS: dict[tuple[str, tuple[int, int, int], int, int], tuple[int, ...]] = {
    ("fashion-mnist:test-select", (1, 28, 28), 1, 2): (1994109,),
    ("fashion-mnist:test-select", (1, 28, 28), 1, 4): (-705042, 1591126),
    ("fashion-mnist:test-select", (1, 28, 28), 1, 8): (528887, 802289, 3988490),
    ("fashion-mnist:test-select", (1, 28, 28), 1, 16): (-240377, 464101, 326336, 2641971),
}


def tabulated_offsets(reference: str, image_shape: tuple[int, int, int], seed: int,
                      cells_per_class: int) -> tuple[int, ...] | None:
    """The `PUBLIC_OFFSETS` entry for these settings, None when there is none."""
    return PUBLIC_OFFSETS.get((reference, tuple(int(v) for v in image_shape), seed, cells_per_class))


def tabulated_references(seed: int, cells_per_class: int) -> list[str]:
    """The references `PUBLIC_OFFSETS` holds offsets of for this seed and number of cells."""
    return sorted({ref for ref, _, s, m in PUBLIC_OFFSETS if (s, m) == (seed, cells_per_class)})


NORMAL_SCALE = 1024  # integer normals: round(1024 g), g ~ N(0, 1)
MAX_PIXELS = 3 * 64 * 64  # the largest image a release holds (C, H, W <= 3, 64, 64)


def pixel_levels(images: torch.Tensor) -> torch.Tensor:
    """N x P int64 pixel levels in {0, ..., 255} of images (N x C x H x W, values in [0, 1]; any float dtype).

    Elementwise and exact for decoded 8-bit images (level k arrives as k / 255): non-finite values are
    mapped as `mepf_core.features.sanitize_images` maps them (NaN, -inf -> 0, +inf -> 1), then
    round(255 x). No reduction, so a record's levels never depend on its batch."""
    x = torch.nan_to_num(images.to(torch.float64), nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    return (x * 255.0).round().to(torch.int64).reshape(len(x), -1)


def hyperplane_normals(pixels: int, cells_per_class: int, seed: int) -> torch.Tensor:
    """P x B int64 normals round(NORMAL_SCALE g), g ~ N(0, I_P), B = log2(cells_per_class), from torch's CPU
    generator at `seed` (the same on every machine for the same arguments, so the seed recorded in a
    release defines its cells). Raises InvalidArgumentError for pixels outside [1, MAX_PIXELS], a
    cells_per_class outside CELLS_PER_CLASS, or a seed outside [0, 2^63)."""
    bits = int(math.log2(validate_cells(cells_per_class)))
    if not 1 <= pixels <= MAX_PIXELS:
        raise InvalidArgumentError(f"pixels must be in [1, {MAX_PIXELS}], got {pixels}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidArgumentError(f"seed must be an integer in [0, 2^63), got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(pixels, bits, generator=generator, dtype=torch.float64)
    return (g * NORMAL_SCALE).round().to(torch.int64)


def cell_of(levels: torch.Tensor, normals: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(N,) int64 cell in [0, 2^B) of each row of levels (N x P int64, `pixel_levels`): bit j is
    [levels . w_j > b_j], computed exactly in int64 (normals: P x B int64; offsets: (B,) int64)."""
    above = (levels.to(torch.int64) @ normals.to(torch.int64) > offsets.to(torch.int64)).long()
    return (above << torch.arange(normals.shape[1])).sum(dim=1)


def median_offsets(levels: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """(B,) int64 offsets b_j = the (lower) median over the rows of levels (N x P int64, PUBLIC images'
    `pixel_levels`) of levels . w_j, so each hyperplane halves those images: how `PUBLIC_OFFSETS` was
    made. Never call it on private images: offsets are written into the release unprotected."""
    if levels.shape[0] < 1:
        raise InvalidArgumentError("median offsets need at least one public image")
    return (levels.to(torch.int64) @ normals.to(torch.int64)).median(dim=0).values


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
    are, `PUBLIC_OFFSETS`; None for offsets 0). normals: P x B int64 (`hyperplane_normals(P, M, seed)`); offsets: (B,) int64."""

    cells_per_class: int
    seed: int
    normals: torch.Tensor
    offsets: torch.Tensor
    reference: str | None

    def __repr__(self) -> str:
        return f"CellSplit(cells_per_class={self.cells_per_class}, seed={self.seed}, reference={self.reference!r})"

    def rows(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N,) int64 release row label * M + cell(x) of each record (images: N x C x H x W in [0, 1] as the
        dataset yields them; labels: (N,) class indices, zeros when unlabelled). Exact: no batch effect."""
        return labels.to(torch.long) * self.cells_per_class + cell_of(pixel_levels(images), self.normals, self.offsets)
