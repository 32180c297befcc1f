// The emulated AMX tiles (csrc/common/cpu/amx_tiles.h) against the instruction set reference's
// definitions (TDPBSSD, TDPBF16PS, loads, stores, faults), and, where this CPU has AMX, against
// the hardware tiles: the emulation is what
// the CPU tests run the AMX kernels on, so it has to be the hardware's semantics.
//   usage: amx_tiles_check TRIALS SEED   (prints "all ok" and how many trials ran on hardware)
#define TORCH_EXT_CPU_ISA amx_check
#include "common/cpu/amx_tiles.h"

#include <cmath>
#include <cstdio>
#include <type_traits>
#include <random>
#include <stdexcept>
#include <vector>

#include "sim_common.h"

using namespace torch_ext::cpu::amx_check::amx;

namespace {

float bf16_value(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &wide, 4);
  return f;
}

// One random dot-product problem: C (M x N int32 or fp32) += A (M x 4K bytes) B (K x 4N bytes),
// with the operands at random row strides; tile shapes below the 16 x 64-byte maximum included.
// For bf16 the operands are random finite bf16 values and C random floats.
template <TileDot kDot>
struct DotProblem {
  using Acc = std::conditional_t<kDot == TileDot::kS8S8, int32_t, float>;
  int m, k, n;
  int64_t a_stride, b_stride, c_stride;  // bytes
  std::vector<uint8_t> a, b;
  std::vector<Acc> c;  // c_stride / 4 values per row; the columns past n are a canary

  explicit DotProblem(std::mt19937& rng) {
    m = 1 + int(rng() % 16);
    k = 1 + int(rng() % 16);
    n = 1 + int(rng() % 16);
    a_stride = 4 * k + 4 * int(rng() % 8);
    b_stride = 4 * n + 4 * int(rng() % 8);
    c_stride = 4 * (n + 1 + int(rng() % 4));
    a = random_bytes(rng, m * a_stride);
    b = random_bytes(rng, k * b_stride);
    c.resize(size_t(m * c_stride / 4));
    std::uniform_int_distribution<int> sum(-1000000, 1000000);
    for (auto& v : c) v = kDot == TileDot::kS8S8 ? Acc(sum(rng)) : Acc(sum(rng) * 1e-4f);
  }
  static std::vector<uint8_t> random_bytes(std::mt19937& rng, int64_t count) {
    std::vector<uint8_t> bytes(static_cast<size_t>(count));
    if constexpr (kDot == TileDot::kS8S8) {
      for (auto& v : bytes) v = uint8_t(rng());
    } else {  // bf16 values in [-4, 4): sign, exponent 125..129, a random mantissa
      for (size_t i = 0; i + 1 < bytes.size(); i += 2) {
        const uint16_t bits = uint16_t((rng() & 0x8000u) | ((125u + rng() % 5u) << 7) | (rng() & 0x7Fu));
        std::memcpy(&bytes[i], &bits, 2);
      }
    }
    return bytes;
  }
  TileConfig config() const {
    TileConfig t;
    t.set(1, m, 4 * n);  // C
    t.set(2, m, 4 * k);  // A
    t.set(5, k, 4 * n);  // B
    return t;
  }
  // The definitions (TDPBSSD, TDPBF16PS).
  std::vector<Acc> reference() const {
    std::vector<Acc> out = c;
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) {
        Acc& s = out[size_t(i * c_stride / 4 + j)];
        for (int kk = 0; kk < k; ++kk) {
          const uint8_t* a_group = &a[size_t(i * a_stride + 4 * kk)];
          const uint8_t* b_group = &b[size_t(kk * b_stride + 4 * j)];
          if constexpr (kDot == TileDot::kS8S8) {
            int64_t dot = 0;
            for (int e = 0; e < 4; ++e) dot += int64_t(int8_t(a_group[e])) * int8_t(b_group[e]);
            s = int32_t(s + dot);
          } else {
            for (int e = 0; e < 4; e += 2) {
              uint16_t x, y;
              std::memcpy(&x, a_group + e, 2);
              std::memcpy(&y, b_group + e, 2);
              s += bf16_value(x) * bf16_value(y);
            }
          }
        }
      }
    return out;
  }
};

template <TileDot kDot, typename Tiles>
std::vector<typename DotProblem<kDot>::Acc> run(const DotProblem<kDot>& p) {
  std::vector<typename DotProblem<kDot>::Acc> c = p.c;
  Tiles::configure(p.config());
  Tiles::template load<1>(c.data(), p.c_stride);
  Tiles::template load<2>(p.a.data(), p.a_stride);
  Tiles::template load<5>(p.b.data(), p.b_stride);
  Tiles::template dot<kDot, 1, 2, 5>();
  Tiles::template store<1>(c.data(), p.c_stride);
  Tiles::release();
  return c;
}

// The hardware's fp32 sums may round differently from the definition's sequence (and flush
// denormals, which these values never reach): within a few ulps of the sum of magnitudes.
bool close(const std::vector<float>& got, const std::vector<float>& want, const DotProblem<TileDot::kBf16>& p) {
  for (size_t i = 0; i < got.size(); ++i) {
    const float bound = 1e-5f * (std::fabs(want[i]) + 16.0f * float(4 * p.k));
    if (!(std::fabs(got[i] - want[i]) <= bound)) return false;
  }
  return true;
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
  CHECK(faults([] { T::dot<TileDot::kS8S8, 0, 1, 2>(); }));  // B's row bytes differ from C's
  t.set(2, 8, 64);
  T::configure(t);
  CHECK(faults([] { T::dot<TileDot::kS8S8, 0, 1, 2>(); }));  // A's 64 bytes need 16 rows of B, not 8
  t.set(2, 16, 64);
  T::configure(t);
  CHECK(!faults([] { T::dot<TileDot::kS8S8, 0, 1, 2>(); }));
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
  const bool hardware = torch_ext::cpu::amx_int8_detected() && torch_ext::cpu::amx_bf16_detected();
  int on_hardware = 0;
  for (int trial = 0; trial < trials; ++trial) {
    const DotProblem<TileDot::kS8S8> ints(rng);
    const DotProblem<TileDot::kBf16> halves(rng);
    CHECK((run<TileDot::kS8S8, EmulatedTiles>(ints) == ints.reference()));
    CHECK((run<TileDot::kBf16, EmulatedTiles>(halves) == halves.reference()));
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
    if (hardware) {
      CHECK((run<TileDot::kS8S8, HardwareTiles>(ints) == ints.reference()));
      CHECK((close(run<TileDot::kBf16, HardwareTiles>(halves), halves.reference(), halves)));
      ++on_hardware;
    }
#else
    (void)hardware;
#endif
  }
  std::printf("all ok (%d trials, %d on hardware tiles)\n", trials, on_hardware);
  return 0;
}
