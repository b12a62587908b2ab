#include "stats_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <utility>

#include "mad_args.h"

namespace vitmad {

StatsRequest check_stats(c10::ArrayRef<std::string> stats, int64_t num_queries, int64_t num_keys, bool has_times,
                         const char* op_name) {
  TORCH_CHECK_VALUE(!stats.empty(), op_name,
                    ": stats must name at least one of 'mad', 'entropy', 'prefix_mass', 'self_mass', 'temporal_mad', "
                    "got none");
  // The dispatcher takes one string for a str[] as its characters: stats='mad' given to the raw op arrives as
  // ['m', 'a', 'd'], and the first letter was named as the unknown statistic (QA 360).
  bool letters = stats.size() > 1;
  std::string joined;
  for (const std::string& name : stats) {
    letters = letters && name.size() == 1;
    joined += name;
  }
  TORCH_CHECK_TYPE(!letters, op_name,
                   ": stats must be a sequence of names such as ('mad', 'entropy'), got the string '", joined, "'");
  StatsRequest request;
  for (const std::string& name : stats) {
    int found = -1;
    for (int i = 0; i < kNumStats; ++i)
      if (name == kStatNames[i]) found = i;
    TORCH_CHECK_VALUE(found >= 0, op_name,
                      ": stats must be among 'mad', 'entropy', 'prefix_mass', 'self_mass', 'temporal_mad', got '", name,
                      "'");
    TORCH_CHECK_VALUE(request.row[found] < 0, op_name, ": stats names '", name, "' twice");
    request.row[found] = request.count++;
  }
  TORCH_CHECK_VALUE(!request.wants(Stat::kSelfMass) || num_queries == num_keys, op_name,
                    ": the statistic 'self_mass' needs the queries and the keys to be the same tokens (Nq == Nk), "
                    "got Nq = ", num_queries, " queries and Nk = ", num_keys, " keys");
  TORCH_CHECK_VALUE(!request.wants(Stat::kTemporalMad) || has_times, op_name,
                    ": the statistic 'temporal_mad' needs times, the frame of each token ([..., Nq, 1]), given beside "
                    "positions (the position form: not with patch / grid)");
  TORCH_CHECK_VALUE(request.wants(Stat::kTemporalMad) || !has_times, op_name,
                    ": times is read only by the statistic 'temporal_mad', which stats does not name; add it or "
                    "leave times out");
  return request;
}

StatsOutputs empty_stats_outputs(const at::Tensor& tokens, const StatsRequest& request, int64_t num_matrices,
                                 int64_t num_queries, bool reduce_mean) {
  const auto options = tokens.options().dtype(mad_output_dtype(tokens.scalar_type()));
  std::vector<int64_t> shape{request.count};
  const auto op_shape = mad_output_shape(tokens, reduce_mean, num_queries);
  shape.insert(shape.end(), op_shape.begin(), op_shape.end());
  at::Tensor per_query = at::empty({request.count, num_matrices, num_queries}, options);
  return StatsOutputs{per_query, reduce_mean ? at::empty(shape, options) : per_query.view(shape)};
}

StatsQkPosArgs check_stats_qk_pos_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                       const std::optional<at::Tensor>& key_positions,
                                       c10::ArrayRef<std::string> stats, std::optional<double> scale,
                                       const std::optional<at::Tensor>& attn_bias, bool renormalize,
                                       std::string_view reduction, const std::optional<at::Tensor>& times,
                                       const std::optional<at::Tensor>& key_times, bool check_values,
                                       const char* op_name) {
  const QkShape shape = check_qk_tensors(q, k, scale, attn_bias, /*same_tokens=*/false, op_name);
  const auto acc_dtype = mad_output_dtype(q.scalar_type());
  PositionArgs args = check_position_args(q, shape.num_queries, shape.num_keys, positions, key_positions,
                                          renormalize, reduction, acc_dtype, check_values, op_name);
  TORCH_CHECK_VALUE(times.has_value() || !key_times.has_value(), op_name,
                    ": key_times is given without times; pass times [..., Nq, 1] for the queries' frames");
  const StatsRequest request =
      check_stats(stats, args.layout.num_queries, args.layout.num_keys, times.has_value(), op_name);
  std::optional<PositionArgs> time_args;
  if (times.has_value())
    time_args = check_time_args(q, args, positions, key_positions, *times, key_times, acc_dtype, check_values,
                                op_name);
  return StatsQkPosArgs{shape, std::move(args), request, std::move(time_args)};
}

}  // namespace vitmad
