"""torch_ext.ops wrappers skip the Python autograd kernel only when no gradient can flow: the
results are the same, outputs carry a grad_fn exactly when an input requires grad, and
gradients still reach every input that asks for one."""

import pytest
import torch

import torch_ext  # noqa: F401
from torch_ext.ops import silu_and_mul, weight_only_linear
from torch_ext.quant import quantize_weight
from torch_ext.testing import fresh_seed, random_tensor


def _linear_args(seed):
    x = random_tensor((3, 64), torch.float32, "cpu", seed)
    q = quantize_weight(random_tensor((32, 64), torch.float32, "cpu", seed + 1), bits=4, group_size=32)
    return x, (q.qweight, q.scales, q.zeros, None, q.bits, q.group_size)


@pytest.mark.parametrize("grad_mode", ["no_grad", "no_input_requires_grad", "inference_mode"])
def test_no_gradient_path_equals_the_plain_call(grad_mode):
    seed = fresh_seed()
    x, rest = _linear_args(seed)
    plain = torch.ops.torch_ext.weight_only_linear(x, *rest)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(grad_mode, torch.enable_grad)
    with context():
        y = weight_only_linear(x, *rest)
        z = silu_and_mul(x)
    assert torch.equal(y, plain) and torch.equal(z, torch.ops.torch_ext.silu_and_mul(x))
    assert y.grad_fn is None and not y.requires_grad and z.grad_fn is None


def test_gradients_still_flow_when_asked():
    seed = fresh_seed()
    x, rest = _linear_args(seed)
    x.requires_grad_()
    y = weight_only_linear(x, *rest)
    assert y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():  # grad mode off wins over requires_grad
        assert weight_only_linear(x, *rest).grad_fn is None

