// CUDA kernels of vitmad::mad and vitmad::mad_backward.
//
// One warp per attention row (one query): the lanes read the row's patch keys in place with 16-byte vector
// loads (single-element loads for the unaligned head and the tail), compute each key's distance in registers
// from its index, and join their partial sums with a shuffle butterfly. A [1, 12, 197, 197] layer is 2352
// rows, so 294 blocks of 8 warps. Every sum has a fixed order, so results are bit-identical from run to run:
// the per-query values are written to a [matrices, N - P] buffer and a second small kernel (one warp per
// matrix) averages them for reduction="mean". A view whose query axis is the contiguous one (a transpose) is
// read by columns instead, so loads stay coalesced.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../mad_args.h"
#include "../mad_geometry.h"
#include "cuda_common.cuh"

namespace vitmad {
namespace {

// Vectors each lane loads before using any, so enough bytes are in flight to saturate HBM.
constexpr int kUnroll = 4;
// Key groups (warps) that split the keys of 32 queries in the column kernel.
constexpr int kKeyGroups = kWarpsPerBlock;

// What every kernel needs to know about one attention tensor. Indices within a matrix fit in 32 bits
// (checked on the host); offsets between matrices and rows are 64-bit.
struct Geometry {
  MatrixOffsets matrix_offset;
  int64_t query_stride;
  int64_t key_stride;
  int32_t num_tokens;
  int32_t num_prefix;
  int32_t num_patches;
  int32_t grid_w;
};

template <typename scalar_t, int kSize>
struct alignas(sizeof(scalar_t) * kSize) AlignedVector {
  scalar_t val[kSize];
};

template <typename acc_t>
struct Sums {
  acc_t weighted;  // sum_s a[s] * d(t, s), d in patches (the caller multiplies by the patch size once)
  acc_t mass;      // sum_s a[s], with kMass only
};

// This lane's share of the sums over the `count` patch keys of one query row whose keys are contiguous.
// Lanes take 16-byte vectors round-robin, so a warp reads 512 contiguous bytes per step. The loop is short
// on purpose: for 16-bit input at full bandwidth, instruction issue is the next limit after memory.
template <typename scalar_t, typename acc_t, bool kMass>
__device__ __forceinline__ Sums<acc_t> lane_sums_contiguous(const scalar_t* __restrict__ keys, int32_t count,
                                                            int32_t query, int32_t grid_w, int lane) {
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  using Vec = AlignedVector<scalar_t, kVec>;
  const auto split = split_for_vectors<int32_t>(reinterpret_cast<uint64_t>(keys), count, sizeof(scalar_t));
  Sums<acc_t> sums{0, 0};
  auto add = [&](acc_t a, acc_t distance) {
    sums.weighted += a * distance;
    if constexpr (kMass) sums.mass += a;
  };
  auto add_vector = [&](const Vec& x, int32_t first_key) {
    KeyWalk<acc_t, int32_t> walk(query, first_key, grid_w);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      add(static_cast<acc_t>(x.val[i]), walk.distance());
      walk.next();
    }
  };
  auto add_single = [&](int32_t key) {
    add(static_cast<acc_t>(keys[key]), token_distance<acc_t>(query, key, grid_w));
  };

  // The head is shorter than a vector unless the row is not even element-aligned; the tail always is.
  for (int32_t key = lane; key < split.head; key += kWarp) add_single(key);
  const Vec* vectors = reinterpret_cast<const Vec*>(keys + split.head);
  // All kUnroll loads of a step are issued before any is used, partial steps included (masked), so short
  // rows (a 577-token bfloat16 row is 72 vectors) keep as many bytes in flight as long ones.
  for (int32_t v = lane; v < split.vectors; v += kUnroll * kWarp) {
    Vec x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v + u * kWarp < split.vectors) x[u] = vectors[v + u * kWarp];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v + u * kWarp < split.vectors) add_vector(x[u], split.head + (v + u * kWarp) * kVec);
    }
  }
  const int32_t tail_key = split.head + split.vectors * kVec + lane;
  if (tail_key < count) add_single(tail_key);
  return sums;
}

// The same for keys `key_stride` elements apart (a strided view): one element per lane per step.
template <typename scalar_t, typename acc_t, bool kMass>
__device__ __forceinline__ Sums<acc_t> lane_sums_strided(const scalar_t* __restrict__ keys, int64_t key_stride,
                                                         int32_t count, int32_t query, int32_t grid_w, int lane) {
  Sums<acc_t> sums{0, 0};
  for (int32_t key = lane; key < count; key += kWarp) {
    const acc_t a = static_cast<acc_t>(keys[key * key_stride]);
    sums.weighted += a * token_distance<acc_t>(query, key, grid_w);
    if constexpr (kMass) sums.mass += a;
  }
  return sums;
}

// The whole warp's sums for one query row; every lane gets them.
template <typename scalar_t, typename acc_t, bool kContiguousKeys, bool kMass>
__device__ __forceinline__ Sums<acc_t> row_sums(const scalar_t* __restrict__ attn, const Geometry& g, int64_t matrix,
                                                int32_t query, int lane) {
  const scalar_t* keys = attn + g.matrix_offset(matrix) + (g.num_prefix + query) * g.query_stride +
                         g.num_prefix * g.key_stride;
  Sums<acc_t> sums;
  if constexpr (kContiguousKeys) {
    sums = lane_sums_contiguous<scalar_t, acc_t, kMass>(keys, g.num_patches, query, g.grid_w, lane);
  } else {
    sums = lane_sums_strided<scalar_t, acc_t, kMass>(keys, g.key_stride, g.num_patches, query, g.grid_w, lane);
  }
  return {warp_sum(sums.weighted), kMass ? warp_sum(sums.mass) : acc_t(0)};
}

// per_query[matrix * (N - P) + t] = m_t, one warp per (matrix, query t); kMass is renormalisation.
template <typename scalar_t, typename acc_t, bool kContiguousKeys, bool kMass>
__global__ void __launch_bounds__(kBlockThreads)
    mad_rows_kernel(const scalar_t* __restrict__ attn, const Geometry g, int64_t num_rows, acc_t patch,
                    acc_t* __restrict__ per_query) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; row < num_rows;
       row += warps) {
    const int64_t matrix = row / g.num_patches;
    const auto query = static_cast<int32_t>(row - matrix * g.num_patches);
    const Sums<acc_t> sums = row_sums<scalar_t, acc_t, kContiguousKeys, kMass>(attn, g, matrix, query, lane);
    if (lane == 0) per_query[row] = kMass ? patch * sums.weighted / sums.mass : patch * sums.weighted;
  }
}

// The same for attention whose query axis is contiguous (a transposed view): a warp holds 32 consecutive
// queries and reads one key's column at a time (coalesced); the kKeyGroups warps of a block take one
// contiguous run of keys each (walked without divisions) and their partial sums are joined in shared memory
// in a fixed order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    mad_columns_kernel(const scalar_t* __restrict__ attn, const Geometry g, int64_t num_tiles,
                       int32_t tiles_per_matrix, bool renormalize, acc_t patch, acc_t* __restrict__ per_query) {
  __shared__ acc_t weighted[kKeyGroups][kWarp];
  __shared__ acc_t mass[kKeyGroups][kWarp];
  const int lane = threadIdx.x % kWarp;
  const int group = threadIdx.x / kWarp;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t matrix = tile / tiles_per_matrix;
    const auto query = static_cast<int32_t>((tile - matrix * tiles_per_matrix) * kWarp + lane);
    const int32_t keys_per_group = (g.num_patches + kKeyGroups - 1) / kKeyGroups;
    const int32_t first_key = group * keys_per_group;
    const int32_t end_key = min(g.num_patches, first_key + keys_per_group);
    Sums<acc_t> sums{0, 0};
    if (query < g.num_patches && first_key < end_key) {
      const scalar_t* column = attn + g.matrix_offset(matrix) + (g.num_prefix + query) * g.query_stride +
                               g.num_prefix * g.key_stride;
      KeyWalk<acc_t, int32_t> walk(query, first_key, g.grid_w);
#pragma unroll 4
      for (int32_t key = first_key; key < end_key; ++key) {
        const acc_t a = static_cast<acc_t>(column[key * g.key_stride]);
        sums.weighted += a * walk.distance();
        sums.mass += a;
        walk.next();
      }
    }
    weighted[group][lane] = sums.weighted;
    mass[group][lane] = sums.mass;
    __syncthreads();
    if (group == 0 && query < g.num_patches) {
      acc_t w = 0;
      acc_t m = 0;
      for (int k = 0; k < kKeyGroups; ++k) {
        w += weighted[k][lane];
        m += mass[k][lane];
      }
      per_query[matrix * g.num_patches + query] = renormalize ? patch * w / m : patch * w;
    }
    __syncthreads();
  }
}

// Writes one contiguous output row of `count` elements, value(k) for element k, with 16-byte stores where
// the row is aligned. value_vector(first, x) fills the kVec elements starting at `first`.
template <typename scalar_t, typename ValueFn, typename VectorFn>
__device__ __forceinline__ void store_row(scalar_t* __restrict__ out, int32_t count, int lane, ValueFn value,
                                          VectorFn value_vector) {
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  using Vec = AlignedVector<scalar_t, kVec>;
  const auto split = split_for_vectors<int32_t>(reinterpret_cast<uint64_t>(out), count, sizeof(scalar_t));
  for (int32_t k = lane; k < split.head; k += kWarp) out[k] = value(k);
  Vec* vectors = reinterpret_cast<Vec*>(out + split.head);
  for (int32_t v = lane; v < split.vectors; v += kWarp) {
    Vec x;
    value_vector(split.head + v * kVec, x.val);
    vectors[v] = x;
  }
  const int32_t tail = split.head + split.vectors * kVec + lane;
  if (tail < count) out[tail] = value(tail);
}

// grad_attn[b, P+t, P+s] = g_t * d(t, s), or g_t * (d(t, s) - m_t) / Z_t with renormalisation, where g_t
// is the gradient reaching query t (grad[b] / (N-P) for "mean") and Z_t its mass on patch keys; zero on
// prefix rows and columns. One warp per row of the contiguous [..., N, N] output, which it writes whole
// (zeros included), so the output needs no separate zero fill.
template <typename scalar_t, typename acc_t, bool kContiguousKeys>
__global__ void __launch_bounds__(kBlockThreads)
    mad_backward_kernel(const scalar_t* __restrict__ attn, const Geometry g, int64_t num_rows, bool renormalize,
                        bool reduce_mean, acc_t patch, const acc_t* __restrict__ grad,
                        scalar_t* __restrict__ grad_attn) {
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const scalar_t zero = static_cast<scalar_t>(acc_t(0));
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; row < num_rows;
       row += warps) {
    const int64_t matrix = row / g.num_tokens;
    const auto token = static_cast<int32_t>(row - matrix * g.num_tokens);
    scalar_t* out = grad_attn + row * g.num_tokens;
    if (token < g.num_prefix) {
      store_row(out, g.num_tokens, lane, [&](int32_t) { return zero; },
                [&](int32_t, scalar_t* x) {
#pragma unroll
                  for (int i = 0; i < kVec; ++i) x[i] = zero;
                });
      continue;
    }
    const int32_t query = token - g.num_prefix;
    acc_t scale = reduce_mean ? grad[matrix] / static_cast<acc_t>(g.num_patches)
                              : grad[matrix * g.num_patches + query];
    acc_t shift = 0;
    if (renormalize) {
      const Sums<acc_t> sums = row_sums<scalar_t, acc_t, kContiguousKeys, true>(attn, g, matrix, query, lane);
      scale /= sums.mass;
      shift = patch * sums.weighted / sums.mass;
    }
    auto value = [&](int32_t k) {
      return k < g.num_prefix ? zero
                              : static_cast<scalar_t>(
                                    scale * (patch * token_distance<acc_t>(query, k - g.num_prefix, g.grid_w) - shift));
    };
    store_row(out, g.num_tokens, lane, value, [&](int32_t first, scalar_t* x) {
      if (first < g.num_prefix) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) x[i] = value(first + i);
        return;
      }
      KeyWalk<acc_t, int32_t> walk(query, first - g.num_prefix, g.grid_w);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        x[i] = static_cast<scalar_t>(scale * (patch * walk.distance() - shift));
        walk.next();
      }
    });
  }
}

Geometry make_geometry(const at::Tensor& attn, const MadLayout& l, const char* op_name) {
  TORCH_CHECK_VALUE(l.num_tokens <= std::numeric_limits<int32_t>::max(), op_name,
                    ": attn must have at most 2^31 - 1 tokens per row on CUDA, got N = ", l.num_tokens);
  return Geometry{matrix_offsets(attn, op_name),
                  attn.stride(-2),
                  attn.stride(-1),
                  static_cast<int32_t>(l.num_tokens),
                  static_cast<int32_t>(l.num_prefix),
                  static_cast<int32_t>(l.num_patches),
                  static_cast<int32_t>(l.grid_w)};
}

template <typename scalar_t, typename acc_t>
void launch_mad(const at::Tensor& attn, const MadLayout& l, acc_t patch, acc_t* per_query, cudaStream_t stream) {
  const Geometry g = make_geometry(attn, l, "vitmad.mad");
  const scalar_t* data = attn.const_data_ptr<scalar_t>();
  if (g.key_stride != 1 && g.query_stride == 1) {
    const auto tiles_per_matrix = static_cast<int32_t>((l.num_patches + kWarp - 1) / kWarp);
    const int64_t num_tiles = l.num_matrices * tiles_per_matrix;
    mad_columns_kernel<scalar_t, acc_t><<<blocks_for(num_tiles, 1), kBlockThreads, 0, stream>>>(
        data, g, num_tiles, tiles_per_matrix, l.renormalize, patch, per_query);
  } else {
    const int64_t num_rows = l.num_matrices * l.num_patches;
    const int blocks = blocks_for(num_rows, kWarpsPerBlock);
    bool_switch(g.key_stride == 1, [&](auto contiguous_keys) {
      bool_switch(l.renormalize, [&](auto mass) {
        mad_rows_kernel<scalar_t, acc_t, decltype(contiguous_keys)::value, decltype(mass)::value>
            <<<blocks, kBlockThreads, 0, stream>>>(data, g, num_rows, patch, per_query);
      });
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor mad_cuda(const at::Tensor& attn, int64_t patch, int64_t num_prefix_tokens, at::OptionalIntArrayRef grid,
                    bool renormalize, c10::string_view reduction) {
  const MadLayout l = check_mad_args(attn, patch, num_prefix_tokens, grid, renormalize, reduction, "vitmad.mad");
  const c10::cuda::CUDAGuard device_guard(attn.device());
  const auto [per_query, out] = empty_mad_outputs(attn, l.num_matrices, l.num_patches, l.reduce_mean);
  if (l.num_matrices == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "vitmad_mad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* rows = per_query.mutable_data_ptr<acc_t>();
    launch_mad<scalar_t, acc_t>(attn, l, static_cast<acc_t>(patch), rows, stream);
    if (l.reduce_mean) {
      launch_mean_over_queries(rows, l.num_matrices, l.num_patches, AllQueries{}, out.mutable_data_ptr<acc_t>(), stream);
    }
  });
  return out;
}

at::Tensor mad_backward_cuda(const at::Tensor& grad, const at::Tensor& attn, int64_t patch,
                             int64_t num_prefix_tokens, at::OptionalIntArrayRef grid, bool renormalize,
                             c10::string_view reduction) {
  const MadLayout l =
      check_mad_args(attn, patch, num_prefix_tokens, grid, renormalize, reduction, "vitmad.mad_backward");
  const at::Tensor g = check_mad_grad(grad, attn, l.reduce_mean, l.num_patches);
  const c10::cuda::CUDAGuard device_guard(attn.device());
  at::Tensor grad_attn = at::empty(attn.sizes(), attn.options().memory_format(at::MemoryFormat::Contiguous));
  if (l.num_matrices == 0) return grad_attn;
  const Geometry geometry = make_geometry(attn, l, "vitmad.mad_backward");
  const int64_t num_rows = l.num_matrices * l.num_tokens;
  const int blocks = blocks_for(num_rows, kWarpsPerBlock);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "vitmad_mad_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* data = attn.const_data_ptr<scalar_t>();
    const acc_t* grad_data = g.const_data_ptr<acc_t>();
    scalar_t* out = grad_attn.mutable_data_ptr<scalar_t>();
    const auto patch_acc = static_cast<acc_t>(patch);
    bool_switch(geometry.key_stride == 1, [&](auto contiguous_keys) {
      mad_backward_kernel<scalar_t, acc_t, decltype(contiguous_keys)::value><<<blocks, kBlockThreads, 0, stream>>>(
          data, geometry, num_rows, l.renormalize, l.reduce_mean, patch_acc, grad_data, out);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_attn;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitmad, CUDA, m) {
  m.impl("mad", &mad_cuda);
  m.impl("mad_backward", &mad_backward_cuda);
}

}  // namespace vitmad
