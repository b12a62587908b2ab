// bfloat16 logit blocks q_block @ k_block^T for the mad_qk CPU kernel on CPUs with AMX-BF16 (Sapphire Rapids and
// newer Xeons), through ATen's oneDNN micro-kernels (at::native::cpublas::pack and brgemm, as SDPA's CPU flash
// kernel uses them): the products of bfloat16 pairs are exact in float32 and summed in float32, the precision of
// the widened float32 product this replaces, at about three times its speed on these blocks (64 x 64 x 512 on a
// Xeon, one core: 21 us against 66 us for MKL's SGEMM on the widened block).
//
// The scale: a power of two (D ** -0.5 for D = 16, 64, 256, ...) is folded into the bfloat16 queries, exactly
// (the products keep every bit unless one leaves float's normal range, which the copy checks); any other
// scale multiplies the float32 logits, as the widened product's folding into float32 queries rounds once too.
//
// Layout: keys packed once per matrix in panels of 64 (oneDNN packs 16-64 columns of B at a time), each the
// transposed [head_dim', 64] panel in oneDNN's VNNI order, zero past the last key; head_dim' is the head dimension
// rounded up to even (VNNI pairs rows; the padding row and the queries' padding column are zero). Queries are
// copied as they are, scaled only where that is exact (above).
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mad_cpu_common.h"

namespace vitmad {

constexpr int64_t kTileKeys = 64;

// Whether this process can run the tile route: oneDNN's micro-kernels packing bfloat16 (AMX-BF16, and
// torch.backends.mkldnn enabled).
inline bool cpu_runs_tile_logits() { return at::native::cpublas::could_pack(at::kBFloat16); }

// rows x cols floats, ld apart, times scale (the logits of a scale that could not be folded into the queries).
VITMAD_CPU_CLONES inline void scale_block(float* out, int64_t rows, int64_t cols, int64_t ld, float scale) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = out + i * ld;
    for (int64_t j = 0; j < cols; ++j) row[j] *= scale;
  }
}

// dst[c] = src[c * stride] * factor for c < n, factor a power of two; whether every product is exact: a bfloat16
// again (its low 16 float bits zero) that gives back the input when divided by factor (so not below float's normal
// range, not overflowed, not NaN: the caller then copies the row unscaled). Bit operations on the bfloat16 bits
// (the upper half of a float's), so that the loop vectorises; a query block's copy was 9% of a bfloat16 pass
// over 8 x 16 x 577 x 64 with c10::BFloat16's rounding conversions.
VITMAD_CPU_CLONES inline bool scale_bf16_row(const c10::BFloat16* src, int64_t stride, int64_t n, float factor,
                                             c10::BFloat16* dst) {
  const float inverse = 1.0f / factor;
  const auto* in = reinterpret_cast<const uint16_t*>(src);
  auto* out = reinterpret_cast<uint16_t*>(dst);
  uint32_t inexact = 0;
  const auto scale_one = [&](uint16_t value) {
    const float x = std::bit_cast<float>(static_cast<uint32_t>(value) << 16);
    const float y = x * factor;
    const auto bits = std::bit_cast<uint32_t>(y);
    inexact |= (bits & 0xffffu) | static_cast<uint32_t>(y * inverse != x);
    return static_cast<uint16_t>(bits >> 16);
  };
  if (stride == 1) {  // the usual [..., N, D] rows: a loop GCC vectorises
    for (int64_t c = 0; c < n; ++c) out[c] = scale_one(in[c]);
  } else {
    for (int64_t c = 0; c < n; ++c) out[c] = scale_one(in[c * stride]);
  }
  return inexact == 0;
}

class TileLogits {
 public:
  explicit TileLogits(int64_t head_dim) : head_dim_(head_dim), depth_(head_dim + head_dim % 2) {}
  TileLogits(const TileLogits& other) : head_dim_(other.head_dim_), depth_(other.depth_) {}
  TileLogits& operator=(const TileLogits&) = delete;
  // The tile configuration belongs to the thread: released when the last product of a parallel task is done, so
  // that other code on this thread (the model's own layers) starts from a clean state.
  ~TileLogits() {
    if (used_) at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  }

  void set_keys(const c10::BFloat16* src, int64_t row_stride, int64_t col_stride, int64_t n) {
    const int64_t panels = (n + kTileKeys - 1) / kTileKeys;
    keys_.resize(panels * depth_ * kTileKeys);
    std::vector<c10::BFloat16> panel(depth_ * kTileKeys);
    for (int64_t p = 0; p < panels; ++p) {
      std::fill(panel.begin(), panel.end(), c10::BFloat16(0.0f));
      const int64_t count = std::min(kTileKeys, n - p * kTileKeys);
      for (int64_t j = 0; j < count; ++j) {
        const c10::BFloat16* key = src + (p * kTileKeys + j) * row_stride;
        for (int64_t c = 0; c < head_dim_; ++c) panel[c * kTileKeys + j] = key[c * col_stride];
      }
      at::native::cpublas::pack(depth_, kTileKeys, kTileKeys, kTileKeys, at::kBFloat16, at::kBFloat16, panel.data(),
                                keys_.data() + p * depth_ * kTileKeys);
    }
  }

  void set_queries(const c10::BFloat16* src, int64_t row_stride, int64_t col_stride, int64_t rows, double scale) {
    rows_ = rows;
    queries_.resize(rows * depth_);
    const auto factor = static_cast<float>(scale);
    int exponent = 0;
    bool folded = std::frexp(factor, &exponent) == 0.5f;  // a power of two
    for (int64_t r = 0; r < rows && folded; ++r)
      folded = scale_bf16_row(src + r * row_stride, col_stride, head_dim_, factor, queries_.data() + r * depth_);
    logit_factor_ = folded ? 1.0f : factor;
    if (!folded)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < head_dim_; ++c) queries_[r * depth_ + c] = src[r * row_stride + c * col_stride];
    if (depth_ != head_dim_)
      for (int64_t r = 0; r < rows; ++r) queries_[r * depth_ + head_dim_] = c10::BFloat16(0.0f);
  }

  // Scaled logits of the query block against keys [k_begin, k_begin + cols), k_begin a multiple of kTileKeys,
  // row i at out + i * ldc, in whole panels (the columns past `cols` are products with zero keys, unread).
  void logits(int64_t k_begin, int64_t cols, float* out, int64_t ldc) {
    used_ = true;
    const int64_t first = k_begin / kTileKeys;
    const int64_t last = (k_begin + cols + kTileKeys - 1) / kTileKeys;
    for (int64_t p = first; p < last; ++p)
      at::native::cpublas::brgemm(rows_, kTileKeys, depth_, depth_, kTileKeys, ldc, /*add_C=*/false,
                                  queries_.data(), keys_.data() + p * depth_ * kTileKeys,
                                  out + (p - first) * kTileKeys, /*is_vnni=*/true);
    if (logit_factor_ != 1.0f) scale_block(out, rows_, cols, ldc, logit_factor_);
  }

 private:
  int64_t head_dim_;
  int64_t depth_;  // head_dim rounded up to even
  int64_t rows_ = 0;
  float logit_factor_ = 1.0f;  // the scale, where set_queries could not fold it exactly
  bool used_ = false;
  std::vector<c10::BFloat16> queries_, keys_;
};

}  // namespace vitmad
