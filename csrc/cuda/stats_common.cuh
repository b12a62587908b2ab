// What the CUDA kernels of the statistics share (mad_qk_cuda.cu: stats_qk, stats_qk_pos; stats_cuda.cu: stats,
// stats_pos): where each statistic's per-query values go, their means, and whether these kernels serve at all.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "../stats_args.h"
#include "cuda_common.cuh"

namespace vitmad {

// rows[s] = the start of statistic s's values in per_query [S, num_matrices, num_queries] (row request.row[s]), or
// nullptr for a statistic not asked for; indexed like kStatNames.
template <typename acc_t>
void fill_stat_rows(acc_t* (&rows)[kNumStats], const StatsRequest& request, const at::Tensor& per_query) {
  acc_t* data = per_query.mutable_data_ptr<acc_t>();
  for (int stat = 0; stat < kNumStats; ++stat) {
    const int64_t row = request.row[stat];
    rows[stat] = row < 0 ? nullptr : data + row * per_query.stride(0);
  }
}

// out[s] = the mean of per_query[s] over the queries `counts` admits, for each statistic (as the distance ops
// reduce theirs: mean_over_queries_kernel).
template <typename acc_t, typename QueryFilter>
void mean_of_stats(const at::Tensor& per_query, int64_t num_matrices, int64_t num_queries, QueryFilter counts,
                   at::Tensor& out) {
  for (int64_t stat = 0; stat < per_query.size(0); ++stat)
    launch_mean_over_queries(per_query.const_data_ptr<acc_t>() + stat * per_query.stride(0), num_matrices,
                             num_queries, counts, out.mutable_data_ptr<acc_t>() + stat * num_matrices,
                             c10::cuda::getCurrentCUDAStream());
}

// Not yet run on a GPU (written 2026-12-01 without one): the statistics kernels serve only when
// VITMAD_CUDA_STATS_KERNELS=1 is set as the library loads (benchmarks/gpu_check.py sets it, so a GPU run tests them
// against the CPU kernels and the float64 references). Otherwise CUDA tensors get the pure-PyTorch kernels of the
// statistics, which python/vitmad/ops/library.py registers for every op this library leaves without a CUDA kernel.
inline bool cuda_stats_kernels_enabled() {
  const char* value = std::getenv("VITMAD_CUDA_STATS_KERNELS");
  return value != nullptr && std::string_view(value) != "" && std::string_view(value) != "0";
}

}  // namespace vitmad
