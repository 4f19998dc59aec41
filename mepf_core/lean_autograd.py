"""Lean backward passes for the public side's training step: what autograd need not keep or allocate.

Two pieces, each computing exactly the values of the plain autograd path it replaces:
`FrozenVGGStage` (a frozen VGG stage whose backward keeps only the stage's input) and
`scaled_class_means` (the norm-bounded class means with one gradient buffer per stage). Measured
(bench/README.md, issue 16): a CIFAR-10 step (VGG19, batch 128) saves 415 instead of 609 MiB for
backward, and its peak RSS drops by about 140 MiB, at the same speed.

Why the stages (issue 16, memory of the CIFAR-10 training step): the public side back-propagates through the
frozen VGG19 to the generated images, never into the encoder's weights. Plain autograd does not know
that the weights are fixed for good and saves, per stage, the ReLU's output (for its own backward and
for the conv's, which keeps its input for a weight gradient nobody asks for), the max-pool's input and
its int64 argmax indices (twice the pooled map's bytes). For VGG19 at batch 128 that is 194 MiB of
the 609 MiB a step saved for backward, while the stage's input, the previous conv's pre-ReLU output,
is kept anyway (it is a feature the loss reads). `FrozenVGGStage` runs the same ops, in the same
order, through one `torch.autograd.Function` that saves only that input (and the weight):

- conv backward needs only the gradient wrt its input, `aten.convolution_backward` with output mask
  (input only): the kernel plain autograd calls for a conv whose weight and bias need no gradient.
  It reads the input's shape only, so a zero-stride stand-in replaces the saved ReLU/pool output.
- max-pool backward: the argmax indices are recomputed in backward with the same
  `max_pool2d_with_indices` call, on the input instead of on ReLU(input): where a window's maximum
  is > 0 both give the same position (ties: the first maximum in the window either way), where it is
  <= 0 the ReLU mask zeroes the whole window either way; then `aten.max_pool2d_with_indices_backward`
  as autograd does.
- ReLU backward: autograd's `threshold_backward(grad, ReLU(input), 0)` is grad where ReLU(input) > 0,
  i.e. where input > 0 (NaN kept in both), else exactly 0: done in place, `grad.masked_fill_(input <= 0, 0)`.
- forward pools before the ReLU (max(relu(a)) = relu(max(a)) exactly, ReLU being monotone), so the
  ReLU runs on the 4x smaller map and no full-size ReLU output is allocated.

So the values are plain autograd's: the same forward outputs, and the gradient wrt the stage's input
equal to plain autograd's (bitwise in tests/test_lean_encoder_backward.py; the only possible
difference is the order in which the engine sums a tensor's incoming gradients, i.e. float32
rounding). The recomputation costs one pool per pooled stage in backward (a memory-bound pass over
the stage's input, small next to the conv).

Falls back to the plain modules (same values, autograd's usual saving) whenever the fast path would
not be exact: a weight or bias that requires grad, or a conv other than zero-padded with numeric
padding. Under autocast, the conv runs in the autocast dtype in forward (as plain autograd), and
backward casts the weight to the gradient's dtype, which is what autograd's conv backward receives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["FrozenVGGStage"]


def _pool_args(pool: nn.MaxPool2d) -> tuple:
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return pair(pool.kernel_size), pair(stride), pair(pool.padding), pair(pool.dilation), bool(pool.ceil_mode)


class _ReluPoolConv(torch.autograd.Function):
    """x -> conv(maxpool(relu(x))) (ReLU and pool each optional), gradient wrt x only; saves x (when
    ReLU or pool need it) and the weight, not the intermediate maps."""

    @staticmethod
    def forward(ctx, x, weight, bias, relu: bool, pool: tuple | None, conv: tuple):
        if pool is not None:  # max-pool first, ReLU on the 4x smaller map: the same values exactly
            h = F.max_pool2d(x, *pool[:4], ceil_mode=pool[4])  # (ReLU is monotone: max relu = relu max)
            h = h.relu_() if relu else h
        else:
            h = F.relu(x) if relu else x
        stride, padding, dilation, groups = conv
        out = F.conv2d(h, weight, bias, stride, padding, dilation, groups)
        ctx.relu, ctx.pool, ctx.conv = relu, pool, conv
        ctx.h_shape = h.shape
        ctx.save_for_backward(x if (relu or pool is not None) else None, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        if weight.dtype != grad.dtype:  # autocast: the conv ran in the lower precision
            weight = weight.to(grad.dtype)
        # convolution_backward reads only the input's shape when the weight gradient is not asked for
        shape_only = grad.new_empty(1).expand(ctx.h_shape)
        g = torch.ops.aten.convolution_backward(grad, shape_only, weight, None, stride, padding, dilation, False,
                                                [0, 0], groups, (True, False, False))[0]
        if ctx.relu or ctx.pool is not None:
            g = g.to(x.dtype)  # autocast: autograd casts the gradient back at the conv's input cast
            if ctx.pool is not None:
                # argmax of x, not of ReLU(x): where the window's maximum is > 0 they are the same
                # position (ties: the first maximum either way); where it is <= 0 the ReLU mask
                # below zeroes the whole window either way. So the same gradient, one pass less.
                _, indices = torch.ops.aten.max_pool2d_with_indices(x, *ctx.pool)
                g = torch.ops.aten.max_pool2d_with_indices_backward(g, x, *ctx.pool, indices)
                del indices
            if ctx.relu:  # threshold_backward(g, relu(x), 0), in place on our own buffer
                g = g.masked_fill_(x <= 0, 0)
        return g, None, None, None, None, None


class FrozenVGGStage(nn.Sequential):
    """A VGG stage `[ReLU], [MaxPool2d], Conv2d` with a lean backward (see the module docstring).

    Same children, indices and state-dict keys as the `nn.Sequential` it replaces (so weights files
    load and `weights_sha256` is unchanged); same outputs (N x C_out x H' x W', the conv's dtype).
    Raises ValueError when the layers are not of that form.
    """

    def __init__(self, *layers: nn.Module):
        super().__init__(*layers)
        kinds = [type(m) for m in layers]
        relu = kinds[:1] == [nn.ReLU]
        pool_at = 1 if relu else 0
        pool = kinds[pool_at:pool_at + 1] == [nn.MaxPool2d]
        if kinds != [nn.ReLU] * relu + [nn.MaxPool2d] * pool + [nn.Conv2d]:
            raise ValueError(f"a VGG stage is [ReLU], [MaxPool2d], Conv2d; got {[k.__name__ for k in kinds]}")
        if relu and layers[0].inplace:
            raise ValueError("the stage's ReLU must not be in-place: it would overwrite the previous stage's output")
        self._relu = relu
        self._pool = _pool_args(layers[pool_at]) if pool else None

    def _lean_applies(self, x: torch.Tensor) -> bool:
        conv = self[-1]
        frozen = not conv.weight.requires_grad and (conv.bias is None or not conv.bias.requires_grad)
        return (torch.is_grad_enabled() and x.requires_grad and frozen and conv.padding_mode == "zeros"
                and not isinstance(conv.padding, str) and x.ndim == 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._lean_applies(x):
            return super().forward(x)  # no gradient wanted (extraction), or not exact: plain modules
        conv = self[-1]
        args = (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)
        return _ReluPoolConv.apply(x, conv.weight, conv.bias, self._relu, self._pool, args)


# --- class means of norm-bounded features, with the norm's gradient folded in ----------------------

def _flat(output: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A B x D_l view of a stage output in memory order, and whether that order is channels-last
    (N H W C) rather than C, H, W (see `mepf_core.public_map._stage_means`)."""
    if output.ndim == 4 and not output.is_contiguous() and output.is_contiguous(memory_format=torch.channels_last):
        b, c, h, w = output.shape
        return output.permute(0, 2, 3, 1).reshape(b, h * w * c), True
    return output.reshape(output.shape[0], -1), False


class _ScaledClassMeans(torch.autograd.Function):
    """(weights * scale) @ [flattened outputs] (K x D, stages in C, H, W order), where scale =
    bound / joint norm of the outputs. Backward: the gradient wrt each output, the scale's dependence
    on the outputs included, computed into one buffer per stage (A^T G_l, then + c * output in place)."""

    @staticmethod
    def forward(ctx, weights, scale, norms, *outputs):
        a = weights * scale
        means = []
        for o in outputs:
            flat, nhwc = _flat(o)
            m = a @ flat
            if nhwc:
                b, c, h, w = o.shape
                m = m.view(-1, h, w, c).permute(0, 3, 1, 2).reshape(m.shape[0], c * h * w)
            means.append(m)
        ctx.save_for_backward(weights, scale, norms, *outputs)
        return torch.cat(means, dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weights, scale, norms, *outputs = ctx.saved_tensors
        a = weights * scale
        k = grad.shape[0]
        pieces, grad_a, start = [], torch.zeros_like(a), 0
        for o in outputs:
            flat, nhwc = _flat(o)
            g = grad[:, start:start + flat.shape[1]]
            start += flat.shape[1]
            if nhwc:  # the K rows back into the output's memory order (K x D_l: small)
                b, c, h, w = o.shape
                g = g.reshape(k, c, h, w).permute(0, 2, 3, 1).reshape(k, h * w * c)
            pieces.append(g)
            grad_a.addmm_(g, flat.T)  # dL/dA = sum over stages of G_l Y_l^T (K x B)
        # s = bound / n (0 for n = 0): ds/dn = -s / n; n = ||(Y_1, ..., Y_L)|| per example: dn/dY_l = Y_l / n
        s, n = scale.reshape(-1), norms.reshape(-1)
        grad_s = (grad_a * weights).sum(dim=0)
        tiny = torch.finfo(n.dtype).tiny
        coef = torch.where(n >= tiny, -grad_s * s / n.clamp_min(tiny).square(), torch.zeros_like(n))
        grads = []
        for o, g in zip(outputs, pieces):
            flat, nhwc = _flat(o)
            gy = a.T @ g  # B x D_l, in the output's memory order
            if nhwc:
                b, c, h, w = o.shape
                gy = gy.view(b, h, w, c).permute(0, 3, 1, 2)
            else:
                gy = gy.view(o.shape)
            grads.append(gy.addcmul_(o, coef.view(-1, *[1] * (o.ndim - 1))))
        grad_w = grad_a * scale if ctx.needs_input_grad[0] else None
        return (grad_w, None, None, *grads)


def scaled_class_means(outputs: list[torch.Tensor], weights: torch.Tensor, bound: float,
                       norms: torch.Tensor) -> torch.Tensor:
    """(weights * scale) @ the concatenated flattened outputs (K x D, float32), scale = bound / norms
    (0 for a zero norm), differentiable in the outputs (and weights) with the scale treated as the
    function of the outputs it is: the norm-bounded features' class means.

    outputs: the stage outputs (B x ...), weights: K x B class weights, bound: the norm bound C,
    norms: the B joint L2 norms of the outputs (finite; values only, no graph needed). Equals
    `mepf_core.public_map._scaled_means(outputs, weights * _bound_scale(_joint_norm(outputs), bound))`
    (bitwise) and its autograd gradient to float32 rounding, but backward allocates one B x D_l buffer
    per stage instead of autograd's three (matrix product, norm backward, their sum)."""
    norms = norms.detach().reshape(-1)
    scale = torch.where(norms > 0, bound / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))
    return _ScaledClassMeans.apply(weights, scale[None, :], norms, *outputs)
