// Argument checking of the position form of every op (vitmad::mad_pos, mad_pos_backward, mad_qk_pos): where each
// query and key token is, as a [..., N, K] tensor broadcast against the attention's leading dims
// (docs/definition.md, "Beyond one grid: where each token is"). Turns the user's tensors into kernel-ready
// positions or a clear error.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <vector>

#include "mad_geometry.h"

namespace vitmad {

constexpr int64_t kMaxPositionDims = 3;

struct PositionLayout {
  int64_t num_queries;   // Nq: attention rows
  int64_t num_keys;      // Nk: attention columns
  int64_t dims;          // K: coordinates per position, 1 to 3
  int64_t num_matrices;  // product of the attention's leading dimensions
  bool renormalize;
  bool reduce_mean;  // "mean" (one value per matrix) or "none" (one value per query)
};

// The positions of one side (queries or keys) as the kernels read them: `values` is the user's tensor when it
// has the accumulation dtype, else a converted copy of its non-broadcast part (never an expansion); matrix b of
// the attention finds its [N, K] positions at values + offsets(b), row t at + t * row_stride, coordinate c at
// + c * coord_stride. A row of NaN is a token without a position.
struct TokenPositions {
  at::Tensor values;
  MatrixOffsets offsets;
  int64_t row_stride;
  int64_t coord_stride;
};

struct PositionArgs {
  PositionLayout layout;
  TokenPositions queries;
  TokenPositions keys;  // the same as queries when key_positions is None
};

template <typename acc_t>
PositionRows<acc_t> position_rows(const TokenPositions& p, int64_t dims) {
  return PositionRows<acc_t>{p.values.const_data_ptr<acc_t>(), p.offsets, p.row_stride, p.coord_stride, dims};
}

// Checks positions [..., Nq, K] and key_positions [..., Nk, K] (None: positions, then Nq must equal Nk) against
// `tokens` (attn or q; its shape[:-2] are the leading dims) with Nq queries and Nk keys, and reduction. Values
// (NaN rows, infinities) are checked on the host when `check_values` (CUDA skips it while capturing a graph).
// Positions are returned in `acc_dtype` on tokens' device.
PositionArgs check_position_args(const at::Tensor& tokens, int64_t num_queries, int64_t num_keys,
                                 const at::Tensor& positions, const std::optional<at::Tensor>& key_positions,
                                 bool renormalize, std::string_view reduction, at::ScalarType acc_dtype,
                                 bool check_values, const char* op_name);

// Checks the frames of a video's tokens, times [..., Nq, 1] and key_times [..., Nk, 1] (given exactly when
// key_positions is), beside positions already checked by check_position_args: a token has a time exactly when it
// has a position (checked on the host when `check_values`). Returned as one-coordinate positions.
PositionArgs check_time_args(const at::Tensor& tokens, const PositionArgs& positions_args,
                             const at::Tensor& positions, const std::optional<at::Tensor>& key_positions,
                             const at::Tensor& times, const std::optional<at::Tensor>& key_times,
                             at::ScalarType acc_dtype, bool check_values, const char* op_name);

// The per-query gradient of mad_pos's output, [num_matrices, Nq] contiguous in the output dtype: grad itself
// for "none"; for "mean", grad[b] divided by matrix b's number of queries with a position.
at::Tensor per_query_grad(const at::Tensor& grad, const at::Tensor& attn, const PositionArgs& args);

}  // namespace vitmad
