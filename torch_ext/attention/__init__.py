"""Block-sparse attention masks: which key blocks each query block attends (see docs/attention.md)."""

from torch_ext.attention.mask import BlockSparseMask

__all__ = ["BlockSparseMask"]
