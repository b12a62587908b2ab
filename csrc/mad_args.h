// Argument checking shared by every backend of vitmad::mad and vitmad::mad_backward: one place that turns
// the user's (attn, patch, num_prefix_tokens, grid, reduction) into a validated layout or a clear error.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>

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

MadLayout check_mad_args(const at::Tensor& attn, int64_t patch, int64_t num_prefix_tokens,
                         at::OptionalIntArrayRef grid, bool renormalize, std::string_view reduction,
                         const char* op_name);

// Float32 for 16- and 32-bit attention, float64 for float64 (MAD_SPEC.md, "Output dtype").
at::ScalarType mad_output_dtype(at::ScalarType attn_dtype);

// attn.shape[:-2] for "mean", attn.shape[:-2] + [N - P] for "none".
std::vector<int64_t> mad_output_shape(const at::Tensor& attn, const MadLayout& layout);

// The gradient of mad's output must have the output's shape; returns it as a contiguous tensor in the
// output dtype, on attn's device.
at::Tensor check_mad_grad(const at::Tensor& grad, const at::Tensor& attn, const MadLayout& layout);

// Where each [N, N] matrix of attn starts, for attn's strides (read in place, never copied).
MatrixOffsets matrix_offsets(const at::Tensor& attn, const char* op_name);

}  // namespace vitmad
