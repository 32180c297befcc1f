// CPU im2win convolution, compiled once per ISA level (see common/cpu/dispatch.h).
//
// Work is split into tasks of (group, chunk of kPixelsPerTask output pixels numbered
// row-major across the batch). A task
//   1. builds the window rows its pixels need, [rows][window_width][R][Cg] in fp32 with the
//      group's channels innermost, in a per-thread buffer that stays in cache (zero
//      padding, dilation and input dilation resolved here, bf16/fp16 converted once);
//   2. for every block of output channels, runs a register-blocked micro-kernel over its
//      pixels, kColumns pixels x kBlock channels at a time, against weights packed once per
//      call into panels [group][block][S][R][Cg][kBlock] (zero-padded to whole blocks).
// The micro-kernel keeps kColumns x kVectors accumulators in registers; per input value it
// issues one broadcast and kVectors FMAs. Each pixel's receptive field for one kernel
// column is ONE contiguous run of R*Cg window values (the point of im2win), walked in step
// with the panel. Taking pixels row-major across output rows keeps whole register tiles
// busy on narrow deep layers (7x7 outputs).
//
// Materializing the whole window buffer instead (the paper's way) was measured slower
// here: 8 x 32 x 224^2 with a 7x7 stride-2 kernel needs a 174 MB buffer whose first-touch
// page faults alone took longer than torch's whole convolution.
//
// float64 (gradcheck and reference use only) runs a plain direct convolution in double.
#include <algorithm>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common/cpu/parallel.h"
#include "common/cpu/vec.h"
#include "conv/im2win.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {
namespace {

// Register blocking per ISA: kColumns output pixels x (kVectors * lanes) output channels.
//   AVX-512: 32 zmm registers -> 12 x 2 accumulators + 2 weight vectors + 1 broadcast.
//   AVX2:    16 ymm registers ->  6 x 2 accumulators + 2 weight vectors + 1 broadcast.
//   scalar:  a 4 x 8 block the compiler keeps in registers.
#if defined(__AVX512F__)
constexpr int kColumns = 12;
constexpr int kVectorsLarge = 2;
#elif defined(__AVX2__)
constexpr int kColumns = 6;
constexpr int kVectorsLarge = 2;
#else
constexpr int kColumns = 4;
constexpr int kVectorsLarge = 8;
#endif
constexpr int kLanes = VecF::kWidth;
// Output pixels per task: 8 register tiles. Small enough that the task's window rows stay in
// L2 (at most a few rows of width*R*Cg floats), large enough that a weight panel read from
// L2/L3 serves 96 pixels (48 FLOPs per byte of weights).
constexpr int64_t kPixelsPerTask = 8 * kColumns;
// Budget for one task's window rows when choosing whole-tile chunks (half of a 1 MB L2).
constexpr int64_t kChunkRowBytes = 512 * 1024;

// Channel block: two vectors normally; one when a group has few output channels
// (grouped/depthwise convolutions), so that less of the block is zero padding.
int vectors_per_block(int64_t channels_per_group) { return channels_per_group <= kLanes ? 1 : kVectorsLarge; }

// Input channels per reduction chunk: a chunk's weight panel (S*R*chunk*block floats) stays
// within kPanelBytes, so that it and the chunk's window rows share L2 while the register
// tiles sweep the task's pixels. Deep layers (3x3 on 512 channels: a 590 KB panel for the
// whole reduction) are split; partial sums wait in a per-task buffer between chunks.
constexpr int64_t kPanelBytes = 160 * 1024;

struct Layout {
  int64_t Cg, Kg, block, blocks, width, row_size, panel_size, chunk;
  explicit Layout(const ConvGeometry& g)
      : Cg(g.C / g.groups),
        Kg(g.K / g.groups),
        block(int64_t(vectors_per_block(g.K / g.groups)) * kLanes),
        blocks((g.K / g.groups + block - 1) / block),
        width(window_width(g)),
        row_size(width * g.R * Cg),
        panel_size(g.S * g.R * Cg * block),
        chunk(std::min(Cg, std::max<int64_t>(16, kPanelBytes / int64_t(sizeof(float) * g.S * g.R * block) / 16 * 16))) {}
};

// A grow-only buffer per thread: tasks reuse it across calls instead of allocating (fresh
// large allocations cost first-touch page faults on every call).
float* scratch(std::vector<float>& buffer, int64_t floats) {
  if (int64_t(buffer.size()) < floats) buffer.resize(size_t(floats));
  return buffer.data();
}
thread_local std::vector<float> window_scratch;
thread_local std::vector<float> panel_scratch;
thread_local std::vector<float> partial_scratch;
thread_local std::vector<float> shared_window_scratch;
// Largest whole-batch window built up front (see compute); larger ones are built per task.
constexpr int64_t kSharedWindowBytes = 8 << 20;

template <typename In, typename Out>
inline Out convert(In v) {
  if constexpr (std::is_same_v<In, Out>) {
    return v;
  } else if constexpr (std::is_same_v<Out, double>) {
    return double(to_float(v));
  } else if constexpr (std::is_same_v<In, double>) {
    return from_float<Out>(float(v));
  } else {
    return from_float<Out>(to_float(v));
  }
}

// ---------------------------------------------------------------------------------------
// Window rows
// ---------------------------------------------------------------------------------------
// Copies in 16 x 16 tiles of (channel, column): whichever of the two the source and the
// destination keep contiguous, each tile reads and writes at most 16 cache lines, so NCHW
// input into a channels-innermost window (a transpose) costs about as much as a copy.
constexpr int64_t kTransformTile = 16;
static_assert(kTransformTile % kLanes == 0, "vector tiles split the transform tile evenly");

// Window row i of image n for channels [c_begin, c_begin + channels):
//   dst[c * channel_stride + (m * R + h) * element_stride] = x(n, c_begin + c, row(i, h), column(m))
template <typename In, typename Out>
void build_window_row(const ConvGeometry& g, const In* in, const Strides4& is, int64_t n, int64_t i, int64_t c_begin,
                      int64_t channels, Out* dst, int64_t channel_stride, int64_t element_stride) {
  const int64_t width = window_width(g);
  int64_t columns[kTransformTile];
  for (int64_t h = 0; h < g.R; ++h) {
    const int64_t y = real_input_index(i * g.stride_h + h * g.dilation_h - g.pad_top, g.input_dilation_h, g.H);
    const In* src = in + n * is.d0 + (y < 0 ? 0 : y) * is.d2 + c_begin * is.d1;
    for (int64_t m0 = 0; m0 < width; m0 += kTransformTile) {
      const int64_t m_count = std::min(kTransformTile, width - m0);
      for (int64_t m = 0; m < m_count; ++m)
        columns[m] = y < 0 ? -1 : real_input_index(m0 + m - g.pad_left, g.input_dilation_w, g.W);
      // Interior tiles of an NCHW row into the channels-innermost window: whole vectors of
      // consecutive input columns, transposed in registers (the scalar tile below costs one
      // load and one store per element).
      constexpr bool kVectorTypes = std::is_same_v<Out, float> && !std::is_same_v<In, double> && kLanes > 1;
      const bool vector_tiles = kVectorTypes && channel_stride == 1 && is.d3 == 1 &&
                                m_count == kTransformTile && columns[0] >= 0 &&
                                columns[kTransformTile - 1] == columns[0] + kTransformTile - 1;
      for (int64_t c0 = 0; c0 < channels; c0 += kTransformTile) {
        const int64_t c_end = std::min(channels, c0 + kTransformTile);
        if constexpr (kVectorTypes) {
          if (vector_tiles) {
            // Channel groups of kLanes; a short last group (3-channel RGB input) pads the
            // transpose with zero rows and stores only its channels.
            for (int64_t cv = c0; cv < c_end; cv += kLanes) {
              const int count = int(std::min<int64_t>(kLanes, c_end - cv));
              for (int64_t mv = 0; mv < kTransformTile; mv += kLanes) {
                VecF block[kLanes];
                for (int c = 0; c < kLanes; ++c)
                  block[c] = c < count ? load(src + (cv + c) * is.d1 + columns[mv]) : broadcast(0.0f);
                transpose(block);
                for (int m = 0; m < kLanes; ++m)
                  store_first(dst + ((m0 + mv + m) * g.R + h) * element_stride + cv, block[m], count);
              }
            }
            continue;
          }
        }
        for (int64_t m = 0; m < m_count; ++m) {
          Out* d = dst + ((m0 + m) * g.R + h) * element_stride;
          const int64_t x = columns[m];
          for (int64_t c = c0; c < c_end; ++c)
            d[c * channel_stride] = x < 0 ? Out{} : convert<In, Out>(src[c * is.d1 + x * is.d3]);
        }
      }
    }
  }
}

template <typename In>
void transform(const Im2winTransformParams& p) {
  const ConvGeometry& g = p.geometry;
  const Strides4 os = p.window_strides;
  parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.Ho, i = row % g.Ho;
      build_window_row(g, static_cast<const In*>(p.input), p.input_strides, n, i, 0, g.C,
                       static_cast<In*>(p.window) + n * os.d0 + i * os.d2, os.d1, os.d3);
    }
  });
}

// ---------------------------------------------------------------------------------------
// Weights and bias
// ---------------------------------------------------------------------------------------
// panels: [group][block][channel chunk][S][R][channels of the chunk][block channels]; the
// micro-kernel reads a chunk's panel in order. Bias: [group][block][block channels].
template <typename T>
void pack_weights(const Im2winConvParams& p, const Layout& L, float* panels) {
  const ConvGeometry& g = p.geometry;
  const T* w = static_cast<const T*>(p.weight);
  const Strides4 ws = p.weight_strides;
  const bool gather_fits = ws.d0 > 0 && ws.d0 * kLanes < (int64_t(1) << 31);
  parallel_for(0, g.groups * L.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gb = begin; gb < end; ++gb) {
      const int64_t first = gb / L.blocks * L.Kg;  // first output channel of the group
      const int64_t k0 = gb % L.blocks * L.block;
      for (int64_t c0 = 0; c0 < L.Cg; c0 += L.chunk) {
        const int64_t channels = std::min(L.chunk, L.Cg - c0);
        float* panel = panels + gb * L.panel_size + c0 * g.S * g.R * L.block;
        // 16 input channels at a time: the block's weights for them (block rows of 16*R*S
        // values, about 18 KB) stay in L1 while every (s, r) reads them, and each (s, r)
        // writes 16*block contiguous floats. Walking all channels per (s, r) instead re-read
        // the weights from L2 R*S times: 40% of a 512-channel 3x3 layer's time.
        for (int64_t c1 = c0; c1 < c0 + channels; c1 += kTransformTile) {
          const int64_t c_end = std::min(c0 + channels, c1 + kTransformTile);
          for (int64_t s = 0; s < g.S; ++s)
            for (int64_t r = 0; r < g.R; ++r)
              for (int64_t c = c1; c < c_end; ++c) {
                float* dst = panel + ((s * g.R + r) * channels + (c - c0)) * L.block;
                const T* src = w + (first + k0) * ws.d0 + c * ws.d1 + r * ws.d2 + s * ws.d3;
                int64_t k = 0;
                if constexpr (std::is_same_v<T, float>) {
                  // Whole vectors of output channels: one gather each (weights are [K][...]).
                  if (gather_fits)
                    for (; k + kLanes <= std::min<int64_t>(L.block, L.Kg - k0); k += kLanes)
                      store(dst + k, gather(src + k * ws.d0, ws.d0));
                }
                for (; k < L.block; ++k) dst[k] = k0 + k < L.Kg ? to_float(src[k * ws.d0]) : 0.0f;
              }
        }
      }
    }
  });
}

template <typename T>
void pack_bias(const Im2winConvParams& p, const Layout& L, float* bias) {
  const T* b = static_cast<const T*>(p.bias);
  for (int64_t gb = 0; gb < p.geometry.groups * L.blocks; ++gb) {
    const int64_t first = gb / L.blocks * L.Kg, k0 = gb % L.blocks * L.block;
    for (int64_t k = 0; k < L.block; ++k)
      bias[gb * L.block + k] = (b != nullptr && k0 + k < L.Kg) ? to_float(b[first + k0 + k]) : 0.0f;
  }
}

// ---------------------------------------------------------------------------------------
// Micro-kernel
// ---------------------------------------------------------------------------------------
// The receptive field of one output pixel for one channel chunk, as the micro-kernel walks
// it: for each of the S kernel columns, `runs` contiguous runs of `run_length` window values,
// `run_stride` apart. Unchunked, a kernel column's R rows x Cg channels are ONE run.
struct Walk {
  int64_t S, tap_stride, runs, run_length, run_stride;
};

// acc[j] = init[j * init_stride] + sum over the walk of pixels[j][...] * panel[...] for kJ
// output pixels (init: the bias with stride 0, or the previous chunk's partial sums); the
// result goes to `tile` as [kJ][kV * kLanes] (tile may alias init).
template <int kJ, int kV>
void micro_kernel(const float* const* pixels, const Walk& walk, const float* panel, const float* init,
                  int64_t init_stride, float* tile) {
  constexpr int kBlock = kV * kLanes;
  VecF acc[kJ][kV];
  for (int j = 0; j < kJ; ++j)
    for (int v = 0; v < kV; ++v) acc[j][v] = load(init + j * init_stride + v * kLanes);
  const float* wp = panel;
  for (int64_t s = 0; s < walk.S; ++s) {
    for (int64_t run = 0; run < walk.runs; ++run) {
      const int64_t offset = s * walk.tap_stride + run * walk.run_stride;
      const float* a[kJ];
      for (int j = 0; j < kJ; ++j) a[j] = pixels[j] + offset;
      for (int64_t q = 0; q < walk.run_length; ++q, wp += kBlock) {
        VecF wv[kV];
        for (int v = 0; v < kV; ++v) wv[v] = load(wp + v * kLanes);
        for (int j = 0; j < kJ; ++j) {
          const VecF x = broadcast(a[j][q]);
          for (int v = 0; v < kV; ++v) acc[j][v] = fmadd(x, wv[v], acc[j][v]);
        }
      }
    }
  }
  for (int j = 0; j < kJ; ++j)
    for (int v = 0; v < kV; ++v) store(tile + j * kBlock + v * kLanes, acc[j][v]);
}

// Runs the micro-kernel instantiated for exactly `count` (<= kColumns) pixels.
template <int kV, int kJ = kColumns, typename... Args>
void micro_kernel_for(int count, Args&&... args) {
  if constexpr (kJ >= 1) {
    if (count == kJ) return micro_kernel<kJ, kV>(args...);
    micro_kernel_for<kV, kJ - 1>(count, args...);
  }
}

// Output pixel p = (n * Ho + i) * Wo + col, advanced without divisions (a 64-bit division
// per pixel costs as much as the whole micro-kernel on shallow layers such as 3x3 on 3 channels).
struct PixelCursor {
  int64_t n, i, col, row;  // row = n * Ho + i: the window row
  PixelCursor(int64_t p, const ConvGeometry& g) : n(p / (g.Ho * g.Wo)), i(p / g.Wo % g.Ho), col(p % g.Wo), row(p / g.Wo) {}
  void next(const ConvGeometry& g) {
    if (++col < g.Wo) return;
    col = 0;
    ++row;
    if (++i == g.Ho) {
      i = 0;
      ++n;
    }
  }
};

// Writes the sums of pixels [p_begin, p_end) x kcount channels (sums[pixel][channel], `pitch`
// floats per pixel) into the output. Pixels are walked one output-row segment at a time, so
// for NCHW output each channel's segment is one contiguous store run (a per-pixel loop over
// channels would touch kcount distant planes per pixel); channels_last stores per pixel.
template <typename T>
void write_block(T* out, const Strides4& os, const ConvGeometry& g, int64_t p_begin, int64_t p_end, int64_t kcount,
                 const float* sums, int64_t pitch) {
  PixelCursor cursor(p_begin, g);
  for (int64_t p0 = p_begin; p0 < p_end;) {
    const int64_t run = std::min(p_end - p0, g.Wo - cursor.col);  // pixels left in this output row
    T* dst = out + cursor.n * os.d0 + cursor.i * os.d2 + cursor.col * os.d3;
    const float* src = sums + (p0 - p_begin) * pitch;
    if (os.d3 <= os.d1) {
      for (int64_t k = 0; k < kcount; ++k)
        for (int64_t j = 0; j < run; ++j) dst[k * os.d1 + j * os.d3] = from_float<T>(src[j * pitch + k]);
    } else {
      for (int64_t j = 0; j < run; ++j)
        for (int64_t k = 0; k < kcount; ++k) dst[k * os.d1 + j * os.d3] = from_float<T>(src[j * pitch + k]);
    }
    p0 += run;
    for (int64_t j = 0; j < run; ++j) cursor.next(g);
  }
}

template <typename T, int kV>
void compute(const Im2winConvParams& p, const Layout& L, const float* panels, const float* bias) {
  constexpr int kBlock = kV * kLanes;
  const ConvGeometry& g = p.geometry;
  const T* in = static_cast<const T*>(p.input);
  T* out = static_cast<T*>(p.output);
  const Strides4 os = p.output_strides;
  const int64_t pixels = g.N * g.Ho * g.Wo;
  // Chunks of whole output rows when rows are wide, so that every window row is built once
  // per task instead of by two neighbouring chunks (on stride-2 7x7 layers the window is
  // 3.5x the input and building it twice cost as much as the FMAs). Narrow rows: equal
  // chunks of about kPixelsPerTask pixels in whole register tiles, spanning rows and images.
  int64_t chunk_pixels;
  if (g.Wo >= kColumns) {
    // Rows per chunk: at least enough for kPixelsPerTask pixels, and preferably a multiple
    // of kColumns / gcd(Wo, kColumns) so that the chunk is whole register tiles (a short
    // tail tile runs at a fraction of the FMA rate), while its window rows fit kChunkRowBytes.
    const int64_t min_rows = (kPixelsPerTask + g.Wo - 1) / g.Wo;
    const int64_t tile_rows = kColumns / std::gcd<int64_t>(g.Wo, kColumns);
    const int64_t rows = (min_rows + tile_rows - 1) / tile_rows * tile_rows;
    chunk_pixels = g.Wo * (rows * L.row_size * int64_t(sizeof(float)) <= kChunkRowBytes ? rows : min_rows);
  } else {
    const int64_t even_chunks = (pixels + kPixelsPerTask - 1) / kPixelsPerTask;
    chunk_pixels = ((pixels + even_chunks - 1) / even_chunks + kColumns - 1) / kColumns * kColumns;
  }
  const int64_t chunks = (pixels + chunk_pixels - 1) / chunk_pixels;
  const int64_t column_stride = g.stride_w * g.R * L.Cg;  // next output column in a window row
  const int64_t tap_stride = g.dilation_w * g.R * L.Cg;   // next kernel column
  const int64_t tiles_per_chunk = (chunk_pixels + kColumns - 1) / kColumns;
  // Pixels are numbered across the whole batch (n, i, j), so chunks span images when images
  // are small (7x7 deep layers) and every chunk fills its register tiles.
  //
  // Window rows: when the whole batch's window is small (deep layers: 1.7 MB for 512
  // channels at 7x7), it is built once up front and every task reads it; tasks are then
  // (group, chunk, one channel block), many and even, for balance across threads (torch's
  // threads take static ranges). Otherwise each task builds its own rows in a per-thread
  // buffer that stays in cache, and channel blocks are split over tasks only when there
  // would be fewer than ~4 tasks per thread, since each split rebuilds the rows.
  const int64_t total_rows = g.N * g.Ho;
  const bool shared_window = g.groups * total_rows * L.row_size * int64_t(sizeof(float)) <= kSharedWindowBytes;
  float* window_all = nullptr;
  if (shared_window) {
    window_all = scratch(shared_window_scratch, g.groups * total_rows * L.row_size);
    parallel_for(0, g.groups * total_rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t gr = begin; gr < end; ++gr) {
        const int64_t group = gr / total_rows, row = gr % total_rows;
        build_window_row(g, in, p.input_strides, row / g.Ho, row % g.Ho, group * L.Cg, L.Cg,
                         window_all + gr * L.row_size, int64_t(1), L.Cg);
      }
    });
  }
  const int64_t wanted_tasks = 4 * int64_t(max_threads());
  const int64_t splits =
      shared_window ? L.blocks
                    : std::clamp<int64_t>((wanted_tasks + g.groups * chunks - 1) / (g.groups * chunks), 1, L.blocks);
  const int64_t blocks_per_split = (L.blocks + splits - 1) / splits;
  parallel_for(0, g.groups * chunks * splits, 1, [&](int64_t begin, int64_t end) {
    const float* starts[kColumns];
    // Sums of the chunk's pixels x block channels, carried across input-channel chunks.
    float* partial = scratch(partial_scratch, tiles_per_chunk * kColumns * kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t split = task % splits, chunk = task / splits % chunks, group = task / (splits * chunks);
      const int64_t p_begin = chunk * chunk_pixels, p_end = std::min(pixels, p_begin + chunk_pixels);
      if (p_begin >= p_end) continue;
      // Window rows are numbered n * Ho + i across the batch too.
      const int64_t first_row = p_begin / g.Wo, rows = (p_end - 1) / g.Wo - first_row + 1;
      const float* window;
      if (shared_window) {
        window = window_all + (group * total_rows + first_row) * L.row_size;
      } else {
        float* own = scratch(window_scratch, rows * L.row_size);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = first_row + r;
          build_window_row(g, in, p.input_strides, row / g.Ho, row % g.Ho, group * L.Cg, L.Cg, own + r * L.row_size,
                           int64_t(1), L.Cg);
        }
        window = own;
      }
      const int64_t block_end = std::min(L.blocks, (split + 1) * blocks_per_split);
      for (int64_t block = split * blocks_per_split; block < block_end; ++block) {
        const int64_t gb = group * L.blocks + block, k0 = block * L.block;
        const int64_t kcount = std::min<int64_t>(kBlock, L.Kg - k0);
        for (int64_t c0 = 0; c0 < L.Cg; c0 += L.chunk) {
          const int64_t channels = std::min(L.chunk, L.Cg - c0);
          const Walk walk = channels == L.Cg ? Walk{g.S, tap_stride, 1, g.R * L.Cg, 0}
                                             : Walk{g.S, tap_stride, g.R, channels, L.Cg};
          const float* panel = panels + gb * L.panel_size + c0 * g.S * g.R * L.block;
          PixelCursor cursor(p_begin, g);
          for (int64_t p0 = p_begin; p0 < p_end; p0 += kColumns) {
            const int count = int(std::min<int64_t>(kColumns, p_end - p0));
            for (int j = 0; j < count; ++j, cursor.next(g))
              starts[j] = window + (cursor.row - first_row) * L.row_size + cursor.col * column_stride + c0;
            float* tile = partial + (p0 - p_begin) * kBlock;
            if (c0 == 0) {
              micro_kernel_for<kV>(count, starts, walk, panel, bias + gb * L.block, int64_t(0), tile);
            } else {
              micro_kernel_for<kV>(count, starts, walk, panel, tile, int64_t(kBlock), tile);
            }
          }
        }
        write_block(out + (group * L.Kg + k0) * os.d1, os, g, p_begin, p_end, kcount, partial, kBlock);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// float64: direct convolution in double precision.
// ---------------------------------------------------------------------------------------
void direct_double(const Im2winConvParams& p) {
  const ConvGeometry& g = p.geometry;
  const double* x = static_cast<const double*>(p.input);
  const double* w = static_cast<const double*>(p.weight);
  const double* bias = static_cast<const double*>(p.bias);
  double* out = static_cast<double*>(p.output);
  const Strides4 xs = p.input_strides, ws = p.weight_strides, os = p.output_strides;
  const int64_t Cg = g.C / g.groups, Kg = g.K / g.groups;
  parallel_for(0, g.N * g.K * g.Ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % g.Ho, k = task / g.Ho % g.K, n = task / (g.Ho * g.K);
      const int64_t group = k / Kg;
      for (int64_t j = 0; j < g.Wo; ++j) {
        double sum = bias != nullptr ? bias[k] : 0.0;
        for (int64_t c = 0; c < Cg; ++c)
          for (int64_t r = 0; r < g.R; ++r) {
            const int64_t y = real_input_index(i * g.stride_h + r * g.dilation_h - g.pad_top, g.input_dilation_h, g.H);
            if (y < 0) continue;
            for (int64_t s = 0; s < g.S; ++s) {
              const int64_t xx =
                  real_input_index(j * g.stride_w + s * g.dilation_w - g.pad_left, g.input_dilation_w, g.W);
              if (xx < 0) continue;
              sum += x[n * xs.d0 + (group * Cg + c) * xs.d1 + y * xs.d2 + xx * xs.d3] *
                     w[k * ws.d0 + c * ws.d1 + r * ws.d2 + s * ws.d3];
            }
          }
        out[n * os.d0 + k * os.d1 + i * os.d2 + j * os.d3] = sum;
      }
    }
  });
}

}  // namespace

void im2win_transform(const Im2winTransformParams& p) {
  visit_storage_type(p.dtype, [&](auto tag) { transform<decltype(tag)>(p); });
}

int64_t im2win_packed_weight_size(const Im2winConvParams& p) {
  if (p.dtype == ScalarKind::kFloat64) return 0;
  const Layout L(p.geometry);
  return p.geometry.groups * L.blocks * L.panel_size;
}

void im2win_pack_weight(const Im2winConvParams& p, float* packed) {
  if (p.dtype == ScalarKind::kFloat64) return;
  const Layout L(p.geometry);
  visit_storage_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) pack_weights<T>(p, L, packed);
  });
}

void im2win_conv(const Im2winConvParams& p, const float* packed) {
  const ConvGeometry& g = p.geometry;
  if (g.N == 0 || g.K == 0 || g.Ho <= 0 || g.Wo <= 0) return;
  if (p.dtype == ScalarKind::kFloat64) return direct_double(p);
  const Layout L(g);
  const int64_t bias_size = g.groups * L.blocks * L.block;
  float* bias = scratch(panel_scratch, bias_size + (packed == nullptr ? im2win_packed_weight_size(p) : 0));
  if (packed == nullptr) {
    im2win_pack_weight(p, bias + bias_size);
    packed = bias + bias_size;
  }
  visit_storage_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) {
      pack_bias<T>(p, L, bias);
      if (L.block == kLanes) {
        compute<T, 1>(p, L, packed, bias);
      } else {
        compute<T, kVectorsLarge>(p, L, packed, bias);
      }
    }
  });
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
