// CPU simulation of the CUDA im2win kernels against an independent reference convolution.
//
// This machine and CI have no GPU, so the kernels' index math is tested here: the simulation
// walks each kernel of csrc/conv/im2win_cuda.cu thread by thread (transform, weight packing,
// SIMT and tensor-core GEMM tiles with their shared-memory layouts and fragment maps,
// split-K, epilogues, the direct kernel), using the host-device functions of
// csrc/conv/im2win_index.h, and checks exact results, single writes and in-bounds aligned
// reads. When a kernel's structure changes, its mirror here changes with it.
// Usage: im2win_cuda_sim CASES SEED   (run by tests/test_cuda_index_sim.py)
#include <cassert>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
#include <algorithm>

#include "conv/im2win_index.h"

using namespace torch_ext;
namespace ix = torch_ext::im2win_index;

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "CHECK failed %s:%d: %s\n", __FILE__, __LINE__, #c); abort(); } } while (0)

std::mt19937_64 rng;
int split_cases = 0; int64_t max_splits = 0;
int64_t rnd(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

struct Tensor4 {
  std::vector<double> buf;
  Strides4 s;
  int64_t d[4];
  double at(int64_t a, int64_t b, int64_t c, int64_t e) const { return buf[a * s.d0 + b * s.d1 + c * s.d2 + e * s.d3]; }
};

Tensor4 make_tensor(int64_t d0, int64_t d1, int64_t d2, int64_t d3, bool fill) {
  Tensor4 t;
  t.d[0] = d0; t.d[1] = d1; t.d[2] = d2; t.d[3] = d3;
  int order[4] = {0, 1, 2, 3};
  std::shuffle(order, order + 4, rng);
  int64_t st[4];
  int64_t cur = rnd(1, 2) == 1 ? 1 : 1;  // innermost stride 1
  for (int q = 3; q >= 0; --q) {
    int dim = order[q];
    st[dim] = cur;
    cur *= std::max<int64_t>(t.d[dim], 1) + (rnd(0, 4) == 0 ? rnd(1, 2) : 0);  // occasional gaps
  }
  t.s = Strides4{st[0], st[1], st[2], st[3]};
  int64_t span = 1;
  for (int q = 0; q < 4; ++q) span += (t.d[q] - 1) * st[q];
  t.buf.assign(std::max<int64_t>(span, 1), fill ? 0.0 : NAN);
  if (fill)
    for (auto& v : t.buf) v = double(rnd(-3, 3));
  return t;
}

double xv(const ConvGeometry& g, const Tensor4& x, int64_t n, int64_t c, int64_t vy, int64_t vx) {
  // Independent virtual-input definition.
  if (vy < 0 || vx < 0) return 0;
  if (vy % g.input_dilation_h || vx % g.input_dilation_w) return 0;
  int64_t y = vy / g.input_dilation_h, xx = vx / g.input_dilation_w;
  if (y >= g.H || xx >= g.W) return 0;
  return x.at(n, c, y, xx);
}

// ---- transform block shape (mirror of transform_block) ----
void transform_block(int64_t inner_count, int* bx, int* by) {
  int x = 32;
  while (x < 256 && x < inner_count) x *= 2;
  *bx = x; *by = 256 / x;
}

struct Case {
  ConvGeometry g;
  Tensor4 x, w, out;
  std::vector<double> bias;
  bool has_bias;
};

void reference(const Case& cs, std::vector<double>& ref) {
  const ConvGeometry& g = cs.g;
  int64_t Cg = g.C / g.groups, Kg = g.K / g.groups;
  ref.assign(g.N * g.K * g.Ho * g.Wo, 0);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t k = 0; k < g.K; ++k)
      for (int64_t i = 0; i < g.Ho; ++i)
        for (int64_t j = 0; j < g.Wo; ++j) {
          double s = cs.has_bias ? cs.bias[k] : 0;
          int64_t gr = k / Kg;
          for (int64_t c = 0; c < Cg; ++c)
            for (int64_t h = 0; h < g.R; ++h)
              for (int64_t w = 0; w < g.S; ++w)
                s += xv(g, cs.x, n, gr * Cg + c, i * g.stride_h + h * g.dilation_h - g.pad_top,
                        j * g.stride_w + w * g.dilation_w - g.pad_left) * cs.w.at(k, c, h, w);
          ref[((n * g.K + k) * g.Ho + i) * g.Wo + j] = s;
        }
}

// ---- internal transform, mirrors window_transform_kernel<T, T, true> ----
std::vector<double> sim_transform_internal(const Case& cs, const ix::GemmLayout& l) {
  const ConvGeometry& g = cs.g;
  int64_t total_el = ix::gemm_window_elements(g, l);
  std::vector<double> win(total_el, NAN);
  std::vector<int> count(total_el, 0);
  const int kCols = 32;
  int64_t column_tiles = ix::ceil_div(l.width, kCols);
  int64_t total_tiles = g.N * g.Ho * column_tiles;
  int bdx, bdy;
  transform_block(l.column_stride, &bdx, &bdy);
  for (int64_t tile = 0; tile < total_tiles; ++tile) {
    int64_t row = tile / column_tiles;
    int64_t m0 = (tile - row * column_tiles) * kCols;
    int64_t n = row / g.Ho, i = row - n * g.Ho;
    int columns = int(std::min<int64_t>(kCols, l.width - m0));
    int64_t column_source[32];
    for (int t = 0; t < columns; ++t) column_source[t] = ix::input_column_offset(g, cs.x.s, m0 + t);
    for (int ty = 0; ty < bdy; ++ty)
      for (int tx = 0; tx < bdx; ++tx)
        for (int64_t inner = tx; inner < l.column_stride; inner += bdx) {
          int32_t channel, h;
          bool real = ix::decode_window_inner(int32_t(inner), int32_t(l.rc_padded), int32_t(l.rc), int32_t(l.cg),
                                              &channel, &h);
          int64_t source_row = real ? ix::input_row_offset(g, cs.x.s, n, channel, i, h) : -1;
          int64_t destination = ix::gemm_window_offset(g, l, n, i, m0, inner);
          for (int mm = ty; mm < columns; mm += bdy) {
            int64_t sc = column_source[mm];
            double v = 0;
            if (source_row >= 0 && sc >= 0) {
              CHECK(source_row + sc < (int64_t)cs.x.buf.size());
              v = cs.x.buf[source_row + sc];
            }
            int64_t d = destination + mm * l.column_stride;
            CHECK(d >= 0 && d < total_el);
            win[d] = v;
            count[d]++;
          }
        }
  }
  for (int64_t e = 0; e < total_el; ++e) CHECK(count[e] == 1);
  // independent check of the layout
  int64_t G = l.groups;
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t i = 0; i < g.Ho; ++i)
      for (int64_t m = 0; m < l.width; ++m)
        for (int64_t gr = 0; gr < G; ++gr)
          for (int64_t r = 0; r < l.rc_padded; ++r) {
            double expect = 0;
            if (r < l.rc) {
              int64_t h = r / l.cg, c = r % l.cg;
              expect = xv(g, cs.x, n, gr * l.cg + c, i * g.stride_h + h * g.dilation_h - g.pad_top, m - g.pad_left);
            }
            int64_t off = (((n * g.Ho + i) * l.width + m) * G + gr) * l.rc_padded + r;
            CHECK(win[off] == expect);
          }
  return win;
}

// ---- public transform, mirrors window_transform_kernel<T, Out, false> ----
void sim_transform_public(const Case& cs) {
  const ConvGeometry& g = cs.g;
  int64_t width = window_width(g);
  // destination with random layout
  Tensor4 dst = make_tensor(g.N, g.C, g.Ho, width * g.R, false);
  std::vector<int> count(dst.buf.size(), 0);
  const int kCols = 32;
  int64_t column_tiles = ix::ceil_div(width, kCols);
  int64_t total_tiles = g.N * g.Ho * column_tiles;
  int64_t inner_count = g.C * g.R;
  int bdx, bdy;
  transform_block(inner_count, &bdx, &bdy);
  for (int64_t tile = 0; tile < total_tiles; ++tile) {
    int64_t row = tile / column_tiles;
    int64_t m0 = (tile - row * column_tiles) * kCols;
    int64_t n = row / g.Ho, i = row - n * g.Ho;
    int columns = int(std::min<int64_t>(kCols, width - m0));
    int64_t column_source[32];
    for (int t = 0; t < columns; ++t) column_source[t] = ix::input_column_offset(g, cs.x.s, m0 + t);
    for (int ty = 0; ty < bdy; ++ty)
      for (int tx = 0; tx < bdx; ++tx)
        for (int64_t inner = tx; inner < inner_count; inner += bdx) {
          int64_t channel = inner / g.R, h = inner - channel * g.R;
          int64_t source_row = ix::input_row_offset(g, cs.x.s, n, channel, i, h);
          int64_t destination = ix::public_window_offset(g, dst.s, n, channel, i, m0, h);
          int64_t column_step = g.R * dst.s.d3;
          for (int mm = ty; mm < columns; mm += bdy) {
            int64_t sc = column_source[mm];
            double v = 0;
            if (source_row >= 0 && sc >= 0) v = cs.x.buf[source_row + sc];
            int64_t d = destination + mm * column_step;
            CHECK(d >= 0 && d < (int64_t)dst.buf.size());
            dst.buf[d] = v;
            count[d]++;
          }
        }
  }
  // im2win.h: window[n][c][i][m*R + h] = x[n][c][i*sh + h*dh - pad_top][m - pad_left]
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t i = 0; i < g.Ho; ++i)
        for (int64_t m = 0; m < width; ++m)
          for (int64_t h = 0; h < g.R; ++h) {
            int64_t off = n * dst.s.d0 + c * dst.s.d1 + i * dst.s.d2 + (m * g.R + h) * dst.s.d3;
            CHECK(count[off] == 1);
            CHECK(dst.buf[off] == xv(g, cs.x, n, c, i * g.stride_h + h * g.dilation_h - g.pad_top, m - g.pad_left));
          }
}

// ---- weight packing ----
std::vector<double> sim_pack(const Case& cs, const ix::GemmLayout& l, bool k_major) {
  int64_t total = k_major ? ix::packed_weight_elements_k_major(l) : ix::packed_weight_elements_m_major(l);
  std::vector<double> packed(total);
  for (int64_t idx = 0; idx < total; ++idx) {
    int64_t group, m, kk;
    if (k_major) {
      m = idx % l.m_padded; int64_t rest = idx / l.m_padded; kk = rest % l.gemm_k; group = rest / l.gemm_k;
      CHECK(ix::packed_weight_offset_k_major(l, group, m, kk) == idx);
    } else {
      kk = idx % l.gemm_k; int64_t rest = idx / l.gemm_k; m = rest % l.kg; group = rest / l.kg;
      CHECK(ix::packed_weight_offset_m_major(l, group, m, kk) == idx);
    }
    int64_t src = ix::weight_source_offset(l, cs.w.s, group, m, kk);
    packed[idx] = src >= 0 ? cs.w.buf[src] : 0;
    // independent
    int64_t w = kk / l.rc_padded, r = kk % l.rc_padded;
    double expect = 0;
    if (m < l.kg && r < l.rc) expect = cs.w.at(group * l.kg + m, r % l.cg, r / l.cg, w);
    CHECK(packed[idx] == expect);
  }
  return packed;
}

// ---- split-K reduce, mirrors split_k_reduce_kernel ----
void sim_reduce(const Case& cs, const ix::GemmLayout& l, const ix::SplitK& sk, const std::vector<double>& partial,
                Tensor4& out, std::vector<int>& count) {
  const ConvGeometry& g = cs.g;
  for (int64_t channel = 0; channel < g.K; ++channel)
    for (int64_t col = 0; col < l.gemm_n; ++col) {
      double s = 0;
      for (int64_t split = 0; split < sk.splits; ++split) {
        double v = partial[ix::split_k_partial_offset(split, channel, col, l.groups * l.kg, l.gemm_n)];
        CHECK(!std::isnan(v));
        s += v;
      }
      if (cs.has_bias) s += cs.bias[channel];
      int64_t off = channel * out.s.d1 + ix::gemm_output_pixel_offset<uint32_t>(g, out.s, col);
      CHECK(off >= 0 && off < (int64_t)out.buf.size());
      out.buf[off] = s;
      count[off]++;
    }
}

// ---- SIMT GEMM, mirrors simt_gemm_kernel ----
void sim_simt(const Case& cs, const ix::GemmLayout& l, const std::vector<double>& win,
              const std::vector<double>& packed, Tensor4& out, std::vector<int>& count) {
  namespace sc = ix::simt;
  const ConvGeometry& g = cs.g;
  const int gemm_k = int(l.gemm_k), rc_padded = int(l.rc_padded);
  const int k_tiles = (gemm_k + sc::kBlockK - 1) / sc::kBlockK;
  const int64_t k_column_step = ix::gemm_k_column_step(g, l);
  int64_t tiles_n = ix::ceil_div(l.gemm_n, sc::kBlockN), tiles_m = ix::ceil_div(l.kg, sc::kBlockM);
  ix::SplitK sk = ix::choose_split_k(tiles_n * tiles_m * l.groups, l.groups, l.gemm_k, sc::kBlockK);
  CHECK(l.groups * sk.splits <= 65535);
  std::vector<double> partial(sk.splits * g.K * l.gemm_n, NAN);
  static double a_tile[2][8][128], b_tile[2][8][128];
  std::vector<double> acc(256 * 64);
  std::vector<double> a_next(256 * 4), b_next(256 * 4);
  for (int64_t bz = 0; bz < l.groups * sk.splits; ++bz)
    for (int64_t by = 0; by < tiles_m; ++by)
      for (int64_t bx = 0; bx < tiles_n; ++bx) {
        int64_t group = bz / sk.splits, split = bz % sk.splits, m0 = by * sc::kBlockM, n0 = bx * sc::kBlockN;
        int kt_begin = int(split * sk.k_tiles_per_split);
        int kt_count = std::min<int>(int(sk.k_tiles_per_split), k_tiles - kt_begin);
        CHECK(kt_count >= 1);
        for (int b = 0; b < 2; ++b) for (int k = 0; k < 8; ++k) for (int q = 0; q < 128; ++q) a_tile[b][k][q] = b_tile[b][k][q] = NAN;
        std::fill(acc.begin(), acc.end(), 0.0);
        auto load_tile = [&](int tid, int k0) {
          int a_k = ix::simt_a_load_k(tid), a_m = ix::simt_a_load_m(tid);
          int b_col = ix::simt_b_load_col(tid), b_k = ix::simt_b_load_k(tid);
          bool a_ok = ix::chunk_in_bounds(m0 + a_m, l.m_padded, 0, gemm_k);
          bool b_ok = ix::chunk_in_bounds(n0 + b_col, l.gemm_n, 0, gemm_k);
          int64_t b_src = b_ok ? ix::gemm_column_window_base<uint32_t>(g, l, n0 + b_col, group) : 0;
          CHECK(!b_ok || b_src == ix::gemm_column_window_base<int64_t>(g, l, n0 + b_col, group));
          int ka = k0 + a_k;
          if (a_ok && ka < gemm_k) {
            int64_t off = ix::packed_weight_offset_k_major(l, group, m0 + a_m, ka);
            CHECK(off % 4 == 0 && off + 4 <= (int64_t)packed.size());
            for (int q = 0; q < 4; ++q) a_next[tid * 4 + q] = packed[off + q];
          } else for (int q = 0; q < 4; ++q) a_next[tid * 4 + q] = 0;
          int kb = k0 + b_k;
          if (b_ok && kb < gemm_k) {
            int64_t off = b_src + ix::gemm_k_window_offset(kb, rc_padded, k_column_step);
            CHECK(off % 4 == 0 && off + 4 <= (int64_t)win.size());
            for (int q = 0; q < 4; ++q) b_next[tid * 4 + q] = win[off + q];
          } else for (int q = 0; q < 4; ++q) b_next[tid * 4 + q] = 0;
        };
        auto store_tile = [&](int tid, int buf) {
          int a_k = ix::simt_a_load_k(tid), a_m = ix::simt_a_load_m(tid);
          int b_col = ix::simt_b_load_col(tid), b_k = ix::simt_b_load_k(tid);
          for (int q = 0; q < 4; ++q) a_tile[buf][a_k][a_m + q] = a_next[tid * 4 + q];
          for (int q = 0; q < 4; ++q) b_tile[buf][b_k + q][b_col] = b_next[tid * 4 + q];
        };
        for (int tid = 0; tid < 256; ++tid) load_tile(tid, kt_begin * 8);
        for (int tid = 0; tid < 256; ++tid) store_tile(tid, 0);
        int kt_end = kt_begin + kt_count;
        for (int kt = kt_begin; kt < kt_end; ++kt) {
          int buf = (kt - kt_begin) & 1;
          bool more = kt + 1 < kt_end;
          if (more) for (int tid = 0; tid < 256; ++tid) load_tile(tid, (kt + 1) * 8);
          for (int tid = 0; tid < 256; ++tid) {
            int row_lo = ix::simt_thread_row(tid, 0), row_hi = ix::simt_thread_row(tid, 4);
            int col_lo = ix::simt_thread_col(tid, 0), col_hi = ix::simt_thread_col(tid, 4);
            for (int k = 0; k < 8; ++k) {
              double av[8], bv[8];
              for (int q = 0; q < 4; ++q) {
                av[q] = a_tile[buf][k][row_lo + q]; av[4 + q] = a_tile[buf][k][row_hi + q];
                bv[q] = b_tile[buf][k][col_lo + q]; bv[4 + q] = b_tile[buf][k][col_hi + q];
              }
              for (int r = 0; r < 8; ++r) for (int c = 0; c < 8; ++c) {
                CHECK(!std::isnan(av[r]) && !std::isnan(bv[c]));
                acc[tid * 64 + r * 8 + c] += av[r] * bv[c];
              }
            }
          }
          if (more) for (int tid = 0; tid < 256; ++tid) store_tile(tid, buf ^ 1);
        }
        if (sk.splits > 1) {
          for (int tid = 0; tid < 256; ++tid)
            for (int r = 0; r < 8; ++r) {
              int64_t m = m0 + ix::simt_thread_row(tid, r);
              if (m >= l.kg) continue;
              int64_t base = ix::split_k_partial_offset(split, group * l.kg + m, n0, l.groups * l.kg, l.gemm_n);
              for (int c = 0; c < 8; ++c) {
                int col = ix::simt_thread_col(tid, c);
                if (n0 + col < l.gemm_n) { CHECK(base + col < (int64_t)partial.size() && std::isnan(partial[base + col])); partial[base + col] = acc[tid * 64 + r * 8 + c]; }
              }
            }
          continue;
        }
        for (int tid = 0; tid < 256; ++tid) {
          int64_t pixel[8];
          for (int c = 0; c < 8; ++c) {
            int64_t out_col = n0 + ix::simt_thread_col(tid, c);
            pixel[c] = out_col < l.gemm_n ? ix::gemm_output_pixel_offset<uint32_t>(g, out.s, out_col) : -1;
            if (out_col < l.gemm_n) CHECK(pixel[c] == ix::gemm_output_pixel_offset<int64_t>(g, out.s, out_col));
          }
          for (int r = 0; r < 8; ++r) {
            int64_t m = m0 + ix::simt_thread_row(tid, r);
            if (m >= l.kg) continue;
            int64_t channel = group * l.kg + m;
            double bias = cs.has_bias ? cs.bias[channel] : 0;
            for (int c = 0; c < 8; ++c)
              if (pixel[c] >= 0) {
                int64_t off = channel * out.s.d1 + pixel[c];
                CHECK(off >= 0 && off < (int64_t)out.buf.size());
                out.buf[off] = acc[tid * 64 + r * 8 + c] + bias;
                count[off]++;
              }
          }
        }
      }
  if (sk.splits > 1) { sim_reduce(cs, l, sk, partial, out, count); split_cases++; max_splits = std::max<int64_t>(max_splits, sk.splits); }
}

// ---- PTX spec tables (independent of the header) ----
// ldmatrix (non-trans): register j of lane l holds row l/4, cols 2*(l%4)+{0,1} of matrix j.
// mma.m16n8k16 A: a_i (i<8): row = gid + 8*((i/2)%2)... per PTX: row = groupID for a0,a1,a4,a5;
//   groupID+8 for a2,a3,a6,a7; col = tig*2 + (i&1) for i<4, + 8 for i>=4.
int spec_a_row(int lane, int i) { int gid = lane >> 2; return (i == 0 || i == 1 || i == 4 || i == 5) ? gid : gid + 8; }
int spec_a_col(int lane, int i) { int tig = lane % 4; return tig * 2 + (i & 1) + (i >= 4 ? 8 : 0); }
int spec_b_row(int lane, int i) { int tig = lane % 4; return tig * 2 + (i & 1) + (i >= 2 ? 8 : 0); }
int spec_b_col(int lane, int) { return lane >> 2; }
int spec_c_row(int lane, int i) { return (lane >> 2) + (i >= 2 ? 8 : 0); }
int spec_c_col(int lane, int i) { return (lane % 4) * 2 + (i & 1); }

// ---- MMA GEMM, mirrors mma_gemm_kernel (values kept as doubles) ----
void sim_mma(const Case& cs, const ix::GemmLayout& l, const std::vector<double>& win,
             const std::vector<double>& packed, Tensor4& out, std::vector<int>& count) {
  namespace mc = ix::mma;
  const ConvGeometry& g = cs.g;
  const int gemm_k = int(l.gemm_k), rc_padded = int(l.rc_padded);
  const int k_tiles = (gemm_k + mc::kBlockK - 1) / mc::kBlockK;
  const int64_t k_column_step = ix::gemm_k_column_step(g, l);
  int64_t tiles_n = ix::ceil_div(l.gemm_n, mc::kBlockN), tiles_m = ix::ceil_div(l.kg, mc::kBlockM);
  ix::SplitK sk = ix::choose_split_k(tiles_n * tiles_m * l.groups, l.groups, l.gemm_k, mc::kBlockK);
  std::vector<double> partial(sk.splits * g.K * l.gemm_n, NAN);
  std::vector<double> smem(mc::kStages * 2 * mc::kTileElements);
  std::vector<int> stage_tile(mc::kStages, -1);
  std::vector<double> acc(256 * 64);
  for (int64_t bz = 0; bz < l.groups * sk.splits; ++bz)
    for (int64_t by = 0; by < tiles_m; ++by)
      for (int64_t bx = 0; bx < tiles_n; ++bx) {
        int64_t group = bz / sk.splits, split = bz % sk.splits, m0 = by * mc::kBlockM, n0 = bx * mc::kBlockN;
        int kt_begin = int(split * sk.k_tiles_per_split);
        int kt_count = std::min<int>(int(sk.k_tiles_per_split), k_tiles - kt_begin);
        CHECK(kt_count >= 1);
        std::fill(smem.begin(), smem.end(), NAN);
        std::fill(acc.begin(), acc.end(), 0.0);
        std::vector<int> written(smem.size());
        auto load_stage = [&](int stage, int k0) {
          std::fill(written.begin() + stage * 2 * mc::kTileElements, written.begin() + (stage + 1) * 2 * mc::kTileElements, 0);
          for (int tid = 0; tid < 256; ++tid) {
            int load_chunk = ix::mma_load_chunk(tid);
            for (int i = 0; i < 2; ++i) {
              int row = ix::mma_load_row(tid, i);
              int smem_offset = ix::mma_smem_offset(row, load_chunk);
              int64_t m = m0 + row;
              bool a_ok = m < l.kg;
              int64_t a_src = a_ok ? ix::packed_weight_offset_m_major(l, group, m, load_chunk * mc::kVector) : 0;
              int64_t col = n0 + row;
              bool b_ok = col < l.gemm_n;
              int64_t b_src = b_ok ? ix::gemm_column_window_base<uint32_t>(g, l, col, group) : 0;
              int kk = k0 + load_chunk * mc::kVector;
              bool k_ok = kk < gemm_k;
              int64_t b_offset = k_ok ? ix::gemm_k_window_offset(kk, rc_padded, k_column_step) : 0;
              int sa = stage * 2 * mc::kTileElements, sb = sa + mc::kTileElements;
              bool pa = a_ok && k_ok, pb = b_ok && k_ok;
              int64_t asrc = a_src + k0, bsrc = b_src + b_offset;
              if (pa) CHECK(asrc % 8 == 0 && asrc + 8 <= (int64_t)packed.size());
              if (pb) CHECK(bsrc % 8 == 0 && bsrc + 8 <= (int64_t)win.size());
              CHECK(smem_offset % 8 == 0 && smem_offset + 8 <= mc::kTileElements);
              for (int q = 0; q < 8; ++q) {
                smem[sa + smem_offset + q] = pa ? packed[asrc + q] : 0;
                smem[sb + smem_offset + q] = pb ? win[bsrc + q] : 0;
                written[sa + smem_offset + q]++;
                written[sb + smem_offset + q]++;
              }
            }
          }
          for (int e = stage * 2 * mc::kTileElements; e < (stage + 1) * 2 * mc::kTileElements; ++e) CHECK(written[e] == 1);
          stage_tile[stage] = k0 / mc::kBlockK;
        };
        for (int s = 0; s < mc::kStages - 1; ++s) if (s < kt_count) load_stage(s, (kt_begin + s) * mc::kBlockK);
        for (int it = 0; it < kt_count; ++it) {
          int next = it + mc::kStages - 1;
          CHECK(next % mc::kStages != it % mc::kStages);
          if (next < kt_count) load_stage(next % mc::kStages, (kt_begin + next) * mc::kBlockK);
          CHECK(stage_tile[it % mc::kStages] == kt_begin + it);
          int sa = (it % mc::kStages) * 2 * mc::kTileElements, sb = sa + mc::kTileElements;
          int k0 = (kt_begin + it) * mc::kBlockK;
          for (int warp = 0; warp < 8; ++warp) {
            int warp_row0 = ix::mma_warp_row0(warp), warp_col0 = ix::mma_warp_col0(warp);
            for (int ks = 0; ks < mc::kBlockK / mc::kMmaK; ++ks) {
              int chunk0 = ks * (mc::kMmaK / mc::kVector);
              // ldmatrix: per lane, 4 registers x 2 halves
              double af[4][32][4][2], bf[4][32][2][2];
              for (int mt = 0; mt < 4; ++mt) {
                int addr[32];
                for (int lane = 0; lane < 32; ++lane) {
                  int row = warp_row0 + mt * 16 + ix::ldmatrix_a_row(lane);
                  addr[lane] = sa + ix::mma_smem_offset(row, chunk0 + ix::ldmatrix_a_chunk(lane));
                }
                for (int lane = 0; lane < 32; ++lane)
                  for (int j = 0; j < 4; ++j)
                    for (int hf = 0; hf < 2; ++hf) af[mt][lane][j][hf] = smem[addr[8 * j + lane / 4] + 2 * (lane % 4) + hf];
              }
              for (int np = 0; np < 2; ++np) {
                int addr[32];
                for (int lane = 0; lane < 32; ++lane) {
                  int row = warp_col0 + np * 16 + ix::ldmatrix_b_row(lane);
                  addr[lane] = sb + ix::mma_smem_offset(row, chunk0 + ix::ldmatrix_b_chunk(lane));
                }
                for (int lane = 0; lane < 32; ++lane)
                  for (int j = 0; j < 4; ++j)
                    for (int hf = 0; hf < 2; ++hf) bf[2 * np + j / 2][lane][j % 2][hf] = smem[addr[8 * j + lane / 4] + 2 * (lane % 4) + hf];
              }
              for (int mt = 0; mt < 4; ++mt)
                for (int nt = 0; nt < 4; ++nt) {
                  double A[16][16], B[16][8];
                  int setA[16][16] = {}, setB[16][8] = {};
                  for (int lane = 0; lane < 32; ++lane) {
                    for (int i = 0; i < 8; ++i) {
                      int r = spec_a_row(lane, i), c = spec_a_col(lane, i);
                      A[r][c] = af[mt][lane][i / 2][i % 2]; setA[r][c]++;
                      CHECK(ix::mma_a_row(lane, i) == r && ix::mma_a_k(lane, i) == c);
                    }
                    for (int i = 0; i < 4; ++i) {
                      int r = spec_b_row(lane, i), c = spec_b_col(lane, i);
                      B[r][c] = bf[nt][lane][i / 2][i % 2]; setB[r][c]++;
                      CHECK(ix::mma_b_k(lane, i) == r && ix::mma_b_col(lane, i) == c);
                    }
                  }
                  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) {
                    CHECK(setA[r][c] == 1);
                    // the fragment holds A_g[m][kk] for its tile position
                    int64_t m = m0 + warp_row0 + mt * 16 + r; int64_t kk = k0 + ks * 16 + c;
                    double expect = (m < l.kg && kk < gemm_k) ? packed[ix::packed_weight_offset_m_major(l, group, m, kk)] : 0;
                    CHECK(A[r][c] == expect);
                  }
                  for (int r = 0; r < 16; ++r) for (int c = 0; c < 8; ++c) {
                    CHECK(setB[r][c] == 1);
                    int64_t col = n0 + warp_col0 + nt * 8 + c; int64_t kk = k0 + ks * 16 + r;
                    double expect = 0;
                    if (col < l.gemm_n && kk < gemm_k) {
                      ix::GemmPixel p = ix::decode_gemm_column(g, col);
                      int64_t w = kk / l.rc_padded, rr = kk % l.rc_padded;
                      expect = win[ix::gemm_window_offset(g, l, p.n, p.i, p.j * g.stride_w + w * g.dilation_w, group * l.rc_padded + rr)];
                    }
                    CHECK(B[r][c] == expect);
                  }
                  for (int lane = 0; lane < 32; ++lane)
                    for (int e = 0; e < 4; ++e) {
                      int r = spec_c_row(lane, e), c = spec_c_col(lane, e);
                      CHECK(ix::mma_acc_row(lane, e) == r && ix::mma_acc_col(lane, e) == c);
                      double s = 0;
                      for (int q = 0; q < 16; ++q) s += A[r][q] * B[q][c];
                      acc[(warp * 32 + lane) * 64 + (mt * 4 + nt) * 4 + e] += s;
                    }
                }
            }
          }
        }
        if (sk.splits > 1) {
          for (int warp = 0; warp < 8; ++warp)
            for (int lane = 0; lane < 32; ++lane) {
              int warp_row0 = ix::mma_warp_row0(warp), warp_col0 = ix::mma_warp_col0(warp);
              for (int mt = 0; mt < 4; ++mt)
                for (int half = 0; half < 2; ++half) {
                  int64_t m = m0 + warp_row0 + mt * 16 + ix::mma_acc_row(lane, 2 * half);
                  if (m >= l.kg) continue;
                  int64_t base = ix::split_k_partial_offset(split, group * l.kg + m, n0, l.groups * l.kg, l.gemm_n);
                  for (int nt = 0; nt < 4; ++nt)
                    for (int e = 0; e < 2; ++e) {
                      int col = warp_col0 + nt * 8 + ix::mma_acc_col(lane, e);
                      if (n0 + col < l.gemm_n) { CHECK(std::isnan(partial[base + col])); partial[base + col] = acc[(warp * 32 + lane) * 64 + (mt * 4 + nt) * 4 + 2 * half + e]; }
                    }
                }
            }
          continue;
        }
        for (int warp = 0; warp < 8; ++warp)
          for (int lane = 0; lane < 32; ++lane) {
            int warp_row0 = ix::mma_warp_row0(warp), warp_col0 = ix::mma_warp_col0(warp);
            int64_t pixel[4][2];
            for (int nt = 0; nt < 4; ++nt)
              for (int e = 0; e < 2; ++e) {
                int64_t col = n0 + warp_col0 + nt * 8 + ix::mma_acc_col(lane, e);
                pixel[nt][e] = col < l.gemm_n ? ix::gemm_output_pixel_offset<uint32_t>(g, out.s, col) : -1;
              }
            for (int mt = 0; mt < 4; ++mt)
              for (int half = 0; half < 2; ++half) {
                int64_t m = m0 + warp_row0 + mt * 16 + ix::mma_acc_row(lane, 2 * half);
                if (m >= l.kg) continue;
                int64_t channel = group * l.kg + m;
                double bias = cs.has_bias ? cs.bias[channel] : 0;
                for (int nt = 0; nt < 4; ++nt)
                  for (int e = 0; e < 2; ++e)
                    if (pixel[nt][e] >= 0) {
                      int64_t off = channel * out.s.d1 + pixel[nt][e];
                      CHECK(off >= 0 && off < (int64_t)out.buf.size());
                      out.buf[off] = acc[(warp * 32 + lane) * 64 + (mt * 4 + nt) * 4 + 2 * half + e] + bias;
                      count[off]++;
                    }
              }
          }
      }
  if (sk.splits > 1) { sim_reduce(cs, l, sk, partial, out, count); split_cases++; max_splits = std::max<int64_t>(max_splits, sk.splits); }
}

// ---- direct kernel (Index = uint32 or int64) ----
template <typename Index>
void sim_direct(const Case& cs, Tensor4& out, std::vector<int>& count) {
  const ConvGeometry& g = cs.g;
  int64_t cg = g.C / g.groups, kg = g.K / g.groups;
  int64_t planes = g.N * g.K, plane_size = g.Ho * g.Wo;
  for (int64_t plane = 0; plane < planes; ++plane)
    for (int64_t p = 0; p < plane_size; ++p) {
      const int64_t i = int64_t(Index(p) / Index(g.Wo)), j = p - i * g.Wo;
      const int64_t n = int64_t(Index(plane) / Index(g.K)), k = plane - n * g.K;
      const int64_t group = int64_t(Index(k) / Index(kg));
      double acc = 0;
      for (Index h = 0; h < Index(g.R); ++h) {
        int64_t y = ix::real_input_index_fast<Index>(i * g.stride_h + int64_t(h) * g.dilation_h - g.pad_top, g.input_dilation_h, g.H);
        if (y < 0) continue;
        for (Index w = 0; w < Index(g.S); ++w) {
          int64_t xc = ix::real_input_index_fast<Index>(j * g.stride_w + int64_t(w) * g.dilation_w - g.pad_left, g.input_dilation_w, g.W);
          if (xc < 0) continue;
          int64_t xp = n * cs.x.s.d0 + group * cg * cs.x.s.d1 + y * cs.x.s.d2 + xc * cs.x.s.d3;
          int64_t wp = k * cs.w.s.d0 + int64_t(h) * cs.w.s.d2 + int64_t(w) * cs.w.s.d3;
          for (Index c = 0; c < Index(cg); ++c, xp += cs.x.s.d1, wp += cs.w.s.d1) acc += cs.x.buf[xp] * cs.w.buf[wp];
        }
      }
      double bias = cs.has_bias ? cs.bias[k] : 0;
      int64_t off = n * out.s.d0 + k * out.s.d1 + i * out.s.d2 + j * out.s.d3;
      out.buf[off] = acc + bias;
      count[off]++;
    }
}

void compare(const Case& cs, const Tensor4& out, const std::vector<int>& count, const std::vector<double>& ref,
             const char* what) {
  const ConvGeometry& g = cs.g;
  int64_t written = 0;
  for (int v : count) { CHECK(v == 0 || v == 1); written += v; }
  CHECK(written == g.N * g.K * g.Ho * g.Wo);
  for (int64_t n = 0; n < g.N; ++n) for (int64_t k = 0; k < g.K; ++k) for (int64_t i = 0; i < g.Ho; ++i) for (int64_t j = 0; j < g.Wo; ++j) {
    int64_t off = n * out.s.d0 + k * out.s.d1 + i * out.s.d2 + j * out.s.d3;
    CHECK(count[off] == 1);
    double got = out.buf[off], expect = ref[((n * g.K + k) * g.Ho + i) * g.Wo + j];
    if (got != expect) { fprintf(stderr, "%s mismatch n%ld k%ld i%ld j%ld: %g vs %g\n", what, n, k, i, j, got, expect); abort(); }
  }
}

int main(int argc, char** argv) {
  int cases = argc > 1 ? atoi(argv[1]) : 200;
  rng.seed(argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 12345);
  for (int it = 0; it < cases; ++it) {
    Case cs;
    ConvGeometry& g = cs.g;
    bool big = rnd(0, 5) == 0;
    bool deep = rnd(0, 3) == 0;  // long reductions: split-K
    g.groups = rnd(1, 3);
    int64_t Cg = deep ? rnd(60, 300) : rnd(1, big ? 40 : 12),
            Kg = rnd(1, 3) == 1 ? rnd(1, 7) : rnd(8, big ? 300 : (deep ? 20 : 40));
    g.C = Cg * g.groups; g.K = Kg * g.groups;
    g.N = rnd(1, 3);
    g.R = rnd(1, 4); g.S = rnd(1, 4);
    g.stride_h = rnd(1, 3); g.stride_w = rnd(1, 3);
    g.dilation_h = rnd(1, 2); g.dilation_w = rnd(1, 2);
    g.input_dilation_h = rnd(1, 3) == 1 ? rnd(2, 3) : 1; g.input_dilation_w = rnd(1, 3) == 1 ? rnd(2, 3) : 1;
    g.pad_top = rnd(-2, 3); g.pad_left = rnd(-2, 3);
    g.H = rnd(1, big ? 20 : (deep ? 6 : 10)); g.W = rnd(1, big ? 20 : (deep ? 6 : 10));
    int64_t pb = rnd(-2, 3), pr = rnd(-2, 3);
    g.Ho = conv_output_size((g.H - 1) * g.input_dilation_h + 1, g.pad_top, pb, g.dilation_h, g.R, g.stride_h);
    g.Wo = conv_output_size((g.W - 1) * g.input_dilation_w + 1, g.pad_left, pr, g.dilation_w, g.S, g.stride_w);
    if (rnd(0, 4) == 0) { g.Ho = rnd(1, 6); g.Wo = rnd(1, 6); }  // caller-chosen sizes
    if (g.Ho <= 0 || g.Wo <= 0) { --it; continue; }
    cs.x = make_tensor(g.N, g.C, g.H, g.W, true);
    cs.w = make_tensor(g.K, Cg, g.R, g.S, true);
    cs.has_bias = rnd(0, 1);
    cs.bias.resize(g.K);
    for (auto& b : cs.bias) b = double(rnd(-3, 3));
    std::vector<double> ref;
    reference(cs, ref);
    sim_transform_public(cs);
    // direct (both index widths)
    {
      Tensor4 out = make_tensor(g.N, g.K, g.Ho, g.Wo, false);
      std::vector<int> count(out.buf.size());
      sim_direct<uint32_t>(cs, out, count);
      compare(cs, out, count, ref, "direct32");
      std::fill(count.begin(), count.end(), 0);
      sim_direct<int64_t>(cs, out, count);
      compare(cs, out, count, ref, "direct64");
      CHECK(ix::direct_fits_int32(g));
    }
    for (int vec : {4, 8}) {
      ix::GemmLayout l = ix::make_gemm_layout(g, vec);
      CHECK(ix::gemm_fits_int32(l));
      std::vector<double> win = sim_transform_internal(cs, l);
      Tensor4 out = make_tensor(g.N, g.K, g.Ho, g.Wo, false);
      std::vector<int> count(out.buf.size());
      if (vec == 4) {
        std::vector<double> packed = sim_pack(cs, l, true);
        sim_simt(cs, l, win, packed, out, count);
        compare(cs, out, count, ref, "simt");
      } else {
        std::vector<double> packed = sim_pack(cs, l, false);
        sim_mma(cs, l, win, packed, out, count);
        compare(cs, out, count, ref, "mma");
      }
    }
    if (it % 20 == 0) printf("case %d ok: N%ld C%ld K%ld G%ld H%ld W%ld R%ld S%ld s%ld,%ld d%ld,%ld p%ld,%ld id%ld,%ld Ho%ld Wo%ld\n", it, g.N, g.C, g.K, g.groups, g.H, g.W, g.R, g.S, g.stride_h, g.stride_w, g.dilation_h, g.dilation_w, g.pad_top, g.pad_left, g.input_dilation_h, g.input_dilation_w, g.Ho, g.Wo);
  }
  printf("all ok (split-K runs %d, max splits %ld)\n", split_cases, max_splits);
}
