#include "stats_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "mad_args.h"

namespace vitmad {

StatsRequest check_stats(c10::ArrayRef<std::string> stats, int64_t num_queries, int64_t num_keys, bool has_times,
                         const char* op_name) {
  TORCH_CHECK_VALUE(!stats.empty(), op_name,
                    ": stats must name at least one of 'mad', 'entropy', 'prefix_mass', 'self_mass', 'temporal_mad', "
                    "got none");
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
                    ": the statistic 'temporal_mad' needs times, the frame of each token ([..., Nq, 1]), which only "
                    "the position form takes");
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

}  // namespace vitmad
