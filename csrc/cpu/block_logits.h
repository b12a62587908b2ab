// The q_block @ k_block^T products of the mad_qk CPU kernel: scaled logits with float32 (float64 for float64)
// accumulation in a per-thread buffer. Keys and queries are packed to the accumulation type, so every input
// dtype and stride goes through one float32 / float64 product: panel_logits.h's AVX-512 or AVX2 kernel for
// float32 where it runs, else ATen's GEMM (MKL or OpenBLAS); except bfloat16 on CPUs with AMX-BF16, whose
// products run on the AMX tiles unwidened (tile_logits.h). (A bfloat16 micro-kernel on vdpbf16ps, without AMX,
// was tried: on an AVX512-BF16 Xeon it was slower than MKL's float32 GEMM on the widened blocks.)
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "panel_logits.h"
#include "tile_logits.h"

namespace vitmad {

// Whether this block product runs bfloat16 input on the AMX tiles (tile_logits.h): by default where the CPU has
// them; VITMAD_CPU_LOGITS=blas, =panels or =panels-avx2 widen it to float32 as other dtypes, =amx insists (an error
// without AMX).
// Decided per parallel task: oneDNN's micro-kernels also follow torch.backends.mkldnn.enabled.
template <typename scalar_t>
inline bool use_tile_logits() {
  if constexpr (!std::is_same_v<scalar_t, c10::BFloat16>) {
    return false;
  } else {
    const std::string& route = logits_route_choice();
    if (route == "blas" || route_is_panels(route)) return false;
    const bool runs = cpu_runs_tile_logits();
    TORCH_CHECK(route != "amx" || runs,
                "VITMAD_CPU_LOGITS=amx needs a CPU with AMX-BF16 and torch.backends.mkldnn enabled; this process "
                "has not both");
    return runs;
  }
}

// Queries per block and keys per block: a block's logits stay in L2 (64 x 512 float32 = 128 KiB), and each
// product is large enough that its call overhead is small against its work.
constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 512;
static_assert(kQueryBlock % kWideStrip == 0, "query blocks are whole strips of the AVX-512 panels");
static_assert(kKeyBlock % kPanelKeys == 0, "key blocks start on a panel");

// dst[r * cols + c] = factor * src[r * row_stride + c * col_stride]: a contiguous block in the GEMM's dtype.
template <typename scalar_t, typename acc_t>
void pack_block(const scalar_t* src, int64_t row_stride, int64_t col_stride, int64_t rows, int64_t cols, acc_t factor,
                acc_t* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      dst[r * cols + c] = factor * static_cast<acc_t>(src[r * row_stride + c * col_stride]);
}

// set_keys(matrix) packs a matrix's N keys once (a no-op when the same matrix comes again, as consecutive tasks
// of a thread usually share one); set_queries(block) packs a query block; logits(k_begin, cols) returns the
// scaled logits of the query block against keys [k_begin, k_begin + cols), row i at result + i * row_stride(),
// in a buffer the caller may modify (the kernel adds the bias in place). Memory: O(N * D) per thread for the
// keys, O(block^2) for the logits.
template <typename scalar_t, typename acc_t>
class GemmLogits {
 public:
  explicit GemmLogits(int64_t head_dim)
      : head_dim_(head_dim),
        panels_(std::is_same_v<acc_t, float> && use_panel_logits()),
        wide_panels_(panels_ && use_wide_panels()),
        q_(kQueryBlock * head_dim),
        logits_(kQueryBlock * kKeyBlock) {
    if constexpr (std::is_same_v<acc_t, float>)
      if (use_tile_logits<scalar_t>()) tiles_.emplace(head_dim);
  }

  void set_keys(const scalar_t* src, int64_t row_stride, int64_t col_stride, int64_t n) {
    if (src == keys_source_) return;
    keys_source_ = src;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (tiles_.has_value()) {
        tiles_->set_keys(src, row_stride, col_stride, n);
        return;
      }
    }
    if constexpr (std::is_same_v<acc_t, float>) {
      if (panels_) {
        k_.resize((n + kPanelKeys - 1) / kPanelKeys * kPanelKeys * head_dim_);
        pack_key_panels(src, row_stride, col_stride, n, head_dim_, k_.data());
        return;
      }
    }
    k_.resize(n * head_dim_);
    pack_block(src, row_stride, col_stride, n, head_dim_, acc_t(1), k_.data());
  }

  // The scale is folded into the packed queries, so the product yields scaled logits.
  void set_queries(const scalar_t* src, int64_t row_stride, int64_t col_stride, int64_t rows, double scale) {
    rows_ = rows;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (tiles_.has_value()) {
        tiles_->set_queries(src, row_stride, col_stride, rows, scale);
        return;
      }
    }
    if constexpr (std::is_same_v<acc_t, float>) {
      if (wide_panels_) {
        pack_query_strips(src, row_stride, col_stride, rows, head_dim_, static_cast<float>(scale), q_.data());
        return;
      }
    }
    pack_block(src, row_stride, col_stride, rows, head_dim_, static_cast<acc_t>(scale), q_.data());
  }

  acc_t* logits(int64_t k_begin, int64_t cols) {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (tiles_.has_value()) {
        // Whole 64-key panels, kKeyBlock floats apart, as the panel route.
        static_assert(kKeyBlock % kTileKeys == 0, "key blocks start on a tile panel");
        row_stride_ = kKeyBlock;
        tiles_->logits(k_begin, cols, logits_.data(), kKeyBlock);
        return logits_.data();
      }
      if (panels_) {
        // Whole panels, kKeyBlock floats apart: the columns past `cols` are written but not read.
        row_stride_ = kKeyBlock;
        const int64_t panels = (cols + kPanelKeys - 1) / kPanelKeys;
        if (wide_panels_)
          wide_panel_logits(q_.data(), rows_, head_dim_, k_.data() + k_begin * head_dim_, panels, logits_.data(),
                            kKeyBlock);
        else
          panel_logits(q_.data(), rows_, head_dim_, k_.data() + k_begin * head_dim_, panels, logits_.data(),
                       kKeyBlock);
        return logits_.data();
      }
    }
    row_stride_ = cols;
    const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor out = at::from_blob(logits_.data(), {rows_, cols}, options);
    at::mm_out(out, at::from_blob(q_.data(), {rows_, head_dim_}, options),
               at::from_blob(k_.data() + k_begin * head_dim_, {cols, head_dim_}, options).t());
    return logits_.data();
  }

  int64_t row_stride() const { return row_stride_; }

 private:
  int64_t head_dim_;
  bool panels_;       // float32 through the panels (keys in panels), else ATen's GEMM (keys row-major)
  bool wide_panels_;  // the panels on wide_panel_logits (AVX-512F), else on panel_logits
  int64_t rows_ = 0;
  int64_t row_stride_ = 0;
  const scalar_t* keys_source_ = nullptr;
  std::vector<acc_t> q_, k_, logits_;
  std::optional<TileLogits> tiles_;  // bfloat16 on AMX tiles (then q_ and k_ stay unused)
};

}  // namespace vitmad
