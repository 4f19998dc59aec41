"""Make the tabulated Voronoi cell centroids (mepf_core.cells.PUBLIC_CENTROIDS) from PUBLIC images only.

    .venv/bin/python scripts/make_cell_centroids.py [--cells 2 4 8 16]

Reads the official Fashion-MNIST test split (its decompressed SHA-256 must be the pinned one), takes its
fixed selection half (`fashion-mnist:test-select`), computes the production bounded features (EfficientNet-
Lite0, packaged weights, norm bound 1, batches of 256), projects them with `centroid_projection(D, 1)` and
writes one K x M x CENTROID_DIM file per M to mepf_core/cell_tables/, printing the PUBLIC_CENTROIDS entries
(file name and SHA-256) to paste into mepf_core/cells.py. tests/test_cells.py recomputes every entry.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mepf_core.cells import (_CENTROID_FILES, LITE0_SHA256, PUBLIC_TEST_SHA256, centroid_projection,  # noqa: E402
                             public_centroids)
from mepf_core.encoders import build_feature_map  # noqa: E402
from mepf_core.features import fixed_batch_features  # noqa: E402
from storage.datasets import dataset_source, open_dataset  # noqa: E402
from storage.references import reference_records  # noqa: E402

TABLES = Path(__file__).resolve().parents[1] / "mepf_core" / "cell_tables"


def public_select_features() -> tuple[torch.Tensor, np.ndarray]:
    """(5,000 x D bounded Lite0 features, labels) of the official test split's selection half."""
    if dataset_source("fashion-mnist", "test") != "idx:sha256:" + PUBLIC_TEST_SHA256["fashion-mnist"]:
        raise SystemExit("the Fashion-MNIST test file is not the official one (SHA-256 differs)")
    fm = build_feature_map("efficientnet-lite0")
    if fm.spec.weights_sha256 != LITE0_SHA256:
        raise SystemExit("the EfficientNet-Lite0 weights are not the packaged ones")
    images, labels = reference_records(open_dataset("fashion-mnist", "test"), "fashion-mnist:test-select")
    x = torch.from_numpy(images).float().div(255)
    with torch.no_grad():
        phi = torch.cat([fixed_batch_features(fm, x[i : i + 256], 256, norm_bound=1.0)[0] for i in range(0, len(x), 256)])
    return phi, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, nargs="+", default=sorted(_CENTROID_FILES))
    args = ap.parse_args()
    phi, labels = public_select_features()
    projection = centroid_projection(phi.shape[1], 1)
    TABLES.mkdir(exist_ok=True)
    for m in args.cells:
        buffer = io.BytesIO()
        np.save(buffer, public_centroids(phi, labels, 10, m, projection), allow_pickle=False)
        (TABLES / _CENTROID_FILES[m]).write_bytes(buffer.getvalue())
        print(f"    _fmnist({m}): ({_CENTROID_FILES[m]!r}, {hashlib.sha256(buffer.getvalue()).hexdigest()!r}),")


if __name__ == "__main__":
    main()
