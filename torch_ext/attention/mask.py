"""BlockSparseMask: per query block, the list of key blocks it attends, as the ops take it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _lists_from_dense(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [..., n] -> (counts int32 [...], indices int32 [..., n]): the True positions first, ascending."""
    counts = dense.sum(dim=-1, dtype=torch.int32)
    indices = dense.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return counts, indices


def _dense_from_lists(counts: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """(counts [...], indices [..., max]) -> bool [..., n]: True at the first counts entries."""
    listed = torch.arange(indices.shape[-1], device=indices.device) < counts.unsqueeze(-1)
    dense = torch.zeros(*counts.shape, n + 1, dtype=torch.bool, device=indices.device)
    dense.scatter_(-1, torch.where(listed, indices.long(), n), True)
    return dense[..., :n]


@dataclass(frozen=True)
class BlockSparseMask:
    """Which key blocks each query block attends.

    ``kv_counts`` int32 ``[B, H, nq]`` and ``kv_indices`` int32 ``[B, H, nq, max_kv]``: query block
    ``i`` (rows ``[i * block_size_q, (i + 1) * block_size_q)``) attends the key blocks
    ``kv_indices[b, h, i, :kv_counts[b, h, i]]`` (distinct ids in ``[0, nk)``, any order). ``B`` or
    ``H`` may be 1 to share one list over the batch or the heads. The mask works at block
    granularity; the causal diagonal is the op's ``causal`` flag.
    """

    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    block_size_q: int
    block_size_kv: int
    seq_len_q: int
    seq_len_kv: int

    def __post_init__(self) -> None:
        nq = self.num_blocks_q
        if self.kv_counts.dim() != 3 or self.kv_counts.shape[2] != nq:
            raise ValueError(f"BlockSparseMask: kv_counts must be [B, H, nq={nq}], got {tuple(self.kv_counts.shape)}")
        if self.kv_indices.dim() != 4 or self.kv_indices.shape[:3] != self.kv_counts.shape:
            raise ValueError(f"BlockSparseMask: kv_indices must be [B, H, nq, max_kv] with kv_counts' "
                             f"{tuple(self.kv_counts.shape)} first, got {tuple(self.kv_indices.shape)}")
        if self.kv_counts.dtype != torch.int32 or self.kv_indices.dtype != torch.int32:
            raise ValueError("BlockSparseMask: kv_counts and kv_indices must be int32")

    @property
    def num_blocks_q(self) -> int:
        return _ceil_div(self.seq_len_q, self.block_size_q)

    @property
    def num_blocks_kv(self) -> int:
        return _ceil_div(self.seq_len_kv, self.block_size_kv)

    def to(self, device: torch.device | str) -> BlockSparseMask:
        return BlockSparseMask(self.kv_counts.to(device), self.kv_indices.to(device), self.block_size_q,
                               self.block_size_kv, self.seq_len_q, self.seq_len_kv)

    def to_dense(self) -> torch.Tensor:
        """bool ``[B, H, nq, nk]``: True where query block i attends key block j."""
        return _dense_from_lists(self.kv_counts, self.kv_indices, self.num_blocks_kv)

    def density(self) -> float:
        """Listed fraction of the (query block, key block) pairs (a host synchronization)."""
        return self.kv_counts.sum().item() / (self.kv_counts.numel() * self.num_blocks_kv)

    @classmethod
    def from_dense(cls, block_mask: torch.Tensor, block_size_q: int, block_size_kv: int, seq_len_q: int | None = None,
                   seq_len_kv: int | None = None) -> BlockSparseMask:
        """From bool ``[B, H, nq, nk]``; sequence lengths default to whole blocks."""
        if block_mask.dim() != 4:
            raise ValueError(f"BlockSparseMask.from_dense: block_mask must be [B, H, nq, nk], got {tuple(block_mask.shape)}")
        nq, nk = block_mask.shape[2:]
        counts, indices = _lists_from_dense(block_mask.bool())
        return cls(counts, indices.contiguous(), block_size_q, block_size_kv,
                   nq * block_size_q if seq_len_q is None else seq_len_q,
                   nk * block_size_kv if seq_len_kv is None else seq_len_kv)

    @classmethod
    def from_block_predicate(cls, keep, seq_len_q: int, seq_len_kv: int, block_size_q: int, block_size_kv: int,
                             device=None) -> BlockSparseMask:
        """From ``keep(first_row, last_row, first_key, last_key) -> bool`` evaluated on block index grids."""
        nq, nk = _ceil_div(seq_len_q, block_size_q), _ceil_div(seq_len_kv, block_size_kv)
        first_row = torch.arange(nq, device=device).unsqueeze(1) * block_size_q
        last_row = (first_row + block_size_q - 1).clamp_max(seq_len_q - 1)
        first_key = torch.arange(nk, device=device).unsqueeze(0) * block_size_kv
        last_key = (first_key + block_size_kv - 1).clamp_max(seq_len_kv - 1)
        dense = keep(first_row, last_row, first_key, last_key).expand(nq, nk)
        return cls.from_dense(dense[None, None], block_size_q, block_size_kv, seq_len_q, seq_len_kv)

    @classmethod
    def causal(cls, seq_len_q: int, seq_len_kv: int, block_size_q: int = 64, block_size_kv: int = 64,
               device=None) -> BlockSparseMask:
        """The key blocks causal attention (bottom-right aligned) touches; use with ``causal=True``."""
        offset = seq_len_kv - seq_len_q
        return cls.from_block_predicate(lambda r0, r1, k0, k1: k0 <= r1 + offset, seq_len_q, seq_len_kv,
                                        block_size_q, block_size_kv, device)

    @classmethod
    def sliding_window(cls, seq_len_q: int, seq_len_kv: int, window: int, block_size_q: int = 64,
                       block_size_kv: int = 64, device=None) -> BlockSparseMask:
        """The key blocks holding keys ``[i + Sk - Sq - window + 1, i + Sk - Sq]`` of any query i in the
        block (block granularity: whole blocks at the edges; ``causal=True`` cuts the upper one)."""
        offset = seq_len_kv - seq_len_q
        return cls.from_block_predicate(
            lambda r0, r1, k0, k1: (k0 <= r1 + offset) & (k1 >= r0 + offset - window + 1),
            seq_len_q, seq_len_kv, block_size_q, block_size_kv, device)

    @classmethod
    def from_flex_block_mask(cls, block_mask) -> BlockSparseMask:
        """From a FlexAttention ``BlockMask``: its partial and full key blocks, both attended whole
        (the mask_mod inside partial blocks is not applied: exact for block-aligned masks, and for
        causal masks with ``causal=True``)."""
        seq_len_q, seq_len_kv = block_mask.seq_lengths
        block_q, block_kv = block_mask.BLOCK_SIZE
        nk = _ceil_div(seq_len_kv, block_kv)
        dense = _dense_from_lists(block_mask.kv_num_blocks, block_mask.kv_indices, nk)
        if block_mask.full_kv_num_blocks is not None:
            dense = dense | _dense_from_lists(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, nk)
        return cls.from_dense(dense, block_q, block_kv, seq_len_q, seq_len_kv)
