"""TrainConfig.precision: bf16 autocast trains with a finite loss while the norm bound, the class
means and the released targets stay float32; "auto" picks bf16 only where the hardware runs it
natively AND a quality A/B exists for the encoder, so a CPU without native bf16 and the
Fashion-MNIST configuration (EfficientNet-Lite0, measured 0.65x with bf16) resolve to fp32."""

from __future__ import annotations

import pytest
import torch

from mepf_core import precision
from mepf_core.encoders import EncoderSpec, FeatureMap
from mepf_core.errors import InvalidArgumentError
from mepf_core.losses import class_weight_matrix
from mepf_core.public_map import PublicFeatureMap
from mepf_core.training import TrainConfig, Trainer, balanced_labels
from tests.helpers import lite0

CPU = torch.device("cpu")


def tiny_map() -> FeatureMap:
    """A two-conv encoder on 16x16 images: bf16 is emulated (slow) on CPUs without native support,
    so the training test keeps the arithmetic small."""
    torch.manual_seed(0)
    stages = torch.nn.ModuleList([torch.nn.Conv2d(3, 4, 3, stride=2, padding=1),
                                  torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1))])
    spec = EncoderSpec(name="tiny", layers=("c1", "c2"), image_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return FeatureMap(spec, stages.requires_grad_(False).eval(), feature_dim=2 * 4 * 8 * 8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_auto_is_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "BF16_QUALITY_CHECKED", frozenset({"vgg19", "efficientnet-lite0"}))
    for encoder in ("vgg19", "efficientnet-lite0"):
        assert precision.resolve_precision("auto", CPU, encoder) is None


def test_auto_is_fp32_for_the_fashion_mnist_configuration_even_with_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "BF16_QUALITY_CHECKED", frozenset({"vgg19", "efficientnet-lite0"}))
    assert precision.resolve_precision("auto", CPU, "efficientnet-lite0") is None  # measured 0.65x: slower
    assert precision.resolve_precision("auto", CPU, "vgg19") is torch.bfloat16  # fast and quality-checked


def test_auto_needs_a_quality_check_and_bf16_is_an_explicit_opt_in(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.BF16_QUALITY_CHECKED == frozenset()  # no A/B recorded yet: auto is fp32 everywhere
    assert precision.resolve_precision("auto", CPU, "vgg19") is None
    assert precision.resolve_precision("bf16", CPU, "vgg19") is torch.bfloat16
    assert precision.resolve_precision("fp32", CPU, "vgg19") is None
    with pytest.raises(InvalidArgumentError, match="precision must be one of"):
        precision.resolve_precision("fp16", CPU, "vgg19")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    detect = precision.cpu_has_native_bf16.__wrapped__  # the uncached function, given a file
    with_bf16, without, unreadable = tmp_path / "a", tmp_path / "b", tmp_path / "missing"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert detect(with_bf16) is True
    assert detect(without) is False
    assert detect(unreadable) is False


def test_config_validates_precision_and_reads_old_checkpoints():
    assert TrainConfig(steps=1).precision == "auto"
    with pytest.raises(InvalidArgumentError, match=r"precision must be one of \('auto', 'fp32', 'bf16'\), got 'half'"):
        TrainConfig(steps=1, precision="half")
    # configs saved before the field existed carried mixed_precision (bf16 on cuda only)
    assert TrainConfig.from_dict({"steps": 5, "mixed_precision": True}).precision == "auto"
    assert TrainConfig.from_dict({"steps": 5, "mixed_precision": False}).precision == "fp32"


def test_bf16_training_runs_with_a_finite_loss_and_float32_targets():
    torch.manual_seed(0)
    public = PublicFeatureMap(tiny_map(), norm_bound=1.0, second_moment_bound=1.0, moments=2, fused=False)
    images = torch.rand(20, 1, 28, 28)
    with torch.no_grad():
        weights = class_weight_matrix(balanced_labels(20, 10), 10)
        targets = {k: weights @ v for k, v in public(images).items()}
    config = TrainConfig(steps=3, batch_size=10, device="cpu", precision="bf16", eval_samples=10)
    trainer = Trainer(config, public, targets, image_shape=(1, 28, 28), labelled=True)
    assert trainer.amp_dtype is torch.bfloat16
    seen = {}
    original = trainer.feature_map.class_means

    def spy(outputs, w):
        seen["stages"] = {o.dtype for o in outputs}
        means = original(outputs, w)
        seen["means"] = {m.dtype for m in means.values()}
        return means

    trainer.feature_map.class_means = spy
    distances = [float(trainer.train_step()) for _ in range(2)]
    assert seen["stages"] == {torch.bfloat16}  # the encoder's forward ran in bf16 ...
    assert seen["means"] == {torch.float32}  # ... the norm bound and class means in float32
    assert all(t.dtype == torch.float32 for t in trainer.loss.targets.values())
    assert all(p.dtype == torch.float32 for p in trainer.generator.parameters())
    assert all(torch.isfinite(torch.tensor(d)) and d > 0 for d in distances)
    assert torch.isfinite(torch.tensor(trainer.criterion()))


def test_fp32_trainer_does_not_autocast(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # even with native bf16 (Lite0)
    public = PublicFeatureMap(lite0(), norm_bound=1.0, second_moment_bound=None, moments=1)
    targets = {"moment1": torch.zeros(10, public.feature_map.feature_dim)}
    trainer = Trainer(TrainConfig(steps=1, batch_size=10, device="cpu"), public, targets, image_shape=(1, 28, 28),
                      labelled=True)
    assert trainer.amp_dtype is None
