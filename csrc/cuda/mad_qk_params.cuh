// What the kernels of vitmad::mad_qk and vitmad::mad_qk_pos get from the host (mad_qk_cuda.cu fills it), shared by
// the portable tile kernel there and the sm_80+ tensor-core kernel in mad_qk_sm80.cu.
#pragma once

#include <cstdint>

#include "../mad_geometry.h"

namespace vitmad {

constexpr double kLog2e = 1.4426950408889634;

// Queries are the num_queries tokens of q from first_query on (the patches in the grid form, all of q in the
// position form); keys are all num_keys tokens of k.
template <typename acc_t>
struct QkParams {
  const void* q;
  const void* k;
  const void* bias;                         // null without attn_bias; else its [..., Nq, Nk] broadcast view
  acc_t* per_query;                         // [num_matrices, num_queries]
  MatrixOffsets q_lead, k_lead, bias_lead;  // where each [N, X] matrix of q, k and the bias view starts
  int64_t q_stride_n, q_stride_d, k_stride_n, k_stride_d, bias_stride_q, bias_stride_k;
  int64_t num_matrices;
  int q_tokens, num_keys, first_query, num_queries, head_dim, head_dim_padded;
  double logit_scale;  // scale * log2(e): the logits are kept in log2 units, for exp2
  bool renormalize;
  // The grid form: P prefix keys without a position (first_query == P), then patches on a grid grid_w wide,
  // `patch` pixels apart.
  int grid_w;
  double patch;
  // The position form (kPositions): where each query and key is.
  PositionRows<acc_t> query_positions, key_positions;
  // The statistics (vitmad::stats_qk, stats_qk_pos; the portable kernel's kStats instantiation only): where each
  // statistic of query t of matrix b goes, stat_rows[s][b * num_queries + t] (nullptr: not asked for), indexed like
  // kStatNames in stats_args.h (mad, entropy, prefix_mass, self_mass, temporal_mad).
  acc_t* stat_rows[5];
  bool wants_entropy;
  // With temporal_mad (position form, video): each token's frame, NaN exactly where it has no position.
  bool has_times;
  PositionRows<acc_t> query_times, key_times;
};

// Launches the sm_80+ kernel for 16-bit q and k (c10::Half or c10::BFloat16; bias_t is bool or scalar_t) and
// returns true, or returns false without launching when the device or this build's code for it predates sm_80
// (the caller then runs the portable kernel).
template <typename scalar_t, typename bias_t, bool kPositions>
bool launch_mad_qk_sm80(const QkParams<float>& p, int device);

}  // namespace vitmad
