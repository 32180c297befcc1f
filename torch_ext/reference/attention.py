"""References for block-sparse attention and MoBA: dense float64 attention under the expanded mask,
and a naive MoBA written from its description (mean-pooled key blocks, per-token top-k)."""

from __future__ import annotations

import torch


def _per_query_head(t: torch.Tensor, heads_q: int) -> torch.Tensor:
    return t.repeat_interleave(heads_q // t.shape[1], dim=1)


def expand_block_lists(kv_counts: torch.Tensor, kv_indices: torch.Tensor, block_size_q: int, block_size_kv: int,
                       seq_len_q: int, seq_len_kv: int) -> torch.Tensor:
    """bool [B, H, Sq, Sk]: True where the query's block lists the key's block."""
    nk = -(-seq_len_kv // block_size_kv)
    slots = torch.arange(kv_indices.shape[-1], device=kv_indices.device)
    listed = slots < kv_counts.unsqueeze(-1)
    dense = torch.zeros(*kv_counts.shape, nk + 1, dtype=torch.bool, device=kv_indices.device)
    dense.scatter_(-1, torch.where(listed, kv_indices.long(), nk), True)
    dense = dense[..., :nk]
    return (dense.repeat_interleave(block_size_q, dim=2)[:, :, :seq_len_q]
            .repeat_interleave(block_size_kv, dim=3)[..., :seq_len_kv])


def causal_mask(seq_len_q: int, seq_len_kv: int, device=None) -> torch.Tensor:
    """bool [Sq, Sk], bottom-right aligned: query i sees keys j <= i + Sk - Sq."""
    i = torch.arange(seq_len_q, device=device).unsqueeze(1)
    j = torch.arange(seq_len_kv, device=device).unsqueeze(0)
    return j <= i + seq_len_kv - seq_len_q


def token_block_mask(token_blocks: torch.Tensor, block_size_kv: int, seq_len_kv: int) -> torch.Tensor:
    """bool [B, H, Sq, Sk]: True where the query token chose the key's block."""
    nk = -(-seq_len_kv // block_size_kv)
    chosen = torch.zeros(*token_blocks.shape[:3], nk + 1, dtype=torch.bool, device=token_blocks.device)
    chosen.scatter_(-1, torch.where(token_blocks >= 0, token_blocks.long(), nk), True)
    return chosen[..., :nk].repeat_interleave(block_size_kv, dim=3)[..., :seq_len_kv]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention in float64 where mask [B or 1, H or 1, Sq, Sk] is True: (out, lse); a row with
    no visible key gives out 0 and lse -inf."""
    heads_q = q.shape[1]
    q, k, v = q.double(), _per_query_head(k.double(), heads_q), _per_query_head(v.double(), heads_q)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float64).min))
    p = torch.where(mask, p, 0.0)
    return p @ v, lse


def block_sparse_attention(q, k, v, kv_counts, kv_indices, block_size_q, block_size_kv, causal, scale,
                           token_blocks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's (out, lse) by dense float64 attention under the expanded mask."""
    seq_q, seq_kv = q.shape[2], k.shape[2]
    mask = expand_block_lists(kv_counts, kv_indices, block_size_q, block_size_kv, seq_q, seq_kv)
    if causal:
        mask = mask & causal_mask(seq_q, seq_kv, q.device)
    if token_blocks is not None:
        mask = mask & token_block_mask(token_blocks, block_size_kv, seq_kv)
    return masked_attention(q, k, v, mask, scale)


def moba_select(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int, causal: bool) -> torch.Tensor:
    """Naive MoBA gating in float64: int64 [B, Hq, Sq, top_k], block ids ascending, -1 padded."""
    batch, heads_q, seq_q, dim = q.shape
    seq_kv = k.shape[2]
    nk = -(-seq_kv // block_size)
    padded = torch.nn.functional.pad(k.double(), (0, 0, 0, nk * block_size - seq_kv))
    device = q.device
    sizes = torch.full((nk,), block_size, dtype=torch.float64, device=device)
    sizes[-1] = seq_kv - (nk - 1) * block_size
    pooled = padded.view(batch, k.shape[1], nk, block_size, dim).sum(dim=3) / sizes.unsqueeze(-1)
    scores = q.double() @ _per_query_head(pooled, heads_q).transpose(-1, -2)  # [B, Hq, Sq, nk]
    eligible = torch.ones(seq_q, nk, dtype=torch.bool, device=device)
    forced = torch.zeros(seq_q, nk, dtype=torch.bool, device=device)
    if causal:
        position = torch.arange(seq_q, device=device) + seq_kv - seq_q
        current = torch.div(position, block_size, rounding_mode="floor")
        blocks = torch.arange(nk, device=device)
        eligible = (blocks.unsqueeze(0) < current.unsqueeze(1)) & (position >= 0).unsqueeze(1)
        forced = (blocks.unsqueeze(0) == current.unsqueeze(1)) & (position >= 0).unsqueeze(1)
    # Rank: forced first, then eligible by score (ties: the lower block id, by the stable sort).
    rank_key = torch.where(forced, float("inf"), torch.where(eligible, scores, float("nan")))
    order = torch.sort(torch.nan_to_num(rank_key, nan=float("-inf")), dim=-1, descending=True, stable=True).indices
    order = order[..., :top_k]
    usable = (eligible | forced).expand(batch, heads_q, seq_q, nk).gather(-1, order)
    picked = torch.where(usable, order, nk).sort(dim=-1).values
    picked = torch.where(picked == nk, -1, picked)
    if top_k > nk:
        picked = torch.nn.functional.pad(picked, (0, top_k - nk), value=-1)
    return picked


def moba_attention(q, k, v, block_size: int, top_k: int, causal: bool, scale: float) -> torch.Tensor:
    """Naive token-level MoBA: each query attends the key blocks it chose (dense masked, float64)."""
    seq_q, seq_kv = q.shape[2], k.shape[2]
    mask = token_block_mask(moba_select(q, k, block_size, top_k, causal), block_size, seq_kv)
    if causal:
        mask = mask & causal_mask(seq_q, seq_kv, q.device)
    return masked_attention(q, k, v, mask, scale)[0]
