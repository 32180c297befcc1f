"""im2win convolution: forward/backward vs float64 F.conv2d, transform, modules, opcheck,
torch.compile, bad inputs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import torch_ext
from torch_ext import reference
from torch_ext.testing import (RELATIVE_ERROR_BOUNDS, assert_close_to_reference, fresh_seed, poisoned_outputs,
                               random_tensor)

# Reductions over C*R*S products in fp32: a little above the elementwise bound.
CONV_BOUNDS = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: RELATIVE_ERROR_BOUNDS[torch.bfloat16],
               torch.float16: RELATIVE_ERROR_BOUNDS[torch.float16]}
DEVICE_DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.float16, torch.bfloat16]}


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cg = draw(st.integers(1, 5))
    kg = draw(st.integers(1, 20))
    r, s = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    h = draw(st.integers(max(1, dilation[0] * (r - 1) + 1 - 2 * padding[0]), 14))
    w = draw(st.integers(max(1, dilation[1] * (s - 1) + 1 - 2 * padding[1]), 14))
    n = draw(st.integers(1, 3))
    return dict(n=n, c=cg * groups, h=h, w=w, k=kg * groups, r=r, s=s, stride=stride, padding=padding,
                dilation=dilation, groups=groups, channels_last=draw(st.booleans()), bias=draw(st.booleans()))


def _inputs(case, dtype, device, seed):
    x = random_tensor((case["n"], case["c"], case["h"], case["w"]), dtype, device, seed)
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    w = random_tensor((case["k"], case["c"] // case["groups"], case["r"], case["s"]), dtype, device, seed + 1)
    b = random_tensor((case["k"],), dtype, device, seed + 2) if case["bias"] else None
    return x, w, b


def _conv_args(case):
    return case["stride"], case["padding"], case["dilation"], case["groups"]


def _check_forward_and_backward(case, dtype, device):
    seed = fresh_seed()
    x, w, b = _inputs(case, dtype, device, seed)
    x.requires_grad_()
    w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    what = f"{case} {dtype} seed {seed}"
    with poisoned_outputs():
        out = torch_ext.ops.conv2d(x, w, b, *_conv_args(case))
    x64, w64 = (t.detach().double().cpu().requires_grad_() for t in (x, w))
    b64 = b.detach().double().cpu().requires_grad_() if b is not None else None
    ref = F.conv2d(x64, w64, b64, *_conv_args(case))
    assert_close_to_reference(out, ref, dtype, f"forward {what}", CONV_BOUNDS[dtype])
    if case["channels_last"] and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad = random_tensor(ref.shape, dtype, device, seed + 3)
    with poisoned_outputs():
        out.backward(grad)
    ref.backward(grad.double().cpu())
    assert_close_to_reference(x.grad, x64.grad, dtype, f"grad input {what}", CONV_BOUNDS[dtype])
    assert_close_to_reference(w.grad, w64.grad, dtype, f"grad weight {what}", CONV_BOUNDS[dtype])
    if b is not None:
        assert_close_to_reference(b.grad, b64.grad, dtype, f"grad bias {what}", CONV_BOUNDS[dtype])


@settings(max_examples=40, deadline=None)
@given(case=conv_cases())
def test_random_shapes_cpu(case):
    for dtype in DEVICE_DTYPES["cpu"]:
        _check_forward_and_backward(case, dtype, "cpu")


@pytest.mark.cuda
@settings(max_examples=40, deadline=None)
@given(case=conv_cases())
def test_random_shapes_cuda(case):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for dtype in DEVICE_DTYPES["cuda"]:
        _check_forward_and_backward(case, dtype, "cuda")


# Named layers: the paper's shapes scaled down, 1x1, depthwise, non-square, large padding.
LAYERS = {
    "alexnet1": dict(n=1, c=3, h=35, w=35, k=16, r=11, s=11, stride=(4, 4), padding=(0, 0), dilation=(1, 1), groups=1),
    "resnet3x3": dict(n=2, c=16, h=14, w=14, k=24, r=3, s=3, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1),
    "pointwise": dict(n=2, c=40, h=7, w=9, k=33, r=1, s=1, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1),
    "depthwise": dict(n=2, c=24, h=11, w=10, k=24, r=3, s=3, stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=24),
    "non_square": dict(n=1, c=5, h=9, w=17, k=7, r=1, s=7, stride=(1, 2), padding=(0, 3), dilation=(1, 2), groups=1),
    "pad_gt_kernel": dict(n=1, c=2, h=4, w=5, k=3, r=2, s=2, stride=(3, 3), padding=(3, 3), dilation=(1, 1), groups=1),
    "wide_rows": dict(n=2, c=48, h=5, w=45, k=20, r=3, s=3, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1),
    "deep7x7": dict(n=3, c=64, h=7, w=7, k=80, r=3, s=3, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1),
}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_named_layers(device, name, layout):
    case = dict(LAYERS[name], channels_last=layout == "channels_last", bias=True)
    for dtype in DEVICE_DTYPES[device]:
        _check_forward_and_backward(case, dtype, device)


def test_every_cpu_isa_path(cpu_isa):
    for name in ("resnet3x3", "depthwise", "non_square", "wide_rows"):
        _check_forward_and_backward(dict(LAYERS[name], channels_last=False, bias=True), torch.float32, "cpu")


# 1x1 NCHW fp32 layers that the pointwise GEMM path takes (conv/pointwise_conv_cpu.cpp):
# whole-vector pixel runs (8x8, 12x12: runs of 4 and 3 vectors), a pixel tail (9x15 = 135), a
# reduction over two K chunks (C = 600 > 512), K not a multiple of the 6-row groups; strided
# (gathered panels): 16x16 / 2 (8x8 outputs), 15x17 / 2 (8x9, a tail), 9x30 / (1, 2) (9x15).
POINTWISE = {
    "8x8": dict(n=2, c=40, h=8, w=8, k=33, bias=True),
    "12x12_deep": dict(n=1, c=600, h=12, w=12, k=14, bias=False),
    "9x15_tail": dict(n=3, c=24, h=9, w=15, k=70, bias=True),
    "16x16_stride2": dict(n=2, c=20, h=16, w=16, k=19, bias=True, stride=(2, 2)),
    "15x17_stride2_tail": dict(n=2, c=9, h=15, w=17, k=12, bias=False, stride=(2, 2)),
    "9x30_stride1x2": dict(n=1, c=30, h=9, w=30, k=8, bias=True, stride=(1, 2)),
}


@pytest.mark.parametrize("name", sorted(POINTWISE))
def test_pointwise_path(cpu_isa, name):
    """Forward and both gradients against float64 (the input gradient of a 1x1 convolution is one
    too) on every ISA level (the scalar one takes the general kernel)."""
    case = dict(stride=(1, 1), r=1, s=1, padding=(0, 0), dilation=(1, 1), groups=1, channels_last=False)
    case.update(POINTWISE[name])
    _check_forward_and_backward(case, torch.float32, "cpu")


def test_pointwise_path_is_taken():
    """Which layers the pointwise path takes, seen through the inference weight cache that only the
    general kernel fills: fp32 NCHW 1x1 without padding, any stride (not channels_last, not bf16,
    not padded, not 7x7 outputs on AVX-512, whose 49 pixels would leave 15 of 64 lanes idle)."""
    if torch_ext._C.cpu_isa() == "scalar":
        pytest.skip("the scalar build has no vector panels")
    seed = fresh_seed()
    w = random_tensor((16, 8, 1, 1), torch.float32, "cpu", seed)

    def fills_cache(x, stride=1, padding=0, weight=w):
        torch_ext._C.clear_conv_weight_cache()
        with torch.no_grad():
            for _ in range(2):  # cached from the second call on
                torch_ext.ops.conv2d(x, weight, None, stride, padding)
        return torch_ext._C.conv_weight_cache_bytes() > 0

    x = random_tensor((2, 8, 16, 16), torch.float32, "cpu", seed + 1)
    assert not fills_cache(x)
    assert not fills_cache(x, stride=2)
    assert fills_cache(x, padding=1)
    assert fills_cache(x.contiguous(memory_format=torch.channels_last))
    assert fills_cache(x.bfloat16(), weight=w.bfloat16())
    if torch_ext._C.cpu_isa() == "avx512":
        assert fills_cache(random_tensor((2, 8, 7, 7), torch.float32, "cpu", seed + 2))
    torch_ext._C.clear_conv_weight_cache()


@pytest.mark.parametrize("what", ["no input channels", "empty batch", "no filters"])
def test_empty_reductions(device, what):
    """Sizes that leave a sum empty: the forward with C = 0 gives the bias, the weight gradient
    of an empty batch and the input gradient with no filters are zeros (outputs poisoned)."""
    seed = fresh_seed()
    n, c, k = {"no input channels": (2, 0, 4), "empty batch": (0, 3, 4), "no filters": (2, 3, 0)}[what]
    dtype = torch.float32 if device == "cpu" else torch.float16
    x = random_tensor((n, c, 6, 6), dtype, device, seed).requires_grad_()
    w = random_tensor((k, c, 3, 3), dtype, device, seed + 1).requires_grad_()
    b = random_tensor((k,), dtype, device, seed + 2).requires_grad_()
    with poisoned_outputs():
        y = torch_ext.ops.conv2d(x, w, b, 1, 1)
        grads = torch.autograd.grad(y, (x, w, b), torch.ones_like(y), allow_unused=True)
    # (F.conv2d itself rejects K = 0 and returns no channels for C = 0: the definition instead.)
    assert y.shape == (n, k, 6, 6) and torch.equal(y, b.detach()[None, :, None, None].expand(n, k, 6, 6))
    for got, leaf in zip(grads, (x, w, b)):
        assert got is None or (got.shape == leaf.shape and torch.isfinite(got).all())
    if what == "empty batch":
        assert torch.equal(grads[1], torch.zeros_like(w))
    if what == "no filters":
        assert torch.equal(grads[0], torch.zeros_like(x))


def test_unbatched_input_like_f_conv2d():
    seed = fresh_seed()
    x = random_tensor((3, 9, 8), torch.float32, "cpu", seed)
    w = random_tensor((5, 3, 3, 2), torch.float32, "cpu", seed + 1)
    y = torch_ext.nn.Im2winConv2d(3, 5, (3, 2), padding=1).requires_grad_(False)
    y.weight.copy_(w)
    expected = F.conv2d(x.double(), w.double(), y.bias.double(), 1, 1)
    assert_close_to_reference(y(x), expected, torch.float32, "unbatched", CONV_BOUNDS[torch.float32])


def test_gradcheck(device):
    seed = fresh_seed()
    x = random_tensor((2, 4, 6, 7), torch.float64, device, seed).requires_grad_()
    w = random_tensor((6, 2, 3, 2), torch.float64, device, seed + 1).requires_grad_()
    b = random_tensor((6,), torch.float64, device, seed + 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: torch_ext.ops.conv2d(x, w, b, (2, 1), (1, 0), (1, 2), 2), (x, w, b))


@pytest.mark.parametrize("args", [((3, 3), (1, 1), (1, 1), (1, 1)), ((2, 4), (2, 3), (0, 2), (2, 1)),
                                  ((1, 1), (1, 1), (0, 0), (1, 1))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_transform_matches_reference(device, args, channels_last):
    x = random_tensor((2, 3, 9, 10), torch.float32, device, fresh_seed())
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with poisoned_outputs():
        window = torch.ops.torch_ext.im2win_transform(x, *args)
    assert torch.equal(window.cpu(), reference.im2win_transform(x.cpu(), *args))


def test_transform_memory_is_a_fraction_of_im2col():
    """3x3 stride 1: the window holds about 1/3 of im2col's elements (im2win.md)."""
    x = random_tensor((1, 64, 56, 56), torch.float32, "cpu", fresh_seed())
    window = torch.ops.torch_ext.im2win_transform(x, [3, 3], [1, 1], [1, 1], [1, 1])
    im2col = F.unfold(x, 3, padding=1)
    assert window.numel() <= 0.4 * im2col.numel()


def test_transform_indexes_beyond_2_31_elements():
    """A window of more than 2^31 elements: the last elements land where they belong."""
    side = 46341  # side^2 > 2^31
    x = torch.empty((1, 1, side, side), dtype=torch.bfloat16)
    x[0, 0, -3:, :].copy_(torch.randn(3, side).to(torch.bfloat16))
    window = torch.ops.torch_ext.im2win_transform(x, [1, 1], [1, 1], [0, 0], [1, 1])
    assert window.numel() > 2**31
    assert torch.equal(window[0, 0, -3:, :], x[0, 0, -3:, :])
    del window, x


def test_opcheck(device):
    seed = fresh_seed()
    x = random_tensor((2, 4, 7, 6), torch.float32, device, seed).requires_grad_()
    w = random_tensor((6, 2, 3, 3), torch.float32, device, seed + 1).requires_grad_()
    b = random_tensor((6,), torch.float32, device, seed + 2).requires_grad_()
    args = ([2, 1], [1, 1], [1, 1], 2)
    torch.library.opcheck(torch.ops.torch_ext.im2win_conv2d.default, (x, w, b, *args))
    g = random_tensor((2, 6, 4, 6), torch.float32, device, seed + 3)
    torch.library.opcheck(torch.ops.torch_ext.im2win_conv2d_grad_input.default, (g, w.detach(), [2, 4, 7, 6], *args))
    torch.library.opcheck(torch.ops.torch_ext.im2win_conv2d_grad_weight.default, (g, x.detach(), [6, 2, 3, 3], *args))
    torch.library.opcheck(torch.ops.torch_ext.im2win_transform.default, (x.detach(), [3, 3], [2, 1], [1, 1], [1, 1]))
    xc = x.detach().contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.torch_ext.im2win_conv2d.default, (xc, w.detach(), None, *args))


def test_torch_compile_fullgraph(device):
    seed = fresh_seed()
    x = random_tensor((2, 3, 10, 10), torch.float32, device, seed).requires_grad_()
    w = random_tensor((4, 3, 3, 3), torch.float32, device, seed + 1)

    def block(x, w):
        return torch.relu(torch_ext.ops.conv2d(x, w, None, 1, "same")) * 2

    out = torch.compile(block, fullgraph=True)(x, w)
    ref = torch.relu(F.conv2d(x.detach().double().cpu(), w.double().cpu(), None, 1, "same")) * 2
    assert_close_to_reference(out, ref, torch.float32, "compiled", CONV_BOUNDS[torch.float32])
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("padding", ["same", "valid", 2, (1, 2)])
def test_functional_padding_forms(padding):
    seed = fresh_seed()
    x = random_tensor((1, 3, 9, 8), torch.float32, "cpu", seed)
    w = random_tensor((5, 3, 4, 3), torch.float32, "cpu", seed + 1)  # even kernel height: asymmetric 'same'
    out = torch_ext.ops.conv2d(x, w, None, 1, padding)
    ref = F.conv2d(x.double(), w.double(), None, 1, padding)
    assert_close_to_reference(out, ref, torch.float32, f"padding={padding}", CONV_BOUNDS[torch.float32])


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_module_matches_nn_conv2d(padding_mode):
    torch.manual_seed(fresh_seed())
    stock = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2, padding_mode=padding_mode)
    ours = torch_ext.nn.Im2winConv2d(6, 8, 3, stride=2, padding=1, groups=2, padding_mode=padding_mode)
    ours.load_state_dict(stock.state_dict())
    assert ours.state_dict().keys() == stock.state_dict().keys()
    x = torch.randn(2, 6, 11, 9)
    assert_close_to_reference(ours(x), stock.double()(x.double()), torch.float32, padding_mode,
                              CONV_BOUNDS[torch.float32])
    stock.float().load_state_dict(ours.state_dict())


def test_convert_conv2d_keeps_parameters():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1)))
    weight = model[0].weight
    converted = torch_ext.nn.convert_conv2d(model)
    assert isinstance(converted[0], torch_ext.nn.Im2winConv2d) and isinstance(converted[2][0], torch_ext.nn.Im2winConv2d)
    assert converted[0].weight is weight


def _resnet18_pair(torchvision, smooth: bool):
    """A stock ResNet-18 and a converted copy with the same weights. With `smooth`, every ReLU
    becomes a SiLU in both: a ReLU input within fp32 rounding of 0 flips its gradient mask
    (measured: one such flip in about 40 random seeds, 9e-7 from zero, moved early-layer
    gradients by 1e-2), a property of ReLU in fp32, not of the convolution under test."""
    stock = torchvision.models.resnet18(num_classes=10).eval()
    if smooth:
        for name, module in list(stock.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, torch.nn.ReLU):
                    setattr(module, child_name, torch.nn.SiLU())
    ours = copy.deepcopy(stock)
    torch_ext.nn.convert_conv2d(ours)
    return stock, ours


@pytest.mark.slow
def test_resnet18_logits_and_gradients():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(fresh_seed())
    stock, ours = _resnet18_pair(torchvision, smooth=False)
    x = torch.randn(2, 3, 64, 64)
    assert_close_to_reference(ours(x), stock.double()(x.double()), torch.float32, "resnet18 logits", 1e-4)
    stock, ours = _resnet18_pair(torchvision, smooth=True)
    logits = ours(x)
    reference_logits = stock.double()(x.double())
    logits.sum().backward()
    reference_logits.sum().backward()
    for (name, p), (_, q) in zip(ours.named_parameters(), stock.named_parameters()):
        assert_close_to_reference(p.grad, q.grad, torch.float32, f"resnet18 grad {name}", 1e-4)


@pytest.mark.parametrize("make,message", [
    (lambda: (torch.randn(1, 4, 8, 8), torch.randn(3, 3, 3, 3), {}),
     r"weight must have input channels / groups = 4 channels"),
    (lambda: (torch.randn(1, 4, 8, 8), torch.randn(3, 2, 3, 3), {"groups": 3}),
     r"input channels \(4\) must be divisible by groups \(3\)"),
    (lambda: (torch.randn(4, 8), torch.randn(3, 4, 3, 3), {}), r"input must be a 4-D tensor, got shape \[4, 8\]"),
    (lambda: (torch.randn(1, 2, 4, 4), torch.randn(3, 2, 7, 7), {}),
     r"the kernel \(7x7, dilation \[1, 1\]\) is larger than the padded input \(4x4\)"),
    (lambda: (torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3, dtype=torch.float64), {}),
     r"weight must have the dtype of input \(torch.float32\), got torch.float64"),
    (lambda: (torch.randn(1, 2, 4, 4).int(), torch.randn(3, 2, 3, 3).int(), {}), r"input must have dtype"),
    (lambda: (torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3), {"stride": 0}), r"stride must be >= 1"),
])
def test_bad_inputs(make, message):
    x, w, kwargs = make()
    with pytest.raises(RuntimeError, match="torch_ext.im2win_conv2d: " + message):
        torch_ext.ops.conv2d(x, w, **kwargs)


def test_bad_bias():
    with pytest.raises(RuntimeError, match=r"bias must have shape \[3\] \(output channels\), got \[4\]"):
        torch_ext.ops.conv2d(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3), torch.randn(4))


@pytest.mark.cuda
def test_mixed_devices_rejected():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with pytest.raises(RuntimeError, match="weight must be on the device of input"):
        torch_ext.ops.conv2d(torch.randn(1, 2, 4, 4, device="cuda"), torch.randn(3, 2, 3, 3))


def test_bad_gradient_op_inputs():
    w, x = torch.randn(3, 2, 3, 3), torch.randn(1, 2, 6, 6)
    with pytest.raises(RuntimeError, match=r"im2win_conv2d_grad_input: grad_output must have shape \[1, 3, 4, 4\], "
                                           r"got \[1, 3, 5, 5\]"):
        torch.ops.torch_ext.im2win_conv2d_grad_input(torch.randn(1, 3, 5, 5), w, [1, 2, 6, 6], [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"im2win_conv2d_grad_weight: input must have the dtype of grad_output"):
        torch.ops.torch_ext.im2win_conv2d_grad_weight(torch.randn(1, 3, 4, 4), x.double(), [3, 2, 3, 3], [1, 1],
                                                      [0, 0], [1, 1], 1)


def test_inference_weight_cache_follows_weight_changes():
    """Unchanged weights reuse packed panels from their second call; an in-place write or a
    new tensor is packed afresh."""
    seed = fresh_seed()
    x = random_tensor((2, 8, 9, 9), torch.float32, "cpu", seed)
    w = random_tensor((12, 8, 3, 3), torch.float32, "cpu", seed + 1)
    torch_ext._C.clear_conv_weight_cache()
    with torch.no_grad():
        first = torch_ext.ops.conv2d(x, w, None, 1, 1)
        assert torch_ext._C.conv_weight_cache_bytes() == 0  # seen once: remembered, not packed
        assert torch.equal(torch_ext.ops.conv2d(x, w, None, 1, 1), first)
        assert torch_ext._C.conv_weight_cache_bytes() > 0
        assert torch.equal(torch_ext.ops.conv2d(x, w, None, 1, 1), first)  # from the cache
        w.mul_(-2.0)  # in place: same tensor, new version
        for _ in range(3):
            assert_close_to_reference(torch_ext.ops.conv2d(x, w, None, 1, 1),
                                      F.conv2d(x.double(), w.double(), None, 1, 1), torch.float32,
                                      "after in-place change", CONV_BOUNDS[torch.float32])
        w2 = w.clone()
        w2[0].zero_()
        for _ in range(3):
            assert_close_to_reference(torch_ext.ops.conv2d(x, w2, None, 1, 1),
                                      F.conv2d(x.double(), w2.double(), None, 1, 1), torch.float32, "new tensor",
                                      CONV_BOUNDS[torch.float32])
    assert torch_ext._C.clear_conv_weight_cache() > 0
    assert torch_ext._C.conv_weight_cache_bytes() == 0


def test_weight_cache_keys_groups_and_skips_inference_tensors():
    """The same weight tensor under another `groups` has another panel layout; weights made under
    torch.inference_mode have no version counter, so they are packed on every call (correct
    after in-place writes there) and never cached."""
    seed = fresh_seed()
    w = random_tensor((8, 4, 3, 3), torch.float32, "cpu", seed)
    torch_ext._C.clear_conv_weight_cache()
    with torch.no_grad():
        for groups in (2, 2, 2, 1, 1):  # the groups=2 panels are cached before groups=1 comes
            x = random_tensor((1, 4 * groups, 7, 7), torch.float32, "cpu", seed + groups)
            assert_close_to_reference(torch_ext.ops.conv2d(x, w, None, 1, 1, 1, groups),
                                      F.conv2d(x.double(), w.double(), None, 1, 1, 1, groups), torch.float32,
                                      f"groups={groups}", CONV_BOUNDS[torch.float32])
    torch_ext._C.clear_conv_weight_cache()
    x = random_tensor((1, 4, 7, 7), torch.float32, "cpu", seed + 3)
    with torch.inference_mode():
        w_inf = w.clone()
        for scale in (1.0, 1.0, 1.0, -3.0):
            w_inf.mul_(scale)  # no version bump on inference tensors
            assert_close_to_reference(torch_ext.ops.conv2d(x, w_inf, None, 1, 1),
                                      F.conv2d(x.double(), w_inf.double(), None, 1, 1), torch.float32,
                                      f"inference tensor, scale {scale}", CONV_BOUNDS[torch.float32])
    assert torch_ext._C.conv_weight_cache_bytes() == 0


def test_training_steps_do_not_fill_the_cache():
    """Each optimizer step writes the weight in place: every version is seen once, never packed."""
    torch_ext._C.clear_conv_weight_cache()
    conv = torch_ext.nn.Im2winConv2d(3, 4, 3)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    for _ in range(3):
        conv(torch.randn(1, 3, 6, 6)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch_ext._C.conv_weight_cache_bytes() == 0
