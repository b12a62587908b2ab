// CUDA kernels of vitmad::stats and vitmad::stats_pos: MAD, entropy, prefix mass and self mass of attention
// probabilities (csrc/vitmad.cpp's header; docs/definition.md, "Beside the distance"), every statistic asked for
// from one read of each attention row, as the CPU kernels (csrc/cpu/stats_cpu.cpp) compute them.
//
// One warp per query row: the lanes read the row's keys in turn (coalesced where keys are contiguous, any strides
// and dtype read in place), each keeps partial sums (the distance-weighted sum and, renormalised, the mass over the
// keys with a position; x ln x over every key; the mass of the keys without a position), and the warp adds them up.
// The distances come from the grid (the grid form: patch rows and columns from token indices, mad_geometry.h) or
// from the positions (the position form; NaN marks a token without one). A plain design rather than mad_cuda.cu's
// distance tables and 16-byte loads: what matters first is that it is right.
//
// Not yet run on a GPU (written 2026-12-01 without one): registered only when VITMAD_CUDA_STATS_KERNELS=1 is set
// as the library loads (benchmarks/gpu_check.py sets it); CUDA tensors get the pure-PyTorch kernels otherwise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <limits>
#include <optional>
#include <string>

#include "../mad_args.h"
#include "../mad_geometry.h"
#include "../position_args.h"
#include "../stats_args.h"
#include "cuda_common.cuh"
#include "stats_common.cuh"

namespace vitmad {
namespace {

constexpr const char* kOpName = "vitmad.attention_stats";

// What a kernel gets: the attention, where its queries and keys are, and where each statistic goes.
template <typename acc_t>
struct StatsParams {
  const void* attn;
  MatrixOffsets lead;  // where each [Nq, Nk] matrix starts
  int64_t stride_q, stride_k;
  int64_t num_matrices;
  int64_t num_queries;  // per matrix: the patches (grid form) or every query (position form)
  int64_t num_keys;
  int64_t first_query;  // grid form: P, the prefix tokens before the patches; 0 in the position form
  int64_t grid_w;
  acc_t patch;
  bool renormalize;
  bool wants_entropy;
  PositionRows<acc_t> query_positions, key_positions;  // the position form
  acc_t* stat_rows[kNumStats];  // row s of per_query [S, num_matrices, num_queries], or nullptr
};

__device__ __forceinline__ float log_of(float x) { return logf(x); }
__device__ __forceinline__ double log_of(double x) { return log(x); }

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t load_acc(const scalar_t* p) {
  return static_cast<acc_t>(*p);
}

template <typename scalar_t, bool kPositions>
__global__ void __launch_bounds__(kBlockThreads) stats_rows_kernel(const StatsParams<at::opmath_type<scalar_t>> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const auto* data = static_cast<const scalar_t*>(p.attn);
  const int64_t rows = p.num_matrices * p.num_queries;
  for (int64_t task = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; task < rows;
       task += warps) {
    const int64_t b = task / p.num_queries;
    const int64_t t = task - b * p.num_queries;
    const int64_t token = p.first_query + t;  // the query's token, and its own key
    acc_t query[3] = {0, 0, 0};
    bool has_position = true;
    const acc_t* key_matrix = nullptr;
    if constexpr (kPositions) {
      const acc_t* positions = p.query_positions.matrix(b);
      has_position = p.query_positions.has_position(positions, t);
      if (has_position) p.query_positions.position(positions, t, query);
      key_matrix = p.key_positions.matrix(b);
    } else {
      query[0] = static_cast<acc_t>(patch_row(t, p.grid_w));
      query[1] = static_cast<acc_t>(patch_col(t, p.grid_w));
    }
    // Warp-uniform: every lane of the warp has the same task.
    if (!has_position) {
      if (lane == 0)
        for (int stat = 0; stat < kNumStats; ++stat)
          if (p.stat_rows[stat] != nullptr) p.stat_rows[stat][task] = kNaN;
      continue;
    }
    const scalar_t* row = data + p.lead(b) + token * p.stride_q;
    acc_t weighted = 0, mass = 0, unplaced = 0, x_log_x = 0;
    bool negative = false;
    for (int64_t s = lane; s < p.num_keys; s += kWarp) {
      const acc_t a = load_acc<acc_t>(row + s * p.stride_k);
      bool placed;
      acc_t distance = 0;
      if constexpr (kPositions) {
        placed = p.key_positions.has_position(key_matrix, s);
        if (placed)
          distance = position_distance<acc_t>(query[0] - p.key_positions.coord(key_matrix, s, 0),
                                              query[1] - p.key_positions.coord(key_matrix, s, 1),
                                              query[2] - p.key_positions.coord(key_matrix, s, 2));
      } else {
        placed = s >= p.first_query;
        if (placed) {
          const int64_t key = s - p.first_query;
          distance = grid_distance<acc_t>(query[0] - static_cast<acc_t>(patch_row(key, p.grid_w)),
                                          query[1] - static_cast<acc_t>(patch_col(key, p.grid_w)));
        }
      }
      if (placed) {
        weighted += a * distance;
        mass += a;
      } else {
        unplaced += a;
      }
      if (p.wants_entropy) {
        // 0 ln 0 = 0 (the limit entropy takes); a negative value makes the row's entropy NaN, as the CPU's.
        negative |= a < acc_t(0);
        if (a != acc_t(0)) x_log_x += a * log_of(a);
      }
    }
    weighted = warp_sum(weighted);
    mass = warp_sum(mass);
    unplaced = warp_sum(unplaced);
    x_log_x = warp_sum(x_log_x);
    negative = __any_sync(0xffffffffu, negative);
    if (lane == 0) {
      const acc_t values[kNumStats] = {
          p.patch * (p.renormalize ? weighted / mass : weighted),  // grid distances in patches: pixels here
          negative ? kNaN : -x_log_x,
          unplaced,
          load_acc<acc_t>(row + token * p.stride_k),
          kNaN,
      };
      for (int stat = 0; stat < kNumStats; ++stat)
        if (p.stat_rows[stat] != nullptr) p.stat_rows[stat][task] = values[stat];
    }
  }
}

// What both forms fill alike: the attention and its strides, the statistics asked for and where they go.
template <typename acc_t>
StatsParams<acc_t> common_params(const at::Tensor& attn, int64_t num_matrices, int64_t num_queries,
                                 int64_t num_keys, bool renormalize, const StatsRequest& request,
                                 const at::Tensor& per_query) {
  StatsParams<acc_t> p{};
  p.attn = attn.const_data_ptr();
  p.lead = matrix_offsets(attn, kOpName);
  p.stride_q = attn.stride(-2);
  p.stride_k = attn.stride(-1);
  p.num_matrices = num_matrices;
  p.num_queries = num_queries;
  p.num_keys = num_keys;
  p.renormalize = renormalize;
  p.patch = 1;
  fill_stat_rows(p.stat_rows, request, per_query);
  p.wants_entropy = request.wants(Stat::kEntropy);
  return p;
}

template <typename scalar_t, bool kPositions>
void launch_stats(const StatsParams<at::opmath_type<scalar_t>>& p) {
  const int blocks = blocks_for(p.num_matrices * p.num_queries, kWarpsPerBlock);
  stats_rows_kernel<scalar_t, kPositions><<<blocks, kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor stats_cuda(const at::Tensor& attn, int64_t patch, c10::ArrayRef<std::string> stats,
                      int64_t num_prefix_tokens, at::OptionalIntArrayRef grid, bool renormalize,
                      c10::string_view reduction) {
  const MadLayout l = check_mad_args(attn, patch, num_prefix_tokens, grid, renormalize, reduction, kOpName);
  const StatsRequest request = check_stats(stats, l.num_tokens, l.num_tokens, /*has_times=*/false, kOpName);
  const c10::cuda::CUDAGuard device_guard(attn.device());
  StatsOutputs outputs = empty_stats_outputs(attn, request, l.num_matrices, l.num_patches, l.reduce_mean);
  if (l.num_matrices == 0) return outputs.out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "vitmad_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    StatsParams<acc_t> p = common_params<acc_t>(attn, l.num_matrices, l.num_patches, l.num_tokens, l.renormalize,
                                                request, outputs.per_query);
    p.first_query = l.num_prefix;
    p.grid_w = l.grid_w;
    p.patch = static_cast<acc_t>(patch);
    launch_stats<scalar_t, false>(p);
    if (l.reduce_mean)
      mean_of_stats<acc_t>(outputs.per_query, l.num_matrices, l.num_patches, AllQueries{}, outputs.out);
  });
  return outputs.out;
}

at::Tensor stats_pos_cuda(const at::Tensor& attn, const at::Tensor& positions,
                          const std::optional<at::Tensor>& key_positions, c10::ArrayRef<std::string> stats,
                          bool renormalize, c10::string_view reduction) {
  check_attn_tensor(attn, "[..., Nq, Nk]", kOpName);
  const c10::cuda::CUDAGuard device_guard(attn.device());
  const PositionArgs args = check_position_args(attn, attn.size(-2), attn.size(-1), positions, key_positions,
                                                renormalize, reduction, mad_output_dtype(attn.scalar_type()),
                                                can_check_position_values(), kOpName);
  const PositionLayout& l = args.layout;
  const StatsRequest request = check_stats(stats, l.num_queries, l.num_keys, /*has_times=*/false, kOpName);
  StatsOutputs outputs = empty_stats_outputs(attn, request, l.num_matrices, l.num_queries, l.reduce_mean);
  if (l.num_matrices == 0) return outputs.out;
  // No query: nothing to launch; the means are NaN, as over queries none of which has a position.
  if (l.num_queries == 0) return outputs.out.fill_(std::numeric_limits<double>::quiet_NaN());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "vitmad_stats_pos_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    StatsParams<acc_t> p = common_params<acc_t>(attn, l.num_matrices, l.num_queries, l.num_keys, l.renormalize,
                                                request, outputs.per_query);
    p.query_positions = position_rows<acc_t>(args.queries, l.dims);
    p.key_positions = position_rows<acc_t>(args.keys, l.dims);
    launch_stats<scalar_t, true>(p);
    if (l.reduce_mean)
      mean_of_stats<acc_t>(outputs.per_query, l.num_matrices, l.num_queries,
                           PositionedQueries<acc_t>{p.query_positions}, outputs.out);
  });
  return outputs.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitmad, CUDA, m) {
  if (cuda_stats_kernels_enabled()) {  // stats_common.cuh: not yet run on a GPU
    m.impl("stats", &stats_cuda);
    m.impl("stats_pos", &stats_pos_cuda);
  }
}

}  // namespace vitmad
