"""Issue 13: image-folder decoding applies the EXIF orientation before anything else."""

import numpy as np
from PIL import Image

from storage.datasets import _decode_image


def _stored_sideways(tmp_path):
    """A 32 wide x 16 tall stored image tagged Orientation 6 and the upright array a viewer shows."""
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, size=(16, 32, 3), dtype=np.uint8)  # H=16, W=32
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "sideways.png"
    Image.fromarray(stored).save(path, exif=exif)
    upright = np.rot90(stored, k=-1)  # clockwise: H=32, W=16
    return path, upright


def test_orientation_6_decodes_upright(tmp_path):
    path, upright = _stored_sideways(tmp_path)
    assert upright.shape == (32, 16, 3)
    expected = Image.fromarray(np.ascontiguousarray(upright)).resize((32, 32), Image.BILINEAR)
    expected = np.asarray(expected, dtype=np.uint8).transpose(2, 0, 1)
    decoded = _decode_image(path, 32)
    assert decoded.shape == (3, 32, 32) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, expected)


def test_orientation_6_differs_from_ignoring_exif(tmp_path):
    path, upright = _stored_sideways(tmp_path)
    with Image.open(path) as img:
        raw = np.asarray(img.convert("RGB").resize((32, 32), Image.BILINEAR)).transpose(2, 0, 1)
    assert not np.array_equal(_decode_image(path, 32), raw)
