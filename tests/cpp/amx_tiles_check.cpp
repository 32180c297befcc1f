// The emulated AMX tiles (csrc/common/cpu/amx_tiles.h) against the instruction set reference's
// definitions, and, where this CPU has AMX-INT8, against the hardware tiles: the emulation is what
// the CPU tests run the AMX kernels on, so it has to be the hardware's semantics.
//   usage: amx_tiles_check TRIALS SEED   (prints "all ok" and how many trials ran on hardware)
#define TORCH_EXT_CPU_ISA amx_check
#include "common/cpu/amx_tiles.h"

#include <cstdio>
#include <random>
#include <stdexcept>
#include <vector>

#include "sim_common.h"

using namespace torch_ext::cpu::amx_check::amx;

namespace {

// One random TDPBSSD problem: C (M x N int32) += A (M x 4K int8) B (K x 4N int8), with the
// operands at random row strides; tile shapes below the 16 x 64-byte maximum included.
struct DotProblem {
  int m, k, n;
  int64_t a_stride, b_stride, c_stride;  // bytes
  std::vector<int8_t> a, b;
  std::vector<int32_t> c;  // c_stride / 4 int32 per row; the columns past n are a canary

  explicit DotProblem(std::mt19937& rng) {
    m = 1 + int(rng() % 16);
    k = 1 + int(rng() % 16);
    n = 1 + int(rng() % 16);
    a_stride = 4 * k + 4 * int(rng() % 8);
    b_stride = 4 * n + 4 * int(rng() % 8);
    c_stride = 4 * (n + 1 + int(rng() % 4));
    a.resize(size_t(m * a_stride));
    b.resize(size_t(k * b_stride));
    c.resize(size_t(m * c_stride / 4));
    std::uniform_int_distribution<int> byte(-128, 127), sum(-1000000, 1000000);
    for (auto& v : a) v = int8_t(byte(rng));
    for (auto& v : b) v = int8_t(byte(rng));
    for (auto& v : c) v = sum(rng);
  }
  TileConfig config() const {
    TileConfig t;
    t.set(1, m, 4 * n);  // C
    t.set(2, m, 4 * k);  // A
    t.set(5, k, 4 * n);  // B
    return t;
  }
  // The definition: C[i][j] += sum_{kk < K} sum_{e < 4} A[i][4 kk + e] * B[kk][4 j + e].
  std::vector<int32_t> reference() const {
    std::vector<int32_t> out = c;
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) {
        int64_t s = out[size_t(i * c_stride / 4 + j)];
        for (int kk = 0; kk < k; ++kk)
          for (int e = 0; e < 4; ++e) s += int64_t(a[size_t(i * a_stride + 4 * kk + e)]) * b[size_t(kk * b_stride + 4 * j + e)];
        out[size_t(i * c_stride / 4 + j)] = int32_t(s);
      }
    return out;
  }
};

template <typename Tiles>
std::vector<int32_t> run(const DotProblem& p) {
  std::vector<int32_t> c = p.c;
  Tiles::configure(p.config());
  Tiles::template load<1>(c.data(), p.c_stride);
  Tiles::template load<2>(p.a.data(), p.a_stride);
  Tiles::template load<5>(p.b.data(), p.b_stride);
  Tiles::template dot_s8s8<1, 2, 5>();
  Tiles::template store<1>(c.data(), p.c_stride);
  Tiles::release();
  return c;
}

template <typename F>
bool faults(const F& f) {
  try {
    f();
  } catch (const std::logic_error&) {
    return true;
  }
  return false;
}

void check_faults() {
  using T = EmulatedTiles;
  T::release();
  CHECK(faults([] { T::zero<0>(); }));  // before LDTILECFG
  TileConfig t;
  t.set(0, 16, 64);
  t.set(1, 16, 64);
  t.set(2, 16, 32);  // B with 16 rows, but 4K = 64 bytes of A need 16 rows of 64 bytes
  T::configure(t);
  CHECK(faults([] { T::zero<3>(); }));  // unconfigured tile
  CHECK(faults([] { T::dot_s8s8<0, 1, 2>(); }));  // B's row bytes differ from C's
  t.set(2, 8, 64);
  T::configure(t);
  CHECK(faults([] { T::dot_s8s8<0, 1, 2>(); }));  // A's 64 bytes need 16 rows of B, not 8
  t.set(2, 16, 64);
  T::configure(t);
  CHECK(!faults([] { T::dot_s8s8<0, 1, 2>(); }));
  TileConfig bad = t;
  bad.palette_id = 2;
  CHECK(faults([&] { T::configure(bad); }));
  bad = t;
  bad.set(4, 17, 64);
  CHECK(faults([&] { T::configure(bad); }));
  bad = t;
  bad.set(4, 4, 0);
  CHECK(faults([&] { T::configure(bad); }));
  T::release();
}

// A store writes the configured rows x bytes only; a load of a narrower shape reads zeros past it.
void check_partial_shapes() {
  using T = EmulatedTiles;
  TileConfig t;
  t.set(0, 3, 8);
  T::configure(t);
  std::vector<int32_t> src(64, 7), dst(64, -1);
  T::load<0>(src.data(), 64);
  T::store<0>(dst.data(), 64);
  for (int r = 0; r < 4; ++r)
    for (int col = 0; col < 16; ++col) CHECK(dst[size_t(r * 16 + col)] == (r < 3 && col < 2 ? 7 : -1));
  T::release();
}

}  // namespace

int main(int argc, char** argv) {
  const int trials = argc > 1 ? std::atoi(argv[1]) : 200;
  std::mt19937 rng(argc > 2 ? uint32_t(std::strtoul(argv[2], nullptr, 10)) : 1u);
  check_faults();
  check_partial_shapes();
  const bool hardware = torch_ext::cpu::amx_int8_detected();
  int on_hardware = 0;
  for (int trial = 0; trial < trials; ++trial) {
    const DotProblem p(rng);
    const std::vector<int32_t> expected = p.reference();
    CHECK(run<EmulatedTiles>(p) == expected);
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
    if (hardware) {
      CHECK(run<HardwareTiles>(p) == expected);
      ++on_hardware;
    }
#endif
  }
  std::printf("all ok (%d trials, %d on hardware tiles)\n", trials, on_hardware);
  return 0;
}
