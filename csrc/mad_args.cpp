#include "mad_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <cmath>
#include <limits>
#include <string>

#include "dtype_name.h"

namespace vitmad {
namespace {

// Exact integer square root, or -1 when n is not a perfect square.
int64_t exact_isqrt(int64_t n) {
  auto r = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(n))));
  while (r * r > n) --r;
  while ((r + 1) * (r + 1) <= n) ++r;
  return r * r == n ? r : -1;
}

}  // namespace

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

MadLayout check_mad_options(int64_t n, int64_t num_matrices, int64_t patch, int64_t num_prefix_tokens,
                            at::OptionalIntArrayRef grid, bool renormalize, std::string_view reduction,
                            const char* tokens_arg, const char* op_name) {
  TORCH_CHECK_VALUE(patch > 0, op_name, ": patch must be a positive patch size in pixels, got ", patch);
  TORCH_CHECK_VALUE(num_prefix_tokens >= 0 && num_prefix_tokens < n, op_name,
                    ": num_prefix_tokens must be in [0, N) with N = ", n, " tokens, got ", num_prefix_tokens);
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "none", op_name,
                    ": reduction must be 'mean' or 'none', got '", reduction, "'");

  const int64_t num_patches = n - num_prefix_tokens;
  int64_t grid_h = 0;
  int64_t grid_w = 0;
  if (grid.has_value()) {
    const auto g = *grid;
    TORCH_CHECK_VALUE(g.size() == 2, op_name, ": grid must be [grid_h, grid_w] (2 values), got ", g.size(),
                      " values ", g);
    TORCH_CHECK_VALUE(g[0] > 0 && g[1] > 0, op_name, ": grid must hold positive sizes, got ", g);
    // An absurd grid's product can overflow int64 and wrap onto num_patches (then the kernels index far out of
    // bounds): overflow counts as a mismatch.
    int64_t grid_patches = 0;
    const bool overflows = c10::mul_overflows(g[0], g[1], &grid_patches);
    TORCH_CHECK_VALUE(!overflows && grid_patches == num_patches, op_name, ": grid ", g, " has ",
                      overflows ? std::string("more than 2^63") : std::to_string(grid_patches), " patches but ",
                      tokens_arg, " has N - num_prefix_tokens = ", n, " - ", num_prefix_tokens, " = ", num_patches,
                      " patch tokens");
    grid_h = g[0];
    grid_w = g[1];
  } else {
    const int64_t side = exact_isqrt(num_patches);
    TORCH_CHECK_VALUE(side > 0, op_name, ": N - num_prefix_tokens = ", n, " - ", num_prefix_tokens, " = ",
                      num_patches, " patch tokens do not form a square grid; pass grid=[grid_h, grid_w]");
    grid_h = side;
    grid_w = side;
  }

  return MadLayout{n, num_prefix_tokens, grid_h, grid_w, num_patches, num_matrices, renormalize,
                   reduction == "mean"};
}

void check_attn_tensor(const at::Tensor& attn, const char* shape, const char* op_name) {
  TORCH_CHECK_VALUE(attn.layout() == at::kStrided, op_name,
                    ": attn must be a dense (strided) tensor, got layout ", attn.layout());
  TORCH_CHECK_TYPE(is_supported_dtype(attn.scalar_type()), op_name,
                   ": attn must be float16, bfloat16, float32 or float64, got ", dtype_name(attn.scalar_type()));
  TORCH_CHECK_VALUE(attn.dim() >= 2, op_name, ": attn must have at least 2 dimensions ", shape, ", got shape ",
                    attn.sizes());
}

MadLayout check_mad_args(const at::Tensor& attn, int64_t patch, int64_t num_prefix_tokens, at::OptionalIntArrayRef grid,
                         bool renormalize, std::string_view reduction, const char* op_name) {
  check_attn_tensor(attn, "[..., N, N]", op_name);
  const int64_t n = attn.size(-1);
  TORCH_CHECK_VALUE(attn.size(-2) == n, op_name,
                    ": attn must be square in its last two dimensions [..., N, N] (queries x keys), got shape ",
                    attn.sizes());
  int64_t num_matrices = 1;
  for (int64_t d = 0; d < attn.dim() - 2; ++d) num_matrices *= attn.size(d);
  return check_mad_options(n, num_matrices, patch, num_prefix_tokens, grid, renormalize, reduction, "attn", op_name);
}

at::ScalarType mad_output_dtype(at::ScalarType attn_dtype) {
  return attn_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<int64_t> mad_output_shape(const at::Tensor& tokens, bool reduce_mean, int64_t num_queries) {
  std::vector<int64_t> shape(tokens.sizes().begin(), tokens.sizes().end() - 2);
  if (!reduce_mean) shape.push_back(num_queries);
  return shape;
}

MadOutputs empty_mad_outputs(const at::Tensor& tokens, int64_t num_matrices, int64_t num_queries, bool reduce_mean) {
  const auto options = tokens.options().dtype(mad_output_dtype(tokens.scalar_type()));
  at::Tensor per_query = at::empty({num_matrices, num_queries}, options);
  const auto shape = mad_output_shape(tokens, reduce_mean, num_queries);
  return MadOutputs{per_query, reduce_mean ? at::empty(shape, options) : per_query.view(shape)};
}

at::Tensor check_mad_grad(const at::Tensor& grad, const at::Tensor& attn, bool reduce_mean, int64_t num_queries) {
  const auto expected = mad_output_shape(attn, reduce_mean, num_queries);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef(expected),
                    "vitmad.mad_backward: grad must have the shape of mad's output ", at::IntArrayRef(expected),
                    ", got ", grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == attn.device(), "vitmad.mad_backward: grad must be on attn's device ",
                    attn.device(), ", got ", grad.device());
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()),
                   "vitmad.mad_backward: grad must be a floating-point tensor, got ", dtype_name(grad.scalar_type()));
  return grad.to(mad_output_dtype(attn.scalar_type())).contiguous();
}

MatrixOffsets matrix_offsets(const at::Tensor& tensor, const char* op_name, const char* arg_name) {
  MatrixOffsets offsets{};
  const bool fits = make_matrix_offsets(tensor.sizes().data(), tensor.strides().data(), tensor.dim() - 2, offsets);
  TORCH_CHECK_VALUE(fits, op_name, ": ", arg_name, "'s leading dimensions must merge into at most ", kMaxLeadingDims,
                    " strided dimensions, got shape ", tensor.sizes(), " with strides ", tensor.strides());
  return offsets;
}

QkShape check_qk_tensors(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale,
                         const std::optional<at::Tensor>& attn_bias, bool same_tokens, const char* op_name) {
  TORCH_CHECK_VALUE(q.layout() == at::kStrided, op_name, ": q must be a dense (strided) tensor, got layout ",
                    q.layout());
  TORCH_CHECK_VALUE(k.layout() == at::kStrided, op_name, ": k must be a dense (strided) tensor, got layout ",
                    k.layout());
  TORCH_CHECK_TYPE(is_supported_dtype(q.scalar_type()), op_name,
                   ": q must be float16, bfloat16, float32 or float64, got ", dtype_name(q.scalar_type()));
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op_name, ": k must have q's dtype ", dtype_name(q.scalar_type()),
                   ", got ", dtype_name(k.scalar_type()));
  TORCH_CHECK_VALUE(q.dim() >= 2, op_name, ": q must have at least 2 dimensions [..., N, D], got shape ",
                    q.sizes());
  TORCH_CHECK_VALUE(k.dim() == q.dim() && k.sizes().slice(0, k.dim() - 2) == q.sizes().slice(0, q.dim() - 2),
                    op_name, ": k must have q's leading dimensions, shape [..., N, D] = ",
                    q.sizes().slice(0, q.dim() - 2), " + [N, D], got k of shape ", k.sizes(), " and q of shape ",
                    q.sizes());
  const int64_t nq = q.size(-2);
  const int64_t nk = k.size(-2);
  const int64_t d = q.size(-1);
  TORCH_CHECK_VALUE(d > 0, op_name, ": q must have a head dimension D > 0, got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.size(-1) == d, op_name, ": k must have q's head dimension D = ", d, ", got shape ",
                    k.sizes());
  TORCH_CHECK_VALUE(!same_tokens || nk == nq, op_name, ": k must have q's number of tokens N = ", nq, ", got shape ",
                    k.sizes());
  TORCH_CHECK_VALUE(k.device() == q.device(), op_name, ": k must be on q's device ", q.device(), ", got ",
                    k.device());
  TORCH_CHECK_VALUE(!scale.has_value() || std::isfinite(*scale), op_name, ": scale must be finite, got ",
                    scale.value_or(0.0));
  // The logits of 16-bit and float32 q are computed in float32, where such a scale is infinite.
  TORCH_CHECK_VALUE(!scale.has_value() || q.scalar_type() == at::kDouble ||
                        std::abs(*scale) <= static_cast<double>(std::numeric_limits<float>::max()),
                    op_name, ": scale must be finite in float32, the precision of the logits of ",
                    dtype_name(q.scalar_type()), " q (|scale| <= ", std::numeric_limits<float>::max(), "), got ",
                    *scale);
  if (attn_bias.has_value()) {
    const at::Tensor& bias = *attn_bias;
    TORCH_CHECK_VALUE(bias.layout() == at::kStrided, op_name,
                      ": attn_bias must be a dense (strided) tensor, got layout ", bias.layout());
    TORCH_CHECK_TYPE(bias.scalar_type() == q.scalar_type() || bias.scalar_type() == at::kBool, op_name,
                     ": attn_bias must have q's dtype ", dtype_name(q.scalar_type()),
                     " (added to the logits) or be bool (True keeps a key), got ", dtype_name(bias.scalar_type()));
    TORCH_CHECK_VALUE(bias.device() == q.device(), op_name, ": attn_bias must be on q's device ", q.device(),
                      ", got ", bias.device());
    const auto target = logits_shape(q, k);
    bool broadcastable = bias.dim() <= static_cast<int64_t>(target.size());
    for (int64_t i = 1; broadcastable && i <= bias.dim(); ++i) {
      const int64_t size = bias.size(-i);
      broadcastable = size == 1 || size == target[target.size() - i];
    }
    TORCH_CHECK_VALUE(broadcastable, op_name, ": attn_bias must be broadcastable to the logits' shape ",
                      same_tokens ? "[..., N, N]" : "[..., Nq, Nk]", " = ", at::IntArrayRef(target), ", got shape ",
                      bias.sizes());
  }
  int64_t num_matrices = 1;
  for (int64_t i = 0; i < q.dim() - 2; ++i) num_matrices *= q.size(i);
  return QkShape{nq, nk, d, num_matrices, scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d))};
}

MadQkLayout check_mad_qk_args(const at::Tensor& q, const at::Tensor& k, int64_t patch, int64_t num_prefix_tokens,
                              at::OptionalIntArrayRef grid, std::optional<double> scale,
                              const std::optional<at::Tensor>& attn_bias, bool renormalize, std::string_view reduction,
                              const char* op_name) {
  const QkShape shape = check_qk_tensors(q, k, scale, attn_bias, /*same_tokens=*/true, op_name);
  const MadLayout layout = check_mad_options(shape.num_queries, shape.num_matrices, patch, num_prefix_tokens, grid,
                                             renormalize, reduction, "q", op_name);
  return MadQkLayout{layout, shape.head_dim, shape.scale};
}

std::vector<int64_t> logits_shape(const at::Tensor& q, const at::Tensor& k) {
  std::vector<int64_t> shape(q.sizes().begin(), q.sizes().end() - 1);
  shape.push_back(k.size(-2));
  return shape;
}

at::Tensor broadcast_attn_bias(const at::Tensor& attn_bias, const at::Tensor& q, const at::Tensor& k) {
  return attn_bias.expand(logits_shape(q, k));
}

}  // namespace vitmad
