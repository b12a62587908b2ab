// CPU kernels of vitmad::mad_pos and vitmad::mad_pos_backward: MAD from token positions (docs/definition.md,
// "Beyond one grid: where each token is").
//
// As in the grid form, no distance matrix is built for the whole tensor: a task owns a block of queries of one
// matrix and uses the distance rows of its queries, computed from the key positions packed into three small
// contiguous arrays. Matrices are visited in the order of their positions, so broadcast positions (one set for a
// whole batch, one per image or per window) are turned into distances once per thread and block. Each attention
// row is then read in place as contiguous dot products over the runs of keys that have a position.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../mad_args.h"
#include "../position_args.h"
#include "mad_cpu_common.h"

namespace vitmad {
namespace {

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
std::vector<int64_t> matrices_by_positions(const PositionArgs& args) {
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

// m_t for the queries [t_begin, t_end) of one matrix; NaN for a query without a position.
template <typename scalar_t, typename acc_t>
VITMAD_CPU_CLONES void mad_pos_rows(const scalar_t* matrix, int64_t query_stride, int64_t key_stride,
                                    const PositionLayout& l, const acc_t* q_matrix, const PositionRows<acc_t>& queries,
                                    const KeyRuns& runs, const acc_t* dist_rows, int64_t t_begin, int64_t t_end,
                                    acc_t* out) {
  for (int64_t t = t_begin; t < t_end; ++t) {
    if (!queries.has_position(q_matrix, t)) {
      out[t] = std::numeric_limits<acc_t>::quiet_NaN();
      continue;
    }
    const acc_t* dist = dist_rows + (t - t_begin) * l.num_keys;
    acc_t weighted, mass;
    if (l.renormalize) {
      run_sums<scalar_t, acc_t, true>(matrix + t * query_stride, key_stride, dist, runs, weighted, mass);
      out[t] = weighted / mass;
    } else {
      run_sums<scalar_t, acc_t, false>(matrix + t * query_stride, key_stride, dist, runs, weighted, mass);
      out[t] = weighted;
    }
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

// m_t of the queries [t_begin, t_end) of kRows matrices that share their positions, with contiguous rows in the
// accumulation type: shared_distance_sums over each run of keys with a position; NaN for a query without one.
template <int kRows, typename acc_t>
__attribute__((always_inline)) inline void shared_position_rows(const acc_t* const* matrices, int64_t query_stride,
                                                                const PositionLayout& l,
                                                                const PrecomputedDistances<acc_t>& distances,
                                                                const acc_t* q_matrix,
                                                                const PositionRows<acc_t>& queries, int64_t b,
                                                                int64_t t_begin, int64_t t_end, acc_t* const* out) {
  const KeyRuns& runs = distances.runs_of(b);
  for (int64_t t = t_begin; t < t_end; ++t) {
    if (!queries.has_position(q_matrix, t)) {
      for (int g = 0; g < kRows; ++g) out[g][t] = std::numeric_limits<acc_t>::quiet_NaN();
      continue;
    }
    const acc_t* dist = distances.row(b, t, l.num_queries, l.num_keys);
    acc_t weighted[kRows] = {}, mass[kRows] = {};
    for (const auto& [first, last] : runs) {
      const acc_t* rows[kRows];
      for (int g = 0; g < kRows; ++g) rows[g] = matrices[g] + t * query_stride + first;
      acc_t w[kRows], m[kRows];
      if (l.renormalize) {
        shared_distance_sums<kRows, acc_t, true>(rows, dist + first, last - first, w, m);
      } else {
        shared_distance_sums<kRows, acc_t, false>(rows, dist + first, last - first, w, m);
      }
      for (int g = 0; g < kRows; ++g) {
        weighted[g] += w[g];
        if (l.renormalize) mass[g] += m[g];
      }
    }
    for (int g = 0; g < kRows; ++g) out[g][t] = l.renormalize ? weighted[g] / mass[g] : weighted[g];
  }
}

template <typename acc_t>
VITMAD_CPU_CLONES void mad_pos_shared_rows(const acc_t* const* matrices, int64_t count, int64_t query_stride,
                                           const PositionLayout& l, const PrecomputedDistances<acc_t>& distances,
                                           const acc_t* q_matrix, const PositionRows<acc_t>& queries, int64_t b,
                                           int64_t t_begin, int64_t t_end, acc_t* const* out) {
  switch (count) {
    case 4:
      return shared_position_rows<4>(matrices, query_stride, l, distances, q_matrix, queries, b, t_begin, t_end, out);
    case 3:
      return shared_position_rows<3>(matrices, query_stride, l, distances, q_matrix, queries, b, t_begin, t_end, out);
    case 2:
      return shared_position_rows<2>(matrices, query_stride, l, distances, q_matrix, queries, b, t_begin, t_end, out);
    default:
      return shared_position_rows<1>(matrices, query_stride, l, distances, q_matrix, queries, b, t_begin, t_end, out);
  }
}

// Matrices whose rows of one query are read together (see mad_cpu.cpp): up to four consecutive matrices that
// share their positions, two with renormalisation.
constexpr int64_t kMatricesPerGroup = 4;
constexpr int64_t kMatricesPerGroupWithMass = 2;

// mad_pos's forward for contiguous keys in the accumulation type with precomputed distances: the attention is
// read in memory order, each thread a contiguous range of (group, query) rows, each group up to four consecutive
// matrices with the same positions reading each distance row once.
template <typename acc_t>
void mad_pos_precomputed(const at::Tensor& attn, const PositionArgs& args,
                         const PrecomputedDistances<acc_t>& distances, acc_t* per_query) {
  const PositionLayout& l = args.layout;
  const auto queries = position_rows<acc_t>(args.queries, l.dims);
  const int64_t max_group = l.renormalize ? kMatricesPerGroupWithMass : kMatricesPerGroup;
  std::vector<int64_t> group_starts{0};
  for (int64_t b = 1; b < l.num_matrices; ++b)
    if (b - group_starts.back() == max_group || distances.set_of[b] != distances.set_of[b - 1])
      group_starts.push_back(b);
  group_starts.push_back(l.num_matrices);
  const auto num_groups = static_cast<int64_t>(group_starts.size()) - 1;
  const acc_t* data = attn.const_data_ptr<acc_t>();
  const MatrixOffsets matrix_offset = matrix_offsets(attn, "vitmad.mad");
  const int64_t query_stride = attn.stride(-2);
  const int64_t grain =
      std::max<int64_t>(1, kSerialElements / (max_group * std::max<int64_t>(l.num_keys, 1)));
  at::parallel_for(0, num_groups * l.num_queries, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end;) {
      const int64_t group = row / l.num_queries;
      const int64_t t_begin = row - group * l.num_queries;
      const int64_t t_end = std::min(l.num_queries, t_begin + (end - row));
      const int64_t b = group_starts[group];
      const int64_t count = group_starts[group + 1] - b;
      const acc_t* matrices[kMatricesPerGroup];
      acc_t* out[kMatricesPerGroup];
      for (int64_t i = 0; i < count; ++i) {
        matrices[i] = data + matrix_offset(b + i);
        out[i] = per_query + (b + i) * l.num_queries;
      }
      mad_pos_shared_rows<acc_t>(matrices, count, query_stride, l, distances, queries.matrix(b), queries, b, t_begin,
                                 t_end, out);
      row += t_end - t_begin;
    }
  });
}

template <typename acc_t>
VITMAD_CPU_CLONES void whole_matrix_sums(const acc_t* const* matrices, int64_t count, const acc_t* dist, int64_t n,
                                         acc_t* weighted) {
  acc_t mass[kMatricesPerGroup];
  switch (count) {
    case 4: return shared_distance_sums<4, acc_t, false>(matrices, dist, n, weighted, mass);
    case 3: return shared_distance_sums<3, acc_t, false>(matrices, dist, n, weighted, mass);
    case 2: return shared_distance_sums<2, acc_t, false>(matrices, dist, n, weighted, mass);
    default: return shared_distance_sums<1, acc_t, false>(matrices, dist, n, weighted, mass);
  }
}

// "mean" without renormalisation where every query and key has a position and each matrix is contiguous: the mean
// of m_t over the Nq queries is the matrix's whole dot product with its distances over Nq, so a matrix is read as
// one stream of Nq * Nk values, four matrices sharing positions per distance load (a 7 x 7 window's rows of 49
// keys are too short to stream one by one). Returns false, computing nothing, where that does not hold.
template <typename acc_t>
bool mad_pos_whole_matrices(const at::Tensor& attn, const PositionArgs& args,
                            const PrecomputedDistances<acc_t>& distances, acc_t* out) {
  const PositionLayout& l = args.layout;
  if (!l.reduce_mean || l.renormalize || l.num_queries == 0 || attn.stride(-1) != 1 ||
      attn.stride(-2) != l.num_keys)
    return false;
  for (const char complete : distances.complete)
    if (!complete) return false;
  std::vector<int64_t> group_starts{0};
  for (int64_t b = 1; b < l.num_matrices; ++b)
    if (b - group_starts.back() == kMatricesPerGroup || distances.set_of[b] != distances.set_of[b - 1])
      group_starts.push_back(b);
  group_starts.push_back(l.num_matrices);
  const auto num_groups = static_cast<int64_t>(group_starts.size()) - 1;
  const acc_t* data = attn.const_data_ptr<acc_t>();
  const MatrixOffsets matrix_offset = matrix_offsets(attn, "vitmad.mad");
  const int64_t n = l.num_queries * l.num_keys;
  const int64_t grain = std::max<int64_t>(1, kSerialElements / (kMatricesPerGroup * std::max<int64_t>(n, 1)));
  at::parallel_for(0, num_groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      const int64_t b = group_starts[group];
      const int64_t count = group_starts[group + 1] - b;
      const acc_t* matrices[kMatricesPerGroup];
      for (int64_t i = 0; i < count; ++i) matrices[i] = data + matrix_offset(b + i);
      acc_t weighted[kMatricesPerGroup];
      whole_matrix_sums<acc_t>(matrices, count, distances.row(b, 0, l.num_queries, l.num_keys), n, weighted);
      for (int64_t i = 0; i < count; ++i) out[b + i] = weighted[i] / static_cast<acc_t>(l.num_queries);
    }
  });
  return true;
}

at::Tensor mad_pos_cpu(const at::Tensor& attn, const at::Tensor& positions,
                       const std::optional<at::Tensor>& key_positions, bool renormalize, c10::string_view reduction) {
  check_attn_tensor(attn, "[..., Nq, Nk]", "vitmad.mad");
  const auto out_dtype = mad_output_dtype(attn.scalar_type());
  const PositionArgs args = check_position_args(attn, attn.size(-2), attn.size(-1), positions, key_positions,
                                                renormalize, reduction, out_dtype, /*check_values=*/true, "vitmad.mad");
  const PositionLayout& l = args.layout;
  at::Tensor out = at::empty(mad_output_shape(attn, l.reduce_mean, l.num_queries), attn.options().dtype(out_dtype));
  if (l.num_matrices == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "vitmad_mad_pos_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::unique_ptr<acc_t[]> buffer;  // the per-query values of "mean": a plain buffer, not an ATen allocation
    if (l.reduce_mean) buffer.reset(new acc_t[l.num_matrices * l.num_queries]);
    acc_t* rows = l.reduce_mean ? buffer.get() : out.mutable_data_ptr<acc_t>();
    bool done = false;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (attn.stride(-1) == 1) {
        thread_local std::vector<acc_t> storage;
        const auto distances = precompute_distances<acc_t>(args, storage);
        if (distances.has_value() &&
            mad_pos_whole_matrices<acc_t>(attn, args, *distances, out.mutable_data_ptr<acc_t>()))
          return;
        if (distances.has_value()) {
          mad_pos_precomputed<acc_t>(attn, args, *distances, rows);
          done = true;
        }
      }
    }
    const scalar_t* data = attn.const_data_ptr<scalar_t>();
    const MatrixOffsets matrix_offset = matrix_offsets(attn, "vitmad.mad");
    if (!done)
      for_each_position_block<acc_t>(
        args, [&](int64_t b, int64_t t_begin, int64_t t_end, const PositionRows<acc_t>& queries,
                  const DistanceBlock<acc_t>& distances) {
          mad_pos_rows<scalar_t, acc_t>(data + matrix_offset(b), attn.stride(-2), attn.stride(-1), l, queries.matrix(b),
                                        queries, distances.runs, distances.rows.data(), t_begin, t_end,
                                        rows + b * l.num_queries);
        });
    if (l.reduce_mean) {
      const auto queries = position_rows<acc_t>(args.queries, l.dims);
      mean_over_queries<acc_t>(rows, l.num_matrices, l.num_queries, PositionedQueries<acc_t>{queries},
                               out.mutable_data_ptr<acc_t>());
    }
  });
  return out;
}

// grad_attn[b, t, s] = g_t * d(t, s), or g_t / Z_t * (d(t, s) - m_t) with renormalisation, over queries and
// keys with a position; zero elsewhere (the output starts zeroed).
template <typename scalar_t, typename acc_t>
VITMAD_CPU_CLONES void mad_pos_backward_rows(const scalar_t* matrix, int64_t query_stride, int64_t key_stride,
                                             const PositionLayout& l, const acc_t* q_matrix,
                                             const PositionRows<acc_t>& queries, const KeyRuns& runs,
                                             const acc_t* dist_rows, const acc_t* grad_per_query, int64_t t_begin,
                                             int64_t t_end, scalar_t* grad_matrix) {
  for (int64_t t = t_begin; t < t_end; ++t) {
    if (!queries.has_position(q_matrix, t)) continue;
    const acc_t* dist = dist_rows + (t - t_begin) * l.num_keys;
    acc_t scale = grad_per_query[t];
    acc_t shift = 0;
    if (l.renormalize) {
      acc_t weighted, mass;
      run_sums<scalar_t, acc_t, true>(matrix + t * query_stride, key_stride, dist, runs, weighted, mass);
      scale /= mass;
      shift = weighted / mass;
    }
    scalar_t* out = grad_matrix + t * l.num_keys;
    for (const auto& [first, last] : runs) {
#pragma omp simd
      for (int64_t s = first; s < last; ++s) out[s] = static_cast<scalar_t>(scale * (dist[s] - shift));
    }
  }
}

at::Tensor mad_pos_backward_cpu(const at::Tensor& grad, const at::Tensor& attn, const at::Tensor& positions,
                                const std::optional<at::Tensor>& key_positions, bool renormalize,
                                c10::string_view reduction) {
  check_attn_tensor(attn, "[..., Nq, Nk]", "vitmad.mad_backward");
  const auto out_dtype = mad_output_dtype(attn.scalar_type());
  const PositionArgs args =
      check_position_args(attn, attn.size(-2), attn.size(-1), positions, key_positions, renormalize, reduction,
                          out_dtype, /*check_values=*/true, "vitmad.mad_backward");
  const PositionLayout& l = args.layout;
  const at::Tensor g = per_query_grad(grad, attn, args);
  at::Tensor grad_attn = at::zeros(attn.sizes(), attn.options().memory_format(at::MemoryFormat::Contiguous));
  if (l.num_matrices == 0) return grad_attn;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "vitmad_mad_pos_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* g_data = g.const_data_ptr<acc_t>();
    const scalar_t* a_data = attn.const_data_ptr<scalar_t>();
    scalar_t* out_data = grad_attn.mutable_data_ptr<scalar_t>();
    const MatrixOffsets matrix_offset = matrix_offsets(attn, "vitmad.mad_backward");
    for_each_position_block<acc_t>(args, [&](int64_t b, int64_t t_begin, int64_t t_end,
                                             const PositionRows<acc_t>& queries,
                                             const DistanceBlock<acc_t>& distances) {
      mad_pos_backward_rows<scalar_t, acc_t>(
          a_data + matrix_offset(b), attn.stride(-2), attn.stride(-1), l, queries.matrix(b), queries, distances.runs,
          distances.rows.data(), g_data + b * l.num_queries, t_begin, t_end, out_data + b * l.num_queries * l.num_keys);
    });
  });
  return grad_attn;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitmad, CPU, m) {
  m.impl("mad_pos", &mad_pos_cpu);
  m.impl("mad_pos_backward", &mad_pos_backward_cpu);
}

}  // namespace vitmad
