"""Public stage: the loss falls, resume continues the same trajectory bit-for-bit, the private
dataset is never opened, sampling is balanced and in range, and bad input fails early and cleanly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from mepf_core.embedding import sums_to_noisy_parts
from mepf_core.losses import MatchingLoss, class_weight_matrix, squared_distance
from mepf_core.privacy.mechanism import design_mechanism
from mepf_core.privacy.sensitivity import Neighbouring
from mepf_core.public_map import EncoderMismatchError, build_public_map
from mepf_core.training import TrainConfig, Trainer
from storage.checkpoints import BEST, LATEST, CheckpointError, load_checkpoint
from storage.release import PartRecord, ReleaseMetadata, embedding_to_release, read_release
from tests.helpers import fmnist_subset, lite0, sums_of

N_IMAGES = 300  # 30 per class: enough signal at epsilon 1000 for a test, cheap to extract
FAST = dict(batch_size=10, checkpoint_every=4, eval_samples=20, progress=False)


def _make_release(path, *, encoder=None, moments=2, epsilon=1000.0):
    images, labels = fmnist_subset(N_IMAGES)
    from storage.datasets import FASHION_CLASSES

    mech = design_mechanism(target_epsilon=epsilon, target_delta=1e-5, relation=Neighbouring.ADD_REMOVE,
                            labelled=True, moments=moments, norm_bound=1.0, second_moment_bound=1.0)
    noisy = sums_to_noisy_parts(sums_of(images, labels, num_classes=10, moments=moments, batch_size=100), mech)
    meta = ReleaseMetadata(
        dataset_id="fashion-mnist:train[:300]", neighbouring=mech.relation.value, epsilon=mech.epsilon,
        delta=mech.target_delta, target_epsilon=epsilon, norm_bound=1.0,
        second_moment_bound=1.0 if moments == 2 else None, moments=moments, labelled=True,
        class_names=FASHION_CLASSES, image_shape=(1, 28, 28), encoder=encoder or lite0().spec,
        parts=tuple(PartRecord.of(p, noisy[p.name].shape) for p in mech.parts),
    )
    return embedding_to_release(path, meta, noisy)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return read_release(_make_release(tmp_path_factory.mktemp("release") / "tiny.h5"))


@pytest.fixture
def no_private_data(monkeypatch, tmp_path):
    """The private dataset is gone: any attempt to open it fails loudly."""
    import storage.datasets as datasets

    def refuse(*args, **kwargs):
        raise AssertionError(f"the public stage tried to open a dataset: {args} {kwargs}")

    monkeypatch.setattr(datasets, "open_dataset", refuse)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "moved-away")
    monkeypatch.setenv("MEPF_DATA_DIR", str(tmp_path / "moved-away"))


def _trainer(release, **overrides) -> Trainer:
    m = release.metadata
    fm = build_public_map(m.encoder, norm_bound=m.norm_bound, second_moment_bound=m.second_moment_bound, moments=m.moments)
    config = TrainConfig(**{"steps": 40, "batch_size": 20, "device": "cpu", "eval_samples": 20, **overrides})
    return Trainer(config, fm, release.mean_embeddings(), image_shape=m.image_shape, labelled=m.labelled)


# --- the loss ------------------------------------------------------------------------------------

def test_class_means_weigh_classes_equally():
    labels = torch.tensor([0, 0, 0, 1])
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    means = class_weight_matrix(labels, 2) @ features
    assert torch.allclose(means, torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
    with pytest.raises(ValueError, match=r"classes \[2\] have none"):
        class_weight_matrix(labels, 3)


def test_mmd_loss_is_the_squared_distance():
    targets = {"moment1": torch.tensor([[1.0, 2.0]]), "moment2": torch.tensor([[0.0, 1.0]])}
    means = {"moment1": torch.tensor([[0.0, 0.0]], requires_grad=True), "moment2": torch.tensor([[1.0, 1.0]])}
    loss, distance = MatchingLoss(targets, mode="mmd")(means)
    assert float(loss.detach()) == pytest.approx(1 + 4 + 1) and float(distance) == pytest.approx(6.0)
    loss.backward()
    assert torch.allclose(means["moment1"].grad, torch.tensor([[-2.0, -4.0]]))


def test_mavg_gradient_tracks_the_gap():
    """With a fixed generated mean, v converges to target - gen, so the generator gradient is -(target - gen)."""
    target = {"moment1": torch.tensor([[0.3, -0.2, 0.05]])}
    loss_fn = MatchingLoss(target, mode="mavg", lr_mavg=1e-2)
    gen = torch.tensor([[0.1, 0.1, 0.1]], requires_grad=True)
    for _ in range(1500):
        loss, distance = loss_fn({"moment1": gen})
    gen.grad = None
    loss.backward()
    assert torch.allclose(gen.grad, -(target["moment1"] - gen.detach()), atol=1e-3)
    assert float(distance) == pytest.approx(float(((target["moment1"] - gen.detach()) ** 2).sum()))


@pytest.mark.parametrize("loss", ["mavg", "mmd"])
def test_loss_falls(release, loss):
    trainer = _trainer(release, steps=60, lr_gen=3e-3, loss=loss, checkpoint_every=30)
    trainer.train(progress=False)
    first, last = np.mean(trainer.history[:5]), np.mean(trainer.history[-5:])
    assert len(trainer.history) == 60 and [s for s, _ in trainer.criteria] == [30, 60]
    assert last < 0.7 * first, (first, last)  # about 0.5 in practice
    assert trainer.best_criterion == min(v for _, v in trainer.criteria)


# --- resume --------------------------------------------------------------------------------------

def _assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["history"] == b["history"] and a["criteria"] == b["criteria"]
    for name, tensor in a["generator"].items():
        assert torch.equal(tensor, b["generator"][name]), name
    assert torch.equal(a["rng"], b["rng"])
    assert all(torch.equal(a["loss"]["gaps"][k], b["loss"]["gaps"][k]) for k in a["loss"]["gaps"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][key]["exp_avg_sq"])


def test_resume_extends_a_run_on_the_same_trajectory(release, tmp_path):
    """2N steps straight == N steps, then resumed to 2N (constant learning rate: a cosine schedule
    is defined by its length, so lengthening a cosine run changes what remains by design)."""
    from tasks.public import train_generator

    config = TrainConfig(steps=8, batch_size=10, checkpoint_every=4, eval_samples=20, device="cpu", seed=3,
                         lr_schedule="constant")
    train_generator(release, tmp_path / "straight", config, progress=False)
    train_generator(release, tmp_path / "resumed", replace(config, steps=4), progress=False)
    summary = train_generator(release, tmp_path / "resumed", config, resume=True, progress=False)
    assert summary["steps_done"] == 8 and summary["steps_trained"] == 4
    a = load_checkpoint(tmp_path / "straight" / LATEST)["state"]
    b = load_checkpoint(tmp_path / "resumed" / LATEST)["state"]
    assert a["step"] == 8
    _assert_same_state(a, b)


def test_interrupted_run_resumes_on_the_same_trajectory(release, tmp_path):
    """Default (cosine) schedule: a run stopped after a checkpoint and resumed from the file ends
    bit-identical to one that was never stopped."""
    from storage.checkpoints import save_checkpoint

    straight = _trainer(release, steps=8, batch_size=10, checkpoint_every=4, seed=5)
    straight.train(progress=False)
    first = _trainer(release, steps=8, batch_size=10, checkpoint_every=4, seed=5)
    first.train(until=4, progress=False)
    save_checkpoint(tmp_path / LATEST, state=first.state_dict(), config=first.config.to_dict(), release={})
    resumed = _trainer(release, steps=8, batch_size=10, checkpoint_every=4, seed=5)
    resumed.load_state_dict(load_checkpoint(tmp_path / LATEST)["state"])
    resumed.train(progress=False)
    assert straight.config.lr_schedule == "cosine" and straight.step == 8
    _assert_same_state(straight.state_dict(), resumed.state_dict())


def test_resume_refuses_a_changed_trajectory(release, tmp_path):
    from tasks.public import train_generator

    config = TrainConfig(steps=2, batch_size=10, checkpoint_every=2, eval_samples=10, device="cpu")
    train_generator(release, tmp_path, config, progress=False)
    with pytest.raises(FileExistsError, match="already holds a training run"):
        train_generator(release, tmp_path, config, progress=False)
    with pytest.raises(ValueError, match=r"lr_gen: checkpoint has 0.002, requested 0.01"):
        train_generator(release, tmp_path, replace(config, steps=4, lr_gen=1e-2), resume=True,
                        explicit={"lr_gen"}, progress=False)


# --- the public stage never opens private data; sampling ------------------------------------------

def test_train_and_sample_without_private_data(release, tmp_path, no_private_data):
    from storage.synthetic import read_synthetic
    from tasks.public import sample_synthetic, train_generator

    config = TrainConfig(steps=6, batch_size=10, checkpoint_every=3, eval_samples=20, device="cpu")
    summary = train_generator(release, tmp_path / "run", config, progress=False)
    assert summary["steps_done"] == 6 and summary["chosen_checkpoint"].endswith(BEST)
    assert summary["steps_per_second"] > 0 and summary["images_per_second"] == pytest.approx(10 * summary["steps_per_second"])
    for name in (LATEST, BEST, "run.json", "loss.png", "samples.png"):
        assert (tmp_path / "run" / name).is_file(), name

    result = sample_synthetic(tmp_path / "run", 35, tmp_path / "synthetic.h5")
    images, labels, meta = read_synthetic(result["path"])
    assert images.shape == (35, 1, 28, 28) and images.dtype == np.uint8
    assert images.std() > 0
    counts = np.bincount(labels, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 35
    m = release.metadata
    assert meta["epsilon"] == m.epsilon and meta["delta"] == m.delta and meta["release_id"] == m.release_id
    assert meta["encoder"] == "efficientnet-lite0" and meta["class_names"] == list(m.class_names)
    assert meta["dataset_id"] == m.dataset_id and meta["steps"] == load_checkpoint(tmp_path / "run" / BEST)["state"]["step"]


def test_sampling_is_reproducible_and_needs_a_checkpoint(release, tmp_path):
    from storage.synthetic import read_synthetic
    from tasks.public import sample_synthetic, train_generator

    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        sample_synthetic(tmp_path, 10, tmp_path / "s.h5")
    with pytest.raises(ValueError, match="n must be an integer > 0, got 0"):
        sample_synthetic(tmp_path, 0, tmp_path / "s.h5")
    train_generator(release, tmp_path / "run", TrainConfig(steps=2, batch_size=10, checkpoint_every=2, eval_samples=10,
                                                          device="cpu"), progress=False)
    a = read_synthetic(sample_synthetic(tmp_path / "run", 20, tmp_path / "a.parquet")["path"])[0]
    b = read_synthetic(sample_synthetic(tmp_path / "run", 20, tmp_path / "b.h5")["path"])[0]
    assert np.array_equal(a, b)


def test_checkpoints_carry_typed_release_provenance(release, tmp_path):
    """Issue 12: one ReleaseInfo from the release into every checkpoint (same keys as before), read
    back typed; a checkpoint whose release record lacks a field is a named error, not a default."""
    from storage.checkpoints import load_training_checkpoint, save_checkpoint
    from storage.provenance import ReleaseInfo
    from tasks.public import train_generator

    train_generator(release, tmp_path / "run", TrainConfig(steps=2, batch_size=10, checkpoint_every=2, eval_samples=10,
                                                          device="cpu"), progress=False)
    info = ReleaseInfo.from_release(release)
    checkpoint = load_training_checkpoint(tmp_path / "run" / BEST)
    assert checkpoint.release == info and checkpoint.step == 2
    assert info.neighbouring == "add-remove" and info.signed_by is None and info.num_classes == 10
    raw = load_checkpoint(tmp_path / "run" / BEST)["release"]
    assert {"path", "release_id", "dataset_id", "epsilon", "delta", "labelled", "class_names", "num_classes",
            "image_shape", "moments", "norm_bound", "second_moment_bound", "encoder"} <= set(raw)
    old = {k: v for k, v in raw.items() if k != "neighbouring"}  # written before the relation was recorded
    save_checkpoint(tmp_path / "old.pt", state=checkpoint.state, config=checkpoint.config, release=old)
    assert load_training_checkpoint(tmp_path / "old.pt").release.neighbouring is None
    save_checkpoint(tmp_path / "bad.pt", state=checkpoint.state, config=checkpoint.config,
                    release={k: v for k, v in raw.items() if k != "labelled"})
    with pytest.raises(CheckpointError, match=r"bad.pt: release lacks \['labelled'\]"):
        load_training_checkpoint(tmp_path / "bad.pt")


# --- bad input ------------------------------------------------------------------------------------

def test_encoder_hash_mismatch_is_refused(tmp_path):
    spec = replace(lite0().spec, weights_sha256="0" * 64)
    release = read_release(_make_release(tmp_path / "other.h5", encoder=spec, moments=1))
    m = release.metadata
    with pytest.raises(EncoderMismatchError, match="weights_sha256: expected '0{64}', got '[0-9a-f]{64}'") as err:
        build_public_map(m.encoder, norm_bound=1.0, second_moment_bound=None, moments=1)
    assert "efficientnet-lite0" in str(err.value) and "image size 32" in str(err.value)

    from tasks.public import train_generator

    with pytest.raises(EncoderMismatchError):
        train_generator(release, tmp_path / "run", TrainConfig(steps=2, batch_size=10), progress=False)
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_a_release_whose_dimension_is_not_its_encoders_is_refused(tmp_path):
    """The spec matches bit-for-bit, but the file's D does not: the embedding was not made by that encoder."""
    from tasks.public import train_generator

    honest = read_release(_make_release(tmp_path / "r.h5", moments=1))
    wide = {name: (np.concatenate([v, np.zeros_like(v)], axis=1) if v.ndim == 2 else v) for name, v in honest.noisy.items()}
    meta = replace(honest.metadata, parts=tuple(replace(p, shape=wide[p.name].shape, sha256="")
                                                 for p in honest.metadata.parts))
    forged = read_release(embedding_to_release(tmp_path / "wide.h5", meta, wide))
    with pytest.raises(EncoderMismatchError, match="D = 33920, but its encoder 'efficientnet-lite0' produces D = 16960"):
        train_generator(forged, tmp_path / "run", TrainConfig(steps=2, batch_size=10), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("steps", 0, "steps must be an integer > 0, got 0"),
    ("steps", -5, "steps must be an integer > 0, got -5"),
    ("batch_size", 0, "batch_size must be an integer > 0, got 0"),
    ("lr_gen", 0.0, "lr_gen must be a finite number > 0, got 0.0"),
    ("loss", "l2", "loss must be one of"),
    ("device", "tpu", "device must be one of"),
])
def test_bad_config_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"steps": 10, field: value})


def test_batch_smaller_than_class_count_rejected(release):
    with pytest.raises(ValueError, match=r"batch_size must be >= the number of released rows \(10.*got 5"):
        _trainer(release, batch_size=5)


def test_unwritable_output_fails_before_training(release, tmp_path):
    from tasks.public import train_generator

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        train_generator(release, blocker / "run", TrainConfig(steps=2, batch_size=10), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_damaged_checkpoint_is_a_named_error(release, tmp_path):
    from tasks.public import train_generator

    train_generator(release, tmp_path, TrainConfig(steps=2, batch_size=10, checkpoint_every=2, eval_samples=10,
                                                   device="cpu"), progress=False)
    data = (tmp_path / LATEST).read_bytes()
    (tmp_path / LATEST).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / LATEST)


# --- the Prefect flows ----------------------------------------------------------------------------

def test_train_generator_and_sample_flows(release, tmp_path, no_private_data):
    from pydantic import ValidationError

    from flows.train_generator import sample, train_generator
    from storage.params import SampleParams, TrainParams

    with pytest.raises(ValidationError, match="steps must be > 0, got 0"):
        TrainParams(release=str(release.path), out=str(tmp_path / "run"), steps=0)
    with pytest.raises(ValidationError, match="release file .* does not exist"):
        TrainParams(release=str(tmp_path / "missing.h5"), out=str(tmp_path / "run"), steps=1)

    params = TrainParams(release=str(release.path), out=str(tmp_path / "run"), steps=3, batch_size=10,
                         checkpoint_every=3, eval_samples=10, device="cpu", progress=False)
    result = train_generator(params)
    assert {"run_dir", "steps_done", "final_loss", "chosen_checkpoint", "steps_per_second", "images_per_second"} <= set(result)
    assert result["steps_done"] == 3 and result["chosen_checkpoint"].endswith(BEST)
    out = sample(SampleParams(run=str(tmp_path / "run"), n=12))
    assert out["n"] == 12 and out["path"].endswith("synthetic.h5")


# --- the fused (batch-norm-folded) encoder computes the same map ----------------------------------

def test_fused_encoder_matches_the_original_map():
    from mepf_core.fused_encoder import fuse_feature_map

    fm = lite0()
    fused = fuse_feature_map(fm)
    assert fused is not None and fused.spec == fm.spec
    images = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    want = fm(images)
    (grad_want,) = torch.autograd.grad(want.square().sum(), images)
    have = fused(images)
    (grad_have,) = torch.autograd.grad(have.square().sum(), images)
    assert have.shape == want.shape == (6, fm.feature_dim)
    assert float((have - want).detach().norm() / want.detach().norm()) < 1e-5
    assert float((grad_have - grad_want).norm() / grad_want.norm()) < 1e-4
    assert all(not p.requires_grad for p in fused.parameters())


def test_unknown_encoder_structure_is_not_fused():
    from mepf_core.encoders import build_feature_map
    from mepf_core.fused_encoder import fuse_feature_map

    assert fuse_feature_map(build_feature_map("vgg19", random_init=True)) is None
