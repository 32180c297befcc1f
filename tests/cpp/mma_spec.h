// Independent models of the warp-wide tensor-core instructions, shared by the CUDA-kernel
// simulators in tests/cpp: the PTX ISA fragment maps of mma.m16n8k16 (.f16 / .bf16) and
// mma.m16n8k32 (.s8 / .e4m3), ldmatrix.x4 (.b16, plain and .trans) on the shared-memory model, the
// accumulator -> A reuse of m16n8k16, and the assembly
// of a warp's fragments into the operand matrices of one mma. Written from the PTX ISA, not from
// the kernels' index headers, which the simulators check against them.
#pragma once

#include <cstdint>

#include "sim_common.h"

namespace mma_spec {

// PTX "Matrix Fragments for mma.m16n8k16" (16-bit A / B elements; g = lane / 4, t = lane % 4):
// element i of a lane's A fragment (i < 8) is half i % 2 of register i / 2, row g (+ 8 for
// i = 2, 3, 6, 7), column 2t + i % 2 (+ 8 for i >= 4); element i of B (i < 4) is k 2t + i % 2
// (+ 8 for i >= 2), column g. C / D (4 fp32 / s32 per lane, the same for both shapes): c0, c1
// row g columns 2t, 2t + 1; c2, c3 row g + 8.
struct M16n8k16 {
  static constexpr int kK = 16, kAElems = 8, kBElems = 4, kElemBits = 16;
  static int a_row(int lane, int i) { return lane / 4 + 8 * ((i / 2) % 2); }
  static int a_col(int lane, int i) { return 2 * (lane % 4) + (i % 2) + 8 * (i / 4); }
  static int b_k(int lane, int i) { return 2 * (lane % 4) + (i % 2) + 8 * (i / 2); }
  static int b_n(int lane) { return lane / 4; }
  static int c_row(int lane, int i) { return lane / 4 + 8 * (i / 2); }
  static int c_col(int lane, int i) { return 2 * (lane % 4) + i % 2; }
};

// PTX "Matrix Fragments for mma.m16n8k32" (8-bit A / B elements): element i of a lane's A
// fragment (i < 16) is byte i % 4 of register i / 4, row g (+ 8 for registers 1, 3), k 4t + i % 4
// (+ 16 for registers 2, 3); element i of B (i < 8) is k 4t + i % 4 (+ 16 for register 1),
// column g. C / D as for m16n8k16.
struct M16n8k32 {
  static constexpr int kK = 32, kAElems = 16, kBElems = 8, kElemBits = 8;
  static int a_row(int lane, int i) { return lane / 4 + ((i < 4 || (i >= 8 && i < 12)) ? 0 : 8); }
  static int a_col(int lane, int i) { return 4 * (lane % 4) + (i & 3) + (i >= 8 ? 16 : 0); }
  static int b_k(int lane, int i) { return 4 * (lane % 4) + (i & 3) + (i >= 4 ? 16 : 0); }
  static int b_n(int lane) { return lane / 4; }
  static int c_row(int lane, int i) { return M16n8k16::c_row(lane, i); }
  static int c_col(int lane, int i) { return M16n8k16::c_col(lane, i); }
};

// The raw bits of element i of a fragment (Spec::kElemBits wide, packed low first in 32-bit
// registers).
template <class Spec, int kRegs>
uint32_t element_bits(const uint32_t (&regs)[kRegs], int i) {
  constexpr int kPerReg = 32 / Spec::kElemBits;
  return (regs[i / kPerReg] >> (Spec::kElemBits * (i % kPerReg))) & ((1u << Spec::kElemBits) - 1u);
}

// ldmatrix.x4's row addresses (byte offsets): each 8-address phase (matrix) 16-byte aligned rows
// in 8 distinct 16-byte bank groups of a 128-byte wavefront (conflict-free).
template <typename Address>
void check_ldmatrix_rows(const Address (&address)[32]) {
  for (int j = 0; j < 4; ++j) {
    int seen = 0;
    for (int r = 0; r < 8; ++r) {
      const Address a = address[8 * j + r];
      CHECK(a >= 0 && a % 16 == 0);
      const int group = int((a / 16) % 8);
      CHECK(!(seen & (1 << group)));
      seen |= 1 << group;
    }
  }
}

// ldmatrix.sync.aligned.m8n8.x4.b16: lane l gives the row address of row l % 8 of matrix l / 8;
// register j of lane l = the 16-bit elements 2 (l % 4), +1 (bytes 4 (l % 4)..+3) of row l / 4
// of matrix j. Every byte read must have been written and published (Smem's rules).
inline void ldmatrix_x4(Smem& smem, const int (&address)[32], uint32_t (&regs)[32][4]) {
  check_ldmatrix_rows(address);
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < 4; ++j) regs[lane][j] = smem.read_u32(size_t(address[8 * j + lane / 4] + 4 * (lane % 4)));
}

// ldmatrix.sync.aligned.m8n8.x4.trans.b16: the same row addresses; register j of lane l = the
// 16-bit elements of column l / 4 in rows 2 (l % 4), +1 of matrix j (low half first).
inline void ldmatrix_x4_trans(Smem& smem, const int (&address)[32], uint32_t (&regs)[32][4]) {
  check_ldmatrix_rows(address);
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < 4; ++j) {
      uint16_t lo = 0, hi = 0;
      CHECK(smem.read(size_t(address[8 * j + 2 * (lane % 4)] + 2 * (lane / 4)), &lo, 2));
      CHECK(smem.read(size_t(address[8 * j + 2 * (lane % 4) + 1] + 2 * (lane / 4)), &hi, 2));
      regs[lane][j] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
}

// ldmatrix.x4 of the B fragments of two adjacent n8 tiles: registers 0, 1 (matrices 0, 1) of each
// lane are its fragment of tile `lo`, registers 2, 3 that of tile `hi`.
inline void ldmatrix_x4_b_pair(Smem& smem, const int (&address)[32], uint32_t (&lo)[32][2], uint32_t (&hi)[32][2]) {
  uint32_t regs[32][4];
  ldmatrix_x4(smem, address, regs);
  for (int lane = 0; lane < 32; ++lane) {
    lo[lane][0] = regs[lane][0];
    lo[lane][1] = regs[lane][1];
    hi[lane][0] = regs[lane][2];
    hi[lane][1] = regs[lane][3];
  }
}

// The accumulator -> A-operand reuse of m16n8k16 (a 16 x 8n product in accumulators, rounded,
// becomes the A operand of the next mma without leaving registers, as FlashAttention does with P):
// register r (elements 2 r, 2 r + 1) of k16 step kk's A fragment must be elements
// elem_of(r, 0), elem_of(r, 1) of n8 tile tile_of(kk, r) of the same lane, for kk < 4.
template <class TileOf, class ElemOf>
void check_accumulator_to_a(const TileOf& tile_of, const ElemOf& elem_of) {
  using F = M16n8k16;
  for (int lane = 0; lane < 32; ++lane)
    for (int kk = 0; kk < 4; ++kk)
      for (int r = 0; r < 4; ++r)
        for (int half = 0; half < 2; ++half) {
          const int i = 2 * r + half, tile = tile_of(kk, r), e = elem_of(r, half);
          CHECK(F::a_row(lane, i) == F::c_row(lane, e));
          CHECK(16 * kk + F::a_col(lane, i) == 8 * tile + F::c_col(lane, e));
        }
}

// The A (16 x K) and B (K x 8) operands of one mma assembled from the warp's fragments by the
// Spec maps: a_value(lane, i) / b_value(lane, i) is element i of the lane's A / B fragment. Every
// operand element must come from exactly one (lane, i).
template <class Spec, typename V, class AValue, class BValue>
void assemble_operands(V (&A)[16][Spec::kK], V (&B)[Spec::kK][8], const AValue& a_value, const BValue& b_value) {
  int setA[16][Spec::kK] = {}, setB[Spec::kK][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < Spec::kAElems; ++i) {
      A[Spec::a_row(lane, i)][Spec::a_col(lane, i)] = a_value(lane, i);
      ++setA[Spec::a_row(lane, i)][Spec::a_col(lane, i)];
    }
    for (int i = 0; i < Spec::kBElems; ++i) {
      B[Spec::b_k(lane, i)][Spec::b_n(lane)] = b_value(lane, i);
      ++setB[Spec::b_k(lane, i)][Spec::b_n(lane)];
    }
  }
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < Spec::kK; ++k) CHECK(setA[r][k] == 1);
  for (int k = 0; k < Spec::kK; ++k)
    for (int n = 0; n < 8; ++n) CHECK(setB[k][n] == 1);
}

// init + the K products of accumulator i of `lane` (row c_row of A, column c_col of B), added in
// k order in S.
template <class Spec, typename S, typename V>
S accumulator_dot(const V (&A)[16][Spec::kK], const V (&B)[Spec::kK][8], int lane, int i, S init) {
  S s = init;
  for (int k = 0; k < Spec::kK; ++k) s += S(A[Spec::c_row(lane, i)][k]) * S(B[k][Spec::c_col(lane, i)]);
  return s;
}

// d = c + the exact sum of the products (double: exact for the simulators' operands), one fp32
// rounding per accumulator.
template <class Spec>
void mma_round_once(float (&c)[32][4], const double (&A)[16][Spec::kK], const double (&B)[Spec::kK][8]) {
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) c[lane][i] = float(accumulator_dot<Spec>(A, B, lane, i, double(c[lane][i])));
}

// PTX ISA, wgmma "Matrix Descriptor Format": bits 0-13 start address >> 4, 16-29 leading byte
// offset >> 4, 32-45 stride byte offset >> 4, 49-51 base offset, 62-63 swizzle (1 = 128-byte).
// "Shared Memory Matrix Layout", K-major operand with 128-byte swizzling: row r of the operand
// (M or N) and byte k (< 32) of the instruction's K slice lie at start + (r / 8) SBO +
// (r % 8) 128 + k before swizzling; the swizzle XORs address bits 4-6 with bits 7-9 (so rows of
// an 8-row, 1024-byte-aligned atom see their 16-byte chunks permuted). Shared-memory address.
inline uint32_t wgmma_sw128_address(uint64_t desc, int r, int k) {
  CHECK((desc >> 62) == 1 && ((desc >> 49) & 7) == 0);
  CHECK(r >= 0 && k >= 0 && k < 32);
  const uint32_t start = uint32_t(desc & 0x3FFF) << 4;
  const uint32_t stride = uint32_t((desc >> 32) & 0x3FFF) << 4;
  const uint32_t linear = start + uint32_t(r / 8) * stride + uint32_t(r % 8) * 128 + uint32_t(k);
  return linear ^ (((linear >> 7) & 7) << 4);
}

// The same for an MN-major operand (16-bit B of wgmma read transposed, imm-trans-b = 1) with the
// 128-byte swizzle, from the canonical layout ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO)) in
// 16-byte units (T elements each): byte n_byte of the N extent (< 2 N) lies in 64-element column
// block n_byte / 128, LBO apart; k row kr (< 16) of the instruction's K slice in 8-row group
// kr / 8, SBO apart, row kr % 8 of it 128 bytes apart; then the same swizzle.
inline uint32_t wgmma_sw128_mn_address(uint64_t desc, int kr, int n_byte) {
  CHECK((desc >> 62) == 1 && ((desc >> 49) & 7) == 0);
  CHECK(kr >= 0 && kr < 16 && n_byte >= 0);
  const uint32_t start = uint32_t(desc & 0x3FFF) << 4;
  const uint32_t leading = uint32_t((desc >> 16) & 0x3FFF) << 4;
  const uint32_t stride = uint32_t((desc >> 32) & 0x3FFF) << 4;
  const uint32_t linear =
      start + uint32_t(n_byte / 128) * leading + uint32_t(kr / 8) * stride + uint32_t(kr % 8) * 128 + uint32_t(n_byte % 128);
  return linear ^ (((linear >> 7) & 7) << 4);
}

// PTX ISA, wgmma "Register Fragments" of a 16-bit A operand in registers (m64nNk16, 4 registers
// of 2 elements per thread): warp w of the warpgroup holds rows 16 w .. 16 w + 15, element i
// (< 8) of lane l in row l / 4 (+ 8 for i = 2, 3, 6, 7), column 2 (l % 4) + i % 2 (+ 8 for
// i >= 4): per warp, mma.m16n8k16's A fragment.
struct WgmmaA16 {
  static int a_row(int warp, int lane, int i) { return 16 * warp + lane / 4 + 8 * ((i / 2) % 2); }
  static int a_col(int lane, int i) { return 2 * (lane % 4) + (i % 2) + 8 * (i / 4); }
};

// PTX ISA, wgmma "Register Fragments" of the m64nN accumulator D (128 threads): warp w of the
// warpgroup holds rows 16 w .. 16 w + 15; lane l's register i lies in row 16 w + l / 4 + 8 for
// i % 4 in {2, 3}, column 8 (i / 4) + 2 (l % 4) + i % 2.
struct Wgmma64 {
  static int d_row(int warp, int lane, int i) { return 16 * warp + lane / 4 + ((i % 4) >= 2 ? 8 : 0); }
  static int d_col(int lane, int i) { return 8 * (i / 4) + 2 * (lane % 4) + (i % 2); }
};

}  // namespace mma_spec
