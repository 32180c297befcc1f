"""im2win convolution: `conv2d` with the signature of F.conv2d, its fake kernels and autograd."""

from __future__ import annotations

from typing import Sequence, Union

import torch

from torch_ext.ops._dispatch import call_differentiable

IntOrPair = Union[int, Sequence[int]]

_CONV = torch.ops.torch_ext.im2win_conv2d
_GRAD_INPUT = torch.ops.torch_ext.im2win_conv2d_grad_input
_GRAD_WEIGHT = torch.ops.torch_ext.im2win_conv2d_grad_weight


def _pair(value: IntOrPair, name: str) -> list[int]:
    if isinstance(value, int):
        return [value, value]
    values = [int(v) for v in value]
    if len(values) == 1:
        return values * 2
    if len(values) != 2:
        raise ValueError(f"torch_ext.conv2d: {name} must be an int or a pair, got {value!r}")
    return values


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: IntOrPair = 1,
           padding: IntOrPair | str = 0, dilation: IntOrPair = 1, groups: int = 1) -> torch.Tensor:
    """2-D convolution with exactly the semantics of ``torch.nn.functional.conv2d``.

    Computed by im2win: the input is rearranged into window order (each output's receptive
    field for one kernel column becomes one contiguous run) and a register-blocked kernel
    computes the dot products. ``padding`` is an int, a pair, ``'valid'`` or ``'same'``
    (``'same'`` needs stride 1; an even kernel pads one more on the bottom/right, as PyTorch
    does). The output keeps the input's memory format (NCHW or channels_last). An unbatched
    ``[C, H, W]`` input gives a ``[K, Ho, Wo]`` output, as with F.conv2d.
    Differentiable in input, weight and bias.
    """
    if input.dim() == 3:
        return conv2d(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups).squeeze(0)
    stride_hw, dilation_hw = _pair(stride, "stride"), _pair(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            padding_hw = [0, 0]
        elif padding == "same":
            if stride_hw != [1, 1]:
                raise ValueError("torch_ext.conv2d: padding='same' is not supported for strided convolutions")
            totals = [d * (k - 1) for d, k in zip(dilation_hw, weight.shape[2:])]
            padding_hw = [t // 2 for t in totals]
            extra = [t - 2 * (t // 2) for t in totals]
            if any(extra):  # even kernel: one more row/column of zeros after, as F.conv2d does
                input = torch.nn.functional.pad(input, (0, extra[1], 0, extra[0]))
        else:
            raise ValueError(f"torch_ext.conv2d: padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    else:
        padding_hw = _pair(padding, "padding")
    return call_differentiable(_CONV, input, weight, bias, stride_hw, padding_hw, dilation_hw, groups)


def _output_size(size: int, pad: int, dilation: int, kernel: int, stride: int) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def _conv_memory_format(t: torch.Tensor) -> torch.memory_format:
    """The C++ rule: channels_last output for an input that is channels_last and not contiguous."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _empty_conv_output(like: torch.Tensor, size) -> torch.Tensor:
    return torch.empty(tuple(size), dtype=like.dtype, device=like.device, memory_format=_conv_memory_format(like))


@torch.library.register_fake("torch_ext::im2win_conv2d")
def _conv_fake(input, weight, bias, stride, padding, dilation, groups):
    torch._check(input.dim() == 4 and weight.dim() == 4, lambda: "input and weight must be 4-D")
    n, _, h, w = input.shape
    k, _, r, s = weight.shape
    size = (n, k, _output_size(h, padding[0], dilation[0], r, stride[0]),
            _output_size(w, padding[1], dilation[1], s, stride[1]))
    return _empty_conv_output(input, size)


@torch.library.register_fake("torch_ext::im2win_conv2d_grad_input")
def _grad_input_fake(grad_output, weight, input_size, stride, padding, dilation, groups):
    return _empty_conv_output(grad_output, input_size)


@torch.library.register_fake("torch_ext::im2win_conv2d_grad_weight")
def _grad_weight_fake(grad_output, input, weight_size, stride, padding, dilation, groups):
    return input.new_empty(tuple(weight_size))


@torch.library.register_fake("torch_ext::im2win_transform")
def _transform_fake(input, kernel_size, stride, padding, dilation):
    n, c, h, w = input.shape
    ho = _output_size(h, padding[0], dilation[0], kernel_size[0], stride[0])
    wo = _output_size(w, padding[1], dilation[1], kernel_size[1], stride[1])
    width = (wo - 1) * stride[1] + (kernel_size[1] - 1) * dilation[1] + 1
    return _empty_conv_output(input, (n, c, ho, width * kernel_size[0]))


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None
    ctx.conv_args = (stride, padding, dilation, groups)


def _backward(ctx, grad_output: torch.Tensor):
    input, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = _GRAD_INPUT(grad_output, weight, list(input.shape), stride, padding, dilation, groups)
    if ctx.needs_input_grad[1]:
        grad_weight = _GRAD_WEIGHT(grad_output, input, list(weight.shape), stride, padding, dilation, groups)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_output.sum(dim=(0, 2, 3))
    return grad_input, grad_weight, grad_bias, None, None, None, None


torch.library.register_autograd("torch_ext::im2win_conv2d", _backward, setup_context=_setup_context)
