"""Large CPU outputs on transparent huge pages (csrc/common/cpu/huge_pages.h): the span of whole
2 MiB pages an allocation may advise, and the advice taking effect where the kernel offers THP."""

import os
import pathlib
import subprocess
import sys

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


def _mapping_fields(address):
    """The smaps fields (name -> text) of the mapping of this process holding address."""
    fields, mapping = {}, False
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):
            if mapping:
                break
            start, end = (int(part, 16) for part in head.split("-"))
            mapping = start <= address < end
        elif mapping:
            fields[head.rstrip(":")] = rest.strip()
    return fields


def _thp_fallbacks():
    """Huge-page faults the kernel could not serve so far (memory too fragmented, or over the
    cgroup's charge)."""
    counts = dict(line.split() for line in pathlib.Path("/proc/vmstat").read_text().splitlines())
    return int(counts.get("thp_fault_fallback", 0)) + int(counts.get("thp_fault_fallback_charge", 0))


def _advised_output():
    """A 36 MiB fp32 dequantized weight made with the advice on: (its mapping's smaps fields, the
    THP fallbacks the kernel counted while it was written)."""
    qw = quantize_weight(random_tensor((2304, 4096), torch.float32, "cpu", fresh_seed()), 4, 128)
    before = _C.cpu_huge_pages()
    try:
        _C.set_cpu_huge_pages(True)
        fallbacks = _thp_fallbacks()
        w = qw.dequantize()
        return _mapping_fields(w.data_ptr() + w.nbytes // 2), _thp_fallbacks() - fallbacks
    finally:
        _C.set_cpu_huge_pages(before)


def _needs_thp():
    if _thp_mode() not in ("madvise", "always"):
        pytest.skip(f"transparent huge pages are {_thp_mode()!r} here")


def test_large_dequantized_weight_is_advised_for_huge_pages():
    """The advice is ours to give: the output's mapping carries the "hg" flag."""
    _needs_thp()
    fields, _ = _advised_output()
    assert "hg" in fields["VmFlags"].split(), f"the output is not advised: VmFlags {fields['VmFlags']}"


def test_advice_takes_effect_in_a_fresh_process():
    """Where the kernel offers THP, the advised output gets huge pages, or the kernel counts that it
    could not find free ones. In a fresh process: late in CI's long test process the advised
    mapping got neither (no THP fault attempted, no fallback counted; alone the test passed), so
    the kernel's side is checked where earlier tests left no state behind."""
    _needs_thp()
    script = ("import tests.test_huge_pages as t; fields, fallbacks = t._advised_output(); "
              "print(int(fields['AnonHugePages'].split()[0]) * 1024, fallbacks)")
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    huge_bytes, fallbacks = (int(v) for v in done.stdout.split()[-2:])
    assert huge_bytes >= HUGE or fallbacks > 0, f"no huge page and no fallback counted: {done.stdout}"
