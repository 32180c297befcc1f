"""patch_attention on a small transformers Llama (random init, nothing downloaded)."""

import copy

import pytest
import torch

from torch_ext.integrations.hf import patch_attention
from torch_ext.testing import fresh_seed, relative_error

transformers = pytest.importorskip("transformers")


def _llama(seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("mode,options", [("block_sparse", dict(block_size=32)),
                                          ("moba", dict(block_size=16, top_k=64))],
                         ids=["block_sparse_density_100", "moba_every_block"])
def test_full_density_gives_stock_logits(mode, options):
    """Every block attended (block-sparse at 100% density; MoBA with top_k >= blocks): the stock
    model's logits (a length that is not a multiple of the blocks, GQA)."""
    seed = fresh_seed()
    stock = _llama(seed)
    patched = patch_attention(copy.deepcopy(stock), mode, **options)
    ids = torch.randint(0, 96, (2, 150), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        error = relative_error(patched(ids).logits, stock(ids).logits)
    assert error < 1e-5, f"{mode} (seed {seed}): {error:.2e}"


def test_moba_sparsity_changes_the_result_and_decode_falls_back():
    seed = fresh_seed()
    stock = _llama(seed)
    patched = patch_attention(copy.deepcopy(stock), "moba", block_size=16, top_k=2)
    ids = torch.randint(0, 96, (1, 120), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert relative_error(patched(ids).logits, stock(ids).logits) > 1e-3  # 2 of 8 blocks per token
        # The first 32 tokens (2 blocks) see every block they may: the stock result there.
        assert relative_error(patched(ids[:, :32]).logits, stock(ids[:, :32]).logits) < 1e-5
        generated = patched.generate(ids[:, :20], attention_mask=torch.ones(1, 20, dtype=torch.long),
                                     max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 23)  # min_new_tokens: a random model may otherwise emit EOS first


@pytest.mark.parametrize("mode,options", [("block_sparse", dict(block_size=32)),
                                          ("moba", dict(block_size=16, top_k=64))])
def test_the_models_scaling_is_used(mode, options):
    """Both modes take the attention module's `scaling` (here not 1/sqrt(D)): equal to SDPA with it."""
    from torch_ext.integrations.hf_attention import _attention_function

    seed = fresh_seed()
    attention = _attention_function(mode, options["block_size"], options.get("top_k", 8), None)
    q, k, v = (torch.randn(1, 2, 40, 32, generator=torch.Generator().manual_seed(seed + i)) for i in range(3))
    module = torch.nn.Module()
    module.is_causal = True
    out = attention(module, q, k, v, None, scaling=0.5)[0]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5).transpose(1, 2)
    assert relative_error(out, expected) < 1e-5, mode


def test_attention_dropout_and_softcap_are_refused():
    """Training with attention dropout, or soft-capping, would silently compute another function."""
    from torch_ext.integrations.hf_attention import _attention_function

    attention = _attention_function("block_sparse", 32, 8, None)
    q = torch.randn(1, 2, 40, 32)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="no attention dropout, got dropout=0.1"):
        attention(module, q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="does not support softcap"):
        attention(module, q, q, q, None, softcap=30.0)


def test_padding_falls_back_to_dense():
    seed = fresh_seed()
    stock = _llama(seed)
    patched = patch_attention(copy.deepcopy(stock), "block_sparse")
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :7] = 0  # left padding
    with torch.no_grad():
        error = relative_error(patched(ids, attention_mask=mask).logits[:, 8:], stock(ids, attention_mask=mask).logits[:, 8:])
    assert error < 1e-5


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        patch_attention(_llama(0), "dense")
