"""Within-class cells (mepf_core.cells, issue 15): sensitivity replays, the public offsets, forged
metadata, and the public side's use of the (class, cell) rows."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mepf_core.cells import (CENTROID_DIM, LITE0_SHA256, MIN_CELL_BATCH, PUBLIC_CENTROIDS, PUBLIC_OFFSETS,
                             PUBLIC_TEST_SHA256, CellSplit, VoronoiSplit, cell_of, cells_for_epsilon,
                             centroid_projection, draw_rows, hyperplane_normals, median_offsets, projections,
                             public_centroids, row_shares, tabulated_centroids, voronoi_directions)
from mepf_core.features import fixed_batch_features
from mepf_core.embedding import sums_to_noisy_parts
from mepf_core.privacy.mechanism import design_mechanism
from mepf_core.privacy.sensitivity import Neighbouring, count_sensitivity, sum_sensitivity
from storage.checkpoints import grid_labels
from storage.params import ReleaseParams
from storage.provenance import ReleaseInfo
from storage.release import ReleaseClaimError, ReleaseSchemaError, check_metadata, read_release
from tests.helpers import lattice_sums, fmnist_subset, frob, lite0, sums_of, tiny_release
from tests.test_release_verify import honest_metadata
from tests.test_sensitivity_replay import KINDS, N, _pairs

K, M = 4, 8
SLACK = 1 + 1e-6


FMNIST_KEY = ("fashion-mnist:test-select", "efficientnet-lite0", LITE0_SHA256, (1, 28, 28), 1.0, 1)


@pytest.fixture(scope="module", params=["hyperplanes", "voronoi", "voronoi2"])
def cells(request) -> CellSplit | VoronoiSplit:
    """hyperplanes: 8 cells per class from seed 1, offsets at the median projections of 64 PUBLIC test
    images (as PUBLIC_OFFSETS); voronoi, voronoi2: 8 (the production default) and 2 cells per class by the
    tabulated centroids of the public half."""
    from storage.datasets import open_dataset
    from tasks.custodian import cell_split

    if request.param.startswith("voronoi"):
        m = M if request.param == "voronoi" else 2
        split = cell_split(ReleaseParams(target_epsilon=10.0, cells_per_class=m), (1, 28, 28), 10)
        assert isinstance(split, VoronoiSplit) and split.cells_per_class == m
        return split
    images, _ = next(open_dataset("fashion-mnist", "test").iter_batches(64))
    phi, _ = fixed_batch_features(lite0(), images, 64, norm_bound=1.0)
    normals = hyperplane_normals(phi.shape[1], M, seed=1)
    return CellSplit(M, 1, normals, median_offsets(phi, normals), "fashion-mnist:test")


@pytest.fixture(scope="module")
def base():
    images, labels = fmnist_subset(N)
    return images, labels % K


@pytest.mark.parametrize("relation", list(Neighbouring))
@pytest.mark.parametrize("labelled", [True, False])
def test_neighbours_move_rows_within_the_sensitivities(base, cells, relation, labelled):
    """Every kind of extreme record (zeros, saturated, NaN, inf, duplicates, label changes), added or
    replaced at 7 positions: the sums move by at most C (add-remove) or 2C (replace-one), the per-row
    counts by exactly 1 (add-remove: one row) or at most sqrt 2 (replace-one: two rows), however the
    record falls among the cells. The base records spread over several cells, so moves between cells
    are replayed."""
    images, labels = base
    bound = {"moment1": sum_sensitivity(relation, 1.0), "moment2": sum_sensitivity(relation, 0.7),
             "counts": count_sensitivity(relation, labelled=labelled, cells_per_class=cells.cells_per_class)}
    assert bound["counts"] == (1.0 if relation is Neighbouring.ADD_REMOVE else pytest.approx(math.sqrt(2)))
    y = labels if labelled else None
    ref = sums_of(images, y, num_classes=K, second_moment_bound=0.7, cells=cells)
    assert ref.moment1.shape[0] == (K if labelled else 1) * cells.cells_per_class
    assert np.count_nonzero(ref.counts) >= min(3, ref.counts.size)  # records in several rows
    moved_cells = 0
    for kind, _, _, img2, lab2 in _pairs(images, labels, relation, seed=3 + labelled):
        other = sums_of(img2, lab2 if labelled else None, num_classes=K, second_moment_bound=0.7, cells=cells)
        for name, value in ref.values().items():
            change = frob(value, other.values()[name])
            assert change <= bound[name] * SLACK + 1e-12, f"{relation.value} {kind}: {name} moved {change}"
        if relation is Neighbouring.ADD_REMOVE:
            assert frob(ref.counts, other.counts) == 1.0  # exactly one row gains the record
        moved_cells += frob(ref.counts, other.counts) > 1.0
    assert len(KINDS) * 7 == 56
    if relation is Neighbouring.REPLACE_ONE:
        assert moved_cells > 0  # some replacements moved a record between rows: the sqrt 2 case was replayed


def test_unlabelled_counts_are_private_under_replace_one_with_cells(cells):
    """The trap: without labels and with one cell, replace-one keeps n and the count exact (public); with
    cells, a replaced record can change cell, so two counts move: sqrt 2, noised, never n_public."""
    images, _ = fmnist_subset(N)
    ref = sums_of(images, None, num_classes=1, moments=1, cells=cells)
    worst = 0.0
    for j, x in itertools.product(range(N), (torch.zeros(1, 28, 28), torch.ones(1, 28, 28))):
        other = images.clone()
        other[j] = x
        worst = max(worst, frob(ref.counts, sums_of(other, None, num_classes=1, moments=1, cells=cells).counts))
    assert worst == pytest.approx(math.sqrt(2))
    m = cells.cells_per_class
    assert count_sensitivity(Neighbouring.REPLACE_ONE, labelled=False, cells_per_class=m) == pytest.approx(math.sqrt(2))
    assert count_sensitivity(Neighbouring.REPLACE_ONE, labelled=False, cells_per_class=1) == 0.0
    mech = design_mechanism(target_epsilon=1.0, target_delta=1e-5, relation=Neighbouring.REPLACE_ONE, labelled=False,
                            moments=1, norm_bound=1.0, second_moment_bound=1.0, cells_per_class=m)
    assert mech.part("counts").noised


def test_a_records_cell_depends_on_that_record_only(base, cells):
    """A record's features, computed at the fixed batch size, are the same bits at any position, beside
    any other records and at any thread count; so is its row."""
    images, labels = base
    fm = lite0()
    ref, _ = fixed_batch_features(fm, images[:1], 16, norm_bound=1.0)
    threads = torch.get_num_threads()
    try:
        for position, others, n_threads in ((0, 0, 1), (5, 1, 2), (11, 2, 1), (15, 3, 2)):
            torch.set_num_threads(n_threads)
            batch = torch.rand((16, 1, 28, 28), generator=torch.Generator().manual_seed(others))
            batch[position] = images[0]
            phi, _ = fixed_batch_features(fm, batch, 16, norm_bound=1.0)
            assert torch.equal(phi[position], ref[0]), (position, others, n_threads)
    finally:
        torch.set_num_threads(threads)
    phi, _ = fixed_batch_features(fm, images, 16, norm_bound=1.0)
    alone = torch.cat([cells.rows(fixed_batch_features(fm, images[i : i + 1], 16, norm_bound=1.0)[0], labels[i : i + 1])
                       for i in range(len(images))])
    assert torch.equal(cells.rows(phi, labels), alone) and torch.equal(alone // cells.cells_per_class, labels)
    assert torch.equal(cells.rows(phi.flip(0), labels.flip(0)).flip(0), alone)


@pytest.mark.parametrize("batch_size", [MIN_CELL_BATCH, 24])
def test_features_at_cell_batch_sizes_are_the_same_bits_at_any_thread_count(batch_size):
    """The fifth DP review: at batches of 2-15 rows, 1 and 2 threads gave features up to 3.2e-8 apart
    (1,888 fixed-point units of a projection), so a record extracted by a shard at another thread count
    could change cell: adding one record (which moves the shard boundaries) moved another record's cell,
    counts and sums by sqrt 3 against a claimed 1. Cells therefore need batches of at least
    MIN_CELL_BATCH rows, where the bits and the fixed-point projections do not depend on threads."""
    images, _ = fmnist_subset(batch_size)
    fm = lite0()
    normals = hyperplane_normals(fm.feature_dim, M, seed=1)
    threads = torch.get_num_threads()
    try:
        out = {}
        for n_threads in (1, 2, 3, 4):
            torch.set_num_threads(n_threads)
            out[n_threads], _ = fixed_batch_features(fm, images[:batch_size], batch_size, norm_bound=1.0)
    finally:
        torch.set_num_threads(threads)
    for n_threads in (2, 3, 4):
        assert torch.equal(out[n_threads], out[1]), n_threads
        assert torch.equal(projections(out[n_threads], normals), projections(out[1], normals)), n_threads


def test_adding_a_record_that_changes_the_batch_moves_no_other_record(tmp_path):
    """The DP review's attack, through the release's extraction: a class of 15 images, 10 of them copies of
    one image whose projection lies within 1e-12 of a hyperplane; adding one unrelated image changes the
    last batch from 15 to 16 images. Unpadded float32 features move by ~1e-7 between those batch sizes,
    which moved every copy to another cell (counts and sums changed by 14.2 against a claimed 1); with
    every batch computed at the fixed batch size exactly one count moves by 1 and the sums by at most C."""
    from PIL import Image

    import tasks.custodian
    from tasks.custodian import shard_sums

    rng = np.random.default_rng(7)
    root = tmp_path / "d"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    copy = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    for i in range(15):
        image = copy if i < 10 else rng.integers(0, 256, (28, 28), dtype=np.uint8)
        Image.fromarray(image).save(root / "a" / f"{i:02d}.png")
    params = ReleaseParams(dataset=f"imagefolder:{root}", target_epsilon=1.0, cells_per_class=2, cell_seed=3,
                           batch_size=16)
    fm = tasks.custodian._feature_map(params)  # the release's own encoder instance, as shard_sums uses it
    normals = hyperplane_normals(fm.feature_dim, 2, 3)
    x = torch.from_numpy(copy).float().div(255)[None, None]
    phi, _ = fixed_batch_features(fm, x, 16, norm_bound=1.0)
    offset = (projections(phi, normals)[0] - 1).double() / 2**32  # the copies sit one unit above the hyperplane
    near = CellSplit(2, 3, normals, offset, None)
    before = shard_sums(params, 0, cells=near)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / "b" / "00.png")
    after = shard_sums(params, 0, cells=near)
    assert before.counts[1] >= 10  # the 10 copies sit in cell 1 of class a
    assert frob(before.counts, after.counts) == 1.0
    assert frob(before.values()["moment1"], after.values()["moment1"]) <= 1.0 * SLACK


def test_cell_bits_and_normals_are_fixed_by_the_seed():
    normals = hyperplane_normals(5, 4, seed=1)
    assert normals.shape == (5, 2) and normals.dtype == torch.float64
    assert torch.equal(normals, hyperplane_normals(5, 4, seed=1)) and not torch.equal(normals, hyperplane_normals(5, 4, 2))
    phi = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]], dtype=torch.float64)
    w = torch.tensor([[1.0, -1.0], [0, 0], [0, 0]], dtype=torch.float64)
    assert cell_of(phi, w, torch.zeros(2)).tolist() == [1, 2]  # bit 0: phi.w0 > 0, bit 1: phi.w1 > 0
    assert cell_of(phi, w, torch.tensor([1.0, 1.0])).tolist() == [0, 0]  # phi.w = b is not above
    assert median_offsets(torch.tensor([[1.0], [2.0], [5.0]]), torch.ones(1, 1, dtype=torch.float64)).tolist() == [2.0]
    # fixed point: the same integers in any row order, alone or in a batch, at any thread count
    big = torch.randn(3, 40_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) / 200
    normals = hyperplane_normals(40_000, 4, seed=1)
    threads = torch.get_num_threads()
    try:
        together = projections(big, normals)
        torch.set_num_threads(1)
        alone = torch.cat([projections(big[i : i + 1], normals) for i in range(3)])
    finally:
        torch.set_num_threads(threads)
    assert together.dtype == torch.int64 and torch.equal(together, alone)
    assert torch.equal(projections(big.flip(0), normals).flip(0), together)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\^63\)"):
        hyperplane_normals(5, 4, seed=2**63)


def test_default_cells_follow_epsilon_and_labels():
    assert cells_for_epsilon(10.0, True, 256) == 8 and cells_for_epsilon(0.5, True, MIN_CELL_BATCH) == 8
    assert cells_for_epsilon(0.2, True, 256) == 1 and cells_for_epsilon(10.0, False, 256) == 1
    assert cells_for_epsilon(10.0, True, MIN_CELL_BATCH - 1) == 1  # too small a batch for cells: one
    assert ReleaseParams(target_epsilon=10.0, batch_size=8).cells == 1
    params = ReleaseParams(target_epsilon=10.0)
    assert (params.cells, params.resolved_cell_reference) == (8, "fashion-mnist:test-select")
    assert ReleaseParams(target_epsilon=0.2).cells == 1
    params = ReleaseParams(target_epsilon=0.2, cells_per_class=2)
    assert (params.cells, params.resolved_cell_reference) == (2, "fashion-mnist:test-select")
    # the default reference only where its table was made for the declared settings (eleventh DP
    # review: --norm-bound 2 resolved to the reference, then failed the preflight): else hyperplanes
    for settings in ({"norm_bound": 2.0}, {"encoder": "vgg19"}, {"encoder_weights": "/w.pt"}):
        params = ReleaseParams(target_epsilon=10.0, **settings)
        assert (params.cells, params.resolved_cell_reference) == (8, None), settings  # hyperplanes through 0
    assert ReleaseParams(target_epsilon=10.0, cells_per_class=2, cell_reference="none").resolved_cell_reference is None
    assert ReleaseParams(target_epsilon=10.0, dataset="imagefolder:/x").resolved_cell_reference is None
    assert ReleaseParams(target_epsilon=10.0, cell_seed=2).resolved_cell_reference is None  # not tabulated: offsets 0
    assert ReleaseParams(target_epsilon=10.0, split="test").resolved_cell_reference is None
    assert ReleaseParams(target_epsilon=10.0, dataset="mnist").resolved_cell_reference is None


@pytest.fixture(scope="module")
def public_half():
    """(5,000 x D bounded Lite0 features, labels) of the official Fashion-MNIST test split's selection half,
    computed with the production functions (batches of 256), its decompressed SHA-256 checked first."""
    from storage.datasets import dataset_source, open_dataset
    from storage.references import reference_records

    assert dataset_source("fashion-mnist", "test") == "idx:sha256:" + PUBLIC_TEST_SHA256["fashion-mnist"]
    fm = lite0()
    assert fm.spec.weights_sha256 == LITE0_SHA256
    images, labels = reference_records(open_dataset("fashion-mnist", "test"), "fashion-mnist:test-select")
    x = torch.from_numpy(images).float().div(255)
    phi = torch.cat([fixed_batch_features(fm, x[i : i + 256], 256, norm_bound=1.0)[0] for i in range(0, len(x), 256)])
    assert len(images) == 5000
    return phi, labels


def test_tabulated_offsets_are_the_medians_of_the_official_public_half(public_half):
    """Every PUBLIC_OFFSETS entry, recomputed from the official Fashion-MNIST test file (its decompressed
    SHA-256 pinned) with the production functions: the table holds no other number (to 1e-6: the encoder's
    float32 last bits differ between CPU types and, measured, between a fresh process and one that ran the
    rest of the suite, by 2.6e-8 here; the release reads the table, never a recomputation)."""
    phi, _ = public_half
    assert len(PUBLIC_OFFSETS) == 4
    for (reference, name, sha, shape, bound, seed, m), offsets in PUBLIC_OFFSETS.items():
        assert (reference, name, sha, shape, bound, seed) == FMNIST_KEY
        recomputed = median_offsets(phi, hyperplane_normals(phi.shape[1], m, seed)).tolist()
        assert recomputed == pytest.approx(list(offsets), abs=1e-6)


def test_tabulated_centroids_are_the_kmeans_of_the_official_public_half(public_half):
    """Every PUBLIC_CENTROIDS file: its pinned SHA-256, K x M x CENTROID_DIM, and equal (to 1e-5; k-means
    sums in floats, measured 1e-16 apart between 1 and 2 threads) to `public_centroids` recomputed from
    the official public half, the way scripts/make_cell_centroids.py made it: public images only."""
    phi, labels = public_half
    projection = centroid_projection(phi.shape[1], 1)
    assert sorted(key.cells_per_class for key in PUBLIC_CENTROIDS) == [2, 4, 8, 16]
    for key in PUBLIC_CENTROIDS:
        assert key[:6] == FMNIST_KEY
        table, sha256 = tabulated_centroids(*key)
        assert sha256 == PUBLIC_CENTROIDS[key][1] and table.shape == (10, key.cells_per_class, CENTROID_DIM)
        recomputed = public_centroids(phi, labels, 10, key.cells_per_class, projection)
        assert np.abs(recomputed - table).max() < 1e-5, key


def test_voronoi_cells_go_to_the_nearest_centroid_of_the_records_class():
    """Toy cells in 2-D (projection = identity): each record's own class's centroids decide, the nearest
    wins, an exact tie goes to the lowest cell, and the scores are the fixed-point projections."""
    centroids = np.array([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0]]])  # K = 2 classes x M = 2
    directions, offsets = voronoi_directions(torch.eye(2, dtype=torch.float64), centroids)
    assert torch.equal(directions, torch.as_tensor(centroids)) and offsets.tolist() == [[0.5, 0.5], [0.5, 0.5]]
    split = VoronoiSplit(2, 1, directions, offsets, "toy", "0" * 64)
    phi = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5], [0.9, 0.1], [-0.1, -0.9]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1])
    # class 0: nearest (1, 0) -> cell 0, (0, 1) -> cell 1, the tie -> 0; class 1 uses its own centroids
    assert split.rows(phi, labels).tolist() == [0, 1, 0, 2 + 1, 2 + 1]
    assert split.rows(phi.flip(0), labels.flip(0)).flip(0).tolist() == [0, 1, 0, 3, 3]


def test_voronoi_directions_are_the_same_bits_at_any_thread_count():
    """The directions P c are computed from public constants in every process and shard of a release: with
    elementwise float64 operations in a fixed order they are the same bits at any thread count."""
    centroids, _ = tabulated_centroids(*FMNIST_KEY, 8)
    projection = centroid_projection(16_960, 1)
    threads = torch.get_num_threads()
    try:
        out = []
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            out.append(voronoi_directions(projection, centroids))
    finally:
        torch.set_num_threads(threads)
    for directions, offsets in out[1:]:
        assert torch.equal(directions, out[0][0]) and torch.equal(offsets, out[0][1])


def test_placing_cells_reads_no_data_whatever_the_data_root(monkeypatch, tmp_path):
    """The second DP review's attack: --data-root pointing at a folder whose t10k files are private, which
    an offsets computation at release time would have read. Cells are placed from the table alone."""
    import storage.datasets
    import tasks.custodian

    def tripwire(*args, **kwargs):
        raise AssertionError("cell placement opened a dataset")

    monkeypatch.setattr(storage.datasets, "open_dataset", tripwire)
    monkeypatch.setattr(tasks.custodian, "open_dataset", tripwire)
    params = ReleaseParams(target_epsilon=10.0, data_root=str(tmp_path))
    split = tasks.custodian.cell_split(params, (1, 28, 28))
    assert isinstance(split, VoronoiSplit) and split.reference == "fashion-mnist:test-select"
    assert split.centroids_sha256 == PUBLIC_CENTROIDS[(*FMNIST_KEY, 8)][1]
    centroids, _ = tabulated_centroids(*FMNIST_KEY, 8)
    directions, offsets = voronoi_directions(centroid_projection(split.directions.shape[2], 1), centroids)
    assert torch.equal(split.directions, directions) and torch.equal(split.offsets, offsets)
    with pytest.raises(ValueError, match="has centroids for 10 classes, the dataset has 3"):
        tasks.custodian.cell_split(params, (1, 28, 28), 3)
    with pytest.raises(ValueError, match="no tabulated centroids for encoder efficientnet-lite0"):
        tasks.custodian.cell_split(params, (3, 32, 32))
    given = {"norm_bound": 2.0, "cell_reference": "fashion-mnist:test-select"}
    with pytest.raises(ValueError, match="no tabulated centroids"):  # a given reference is looked up exactly
        tasks.custodian.cell_split(params.model_copy(update=given), (1, 28, 28))
    # the default reference only where its table was made for the settings (eleventh DP review): else hyperplanes
    assert isinstance(tasks.custodian.cell_split(params.model_copy(update={"norm_bound": 2.0}), (1, 28, 28)), CellSplit)
    # the fourth review: a data-dependent overflow check let one record decide whether a release failed
    # (uncharged); the range is now checked on C and the normals alone, before any data is read
    with pytest.raises(ValueError, match="too large for within-class cells"):
        tasks.custodian.cell_split(params.model_copy(update={"norm_bound": 1e7, "cell_reference": "none"}), (1, 28, 28))


@pytest.mark.parametrize("settings, message", [
    ({"cells_per_class": 3}, "cells_per_class must be one of 1, 2, 4, 8, 16, got 3"),
    ({"cells_per_class": True}, "cells_per_class"),
    ({"cells_per_class": 8, "labelled": False}, "cells_per_class=8 needs a labelled release"),
    ({"cell_reference": "fashion-mnist:train"}, "has no tabulated centroids"),  # the private split itself
    ({"cell_reference": "fashion-mnist"}, "has no tabulated centroids"),
    ({"cell_reference": "mnist:test"}, "has no tabulated centroids"),
    ({"cell_reference": "fashion-mnist:test-select", "cell_seed": 2}, "has no tabulated centroids for cell_seed 2"),
    ({"cell_reference": "imagefolder:/data:test"}, "has no tabulated centroids"),
    ({"cell_reference": "fashion-mnist:test-select "}, "has no tabulated centroids"),
    ({"cell_seed": -1}, "cell_seed"),
    # the reference is part of the split being released: its centroids are no public constants for it
    ({"cell_reference": "fashion-mnist:test-select", "split": "test"}, "is drawn from the fashion-mnist test split"),
    ({"cell_reference": "fashion-mnist:test-select", "split": "test", "target_epsilon": 0.3}, "is drawn from"),
    # a reference is checked whatever the number of cells: below 0.5 it is not silently dropped
    ({"cell_reference": "mnist:test-select", "target_epsilon": 0.3}, "has no tabulated centroids"),
    ({"cell_reference": "fashion-mnist:test-select", "cell_seed": 2, "target_epsilon": 0.3}, "has no tabulated"),
    ({"cell_reference": "mnist:test-select", "target_epsilon": 0.1}, "any number of cells per class"),
    ({"batch_size": 1, "cells_per_class": 8}, "needs batch_size >= 16"),
    ({"batch_size": 15, "cells_per_class": 2}, "needs batch_size >= 16"),  # the fifth review's thread-count break, below
])
def test_cell_settings_that_could_leak_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        ReleaseParams(**{"target_epsilon": 1.0, **settings})


def _cells_metadata(relation=Neighbouring.ADD_REMOVE, labelled=True, m=M, voronoi=False):
    """Honest metadata of a release with m cells per class, the rows and counts as the custodian makes them:
    hyperplane cells of 3 classes with the tabulated offsets, or Voronoi cells of the table's 10 classes."""
    classes = 10 if voronoi else 3
    meta, noisy = honest_metadata(relation=relation, labelled=labelled, k=classes * m if labelled else m)
    k = classes if labelled else 1
    mech = design_mechanism(target_epsilon=1.0, target_delta=1e-5, relation=relation, labelled=labelled, moments=1,
                            norm_bound=1.0, second_moment_bound=1.0, cells_per_class=m)
    noisy = sums_to_noisy_parts(lattice_sums(np.zeros((k * m, 50)), None, np.full(k * m, 5.0)), mech)
    parts = tuple(dataclasses.replace(p, shape=noisy[p.name].shape, sensitivity=mp.sensitivity, sigma=mp.sigma,
                                      noise_multiplier=mp.noise_multiplier if mp.noised else None)
                  for p, mp in zip(meta.parts, mech.parts))
    cells = (dict(cell_centroids_sha256=PUBLIC_CENTROIDS[(*FMNIST_KEY, m)][1]) if voronoi
             else dict(cell_offsets=PUBLIC_OFFSETS[(*FMNIST_KEY, m)]))
    return dataclasses.replace(meta, class_names=tuple("abcdefghij"[:classes]) if labelled else ("all",), parts=parts,
                               epsilon=mech.epsilon, n_public=None, cells_per_class=m, cell_seed=1,
                               encoder=dataclasses.replace(meta.encoder, weights_sha256=LITE0_SHA256),
                               cell_reference="fashion-mnist:test-select", **cells)


def test_honest_cells_metadata_verifies():
    meta = _cells_metadata()
    assert check_metadata(meta) == pytest.approx(meta.epsilon) and meta.rows == 24
    voronoi = _cells_metadata(voronoi=True)
    assert check_metadata(voronoi) == pytest.approx(voronoi.epsilon) and voronoi.rows == 80


@pytest.mark.parametrize("forge, message", [
    (lambda m: dataclasses.replace(m, cell_centroids_sha256="0" * 64), "is not the table of centroids"),
    (lambda m: dataclasses.replace(m, cell_centroids_sha256=m.cell_centroids_sha256.upper()), "not the table"),
    (lambda m: dataclasses.replace(m, cell_centroids_sha256=PUBLIC_CENTROIDS[(*FMNIST_KEY, 4)][1]), "not the table"),
    (lambda m: dataclasses.replace(m, cell_offsets=PUBLIC_OFFSETS[(*FMNIST_KEY, 8)]), "Voronoi cells record no offsets"),
    (lambda m: dataclasses.replace(m, cell_offsets=()), "Voronoi cells record no offsets"),  # a free field
    (lambda m: dataclasses.replace(m, cell_reference=None), "not the table of centroids"),
    (lambda m: dataclasses.replace(m, cell_reference="mnist:test-select"), "not the table of centroids"),
    (lambda m: dataclasses.replace(m, cell_seed=2), "not the table of centroids"),
    (lambda m: dataclasses.replace(m, norm_bound=2.0), "not the table of centroids"),
    (lambda m: dataclasses.replace(m, image_shape=(3, 32, 32)), "not the table of centroids"),
    (lambda m: dataclasses.replace(m, encoder=dataclasses.replace(m.encoder, name="vgg19")), "not the table"),
    (lambda m: dataclasses.replace(m, cells_per_class=1), "one cell per class records no cell_seed"),
    (lambda m: dataclasses.replace(m, labelled=False), "1 class"),
])
def test_forged_voronoi_metadata_is_refused(forge, message):
    """Voronoi cells are named by the SHA-256 of a table the reader holds: no free number, no free bit."""
    with pytest.raises(ReleaseSchemaError, match=message):
        check_metadata(forge(_cells_metadata(voronoi=True)))


def test_voronoi_metadata_for_another_number_of_classes_is_refused():
    """The table's centroids are per class: a release of 3 classes cannot claim the 10-class table."""
    meta = _cells_metadata()
    forged = dataclasses.replace(meta, cell_offsets=None, cell_centroids_sha256=PUBLIC_CENTROIDS[(*FMNIST_KEY, M)][1])
    with pytest.raises(ReleaseSchemaError, match="for .* and 3 classes"):
        check_metadata(forged)


def _exact_counts(meta):
    parts = tuple(dataclasses.replace(p, sensitivity=0.0, sigma=0.0, noise_multiplier=None) if p.name == "counts"
                  else p for p in meta.parts)
    return dataclasses.replace(meta, parts=parts, n_public=40)


@pytest.mark.parametrize("forge, error, message", [
    (lambda m: dataclasses.replace(m, cells_per_class=1, cell_seed=None, cell_offsets=None, cell_reference=None),
     ReleaseSchemaError, r"shape \[24, 50\], expected \[3, D\] for 3 classes"),  # rows without their cells
    (lambda m: dataclasses.replace(m, cells_per_class=4, cell_offsets=PUBLIC_OFFSETS[
        ("fashion-mnist:test-select", "efficientnet-lite0", LITE0_SHA256, (1, 28, 28), 1.0, 1, 4)]), ReleaseSchemaError,
     r"expected \[12, D\] for 3 classes x 4 cells"),
    (lambda m: dataclasses.replace(m, cells_per_class=3), ReleaseSchemaError, "cells_per_class must be one of"),
    (lambda m: dataclasses.replace(m, cells_per_class=True), ReleaseSchemaError, "cells_per_class must be one of"),
    (lambda m: dataclasses.replace(m, cell_offsets=(0.0, 0.0)), ReleaseSchemaError, "cell_offsets must be 3 finite"),
    (lambda m: dataclasses.replace(m, cell_offsets=(1, 2, 3)), ReleaseSchemaError, "cell_offsets must be 3 finite"),
    (lambda m: dataclasses.replace(m, cell_offsets=(0.5, float("nan"), 0.5)), ReleaseSchemaError, "cell_offsets"),
    (lambda m: dataclasses.replace(m, cell_offsets=(123.0, -9e9, 1e300)), ReleaseSchemaError,
     "are not the offsets tabulated"),  # free numbers that could carry anything
    (lambda m: dataclasses.replace(m, cell_offsets=m.cell_offsets[:2] + (m.cell_offsets[2] + 1e-12,)),
     ReleaseSchemaError, "are not the offsets tabulated"),  # free low bits
    (lambda m: dataclasses.replace(m, norm_bound=2.0), ReleaseSchemaError, "are not the offsets tabulated"),
    (lambda m: dataclasses.replace(m, encoder=dataclasses.replace(m.encoder, name="vgg19")), ReleaseSchemaError,
     "are not the offsets tabulated"),  # the third review: the encoder's name is part of the key
    (lambda m: dataclasses.replace(m, cell_reference=None, cell_offsets=(-0.0, 0.0, 0.0)), ReleaseSchemaError,
     "without a cell_reference"),  # not even a free sign bit
    (lambda m: dataclasses.replace(m, cell_seed=2), ReleaseSchemaError, "are not the offsets tabulated"),
    (lambda m: dataclasses.replace(m, cell_reference="mnist:test-report"), ReleaseSchemaError, "not the offsets"),
    (lambda m: dataclasses.replace(m, cell_reference=None), ReleaseSchemaError, "without a cell_reference"),
    (lambda m: dataclasses.replace(m, cell_seed=None), ReleaseSchemaError, "cell_seed must be an integer"),
    (lambda m: dataclasses.replace(m, cell_seed=2**80), ReleaseSchemaError, "cell_seed must be an integer"),
    (lambda m: dataclasses.replace(m, cell_reference="fashion-mnist:train"), ReleaseSchemaError, "cell_reference"),
    (lambda m: dataclasses.replace(m, cell_reference="cifar10:test"), ReleaseSchemaError, "not the offsets"),
    (lambda m: dataclasses.replace(m, image_shape=(3, 28, 28)), ReleaseSchemaError, "not the offsets"),
    (lambda m: dataclasses.replace(m, labelled=False), ReleaseSchemaError, "1 class"),
])
def test_forged_cells_metadata_is_refused(forge, error, message):
    with pytest.raises(error, match=message):
        check_metadata(forge(_cells_metadata()))


def test_one_cell_records_no_cell_fields():
    meta, _ = honest_metadata()
    with pytest.raises(ReleaseSchemaError, match="one cell per class records no cell_seed"):
        check_metadata(dataclasses.replace(meta, cell_offsets=()))


def test_exact_counts_with_cells_are_refused_under_replace_one():
    """A forger claiming the unlabelled replace-one exemption (exact counts, n public) for a release with
    cells: refused, labelled (the counts' sensitivity is sqrt 2) or not (cells need labels)."""
    labelled = _cells_metadata(Neighbouring.REPLACE_ONE)
    assert check_metadata(labelled) == pytest.approx(labelled.epsilon)
    with pytest.raises(ReleaseClaimError, match=r"records sensitivity 0.0, but labelled counts under replace-one"):
        check_metadata(_exact_counts(labelled))
    unlabelled = _cells_metadata(Neighbouring.REPLACE_ONE, labelled=False)
    for meta in (unlabelled, _exact_counts(unlabelled)):
        with pytest.raises(ReleaseSchemaError, match="cells_per_class 8 needs a labelled release"):
            check_metadata(meta)


def test_rows_shares_and_draws_follow_the_noisy_counts():
    counts = np.array([3.0, 1.0, -2.0, 0.0, -1.0, -1.0, 0.0, 0.0])  # 2 classes x 4 cells
    shares = row_shares(counts, 4)
    assert shares.tolist() == [0.75, 0.25, 0.0, 0.0, 0.25, 0.25, 0.25, 0.25]  # all <= 0: equal shares
    classes = torch.arange(4000) % 2
    rows = draw_rows(classes, shares, 4, seed=0)
    assert torch.equal(rows // 4, classes)
    first = np.bincount(rows[classes == 0].numpy(), minlength=4)
    assert first[2] == first[3] == 0 and 0.7 < first[0] / 2000 < 0.8
    assert torch.equal(draw_rows(classes, shares, 4, seed=0), rows)
    assert torch.equal(draw_rows(classes, None, 1, seed=0), classes)
    labels, per_row = grid_labels(2, True, 4)
    assert per_row == 10 and labels[:10].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1] and torch.equal(labels // 4,
                                                                                                  torch.arange(20) // 10)


def test_public_stage_trains_and_samples_classes_from_a_cells_release(tmp_path):
    """A release with 4 cells per class: the generator is conditioned on the 8 rows, the synthetic labels
    are the 2 classes, the provenance carries the rows' shares and survives a round trip."""
    from mepf_core.train_config import TrainConfig
    from storage.synthetic import read_synthetic_dataset
    from tasks.public import sample_synthetic, train_generator

    release = read_release(tiny_release(tmp_path / "r.h5", per_class=8, cells_per_class=4))
    assert release.noisy["counts"].shape == (8,) and release.metadata.rows == 8
    info = ReleaseInfo.from_release(release)
    assert info.rows == 8 and len(info.row_shares) == 8 and ReleaseInfo.from_dict(info.to_dict()) == info
    config = TrainConfig(steps=4, batch_size=8, checkpoint_every=2, eval_samples=16)
    train_generator(release, tmp_path / "run", config, progress=False)
    out = sample_synthetic(tmp_path / "run", 20, tmp_path / "syn.h5")
    data = read_synthetic_dataset(out["path"])
    assert data.images.shape == (20, 1, 28, 28) and sorted(set(data.labels.tolist())) == [0, 1]
    assert np.bincount(data.labels).tolist() == [10, 10]


def test_pipeline_refuses_a_batch_smaller_than_the_rows_before_any_work():
    """16 cells x 10 classes = 160 rows: a batch of 100 could not match every row, and training would fail
    after the release had spent its budget; refused when the parameters are read."""
    from storage.params import PipelineParams

    with pytest.raises(ValidationError, match="batch_size 100 is smaller than the release's 160 rows"):
        PipelineParams(cells_per_class=16)
    assert PipelineParams(cells_per_class=16, batch_size=160).stage_params()[0].cells == 16
    assert PipelineParams().stage_params()[0].cells == 8  # the default job: epsilon 10, labelled
