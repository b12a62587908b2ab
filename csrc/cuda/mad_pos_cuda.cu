// CUDA kernels of vitmad::mad_pos and vitmad::mad_pos_backward: MAD from token positions (docs/definition.md,
// "Beyond one grid: where each token is").
//
// Kept simple: one warp per attention row (one query). The lanes walk the row's keys (coalesced when the keys
// are contiguous, any stride otherwise), read each key's position through the read-only cache (a matrix's key
// positions are a few KiB, shared by every row and usually every matrix), and join their partial sums with the
// warp butterfly, in a fixed order, so results are bit-identical from run to run. The per-query values go to a
// [matrices, Nq] buffer that the shared float64 mean kernel reduces for reduction="mean", over the queries with
// a position.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "../mad_args.h"
#include "../mad_geometry.h"
#include "../position_args.h"
#include "cuda_common.cuh"

namespace vitmad {
namespace {

template <typename acc_t>
struct PosGeometry {
  MatrixOffsets matrix_offset;  // attn's matrices
  int64_t query_stride;
  int64_t key_stride;
  PositionRows<acc_t> queries;
  PositionRows<acc_t> keys;
  int32_t num_queries;
  int32_t num_keys;
};

template <typename acc_t>
struct RowSums {
  acc_t weighted;  // sum over keys with a position of a[s] * d(t, s)
  acc_t mass;      // sum over keys with a position of a[s]
};

// The whole warp's sums for query t (which has a position at q) of matrix b; every lane gets them.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ RowSums<acc_t> row_sums(const scalar_t* __restrict__ attn, const PosGeometry<acc_t>& g,
                                                   int64_t b, int32_t t, const acc_t* q, int lane) {
  const scalar_t* row = attn + g.matrix_offset(b) + t * g.query_stride;
  const acc_t* key_matrix = g.keys.matrix(b);
  acc_t weighted = 0;
  acc_t mass = 0;
  for (int32_t s = lane; s < g.num_keys; s += kWarp) {
    if (!g.keys.has_position(key_matrix, s)) continue;
    const acc_t a = static_cast<acc_t>(row[s * g.key_stride]);
    weighted +=
        a * position_distance<acc_t>(q[0] - g.keys.coord(key_matrix, s, 0), q[1] - g.keys.coord(key_matrix, s, 1),
                                     q[2] - g.keys.coord(key_matrix, s, 2));
    mass += a;
  }
  return {warp_sum(weighted), warp_sum(mass)};
}

// per_query[b * Nq + t] = m_t (NaN for a query without a position), one warp per (matrix, query).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    mad_pos_kernel(const scalar_t* __restrict__ attn, const PosGeometry<acc_t> g, int64_t num_rows, bool renormalize,
                   acc_t* __restrict__ per_query) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; row < num_rows;
       row += warps) {
    const int64_t b = row / g.num_queries;
    const auto t = static_cast<int32_t>(row - b * g.num_queries);
    const acc_t* query_matrix = g.queries.matrix(b);
    if (!g.queries.has_position(query_matrix, t)) {
      if (lane == 0) per_query[row] = std::numeric_limits<acc_t>::quiet_NaN();
      continue;
    }
    acc_t q[3];
    g.queries.position(query_matrix, t, q);
    const RowSums<acc_t> sums = row_sums(attn, g, b, t, q, lane);
    if (lane == 0) per_query[row] = renormalize ? sums.weighted / sums.mass : sums.weighted;
  }
}

// grad_attn[b, t, s] = g_t * d(t, s), or g_t / Z_t * (d(t, s) - m_t) with renormalisation, for a query and a
// key with a position; zero elsewhere. One warp per row of the contiguous [..., Nq, Nk] output, which it writes
// whole, so the output needs no separate zero fill.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    mad_pos_backward_kernel(const scalar_t* __restrict__ attn, const PosGeometry<acc_t> g, int64_t num_rows,
                            bool renormalize, const acc_t* __restrict__ grad_per_query,
                            scalar_t* __restrict__ grad_attn) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const scalar_t zero = static_cast<scalar_t>(acc_t(0));
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; row < num_rows;
       row += warps) {
    const int64_t b = row / g.num_queries;
    const auto t = static_cast<int32_t>(row - b * g.num_queries);
    scalar_t* out = grad_attn + row * g.num_keys;
    const acc_t* query_matrix = g.queries.matrix(b);
    if (!g.queries.has_position(query_matrix, t)) {
      for (int32_t s = lane; s < g.num_keys; s += kWarp) out[s] = zero;
      continue;
    }
    acc_t q[3];
    g.queries.position(query_matrix, t, q);
    acc_t scale = grad_per_query[row];
    acc_t shift = 0;
    if (renormalize) {
      const RowSums<acc_t> sums = row_sums(attn, g, b, t, q, lane);
      scale /= sums.mass;
      shift = sums.weighted / sums.mass;
    }
    const acc_t* key_matrix = g.keys.matrix(b);
    for (int32_t s = lane; s < g.num_keys; s += kWarp) {
      if (!g.keys.has_position(key_matrix, s)) {
        out[s] = zero;
        continue;
      }
      const acc_t d =
          position_distance<acc_t>(q[0] - g.keys.coord(key_matrix, s, 0), q[1] - g.keys.coord(key_matrix, s, 1),
                                   q[2] - g.keys.coord(key_matrix, s, 2));
      out[s] = static_cast<scalar_t>(scale * (d - shift));
    }
  }
}

PositionArgs check_cuda_args(const at::Tensor& attn, const at::Tensor& positions,
                             const std::optional<at::Tensor>& key_positions, bool renormalize,
                             c10::string_view reduction, const char* op_name) {
  check_attn_tensor(attn, "[..., Nq, Nk]", op_name);
  TORCH_CHECK_VALUE(
      attn.size(-2) <= std::numeric_limits<int32_t>::max() && attn.size(-1) <= std::numeric_limits<int32_t>::max(),
      op_name, ": attn must have at most 2^31 - 1 queries and keys per matrix on CUDA, got shape ", attn.sizes());
  return check_position_args(attn, attn.size(-2), attn.size(-1), positions, key_positions, renormalize, reduction,
                             mad_output_dtype(attn.scalar_type()), can_check_position_values(), op_name);
}

template <typename acc_t>
PosGeometry<acc_t> make_geometry(const at::Tensor& attn, const PositionArgs& args, const char* op_name) {
  const PositionLayout& l = args.layout;
  return PosGeometry<acc_t>{matrix_offsets(attn, op_name),
                            attn.stride(-2),
                            attn.stride(-1),
                            position_rows<acc_t>(args.queries, l.dims),
                            position_rows<acc_t>(args.keys, l.dims),
                            static_cast<int32_t>(l.num_queries),
                            static_cast<int32_t>(l.num_keys)};
}

at::Tensor mad_pos_cuda(const at::Tensor& attn, const at::Tensor& positions,
                        const std::optional<at::Tensor>& key_positions, bool renormalize, c10::string_view reduction) {
  const c10::cuda::CUDAGuard device_guard(attn.device());
  const PositionArgs args = check_cuda_args(attn, positions, key_positions, renormalize, reduction, "vitmad.mad");
  const PositionLayout& l = args.layout;
  const auto [per_query, out] = empty_mad_outputs(attn, l.num_matrices, l.num_queries, l.reduce_mean);
  if (l.num_matrices == 0 || l.num_queries == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t num_rows = l.num_matrices * l.num_queries;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "vitmad_mad_pos_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const PosGeometry<acc_t> g = make_geometry<acc_t>(attn, args, "vitmad.mad");
    acc_t* rows = per_query.mutable_data_ptr<acc_t>();
    mad_pos_kernel<scalar_t, acc_t><<<blocks_for(num_rows, kWarpsPerBlock), kBlockThreads, 0, stream>>>(
        attn.const_data_ptr<scalar_t>(), g, num_rows, l.renormalize, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (l.reduce_mean)
      launch_mean_over_queries(rows, l.num_matrices, l.num_queries, PositionedQueries<acc_t>{g.queries},
                               out.mutable_data_ptr<acc_t>(), stream);
  });
  return out;
}

at::Tensor mad_pos_backward_cuda(const at::Tensor& grad, const at::Tensor& attn, const at::Tensor& positions,
                                 const std::optional<at::Tensor>& key_positions, bool renormalize,
                                 c10::string_view reduction) {
  const c10::cuda::CUDAGuard device_guard(attn.device());
  const PositionArgs args =
      check_cuda_args(attn, positions, key_positions, renormalize, reduction, "vitmad.mad_backward");
  const PositionLayout& l = args.layout;
  const at::Tensor g = per_query_grad(grad, attn, args);
  at::Tensor grad_attn = at::empty(attn.sizes(), attn.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t num_rows = l.num_matrices * l.num_queries;
  if (num_rows == 0 || l.num_keys == 0) return grad_attn;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "vitmad_mad_pos_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const PosGeometry<acc_t> geometry = make_geometry<acc_t>(attn, args, "vitmad.mad_backward");
    mad_pos_backward_kernel<scalar_t, acc_t><<<blocks_for(num_rows, kWarpsPerBlock), kBlockThreads, 0, stream>>>(
        attn.const_data_ptr<scalar_t>(), geometry, num_rows, l.renormalize, g.const_data_ptr<acc_t>(),
        grad_attn.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_attn;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitmad, CUDA, m) {
  m.impl("mad_pos", &mad_pos_cuda);
  m.impl("mad_pos_backward", &mad_pos_backward_cuda);
}

}  // namespace vitmad
