"""The packed layout of weight-only quantized weights, in Python (docs/quant-layout.md).

Mirrors csrc/quant/weight_only_layout.h: `tile_row` / `tile_col` give the (row, column) inside
a 16 x 16 tile of value `slot` of word `word`; `pack_qweight` and `unpack_qweight` convert
between integer weights [N, K] and the int32 tensor [ceil(N/16), ceil(K/16), 8 * bits].
"""

from __future__ import annotations

import functools

import torch

TILE = 16
SUPPORTED_BITS = (4, 8)


def words_per_tile(bits: int) -> int:
    return 8 * bits


def values_per_word(bits: int) -> int:
    return 32 // bits


def tiles_for(extent: int) -> int:
    return (extent + TILE - 1) // TILE


def tile_row(bits: int, word: int, slot: int) -> int:
    return (word % 32) // 4 + 8 * (slot % 2)


def tile_col(bits: int, word: int, slot: int) -> int:
    q = word % 4
    if bits == 4:
        byte = slot // 2
        return 2 * q + 8 * (byte % 2) + byte // 2
    return 2 * q + 8 * (word // 32) + slot // 2


@functools.lru_cache(maxsize=None)
def _tile_index(bits: int) -> torch.Tensor:
    """[words, slots] int64: the flat position row * 16 + col of every (word, slot)."""
    words, slots = words_per_tile(bits), values_per_word(bits)
    index = [[tile_row(bits, w, s) * TILE + tile_col(bits, w, s) for s in range(slots)] for w in range(words)]
    return torch.tensor(index, dtype=torch.int64)


def _to_tiles(values: torch.Tensor) -> torch.Tensor:
    """[Np, Kp] -> [Np/16, Kp/16, 256] (tile rows, tile columns, row-major tile)."""
    n_pad, k_pad = values.shape
    return values.reshape(n_pad // TILE, TILE, k_pad // TILE, TILE).permute(0, 2, 1, 3).reshape(
        n_pad // TILE, k_pad // TILE, TILE * TILE)


def pack_qweight(q: torch.Tensor, bits: int, pad_value: torch.Tensor | int = 0) -> torch.Tensor:
    """Pack unsigned integers q [N, K] (0 <= q < 2**bits) into the kernels' int32 layout.

    `pad_value` fills rows >= N and columns >= K of the last tiles: an int, or an integer
    tensor [N] (one value per row, e.g. the zero point of the row's last group).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    n, k = q.shape
    n_pad, k_pad = tiles_for(n) * TILE, tiles_for(k) * TILE
    padded = torch.zeros((n_pad, k_pad), dtype=torch.int64, device=q.device)
    if isinstance(pad_value, torch.Tensor):
        padded[:n] = pad_value.to(torch.int64).reshape(n, 1)
    else:
        padded.fill_(int(pad_value))
    padded[:n, :k] = q.to(torch.int64)
    tiles = _to_tiles(padded)
    index = _tile_index(bits).to(q.device)
    values = tiles[:, :, index]  # [nt, kt, words, slots]
    shifts = torch.arange(values_per_word(bits), device=q.device, dtype=torch.int64) * bits
    words = (values << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as int32
    return words.to(torch.int32).contiguous()


def unpack_qweight(qweight: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """Inverse of pack_qweight: int64 q [N, K]."""
    n_tiles, k_tiles, words = qweight.shape
    if words != words_per_tile(bits):
        raise ValueError(f"qweight's last dimension must be {words_per_tile(bits)} for {bits}-bit, got {words}")
    shifts = torch.arange(values_per_word(bits), device=qweight.device, dtype=torch.int64) * bits
    values = (qweight.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [nt, kt, words, slots]
    tiles = torch.empty((n_tiles, k_tiles, TILE * TILE), dtype=torch.int64, device=qweight.device)
    tiles[:, :, _tile_index(bits).to(qweight.device).reshape(-1)] = values.reshape(n_tiles, k_tiles, -1)
    full = tiles.reshape(n_tiles, k_tiles, TILE, TILE).permute(0, 2, 1, 3).reshape(n_tiles * TILE, k_tiles * TILE)
    return full[:n, :k]
