"""A convolution and the step after it (LeakyReLU, or the residual add) as one oneDNN call, on CPUs.

Why: on a CPU in bf16 the fast path spends as long in memory-bound passes over activations as in
the convolutions. Eager PyTorch writes a convolution's output and reads it back for the LeakyReLU
or the residual add; oneDNN can apply either as a post-op while the output is still in cache
(`mkldnn._convolution_pointwise`, the op inductor emits for CPU inference). That op has no
autograd formula, so each pairing below is an autograd.Function whose backward is exactly the
unfused ops' backward. It pays off in bf16 only (docs/speed.md has the figures).
"""

import functools
import platform
import warnings

import torch
import torch.nn.functional as F

# oneDNN's bf16 convolutions need AVX512 (BW/VL/DQ), AVX-NE-CONVERT or AMX; on other x86 CPUs
# (AVX2 only) the fused op refuses bf16, where plain conv2d falls back to another kernel.
_OP = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)  # private: other builds may differ
_POINTWISE = (
    torch.backends.mkldnn.is_available()
    and platform.machine().lower() in ("x86_64", "amd64")
    and _OP is not None
    and torch.ops.mkldnn._is_mkldnn_bf16_supported()
)
_UNIT = [1, 1]  # stride and dilation


def applies(x):
    """Whether the fused ops serve x: a bf16 CPU tensor, oneDNN switched on, not inside
    torch.compile (which must not trace this op: inductor chooses its own kernels), and the op
    passed its self-check in this process."""
    return (
        _POINTWISE
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and not torch.compiler.is_compiling()
        and self_check()
    )


@functools.cache
def self_check():
    """Once per process: both fused pairs, forward and backward, on a small bf16 input against the
    plain ops. The op is private to PyTorch, and another build may change or break it: then one
    warning, and the plain ops serve."""
    g = torch.Generator().manual_seed(0)
    try:
        # The first call may come from sampling, under inference_mode: tensors made here must be
        # ordinary ones, which autograd can save.
        with torch.inference_mode(False), torch.enable_grad():
            shapes = ((2, 4, 5, 5), (2, 4, 5, 5), (4, 4, 3, 3), (4,))
            x, other, w, b = (torch.randn(shape, generator=g).bfloat16() for shape in shapes)
            x_fused, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
            fused = _ConvAdd.apply(_ConvLeakyReLU.apply(x_fused, w, b, 0.1), w, b, other)
            plain = F.conv2d(F.leaky_relu(F.conv2d(x_plain, w, b, padding=1), 0.1), w, b, padding=1) + other
            for y in (fused, plain):
                y.float().square().sum().backward()
        # bf16 keeps 8 significant bits: the two differ by rounding only
        same = all(
            torch.allclose(a.float(), p.float(), rtol=0.05, atol=0.05 * p.float().abs().max().item())
            for a, p in ((fused, plain), (x_fused.grad, x_plain.grad))
        )
        reason = None if same else "its results differ from the plain ops'"
    except Exception as e:  # whatever a changed private op raises
        reason = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    if reason:
        message = f"lib.cpu_fusion: oneDNN's fused convolution failed its self-check ({reason})"
        warnings.warn(f"{message}; using the plain ops", RuntimeWarning, stacklevel=2)
    return reason is None


def _same_padding(weight):
    return [weight.shape[-2] // 2, weight.shape[-1] // 2]


def _cast_parameters(conv, dtype):
    """conv's weight and bias in dtype, after checking that it is the kind of conv these ops run:
    stride 1, no dilation or groups, zero 'same' padding (the residual blocks' 3x3 convs)."""
    if (conv.stride, conv.dilation, conv.groups, conv.padding_mode) != ((1, 1), (1, 1), 1, "zeros") or list(
        conv.padding
    ) != _same_padding(conv.weight):
        raise ValueError(
            f"lib.cpu_fusion runs stride-1, same-padded, ungrouped convolutions only, not {conv}"
        )
    # Weights stay fp32 (Adam's master copy); the casts are recorded, so their gradients return fp32.
    return conv.weight.to(dtype), None if conv.bias is None else conv.bias.to(dtype)


def _conv_backward(grad_y, x, weight, padding, needs_input_grad):
    """Gradients of conv2d(x, weight, bias) from grad_y (B, C_out, H, W): (x, weight, bias)."""
    need_x, need_w, need_b = needs_input_grad
    return torch.ops.aten.convolution_backward(
        grad_y,
        x,
        weight,
        [weight.shape[0]] if need_b else None,
        _UNIT,
        padding,
        _UNIT,
        False,
        [0, 0],
        1,
        [need_x, need_w, need_b],
    )


class _ConvLeakyReLU(torch.autograd.Function):
    """leaky_relu(conv2d(x, weight, bias, same padding), slope)."""

    @staticmethod
    def forward(ctx, x, weight, bias, slope):
        padding = _same_padding(weight)
        y = _OP(x, weight, bias, padding, _UNIT, _UNIT, 1, "leaky_relu", [slope], "")
        ctx.save_for_backward(x, weight, y)
        ctx.padding, ctx.slope = padding, slope
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, y = ctx.saved_tensors
        # With a positive slope, y > 0 exactly where the convolution's output was > 0, so the
        # LeakyReLU derivative can be read off the saved output (self_is_result=True).
        grad_conv = torch.ops.aten.leaky_relu_backward(grad_y, y, ctx.slope, True)
        return (*_conv_backward(grad_conv, x, weight, ctx.padding, ctx.needs_input_grad[:3]), None)


class _ConvAdd(torch.autograd.Function):
    """conv2d(x, weight, bias, same padding) + other."""

    @staticmethod
    def forward(ctx, x, weight, bias, other):
        padding = _same_padding(weight)
        y = _OP.binary(x, other, weight, bias, padding, _UNIT, _UNIT, 1, "add", None, None, [], None)
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        return (*_conv_backward(grad_y, x, weight, ctx.padding, ctx.needs_input_grad[:3]), grad_y)


def conv_leaky_relu(x, conv, slope):
    """leaky_relu(conv(x), slope) for an nn.Conv2d with same padding; x: (B, C_in, H, W) bf16."""
    return _ConvLeakyReLU.apply(x, *_cast_parameters(conv, x.dtype), slope)


def conv_add(x, conv, other):
    """conv(x) + other for an nn.Conv2d with same padding; other: (B, C_out, H, W), x's dtype."""
    return _ConvAdd.apply(x, *_cast_parameters(conv, x.dtype), other)
