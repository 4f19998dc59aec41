"""Lean backward passes for the public side's training step: what autograd need not keep or allocate.

Three pieces, each computing exactly the values of the plain autograd path it replaces:
`FrozenVGGStage` (a frozen VGG stage whose backward keeps only the stage's input),
`scaled_class_means` (the norm-bounded class means with one gradient buffer per stage, handed to
the lean stage that consumed that feature so that one stage's gradient exists at a time) and
`bn_relu_conv` (the generator's batch norm + ReLU + conv, the ReLU output recomputed in backward).
Measured (bench/README.md, issue 16): a CIFAR-10 step (VGG19, batch 128) saves 415 instead of 609
MiB for backward with the first two; the figures for all three are in bench/README.md.

Limitation of the hand-over: a hook on a stage output, or `torch.autograd.grad` wrt a stage output
itself, sees only the gradient through the later stages, not the class means' part (that is added
inside the next stage's backward). Gradients wrt anything upstream (images, generator) are exact.

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
  i.e. where input > 0 (NaN kept in both), else exactly 0: `threshold_backward(grad, input, 0)`, written
  in place into grad (its out= form: one pass, no new buffer; ~5x faster than a mask and masked_fill_).
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
        keeps_input = relu or pool is not None
        ctx.save_for_backward(x if keeps_input else None, weight)
        # what `scaled_class_means` matches a feature against to hand this backward its gradient
        ctx.input_key = _tensor_key(x) if keeps_input else None
        ctx.feature_grads = []  # filled by _ScaledClassMeans.backward, which runs before this one
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
            if ctx.relu:  # threshold_backward(g, relu(x), 0) = threshold_backward(g, x, 0), in place on our buffer
                g = torch.ops.aten.threshold_backward.grad_input(g, x, 0, grad_input=g)
            # the input is a feature the class means read: add that gradient here, one stage at a time
            # (g + gy is what autograd's input buffer would have summed: the same bits)
            for a, piece, coef in ctx.feature_grads:
                g = g.add_(_feature_grad(x, a, piece, coef))
            ctx.feature_grads = []
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
    (N H W C) rather than C, H, W."""
    if output.ndim == 4 and not output.is_contiguous() and output.is_contiguous(memory_format=torch.channels_last):
        b, c, h, w = output.shape
        return output.permute(0, 2, 3, 1).reshape(b, h * w * c), True
    return output.reshape(output.shape[0], -1), False


def stage_means(output: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """weights (K x B) @ the output flattened in C, H, W order (K x D_l), one matrix product over the
    output where it lies: a channels-last output is reduced through its N H W C view and only the K
    rows are reordered back to C, H, W."""
    flat, nhwc = _flat(output)
    means = weights @ flat
    if nhwc:
        b, c, h, w = output.shape
        means = means.view(-1, h, w, c).permute(0, 3, 1, 2).reshape(means.shape[0], c * h * w)
    return means


def _tensor_key(t: torch.Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t._version


def _feature_grad(o: torch.Tensor, a: torch.Tensor, g: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """The gradient wrt one stage output o (B x ...): A^T G_l (G_l: K x D_l, in o's memory order),
    plus coef * o for the norm bound's scale, in one new B x D_l buffer shaped and laid out as o."""
    flat, nhwc = _flat(o)
    gy = a.T @ g
    if nhwc:
        b, c, h, w = o.shape
        gy = gy.view(b, h, w, c).permute(0, 3, 1, 2)
    else:
        gy = gy.view(o.shape)
    return gy.addcmul_(o, coef.view(-1, *[1] * (o.ndim - 1)))


def _consumers(outputs: tuple[torch.Tensor, ...]) -> list:
    """Per output, the lean stage (`_ReluPoolConv` node) among the other outputs' producers that saved
    this output as its input, else None: whose backward can add this feature's gradient itself."""
    nodes = {}
    for o in outputs:
        node = o.grad_fn
        key = getattr(node, "input_key", None)
        if key is not None and isinstance(getattr(node, "feature_grads", None), list):
            nodes[key] = node
    return [nodes.get(_tensor_key(o)) if o.requires_grad else None for o in outputs]


class _ScaledClassMeans(torch.autograd.Function):
    """(weights * scale) @ [flattened outputs] (K x D, stages in C, H, W order), where scale =
    bound / joint norm of the outputs. Backward: the gradient wrt each output, the scale's dependence
    on the outputs included, computed into one buffer per stage (A^T G_l, then + c * output in place).

    When an output is the saved input of the lean VGG stage that produced another output (the chain
    Y_l -> stage l+1 -> Y_{l+1}), its gradient is not returned but handed to that stage's node,
    whose backward adds it to the gradient it computes for Y_l: autograd's sum, but each stage's
    B x D_l gradient exists only while the chain passes that stage, not all at once (VGG19 at batch
    128: 147 MiB at once before). That node runs after this one (it consumes Y_{l+1}, an input here).
    """

    @staticmethod
    def forward(ctx, weights, scale, norms, consumers, *outputs):
        a = weights * scale
        ctx.save_for_backward(weights, scale, norms, *outputs)
        ctx.consumers = consumers
        return torch.cat([stage_means(o, a) for o in outputs], dim=1)

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
        for o, g, consumer in zip(outputs, pieces, ctx.consumers):
            if consumer is not None:  # its stage's backward adds it (see the class docstring)
                consumer.feature_grads.append((a, g, coef))
                grads.append(None)
            else:
                grads.append(_feature_grad(o, a, g, coef))  # B x D_l, in the output's memory order
        ctx.consumers = None
        grad_w = grad_a * scale if ctx.needs_input_grad[0] else None
        return (grad_w, None, None, None, *grads)


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
    consumers = _consumers(tuple(outputs)) if torch.is_grad_enabled() else [None] * len(outputs)
    return _ScaledClassMeans.apply(weights, scale[None, :], norms, consumers, *outputs)


# --- the generator's batch norm + ReLU + convolution, without the ReLU output kept --------------------
#
# Issue 16 (memory of the CIFAR-10 training step): plain autograd keeps, for each BN -> ReLU -> conv
# of the ResNet generator, the batch norm's input (for its backward), and the ReLU's output (for the
# ReLU's backward and as the conv's input, for its weight gradient): twice the map's bytes. The ReLU
# output is a cheap function of the batch norm's input and batch statistics, so `_BNReLUConv` keeps
# only the input (and the two C-sized statistics) and recomputes the ReLU output in backward, one
# block at a time: ~116 of the generator's ~232 MiB saved at batch 128 (3 x 32 x 32).
#
# Same kernels as autograd, so the same values: forward is `native_batch_norm` (what
# `F.batch_norm` runs on the CPU, updating the running statistics), ReLU, `aten.convolution`;
# backward recomputes the batch norm's output from the saved batch statistics as the CPU kernel
# forms it, x * alpha + beta with alpha = invstd * gamma, beta = beta_bn - mean * alpha (one pass,
# no new statistics; the forward's bits on the AVX2 development host, where the generator's gradients
# came out bitwise autograd's; float32 rounding at worst where a kernel fuses the multiply-add, which
# is what tests/test_lean_generator_backward.py allows), then `convolution_backward` (input, weight
# and bias gradients as asked), `threshold_backward` (in place) and `native_batch_norm_backward` with
# the saved statistics, as autograd's nodes do.


def _bn_momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The running-average factor `_BatchNorm.forward` uses in training mode (counting the batch,
    as it does): momentum, or 1 / batches seen for a cumulative average (momentum None)."""
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            return 1.0 / float(bn.num_batches_tracked)
    return 0.0 if bn.momentum is None else bn.momentum


class _BNReLUConv(torch.autograd.Function):
    """x -> convolution(relu(batch_norm(x, batch statistics)), weight, bias); saves x, the batch
    statistics and the weight, not the normalised map or the ReLU output (recomputed in backward)."""

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, momentum, eps, weight, bias, conv: tuple):
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, bn_weight, bn_bias, running_mean, running_var,
                                                           True, momentum, eps)
        z = y.relu_()  # the batch norm's output is ours: ReLU in place, as the generator's out block does
        out = torch.ops.aten.convolution(z, weight, bias, *conv)
        ctx.eps, ctx.conv, ctx.has_bias = eps, conv, bias is not None
        ctx.save_for_backward(x, bn_weight, bn_bias, mean, invstd, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, bn_weight, bn_bias, mean, invstd, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        # the batch norm's output from the saved statistics, as its kernel computes it (see above)
        alpha = invstd * bn_weight
        shape = (1, -1, *[1] * (x.ndim - 2))
        z = torch.addcmul((bn_bias - mean * alpha).view(shape), x, alpha.view(shape)).relu_()
        bias_sizes = [weight.shape[1] * ctx.conv[-1] if ctx.conv[3] else weight.shape[0]] if ctx.has_bias else None
        gz, gw, gb = torch.ops.aten.convolution_backward(grad, z, weight, bias_sizes, *ctx.conv,
                                                         (True, need[7], need[8] and ctx.has_bias))
        gz = torch.ops.aten.threshold_backward.grad_input(gz, z, 0, grad_input=gz)  # autograd's, in place
        del z
        gx, gbw, gbb = torch.ops.aten.native_batch_norm_backward(
            gz, x, bn_weight, None, None, mean, invstd, True, ctx.eps, (need[0], need[1], need[2]))
        return gx, gbw, gbb, None, None, None, None, gw, gb, None


def bn_relu_conv(x: torch.Tensor, bn: nn.BatchNorm2d, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 stride: int = 1, padding: int = 0, transposed: bool = False) -> torch.Tensor:
    """conv(relu(bn(x)), weight, bias) (`F.conv_transpose2d` when `transposed`, else `F.conv2d`), with
    `bn` a training-mode affine `nn.BatchNorm2d` applied as its forward does (batch statistics,
    running statistics updated), computed by `_BNReLUConv` when that is exact and gradients are
    wanted, else by the plain modules.

    x: N x C_in x H x W (any memory format), weight: the conv's (C_out x C_in x k x k, or
    C_in x C_out x k x k when transposed). Returns the conv's output, the same values as the plain
    composition; the gradients wrt x, the batch norm's affine parameters, weight and bias are
    autograd's (tests/test_lean_generator_backward.py).
    """
    lean = (torch.is_grad_enabled() and bn.training and bn.affine and x.ndim == 4
            and not torch.is_autocast_enabled(x.device.type)
            and (x.requires_grad or any(p is not None and p.requires_grad for p in (bn.weight, bn.bias, weight, bias))))
    if not lean:
        h = F.relu(bn(x))
        if transposed:
            return F.conv_transpose2d(h, weight, bias, stride=stride, padding=padding)
        return F.conv2d(h, weight, bias, stride=stride, padding=padding)
    pair = (stride, stride), (padding, padding)
    conv = (*pair, (1, 1), transposed, (0, 0), 1)
    running = (bn.running_mean, bn.running_var) if bn.track_running_stats else (None, None)
    return _BNReLUConv.apply(x, bn.weight, bn.bias, *running, _bn_momentum(bn), bn.eps, weight, bias, conv)
