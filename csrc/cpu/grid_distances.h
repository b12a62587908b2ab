// The distances of the grid form shared by the CPU kernels that read attention rows (mad_cpu.cpp, stats_cpu.cpp):
// each patch query's distances to the patch keys as one contiguous row cut from small per-column tables, and the
// walk of (matrix group, query) rows over threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

#include "../mad_args.h"
#include "mad_cpu_common.h"

namespace vitmad {

// Queries per task when the query axis is the contiguous one: their accumulators stay in L1.
constexpr int64_t kQueriesPerColumnTask = 256;

// Patch query `token` at grid (row, col), stepped through a run of queries without a division per query (a
// 64-bit division costs as much as a third of a 196-key row).
struct QueryWalk {
  int64_t token, row, col, grid_w;

  QueryWalk(int64_t t, int64_t grid_w_)
      : token(t), row(patch_row(t, grid_w_)), col(patch_col(t, grid_w_)), grid_w(grid_w_) {}
  void next() {
    ++token;
    if (++col == grid_w) {
      col = 0;
      ++row;
    }
  }
};

// Column tables beyond this many bytes are not built (a 128 x 128 grid takes 16.6 MB in float32); each row's
// distances are then copied from the distance table into a per-thread buffer.
constexpr int64_t kMaxColumnTableBytes = int64_t{64} << 20;

// The distances from every patch query to every patch key, as contiguous rows cut from one small array per
// query grid column c: column[j * gw + s'] = d(offset of j - (gh - 1) grid rows, of s' - c grid columns), for
// j in [0, 2 gh - 1). The row of query t at (r, c) is the gh * gw values of column c from j = gh - 1 - r on: no
// copy, no square root per call, and 2 * gh * gw^2 values in all instead of (gh * gw)^2 (21 KB in float32 for
// a 14 x 14 grid, so a ViT-B row's distances come from L1 while its attention streams from memory).
template <typename acc_t>
class ColumnDistances {
 public:
  ColumnDistances(const MadLayout& l, acc_t patch)
      : grid_h_(l.grid_h), grid_w_(l.grid_w), patch_(patch), table_(distance_table<acc_t>(l, patch)) {
    const int64_t column_size = (2 * grid_h_ - 1) * grid_w_;
    if (grid_w_ * column_size * static_cast<int64_t>(sizeof(acc_t)) > kMaxColumnTableBytes) return;
    columns_.resize(grid_w_ * column_size);
    const int64_t width = 2 * grid_w_ - 1;
    for (int64_t c = 0; c < grid_w_; ++c)
      for (int64_t j = 0; j < 2 * grid_h_ - 1; ++j) {
        const acc_t* slice = table_.data() + std::abs(j - (grid_h_ - 1)) * width + (grid_w_ - 1 - c);
        std::copy(slice, slice + grid_w_, columns_.data() + c * column_size + j * grid_w_);
      }
  }

  bool fits(const MadLayout& l, acc_t patch) const {
    return l.grid_h == grid_h_ && l.grid_w == grid_w_ && patch == patch_;
  }

  // d(t, s) for the patch keys s = 0 .. gh * gw - 1 of patch query t: a row of the column tables, or the row
  // written into `buffer` (gh * gw values) when they were too large to build.
  const acc_t* row(const MadLayout& l, const QueryWalk& query, acc_t* buffer) const {
    if (!columns_.empty())
      return columns_.data() + (query.col * (2 * grid_h_ - 1) + (grid_h_ - 1 - query.row)) * grid_w_;
    fill_distances(table_.data(), l, query.token, 0, l.num_patches, buffer);
    return buffer;
  }

  bool needs_buffer() const { return columns_.empty(); }
  const acc_t* table() const { return table_.data(); }

 private:
  int64_t grid_h_, grid_w_;
  acc_t patch_;
  std::vector<acc_t> table_;    // distance_table
  std::vector<acc_t> columns_;  // grid_w column tables of (2 gh - 1) * gw values
};

// The column distances of the last grid seen, shared by every thread and kept from call to call: a model's layers
// call mad one after another on the same grid, so a call usually finds them built.
template <typename acc_t>
std::shared_ptr<const ColumnDistances<acc_t>> column_distances(const MadLayout& l, acc_t patch) {
  static std::mutex mutex;
  static std::shared_ptr<const ColumnDistances<acc_t>> last;
  std::lock_guard<std::mutex> lock(mutex);
  if (last == nullptr || !last->fits(l, patch)) last = std::make_shared<const ColumnDistances<acc_t>>(l, patch);
  return last;
}

// Runs fn(b, count, t_begin, t_end, distances, buffer) over runs of patch queries [t_begin, t_end) of the `count`
// matrices b, b + 1, ..., that together cover every matrix; matrices go in groups of `group` (the last one may be
// smaller), and `buffer` holds num_patches values for ColumnDistances::row. Each thread takes one contiguous range
// of (group, query) rows, so the attention is read as a few long streams, one per matrix of a group; below
// kSerialElements elements per thread the range is not split.
template <typename acc_t, typename Fn>
void for_each_query_run(const MadLayout& l, acc_t patch, int64_t group, Fn fn) {
  const auto distances = column_distances<acc_t>(l, patch);
  const int64_t num_groups = (l.num_matrices + group - 1) / group;
  const int64_t grain = std::max<int64_t>(1, kSerialElements / (group * l.num_patches));
  at::parallel_for(0, num_groups * l.num_patches, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(distances->needs_buffer() ? l.num_patches : 0);
    for (int64_t row = begin; row < end;) {
      const int64_t g = row / l.num_patches;
      const int64_t t_begin = row - g * l.num_patches;
      const int64_t t_end = std::min(l.num_patches, t_begin + (end - row));
      fn(g * group, std::min(group, l.num_matrices - g * group), t_begin, t_end, *distances, buffer.data());
      row += t_end - t_begin;
    }
  });
}

}  // namespace vitmad
