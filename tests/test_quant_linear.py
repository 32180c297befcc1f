"""QuantLinear and quantize_model: outputs vs a float64 reference on the dequantized weight,
act-order, state_dict / dtype / deepcopy, autograd and a LoRA adapter, torch.compile, and a
small transformers Llama quantized end to end."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_ext import reference
from torch_ext.nn import QuantLinear
from torch_ext.quant import from_gptq, quantize_model, quantize_weight
from torch_ext.testing import (RELATIVE_ERROR_BOUNDS, assert_close_to_reference, fresh_seed, poisoned_outputs,
                               random_tensor, relative_error)

# Results of K-long fp32 reductions: a little above the elementwise fp32 bound.
BOUNDS = {**RELATIVE_ERROR_BOUNDS, torch.float32: 1e-5}
DEVICE_DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float16, torch.bfloat16]}
IN_FEATURES, OUT_FEATURES = 100, 37  # neither a multiple of 16: partial tiles and a partial last group
# 1-D, 2-D, 3-D; 51 rows is above the CPU's fused-kernel limit (32 rows): the dequantize + GEMM path.
X_SHAPES = [(IN_FEATURES,), (3, IN_FEATURES), (2, 5, IN_FEATURES), (3, 17, IN_FEATURES)]


dequantized = reference.quant.original_weight


def expected(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """float64 x @ W^T + bias on the CPU, W the module's weight dequantized exactly."""
    y = x.detach().cpu().double() @ dequantized(module.quantized_weight()).t()
    return y if module.bias is None else y + module.bias.detach().cpu().double()


def random_linear(seed: int, dtype: torch.dtype, device: str, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias).to(device=device, dtype=dtype)


def act_order_module(seed: int, bits: int = 8, group_size: int = 32) -> tuple[QuantLinear, torch.Tensor]:
    """A QuantLinear with perm, built the way GPTQ's act-order stores a weight W: the columns
    quantized in a permuted order, perm recording it. Returns the module and W."""
    w = random_tensor((OUT_FEATURES, IN_FEATURES), torch.float32, "cpu", seed)
    perm = torch.randperm(IN_FEATURES, generator=torch.Generator().manual_seed(seed))
    qw = quantize_weight(w[:, perm], bits, group_size)
    qw.perm = perm
    return QuantLinear.from_quantized(qw, random_tensor((OUT_FEATURES,), torch.float32, "cpu", seed + 1)), w


# ---- forward ----

@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("bits", [4, 8])
def test_from_linear_matches_reference(device, bits, group_size, symmetric):
    for dtype in DEVICE_DTYPES[device]:
        seed = fresh_seed()
        linear = random_linear(seed, dtype, device)
        module = QuantLinear.from_linear(linear, bits, group_size, symmetric)
        what = f"{bits}-bit G={group_size} sym={symmetric} {dtype} {device} seed {seed}"
        assert module.scales.dtype == dtype and module.qweight.device.type == device, what
        assert (module.zeros is None) == symmetric and module.perm is None, what
        for shape in X_SHAPES:
            x = random_tensor(shape, dtype, device, seed + 1)
            with poisoned_outputs():
                y = module(x)
            assert y.dtype == dtype and y.shape == (*shape[:-1], OUT_FEATURES), what
            assert_close_to_reference(y, expected(module, x), dtype, f"{what} x {shape}", BOUNDS[dtype])


def test_from_linear_scales_fp32_without_bias():
    module = QuantLinear.from_linear(random_linear(fresh_seed(), torch.float32, "cpu", bias=False))
    assert module.bias is None and module.scales.dtype == torch.float32
    assert "bias" not in module.state_dict()
    assert repr(module) == "QuantLinear(in_features=100, out_features=37, bias=False, bits=4, group_size=128)"


@pytest.mark.parametrize("shape", X_SHAPES)
def test_act_order_computes_the_original_weight(shape):
    """y = x @ W^T for the unpermuted W: exactly against the dequantized weight, and within
    8-bit quantization error of W itself (the wrong direction of perm would be ~1.4 off)."""
    seed = fresh_seed()
    module, w = act_order_module(seed)
    x = random_tensor(shape, torch.float32, "cpu", seed + 2)
    with poisoned_outputs():
        y = module(x)
    assert_close_to_reference(y, expected(module, x), torch.float32, f"seed {seed}", BOUNDS[torch.float32])
    y_float = x.double() @ w.double().t() + module.bias.double()
    assert relative_error(y, y_float) < 2e-2, f"seed {seed}"


def _random_words(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """int32 words with random bits: every one is a valid packing of random 4-bit values."""
    return torch.randint(-(2**31), 2**31, shape, generator=generator, dtype=torch.int64).to(torch.int32)


def _random_scales(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 0.05 + 1e-3).to(torch.float16)


def test_from_gptq_act_order():
    seed = fresh_seed()
    generator = torch.Generator().manual_seed(seed)
    k, n, group_size = 128, 40, 32
    order = torch.randperm(k, generator=generator)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group_size).to(torch.int32)  # desc_act: position in the order // G
    tensors = (_random_words(generator, (k // 8, n)), _random_words(generator, (k // group_size, n // 8)),
               _random_scales(generator, (k // group_size, n)), g_idx)
    module = QuantLinear.from_gptq(*tensors, bits=4, sym=False)
    assert module.perm is not None and module.group_size == group_size, f"seed {seed}"
    # The checkpoint's weight, W[n, k] with group g_idx[k], as test_quant_import checks from_gptq.
    assert torch.equal(dequantized(module.quantized_weight()), dequantized(from_gptq(*tensors, bits=4, sym=False)))
    x = random_tensor((3, k), torch.float32, "cpu", seed)
    assert_close_to_reference(module(x), expected(module, x), torch.float32, f"seed {seed}", BOUNDS[torch.float32])


def test_from_awq():
    seed = fresh_seed()
    generator = torch.Generator().manual_seed(seed)
    k, n, group_size = 128, 40, 32
    bias = random_tensor((n,), torch.float16, "cpu", seed)
    groups = k // group_size
    module = QuantLinear.from_awq(_random_words(generator, (k, n // 8)), _random_words(generator, (groups, n // 8)),
                                  _random_scales(generator, (groups, n)), group_size, bias=bias)
    assert module.zeros is not None and module.bias.dtype == torch.float16 and not module.bias.requires_grad
    x = random_tensor((2, k), torch.float16, "cpu", seed + 1)
    assert_close_to_reference(module(x), expected(module, x), torch.float16, f"seed {seed}")


def test_from_quantized_rejects_a_bias_of_the_wrong_shape():
    qw = quantize_weight(torch.randn(OUT_FEATURES, IN_FEATURES))
    with pytest.raises(ValueError, match=r"bias must have shape \(37,\) \(out_features\), got \(36,\)"):
        QuantLinear.from_quantized(qw, torch.zeros(36))


# ---- state_dict, dtype, copies ----

def _saved_and_loaded(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("symmetric,act_order,bits,group_size", [(False, False, 4, 32), (True, False, 8, -1),
                                                                 (False, True, 8, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip(dtype, symmetric, act_order, bits, group_size, bias):
    seed = fresh_seed()
    if act_order:
        source = act_order_module(seed, bits, group_size)[0].to(dtype)
    else:
        source = QuantLinear.from_linear(random_linear(seed, dtype, "cpu"), bits, group_size, symmetric)
    if not bias:
        source.bias = None
    fresh = QuantLinear(IN_FEATURES, OUT_FEATURES, bits, group_size, bias=bias, symmetric=symmetric,
                        act_order=act_order, dtype=dtype)
    state = _saved_and_loaded(source.state_dict())
    optional = {"zeros": not symmetric, "perm": act_order, "bias": bias}
    expected_keys = {"qweight", "scales"} | {key for key, present in optional.items() if present}
    assert set(state) == expected_keys and set(fresh.state_dict()) == expected_keys
    fresh.load_state_dict(state)
    x = random_tensor((3, IN_FEATURES), dtype, "cpu", seed + 2)
    assert torch.equal(fresh(x), source(x)), f"seed {seed}"
    mismatched = QuantLinear(IN_FEATURES, OUT_FEATURES, bits, group_size, bias=bias, symmetric=not symmetric,
                             act_order=act_order, dtype=dtype)
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key"):
        mismatched.load_state_dict(state)


def test_to_bfloat16_casts_only_floating_tensors():
    seed = fresh_seed()
    module, _ = act_order_module(seed, bits=4)
    qweight, perm = module.qweight.clone(), module.perm.clone()
    module.to(torch.bfloat16)
    assert module.qweight.dtype == torch.int32 and torch.equal(module.qweight, qweight)
    assert module.perm.dtype == torch.int64 and torch.equal(module.perm, perm)
    assert {module.scales.dtype, module.zeros.dtype, module.bias.dtype} == {torch.bfloat16}
    assert isinstance(module.bias, nn.Parameter) and not module.bias.requires_grad
    x = random_tensor((2, 5, IN_FEATURES), torch.bfloat16, "cpu", seed + 2)
    assert_close_to_reference(module(x), expected(module, x), torch.bfloat16, f"seed {seed}")


def test_deepcopy_is_independent():
    seed = fresh_seed()
    module, _ = act_order_module(seed)
    twin = copy.deepcopy(module)
    assert twin.qweight.data_ptr() != module.qweight.data_ptr() and twin.perm.data_ptr() != module.perm.data_ptr()
    x = random_tensor((4, IN_FEATURES), torch.float32, "cpu", seed + 2)
    assert torch.equal(twin(x), module(x))
    twin.scales.mul_(2)
    assert not torch.equal(twin(x), module(x))


def test_empty_module_computes_the_bias():
    """Before load_state_dict every scale is 0: the output is the (zero) bias, never garbage."""
    module = QuantLinear(IN_FEATURES, OUT_FEATURES, group_size=32, act_order=True)
    assert torch.equal(module(torch.randn(2, IN_FEATURES)), torch.zeros(2, OUT_FEATURES))


# ---- autograd ----

def test_grad_matches_linear_on_the_dequantized_weight():
    seed = fresh_seed()
    module, _ = act_order_module(seed, bits=4)
    module.bias.requires_grad_(True)
    x = random_tensor((2, 5, IN_FEATURES), torch.float32, "cpu", seed + 2).requires_grad_()
    grad = random_tensor((2, 5, OUT_FEATURES), torch.float32, "cpu", seed + 3)
    module(x).backward(grad)
    x64 = x.detach().double().requires_grad_()
    b64 = module.bias.detach().double().requires_grad_()
    F.linear(x64, dequantized(module.quantized_weight()), b64).backward(grad.double())
    assert_close_to_reference(x.grad, x64.grad, torch.float32, f"grad x seed {seed}", BOUNDS[torch.float32])
    assert_close_to_reference(module.bias.grad, b64.grad, torch.float32, f"grad bias seed {seed}")


class LoraLinear(nn.Module):
    """A frozen QuantLinear plus a trainable low-rank update: base(x) + up(down(x)). Both adapter
    layers start random: LoRA's zero-initialized `up` would make the first SGD steps nearly flat."""

    def __init__(self, base: QuantLinear, rank: int = 4) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


def test_lora_adapter_trains_on_a_frozen_quantized_layer():
    """Fit a rank-2 change of the layer with SGD: the loss falls at every step (measured over
    60 seeds: to at most 0.82 of the first loss in 5 steps) and the quantized layer is untouched."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = LoraLinear(QuantLinear.from_linear(random_linear(seed, torch.float32, "cpu"), 4, 32))
    frozen = {name: t.clone() for name, t in model.base.state_dict().items()}
    x = random_tensor((64, IN_FEATURES), torch.float32, "cpu", seed + 1)
    delta = (random_tensor((IN_FEATURES, 2), torch.float32, "cpu", seed + 2)
             @ random_tensor((2, OUT_FEATURES), torch.float32, "cpu", seed + 3))
    with torch.no_grad():
        target = model.base(x) + x @ delta * 0.05
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2, "only the adapter trains"
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    losses = []
    for _ in range(5):
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], \
        f"losses {losses} (seed {seed})"
    for name, t in model.base.state_dict().items():
        assert torch.equal(t, frozen[name]), f"{name} changed (seed {seed})"


# ---- torch.compile ----

def test_torch_compile_fullgraph():
    seed = fresh_seed()
    first, _ = act_order_module(seed, bits=4)
    second = QuantLinear.from_linear(nn.Linear(OUT_FEATURES, 24), 8, -1)
    block = nn.Sequential(first, nn.SiLU(), second)
    x = random_tensor((3, IN_FEATURES), torch.float32, "cpu", seed + 2)
    compiled = torch.compile(block, fullgraph=True)
    assert_close_to_reference(compiled(x), block(x), torch.float32, f"seed {seed}", BOUNDS[torch.float32])


# ---- quantize_model ----

def tiny_llama(seed: int, dtype: torch.dtype) -> nn.Module:
    """A 2-layer random Llama; only the config constructor, LlamaForCausalLM(config), .logits
    and eval(), which transformers 4.x and 5.x share."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def logits(model: nn.Module, seed: int) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


# Relative norm error of the logits vs the fp32 float model, measured over 40 seeds of this
# helper (2 x 16 tokens, lm_head kept float): 4-bit G=32: 0.083-0.119 (fp32), 0.082-0.123
# (bf16); 8-bit G=128: 5.6e-3-8.0e-3 (fp32), 7.7e-3-9.8e-3 (bf16, of which ~5.5e-3 is bf16
# itself). Bounds: about 1.6x and 2x the worst seen.
LLAMA_BOUNDS = {(4, 32): 0.2, (8, 128): 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size", sorted(LLAMA_BOUNDS))
def test_quantize_llama(bits, group_size, dtype):
    seed = fresh_seed()
    float_model = tiny_llama(seed, torch.float32)
    model = copy.deepcopy(float_model).to(dtype)
    lm_head = model.lm_head
    linears = count(model, nn.Linear)
    assert quantize_model(model, bits, group_size, skip=lambda name: name == "lm_head") is model
    assert count(model, QuantLinear) == linears - 1 == 14  # q, k, v, o, gate, up, down per layer
    assert model.lm_head is lm_head and count(model, nn.Linear) == 1
    assert all(m.scales.dtype == dtype for m in model.modules() if isinstance(m, QuantLinear))
    error = relative_error(logits(model, seed), logits(float_model, seed))
    assert error < LLAMA_BOUNDS[bits, group_size], f"{bits}-bit G={group_size} {dtype}: {error:.3e} (seed {seed})"


def test_quantize_llama_without_skip_replaces_lm_head():
    seed = fresh_seed()
    float_model = tiny_llama(seed, torch.float32)
    model = quantize_model(copy.deepcopy(float_model), bits=8)
    assert count(model, nn.Linear) == 0 and count(model, QuantLinear) == 15
    assert isinstance(model.lm_head, QuantLinear)
    error = relative_error(logits(model, seed), logits(float_model, seed))
    assert error < LLAMA_BOUNDS[8, 128], f"{error:.3e} (seed {seed})"


def test_quantize_model_shared_and_bare_linears():
    """A layer under two names becomes one QuantLinear; a bare nn.Linear comes back converted."""
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Sequential(nn.Linear(32, 16)))
    quantize_model(model, group_size=32)
    assert isinstance(model[0], QuantLinear) and model[0] is model[2] and isinstance(model[3][0], QuantLinear)
    assert isinstance(quantize_model(nn.Linear(32, 8)), QuantLinear)
    kept = quantize_model(nn.Sequential(nn.Linear(32, 8)), skip=lambda name: name == "0")
    assert type(kept[0]) is nn.Linear


def test_quantize_model_quantizes_fused_moe_experts():
    """method="weight_only" quantizes every FusedMoE's experts in place (the router stays a float
    MoeRouter, a shared expert's Linears become QuantLinear), except under a skipped name (a shared
    FusedMoE under two names, one skipped, stays float); the W8A8 methods leave experts alone."""
    from torch_ext.nn import FusedMoE
    from torch_ext.nn.fused_moe import MoeRouter

    seed = fresh_seed()
    torch.manual_seed(seed)
    moe = FusedMoE(6, 2, 64, 48, shared_expert=nn.Sequential(nn.Linear(64, 32), nn.SiLU(), nn.Linear(32, 64)))
    x = torch.randn(9, 64)
    with torch.no_grad():
        expected = moe(x)
        model = quantize_model(nn.Sequential(copy.deepcopy(moe)), bits=8, group_size=32)
        quantized = model[0]
        assert quantized.quantization == (8, 32) and not hasattr(quantized, "w13")
        assert type(quantized.gate) is MoeRouter
        assert count(quantized, QuantLinear) == 2
        error = relative_error(quantized(x), expected)
        assert error < 2e-2, f"8-bit g32 experts: {error:.3e} (seed {seed})"  # per-group rounding
        shared = copy.deepcopy(moe)
        kept = quantize_model(nn.ModuleDict({"a": shared, "b": shared}), skip=lambda name: name == "b")
        assert kept["a"] is kept["b"] and kept["a"].quantization is None and hasattr(kept["a"], "w13")
        for method in ("int8", "fp8"):
            assert quantize_model(nn.Sequential(copy.deepcopy(moe)), method=method)[0].quantization is None


class _AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(64, 4, batch_first=True)
        self.feed_forward = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))

    def forward(self, x):
        return self.feed_forward(self.attention(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("method", ["weight_only", "int8", "fp8"])
def test_quantize_model_keeps_multihead_attention_working(method):
    """nn.MultiheadAttention reads out_proj.weight itself, nn.TransformerEncoderLayer's fast path
    linear1/linear2.weight: those stay nn.Linear; the other layers are converted and all run."""
    x = random_tensor((2, 5, 64), torch.float32, "cpu", fresh_seed())
    block = _AttentionBlock().eval()
    expected = block(x).detach()
    quantize_model(block, group_size=32, method=method)
    assert type(block.attention.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert type(block.feed_forward[0]) is not nn.Linear
    assert_close_to_reference(block(x), expected.double(), torch.float32, method, 0.1)
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True).eval()
    expected = layer(x).detach()
    quantize_model(layer, group_size=32, method=method)
    assert type(layer.linear1) is nn.Linear and type(layer.linear2) is nn.Linear
    torch.testing.assert_close(layer(x), expected)


def test_bias_follows_the_input_dtype():
    """A module kept in fp32 serves bf16 inputs (its bias converted per call, like the scales)."""
    module = QuantLinear.from_linear(nn.Linear(IN_FEATURES, OUT_FEATURES), group_size=32)
    x = random_tensor((3, IN_FEATURES), torch.bfloat16, "cpu", fresh_seed())
    assert_close_to_reference(module(x), module(x.float()).double(), torch.bfloat16, "bf16 x")
