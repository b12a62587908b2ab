// The distances of the position form shared by the CPU kernels that read attention rows (mad_pos_cpu.cpp,
// stats_cpu.cpp): distance rows of query blocks computed per thread, or every distinct set of positions' distances
// computed once per call, and the runs of keys with a position that rows are read over.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../position_args.h"
#include "mad_cpu_common.h"

namespace vitmad {

// The distance rows of one query block for one pair of query and key positions (row t - t_begin holds d(t, s)
// for every key s; rows of queries without a position are not filled), and the runs of keys with a position.
template <typename acc_t>
struct DistanceBlock {
  std::vector<acc_t> rows;
  std::vector<std::pair<int64_t, int64_t>> runs;
};

// The matrices' indices sorted by where their query and key positions start, so matrices sharing positions
// come one after another (a stable sort: ties keep the row-major order, and a run of matrices with the same
// positions is read in order).
inline std::vector<int64_t> matrices_by_positions(const PositionArgs& args) {
  const int64_t m = args.layout.num_matrices;
  std::vector<int64_t> order(m);
  std::iota(order.begin(), order.end(), 0);
  std::vector<std::pair<int64_t, int64_t>> starts(m);
  for (int64_t b = 0; b < m; ++b) starts[b] = {args.queries.offsets(b), args.keys.offsets(b)};
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return starts[x] < starts[y]; });
  return order;
}

// Runs fn(b, t_begin, t_end, queries, distances) over every (query block, matrix) pair in parallel, block-major,
// the matrices of a block in the order of their positions: a thread turns each set of positions it meets
// (shared by the whole batch, per image, per window) into distance rows once per block and reuses them, from
// L1, for every matrix that shares them.
template <typename acc_t, typename Fn>
void for_each_position_block(const PositionArgs& args, Fn fn) {
  const PositionLayout& l = args.layout;
  const auto queries = position_rows<acc_t>(args.queries, l.dims);
  const auto keys = position_rows<acc_t>(args.keys, l.dims);
  const std::vector<int64_t> order = matrices_by_positions(args);
  const int64_t rows_per_block = rows_per_distance_block(l.num_queries, l.num_keys, sizeof(acc_t));
  const int64_t num_blocks = (l.num_queries + rows_per_block - 1) / rows_per_block;
  const int64_t grain = std::max<int64_t>(1, kSerialElements / (rows_per_block * std::max<int64_t>(l.num_keys, 1)));
  at::parallel_for(0, num_blocks * l.num_matrices, grain, [&](int64_t begin, int64_t end) {
    // The rows' storage is kept from call to call (no allocation in a small call); they are refilled below at
    // the first task, since `filled` starts empty.
    thread_local DistanceBlock<acc_t> distances;
    distances.rows.resize(rows_per_block * l.num_keys);
    PackedKeys<acc_t> packed;
    std::tuple<const acc_t*, const acc_t*, int64_t> filled{nullptr, nullptr, -1};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task / l.num_matrices;
      const int64_t b = order[task % l.num_matrices];
      const int64_t t_begin = block * rows_per_block;
      const int64_t t_end = std::min(t_begin + rows_per_block, l.num_queries);
      const acc_t* q_matrix = queries.matrix(b);
      const std::tuple<const acc_t*, const acc_t*, int64_t> needed{q_matrix, keys.matrix(b), block};
      if (needed != filled) {
        packed.set(keys, b, l.num_keys);
        distances.runs = packed.runs;
        for (int64_t t = t_begin; t < t_end; ++t) {
          if (!queries.has_position(q_matrix, t)) continue;
          acc_t q[3];
          queries.position(q_matrix, t, q);
          packed.distances(q, 0, l.num_keys, /*zero_missing=*/false,
                           distances.rows.data() + (t - t_begin) * l.num_keys);
        }
        filled = needed;
      }
      fn(b, t_begin, t_end, queries, distances);
    }
  });
}

using KeyRuns = std::vector<std::pair<int64_t, int64_t>>;

// weighted_sums over the runs of keys with a position of one attention row.
template <typename scalar_t, typename acc_t, bool kMass>
__attribute__((always_inline)) inline void run_sums(const scalar_t* row, int64_t key_stride, const acc_t* dist,
                                                    const KeyRuns& runs, acc_t& weighted, acc_t& mass) {
  weighted = 0;
  mass = 0;
  for (const auto& [first, last] : runs) {
    acc_t w, m;
    weighted_sums<scalar_t, acc_t, kMass>(row + first * key_stride, key_stride, dist + first, last - first, w, m);
    weighted += w;
    mass += m;
  }
}

// Distance matrices of every distinct pair of query and key positions at most this large in all (ViT-L/14 at 336 px:
// 1.3 MB, 64 Swin windows of 7 x 7: 0.6 MB) are computed once per call and the attention is then read in memory
// order; beyond, for_each_position_block computes them block by block.
constexpr int64_t kPrecomputedDistanceBytes = int64_t{8} << 20;

// The distances of every distinct pair of query and key positions, for mad_pos's forward: matrix b's distance
// from query t to key s is rows[(set_of[b] * Nq + t) * Nk + s] (NaN where the key has no position), runs_of(b)
// its keys with a position as maximal runs.
template <typename acc_t>
struct PrecomputedDistances {
  std::vector<int64_t> set_of;  // per matrix, the index of its pair of positions
  std::vector<int64_t> first_matrix;  // per set, a matrix that has it
  std::vector<KeyRuns> runs;    // per set
  std::vector<char> complete;   // per set: every query and every key has a position
  const acc_t* rows = nullptr;

  const KeyRuns& runs_of(int64_t b) const { return runs[set_of[b]]; }
  const acc_t* row(int64_t b, int64_t t, int64_t num_queries, int64_t num_keys) const {
    return rows + (set_of[b] * num_queries + t) * num_keys;
  }
};

// The sets of positions of the matrices (matrices_by_positions' order, consecutive equal offsets one set), or
// none when their distances would take more than kPrecomputedDistanceBytes. The rows live in `storage`, kept by
// the caller from call to call so that a call does not fault fresh pages in.
template <typename acc_t>
std::optional<PrecomputedDistances<acc_t>> precompute_distances(const PositionArgs& args,
                                                                std::vector<acc_t>& storage) {
  const PositionLayout& l = args.layout;
  PrecomputedDistances<acc_t> d;
  d.set_of.resize(l.num_matrices);
  std::pair<int64_t, int64_t> previous{-1, -1};
  for (const int64_t b : matrices_by_positions(args)) {
    const std::pair<int64_t, int64_t> start{args.queries.offsets(b), args.keys.offsets(b)};
    if (start != previous) d.first_matrix.push_back(b);
    previous = start;
    d.set_of[b] = static_cast<int64_t>(d.first_matrix.size()) - 1;
  }
  const auto num_sets = static_cast<int64_t>(d.first_matrix.size());
  const int64_t row_values = l.num_keys;
  if (num_sets * l.num_queries * row_values * static_cast<int64_t>(sizeof(acc_t)) > kPrecomputedDistanceBytes)
    return std::nullopt;
  storage.resize(num_sets * l.num_queries * row_values);
  d.runs.resize(num_sets);
  const auto queries = position_rows<acc_t>(args.queries, l.dims);
  const auto keys = position_rows<acc_t>(args.keys, l.dims);
  acc_t* rows = storage.data();
  const int64_t grain = std::max<int64_t>(1, kSerialElements / std::max<int64_t>(row_values, 1));
  at::parallel_for(0, num_sets * l.num_queries, grain, [&](int64_t begin, int64_t end) {
    PackedKeys<acc_t> packed;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t set = row / l.num_queries;
      const int64_t t = row - set * l.num_queries;
      const int64_t b = d.first_matrix[set];
      packed.set(keys, b, l.num_keys);
      if (t == 0) d.runs[set] = packed.runs;  // one thread starts each set at t = 0
      const acc_t* q_matrix = queries.matrix(b);
      if (!queries.has_position(q_matrix, t)) continue;
      acc_t q[3];
      queries.position(q_matrix, t, q);
      packed.distances(q, 0, l.num_keys, /*zero_missing=*/false, rows + row * row_values);
    }
  });
  d.rows = rows;
  d.complete.resize(num_sets);
  for (int64_t set = 0; set < num_sets; ++set) {
    const acc_t* q_matrix = queries.matrix(d.first_matrix[set]);
    bool complete = l.num_keys == 0 || d.runs[set] == KeyRuns{{0, l.num_keys}};
    for (int64_t t = 0; complete && t < l.num_queries; ++t) complete = queries.has_position(q_matrix, t);
    d.complete[set] = complete;
  }
  return d;
}

}  // namespace vitmad
