"""FusedMoE and patch_moe against transformers' own MoE models (small configs, random init,
nothing downloaded): same logits, same gradients, module conversion per block."""

import copy

import pytest
import torch

import torch_ext
from torch_ext.integrations.hf import patch_moe
from torch_ext.testing import (fresh_seed, logits_error, randomize_moe_model_, relative_error,
                               train_step_gradients)

transformers = pytest.importorskip("transformers")

_ATTENTION = dict(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4)
_MLA = dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
            num_key_value_heads=4, first_k_dense_replace=1, intermediate_size=64)


def _model(family: str):
    if family == "mixtral":
        config = transformers.MixtralConfig(**_ATTENTION, intermediate_size=80, num_key_value_heads=2,
                                            num_local_experts=6, num_experts_per_tok=2)
        return transformers.MixtralForCausalLM(config)
    if family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**_ATTENTION, intermediate_size=64, moe_intermediate_size=40,
                                             shared_expert_intermediate_size=56, num_key_value_heads=2,
                                             num_experts=5, num_experts_per_tok=2, norm_topk_prob=False)
        return transformers.Qwen2MoeForCausalLM(config)
    if family == "deepseek_v3":
        if not hasattr(transformers, "DeepseekV3ForCausalLM"):
            pytest.skip(f"transformers {transformers.__version__} has no DeepSeek-V3")
        config = transformers.DeepseekV3Config(**_ATTENTION, **_MLA, moe_intermediate_size=24, n_routed_experts=16,
                                               num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
                                               routed_scaling_factor=2.5)
        return transformers.DeepseekV3ForCausalLM(config)
    if not hasattr(transformers, "DeepseekV2ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no DeepSeek-V2")
    config = transformers.DeepseekV2Config(**_ATTENTION, **_MLA, moe_intermediate_size=24, n_routed_experts=12,
                                           num_experts_per_tok=6, n_shared_experts=2)
    return transformers.DeepseekV2ForCausalLM(config)


def _randomized(family: str, seed: int):
    torch.manual_seed(seed)
    return randomize_moe_model_(_model(family))


FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "deepseek_v2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_gives_stock_logits(family):
    seed = fresh_seed()
    stock = _randomized(family, seed).eval()
    patched = patch_moe(copy.deepcopy(stock))
    assert any(isinstance(m, torch_ext.nn.FusedMoE) for m in patched.modules())
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(seed))
    error = logits_error(stock, patched, ids)
    assert error < 1e-5, f"{family} (seed {seed}): logits differ by {error:.2e}"


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_patched_model_gives_stock_gradients(family):
    """Experts train through fused_moe's backward and the router through the routing weights."""
    seed = fresh_seed()
    stock = _randomized(family, seed).train()
    patched = patch_moe(copy.deepcopy(stock))
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(seed))
    stock_grads = train_step_gradients(stock, patched, ids)
    for name, parameter in patched.named_parameters():
        if name.endswith(("w13", "w2", "gate.weight")) and ".mlp." in name:
            reference = _stock_name(name, family)
            error = relative_error(parameter.grad, stock_grads[reference].grad)
            assert error < 1e-4, f"{family} {name} (seed {seed}): gradient differs by {error:.2e}"


def _stock_name(name: str, family: str) -> str:
    """The stock (transformers 5) parameter that a FusedMoE parameter came from."""
    if transformers.__version__.startswith("4."):
        pytest.skip("transformers 4.x stores experts per module: gradients compared in 5.x")
    return (name.replace(".w13", ".experts.gate_up_proj").replace(".w2", ".experts.down_proj"))


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_block(family):
    seed = fresh_seed()
    model = _randomized(family, seed).eval()
    block = next(m for m in model.modules() if type(m).__name__.endswith(("SparseMoeBlock", "MoE", "Moe")))
    fused = torch_ext.nn.FusedMoE.from_hf(block)
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected, got = block(x), fused(x)
    if isinstance(expected, tuple):  # transformers 4.x Mixtral / Qwen2-MoE: (hidden, router_logits)
        assert isinstance(got, tuple)
        expected, got = expected[0], got[0]
    assert relative_error(got, expected) < 1e-5


def test_patch_moe_without_moe_blocks_raises():
    with pytest.raises(ValueError, match="no supported MoE block"):
        patch_moe(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_fused_moe_module_standalone():
    """Constructor path: routing, shared expert with its sigmoid gate, router gradient."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    shared = torch.nn.Linear(32, 32)
    layer = torch_ext.nn.FusedMoE(6, 2, 32, 24, shared_expert=shared, shared_expert_gate=True)
    x = torch.randn(4, 7, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    for parameter in (layer.gate.weight, layer.w13, layer.w2, shared.weight, layer.shared_expert_gate.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_router_logits_and_aux_loss(family):
    """output_router_logits after patch_moe: the same router logits and load-balancing loss as the
    stock model (transformers finds them through its recorders, which patch_moe points at
    FusedMoE's router), with labels too."""
    seed = fresh_seed()
    stock = _randomized(family, seed).eval()
    patched = patch_moe(copy.deepcopy(stock))
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = stock(ids, labels=ids, output_router_logits=True)
        got = patched(ids, labels=ids, output_router_logits=True)
    assert len(got.router_logits) == len(want.router_logits) > 0
    for a, b in zip(got.router_logits, want.router_logits):
        assert relative_error(a, b) < 1e-5
    assert relative_error(got.aux_loss, want.aux_loss) < 1e-5 and relative_error(got.loss, want.loss) < 1e-5


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_non_reentrant_checkpointing(family):
    """transformers 5's gradient_checkpointing_enable() is non-reentrant: each saved tensor may be
    unpacked once; the patched model trains under it with the stock gradients."""
    seed = fresh_seed()
    stock = _randomized(family, seed).train()
    patched = patch_moe(copy.deepcopy(stock))
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(seed))
    for model in (stock, patched):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(ids, labels=ids).loss.backward()
    stock_grads = dict(stock.named_parameters())
    embed = "model.embed_tokens.weight"
    assert relative_error(dict(patched.named_parameters())[embed].grad, stock_grads[embed].grad) < 1e-4


def test_frozen_experts_stay_frozen_and_quantize_model_keeps_routers():
    """A frozen model stays frozen after patch_moe (4.x expert lists are stacked into new
    parameters); quantize_model after patch_moe quantizes the experts and leaves the routers
    (DeepSeek reads them in fp32)."""
    seed = fresh_seed()
    model = _randomized("deepseek_v3", seed).eval().requires_grad_(False)
    patch_moe(model)
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(ids).logits
        torch_ext.quant.quantize_model(model, group_size=16, skip=lambda name: name == "lm_head")
        moe_blocks = [m for m in model.modules() if isinstance(m, torch_ext.nn.FusedMoE)]
        assert moe_blocks and all(type(m.gate) is torch_ext.nn.fused_moe.MoeRouter for m in moe_blocks)
        assert all(m.quantization == (4, 16) and not hasattr(m, "w13") for m in moe_blocks)
        assert relative_error(model(ids).logits, expected) < 0.2


def test_mixtral_router_jitter():
    """router_jitter_noise: the input is jittered in training (two calls differ), not in eval."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(**_ATTENTION, intermediate_size=80, num_key_value_heads=2, num_local_experts=6,
                                        num_experts_per_tok=2, router_jitter_noise=0.5)
    model = patch_moe(transformers.MixtralForCausalLM(config))
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)
        model.eval()
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_float64_module_routes():
    """A float64 FusedMoE (for checks) routes on fp32 logits and matches its float32 self."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    module = torch_ext.nn.FusedMoE(6, 2, 32, 24)
    x = torch.randn(5, 32)
    expected = module(x)
    assert relative_error(module.double()(x.double()), expected) < 1e-5
