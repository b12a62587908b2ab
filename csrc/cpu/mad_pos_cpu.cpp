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
#include <optional>
#include <type_traits>
#include <vector>

#include "../mad_args.h"
#include "../position_args.h"
#include "mad_cpu_common.h"
#include "position_distances.h"

namespace vitmad {
namespace {

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
