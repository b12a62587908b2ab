// CUDA helpers shared by the kernels of vitmad::mad, vitmad::mad_qk and their position forms: warp
// reductions, the runtime-flag-to-template switch, launch sizing, the float64 mean over queries and the
// question whether position values may be checked on the host.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../mad_geometry.h"

namespace vitmad {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kBlockThreads = kWarp * kWarpsPerBlock;
// Grid-stride loops cover any size; more blocks than this only adds scheduling work.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

// Butterfly sum over groups of kLanes adjacent lanes (the whole warp by default): every lane of a group ends
// with the same bits, since each step adds the same two values on both sides.
template <int kLanes = kWarp, typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// max(a, b), NaN when either is NaN, as softmax's max (a plain a > b ? a : b drops a NaN b).
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// The same as warp_sum for the max, NaN when any lane holds NaN.
template <int kLanes = kWarp, typename T>
__device__ __forceinline__ T warp_max(T value) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2)
    value = nan_max(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

// Calls fn with std::true_type or std::false_type: a runtime flag turned into a template parameter.
template <typename Fn>
void bool_switch(bool flag, Fn fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

inline int blocks_for(int64_t items, int64_t items_per_block) {
  return static_cast<int>(std::clamp<int64_t>((items + items_per_block - 1) / items_per_block, 1, kMaxBlocks));
}

// How many bytes of dynamic shared memory kKernel may use on `device`: the kernel's attribute is set once per
// (kernel, device) to min(wanted, the device's opt-in limit) and never changed after. The attribute belongs to
// the kernel, not to a launch: set per call to the call's own size, one host thread could lower it between
// another thread's set and launch ("invalid argument").
template <auto kKernel>
int dynamic_shared_memory_limit(int device, int wanted) {
  static std::mutex mutex;
  static std::vector<int> limits;  // per device, -1 until set
  const std::lock_guard<std::mutex> lock(mutex);
  if (limits.size() <= static_cast<size_t>(device)) limits.resize(device + 1, -1);
  if (limits[device] < 0) {
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const int bytes = std::min(wanted, optin);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    limits[device] = bytes;
  }
  return limits[device];
}

// Position values are checked on the host (a small copy), except while the current stream is being captured into
// a CUDA graph, where a device-to-host copy is not allowed.
inline bool can_check_position_values() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

// out[b] = mean of per_query[b, t] over the queries t that counts.of_matrix(b) admits (AllQueries,
// PositionedQueries in mad_geometry.h), summed in double in a fixed
// order (as the CPU kernels do), so results are bit-identical from run to run; one warp per matrix. No
// admitted query gives 0 / 0 = NaN.
template <typename acc_t, typename QueryFilter>
__global__ void __launch_bounds__(kBlockThreads)
    mean_over_queries_kernel(const acc_t* __restrict__ per_query, int64_t num_matrices, int32_t num_queries,
                             QueryFilter counts, acc_t* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t matrix = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       matrix < num_matrices; matrix += warps) {
    const acc_t* row = per_query + matrix * num_queries;
    double total = 0;
    int32_t admitted = 0;
    const auto counted = counts.of_matrix(matrix);
    for (int32_t t = lane; t < num_queries; t += kWarp) {
      if (counted(t)) {
        total += static_cast<double>(row[t]);
        ++admitted;
      }
    }
    total = warp_sum(total);
    admitted = warp_sum(admitted);
    if (lane == 0) out[matrix] = static_cast<acc_t>(total / static_cast<double>(admitted));
  }
}

template <typename acc_t, typename QueryFilter>
void launch_mean_over_queries(const acc_t* per_query, int64_t num_matrices, int64_t num_queries, QueryFilter counts,
                              acc_t* out, cudaStream_t stream) {
  mean_over_queries_kernel<acc_t><<<blocks_for(num_matrices, kWarpsPerBlock), kBlockThreads, 0, stream>>>(
      per_query, num_matrices, static_cast<int32_t>(num_queries), counts, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace vitmad
