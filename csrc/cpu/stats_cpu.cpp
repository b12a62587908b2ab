// CPU kernels of vitmad::stats and vitmad::stats_pos: MAD, entropy, prefix mass and self mass of attention
// probabilities (csrc/vitmad.cpp's header; docs/definition.md, "Beside the distance"), every statistic asked for
// from one read of each attention row.
//
// The distances and the walk over rows are those of the mad and mad_pos kernels (grid_distances.h,
// position_distances.h), and so is the summation order of the distance-weighted sums: the "mad" row equals what
// vitmad::mad / mad_pos return, bit for bit. The entropy's x ln x is summed over the whole row right after, while
// the row is in L1 (contiguous_x_log_x), the keys without a position (the prefix tokens of the grid form, the gaps
// between runs of positioned keys of the position form) are summed beside the distance-weighted runs, and the self
// element is read directly. Entropy is a template flag: a call that does not ask for it runs no logarithm.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../mad_args.h"
#include "../position_args.h"
#include "../stats_args.h"
#include "grid_distances.h"
#include "mad_cpu_common.h"
#include "position_distances.h"

namespace vitmad {
namespace {

// The name users call: vitmad.attention_stats wraps both ops.
constexpr const char* kOpName = "vitmad.attention_stats";

// Where one matrix's per-query values of each statistic go; nullptr for a statistic not asked for.
template <typename acc_t>
struct StatsRows {
  acc_t* mad = nullptr;
  acc_t* entropy = nullptr;
  acc_t* prefix_mass = nullptr;
  acc_t* self_mass = nullptr;
};

// The per-query buffer [S, num_matrices, num_queries] seen per matrix.
template <typename acc_t>
struct StatsBuffer {
  acc_t* data;
  int64_t num_matrices;
  int64_t num_queries;
  StatsRequest request;

  acc_t* row(Stat s, int64_t b) const {
    return request.wants(s) ? data + (request.row_of(s) * num_matrices + b) * num_queries : nullptr;
  }
  StatsRows<acc_t> of_matrix(int64_t b) const {
    return {row(Stat::kMad, b), row(Stat::kEntropy, b), row(Stat::kPrefixMass, b), row(Stat::kSelfMass, b)};
  }
};

// What one pass over a query row gives.
template <typename acc_t>
struct RowSums {
  acc_t weighted = 0;  // sum of A * d over the keys with a position
  acc_t mass = 0;      // sum of A over the keys with a position (with renormalisation only)
  acc_t x_log_x = 0;   // sum of A ln A over every key (with entropy only)
  acc_t unplaced = 0;  // sum of A over the keys without a position
  acc_t self = 0;      // A at the query's own token (when asked for)
};

template <typename acc_t>
__attribute__((always_inline)) inline void store(const StatsRows<acc_t>& out, int64_t t, const RowSums<acc_t>& r,
                                                 bool renormalize) {
  if (out.mad != nullptr) out.mad[t] = renormalize ? r.weighted / r.mass : r.weighted;
  if (out.entropy != nullptr) out.entropy[t] = -r.x_log_x;
  if (out.prefix_mass != nullptr) out.prefix_mass[t] = r.unplaced;
  if (out.self_mass != nullptr) out.self_mass[t] = r.self;
}

template <typename acc_t>
__attribute__((always_inline)) inline void store_no_position(const StatsRows<acc_t>& out, int64_t t) {
  constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
  for (acc_t* row : {out.mad, out.entropy, out.prefix_mass, out.self_mass})
    if (row != nullptr) row[t] = kNaN;
}

// mass = sum of a[s * stride] and, with kEntropy, x_log_x = sum of a ln a (XLogXLanes, x_log_x_total's NaN for a
// negative value) over s < n, in any dtype: a vector of values converted on load at a time, the last one padded
// with zeros. For the keys beside the distance-weighted runs (keys without a position) and for rows that are not
// contiguous in the accumulation type.
template <typename scalar_t, typename acc_t, bool kEntropy>
__attribute__((always_inline)) inline void range_sums(const scalar_t* a, int64_t stride, int64_t n, acc_t& mass,
                                                      acc_t& x_log_x) {
  using V = Lanes<acc_t>;
  constexpr int64_t kVec = sizeof(V) / sizeof(acc_t);
  V total{};
  XLogXLanes<acc_t> lanes;
  for (int64_t s = 0; s < n; s += kVec) {
    V x{};
    for (int64_t i = 0; i < std::min(kVec, n - s); ++i) x[i] = static_cast<acc_t>(a[(s + i) * stride]);
    total += x;
    if constexpr (kEntropy) lanes.add(x);
  }
  mass = lane_total<acc_t>(total);
  x_log_x = !kEntropy ? acc_t(0) : lanes.exact_needed() ? exact_x_log_x_sum<scalar_t, acc_t>(a, stride, n)
                                                        : lanes.total();
}

// Grid form ------------------------------------------------------------------------------------------------------

// The statistics of the patch queries [t_begin, t_end) of kRows matrices with contiguous rows in the accumulation
// type, the rows of one query read together over the query's distance row (as mad's shared_distance_rows).
template <int kRows, typename acc_t, bool kEntropy>
__attribute__((always_inline)) inline void grid_shared_rows(const acc_t* const* matrices, int64_t query_stride,
                                                            const MadLayout& l,
                                                            const ColumnDistances<acc_t>& distances, acc_t* buffer,
                                                            int64_t t_begin, int64_t t_end,
                                                            const StatsRows<acc_t>* out) {
  QueryWalk query(t_begin, l.grid_w);
  for (int64_t t = t_begin; t < t_end; ++t, query.next()) {
    const acc_t* rows[kRows];
    const acc_t* patches[kRows];
    for (int g = 0; g < kRows; ++g) {
      rows[g] = matrices[g] + (l.num_prefix + t) * query_stride;
      patches[g] = rows[g] + l.num_prefix;
    }
    const acc_t* dist = distances.row(l, query, buffer);
    acc_t weighted[kRows], mass[kRows] = {};
    if (l.renormalize)
      shared_distance_sums<kRows, acc_t, true>(patches, dist, l.num_patches, weighted, mass);
    else
      shared_distance_sums<kRows, acc_t, false>(patches, dist, l.num_patches, weighted, mass);
    for (int g = 0; g < kRows; ++g) {
      RowSums<acc_t> r;
      for (int64_t s = 0; s < l.num_prefix; ++s) r.unplaced += rows[g][s];
      r.weighted = weighted[g];
      r.mass = mass[g];
      if constexpr (kEntropy)
        r.x_log_x = contiguous_x_log_x(rows[g], l.num_tokens, rows[g] + kPrefetchAheadValues<acc_t>);
      r.self = patches[g][t];
      store(out[g], t, r, l.renormalize);
    }
  }
}

// The statistics of the patch queries [t_begin, t_end) of `count` matrices (their rows in out[i]): grouped rows
// where they are contiguous in the accumulation type, else row by row in any dtype and stride, MAD through mad's
// own weighted_sums (as mad_rows), the other statistics from a second pass over the row, which the first has just
// brought into cache.
template <typename scalar_t, typename acc_t, bool kEntropy>
VITMAD_CPU_CLONES void grid_stats_rows(const scalar_t* const* matrices, int64_t count, int64_t query_stride,
                                       int64_t key_stride, const MadLayout& l,
                                       const ColumnDistances<acc_t>& distances, acc_t* buffer, int64_t t_begin,
                                       int64_t t_end, const StatsRows<acc_t>* out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (key_stride == 1) {
      switch (count) {
        case 4:
          return grid_shared_rows<4, acc_t, kEntropy>(matrices, query_stride, l, distances, buffer, t_begin, t_end,
                                                      out);
        case 3:
          return grid_shared_rows<3, acc_t, kEntropy>(matrices, query_stride, l, distances, buffer, t_begin, t_end,
                                                      out);
        case 2:
          return grid_shared_rows<2, acc_t, kEntropy>(matrices, query_stride, l, distances, buffer, t_begin, t_end,
                                                      out);
        default:
          return grid_shared_rows<1, acc_t, kEntropy>(matrices, query_stride, l, distances, buffer, t_begin, t_end,
                                                      out);
      }
    }
  }
  for (int64_t i = 0; i < count; ++i) {
    QueryWalk query(t_begin, l.grid_w);
    for (int64_t t = t_begin; t < t_end; ++t, query.next()) {
      const scalar_t* row = matrices[i] + (l.num_prefix + t) * query_stride;
      const scalar_t* patches = row + l.num_prefix * key_stride;
      const acc_t* dist = distances.row(l, query, buffer);
      RowSums<acc_t> r;
      if (l.renormalize)
        weighted_sums<scalar_t, acc_t, true>(patches, key_stride, dist, l.num_patches, r.weighted, r.mass);
      else
        weighted_sums<scalar_t, acc_t, false>(patches, key_stride, dist, l.num_patches, r.weighted, r.mass);
      acc_t unused_mass;
      range_sums<scalar_t, acc_t, kEntropy>(row, key_stride, l.num_tokens, unused_mass, r.x_log_x);
      acc_t no_entropy;
      range_sums<scalar_t, acc_t, false>(row, key_stride, l.num_prefix, r.unplaced, no_entropy);
      r.self = static_cast<acc_t>(patches[t * key_stride]);
      store(out[i], t, r, l.renormalize);
    }
  }
}

// The statistics of the patch queries [t_begin, t_end) of a matrix whose query axis is the contiguous one (a
// transposed view), as mad_columns reads it: walk the keys and update the accumulators of a block of queries, so
// memory is still read in order; the distance-weighted sums in mad_columns' order, hence its bits.
template <typename scalar_t, typename acc_t, bool kEntropy>
VITMAD_CPU_CLONES void grid_stats_columns(const scalar_t* matrix, int64_t key_stride, const MadLayout& l,
                                          const acc_t* table, int64_t t_begin, int64_t t_end,
                                          const StatsRows<acc_t>& out) {
  using V = Lanes<acc_t>;
  constexpr int64_t kVec = sizeof(V) / sizeof(acc_t);
  acc_t weighted[kQueriesPerColumnTask] = {};
  acc_t mass[kQueriesPerColumnTask] = {};
  acc_t unplaced[kQueriesPerColumnTask] = {};
  acc_t x_log_x[kQueriesPerColumnTask] = {};
  bool negative[kQueriesPerColumnTask] = {};
  acc_t dist[kQueriesPerColumnTask];
  const int64_t count = t_end - t_begin;
  // x ln x of the queries' values at one key, a vector of queries at a time.
  auto add_entropy = [&](const scalar_t* a) {
    for (int64_t i = 0; i < count; i += kVec) {
      V x{}, terms{}, low{};
      for (int64_t j = 0; j < std::min(kVec, count - i); ++j) x[j] = static_cast<acc_t>(a[i + j]);
      add_x_log_x<acc_t>(x, terms, low);
      for (int64_t j = 0; j < std::min(kVec, count - i); ++j) {
        x_log_x[i + j] += terms[j];
        negative[i + j] |= low[j] < acc_t(0);
      }
    }
  };
  for (int64_t s = 0; s < l.num_prefix; ++s) {
    const scalar_t* a = matrix + s * key_stride + l.num_prefix + t_begin;
    for (int64_t i = 0; i < count; ++i) unplaced[i] += static_cast<acc_t>(a[i]);
    if constexpr (kEntropy) add_entropy(a);
  }
  for (int64_t s = 0; s < l.num_patches; ++s) {
    // d is symmetric: the distances from key s to the queries are those from query s to the keys.
    fill_distances(table, l, s, t_begin, t_end, dist);
    const scalar_t* a = matrix + (l.num_prefix + s) * key_stride + l.num_prefix + t_begin;
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) {
      const acc_t v = static_cast<acc_t>(a[i]);
      weighted[i] += v * dist[i];
      mass[i] += v;
    }
    if constexpr (kEntropy) add_entropy(a);
  }
  for (int64_t i = 0; i < count; ++i) {
    const int64_t t = t_begin + i;
    RowSums<acc_t> r;
    r.weighted = weighted[i];
    r.mass = mass[i];
    r.x_log_x = negative[i] ? std::numeric_limits<acc_t>::quiet_NaN() : x_log_x[i];
    r.unplaced = unplaced[i];
    r.self = static_cast<acc_t>(matrix[(l.num_prefix + t) * key_stride + l.num_prefix + t]);
    store(out, t, r, l.renormalize);
  }
}

template <typename scalar_t, typename acc_t, bool kEntropy>
void grid_stats_typed(const at::Tensor& attn, const MadLayout& l, acc_t patch, const StatsBuffer<acc_t>& buffer) {
  const int64_t query_stride = attn.stride(-2);
  const int64_t key_stride = attn.stride(-1);
  const scalar_t* data = attn.const_data_ptr<scalar_t>();
  const MatrixOffsets matrix_offset = matrix_offsets(attn, kOpName);
  if (key_stride != 1 && query_stride == 1) {
    const auto distances = column_distances<acc_t>(l, patch);
    const int64_t blocks = (l.num_patches + kQueriesPerColumnTask - 1) / kQueriesPerColumnTask;
    at::parallel_for(0, l.num_matrices * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks;
        const int64_t t_begin = (task % blocks) * kQueriesPerColumnTask;
        const int64_t t_end = std::min(t_begin + kQueriesPerColumnTask, l.num_patches);
        grid_stats_columns<scalar_t, acc_t, kEntropy>(data + matrix_offset(b), key_stride, l, distances->table(),
                                                      t_begin, t_end, buffer.of_matrix(b));
      }
    });
    return;
  }
  const bool grouped = std::is_same_v<scalar_t, acc_t> && key_stride == 1;
  const int64_t group = !grouped ? 1 : l.renormalize ? kMatricesPerGroupWithMass : kMatricesPerGroup;
  for_each_query_run<acc_t>(l, patch, group, [&](int64_t b, int64_t count, int64_t t_begin, int64_t t_end,
                                                 const ColumnDistances<acc_t>& distances, acc_t* row_buffer) {
    const scalar_t* matrices[kMatricesPerGroup];
    StatsRows<acc_t> out[kMatricesPerGroup];
    for (int64_t i = 0; i < count; ++i) {
      matrices[i] = data + matrix_offset(b + i);
      out[i] = buffer.of_matrix(b + i);
    }
    grid_stats_rows<scalar_t, acc_t, kEntropy>(matrices, count, query_stride, key_stride, l, distances, row_buffer,
                                               t_begin, t_end, out);
  });
}

// Runs fn(std::bool_constant<entropy>{}): the entropy flag as a compile-time constant.
template <typename Fn>
void with_entropy_flag(bool entropy, Fn fn) {
  if (entropy)
    fn(std::true_type{});
  else
    fn(std::false_type{});
}

// The "mean" rows of `out` [S, num_matrices] from the per-query rows, as mad and mad_pos reduce theirs.
template <typename acc_t, typename QueryFilter>
void mean_rows(const acc_t* per_query, const StatsRequest& request, int64_t num_matrices, int64_t num_queries,
               QueryFilter counts, acc_t* out) {
  for (int64_t s = 0; s < request.count; ++s)
    mean_over_queries<acc_t>(per_query + s * num_matrices * num_queries, num_matrices, num_queries, counts,
                             out + s * num_matrices);
}

at::Tensor stats_cpu(const at::Tensor& attn, int64_t patch, c10::ArrayRef<std::string> stats,
                     int64_t num_prefix_tokens, at::OptionalIntArrayRef grid, bool renormalize,
                     c10::string_view reduction) {
  const MadLayout l = check_mad_args(attn, patch, num_prefix_tokens, grid, renormalize, reduction, kOpName);
  const StatsRequest request = check_stats(stats, l.num_tokens, l.num_tokens, /*has_times=*/false, kOpName);
  StatsOutputs outputs = empty_stats_outputs(attn, request, l.num_matrices, l.num_patches, l.reduce_mean);
  if (l.num_matrices == 0) return outputs.out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "vitmad_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* per_query = outputs.per_query.mutable_data_ptr<acc_t>();
    const StatsBuffer<acc_t> buffer{per_query, l.num_matrices, l.num_patches, request};
    with_entropy_flag(request.wants(Stat::kEntropy), [&](auto entropy) {
      grid_stats_typed<scalar_t, acc_t, decltype(entropy)::value>(attn, l, static_cast<acc_t>(patch), buffer);
    });
    if (l.reduce_mean)
      mean_rows<acc_t>(per_query, request, l.num_matrices, l.num_patches, AllQueries{},
                       outputs.out.mutable_data_ptr<acc_t>());
  });
  return outputs.out;
}

// Position form --------------------------------------------------------------------------------------------------

// Adds the mass of the keys [first, last) without a position of kRows contiguous rows to their sums.
template <int kRows, typename acc_t>
__attribute__((always_inline)) inline void add_unplaced(const acc_t* const* rows, int64_t first, int64_t last,
                                                        RowSums<acc_t>* sums) {
  if (first == last) return;
  for (int g = 0; g < kRows; ++g) {
    acc_t mass, no_entropy;
    range_sums<acc_t, acc_t, false>(rows[g] + first, 1, last - first, mass, no_entropy);
    sums[g].unplaced += mass;
  }
}

// The statistics of the queries [t_begin, t_end) of kRows matrices that share their positions, with contiguous
// rows in the accumulation type (as mad_pos's shared_position_rows): each run of keys with a position through
// shared_distance_sums, the gaps between runs beside it, the entropy over the whole row after them
// (contiguous_x_log_x); NaN for a query without a position.
template <int kRows, typename acc_t, bool kEntropy>
__attribute__((always_inline)) inline void position_shared_rows(const acc_t* const* matrices, int64_t query_stride,
                                                                const PositionLayout& l,
                                                                const PrecomputedDistances<acc_t>& distances,
                                                                const PositionRows<acc_t>& queries, int64_t b,
                                                                int64_t t_begin, int64_t t_end,
                                                                const StatsRows<acc_t>* out) {
  const KeyRuns& runs = distances.runs_of(b);
  const acc_t* q_matrix = queries.matrix(b);
  for (int64_t t = t_begin; t < t_end; ++t) {
    if (!queries.has_position(q_matrix, t)) {
      for (int g = 0; g < kRows; ++g) store_no_position(out[g], t);
      continue;
    }
    const acc_t* dist = distances.row(b, t, l.num_queries, l.num_keys);
    const acc_t* rows[kRows];
    for (int g = 0; g < kRows; ++g) rows[g] = matrices[g] + t * query_stride;
    RowSums<acc_t> sums[kRows];
    int64_t unplaced_from = 0;
    for (const auto& [first, last] : runs) {
      add_unplaced<kRows, acc_t>(rows, unplaced_from, first, sums);
      const acc_t* run_rows[kRows];
      for (int g = 0; g < kRows; ++g) run_rows[g] = rows[g] + first;
      acc_t w[kRows], m[kRows] = {};
      if (l.renormalize)
        shared_distance_sums<kRows, acc_t, true>(run_rows, dist + first, last - first, w, m);
      else
        shared_distance_sums<kRows, acc_t, false>(run_rows, dist + first, last - first, w, m);
      for (int g = 0; g < kRows; ++g) {
        sums[g].weighted += w[g];
        if (l.renormalize) sums[g].mass += m[g];
      }
      unplaced_from = last;
    }
    add_unplaced<kRows, acc_t>(rows, unplaced_from, l.num_keys, sums);
    for (int g = 0; g < kRows; ++g) {
      if constexpr (kEntropy)
        sums[g].x_log_x = contiguous_x_log_x(rows[g], l.num_keys, rows[g] + kPrefetchAheadValues<acc_t>);
      if (out[g].self_mass != nullptr) sums[g].self = rows[g][t];  // Nq == Nk: check_stats
      store(out[g], t, sums[g], l.renormalize);
    }
  }
}

template <typename acc_t, bool kEntropy>
VITMAD_CPU_CLONES void position_stats_shared_rows(const acc_t* const* matrices, int64_t count, int64_t query_stride,
                                                  const PositionLayout& l,
                                                  const PrecomputedDistances<acc_t>& distances,
                                                  const PositionRows<acc_t>& queries, int64_t b, int64_t t_begin,
                                                  int64_t t_end, const StatsRows<acc_t>* out) {
  switch (count) {
    case 4:
      return position_shared_rows<4, acc_t, kEntropy>(matrices, query_stride, l, distances, queries, b, t_begin,
                                                      t_end, out);
    case 3:
      return position_shared_rows<3, acc_t, kEntropy>(matrices, query_stride, l, distances, queries, b, t_begin,
                                                      t_end, out);
    case 2:
      return position_shared_rows<2, acc_t, kEntropy>(matrices, query_stride, l, distances, queries, b, t_begin,
                                                      t_end, out);
    default:
      return position_shared_rows<1, acc_t, kEntropy>(matrices, query_stride, l, distances, queries, b, t_begin,
                                                      t_end, out);
  }
}

// Consecutive matrices (in index order) that share their positions, at most max_group per group: the starts of
// the groups, then num_matrices.
template <typename acc_t>
std::vector<int64_t> position_groups(const PrecomputedDistances<acc_t>& distances, int64_t num_matrices,
                                     int64_t max_group) {
  std::vector<int64_t> starts{0};
  for (int64_t b = 1; b < num_matrices; ++b)
    if (b - starts.back() == max_group || distances.set_of[b] != distances.set_of[b - 1]) starts.push_back(b);
  starts.push_back(num_matrices);
  return starts;
}

// stats_pos for contiguous keys in the accumulation type with precomputed distances, in memory order (as
// mad_pos_precomputed): each thread a contiguous range of (group, query) rows.
template <typename acc_t, bool kEntropy>
void position_stats_precomputed(const at::Tensor& attn, const PositionArgs& args,
                                const PrecomputedDistances<acc_t>& distances, const StatsBuffer<acc_t>& buffer) {
  const PositionLayout& l = args.layout;
  const auto queries = position_rows<acc_t>(args.queries, l.dims);
  const int64_t max_group = l.renormalize ? kMatricesPerGroupWithMass : kMatricesPerGroup;
  const std::vector<int64_t> group_starts = position_groups(distances, l.num_matrices, max_group);
  const auto num_groups = static_cast<int64_t>(group_starts.size()) - 1;
  const acc_t* data = attn.const_data_ptr<acc_t>();
  const MatrixOffsets matrix_offset = matrix_offsets(attn, kOpName);
  const int64_t query_stride = attn.stride(-2);
  const int64_t grain = std::max<int64_t>(1, kSerialElements / (max_group * std::max<int64_t>(l.num_keys, 1)));
  at::parallel_for(0, num_groups * l.num_queries, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end;) {
      const int64_t group = row / l.num_queries;
      const int64_t t_begin = row - group * l.num_queries;
      const int64_t t_end = std::min(l.num_queries, t_begin + (end - row));
      const int64_t b = group_starts[group];
      const int64_t count = group_starts[group + 1] - b;
      const acc_t* matrices[kMatricesPerGroup];
      StatsRows<acc_t> out[kMatricesPerGroup];
      for (int64_t i = 0; i < count; ++i) {
        matrices[i] = data + matrix_offset(b + i);
        out[i] = buffer.of_matrix(b + i);
      }
      position_stats_shared_rows<acc_t, kEntropy>(matrices, count, query_stride, l, distances, queries, b, t_begin,
                                                  t_end, out);
      row += t_end - t_begin;
    }
  });
}

// next[i]: the matrix that the next group reads where this one reads matrices[i] (or nullptr), prefetched into L2
// while the entropy pass computes, so that the next group's distance pass finds it there.
template <typename acc_t, bool kEntropy>
VITMAD_CPU_CLONES void whole_matrix_stats_sums(const acc_t* const* matrices, const acc_t* const* next, int64_t count,
                                               const acc_t* dist, int64_t n, acc_t* weighted, acc_t* x_log_x) {
  whole_matrix_sums<acc_t>(matrices, count, dist, n, weighted);
  if constexpr (kEntropy) {
    // In chunks, their totals added in double, as whole_matrix_sums sums the distances and for the same reason.
    for (int64_t i = 0; i < count; ++i) {
      double total = 0;
      for (int64_t start = 0; start < n; start += kWholeMatrixChunk)
        total += static_cast<double>(contiguous_x_log_x<acc_t, 2>(
            matrices[i] + start, std::min(kWholeMatrixChunk, n - start), next[i] ? next[i] + start : nullptr));
      x_log_x[i] = static_cast<acc_t>(total);
    }
  }
}

// "mean" without renormalisation where every query and key has a position and each matrix is contiguous (as
// mad_pos_whole_matrices, whose MAD it equals bit for bit): a matrix is read as one stream of Nq * Nk values, the
// mean of m_t being the whole dot product over Nq and the mean entropy the whole sum of -A ln A over Nq; no key
// lacks a position, so the prefix mass is 0; the self mass is the diagonal's mean, in double as mean_over_queries
// takes it. Returns false, computing nothing, where that does not hold.
template <typename acc_t, bool kEntropy>
bool position_stats_whole_matrices(const at::Tensor& attn, const PositionArgs& args,
                                   const PrecomputedDistances<acc_t>& distances, const StatsRequest& request,
                                   acc_t* out) {
  const PositionLayout& l = args.layout;
  if (!l.reduce_mean || l.renormalize || l.num_queries == 0 || attn.stride(-1) != 1 ||
      attn.stride(-2) != l.num_keys)
    return false;
  for (const char complete : distances.complete)
    if (!complete) return false;
  const int64_t max_group = kMatricesPerGroup;
  const std::vector<int64_t> group_starts = position_groups(distances, l.num_matrices, max_group);
  const auto num_groups = static_cast<int64_t>(group_starts.size()) - 1;
  const acc_t* data = attn.const_data_ptr<acc_t>();
  const MatrixOffsets matrix_offset = matrix_offsets(attn, kOpName);
  const int64_t n = l.num_queries * l.num_keys;
  const auto num_queries = static_cast<acc_t>(l.num_queries);
  auto row_of = [&](Stat s) { return request.wants(s) ? out + request.row_of(s) * l.num_matrices : nullptr; };
  acc_t* mad = row_of(Stat::kMad);
  acc_t* entropy = row_of(Stat::kEntropy);
  acc_t* prefix_mass = row_of(Stat::kPrefixMass);
  acc_t* self_mass = row_of(Stat::kSelfMass);
  const int64_t grain = std::max<int64_t>(1, kSerialElements / (max_group * std::max<int64_t>(n, 1)));
  at::parallel_for(0, num_groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      const int64_t b = group_starts[group];
      const int64_t count = group_starts[group + 1] - b;
      const acc_t* matrices[kMatricesPerGroup];
      const acc_t* next[kMatricesPerGroup] = {};
      for (int64_t i = 0; i < count; ++i) matrices[i] = data + matrix_offset(b + i);
      if (group + 1 < end)
        for (int64_t i = 0; i < count && b + count + i < group_starts[group + 2]; ++i)
          next[i] = data + matrix_offset(b + count + i);
      acc_t weighted[kMatricesPerGroup], x_log_x[kMatricesPerGroup] = {};
      whole_matrix_stats_sums<acc_t, kEntropy>(matrices, next, count,
                                               distances.row(b, 0, l.num_queries, l.num_keys), n, weighted, x_log_x);
      for (int64_t i = 0; i < count; ++i) {
        if (mad != nullptr) mad[b + i] = weighted[i] / num_queries;
        if (entropy != nullptr) entropy[b + i] = -x_log_x[i] / num_queries;
        if (prefix_mass != nullptr) prefix_mass[b + i] = 0;
        if (self_mass != nullptr) {
          double total = 0;
          for (int64_t t = 0; t < l.num_queries; ++t) total += static_cast<double>(matrices[i][t * (l.num_keys + 1)]);
          self_mass[b + i] = static_cast<acc_t>(total / static_cast<double>(l.num_queries));
        }
      }
    }
  });
  return true;
}

// The statistics of the queries [t_begin, t_end) of one matrix in any dtype and strides, row by row: MAD through
// mad_pos's own run_sums, the other statistics from a second pass over the row, which the first has just brought
// into cache.
template <typename scalar_t, typename acc_t, bool kEntropy>
VITMAD_CPU_CLONES void position_stats_rows(const scalar_t* matrix, int64_t query_stride, int64_t key_stride,
                                           const PositionLayout& l, const acc_t* q_matrix,
                                           const PositionRows<acc_t>& queries, const KeyRuns& runs,
                                           const acc_t* dist_rows, int64_t t_begin, int64_t t_end,
                                           const StatsRows<acc_t>& out) {
  for (int64_t t = t_begin; t < t_end; ++t) {
    if (!queries.has_position(q_matrix, t)) {
      store_no_position(out, t);
      continue;
    }
    const scalar_t* row = matrix + t * query_stride;
    const acc_t* dist = dist_rows + (t - t_begin) * l.num_keys;
    RowSums<acc_t> r;
    if (l.renormalize)
      run_sums<scalar_t, acc_t, true>(row, key_stride, dist, runs, r.weighted, r.mass);
    else
      run_sums<scalar_t, acc_t, false>(row, key_stride, dist, runs, r.weighted, r.mass);
    acc_t unused_mass, no_entropy;
    range_sums<scalar_t, acc_t, kEntropy>(row, key_stride, l.num_keys, unused_mass, r.x_log_x);
    int64_t unplaced_from = 0;
    for (const auto& [first, last] : runs) {
      acc_t gap;
      range_sums<scalar_t, acc_t, false>(row + unplaced_from * key_stride, key_stride, first - unplaced_from, gap,
                                         no_entropy);
      r.unplaced += gap;
      unplaced_from = last;
    }
    acc_t gap;
    range_sums<scalar_t, acc_t, false>(row + unplaced_from * key_stride, key_stride, l.num_keys - unplaced_from, gap,
                                       no_entropy);
    r.unplaced += gap;
    if (out.self_mass != nullptr) r.self = static_cast<acc_t>(row[t * key_stride]);  // Nq == Nk: check_stats
    store(out, t, r, l.renormalize);
  }
}

// Fills the per-query rows; or, in position_stats_whole_matrices' case, the "mean" output `out` itself, and returns
// true.
template <typename scalar_t, typename acc_t, bool kEntropy>
bool position_stats_typed(const at::Tensor& attn, const PositionArgs& args, const StatsRequest& request,
                          const StatsBuffer<acc_t>& buffer, acc_t* out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (attn.stride(-1) == 1) {
      thread_local std::vector<acc_t> storage;
      const auto distances = precompute_distances<acc_t>(args, storage);
      if (distances.has_value()) {
        if (position_stats_whole_matrices<acc_t, kEntropy>(attn, args, *distances, request, out)) return true;
        position_stats_precomputed<acc_t, kEntropy>(attn, args, *distances, buffer);
        return false;
      }
    }
  }
  const PositionLayout& l = args.layout;
  const scalar_t* data = attn.const_data_ptr<scalar_t>();
  const MatrixOffsets matrix_offset = matrix_offsets(attn, kOpName);
  for_each_position_block<acc_t>(args, [&](int64_t b, int64_t t_begin, int64_t t_end,
                                           const PositionRows<acc_t>& queries,
                                           const DistanceBlock<acc_t>& distances) {
    position_stats_rows<scalar_t, acc_t, kEntropy>(data + matrix_offset(b), attn.stride(-2), attn.stride(-1), l,
                                                   queries.matrix(b), queries, distances.runs,
                                                   distances.rows.data(), t_begin, t_end, buffer.of_matrix(b));
  });
  return false;
}

at::Tensor stats_pos_cpu(const at::Tensor& attn, const at::Tensor& positions,
                         const std::optional<at::Tensor>& key_positions, c10::ArrayRef<std::string> stats,
                         bool renormalize, c10::string_view reduction) {
  check_attn_tensor(attn, "[..., Nq, Nk]", kOpName);
  const PositionArgs args = check_position_args(attn, attn.size(-2), attn.size(-1), positions, key_positions,
                                                renormalize, reduction, mad_output_dtype(attn.scalar_type()),
                                                /*check_values=*/true, kOpName);
  const PositionLayout& l = args.layout;
  const StatsRequest request = check_stats(stats, l.num_queries, l.num_keys, /*has_times=*/false, kOpName);
  StatsOutputs outputs = empty_stats_outputs(attn, request, l.num_matrices, l.num_queries, l.reduce_mean);
  if (l.num_matrices == 0) return outputs.out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "vitmad_stats_pos_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* per_query = outputs.per_query.mutable_data_ptr<acc_t>();
    acc_t* out = outputs.out.mutable_data_ptr<acc_t>();
    const StatsBuffer<acc_t> buffer{per_query, l.num_matrices, l.num_queries, request};
    bool reduced = false;
    with_entropy_flag(request.wants(Stat::kEntropy), [&](auto entropy) {
      reduced = position_stats_typed<scalar_t, acc_t, decltype(entropy)::value>(attn, args, request, buffer, out);
    });
    if (l.reduce_mean && !reduced) {
      const auto queries = position_rows<acc_t>(args.queries, l.dims);
      mean_rows<acc_t>(per_query, request, l.num_matrices, l.num_queries, PositionedQueries<acc_t>{queries}, out);
    }
  });
  return outputs.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitmad, CPU, m) {
  m.impl("stats", &stats_cpu);
  m.impl("stats_pos", &stats_pos_cpu);
}

}  // namespace vitmad
