"""silu_and_mul and its backward: reference, autograd, opcheck, torch.compile, bad inputs."""

import pytest
import torch

import torch_ext
from torch_ext import reference
from torch_ext.testing import (assert_close_to_reference, check_against_reference, fresh_seed, poisoned_outputs,
                               random_tensor)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Leading shapes x d: one token, odd sizes (tails of every vector width), a wide decode
# row, a 3-D batch, and an LLM-sized hidden dimension.
SHAPES = [((1,), 1), ((1,), 7), ((3,), 37), ((5,), 1000), ((2, 3), 129), ((1,), 14336), ((64,), 4096)]
SHAPE_IDS = ["x".join(map(str, lead)) + f"x{d}" for lead, d in SHAPES]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("lead,d", SHAPES, ids=SHAPE_IDS)
def test_forward_matches_reference(device, dtype, lead, d):
    check_against_reference(
        torch_ext.ops.silu_and_mul, reference.silu_and_mul,
        lambda seed: (random_tensor((*lead, 2 * d), dtype, device, seed, scale=3.0),),
        dtype, f"silu_and_mul {lead}x{2 * d}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("lead,d", SHAPES[:5], ids=SHAPE_IDS[:5])
def test_backward_matches_reference(device, dtype, lead, d):
    check_against_reference(
        torch.ops.torch_ext.silu_and_mul_backward, reference.silu_and_mul_backward,
        lambda seed: (random_tensor((*lead, d), dtype, device, seed),
                      random_tensor((*lead, 2 * d), dtype, device, seed + 1, scale=3.0)),
        dtype, f"silu_and_mul_backward {lead}x{2 * d}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_every_cpu_isa_path(cpu_isa, dtype):
    """Each compiled ISA copy (vector body and tail) against the reference, fwd and bwd."""
    for d in (1, 15, 16, 17, 100, 1031):
        check_against_reference(
            torch_ext.ops.silu_and_mul, reference.silu_and_mul,
            lambda seed: (random_tensor((3, 2 * d), dtype, "cpu", seed, scale=3.0),), dtype, f"{cpu_isa} d={d}")
        check_against_reference(
            torch.ops.torch_ext.silu_and_mul_backward, reference.silu_and_mul_backward,
            lambda seed: (random_tensor((3, d), dtype, "cpu", seed), random_tensor((3, 2 * d), dtype, "cpu", seed + 1)),
            dtype, f"{cpu_isa} backward d={d}")


def test_extreme_values(device, cpu_isa):
    """Large |x| saturates the sigmoid correctly; inf and NaN propagate as in float math."""
    x = torch.tensor([[-200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]],
                     device=device)
    out = torch_ext.ops.silu_and_mul(x)
    assert_close_to_reference(out, reference.silu_and_mul(x.double().cpu()), torch.float32, "extreme")
    nan_in = torch.tensor([[float("nan"), 1.0]], device=device)
    assert torch.isnan(torch_ext.ops.silu_and_mul(nan_in)).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_non_contiguous_inputs(device, dtype):
    """Row-strided views run in place; a transposed input is copied, both give the same values."""
    seed = fresh_seed()
    base = random_tensor((6, 2 * 64 + 10), dtype, device, seed)
    strided = base[:, 5:5 + 128]  # last dim contiguous, row stride 138
    transposed = random_tensor((2 * 33, 4), dtype, device, seed + 1).t()
    for x in (strided, transposed, base[::2, :128]):
        with poisoned_outputs():
            out = torch_ext.ops.silu_and_mul(x)
        assert out.is_contiguous()
        assert_close_to_reference(out, reference.silu_and_mul(x.double().cpu()), dtype, f"strided {tuple(x.stride())}")


def test_empty_inputs(device):
    for shape in ((0, 8), (4, 0), (2, 0, 6)):
        x = torch.empty(shape, device=device)
        out = torch_ext.ops.silu_and_mul(x)
        assert out.shape == (*shape[:-1], shape[-1] // 2)


def test_float64_supported_for_checks(device):
    check_against_reference(torch_ext.ops.silu_and_mul, reference.silu_and_mul,
                            lambda seed: (random_tensor((4, 18), torch.float64, device, seed),),
                            torch.float64, "float64")


def test_gradcheck(device):
    x = random_tensor((3, 2 * 9), torch.float64, device, fresh_seed()).requires_grad_()
    assert torch.autograd.gradcheck(torch_ext.ops.silu_and_mul, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autograd_matches_reference(device, dtype):
    seed = fresh_seed()
    x = random_tensor((5, 2 * 70), dtype, device, seed).requires_grad_()
    grad = random_tensor((5, 70), dtype, device, seed + 1)
    torch_ext.ops.silu_and_mul(x).backward(grad)
    x64 = x.detach().double().cpu().requires_grad_()
    reference.silu_and_mul(x64).backward(grad.double().cpu())
    assert_close_to_reference(x.grad, x64.grad, dtype, "x.grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    x = random_tensor((4, 2 * 24), dtype, device, fresh_seed()).requires_grad_()
    torch.library.opcheck(torch.ops.torch_ext.silu_and_mul.default, (x,))
    grad = random_tensor((4, 24), dtype, device, fresh_seed())
    torch.library.opcheck(torch.ops.torch_ext.silu_and_mul_backward.default, (grad, x.detach()))


def test_torch_compile_fullgraph(device):
    def mlp_gate(x, w):
        return torch_ext.ops.silu_and_mul(x @ w) * 2.0

    seed = fresh_seed()
    x = random_tensor((8, 32), torch.float32, device, seed).requires_grad_()
    w = random_tensor((32, 2 * 16), torch.float32, device, seed + 1)
    compiled = torch.compile(mlp_gate, fullgraph=True, backend="aot_eager")
    out = compiled(x, w)
    assert_close_to_reference(out, 2.0 * reference.silu_and_mul(x.detach().double().cpu() @ w.double().cpu()),
                              torch.float32, "compiled")
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_torch_compile_inductor(device):
    compiled = torch.compile(lambda x: torch_ext.ops.silu_and_mul(x) + 1.0, fullgraph=True)
    x = random_tensor((4, 2 * 8), torch.float32, device, fresh_seed())
    assert_close_to_reference(compiled(x), reference.silu_and_mul(x.double().cpu()) + 1.0, torch.float32, "inductor")


def test_module():
    x = random_tensor((2, 2 * 5), torch.float32, "cpu", fresh_seed())
    assert torch.equal(torch_ext.nn.SiluAndMul()(x), torch_ext.ops.silu_and_mul(x))


@pytest.mark.parametrize("x,message", [
    (torch.ones(3, 4, dtype=torch.int32), "x must have dtype torch.float32, torch.float16, torch.bfloat16 or "
                                          "torch.float64, got torch.int32"),
    (torch.ones(3, 5), r"x must have an even last dimension \[..., 2\*d\], got shape \[3, 5\]"),
    (torch.tensor(1.0), "x must have at least 1 dimension"),
])
def test_bad_input_messages(x, message):
    with pytest.raises(RuntimeError, match=f"torch_ext.silu_and_mul: {message}"):
        torch_ext.ops.silu_and_mul(x)


def test_bad_backward_inputs():
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[3, 4\].*got \[3, 8\]"):
        torch.ops.torch_ext.silu_and_mul_backward(torch.randn(3, 8), x)
    with pytest.raises(RuntimeError, match="grad_out must have the dtype of x .torch.float32., got torch.float16"):
        torch.ops.torch_ext.silu_and_mul_backward(torch.randn(3, 4, dtype=torch.float16), x)


@pytest.mark.cuda
def test_mixed_devices_rejected():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with pytest.raises(RuntimeError, match="grad_out must be on the device of x"):
        torch.ops.torch_ext.silu_and_mul_backward(torch.randn(3, 4), torch.randn(3, 8, device="cuda"))
