// float32 logit blocks q_block @ k_block^T for the mad_qk CPU kernel on x86-64 CPUs with AVX2 + FMA
// (block_logits.h), from keys packed once per matrix in panels of 16 keys: an 8-lane kernel (panel_logits) and,
// where the CPU has AVX-512F, a 16-lane one (wide_panel_logits) that gives the same bits.
//
// Why not ATen's GEMM, as before: MKL packs its right-hand matrix on every call, and the kernel calls it once per
// 64-query x 512-key block, each time with a different query block against the same keys. On VideoMAE-B's pass
// (2 x 12 x 1568 x 64, one thread, AMD EPYC Zen 3, perf) MKL's packing (`sgemm_scopy_right16`) and the zeroing of
// its output (`sgemm_mscale`) took 18% of the pass against 46% for its arithmetic; the keys here are packed once
// per matrix, and these blocks run at 1.3-1.6x MKL's speed (64-84 against 39-65 GFLOP/s, C++ harness, same VM).
// On a Xeon (Sapphire Rapids, one thread, perf over mad_qk of 32 x 12 x 197 x 64) MKL's AVX-512 kernel and its
// packing took 33% of the pass, wide_panel_logits 25%; mad_qk over 8 x 16 x 577 x 64 took 93-101 ms against
// 104-131 ms with MKL (three alternations). use_panel_logits() says which route runs; VITMAD_CPU_LOGITS
// overrides it.
//
// Layout: panel p holds keys [16 p, 16 p + 16) as [head_dim][16] floats, zero past the last key. A block of logits
// is written row by row with `ldc` floats between rows, in whole panels (the columns past the block's last key
// are products with zero keys, which the caller does not read). Each logit is a sum of FMA chains over 128-wide
// chunks of the head dimension (panel_tile), float32 throughout, as in the GEMM it replaces.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VITMAD_PANEL_LOGITS 1
#else
#define VITMAD_PANEL_LOGITS 0
#endif

namespace vitmad {

constexpr int64_t kPanelKeys = 16;
// Query rows per strip of the AVX-512 kernel (wide_panel_logits).
constexpr int64_t kWideStrip = 8;

#if VITMAD_PANEL_LOGITS

// dst[c * dst_stride + r] = factor * src[r * src_stride + c] for r, c < 8: an 8 x 8 block transposed in registers
// (pairs of rows interleaved, then pairs of pairs, then 128-bit halves swapped: 24 shuffles for 64 values). The
// scalar copies it replaces took 14% of mad_qk's time over 2 x 12 x 197 x 64 (Xeon, one thread, perf), two
// memory operations per value, the keys and queries then already in cache (as in a model's forward).
__attribute__((target("avx2"), always_inline)) inline void transpose_8x8(const float* src, int64_t src_stride,
                                                                        float factor, float* dst,
                                                                        int64_t dst_stride) {
  const __m256 scale = _mm256_set1_ps(factor);
  __m256 row[8], pair[8], quad[8];
  for (int r = 0; r < 8; ++r) row[r] = _mm256_mul_ps(_mm256_loadu_ps(src + r * src_stride), scale);
  for (int r = 0; r < 8; r += 2) {
    pair[r] = _mm256_unpacklo_ps(row[r], row[r + 1]);      // r0 c0, r1 c0, r0 c1, r1 c1 | the same for c4, c5
    pair[r + 1] = _mm256_unpackhi_ps(row[r], row[r + 1]);  // c2, c3 | c6, c7
  }
  for (int r = 0; r < 8; r += 4) {
    quad[r] = _mm256_shuffle_ps(pair[r], pair[r + 2], _MM_SHUFFLE(1, 0, 1, 0));      // rows r..r+3 of c0 | c4
    quad[r + 1] = _mm256_shuffle_ps(pair[r], pair[r + 2], _MM_SHUFFLE(3, 2, 3, 2));  // c1 | c5
    quad[r + 2] = _mm256_shuffle_ps(pair[r + 1], pair[r + 3], _MM_SHUFFLE(1, 0, 1, 0));  // c2 | c6
    quad[r + 3] = _mm256_shuffle_ps(pair[r + 1], pair[r + 3], _MM_SHUFFLE(3, 2, 3, 2));  // c3 | c7
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(dst + c * dst_stride, _mm256_permute2f128_ps(quad[c], quad[c + 4], 0x20));
    _mm256_storeu_ps(dst + (c + 4) * dst_stride, _mm256_permute2f128_ps(quad[c], quad[c + 4], 0x31));
  }
}

// dst[c * dst_stride + r] = factor * src[r * src_stride + c] for r < rows, c < cols: whole 8 x 8 blocks by
// transpose_8x8, the edges value by value.
__attribute__((target("avx2"))) inline void transpose_rows(const float* src, int64_t src_stride, int64_t rows,
                                                           int64_t cols, float factor, float* dst,
                                                           int64_t dst_stride) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) {
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) transpose_8x8(src + r * src_stride + c, src_stride, factor, dst + c * dst_stride + r,
                                                dst_stride);
    for (; c < cols; ++c)
      for (int64_t i = r; i < r + 8; ++i) dst[c * dst_stride + i] = factor * src[i * src_stride + c];
  }
  for (; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * dst_stride + r] = factor * src[r * src_stride + c];
}

#endif

// The panels of `n` keys (rows of a [n, head_dim] matrix at src[r * row_stride + c * col_stride]), widened to
// float: ceil(n / 16) * head_dim * 16 floats at dst. Only called where the CPU runs the panels (AVX2 and FMA).
template <typename scalar_t>
void pack_key_panels(const scalar_t* src, int64_t row_stride, int64_t col_stride, int64_t n, int64_t head_dim,
                     float* dst) {
  const int64_t panels = (n + kPanelKeys - 1) / kPanelKeys;
  // Only a partial last panel has values past the last key (zeros); every other value is written below.
  if (n % kPanelKeys != 0)
    std::memset(dst + (panels - 1) * head_dim * kPanelKeys, 0, sizeof(float) * head_dim * kPanelKeys);
#if VITMAD_PANEL_LOGITS
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (col_stride == 1) {  // the usual [..., N, D] keys: transposed in registers
      for (int64_t p = 0; p < panels; ++p)
        transpose_rows(src + p * kPanelKeys * row_stride, row_stride, std::min(kPanelKeys, n - p * kPanelKeys),
                       head_dim, 1.0f, dst + p * head_dim * kPanelKeys, kPanelKeys);
      return;
    }
  }
#endif
  for (int64_t r = 0; r < n; ++r) {
    float* panel = dst + (r / kPanelKeys) * head_dim * kPanelKeys + r % kPanelKeys;
    for (int64_t c = 0; c < head_dim; ++c)
      panel[c * kPanelKeys] = static_cast<float>(src[r * row_stride + c * col_stride]);
  }
}

#if VITMAD_PANEL_LOGITS

// Rows [0, R) of a 16-key panel: 2R accumulators of 8 lanes (12 of AVX2's 16 registers at R = 6), each query
// value broadcast from memory into two FMAs. The head dimension is summed in chunks of kDepthChunk, each chunk's
// FMA chain from zero and then added to the logits (as MKL's blocked product adds its depth blocks): one chain
// over D = 512 had twice the error (MAD of 700 keys: 2.1e-5 relative at most against MKL's 8e-6).
constexpr int64_t kDepthChunk = 128;

template <int R>
__attribute__((target("avx2,fma"), always_inline)) inline void panel_tile(const float* q, int64_t head_dim,
                                                                         const float* panel, float* c, int64_t ldc) {
  for (int64_t chunk = 0; chunk < head_dim; chunk += kDepthChunk) {
    const int64_t chunk_end = chunk + kDepthChunk < head_dim ? chunk + kDepthChunk : head_dim;
    __m256 low[R], high[R];
    for (int r = 0; r < R; ++r) {
      low[r] = _mm256_setzero_ps();
      high[r] = _mm256_setzero_ps();
    }
#pragma GCC unroll 4
    for (int64_t d = chunk; d < chunk_end; ++d) {
      const __m256 keys_low = _mm256_loadu_ps(panel + d * kPanelKeys);
      const __m256 keys_high = _mm256_loadu_ps(panel + d * kPanelKeys + 8);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m256 query = _mm256_broadcast_ss(q + r * head_dim + d);
        low[r] = _mm256_fmadd_ps(query, keys_low, low[r]);
        high[r] = _mm256_fmadd_ps(query, keys_high, high[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      if (chunk > 0) {
        low[r] = _mm256_add_ps(_mm256_loadu_ps(c + r * ldc), low[r]);
        high[r] = _mm256_add_ps(_mm256_loadu_ps(c + r * ldc + 8), high[r]);
      }
      _mm256_storeu_ps(c + r * ldc, low[r]);
      _mm256_storeu_ps(c + r * ldc + 8, high[r]);
    }
  }
}

// c[i * ldc + j] = sum_d q[i * head_dim + d] * key_{16 p + j % 16}[d] for the `rows` query rows (contiguous,
// head_dim floats each) and the 16 * panels keys of the panels at `panels_begin`. Panel-major: one 16-key panel
// (4 KB at head_dim 64) stays in L1 while every 6-row strip of the queries passes over it.
__attribute__((target("avx2,fma"))) inline void panel_logits(const float* q, int64_t rows, int64_t head_dim,
                                                             const float* panels_begin, int64_t panels, float* c,
                                                             int64_t ldc) {
  for (int64_t p = 0; p < panels; ++p) {
    const float* panel = panels_begin + p * head_dim * kPanelKeys;
    float* column = c + p * kPanelKeys;
    int64_t r = 0;
    for (; r + 6 <= rows; r += 6) panel_tile<6>(q + r * head_dim, head_dim, panel, column + r * ldc, ldc);
    const float* q_tail = q + r * head_dim;
    float* c_tail = column + r * ldc;
    switch (rows - r) {
      case 5: panel_tile<5>(q_tail, head_dim, panel, c_tail, ldc); break;
      case 4: panel_tile<4>(q_tail, head_dim, panel, c_tail, ldc); break;
      case 3: panel_tile<3>(q_tail, head_dim, panel, c_tail, ldc); break;
      case 2: panel_tile<2>(q_tail, head_dim, panel, c_tail, ldc); break;
      case 1: panel_tile<1>(q_tail, head_dim, panel, c_tail, ldc); break;
      default: break;
    }
  }
}

// dst[s * head_dim * 8 + d * 8 + r] = factor * src[(8 s + r) * row_stride + d * col_stride]: `rows` query rows as
// depth-major strips of kWideStrip (the last strip's missing rows are left as they are: wide_panel_logits reads
// only the rows it is given).
template <typename scalar_t>
void pack_query_strips(const scalar_t* src, int64_t row_stride, int64_t col_stride, int64_t rows, int64_t head_dim,
                       float factor, float* dst) {
  const int64_t strips = (rows + kWideStrip - 1) / kWideStrip;
  for (int64_t s = 0; s < strips; ++s) {
    float* strip = dst + s * head_dim * kWideStrip;
    const int64_t strip_rows = std::min(kWideStrip, rows - s * kWideStrip);
    const scalar_t* first = src + s * kWideStrip * row_stride;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (col_stride == 1) {  // the usual [..., N, D] queries: transposed in registers
        transpose_rows(first, row_stride, strip_rows, head_dim, factor, strip, kWideStrip);
        continue;
      }
    }
    for (int64_t r = 0; r < strip_rows; ++r)
      for (int64_t d = 0; d < head_dim; ++d)
        strip[d * kWideStrip + r] = factor * static_cast<float>(first[r * row_stride + d * col_stride]);
  }
}

// The AVX-512 kernel on the same panels: a panel is one 16-lane register per query row, and a tile takes P
// consecutive panels (P = 2: 32 keys, 16 accumulators over 8 rows, of AVX-512's 32 registers) so that each
// broadcast query value feeds P FMAs. The queries come in strips of kWideStrip rows stored depth-major
// (pack_query_strips), so that a tile's broadcasts read one pointer at fixed offsets: with eight row pointers GCC
// ran out of general registers and reloaded one from the stack at every step. Every logit is the same FMA chain
// per 128-wide chunk as in panel_tile, so both kernels give the same bits.
template <int R, int P>
__attribute__((target("avx512f"), always_inline)) inline void wide_panel_tile(const float* q, int64_t head_dim,
                                                                              const float* panel, float* c,
                                                                              int64_t ldc) {
  const int64_t panel_size = head_dim * kPanelKeys;
  for (int64_t chunk = 0; chunk < head_dim; chunk += kDepthChunk) {
    const int64_t chunk_end = chunk + kDepthChunk < head_dim ? chunk + kDepthChunk : head_dim;
    __m512 sums[P][R];
    for (int p = 0; p < P; ++p)
      for (int r = 0; r < R; ++r) sums[p][r] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int64_t d = chunk; d < chunk_end; ++d) {
      __m512 keys[P];
      for (int p = 0; p < P; ++p) keys[p] = _mm512_loadu_ps(panel + p * panel_size + d * kPanelKeys);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 query = _mm512_set1_ps(q[d * kWideStrip + r]);
        for (int p = 0; p < P; ++p) sums[p][r] = _mm512_fmadd_ps(query, keys[p], sums[p][r]);
      }
    }
    for (int p = 0; p < P; ++p)
      for (int r = 0; r < R; ++r) {
        float* out = c + r * ldc + p * kPanelKeys;
        if (chunk > 0) sums[p][r] = _mm512_add_ps(_mm512_loadu_ps(out), sums[p][r]);
        _mm512_storeu_ps(out, sums[p][r]);
      }
  }
}

// Every query row's logits against the P panels at `panel` (their 16 P columns at c): whole strips through
// wide_panel_tile<kWideStrip, P>, the last rows of a partial strip through wide_panel_tile<rows, P>.
template <int P>
__attribute__((target("avx512f"))) inline void wide_panel_columns(const float* q, int64_t rows, int64_t head_dim,
                                                                  const float* panel, float* c, int64_t ldc) {
  int64_t r = 0;
  for (; r + kWideStrip <= rows; r += kWideStrip)
    wide_panel_tile<kWideStrip, P>(q + r * head_dim, head_dim, panel, c + r * ldc, ldc);
  q += r * head_dim;  // strip r / 8
  c += r * ldc;
  switch (rows - r) {
    case 7: wide_panel_tile<7, P>(q, head_dim, panel, c, ldc); break;
    case 6: wide_panel_tile<6, P>(q, head_dim, panel, c, ldc); break;
    case 5: wide_panel_tile<5, P>(q, head_dim, panel, c, ldc); break;
    case 4: wide_panel_tile<4, P>(q, head_dim, panel, c, ldc); break;
    case 3: wide_panel_tile<3, P>(q, head_dim, panel, c, ldc); break;
    case 2: wide_panel_tile<2, P>(q, head_dim, panel, c, ldc); break;
    case 1: wide_panel_tile<1, P>(q, head_dim, panel, c, ldc); break;
    default: break;
  }
}

// panel_logits on AVX-512, the queries packed by pack_query_strips: pairs of panels (16 KB at head_dim 128, in L1
// while every 8-row strip passes over them), the odd last panel alone.
__attribute__((target("avx512f"))) inline void wide_panel_logits(const float* q, int64_t rows, int64_t head_dim,
                                                                 const float* panels_begin, int64_t panels, float* c,
                                                                 int64_t ldc) {
  const int64_t panel_size = head_dim * kPanelKeys;
  int64_t p = 0;
  for (; p + 2 <= panels; p += 2)
    wide_panel_columns<2>(q, rows, head_dim, panels_begin + p * panel_size, c + p * kPanelKeys, ldc);
  if (p < panels) wide_panel_columns<1>(q, rows, head_dim, panels_begin + p * panel_size, c + p * kPanelKeys, ldc);
}

// Whether the CPU has what panel_logits needs.
inline bool cpu_runs_panel_logits() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// Whether the CPU also has AVX-512F (wide_panel_logits, and 64-byte vectors in the online update).
inline bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

#else

// Never called: use_panel_logits() is false where these stand in.
inline void panel_logits(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t) {}
inline void wide_panel_logits(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t) {}
template <typename scalar_t>
void pack_query_strips(const scalar_t*, int64_t, int64_t, int64_t, int64_t, float, float*) {}
inline bool cpu_runs_panel_logits() { return false; }
inline bool cpu_has_avx512() { return false; }

#endif

// VITMAD_CPU_LOGITS, checked once per process: "" (unset), "blas", "panels", "panels-avx2" or "amx".
inline const std::string& logits_route_choice() {
  static const std::string route = [] {
    const char* choice = std::getenv("VITMAD_CPU_LOGITS");
    const std::string chosen = choice == nullptr ? "" : choice;
    TORCH_CHECK(chosen.empty() || chosen == "blas" || chosen == "panels" || chosen == "panels-avx2" ||
                    chosen == "amx",
                "VITMAD_CPU_LOGITS must be 'blas', 'panels', 'panels-avx2', 'amx' or unset, got '", chosen, "'");
    return chosen;
  }();
  return route;
}

// Whether VITMAD_CPU_LOGITS names one of the panel kernels (which also keeps bfloat16 off the AMX tiles).
inline bool route_is_panels(const std::string& route) { return route == "panels" || route == "panels-avx2"; }

// Whether float32 logits (and widened 16-bit ones) come from the panels: by default wherever the CPU has AVX2 and
// FMA; VITMAD_CPU_LOGITS=blas chooses ATen's GEMM instead, =panels and =panels-avx2 insist on the panels, so that
// every route can be timed or tested on one machine; =amx leaves this choice to the default.
inline bool use_panel_logits() {
  static const bool use = [] {
    const std::string& route = logits_route_choice();
    if (route == "blas") return false;
    TORCH_CHECK(!route_is_panels(route) || cpu_runs_panel_logits(), "VITMAD_CPU_LOGITS=", route,
                " needs an x86-64 CPU with AVX2 and FMA, and this one has not both");
    return cpu_runs_panel_logits();
  }();
  return use;
}

// Whether the panels run on wide_panel_logits (AVX-512F) rather than panel_logits: wherever the CPU has AVX-512F,
// unless VITMAD_CPU_LOGITS=panels-avx2.
inline bool use_wide_panels() {
  static const bool use = cpu_has_avx512() && logits_route_choice() != "panels-avx2";
  return use;
}

}  // namespace vitmad
