// float32 logit blocks q_block @ k_block^T for the mad_qk CPU kernel on AVX2 + FMA CPUs (block_logits.h), from
// keys packed once per matrix in panels of 16 keys.
//
// Why not ATen's GEMM, as before: MKL packs its right-hand matrix on every call, and the kernel calls it once per
// 64-query x 512-key block, each time with a different query block against the same keys. On VideoMAE-B's pass
// (2 x 12 x 1568 x 64, one thread, AMD EPYC Zen 3, perf) MKL's packing (`sgemm_scopy_right16`) and the zeroing of
// its output (`sgemm_mscale`) took 18% of the pass against 46% for its arithmetic; the keys here are packed once
// per matrix, and these blocks run at 1.3-1.6x MKL's speed (64-84 against 39-65 GFLOP/s, C++ harness, same VM).
// On CPUs with AVX-512 MKL's kernels are twice as wide as this one, so the kernel keeps ATen's GEMM there (and on
// anything but x86-64); use_panel_logits() says which, VITMAD_CPU_LOGITS overrides it.
//
// Layout: panel p holds keys [16 p, 16 p + 16) as [head_dim][16] floats, zero past the last key. A block of logits
// is written row by row with `ldc` floats between rows, in whole panels (the columns past the block's last key
// are products with zero keys, which the caller does not read). Each logit is a sum of FMA chains over 128-wide
// chunks of the head dimension (panel_tile), float32 throughout, as in the GEMM it replaces.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VITMAD_PANEL_LOGITS 1
#else
#define VITMAD_PANEL_LOGITS 0
#endif

namespace vitmad {

constexpr int64_t kPanelKeys = 16;

// The panels of `n` keys (rows of a [n, head_dim] matrix at src[r * row_stride + c * col_stride]), widened to
// float: ceil(n / 16) * head_dim * 16 floats at dst.
template <typename scalar_t>
void pack_key_panels(const scalar_t* src, int64_t row_stride, int64_t col_stride, int64_t n, int64_t head_dim,
                     float* dst) {
  const int64_t panels = (n + kPanelKeys - 1) / kPanelKeys;
  std::memset(dst, 0, sizeof(float) * panels * head_dim * kPanelKeys);
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

// Whether the CPU has what panel_logits needs.
inline bool cpu_runs_panel_logits() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// Whether the CPU also has AVX-512F, where MKL's kernels are twice as wide as panel_logits.
inline bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

#else

// Never called: use_panel_logits() is false where these stand in.
inline void panel_logits(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t) {}
inline bool cpu_runs_panel_logits() { return false; }
inline bool cpu_has_avx512() { return false; }

#endif

// VITMAD_CPU_LOGITS, checked once per process: "" (unset), "blas", "panels" or "amx".
inline const std::string& logits_route_choice() {
  static const std::string route = [] {
    const char* choice = std::getenv("VITMAD_CPU_LOGITS");
    const std::string chosen = choice == nullptr ? "" : choice;
    TORCH_CHECK(chosen.empty() || chosen == "blas" || chosen == "panels" || chosen == "amx",
                "VITMAD_CPU_LOGITS must be 'blas', 'panels', 'amx' or unset, got '", chosen, "'");
    return chosen;
  }();
  return route;
}

// Whether float32 logits (and widened 16-bit ones) come from panel_logits: by default where the CPU has AVX2 and
// FMA but not AVX-512F; VITMAD_CPU_LOGITS=blas chooses ATen's GEMM and =panels the panels (on any CPU with AVX2
// and FMA), so that either route can be timed or tested on one machine; =amx leaves this choice to the default.
inline bool use_panel_logits() {
  static const bool use = [] {
    const std::string& route = logits_route_choice();
    if (route == "blas") return false;
    TORCH_CHECK(route != "panels" || cpu_runs_panel_logits(),
                "VITMAD_CPU_LOGITS=panels needs an x86-64 CPU with AVX2 and FMA, and this one has not both");
    return cpu_runs_panel_logits() && (route == "panels" || !cpu_has_avx512());
  }();
  return use;
}

}  // namespace vitmad
