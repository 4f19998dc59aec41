"""Issue 15: the 28x28 generator's width is a training parameter (TrainConfig.conv28_channels), saved with
the run so that sampling rebuilds the same network; runs saved before the field keep the paper's width."""

from __future__ import annotations

import pytest
import torch

from mepf_core.errors import InvalidArgumentError
from mepf_core.generators import build_generator
from mepf_core.train_config import PAPER_CONV28_CHANNELS, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_width_sets_both_convolutions_and_the_ten_class_code():
    g = build_generator((1, 28, 28), 10, True, conv28_channels=32)
    assert (g.conv1[0].in_channels, g.conv1[0].out_channels, g.conv2.in_channels) == (32, 16, 16)
    assert g.fc[3].out_features == 32 * 7 * 7
    assert g.generate(torch.arange(4) % 10).shape == (4, 1, 28, 28)
    paper = build_generator((1, 28, 28), 10, True)
    assert (paper.conv1[0].in_channels, PAPER_CONV28_CHANNELS, TrainConfig(steps=1).conv28_channels) == (16, 16, 16)


@pytest.mark.parametrize("bad", [1, 0, -4, 513, 2.5, True])
def test_width_is_validated(bad):
    with pytest.raises(InvalidArgumentError, match=f"conv28_channels must be an integer in \\[2, 512\\], got {bad!r}"):
        TrainConfig(steps=1, conv28_channels=bad)


def test_a_config_saved_before_the_field_loads_with_the_papers_width():
    assert TrainConfig.from_dict({"steps": 5, "batch_size": 100}).conv28_channels == PAPER_CONV28_CHANNELS
    assert TrainConfig.from_dict({"steps": 5, "conv28_channels": 24}).conv28_channels == 24


def test_a_run_samples_with_the_width_it_was_trained_with(tmp_path):
    from storage.release import read_release
    from storage.synthetic import read_synthetic
    from tasks.public import sample_synthetic, train_generator
    from tests.test_training import _make_release

    release = read_release(_make_release(tmp_path / "tiny.h5", moments=1))
    config = TrainConfig(steps=2, batch_size=10, checkpoint_every=2, eval_samples=20, device="cpu", conv28_channels=8)
    train_generator(release, tmp_path / "run", config, progress=False)
    images, labels = read_synthetic(sample_synthetic(tmp_path / "run", 20, tmp_path / "s.h5")["path"])[:2]
    assert images.shape == (20, 1, 28, 28) and len(labels) == 20
