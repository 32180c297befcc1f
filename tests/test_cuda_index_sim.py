"""The CUDA kernels' index math, checked on the CPU: compiles the torch-free simulators in
tests/cpp/ (im2win: csrc/conv/im2win_index.h; weight-only GEMM: csrc/quant/weight_only_cuda_index.h;
W8A8: csrc/quant/w8a8_cuda_index.h, the Hopper w8a8_wgmma_index.h and the copy-engine pipeline of
csrc/common/wgmma_cluster_pipeline.h; MoE routing:
csrc/moe/routing_warp.h; fused MoE: csrc/moe/fused_moe_cuda_index.h and the Hopper
fused_moe_wgmma_index.h; block-sparse attention / MoBA:
csrc/attention/block_sparse_attention_cuda_index.h)
and runs them on fresh random problems."""

import shutil
import subprocess
from pathlib import Path

import pytest

from torch_ext.testing import fresh_seed

ROOT = Path(__file__).resolve().parents[1]


def _build_simulator(tmp_path_factory, name: str) -> Path:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    binary = tmp_path_factory.mktemp("sim") / name
    subprocess.run([compiler, "-O2", "-std=c++20", f"-I{ROOT / 'csrc'}", str(ROOT / f"tests/cpp/{name}.cpp"),
                    "-o", str(binary)], check=True, capture_output=True, text=True)
    return binary


def _run_simulator(binary: Path) -> None:
    seed = fresh_seed()
    out = subprocess.run([str(binary), "200", str(seed)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"seed {seed}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "all ok" in out.stdout


def test_im2win_cuda_kernels_simulated(tmp_path_factory):
    _run_simulator(_build_simulator(tmp_path_factory, "im2win_cuda_sim"))


def test_weight_only_cuda_kernels_simulated(tmp_path_factory):
    """Register dequantization bit for bit, and linear_kernel / split-K / dequantize_kernel run
    thread by thread on random problems against an exact reference (csrc/quant/weight_only_cuda_index.h)."""
    _run_simulator(_build_simulator(tmp_path_factory, "weight_only_cuda_sim"))


def test_w8a8_cuda_kernels_simulated(tmp_path_factory):
    """quantize_kernel and the tensor-core mm_kernel (int8 and e4m3 fp8) run thread by thread on
    random problems (odd sizes, unaligned operands, both tile configs) against exact references,
    with the mma.m16n8k32 / m16n8k16 / ldmatrix fragment maps taken from the PTX ISA
    (csrc/quant/w8a8_cuda_index.h); fp8 within an fp32-summation error bound, bitwise where every
    partial sum is exact, NaN operands propagating; and the Hopper wgmma kernel on the same
    problems, its operands read through its shared-memory descriptors with a model of the PTX
    descriptor and 128-byte swizzle (csrc/quant/w8a8_wgmma_index.h)."""
    _run_simulator(_build_simulator(tmp_path_factory, "w8a8_cuda_sim"))


@pytest.fixture(scope="module")
def cluster_pipeline_sim(tmp_path_factory) -> Path:
    return _build_simulator(tmp_path_factory, "wgmma_cluster_pipeline_sim")


def test_wgmma_cluster_pipeline_simulated(cluster_pipeline_sim):
    """The barrier protocol of the Hopper GEMMs' copy-engine pipeline (2-CTA clusters, B halves
    multicast; csrc/common/wgmma_cluster_pipeline.h) on a model of mbarriers, TMA copies, each
    gathering producer thread's cp.async groups and arrivals (fused_moe) and wgmma batches in
    random interleavings at random agent speeds, on the clusters the kernels meet (W8A8: a CTA
    past M; fused_moe: B shared or not, a CTA with no k work beside a working one): no deadlock,
    every batch reads its own iteration's published data, no copy lands in a stage still being
    read, every wait, arrival and byte count on the phase it means, nothing reaches a CTA that
    has left the cluster barrier; the clusters' tiles cover every tile once."""
    _run_simulator(cluster_pipeline_sim)


def test_wgmma_cluster_pipeline_simulator_catches_mutations(cluster_pipeline_sim):
    """Every deliberate error the simulator can put into its model of the kernels (a gatherer
    publishing unlanded chunks, one arrival short, a wrong parity, an idle CTA counted as sharing
    B, a CTA leaving before cluster_sync, ...) makes one of its checks fail."""
    names = subprocess.run([str(cluster_pipeline_sim), "1", "1", "list"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert names
    seed = fresh_seed()
    for name in names:
        out = subprocess.run([str(cluster_pipeline_sim), "200", str(seed), name], capture_output=True, text=True,
                             timeout=600)
        assert out.returncode != 0 and "CHECK failed" in out.stderr, f"mutation {name} not caught (seed {seed})"


def test_moe_route_warp_kernel_simulated(tmp_path_factory):
    """route_warp_kernel's lane-parallel routing (csrc/moe/routing_warp.h) with 32 emulated lanes
    and the device's xor butterfly, against the serial moe::route_token on random problems (E up to
    512, up to 32 groups, planted ties): the same experts in order, weights to rounding."""
    _run_simulator(_build_simulator(tmp_path_factory, "moe_route_cuda_sim"))


def test_fused_moe_cuda_kernels_simulated(tmp_path_factory):
    """The device expert plans (count / scan / scatter, warps emulated) equal
    moe::build_expert_plan_host; the grouped GEMMs (gate / up + activation, then one launch per
    combine rank) and the decode kernels run thread by thread on random routings (odd H and I,
    E = 1, 7, 60, k up to 8, idle experts, one hot expert, T = 1) with the mma.m16n8k16 / ldmatrix
    fragment maps taken from the PTX ISA: act bit for bit, out within an fp32 bound, every element
    written once (csrc/moe/fused_moe_cuda_index.h); the same for the Hopper grouped GEMMs (128-row
    plans, wgmma operands through the descriptor / swizzle model, the gate / up accumulator
    pairing: csrc/moe/fused_moe_wgmma_index.h)."""
    _run_simulator(_build_simulator(tmp_path_factory, "fused_moe_cuda_sim"))


def test_block_sparse_attention_cuda_kernels_simulated(tmp_path_factory):
    """fwd_kernel, bwd_delta / bwd_dq / bwd_dkdv_kernel and moba_pool / moba_select_kernel run warp by
    warp and lane by lane on random small problems (odd Sq != Sk, causal, GQA, block_kv 16..128,
    head_dim 64 / 128, shared or per-head lists in any order, empty lists, MoBA token selection,
    strided layouts) through a pipeline-checking shared-memory model, ldmatrix and mma.m16n8k16
    models from the PTX maps, against double references; the transposed dK/dV walk visits every
    listed pair once; moba_select equals a full sort of the same scores, ties and causal forcing
    included (csrc/attention/block_sparse_attention_cuda_index.h)."""
    _run_simulator(_build_simulator(tmp_path_factory, "block_sparse_attention_cuda_sim"))


def test_moba_gather_cuda_plan_simulated(tmp_path_factory):
    """MoBA's key-block-major forward: the device plan (pair ranks with the atomics' order shuffled,
    chunked scans into list offsets and tile records, the fill), each tile's gathered rows, one-block
    key walk, live slices and masked online softmax, and the merge of a token's partials in slot
    order, against token-level MoBA in double (csrc/attention/moba_gather_index.h)."""
    _run_simulator(_build_simulator(tmp_path_factory, "moba_gather_cuda_sim"))
