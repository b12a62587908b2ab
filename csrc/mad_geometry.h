// Index and distance math shared by every kernel (CPU and CUDA), so the CPU tests exercise the same
// formulas the GPU runs. See MAD_SPEC.md: patch token t sits at row t / gw, column t % gw, and the distance
// between two patches is patch * sqrt(drow^2 + dcol^2) pixels.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define VITMAD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VITMAD_HOST_DEVICE inline
#endif

namespace vitmad {

VITMAD_HOST_DEVICE int64_t patch_row(int64_t token, int64_t grid_w) { return token / grid_w; }

VITMAD_HOST_DEVICE int64_t patch_col(int64_t token, int64_t grid_w) { return token % grid_w; }

// Distance in pixels between two patches that are `drow` grid rows and `dcol` grid columns apart.
template <typename acc_t>
VITMAD_HOST_DEVICE acc_t patch_distance(int64_t drow, int64_t dcol, acc_t patch) {
  const acc_t dr = static_cast<acc_t>(drow);
  const acc_t dc = static_cast<acc_t>(dcol);
  return patch * sqrt(dr * dr + dc * dc);
}

// Distance between patch tokens `query` and `key` (0-based among the patches) on a grid `grid_w` wide.
template <typename acc_t>
VITMAD_HOST_DEVICE acc_t token_distance(int64_t query, int64_t key, int64_t grid_w, acc_t patch) {
  return patch_distance<acc_t>(patch_row(query, grid_w) - patch_row(key, grid_w),
                               patch_col(query, grid_w) - patch_col(key, grid_w), patch);
}

}  // namespace vitmad
