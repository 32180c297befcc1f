"""scripts/compare_ptx.py: the normalization that lets two compilations of a refactored .cu be
compared kernel by kernel (register numbers, branch labels and the path hash of anonymous
namespaces do not count; instructions do)."""

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "compare_ptx", Path(__file__).resolve().parents[1] / "scripts" / "compare_ptx.py")
compare_ptx = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(compare_ptx)

_PTX = """
.visible .entry _ZN2ns_GLOBAL__N__{hash}_4fileE6kernelEv(
	.param .u64 _ZN2ns_GLOBAL__N__{hash}_4fileE6kernelEv_param_0
)
{{
	// a comment
	.loc 1 2 3
	mov.u32 	%r{a}, %tid.x;
	add.s32 	%r{b}, %r{a}, 1;
	@%p{c} bra 	$L__BB0_{d};
$L__BB0_{d}:
	ret;
}}
"""


def _kernels(**names):
    return compare_ptx.kernel_instructions(_PTX.format(**names))


def test_renumbering_and_path_hashes_compare_equal():
    first = _kernels(hash="1175755b", a=1, b=2, c=3, d=4)
    second = _kernels(hash="b5ec34c7", a=7, b=9, c=1, d=12)
    assert list(first) == list(second) and len(first) == 1
    assert first == second


def test_a_changed_instruction_is_seen():
    first = _kernels(hash="1", a=1, b=2, c=3, d=4)
    changed = compare_ptx.kernel_instructions(_PTX.format(hash="1", a=1, b=2, c=3, d=4).replace("add.s32", "sub.s32"))
    (name,) = first
    assert first[name] != changed[name]
    assert sum((first[name] - changed[name]).values()) == 1
