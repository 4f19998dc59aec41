"""Generators: shapes, output range, code layout, reproducible codes, a clear error for odd shapes."""

import pytest
import torch

from mepf_core.generators import CODE_DIM, Conv28Generator, ResNetGenerator, build_generator


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize(
    ("shape", "cls"), [((1, 28, 28), Conv28Generator), ((3, 32, 32), ResNetGenerator), ((3, 64, 64), ResNetGenerator),
                       # the other channel count at each size (issue 13: --channels with --image-size)
                       ((3, 28, 28), Conv28Generator), ((1, 32, 32), ResNetGenerator), ((1, 64, 64), ResNetGenerator)]
)
@pytest.mark.parametrize("labelled", [True, False])
def test_shapes_and_range(shape, cls, labelled):
    torch.manual_seed(0)
    gen = build_generator(shape, 10 if labelled else 1, labelled)
    assert isinstance(gen, cls)
    labels = torch.arange(6) % gen.num_classes
    with torch.no_grad():  # training mode: batch statistics
        images = gen.generate(labels, torch.Generator().manual_seed(0))
    assert images.shape == (6, *shape)
    assert images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    gen.eval()  # running statistics instead of batch statistics: still in range
    with torch.no_grad():
        images = gen.generate(labels[:1], torch.Generator().manual_seed(1))
    assert images.shape == (1, *shape) and 0.0 <= float(images.min()) <= float(images.max()) <= 1.0


def test_code_layout_labelled_and_unlabelled():
    labelled = build_generator((1, 28, 28), 10, True)
    assert (labelled.code_dim, labelled.noise_dim) == (CODE_DIM, CODE_DIM - 10)
    codes = labelled.sample_codes(torch.tensor([3, 0, 9]), torch.Generator().manual_seed(0))
    assert codes.shape == (3, CODE_DIM)
    assert torch.equal(codes[:, :10].argmax(dim=1), torch.tensor([3, 0, 9]))
    assert torch.equal(codes[:, :10].sum(dim=1), torch.ones(3))
    unlabelled = build_generator((1, 28, 28), 1, False)
    assert unlabelled.sample_codes(torch.zeros(4, dtype=torch.long)).shape == (4, CODE_DIM)


def test_codes_reproducible_from_seed():
    gen = build_generator((1, 28, 28), 10, True)
    labels = torch.arange(20) % 10
    a = gen.sample_codes(labels, torch.Generator().manual_seed(5))
    b = gen.sample_codes(labels, torch.Generator().manual_seed(5))
    c = gen.sample_codes(labels, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_labels_out_of_range_rejected():
    gen = build_generator((1, 28, 28), 10, True)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\), got range \[0, 10\]"):
        gen.sample_codes(torch.tensor([0, 10]))


def test_gradients_reach_every_parameter():
    gen = build_generator((1, 28, 28), 10, True)
    gen.generate(torch.arange(10), torch.Generator().manual_seed(0)).mean().backward()
    missing = [name for name, p in gen.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


@pytest.mark.parametrize("shape", [(3, 48, 48), (2, 64, 64), (1, 32, 64), (4, 32, 32)])
def test_unsupported_shape_names_it(shape):
    with pytest.raises(ValueError, match=f"no generator for image shape {tuple(shape)}".replace("(", r"\(").replace(")", r"\)")):
        build_generator(shape, 10, True)


def test_many_classes_keep_some_noise():
    gen = build_generator((1, 28, 28), 120, True)
    assert gen.noise_dim >= 16 and gen.code_dim == 120 + gen.noise_dim
    assert gen.generate(torch.arange(4), torch.Generator().manual_seed(0)).shape == (4, 1, 28, 28)


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_upsampling_block_equals_the_papers_block(channels_last):
    """upsample + conv3 as one transposed conv, skip before upsampling: same outputs and gradients."""
    from mepf_core.generators import _UpBlock

    torch.manual_seed(0)
    block = _UpBlock(16, 8).train()
    x = torch.randn(4, 16, 5, 6)
    if channels_last:
        block.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    outputs, grads = [], []
    for forward in (block.forward, block.reference_forward):
        block.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = forward(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outputs.append(y.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in block.parameters()])
    assert outputs[0].shape == (4, 8, 10, 12)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
