"""Issue 15: an exponential moving average of the generator's weights (TrainConfig.ema_decay) is
tracked beside training without changing it, chosen and sampled from, saved and resumed exactly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mepf_core.errors import InvalidArgumentError
from mepf_core.training import TrainConfig, WeightAverage, balanced_labels, generate
from storage.checkpoints import BEST, LATEST, load_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from storage.release import read_release
    from tests.test_training import _make_release

    return read_release(_make_release(tmp_path_factory.mktemp("release") / "tiny.h5", moments=1))


def test_weight_average_is_the_exponential_recursion():
    live = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    average = WeightAverage(live, 0.9)
    start = {k: v.clone() for k, v in average.module.state_dict().items()}
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    live(torch.randn(4, 2))  # training-mode forward: running statistics and the batch counter move
    average.update(live)
    now, new = average.module.state_dict(), live.state_dict()
    for key in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
        torch.testing.assert_close(now[key], 0.9 * start[key] + 0.1 * new[key])
    assert now["1.num_batches_tracked"] == new["1.num_batches_tracked"] == 1  # integers are copied
    assert average.updates == 1 and not any(p.requires_grad for p in average.module.parameters())
    with pytest.raises(InvalidArgumentError, match=r"decay must be in \(0, 1\), got 1.0"):
        WeightAverage(live, 1.0)


@pytest.mark.parametrize("bad", [-0.1, 1.0, True, "0.9", float("nan")])
def test_ema_decay_is_validated(bad):
    with pytest.raises(InvalidArgumentError, match=r"ema_decay must be in \[0, 1\) \(0 = off\), got"):
        TrainConfig(steps=1, ema_decay=bad)


def test_ema_leaves_training_unchanged_is_sampled_and_resumes_exactly(release, tmp_path):
    from storage.synthetic import read_synthetic
    from tasks.public import _release_trainer, sample_synthetic, train_generator

    plain = TrainConfig(steps=4, batch_size=10, checkpoint_every=2, eval_samples=20, device="cpu",
                        lr_schedule="constant")  # a cosine run's schedule is defined by its length
    config = replace(plain, ema_decay=0.5)
    a, b = _release_trainer(release, plain, None), _release_trainer(release, config, None)
    a.train(progress=False)
    b.train(progress=False)
    assert a.history == b.history  # the average never feeds back into the trajectory
    for name, tensor in a.generator.state_dict().items():
        assert torch.equal(tensor, b.generator.state_dict()[name]), name
    assert a.sampling_generator is a.generator and b.sampling_generator is b.ema.module
    assert b.ema.updates == 4
    assert not torch.equal(b.ema.module.fc[0].weight, b.generator.fc[0].weight)
    # the criterion judges the weights that will be sampled
    assert b.criteria[-1][1] != a.criteria[-1][1]

    # a run: the checkpoint carries the average; sampling uses it; resuming continues it exactly
    train_generator(release, tmp_path / "straight", config, progress=False)
    train_generator(release, tmp_path / "resumed", replace(config, steps=2), progress=False)
    train_generator(release, tmp_path / "resumed", config, resume=True, progress=False)
    straight = load_checkpoint(tmp_path / "straight" / LATEST)["state"]
    resumed = load_checkpoint(tmp_path / "resumed" / LATEST)["state"]
    assert straight["generator_ema"]["updates"] == resumed["generator_ema"]["updates"] == 4
    for name, tensor in straight["generator_ema"]["weights"].items():
        assert torch.equal(tensor, resumed["generator_ema"]["weights"][name]), name

    best = load_checkpoint(tmp_path / "straight" / BEST)["state"]
    b.generator.load_state_dict(best["generator_ema"]["weights"])  # expected images: the average's
    labels = balanced_labels(20, 10)
    expected = (generate(b.generator, labels, seed=0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    images = read_synthetic(sample_synthetic(tmp_path / "straight", 20, tmp_path / "s.h5")["path"])[0]
    assert (abs(images.astype(int) - expected.astype(int)) <= 1).all()

    with pytest.raises(InvalidArgumentError, match="weight average does not match ema_decay 0.0"):
        a.load_state_dict(b.state_dict())
