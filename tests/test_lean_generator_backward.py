"""The ResNet generator's lean BN-ReLU-conv backward (`mepf_core.lean_autograd.bn_relu_conv`, issue 16):
the same outputs, gradients and running statistics as the plain modules, with less saved for backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mepf_core.generators import ResNetGenerator, upsample_conv3x3
from mepf_core.lean_autograd import bn_relu_conv


def plain_forward(gen: ResNetGenerator, codes: torch.Tensor) -> torch.Tensor:
    """ResNetGenerator.forward as plain autograd composes it (the code before the lean backward)."""
    x = gen.project(codes[:, :, None, None]).contiguous(memory_format=torch.channels_last)
    for block in gen.blocks:
        h = upsample_conv3x3(F.relu(block.bn1(x)), block.conv1.weight)
        h = block.conv2(F.relu(block.bn2(h)))
        x = h + F.interpolate(block.skip(x), scale_factor=2, mode="nearest")
    return (torch.tanh(gen.out(x)) + 1.0) * 0.5


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn runs (parameters excluded)."""
    storages = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def run(gen, forward, codes, upstream):
    codes = codes.clone().requires_grad_(True)
    out, nbytes = saved_bytes(lambda: forward(gen, codes))
    out.backward(upstream)
    return out.detach(), codes.grad, {k: p.grad for k, p in gen.named_parameters()}, gen.state_dict(), nbytes


def test_generator_matches_plain_autograd_with_half_the_saved_bytes():
    torch.manual_seed(0)
    lean_gen = ResNetGenerator(32, num_classes=10, labelled=True, ngf=8)
    plain_gen = copy.deepcopy(lean_gen)
    codes = lean_gen.sample_codes(torch.arange(6) % 10, torch.Generator().manual_seed(1))
    upstream = torch.randn(6, 3, 32, 32)
    for _ in range(2):  # the second step runs on running statistics and counters the first updated
        lean = run(lean_gen, ResNetGenerator.forward, codes, upstream)
        plain = run(plain_gen, plain_forward, codes, upstream)
        torch.testing.assert_close(lean[0], plain[0], rtol=0, atol=0)
        torch.testing.assert_close(lean[1], plain[1], rtol=1e-6, atol=1e-7)
        assert lean[2].keys() == plain[2].keys()
        for name in lean[2]:
            torch.testing.assert_close(lean[2][name], plain[2][name], rtol=1e-6, atol=1e-7, msg=name)
        for name, value in plain[3].items():  # running means, variances and batch counters
            torch.testing.assert_close(lean[3][name], value, rtol=0, atol=0, msg=name)
        lean_gen.zero_grad(set_to_none=True)
        plain_gen.zero_grad(set_to_none=True)
    # plain keeps each BN input and each ReLU output; lean only the BN inputs (and tiny statistics)
    assert lean[4] < 0.6 * plain[4], (lean[4], plain[4])


@pytest.mark.parametrize("transposed", [False, True])
def test_bn_relu_conv_cumulative_momentum_and_bias(transposed):
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(4, momentum=None)
    with torch.no_grad():
        bn.weight.uniform_(-1, 1)
        bn.bias.uniform_(-0.5, 0.5)
    weight = torch.randn(*((4, 5) if transposed else (5, 4)), 3, 3, requires_grad=True)  # C_out = 5
    bias = torch.randn(5, requires_grad=True)
    bn_plain = copy.deepcopy(bn)
    x = torch.randn(3, 4, 5, 5)
    x[0, 0, 0, 0] = float("nan")  # NaN propagates the same way through both
    results = []
    for module, lean in ((bn, True), (bn_plain, False)):
        xi = x.clone().requires_grad_(True)
        for p in (weight, bias, *module.parameters()):
            p.grad = None
        if lean:
            out = bn_relu_conv(xi, module, weight, bias, stride=2 if transposed else 1, padding=1,
                               transposed=transposed)
        else:
            h = F.relu(module(xi))
            conv = F.conv_transpose2d if transposed else F.conv2d
            out = conv(h, weight, bias, stride=2 if transposed else 1, padding=1)
        out.nan_to_num().sum().backward()
        results.append((out.detach(), xi.grad, weight.grad.clone(), bias.grad.clone(), module.weight.grad,
                        module.bias.grad, module.running_mean.clone(), module.running_var.clone(),
                        module.num_batches_tracked.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)
