"""fused_moe as transformers 5's "torch_ext" experts implementation (use_fused_experts), against the
stock eager experts of each MoE family (small configs, random init, nothing downloaded): same
logits, same gradients, fused_moe really called, unsupported experts falling back."""

import copy

import pytest
import torch

import torch_ext
import torch_ext.ops.moe
from torch_ext.integrations.hf import register_fused_experts, use_fused_experts
from torch_ext.testing import (fresh_seed, logits_error, randomize_moe_model_, relative_error,
                               train_step_gradients)

transformers = pytest.importorskip("transformers")
_TRANSFORMERS_4 = transformers.__version__.startswith("4.")

_VOCAB = 96
_SMALL = dict(vocab_size=_VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_SCORE_BIASED = dict(first_k_dense_replace=0, n_shared_experts=1, moe_intermediate_size=24, num_experts_per_tok=4,
                     n_routed_experts=16, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
# family: (config class, model class, config arguments); every one a transformers 5 MoE whose
# experts module takes an experts implementation.
_FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=80, num_local_experts=6, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=64, moe_intermediate_size=40, shared_expert_intermediate_size=56,
                       num_experts=5, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=64, moe_intermediate_size=40, num_experts=10, num_experts_per_tok=3,
                       norm_topk_prob=True, head_dim=12)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=40, num_experts=8, num_experts_per_tok=2)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(intermediate_size=64, **_SCORE_BIASED)),
    "dots1": ("Dots1Config", "Dots1ForCausalLM", dict(intermediate_size=64, **_SCORE_BIASED)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=64, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=12, num_key_value_heads=4, **_SCORE_BIASED)),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM",
                   dict(intermediate_size=40, num_local_experts=8, num_experts_per_tok=3, head_dim=12)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(intermediate_size=64, moe_intermediate_size=40, shared_expert_intermediate_size=56,
                        num_experts=6, num_experts_per_tok=2, head_dim=12, linear_key_head_dim=8,
                        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                        layer_types=["linear_attention", "full_attention"])),
}


def _model(family: str, seed: int, dtype=torch.float32):
    config_class, model_class, arguments = _FAMILIES[family]
    if _TRANSFORMERS_4:
        pytest.skip("transformers 4.x has no experts implementation interface")
    if not hasattr(transformers, model_class):
        pytest.skip(f"transformers {transformers.__version__} has no {model_class}")
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**{**_SMALL, **arguments})
    config._experts_implementation = "eager"
    return randomize_moe_model_(getattr(transformers, model_class)(config)).to(dtype)


class _CountFusedMoe:
    """Counts the calls of torch_ext.ops.moe.fused_moe while installed."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = torch_ext.ops.moe.fused_moe

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(torch_ext.ops.moe, "fused_moe", counted)


def _ids(seed: int, shape=(2, 13)) -> torch.Tensor:
    return torch.randint(0, _VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_fused_experts_give_stock_logits(family, monkeypatch):
    seed = fresh_seed()
    stock = _model(family, seed).eval()
    fused = use_fused_experts(copy.deepcopy(stock))
    assert fused.config._experts_implementation == "torch_ext"
    counter = _CountFusedMoe(monkeypatch)
    error = logits_error(stock, fused, _ids(seed))
    assert counter.calls >= 1, f"{family}: fused_moe was not called"
    assert error < 1e-5, f"{family} (seed {seed}): logits differ by {error:.2e}"


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe", "mixtral"])
def test_fused_experts_give_stock_gradients(family):
    """The model's own parameters train through fused_moe's backward (no copies)."""
    seed = fresh_seed()
    stock = _model(family, seed).train()
    fused = use_fused_experts(copy.deepcopy(stock))
    stock_grads = train_step_gradients(stock, fused, _ids(seed, (2, 9)))
    checked = 0
    for name, parameter in fused.named_parameters():
        if name.endswith(("gate_up_proj", "down_proj", "gate.weight")) and ".mlp." in name:
            error = relative_error(parameter.grad, stock_grads[name].grad)
            assert error < 1e-4, f"{family} {name} (seed {seed}): gradient differs by {error:.2e}"
            checked += 1
    assert checked >= 3


def test_bf16_model_close_to_float64_experts():
    """bf16: the fused experts' error against a float64 run of the same model is no larger than
    the stock bf16 experts' (both route identically; the combine sums in fp32)."""
    seed = fresh_seed()
    reference = _model("qwen3_moe", seed, torch.float64).eval()
    stock = _model("qwen3_moe", seed, torch.bfloat16).eval()
    fused = use_fused_experts(copy.deepcopy(stock))
    ids = _ids(seed)
    with torch.no_grad():
        want = reference(ids).logits
        stock_error = relative_error(stock(ids).logits.double(), want)
        fused_error = relative_error(fused(ids).logits.double(), want)
    assert fused_error < max(2 * stock_error, 2e-2), (fused_error, stock_error)


def test_registered_name_works_from_config():
    """After register_fused_experts(), a model built with experts_implementation="torch_ext" uses it
    (what from_pretrained(..., experts_implementation="torch_ext") does)."""
    seed = fresh_seed()
    stock = _model("olmoe", seed).eval()
    config = copy.deepcopy(stock.config)
    config._experts_implementation = register_fused_experts()
    model = type(stock)(config).eval()
    model.load_state_dict(stock.state_dict())
    assert model.config._experts_implementation == "torch_ext"
    with torch.no_grad():
        assert relative_error(model(_ids(seed)).logits, stock(_ids(seed)).logits) < 1e-5


def test_experts_module_compiles_fullgraph():
    seed = fresh_seed()
    model = use_fused_experts(_model("qwen3_moe", seed).eval())
    experts = next(m for m in model.modules() if type(m).__name__ == "Qwen3MoeExperts")
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(7, 48, generator=generator)
    index = torch.stack([torch.randperm(10, generator=generator)[:3] for _ in range(7)])
    weights = torch.rand(7, 3, generator=generator)
    with torch.no_grad():
        expected = experts(hidden, index, weights)
        got = torch.compile(experts, fullgraph=True)(hidden, index, weights)
    assert relative_error(got, expected) < 1e-6


def test_unsupported_experts_fall_back_with_a_warning():
    """GPT-OSS's experts (biases, transposed weights, a clamped gate) run transformers' eager
    forward: a warning names the reason, the logits are the stock ones."""
    if _TRANSFORMERS_4 or not hasattr(transformers, "GptOssForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no GPT-OSS")
    seed = fresh_seed()
    torch.manual_seed(seed)
    config = transformers.GptOssConfig(**{**_SMALL, "num_attention_heads": 4}, intermediate_size=40, head_dim=12,
                                       num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    stock = randomize_moe_model_(transformers.GptOssForCausalLM(config)).eval()
    fused = use_fused_experts(copy.deepcopy(stock))
    ids = _ids(seed)
    with torch.no_grad(), pytest.warns(UserWarning, match="GptOssExperts .*eager experts forward"):
        got = fused(ids).logits
    with torch.no_grad():
        assert relative_error(got, stock(ids).logits) < 1e-6


def test_transformers4_points_to_patch_moe():
    if not _TRANSFORMERS_4:
        pytest.skip("transformers 5.x has the experts implementation interface")
    with pytest.raises(RuntimeError, match="has no experts implementation interface.*patch_moe"):
        register_fused_experts()


def test_model_without_experts_raises():
    if _TRANSFORMERS_4:
        pytest.skip("transformers 4.x has no experts implementation interface")
    with pytest.raises(ValueError, match="no experts module"):
        use_fused_experts(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.cuda
def test_fused_experts_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    seed = fresh_seed()
    stock = _model("qwen3_moe", seed, torch.bfloat16).eval().cuda()
    fused = use_fused_experts(copy.deepcopy(stock))
    reference = _model("qwen3_moe", seed, torch.float64).eval()
    ids = _ids(seed)
    with torch.no_grad():
        want = reference(ids).logits
        stock_error = relative_error(stock(ids.cuda()).logits.cpu().double(), want)
        fused_error = relative_error(fused(ids.cuda()).logits.cpu().double(), want)
    assert fused_error < max(2 * stock_error, 2e-2), (fused_error, stock_error)
