"""bench/bench_statistics.py's released vectors keep the production sensitivity (norm bound C = 1).

Every variant's per-record vector, the within-class sketch of `-covK` included, has norm <= C, so the
per-class sum moves by at most C when one record is added or removed: replayed here on worst-case
records (huge, tiny, all-zero and non-finite activations) and on the neighbouring datasets they make."""

from __future__ import annotations

import math

import pytest
import torch

from bench import bench_statistics as bs
from mepf_core.embedding import FeatureSums


@pytest.fixture(scope="module")
def lite0():
    return bs.lite0_all_blocks(32)


def _extreme_outputs(variant: bs.VariantMap) -> list[torch.Tensor]:
    outs = [o.double() for o in variant.stage_outputs(torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)))]
    outs = [o.clone() for o in outs]
    outs[0][0] *= 1e12  # one record with huge activations in the first stage
    for o in outs:
        o[1] *= 1e-12  # one nearly all-zero record
        o[2] = 0.0  # one all-zero record
        o[3] = torch.nan  # non-finite activations, sanitised as extraction does
    return [torch.nan_to_num(o, nan=0.0, posinf=0.0, neginf=0.0) for o in outs]


@pytest.mark.parametrize("name", ["base6-joint", "base6-layer", "base6-joint-cov8", "all16-layer-cov16"])
def test_every_record_vector_and_every_neighbouring_sum_stays_within_the_bound(lite0, name):
    variant = bs.VariantMap(lite0, lite0.spec, *bs.parse_variant(name))
    feats = variant.features(_extreme_outputs(variant))
    assert float(feats.norm(dim=1).max()) <= bs.NORM_BOUND * (1 + 1e-12)
    assert float(feats[2].abs().max()) == 0.0  # an all-zero record adds nothing
    if variant.cov_dim:
        assert feats.shape[1] > variant.cov_dim ** 2  # phi and the K x K sketch
        sketch = feats[:, -variant.cov_dim ** 2:] / math.sqrt(bs.COV_SHARE)
        for row in sketch[[0, 1, 4]]:  # vec(z z^T) of a unit z: Frobenius norm 1, a symmetric PSD matrix
            z_outer = row.reshape(variant.cov_dim, variant.cov_dim)
            torch.testing.assert_close(z_outer, z_outer.T)
            assert abs(float(z_outer.norm()) - 1.0) < 1e-9
    labels = torch.tensor([0, 1, 0, 1, 0, 1])

    def class_sums(keep: list[int]) -> torch.Tensor:  # what extraction accumulates, before the noise
        sums = FeatureSums.zeros(2, feats.shape[1], 1, norm_bound=1.0)
        sums.add(feats[keep], None, labels[keep])
        return torch.as_tensor(sums.values()["moment1"])

    full = class_sums(list(range(len(labels))))
    for removed in range(len(labels)):  # add-remove neighbours: drop each record in turn
        neighbour = class_sums([i for i in range(len(labels)) if i != removed])
        assert float((full - neighbour).norm()) <= bs.NORM_BOUND * (1 + 1e-12)


def test_cells_put_each_record_in_one_row_so_neighbours_move_the_sums_by_at_most_the_bound(lite0):
    """-lshB: a record's (class, cell) row is a function of the record alone; every add-remove neighbour
    moves the K*2^B x D sums by <= C (L2) and the counts by 1, the per-class release's sensitivities."""
    variant = bs.VariantMap(lite0, lite0.spec, *bs.parse_variant("base6-joint-lsh2"))
    feats = variant.features(_extreme_outputs(variant))
    normals = bs.lsh_planes(feats.shape[1], 2)
    torch.testing.assert_close(normals, bs.lsh_planes(feats.shape[1], 2))  # public: the same from its seed
    offsets = torch.zeros(2, dtype=torch.float64)
    cells = bs.lsh_cells(feats, normals, offsets)
    assert cells.tolist() == bs.lsh_cells(feats.flip(0), normals, offsets).flip(0).tolist()  # per record
    assert int(cells.min()) >= 0 and int(cells.max()) < 4
    rows = torch.tensor([0, 1, 0, 1, 0, 1]) * 4 + cells

    def sums(keep: list[int]) -> FeatureSums:
        out = FeatureSums.zeros(8, feats.shape[1], 1, norm_bound=1.0)
        out.add(feats[keep], None, rows[keep])
        return out

    full = sums(list(range(6)))
    for removed in range(6):
        neighbour = sums([i for i in range(6) if i != removed])
        assert float(torch.as_tensor(full.values()["moment1"] - neighbour.values()["moment1"]).norm()) <= bs.NORM_BOUND * (1 + 1e-12)
        assert float(abs(full.counts - neighbour.counts).sum()) == 1.0


def test_cell_labels_follow_the_released_counts_within_each_class():
    counts = torch.tensor([30.0, -5.0, 10.0, 0.0] + [1.0, 1.0, 1.0, 1.0] * 9).numpy()  # class 0: cells 0 and 2 only
    labels = bs.cell_labels(1000, counts, 4)
    assert len(labels) == 1000 and (labels // 4).bincount().tolist() == [100] * 10
    class0 = labels[labels // 4 == 0] % 4
    assert set(class0.tolist()) <= {0, 2} and 60 <= int((class0 == 0).sum()) <= 90


def test_variant_names_are_checked():
    assert bs.parse_variant("base6-joint-cov32") == (list(range(7)), "joint", 32)
    assert bs.parse_variant("all16-layer") == (list(range(17)), "layer", 0)
    assert bs.lsh_bits("base6-joint-cov8-lsh3") == 3 and bs.lsh_bits("base6-joint") == 0
    for bad in ("base6-joint-cov0", "base6-joint-covx", "base6-joint-foo", "base7-joint", "base6-joint-lsh0",
                "base6-joint-lsh9", "base6-joint-lshx"):
        with pytest.raises(SystemExit, match="STAGES-NORM"):
            bs.parse_variant(bad)
