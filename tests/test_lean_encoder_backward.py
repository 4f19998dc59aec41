"""The lean VGG stages (mepf_core/lean_autograd.py) give plain autograd's features and input gradients
while saving only each stage's input for backward (issue 16: memory of the CIFAR-10 training step)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mepf_core.encoders import FeatureMap, build_feature_map, weights_sha256
from mepf_core.lean_autograd import FrozenVGGStage
from mepf_core.losses import class_weight_matrix
from mepf_core.public_map import PublicFeatureMap

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_stages(seed: int = 0) -> list[list[nn.Module]]:
    """A VGG-like stack with VGG's stage forms: conv | ReLU, conv | ReLU, pool, conv (3 -> 4 -> 5 -> 6 -> 7)."""
    torch.manual_seed(seed)
    return [[nn.Conv2d(3, 4, 3, padding=1)],
            [nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1)],
            [nn.ReLU(), nn.MaxPool2d(2, 2), nn.Conv2d(5, 6, 3, padding=1)],
            [nn.ReLU(), nn.MaxPool2d(2, 2), nn.Conv2d(6, 7, 3, padding=1)]]


def _lean_and_plain(channels_last: bool) -> tuple[nn.ModuleList, nn.ModuleList]:
    layers = _tiny_stages()
    lean = nn.ModuleList([FrozenVGGStage(*s) for s in layers]).requires_grad_(False)
    plain = nn.ModuleList([nn.Sequential(*s) for s in layers])  # the same modules, plain autograd
    if channels_last:
        lean.to(memory_format=torch.channels_last)
    return lean, plain


def _outputs_and_input_grad(stages: nn.ModuleList, images: torch.Tensor, probe_seed: int = 1):
    x = images.clone().requires_grad_(True)
    outputs, h = [], x
    for stage in stages:
        h = stage(h)
        outputs.append(h)
    g = torch.Generator().manual_seed(probe_seed)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() + o.square().sum() for o in outputs)
    (grad,) = torch.autograd.grad(loss, x)
    return [o.detach() for o in outputs], grad


@pytest.mark.parametrize("channels_last", [False, True])
def test_tiny_vgg_stack_features_and_input_gradients_equal_plain_autograd(channels_last):
    lean, plain = _lean_and_plain(channels_last)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    want, grad_want = _outputs_and_input_grad(plain, images)
    have, grad_have = _outputs_and_input_grad(lean, images)
    for a, b in zip(have, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # forward: the same ops on the same values
    # the same backward kernels on the same operands (only the engine's summation order may differ)
    torch.testing.assert_close(grad_have, grad_want, rtol=1e-5, atol=1e-7)
    assert float(grad_want.norm()) > 0


def test_max_pool_ties_and_relu_zeros_route_gradients_as_autograd_does():
    # quantised input: many equal values in every 2x2 window (ties) and exact zeros at the ReLU;
    # max-pool sends a tied window's gradient to its first maximum, the recomputed indices do the same
    layers = [nn.ReLU(), nn.MaxPool2d(2, 2), nn.Conv2d(2, 3, 3, padding=1)]
    torch.manual_seed(3)
    x0 = torch.randint(-2, 3, (2, 2, 8, 8), generator=torch.Generator().manual_seed(4)).float() / 2
    grads = []
    for stage in (nn.Sequential(*layers), FrozenVGGStage(*layers).requires_grad_(False)):
        x = x0.clone().requires_grad_(True)
        out = stage(x)
        (grad,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), x)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    assert bool((grads[0][x0 <= 0] == 0).all())  # no gradient through a ReLU'd zero or negative


def test_a_stage_saves_only_its_input_and_weight():
    lean, plain = _lean_and_plain(False)
    images = torch.rand(2, 3, 16, 16)

    def saved_bytes(stages):
        weights = {p.data_ptr() for p in stages.parameters()}
        h = stages[0](images.clone().requires_grad_(True))  # the first stage's output: input of the rest
        saved = {}

        def pack(t):
            if t.data_ptr() not in weights:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for stage in stages[1:]:
                h = stage(h)
        return sum(saved.values()), h

    lean_bytes, _ = saved_bytes(lean)
    plain_bytes, _ = saved_bytes(plain)
    # lean: each stage keeps its input (the previous stage's output, a feature kept anyway)
    inputs = 2 * 4 * (4 * 16 * 16 + 5 * 16 * 16 + 6 * 8 * 8)  # batch 2, float32: outputs of stages 0, 1, 2
    assert lean_bytes == inputs
    # plain autograd also keeps every ReLU output, pool output and the int64 pool indices
    assert plain_bytes > lean_bytes


def test_unfrozen_weights_take_plain_autograd_and_get_their_gradients():
    layers = _tiny_stages()[2]
    stage = FrozenVGGStage(*layers)  # weights still require grad: the lean path would drop their gradient
    out = stage(torch.rand(2, 5, 8, 8, requires_grad=True))
    out.sum().backward()
    assert stage[-1].weight.grad is not None and float(stage[-1].weight.grad.abs().sum()) > 0


def test_bf16_autocast_gradients_follow_plain_autocast():
    lean, plain = _lean_and_plain(False)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, grad_want = _outputs_and_input_grad(plain, images)
        have, grad_have = _outputs_and_input_grad(lean, images)
    assert have[-1].dtype == want[-1].dtype == torch.bfloat16 and grad_have.dtype == torch.float32
    for a, b in zip(have, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float((grad_have - grad_want).norm() / grad_want.norm()) < 1e-2  # bf16 rounding


def test_a_stage_of_another_form_is_refused():
    with pytest.raises(ValueError, match="a VGG stage is"):
        FrozenVGGStage(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="in-place"):
        FrozenVGGStage(nn.ReLU(inplace=True), nn.Conv2d(3, 4, 3))


def test_registry_vgg19_class_mean_gradients_equal_plain_autograd_and_the_hash_is_unchanged():
    fm = build_feature_map("vgg19", random_init=True)
    assert all(isinstance(s, FrozenVGGStage) for s in fm.stages)
    plain = FeatureMap(fm.spec, nn.ModuleList([nn.Sequential(*s) for s in fm.stages]), fm.feature_dim)
    assert list(plain.stages.state_dict()) == list(fm.stages.state_dict())  # weights files load as before
    assert weights_sha256(plain.stages) == weights_sha256(fm.stages)  # releases' hashes still match
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    weights = class_weight_matrix(torch.tensor([0, 1]), 2)
    grads, means = [], []
    for m in (plain, fm):  # channels-last, as the Trainer runs it
        pm = PublicFeatureMap(m, norm_bound=1.0, second_moment_bound=1.0, moments=2).to(memory_format=torch.channels_last)
        x = images.clone().requires_grad_(True)
        out = pm.class_means(pm.stage_outputs(x), weights)
        g = torch.Generator().manual_seed(7)
        loss = sum((v * torch.randn(v.shape, generator=g)).sum() for v in out.values())
        grads.append(torch.autograd.grad(loss, x)[0])
        means.append({k: v.detach() for k, v in out.items()})
    for k in means[0]:
        torch.testing.assert_close(means[1][k], means[0][k], rtol=0, atol=0)
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-6
    with torch.no_grad():  # extraction (no gradient) runs the plain modules: the same features
        torch.testing.assert_close(fm(images), plain(images), rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_scaled_class_means_equal_the_autograd_path(channels_last):
    from mepf_core.lean_autograd import scaled_class_means
    from mepf_core.public_map import _bound_scale, _joint_norm, _scaled_means

    g = torch.Generator().manual_seed(8)
    stages = [torch.randn(6, 4, 5, 5, generator=g), torch.randn(6, 8, 3, 3, generator=g), torch.randn(6, 7, generator=g)]
    for s in stages:
        s[0] = 0.0  # an all-zero example: scale 0, its gradient exactly 0
    if channels_last:
        stages = [s.contiguous(memory_format=torch.channels_last) if s.ndim == 4 else s for s in stages]
    weights0 = class_weight_matrix(torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    probe = torch.randn(3, 4 * 25 + 8 * 9 + 7, generator=g)
    results = []
    for lean in (False, True):
        outs = [s.detach().clone(memory_format=torch.preserve_format).requires_grad_(True) for s in stages]
        weights = weights0.clone().requires_grad_(True)
        if lean:
            with torch.no_grad():
                norms = _joint_norm(outs)
            means = scaled_class_means(outs, weights, 2.0, norms)
        else:
            means = _scaled_means(outs, weights * _bound_scale(_joint_norm(outs), 2.0))
        (means * probe).sum().backward()
        results.append((means.detach(), [o.grad for o in outs], weights.grad))
    (m_ref, g_ref, w_ref), (m_lean, g_lean, w_lean) = results
    torch.testing.assert_close(m_lean, m_ref, rtol=0, atol=0)  # the same forward
    for a, b in zip(g_lean, g_ref):
        assert float((a - b).norm() / b.norm()) < 1e-6  # float32 rounding (another summation order)
        assert bool((a[0] == 0).all())
    torch.testing.assert_close(w_lean, w_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("channels_last", [False, True])
def test_feature_gradients_handed_to_the_stages_equal_returning_them(channels_last, monkeypatch):
    """scaled_class_means hands each stage output's gradient to the lean stage that consumed it
    (one stage's B x D_l gradient at a time): the input gradient is the one returned all at once."""
    from mepf_core import lean_autograd
    from mepf_core.public_map import _joint_norm

    lean, _ = _lean_and_plain(channels_last)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    weights = class_weight_matrix(torch.tensor([0, 1, 1, 0]), 2)
    probe = None
    grads, consumers = [], []
    for hand_over in (True, False):
        if not hand_over:  # every gradient returned by the class means, summed by autograd
            monkeypatch.setattr(lean_autograd, "_consumers", lambda outs: [None] * len(outs))
        x = images.clone().requires_grad_(True)
        outputs, h = [], x
        for stage in lean:
            h = stage(h)
            outputs.append(h)
        consumers.append(lean_autograd._consumers(tuple(outputs)))
        with torch.no_grad():
            norms = _joint_norm(outputs)
        means = lean_autograd.scaled_class_means(outputs, weights, 3.0, norms)
        if probe is None:
            probe = torch.randn(means.shape, generator=torch.Generator().manual_seed(10))
        grads.append(torch.autograd.grad((means * probe).sum(), x)[0])
    # stage 2, 3, 4 (ReLU first) consume outputs 1, 2, 3; the last output has no consumer
    assert [c is not None for c in consumers[0]] == [True, True, True, False]
    assert float(grads[1].norm()) > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)  # g + gy in either order: the same bits
