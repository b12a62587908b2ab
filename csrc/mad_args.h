// Argument checking shared by every backend of vitmad::mad, vitmad::mad_backward and vitmad::mad_qk: one place
// that turns the user's (attn or q/k, patch, num_prefix_tokens, grid, reduction) into a validated layout or a
// clear error.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>

#include <optional>

#include <string_view>
#include <vector>

#include "mad_geometry.h"

namespace vitmad {

// Where the patch tokens are inside an [..., N, N] attention tensor.
struct MadLayout {
  int64_t num_tokens;   // N
  int64_t num_prefix;   // P: CLS, distillation and register tokens, no position
  int64_t grid_h;       // patch rows
  int64_t grid_w;       // patch columns
  int64_t num_patches;  // N - P == grid_h * grid_w
  int64_t num_matrices; // product of the leading dimensions
  bool renormalize;
  bool reduce_mean;     // "mean" (one value per matrix) or "none" (one value per query patch)
};

// The checks of patch, num_prefix_tokens, grid and reduction for N tokens in `num_matrices` matrices;
// `tokens_arg` names the tensor that holds the tokens in messages ("attn", "q").
MadLayout check_mad_options(int64_t n, int64_t num_matrices, int64_t patch, int64_t num_prefix_tokens,
                            at::OptionalIntArrayRef grid, bool renormalize, std::string_view reduction,
                            const char* tokens_arg, const char* op_name);

// attn: dense, float16 / bfloat16 / float32 / float64, at least 2 dims (`shape` says which, in the message).
void check_attn_tensor(const at::Tensor& attn, const char* shape, const char* op_name);

MadLayout check_mad_args(const at::Tensor& attn, int64_t patch, int64_t num_prefix_tokens,
                         at::OptionalIntArrayRef grid, bool renormalize, std::string_view reduction,
                         const char* op_name);

// float16, bfloat16, float32 or float64: the dtypes of attn and q.
bool is_supported_dtype(at::ScalarType t);

// What the checks of q, k and attn_bias establish, for both forms of mad_qk.
struct QkShape {
  int64_t num_queries;   // Nq: q's tokens
  int64_t num_keys;      // Nk: k's tokens
  int64_t head_dim;      // D
  int64_t num_matrices;  // product of q's leading dimensions
  double scale;          // the logits' scale: the given one, or D ** -0.5
};

// q [..., Nq, D] and k [..., Nk, D]: the same float dtype, leading dims, D and device; Nk == Nq when
// `same_tokens` (the grid form). attn_bias: q's dtype (added to the logits) or bool (True keeps a key, as in
// F.scaled_dot_product_attention), broadcastable to [..., Nq, Nk], on q's device.
QkShape check_qk_tensors(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale,
                         const std::optional<at::Tensor>& attn_bias, bool same_tokens, const char* op_name);

// vitmad::mad_qk: MAD of softmax(q @ k^T * scale + attn_bias) over queries and keys of shape [..., N, D].
struct MadQkLayout {
  MadLayout mad;     // the attention's layout: N, P, grid, number of matrices, options
  int64_t head_dim;  // D
  double scale;      // the logits' scale: the given one, or D ** -0.5
};

// check_qk_tensors with Nk == Nq, then the grid options.
MadQkLayout check_mad_qk_args(const at::Tensor& q, const at::Tensor& k, int64_t patch, int64_t num_prefix_tokens,
                              at::OptionalIntArrayRef grid, std::optional<double> scale,
                              const std::optional<at::Tensor>& attn_bias, bool renormalize,
                              std::string_view reduction, const char* op_name);

// q.shape[:-1] + [Nk]: the shape of the logits q @ k^T.
std::vector<int64_t> logits_shape(const at::Tensor& q, const at::Tensor& k);

// attn_bias seen as [..., Nq, Nk] through broadcast (zero) strides: a view, never a copy.
at::Tensor broadcast_attn_bias(const at::Tensor& attn_bias, const at::Tensor& q, const at::Tensor& k);

// Float32 for 16- and 32-bit attention, float64 for float64 (docs/definition.md, "Output dtype").
at::ScalarType mad_output_dtype(at::ScalarType attn_dtype);

// The output's shape for `tokens` (attn or q) of shape [..., Nq, X]: [...] for "mean", [..., num_queries] for
// "none" (N - P for the grid form, Nq for the position form).
std::vector<int64_t> mad_output_shape(const at::Tensor& tokens, bool reduce_mean, int64_t num_queries);

// What a forward kernel fills: the per-query buffer and the op's result, in the output dtype on tokens' device.
struct MadOutputs {
  at::Tensor per_query;  // [num_matrices, num_queries]
  at::Tensor out;        // [...] for "mean"; [..., num_queries] for "none", a view of per_query
};
MadOutputs empty_mad_outputs(const at::Tensor& tokens, int64_t num_matrices, int64_t num_queries, bool reduce_mean);

// The gradient of mad's output must have the output's shape (num_queries per matrix for "none"); returns it as a
// contiguous tensor in the output dtype, on attn's device.
at::Tensor check_mad_grad(const at::Tensor& grad, const at::Tensor& attn, bool reduce_mean, int64_t num_queries);

// Where each [N, X] matrix of an [..., N, X] tensor (attn, q, k, a bias view) starts, for its strides (read in
// place, never copied); arg_name names the tensor in the error.
MatrixOffsets matrix_offsets(const at::Tensor& tensor, const char* op_name, const char* arg_name = "attn");

}  // namespace vitmad
