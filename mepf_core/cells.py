"""Within-class cells: each class's records split by public hyperplanes, one released row per (class, cell).

A release with M = 2^B cells per class holds K x M rows instead of K: record i goes to row

    r(x_i, y_i) = y_i * M + cell(phi1(x_i)),   cell(phi) = sum_j 2^j [phi . w_j > b_j]

with w_1..w_B in R^D public Gaussian normals drawn from a recorded seed (`hyperplane_normals`) and
b_1..b_B public offsets (0, or median projections of a public reference's images:
`median_offsets`). The release's rows are then

    S1[r] = sum_{i: r(x_i, y_i) = r} phi1(x_i)   (K M x D),   N[r] = #{i: r(x_i, y_i) = r}   (K M,)

Sensitivity (`mepf_core.privacy.sensitivity` holds the general derivation). A record's row is a
function of that record alone (its label and its own bounded features, against public w and b): no
other record's row depends on it. So
    add-remove: D' = D + (x, y) changes exactly one row r(x, y), by phi1(x): ||dS1||_F <= C1, ||dN|| = 1;
    replace-one: (x, y) -> (x', y') changes at most the two rows r(x, y), r(x', y'): same row,
        ||phi1(x') - phi1(x)|| <= 2 C1 and dN = 0; two rows, sqrt(C1^2 + C1^2) <= 2 C1 and ||dN|| = sqrt 2;
the per-class release's sensitivities, with one change: with more than one row the counts are never
public under replace-one (a replaced record can move between cells), even without labels.

What it buys (bench/README.md, within-class cells): the per-row means pin down M points of each
class's feature distribution instead of its centre (Fashion-MNIST, epsilon 10, 8 cells: CNN accuracy
of the synthetic data 80.7 +- 0.5% against 76.0 +- 1.5%), at M times the noise per mean: at
epsilon 0.2 cells hurt, so `cells_for_epsilon` chooses M from the (public) epsilon.
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


def hyperplane_normals(dim: int, cells_per_class: int, seed: int) -> torch.Tensor:
    """D x B float64 normals w_j ~ N(0, I_D), B = log2(cells_per_class), from torch's generator at `seed`.

    The same on every machine for the same (dim, cells_per_class, seed): torch's CPU Philox/MT stream
    for a fixed seed, so the seed recorded in a release defines its cells. Raises InvalidArgumentError
    for dim < 1 or a cells_per_class outside CELLS_PER_CLASS.
    """
    bits = int(math.log2(validate_cells(cells_per_class)))
    if dim < 1:
        raise InvalidArgumentError(f"dim must be >= 1, got {dim}")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(dim, bits, generator=generator, dtype=torch.float64)


def cell_of(phi: torch.Tensor, normals: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(N,) int64 cell in [0, 2^B) of each row of phi (N x D): bit j is [phi . w_j > b_j].

    phi: bounded features (any float dtype; computed in float64); normals: D x B; offsets: (B,)."""
    above = (phi.to(torch.float64) @ normals > offsets.to(torch.float64)).long()
    return (above << torch.arange(normals.shape[1])).sum(dim=1)


def median_offsets(phi: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """(B,) float64 offsets b_j = median over the rows of phi (N x D, PUBLIC images' bounded features)
    of phi . w_j, so each hyperplane halves those images. Never call it on private features: the
    offsets are written into the release unprotected."""
    if phi.shape[0] < 1:
        raise InvalidArgumentError("median offsets need at least one public image")
    return (phi.to(torch.float64) @ normals.to(torch.float64)).median(dim=0).values


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
    and where they came from (`reference`: the public split whose median projections they are, None
    for offsets 0). normals: D x B float64 (`hyperplane_normals(D, M, seed)`); offsets: (B,) float64."""

    cells_per_class: int
    seed: int
    normals: torch.Tensor
    offsets: torch.Tensor
    reference: str | None

    def __repr__(self) -> str:
        return f"CellSplit(cells_per_class={self.cells_per_class}, seed={self.seed}, reference={self.reference!r})"

    def rows(self, phi1: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N,) int64 release row label * M + cell(phi1) of each record (phi1: N x D bounded features,
        labels: (N,) class indices, zeros when unlabelled)."""
        return labels.to(torch.long) * self.cells_per_class + cell_of(phi1, self.normals, self.offsets)
