"""moe_route against float64 references written from the routers of transformers' Mixtral,
Qwen2-MoE and DeepSeek-V3 MoE blocks; any E (60, 128, 257), groups, T = 1, opcheck, compile,
bad inputs."""

import itertools

import pytest
import torch

import torch_ext  # noqa: F401
from torch_ext.ops import moe_route
from torch_ext.testing import fresh_seed, random_tensor


def _top(values, k):
    """topk with a defined tie order (the lower index first), as the op documents: bf16 logits tie."""
    order = values.sort(dim=-1, descending=True, stable=True)
    return order.values[..., :k], order.indices[..., :k]


def _softmax_reference(logits, k, renormalize):
    """Mixtral (renormalize=True) and Qwen2-MoE (norm_topk_prob) routing."""
    weights, ids = _top(torch.softmax(logits.double(), dim=-1), k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _deepseek_v3_reference(logits, k, n_group, topk_group, bias, scaling):
    """DeepSeek-V3: sigmoid scores, groups by the sum of their two best biased scores, top-k
    within the kept groups, weights from the unbiased scores, renormalized and scaled."""
    scores = torch.sigmoid(logits.double())
    choice = scores + bias.double()
    t, e = choice.shape
    group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(dim=-1)
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_scores.topk(topk_group).indices, True)
    choice = choice.masked_fill(~kept.repeat_interleave(e // n_group, dim=1), float("-inf"))
    ids = _top(choice, k)[1]
    weights = scores.gather(1, ids)
    return weights / weights.sum(dim=-1, keepdim=True) * scaling, ids


def _check(weights, ids, ref_weights, ref_ids, what):
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids.long(), ref_ids), what  # descending order, as topk
    torch.testing.assert_close(weights.double(), ref_weights, rtol=2e-6, atol=1e-7, msg=what)


@pytest.mark.parametrize("experts,k", [(8, 2), (60, 4), (128, 8), (257, 8), (3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_routing(experts, k, dtype):
    seed = fresh_seed()
    for tokens in (1, 37):
        logits = random_tensor((tokens, experts), dtype, "cpu", seed + tokens, scale=2.0)
        for renormalize in (True, False):
            weights, ids = moe_route(logits, k, renormalize, "softmax")
            _check(weights, ids, *_softmax_reference(logits, k, renormalize),
                   f"E={experts} k={k} T={tokens} renorm={renormalize} seed {seed}")


@pytest.mark.parametrize("experts,k,groups,topk_group", [(256, 8, 8, 4), (64, 6, 8, 3), (60, 4, 6, 2)])
def test_deepseek_v3_routing(experts, k, groups, topk_group):
    seed = fresh_seed()
    logits = random_tensor((23, experts), torch.float32, "cpu", seed, scale=2.0)
    bias = random_tensor((experts,), torch.float32, "cpu", seed + 1, scale=0.1)
    weights, ids = moe_route(logits, k, True, "sigmoid", groups, topk_group, bias, 2.5)
    _check(weights, ids, *_deepseek_v3_reference(logits, k, groups, topk_group, bias, 2.5),
           f"E={experts} k={k} groups={groups}/{topk_group} seed {seed}")


def _grouped_softmax_reference(logits, k, n_group, topk_group, renormalize, scaling):
    """DeepSeek-V2's group-limited greedy: softmax scores, groups by their best score, top-k
    within the kept groups."""
    scores = logits.double().softmax(-1)
    t, e = scores.shape
    group_scores = scores.view(t, n_group, e // n_group).amax(dim=-1)
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_scores.topk(topk_group).indices, True)
    ids = _top(scores.masked_fill(~kept.repeat_interleave(e // n_group, dim=1), float("-inf")), k)[1]
    weights = scores.gather(1, ids)
    return (weights / weights.sum(dim=-1, keepdim=True) if renormalize else weights) * scaling, ids


@pytest.mark.parametrize("renormalize", [False, True])
def test_grouped_softmax_routing(renormalize):
    seed = fresh_seed()
    logits = random_tensor((50, 64), torch.float32, "cpu", seed, scale=2.0)
    weights, ids = moe_route(logits, 4, renormalize, "softmax", 8, 2, None, 1.5)
    assert all(len(set((row // 8).tolist())) <= 2 for row in ids), f"seed {seed}"
    _check(weights, ids, *_grouped_softmax_reference(logits, 4, 8, 2, renormalize, 1.5), f"seed {seed}")


def test_opcheck_and_compile():
    seed = fresh_seed()
    logits = random_tensor((9, 64), torch.float32, "cpu", seed)
    bias = random_tensor((64,), torch.float32, "cpu", seed + 1, scale=0.1)
    torch.library.opcheck(torch.ops.torch_ext.moe_route, (logits, 6, True, "sigmoid", 8, 4, bias, 2.5))
    torch.library.opcheck(torch.ops.torch_ext.moe_route, (logits, 2, True, "softmax", 1, 1, None, 1.0))
    f = lambda x: moe_route(x * 2, 2)  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(logits), f(logits)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_k=9), r"top_k must be in \[1, 8\]"),
    (dict(top_k=0), r"top_k must be in \[1, 8\]"),
    (dict(scoring="relu"), "scoring must be 'softmax' or 'sigmoid'"),
    (dict(num_expert_group=3), "num_expert_group must be >= 1 and divide"),
    (dict(num_expert_group=4, topk_group=5), r"topk_group must be in \[1, 4\]"),
    (dict(num_expert_group=4, topk_group=1, top_k=3), r"top_k must be in \[1, 2\]"),
    (dict(correction_bias=torch.zeros(7)), r"correction_bias must be \[E\] = \[8\]"),
])
def test_bad_inputs(kwargs, message):
    call = dict(router_logits=torch.randn(4, 8), top_k=2, renormalize=True, scoring="softmax", num_expert_group=1,
                topk_group=1, correction_bias=None, routed_scaling_factor=1.0)
    call.update(kwargs)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.torch_ext.moe_route(*call.values())
    with pytest.raises(RuntimeError, match="router_logits must be"):
        torch.ops.torch_ext.moe_route(torch.randn(8), 2, True, "softmax", 1, 1, None, 1.0)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    """E <= 512 with at most 32 groups: a warp per token (DeepSeek-V3's 256 / 8 / 4 / 8 among
    them); E = 640: the thread-per-token kernel."""
    seed = fresh_seed()
    for dtype, experts in itertools.product((torch.float32, torch.float16, torch.bfloat16), (64, 256, 640)):
        logits = random_tensor((300, experts), dtype, "cpu", seed, scale=2.0)
        bias = random_tensor((experts,), torch.float32, "cpu", seed + 1, scale=0.1)
        for args in ((8, True, "softmax", 1, 1, None, 1.0), (6, True, "sigmoid", 8, 4, bias, 2.5),
                     (8, False, "sigmoid", 8, 4, bias, 2.5)):
            cpu = moe_route(logits, *args)
            gpu_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
            gpu = moe_route(logits.cuda(), *gpu_args)
            # Device expf may differ from the CPU's in the last bit: weights to rounding; ids equal
            # (random logits leave no near ties at that scale).
            assert torch.equal(gpu[1].cpu(), cpu[1]), f"{dtype} E={experts} {args[:5]} seed {seed}"
            torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-5, atol=1e-6)


def _by_expert(weights, ids):
    """Rows reordered by expert id (transformers' DeepSeek router returns them unsorted)."""
    order = ids.long().argsort(dim=-1)
    return weights.gather(1, order).double(), ids.long().gather(1, order)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_equals_transformers_router_modules(family):
    """Against the router modules themselves (transformers 5.x returns (logits, weights, ids);
    4.x's DeepSeek-V3 router returns (ids, weights) and masks dropped groups with 0 instead of
    -inf, the same choice while kept scores are positive; 4.x Mixtral routes inline in the block:
    covered by the reference-formula tests above and by test_hf_moe's patched models)."""
    transformers = pytest.importorskip("transformers")
    seed = fresh_seed()
    torch.manual_seed(seed % 2**31)
    if family == "mixtral":
        module = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
        if not hasattr(module, "MixtralTopKRouter"):
            pytest.skip(f"transformers {transformers.__version__} routes inline")
        config = transformers.MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)
        router = module.MixtralTopKRouter(config)
        route = dict(top_k=2, renormalize=True, scoring="softmax")
    else:
        module = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
        if not hasattr(module, "DeepseekV3TopkRouter"):
            pytest.skip(f"transformers {transformers.__version__} has no DeepseekV3TopkRouter")
        config = transformers.DeepseekV3Config(hidden_size=32, n_routed_experts=64, num_experts_per_tok=6, n_group=8,
                                               topk_group=3, routed_scaling_factor=2.5, norm_topk_prob=True)
        router = module.DeepseekV3TopkRouter(config)
        with torch.no_grad():
            router.e_score_correction_bias.copy_(torch.randn(64) * 0.05)
        route = dict(top_k=6, renormalize=True, scoring="sigmoid", num_expert_group=8, topk_group=3,
                     correction_bias=router.e_score_correction_bias, routed_scaling_factor=2.5)
    with torch.no_grad():
        router.weight.normal_()
        x = random_tensor((17, 32), torch.float32, "cpu", seed)
        routed = router(x)
        if len(routed) == 3:  # transformers 5.x: (logits, weights, ids)
            logits, ref_weights, ref_ids = routed
        else:  # 4.x DeepSeek-V3: (ids, weights), logits not returned
            ref_ids, ref_weights = routed
            logits = torch.nn.functional.linear(x, router.weight)
    weights, ids = moe_route(logits.float(), **route)
    got, want = _by_expert(weights, ids), _by_expert(ref_weights, ref_ids)
    assert torch.equal(got[1], want[1]), f"{family} seed {seed}"
    torch.testing.assert_close(got[0], want[0], rtol=2e-6, atol=1e-7, msg=f"{family} seed {seed}")
