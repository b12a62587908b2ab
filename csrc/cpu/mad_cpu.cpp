// CPU kernels of vitmad::mad and vitmad::mad_backward.
//
// The (N-P) x (N-P) distance matrix is never built. A query patch in grid column c sees the keys of one grid
// row at distances that form a contiguous slice of a small table (one row of 2*gw-1 values per row offset),
// so the inner loop is a dot product of the attention row with that slice: read once, vectorised, in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "../mad_args.h"
#include "grid_distances.h"
#include "mad_cpu_common.h"

namespace vitmad {
namespace {

// m_t of the patch queries [t_begin, t_end) of kRows matrices with contiguous rows in the accumulation type,
// reading the rows of one query together (shared_distance_sums).
template <int kRows, typename acc_t>
__attribute__((always_inline)) inline void shared_distance_rows(const acc_t* const* matrices, int64_t query_stride,
                                                                const MadLayout& l,
                                                                const ColumnDistances<acc_t>& distances,
                                                                acc_t* buffer, int64_t t_begin, int64_t t_end,
                                                                acc_t* const* out) {
  QueryWalk query(t_begin, l.grid_w);
  for (int64_t t = t_begin; t < t_end; ++t, query.next()) {
    const acc_t* rows[kRows];
    for (int g = 0; g < kRows; ++g) rows[g] = matrices[g] + (l.num_prefix + t) * query_stride + l.num_prefix;
    const acc_t* dist = distances.row(l, query, buffer);
    acc_t weighted[kRows], mass[kRows];
    if (l.renormalize) {
      shared_distance_sums<kRows, acc_t, true>(rows, dist, l.num_patches, weighted, mass);
      for (int g = 0; g < kRows; ++g) out[g][t] = weighted[g] / mass[g];
    } else {
      shared_distance_sums<kRows, acc_t, false>(rows, dist, l.num_patches, weighted, mass);
      for (int g = 0; g < kRows; ++g) out[g][t] = weighted[g];
    }
  }
}

// m_t of the patch queries [t_begin, t_end) of `count` matrices (at most kMatricesPerGroup), out[i] receiving
// matrix i's values, reading each attention row along the keys.
template <typename scalar_t, typename acc_t>
VITMAD_CPU_CLONES void mad_rows(const scalar_t* const* matrices, int64_t count, int64_t query_stride,
                                int64_t key_stride, const MadLayout& l, const ColumnDistances<acc_t>& distances,
                                acc_t* buffer, int64_t t_begin, int64_t t_end, acc_t* const* out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (key_stride == 1) {
      switch (count) {
        case 4: return shared_distance_rows<4>(matrices, query_stride, l, distances, buffer, t_begin, t_end, out);
        case 3: return shared_distance_rows<3>(matrices, query_stride, l, distances, buffer, t_begin, t_end, out);
        case 2: return shared_distance_rows<2>(matrices, query_stride, l, distances, buffer, t_begin, t_end, out);
        default: return shared_distance_rows<1>(matrices, query_stride, l, distances, buffer, t_begin, t_end, out);
      }
    }
  }
  for (int64_t i = 0; i < count; ++i) {
    QueryWalk query(t_begin, l.grid_w);
    for (int64_t t = t_begin; t < t_end; ++t, query.next()) {
      const scalar_t* keys = matrices[i] + (l.num_prefix + t) * query_stride + l.num_prefix * key_stride;
      const acc_t* dist = distances.row(l, query, buffer);
      acc_t weighted, mass;
      if (l.renormalize) {
        weighted_sums<scalar_t, acc_t, true>(keys, key_stride, dist, l.num_patches, weighted, mass);
        out[i][t] = weighted / mass;
      } else {
        weighted_sums<scalar_t, acc_t, false>(keys, key_stride, dist, l.num_patches, weighted, mass);
        out[i][t] = weighted;
      }
    }
  }
}

// The same for a matrix whose query axis is contiguous (a transposed view): walk the keys and update the
// accumulators of a block of queries, so memory is still read in order.
template <typename scalar_t, typename acc_t>
VITMAD_CPU_CLONES void mad_columns(const scalar_t* matrix, int64_t key_stride, const MadLayout& l, const acc_t* table,
                                   int64_t t_begin, int64_t t_end, acc_t* out) {
  acc_t weighted[kQueriesPerColumnTask] = {};
  acc_t mass[kQueriesPerColumnTask] = {};
  acc_t dist[kQueriesPerColumnTask];
  const int64_t count = t_end - t_begin;
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
  }
  for (int64_t i = 0; i < count; ++i) out[t_begin + i] = l.renormalize ? weighted[i] / mass[i] : weighted[i];
}

template <typename scalar_t, typename acc_t>
void mad_cpu_typed(const at::Tensor& attn, const MadLayout& l, acc_t patch, acc_t* per_query) {
  const int64_t query_stride = attn.stride(-2);
  const int64_t key_stride = attn.stride(-1);
  const scalar_t* data = attn.const_data_ptr<scalar_t>();
  const MatrixOffsets matrix_offset = matrix_offsets(attn, "vitmad.mad");

  if (key_stride != 1 && query_stride == 1) {
    const auto distances = column_distances<acc_t>(l, patch);
    const int64_t blocks = (l.num_patches + kQueriesPerColumnTask - 1) / kQueriesPerColumnTask;
    at::parallel_for(0, l.num_matrices * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks;
        const int64_t t_begin = (task % blocks) * kQueriesPerColumnTask;
        const int64_t t_end = std::min(t_begin + kQueriesPerColumnTask, l.num_patches);
        mad_columns<scalar_t, acc_t>(data + matrix_offset(b), key_stride, l, distances->table(), t_begin, t_end,
                                     per_query + b * l.num_patches);
      }
    });
    return;
  }
  const int64_t group = std::is_same_v<scalar_t, acc_t> && key_stride == 1
                            ? (l.renormalize ? kMatricesPerGroupWithMass : kMatricesPerGroup)
                            : 1;
  for_each_query_run<acc_t>(l, patch, group, [&](int64_t b, int64_t count, int64_t t_begin, int64_t t_end,
                                                 const ColumnDistances<acc_t>& distances, acc_t* buffer) {
    const scalar_t* matrices[kMatricesPerGroup];
    acc_t* out[kMatricesPerGroup];
    for (int64_t i = 0; i < count; ++i) {
      matrices[i] = data + matrix_offset(b + i);
      out[i] = per_query + (b + i) * l.num_patches;
    }
    mad_rows<scalar_t, acc_t>(matrices, count, query_stride, key_stride, l, distances, buffer, t_begin, t_end, out);
  });
}

at::Tensor mad_cpu(const at::Tensor& attn, int64_t patch, int64_t num_prefix_tokens, at::OptionalIntArrayRef grid,
                   bool renormalize, c10::string_view reduction) {
  const MadLayout l = check_mad_args(attn, patch, num_prefix_tokens, grid, renormalize, reduction, "vitmad.mad");
  // Only the output is a tensor: with "mean", the per-query values live in a plain buffer (an ATen allocation
  // is a good part of a small call's cost).
  at::Tensor out = at::empty(mad_output_shape(attn, l.reduce_mean, l.num_patches),
                             attn.options().dtype(mad_output_dtype(attn.scalar_type())));
  if (l.num_matrices == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "vitmad_mad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::unique_ptr<acc_t[]> buffer;
    if (l.reduce_mean) buffer.reset(new acc_t[l.num_matrices * l.num_patches]);
    acc_t* rows = l.reduce_mean ? buffer.get() : out.mutable_data_ptr<acc_t>();
    mad_cpu_typed<scalar_t, acc_t>(attn, l, static_cast<acc_t>(patch), rows);
    if (l.reduce_mean)
      mean_over_queries<acc_t>(rows, l.num_matrices, l.num_patches, AllQueries{}, out.mutable_data_ptr<acc_t>());
  });
  return out;
}

// grad_attn[..., P+t, P+s] = g_t * d(t, s), or g_t * (d(t, s) - m_t) / Z_t with renormalisation, where
// g_t is the gradient reaching query t (grad / (N-P) for "mean") and Z_t the query's mass on patch keys;
// zero on prefix rows and columns.
template <typename scalar_t, typename acc_t>
VITMAD_CPU_CLONES void mad_backward_rows(const scalar_t* matrix, int64_t query_stride, int64_t key_stride,
                                         const MadLayout& l, const ColumnDistances<acc_t>& distances, acc_t* buffer,
                                         const acc_t* grad_per_query, int64_t t_begin, int64_t t_end,
                                         scalar_t* grad_matrix) {
  QueryWalk query(t_begin, l.grid_w);
  for (int64_t t = t_begin; t < t_end; ++t, query.next()) {
    const acc_t* dist = distances.row(l, query, buffer);
    acc_t scale = grad_per_query[t];
    acc_t shift = 0;
    if (l.renormalize) {
      const scalar_t* keys = matrix + (l.num_prefix + t) * query_stride + l.num_prefix * key_stride;
      acc_t weighted, mass;
      weighted_sums<scalar_t, acc_t, true>(keys, key_stride, dist, l.num_patches, weighted, mass);
      scale /= mass;
      shift = weighted / mass;
    }
    scalar_t* out = grad_matrix + (l.num_prefix + t) * l.num_tokens + l.num_prefix;
#pragma omp simd
    for (int64_t s = 0; s < l.num_patches; ++s) out[s] = static_cast<scalar_t>(scale * (dist[s] - shift));
  }
}

at::Tensor mad_backward_cpu(const at::Tensor& grad, const at::Tensor& attn, int64_t patch, int64_t num_prefix_tokens,
                            at::OptionalIntArrayRef grid, bool renormalize, c10::string_view reduction) {
  const MadLayout l =
      check_mad_args(attn, patch, num_prefix_tokens, grid, renormalize, reduction, "vitmad.mad_backward");
  const at::Tensor g = check_mad_grad(grad, attn, l.reduce_mean, l.num_patches);
  at::Tensor grad_attn = at::zeros(attn.sizes(), attn.options().memory_format(at::MemoryFormat::Contiguous));
  if (l.num_matrices == 0) return grad_attn;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "vitmad_mad_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // One gradient value per query: "mean" spreads grad[b] evenly over the N - P queries.
    const at::Tensor g_flat = g.reshape({l.num_matrices, l.reduce_mean ? 1 : l.num_patches});
    const at::Tensor per_query =
        l.reduce_mean
            ? (g_flat / static_cast<double>(l.num_patches)).expand({l.num_matrices, l.num_patches}).contiguous()
            : g_flat;
    const acc_t* g_data = per_query.const_data_ptr<acc_t>();
    const scalar_t* a_data = attn.const_data_ptr<scalar_t>();
    scalar_t* out_data = grad_attn.mutable_data_ptr<scalar_t>();
    const MatrixOffsets matrix_offset = matrix_offsets(attn, "vitmad.mad_backward");
    for_each_query_run<acc_t>(l, static_cast<acc_t>(patch), 1, [&](int64_t b, int64_t /*count*/, int64_t t_begin,
                                                                    int64_t t_end,
                                                                    const ColumnDistances<acc_t>& distances,
                                                                    acc_t* buffer) {
      mad_backward_rows<scalar_t, acc_t>(a_data + matrix_offset(b), attn.stride(-2), attn.stride(-1), l, distances,
                                         buffer, g_data + b * l.num_patches, t_begin, t_end,
                                         out_data + b * l.num_tokens * l.num_tokens);
    });
  });
  return grad_attn;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitmad, CPU, m) {
  m.impl("mad", &mad_cpu);
  m.impl("mad_backward", &mad_backward_cpu);
}

}  // namespace vitmad
