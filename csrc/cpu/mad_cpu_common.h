// CPU helpers shared by the kernels of vitmad::mad and vitmad::mad_qk: the distance table that replaces the
// (N-P) x (N-P) distance matrix, the deterministic mean over queries, and the per-CPU code clones of hot
// loops. (Where each matrix of a batched strided tensor starts is MatrixOffsets, in mad_geometry.h.)
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/ArrayRef.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "../mad_args.h"
#include "../mad_geometry.h"

// Each hot loop is compiled for AVX-512, AVX2+FMA and baseline x86-64, picked at load time by the CPU, so
// one wheel is fast on modern CPUs and still runs on old ones.
#if defined(__x86_64__) && defined(__GNUC__)
#define VITMAD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VITMAD_CPU_CLONES
#endif

namespace vitmad {

// table[dr * (2 * gw - 1) + (gw - 1) + dc] is the distance of a (dr, dc) grid offset, dr >= 0. The distances
// from a query in column c to the gw keys of a grid row dr rows away are the contiguous slice of table row
// dr that starts at (gw - 1) - c.
template <typename acc_t>
std::vector<acc_t> distance_table(const MadLayout& l, acc_t patch) {
  const int64_t width = 2 * l.grid_w - 1;
  std::vector<acc_t> table(l.grid_h * width);
  for (int64_t dr = 0; dr < l.grid_h; ++dr)
    for (int64_t j = 0; j < width; ++j) table[dr * width + j] = patch_distance<acc_t>(dr, j - (l.grid_w - 1), patch);
  return table;
}

// out[i] = d(t, first + i) for the patch keys [first, last): one table slice per grid row touched.
template <typename acc_t>
void fill_distances(const acc_t* table, const MadLayout& l, int64_t t, int64_t first, int64_t last, acc_t* out) {
  const int64_t width = 2 * l.grid_w - 1;
  const int64_t row = patch_row(t, l.grid_w);
  const int64_t col = patch_col(t, l.grid_w);
  for (int64_t s = first; s < last;) {
    const int64_t key_row = patch_row(s, l.grid_w);
    const int64_t run_end = std::min(last, (key_row + 1) * l.grid_w);
    const acc_t* slice = table + std::abs(row - key_row) * width + (l.grid_w - 1 - col) + (s - key_row * l.grid_w);
    std::copy(slice, slice + (run_end - s), out + (s - first));
    s = run_end;
  }
}

// Row-wise mean of [num_matrices, num_patches] per-query values in double, in a fixed order, so the result
// does not depend on the number of threads.
template <typename acc_t>
void mean_over_queries(const acc_t* per_query, const MadLayout& l, acc_t* out) {
  // Threads only pay off for large outputs: starting a parallel region costs more than a small mean.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / l.num_patches);
  at::parallel_for(0, l.num_matrices, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double total = 0;
      const acc_t* row = per_query + b * l.num_patches;
      for (int64_t t = 0; t < l.num_patches; ++t) total += static_cast<double>(row[t]);
      out[b] = static_cast<acc_t>(total / static_cast<double>(l.num_patches));
    }
  });
}

}  // namespace vitmad
