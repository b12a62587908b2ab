// The `stats` argument of the statistics ops (stats, stats_pos, stats_qk, stats_qk_pos): which statistics a call
// computes and where each goes in the [S, ...] output. Checked once, here, for every backend; the Python mirror
// is python/vitmad/ops/arguments.py (check_stats), message for message.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "mad_args.h"
#include "position_args.h"

namespace vitmad {

// The statistics, in the order of kStatNames.
// "temporal_mad" is the MAD over the tokens' frames (`times`, video): only the position form of stats_qk takes
// times, so the other ops refuse it (the Python entry points compose it there from a second distance call).
enum class Stat : int { kMad = 0, kEntropy = 1, kPrefixMass = 2, kSelfMass = 3, kTemporalMad = 4 };
constexpr int kNumStats = 5;
inline constexpr std::array<const char*, kNumStats> kStatNames{"mad", "entropy", "prefix_mass", "self_mass",
                                                               "temporal_mad"};

// Which statistics a call wants and the output row of each (-1: not wanted).
struct StatsRequest {
  std::array<int64_t, kNumStats> row{-1, -1, -1, -1, -1};
  int64_t count = 0;  // S, the output's first dimension

  bool wants(Stat s) const { return row[static_cast<int>(s)] >= 0; }
  int64_t row_of(Stat s) const { return row[static_cast<int>(s)]; }
};

// `stats` must name at least one statistic of kStatNames, each at most once; "self_mass" needs the queries and
// the keys to be the same tokens, Nq == Nk (always so in the grid form); "temporal_mad" needs `times` (has_times),
// and `times` needs "temporal_mad". Errors are ValueErrors naming op_name.
StatsRequest check_stats(c10::ArrayRef<std::string> stats, int64_t num_queries, int64_t num_keys, bool has_times,
                         const char* op_name);

// The output [S, ...] for per-op output shape `shape` in `options`, and its [S, num_matrices, num_queries]
// per-query view (a separate buffer for "mean", the output itself for "none").
struct StatsOutputs {
  at::Tensor per_query;  // [S, num_matrices, num_queries]
  at::Tensor out;        // [S, ...shape]
};
StatsOutputs empty_stats_outputs(const at::Tensor& tokens, const StatsRequest& request, int64_t num_matrices,
                                 int64_t num_queries, bool reduce_mean);

// Every argument of stats_qk_pos checked, in the order both backends share (q and k, the positions, key_times
// without times, the names, then the frames; values only with check_values): what the kernels need.
struct StatsQkPosArgs {
  QkShape shape;
  PositionArgs positions;
  StatsRequest request;
  std::optional<PositionArgs> times;  // the frames as one-coordinate positions, with times
};
StatsQkPosArgs check_stats_qk_pos_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                       const std::optional<at::Tensor>& key_positions,
                                       c10::ArrayRef<std::string> stats, std::optional<double> scale,
                                       const std::optional<at::Tensor>& attn_bias, bool renormalize,
                                       std::string_view reduction, const std::optional<at::Tensor>& times,
                                       const std::optional<at::Tensor>& key_times, bool check_values,
                                       const char* op_name);

}  // namespace vitmad
