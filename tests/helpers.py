"""Shared test helpers: tiny private datasets and un-noised sums through the production path."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from mepf_core.embedding import FeatureSums
from mepf_core.encoders import build_feature_map


@functools.lru_cache(maxsize=None)
def lite0():
    return build_feature_map("efficientnet-lite0")


def zcdp_epsilon(z: float, delta: float) -> float:
    """Independent of autodp: epsilon of rho-zCDP (rho = 1 / (2 z^2)) at delta by the conversion of Balle et
    al. 2020 (Thm 21), eps = min over alpha > 1 of alpha rho + (log(1/delta) + (alpha - 1) log(1 - 1/alpha)
    - log alpha) / (alpha - 1), on a dense grid of alpha."""
    rho = 0.5 / z**2
    a = np.exp(np.linspace(np.log(1.0001), np.log(1e4), 2_000_001))
    return float(np.min(a * rho + (np.log(1 / delta) + (a - 1) * np.log1p(-1 / a) - np.log(a)) / (a - 1)))


def lattice_sums(moment1, moment2, counts, *, norm_bound: float = 1.0, second_moment_bound: float = 1.0) -> FeatureSums:
    """Test fixture: FeatureSums holding these float sums (feature units) rounded to the lattice of the bounds.

    Not the custodian's path (that maps each RECORD to the lattice, `FeatureSums.add`); for tests that need
    sums of a given value, e.g. to build a release file."""
    sums = FeatureSums.zeros(len(counts), np.shape(moment1)[1], 1 if moment2 is None else 2, norm_bound=norm_bound,
                             second_moment_bound=None if moment2 is None else second_moment_bound)
    sums.moment1 = np.round(np.asarray(moment1) / sums.units["moment1"]).astype(np.int64)
    if moment2 is not None:
        sums.moment2 = np.round(np.asarray(moment2) / sums.units["moment2"]).astype(np.int64)
    sums.counts = np.round(np.asarray(counts)).astype(np.int64)
    return sums


def sums_of(images: torch.Tensor, labels: torch.Tensor | None, *, num_classes: int, moments: int = 2,
            norm_bound: float = 1.0, second_moment_bound: float = 1.0, batch_size: int = 8,
            cells=None) -> FeatureSums:
    """Un-noised per-row sums of a dataset, exactly as the custodian computes them (batched); rows are
    classes, or (class, cell) pairs with `cells` (a mepf_core.cells.CellSplit)."""
    from mepf_core.features import fixed_batch_features

    fm = lite0()
    m = 1 if cells is None else cells.cells_per_class
    sums = FeatureSums.zeros((num_classes if labels is not None else 1) * m, fm.feature_dim, moments,
                             norm_bound=norm_bound, second_moment_bound=second_moment_bound if moments == 2 else None)
    for lo in range(0, len(images), batch_size):
        x = images[lo : lo + batch_size]
        y = torch.zeros(len(x), dtype=torch.long) if labels is None else labels[lo : lo + batch_size]
        phi1, phi2 = fixed_batch_features(fm, x, batch_size, norm_bound=norm_bound,
                                          second_moment_bound=second_moment_bound if moments == 2 else None)
        sums.add(phi1, phi2, y if cells is None else cells.rows(phi1, y))
    return sums


def random_images(n: int, seed: int = 0, shape=(1, 28, 28)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g)


def fmnist_subset(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from storage.datasets import open_dataset

    images, labels = next(open_dataset("fashion-mnist", "train").iter_batches(n))
    return images, labels


def frob(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).sum()))


def write_image_folder(root, *, classes=("a", "b"), per_class: int = 4, seed: int = 0, size=(28, 28)):
    """ROOT/<class>/<i>.png: random grey images, the same file names for any seed. Returns ROOT."""
    from pathlib import Path

    from PIL import Image

    root, rng = Path(root), np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def cheap_evaluation_run(tmp_path, monkeypatch) -> dict:
    """A run folder with 20 synthetic images, a fresh HOME (so a fresh FID cache) and a cheap stand-in
    for Inception (3 pixel values per image): for tests of what evaluation checks and caches, not of FID."""
    import tasks.evaluation
    from storage.synthetic import write_synthetic

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MEPF_CACHE_DIR", raising=False)
    monkeypatch.setattr(tasks.evaluation, "load_fid_inception", lambda device: None)
    monkeypatch.setattr(tasks.evaluation, "images_to_inception_activations",
                        lambda model, images, device, progress: np.asarray(images, np.float64).reshape(len(images), -1)[:, :3])
    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(2)
    write_synthetic(run / "synthetic.h5", rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8),
                    np.arange(20) % 2, {"epsilon": 1.0, "delta": 1e-5, "release_id": "x", "encoder": "efficientnet-lite0",
                                        "class_names": ["a", "b"], "steps": 1})
    return {"home": home, "run": run, "cache": home / ".cache" / "dp-mepf" / "fid", "tmp": tmp_path}


def tiny_release(path, *, classes=("a", "b"), per_class: int = 4, epsilon: float = 1000.0, seed: int = 0,
                 cells_per_class: int = 1):
    """A labelled release (efficientnet-lite0, 1 x 28 x 28, one moment) of random images, made through the
    production sums and noise: cheap input for tests of the public stage. With `cells_per_class` > 1, the
    rows are (class, cell) pairs of feature-space hyperplanes from seed 0 with offsets 0. Returns the file's path."""
    from mepf_core.cells import CellSplit, hyperplane_normals
    from mepf_core.embedding import sums_to_noisy_parts
    from mepf_core.privacy.mechanism import design_mechanism
    from mepf_core.privacy.sensitivity import Neighbouring
    from storage.release import PartRecord, ReleaseMetadata, embedding_to_release

    k = len(classes)
    images = random_images(k * per_class, seed=seed)
    labels = torch.arange(k * per_class) % k
    mech = design_mechanism(target_epsilon=epsilon, target_delta=1e-5, relation=Neighbouring.ADD_REMOVE,
                            labelled=True, moments=1, norm_bound=1.0, second_moment_bound=1.0,
                            cells_per_class=cells_per_class)
    cells = None
    if cells_per_class > 1:
        normals = hyperplane_normals(lite0().feature_dim, cells_per_class, 0)
        cells = CellSplit(cells_per_class, 0, normals, torch.zeros(normals.shape[1], dtype=torch.float64), None)
    noisy = sums_to_noisy_parts(sums_of(images, labels, num_classes=k, moments=1, cells=cells), mech)
    meta = ReleaseMetadata(
        dataset_id="test:tiny", neighbouring=mech.relation.value, epsilon=mech.epsilon, delta=mech.target_delta,
        target_epsilon=epsilon, norm_bound=1.0, second_moment_bound=None, moments=1, labelled=True,
        class_names=tuple(classes), image_shape=(1, 28, 28), encoder=lite0().spec,
        parts=tuple(PartRecord.of(p, noisy[p.name].shape) for p in mech.parts),
        **({} if cells is None else dict(cells_per_class=cells_per_class, cell_seed=0,
                                         cell_offsets=(0.0,) * cells.normals.shape[1])),
    )
    return embedding_to_release(path, meta, noisy)


def load_script(name: str):
    """The module scripts/NAME.py (the scripts folder is not a package), registered as sys.modules[NAME]."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
