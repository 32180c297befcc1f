"""Large CPU outputs on transparent huge pages (csrc/common/cpu/huge_pages.h): the span of whole
2 MiB pages an allocation may advise, and the advice taking effect where the kernel offers THP."""

import pathlib

import pytest
import torch

import torch_ext  # noqa: F401  (registers the ops)
from torch_ext import _C
from torch_ext.quant import quantize_weight
from torch_ext.testing import fresh_seed, random_tensor

HUGE = 2 << 20


@pytest.mark.parametrize("address, size", [(0, 4 * HUGE), (4096, 4 * HUGE), (HUGE - 64, HUGE + 128), (HUGE + 1, HUGE),
                                           (3 * HUGE, HUGE - 1), (5 * HUGE - 4096, 2 * HUGE + 8192)])
def test_span_is_the_whole_huge_pages_inside(address, size):
    begin, length = _C._testing.huge_page_span(address, size)
    first = -(-address // HUGE) * HUGE
    last = (address + size) // HUGE * HUGE
    assert (begin, length) == ((first, last - first) if last > first else (0, 0))


def _thp_mode():
    path = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.exists():
        return None
    text = path.read_text()
    return text[text.index("[") + 1:text.index("]")]


def _huge_bytes_at(address):
    """AnonHugePages (bytes) of the mapping of this process holding address."""
    mapping = None
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            mapping = start <= address < end
        elif mapping and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    return 0


def test_large_dequantized_weight_lands_on_huge_pages():
    if _thp_mode() not in ("madvise", "always"):
        pytest.skip(f"transparent huge pages are {_thp_mode()!r} here")
    qw = quantize_weight(random_tensor((2304, 4096), torch.float32, "cpu", fresh_seed()), 4, 128)  # 36 MiB fp32
    before = _C.cpu_huge_pages()
    try:
        _C.set_cpu_huge_pages(True)
        w = qw.dequantize()
        assert _huge_bytes_at(w.data_ptr() + w.nbytes // 2) >= HUGE, "the advised output holds no huge page"
        # (Without the advice nothing is asserted: in a long process the allocation can land in
        # memory an earlier advice or khugepaged already backed with huge pages.)
    finally:
        _C.set_cpu_huge_pages(before)
