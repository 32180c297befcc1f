"""Convolution suite: im2win conv2d on the 12 layers of the im2win paper and a ResNet-50
forward, against F.conv2d (oneDNN on CPU, cuDNN with benchmark=True on GPU; in fp32 on the GPU
also with TF32 off, the precision of our fp32 kernels) and im2col (unfold) + matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..case import Case, register_suite
from ..roofline import ieee_fp32

# (C, H=W, K, R=S, stride) of the paper's benchmark layers, padding 0 (im2win.md).
PAPER_LAYERS = (
    (3, 227, 96, 11, 4), (3, 231, 96, 11, 4), (3, 227, 64, 7, 2), (32, 224, 64, 7, 2),
    (96, 24, 256, 5, 1), (256, 12, 512, 3, 1), (3, 224, 64, 3, 1), (64, 112, 128, 3, 1),
    (64, 56, 64, 3, 1), (128, 28, 128, 3, 1), (256, 14, 256, 3, 1), (512, 7, 512, 3, 1),
)
_BATCH = {"cpu": 8, "cuda": 128}
_DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.bfloat16)}
_QUICK_LAYERS = {"cpu": (9, 12), "cuda": (4, 9, 12)}  # 1-based layer numbers
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def im2win_conv(x, w, stride):
    return torch.ops.torch_ext.im2win_conv2d(x, w, None, [stride, stride], [0, 0], [1, 1], 1)


def im2col_conv(x, w, stride):
    """unfold to [N, C*R*S, Ho*Wo], then one batched matmul with the [K, C*R*S] weight."""
    n, k, r = x.shape[0], w.shape[0], w.shape[2]
    ho = (x.shape[2] - r) // stride + 1
    wo = (x.shape[3] - w.shape[3]) // stride + 1
    cols = F.unfold(x, (r, w.shape[3]), stride=stride)
    return (w.reshape(k, -1) @ cols).view(n, k, ho, wo)


def conv2d_ieee_fp32(x, w, stride):
    """F.conv2d with cuDNN's TF32 off: the precision our fp32 kernels compute at (torch's default
    lets cuDNN run fp32 convolutions in TF32 on tensor cores). Only that flag changes: the
    algorithm search (cudnn.benchmark) stays as the suite set it."""
    cudnn = torch.backends.cudnn
    with ieee_fp32(getattr(cudnn, "conv", None), cudnn):
        return F.conv2d(x, w, None, stride)


def _layer_case(device: str, number: int, dtype: torch.dtype) -> Case:
    c, hw, k, r, stride = PAPER_LAYERS[number - 1]
    n = _BATCH[torch.device(device).type]
    ho = (hw - r) // stride + 1
    element = torch.empty((), dtype=dtype).element_size()

    def make_inputs(seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(n, c, hw, hw, generator=gen, device=device, dtype=dtype)
        w = torch.randn(k, c, r, r, generator=gen, device=device, dtype=dtype) / (c * r * r) ** 0.5
        return x, w, stride

    width = (ho - 1) * stride + r  # window columns for padding 0, dilation 1
    return Case(
        family="conv2d", op="im2win_conv2d", label=f"conv{number} N={n} {_SHORT[dtype]}",
        make_inputs=make_inputs, ours=im2win_conv,
        baselines={"F.conv2d": lambda x, w, s: F.conv2d(x, w, None, s), "im2col+matmul": im2col_conv,
                   **({"F.conv2d (TF32 off)": conv2d_ieee_fp32}
                      if torch.device(device).type == "cuda" and dtype == torch.float32 else {})},
        flops=2.0 * n * k * ho * ho * c * r * r,
        bytes=float((n * c * hw * hw + k * c * r * r + n * k * ho * ho) * element),
        device=device,
        notes={
            # What each method materializes besides input, weight and output (bytes).
            "im2win_full_window_bytes": n * c * ho * width * r * element,
            "im2col_buffer_bytes": n * c * r * r * ho * ho * element,
        },
    )


def _transform_case(device: str, number: int) -> Case:
    """The window transform alone against im2col's unfold: time and bytes written."""
    c, hw, k, r, stride = PAPER_LAYERS[number - 1]
    n = _BATCH[torch.device(device).type]
    ho = (hw - r) // stride + 1
    width = (ho - 1) * stride + r

    def make_inputs(seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)
        return (torch.randn(n, c, hw, hw, generator=gen, device=device),)

    return Case(
        family="conv2d", op="im2win_transform", label=f"conv{number} N={n} fp32",
        make_inputs=make_inputs,
        ours=lambda x: torch.ops.torch_ext.im2win_transform(x, [r, r], [stride, stride], [0, 0], [1, 1]),
        baselines={"F.unfold (im2col)": lambda x: F.unfold(x, r, stride=stride)},
        bytes=4.0 * (n * c * hw * hw + n * c * ho * width * r), device=device,
        notes={"window_bytes": 4 * n * c * ho * width * r, "im2col_bytes": 4 * n * c * r * r * ho * ho},
    )


def _training_step_case(device: str, number: int) -> Case:
    """Forward + backward (grad input and grad weight: our gradient kernels) against F.conv2d's."""
    c, hw, k, r, stride = PAPER_LAYERS[number - 1]
    n = _BATCH[torch.device(device).type]
    ho = (hw - r) // stride + 1

    def make_inputs(seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(n, c, hw, hw, generator=gen, device=device).requires_grad_()
        w = (torch.randn(k, c, r, r, generator=gen, device=device) / (c * r * r) ** 0.5).requires_grad_()
        return x, w

    def step(conv):
        def run(x, w):
            conv(x, w).sum().backward()
        return run

    return Case(
        family="conv2d", op="im2win_conv2d_fwd_bwd", label=f"conv{number} N={n} fp32",
        make_inputs=make_inputs, ours=step(lambda x, w: im2win_conv(x, w, stride)),
        baselines={"F.conv2d fwd+bwd": step(lambda x, w: F.conv2d(x, w, None, stride))},
        flops=3 * 2.0 * n * k * ho * ho * c * r * r, device=device,
    )


def _resnet50_case(device: str) -> Case | None:
    try:
        import torchvision
    except ImportError:
        return None
    from torch_ext.nn import convert_conv2d

    n = _BATCH[torch.device(device).type] if torch.device(device).type == "cpu" else 64
    stock = torchvision.models.resnet50().eval().to(device)
    ours = convert_conv2d(torchvision.models.resnet50().eval().to(device))
    ours.load_state_dict(stock.state_dict())

    def make_inputs(seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)
        return (torch.randn(n, 3, 224, 224, generator=gen, device=device),)

    def run(model):
        def forward(x):
            with torch.inference_mode():
                return model(x)
        return forward

    return Case(family="conv2d", op="resnet50_forward", label=f"ResNet-50 fwd N={n} fp32",
                make_inputs=make_inputs, ours=run(ours), baselines={"torchvision (F.conv2d)": run(stock)},
                flops=2 * 4.09e9 * n, bytes=0.0, device=device)


@register_suite("conv2d")
def conv_suite(device: str, quick: bool) -> list[Case]:
    kind = torch.device(device).type
    if kind not in _BATCH:
        return []
    if kind == "cuda":
        torch.backends.cudnn.benchmark = True  # cuDNN-best: each shape picks its fastest algorithm
    layers = _QUICK_LAYERS[kind] if quick else range(1, len(PAPER_LAYERS) + 1)
    dtypes = _DTYPES[kind][:1] if quick else _DTYPES[kind]
    cases = [_layer_case(device, number, dtype) for dtype in dtypes for number in layers]
    cases += [_transform_case(device, number) for number in layers[:2]]
    cases += [_training_step_case(device, number) for number in layers[:1 if quick else 3]]
    if not quick:
        resnet = _resnet50_case(device)
        if resnet is not None:
            cases.append(resnet)
    return cases
