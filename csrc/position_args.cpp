#include "position_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <iomanip>
#include <limits>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>

#include "dtype_name.h"
#include "mad_args.h"

namespace vitmad {
namespace {

at::IntArrayRef leading_dims(const at::Tensor& t) { return t.sizes().slice(0, t.dim() - 2); }

// One side's tensor against the attention: `tokens` (named `tokens_arg`) has `n` of the side's tokens (`what`:
// "queries" or "keys") and the leading dims `lead`.
void check_side(const at::Tensor& pos, const char* arg, at::IntArrayRef lead, const at::Tensor& tokens,
                const char* tokens_arg, int64_t n, const char* what, const char* n_name, const char* op_name) {
  TORCH_CHECK_VALUE(pos.layout() == at::kStrided, op_name, ": ", arg, " must be a dense (strided) tensor, got layout ",
                    pos.layout());
  TORCH_CHECK_TYPE(at::isFloatingType(pos.scalar_type()), op_name, ": ", arg,
                   " must be a floating-point tensor (NaN marks a token without a position), got ",
                   dtype_name(pos.scalar_type()));
  TORCH_CHECK_VALUE(pos.dim() >= 2 && pos.size(-1) >= 1 && pos.size(-1) <= kMaxPositionDims, op_name, ": ", arg,
                    " must be [..., ", n_name, ", K] with K in {1, 2, 3}, got shape ", pos.sizes());
  TORCH_CHECK_VALUE(pos.size(-2) == n, op_name, ": ", arg, " has ", n_name, " = ", pos.size(-2), " rows but ",
                    tokens_arg, " has ", n, " ", what, " (shape ", tokens.sizes(), ")");
  TORCH_CHECK_VALUE(pos.device() == tokens.device(), op_name, ": ", arg, " must be on ", tokens_arg, "'s device ",
                    tokens.device(), ", got ", pos.device());
  const at::IntArrayRef pos_lead = leading_dims(pos);
  bool broadcasts = pos_lead.size() <= lead.size();
  for (size_t i = 1; broadcasts && i <= pos_lead.size(); ++i) {
    const int64_t size = pos_lead[pos_lead.size() - i];
    broadcasts = size == 1 || size == lead[lead.size() - i];
  }
  TORCH_CHECK_VALUE(broadcasts, op_name, ": ", arg, " leading dims ", pos_lead, " do not broadcast against ",
                    tokens_arg, "'s ", lead, " (right-aligned, each 1 or equal, at most as many)");
}

// " of positions[i, j]" for the matrix that holds flat row `row` of `pos`, or "" without leading dims.
std::string matrix_of_row(const at::Tensor& pos, int64_t row, const char* arg) {
  if (pos.dim() == 2) return "";
  std::vector<int64_t> index(pos.dim() - 2);
  int64_t rest = row / pos.size(-2);
  for (int64_t d = pos.dim() - 3; d >= 0; --d) {
    index[d] = rest % pos.size(d);
    rest /= pos.size(d);
  }
  std::ostringstream out;
  out << " of " << arg << at::IntArrayRef(index);
  return out.str();
}

// The largest coordinate magnitude whose distances square and sum in `dtype` (the accumulation dtype) without
// overflow: two tokens at most 2 * limit apart on each of k axes (beyond it the MAD was inf silently, QA 329).
// Mirrors position_limit in python/vitmad/ops/arguments.py.
double position_limit(at::ScalarType dtype, int64_t k) {
  const double max = dtype == at::kDouble ? std::numeric_limits<double>::max()
                                          : static_cast<double>(std::numeric_limits<float>::max());
  return std::sqrt(max / static_cast<double>(std::max<int64_t>(k, 1))) / 2;
}

// Every row all NaN (no position) or all finite, within position_limit. On a host copy in double: positions are
// small. `pos` is in the accumulation dtype, whose bound is checked.
void check_position_values(const at::Tensor& pos, const char* arg, const char* op_name) {
  const at::Tensor host = pos.to(at::kCPU, at::kDouble).contiguous();
  const double* v = host.const_data_ptr<double>();
  const int64_t k = host.size(-1);
  const int64_t n = host.size(-2);
  const int64_t rows = k == 0 ? 0 : host.numel() / k;
  const bool wide = pos.scalar_type() == at::kDouble;
  const double limit = position_limit(pos.scalar_type(), k);
  const char* dtype = wide ? "float64" : "float32";
  std::ostringstream bound;  // as Python's f"{limit:.2g}"
  bound << std::setprecision(2) << limit;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t nan = 0;
    for (int64_t c = 0; c < k; ++c) {
      const double x = v[r * k + c];
      TORCH_CHECK_VALUE(!std::isinf(x), op_name, ": ", arg,
                        " must not be infinite (NaN marks a token without a position), got ", x, " at row ", r % n,
                        matrix_of_row(host, r, arg),
                        wide ? "" : " (or a finite value beyond float32's range, the accumulation dtype it is "
                                    "converted to)");
      TORCH_CHECK_VALUE(!(std::abs(x) > limit), op_name, ": ", arg,  " must lie within +-", bound.str(),
                        " (distances are squared in ", dtype, ", the accumulation dtype, which holds no larger "
                        "square), got ", x, " at row ", r % n, matrix_of_row(host, r, arg),
                        "; measure in a larger unit", wide ? "" : ", or give float64 attention");
      nan += std::isnan(x) ? 1 : 0;
    }
    TORCH_CHECK_VALUE(nan == 0 || nan == k, op_name, ": ", arg, " row ", r % n, matrix_of_row(host, r, arg), " has ",
                      nan, " of its ", k, " coordinates NaN; a token without a position has all of them NaN");
  }
}

// Positions whose values were checked where they were built (vitmad.record's layouts: python/vitmad/recording/
// placement.py, read_only), registered through vitmad::_trust_positions for each device copy: their check here is
// skipped, since on a GPU its host copy waits for all the work queued before it, once per recorded layer. An
// entry is the tensor itself, held weakly (its TensorImpl cannot be reused while the entry lives, and a dead
// tensor leaves the list), with its version where it has one, so an in-place change makes it unknown again.
// The same registry, with a partner per entry, holds the pairs (times, positions) of a video layout whose tokens
// without a time and without a position were compared on the host (vitmad::_trust_same_tokens): check_same_tokens
// is skipped for that very pair.
class TrustRegistry {
 public:
  void add(const at::Tensor& tensor, const at::Tensor* partner = nullptr) {
    std::lock_guard<std::mutex> lock(mutex_);
    prune();
    if (entries_.size() == kCapacity) entries_.pop_front();
    Entry entry{WeakImpl(tensor.getIntrusivePtr()), version_of(tensor), std::nullopt, -1};
    if (partner != nullptr) {
      entry.partner.emplace(partner->getIntrusivePtr());
      entry.partner_version = version_of(*partner);
    }
    entries_.push_back(std::move(entry));
  }

  bool contains(const at::Tensor& tensor, const at::Tensor* partner = nullptr) {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::any_of(entries_.begin(), entries_.end(), [&](const Entry& e) {
      if (!holds(e.tensor, e.version, tensor)) return false;
      return partner == nullptr || (e.partner.has_value() && holds(*e.partner, e.partner_version, *partner));
    });
  }

 private:
  // A recording holds a few layouts' positions (one per grid, window partition or video layout) on a device or
  // two: far fewer than this.
  static constexpr size_t kCapacity = 64;
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    WeakImpl tensor;  // its target's address stays the tensor's while the entry lives
    int64_t version;  // -1 for an inference tensor, which has no version counter
    std::optional<WeakImpl> partner;  // the pairs' registry only
    int64_t partner_version;
  };

  static int64_t version_of(const at::Tensor& t) { return t.is_inference() ? -1 : static_cast<int64_t>(t._version()); }

  static bool holds(const WeakImpl& weak, int64_t version, const at::Tensor& t) {
    return weak._unsafe_get_target() == t.unsafeGetTensorImpl() && !weak.expired() && version == version_of(t);
  }

  void prune() {
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                  [](const Entry& e) {
                                    return e.tensor.expired() || (e.partner.has_value() && e.partner->expired());
                                  }),
                   entries_.end());
  }

  std::mutex mutex_;
  std::deque<Entry> entries_;
};

// Never destroyed: no destructor runs at interpreter exit.
TrustRegistry& trusted_positions() {
  static auto* registry = new TrustRegistry();
  return *registry;
}

TrustRegistry& same_token_pairs() {
  static auto* registry = new TrustRegistry();
  return *registry;
}

void trust_positions_op(const at::Tensor& positions) {
  TORCH_CHECK_VALUE(positions.layout() == at::kStrided && at::isFloatingType(positions.scalar_type()),
                    "vitmad::_trust_positions: expected a dense floating-point tensor, got ", positions.toString());
  trusted_positions().add(positions);
}

void trust_same_tokens_op(const at::Tensor& times, const at::Tensor& positions) {
  for (const at::Tensor* t : {&times, &positions})
    TORCH_CHECK_VALUE(t->layout() == at::kStrided && at::isFloatingType(t->scalar_type()),
                      "vitmad::_trust_same_tokens: expected dense floating-point tensors, got ", t->toString());
  same_token_pairs().add(times, &positions);
}

// The kernels' view of one side: broadcast (stride-0) leading dims reduced to size 1 first, so a dtype
// conversion copies only the user's own values.
TokenPositions prepare_side(const at::Tensor& pos, at::IntArrayRef lead, at::ScalarType acc_dtype, bool check_values,
                            const char* arg, const char* op_name) {
  at::Tensor compact = pos;
  for (int64_t d = 0; d < pos.dim() - 2; ++d)
    if (compact.stride(d) == 0 && compact.size(d) > 1) compact = compact.narrow(d, 0, 1);
  const at::Tensor values = compact.scalar_type() == acc_dtype ? compact : compact.to(acc_dtype);
  // After the conversion: a float64 value beyond float32's range becomes inf there.
  if (check_values && !trusted_positions().contains(values)) check_position_values(values, arg, op_name);
  std::vector<int64_t> shape(lead.begin(), lead.end());
  shape.push_back(pos.size(-2));
  shape.push_back(pos.size(-1));
  const at::Tensor view = values.expand(shape);
  return TokenPositions{values, matrix_offsets(view, op_name, arg), view.stride(-2), view.stride(-1)};
}

// A side's times are NaN exactly where its positions are, compared over the attention's leading dims.
void check_same_tokens(const at::Tensor& times, const at::Tensor& pos, at::IntArrayRef lead, const char* times_arg,
                       const char* pos_arg, const char* op_name) {
  if (same_token_pairs().contains(times, &pos)) return;
  std::vector<int64_t> shape(lead.begin(), lead.end());
  shape.push_back(pos.size(-2));
  const at::Tensor no_time = at::isnan(times.select(-1, 0).to(at::kCPU)).expand(shape).reshape({-1});
  const at::Tensor no_position = at::isnan(pos.select(-1, 0).to(at::kCPU)).expand(shape).reshape({-1});
  const at::Tensor differ = at::ne(no_time, no_position).nonzero();
  if (differ.numel() == 0) return;
  const int64_t row = differ[0][0].item<int64_t>();
  const int64_t n = pos.size(-2);
  TORCH_CHECK_VALUE(false, op_name, ": ", times_arg, " must be NaN exactly at the tokens without a position in ",
                    pos_arg, ", but token ", row % n, " of matrix ", row / n, " has ",
                    no_position[row].item<bool>() ? "a time and no position" : "a position and no time (NaN)");
}

}  // namespace

PositionArgs check_time_args(const at::Tensor& tokens, const PositionArgs& positions_args,
                             const at::Tensor& positions, const std::optional<at::Tensor>& key_positions,
                             const at::Tensor& times, const std::optional<at::Tensor>& key_times,
                             at::ScalarType acc_dtype, bool check_values, const char* op_name) {
  const PositionLayout& l = positions_args.layout;
  const bool qk = std::string_view(op_name).ends_with("_qk");
  const char* tokens_arg = qk ? "q" : "attn";
  const at::IntArrayRef lead = leading_dims(tokens);
  // The frame's column first: check_side's message ("K in {1, 2, 3}") would ask times [N] for K = 2 (QA 301).
  TORCH_CHECK_VALUE(times.dim() >= 2 && times.size(-1) == 1, op_name,
                    ": times must be [..., Nq, 1], the frame of each token, got shape ", times.sizes());
  check_side(times, "times", lead, tokens, tokens_arg, l.num_queries, "queries", "Nq", op_name);
  TORCH_CHECK_VALUE(key_times.has_value() == key_positions.has_value(), op_name,
                    key_positions.has_value()
                        ? ": key_positions is given, so the keys' frames are needed too: pass key_times [..., Nk, 1]"
                        : ": key_times is given without key_positions; the keys are the queries, whose times are "
                          "times");
  if (key_times.has_value()) {
    TORCH_CHECK_VALUE(key_times->dim() >= 2 && key_times->size(-1) == 1, op_name,
                      ": key_times must be [..., Nk, 1], the frame of each key, got shape ", key_times->sizes());
    check_side(*key_times, "key_times", lead, tokens, qk ? "k" : "attn", l.num_keys, "keys", "Nk", op_name);
  }
  const TokenPositions queries = prepare_side(times, lead, acc_dtype, check_values, "times", op_name);
  const TokenPositions keys =
      key_times.has_value() ? prepare_side(*key_times, lead, acc_dtype, check_values, "key_times", op_name) : queries;
  if (check_values) {
    check_same_tokens(times, positions, lead, "times", "positions", op_name);
    if (key_times.has_value())
      check_same_tokens(*key_times, *key_positions, lead, "key_times", "key_positions", op_name);
  }
  PositionLayout layout = l;
  layout.dims = 1;
  return PositionArgs{layout, queries, keys};
}

PositionArgs check_position_args(const at::Tensor& tokens, int64_t num_queries, int64_t num_keys,
                                 const at::Tensor& positions, const std::optional<at::Tensor>& key_positions,
                                 bool renormalize, std::string_view reduction, at::ScalarType acc_dtype,
                                 bool check_values, const char* op_name) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "none", op_name, ": reduction must be 'mean' or 'none', got '",
                    reduction, "'");
  // The ops from queries and keys (vitmad.mad_qk, vitmad.attention_stats_qk) name q and k in messages.
  const bool qk = std::string_view(op_name).ends_with("_qk");
  const char* tokens_arg = qk ? "q" : "attn";
  const at::IntArrayRef lead = leading_dims(tokens);
  check_side(positions, "positions", lead, tokens, tokens_arg, num_queries, "queries", "Nq", op_name);
  if (key_positions.has_value()) {
    check_side(*key_positions, "key_positions", lead, tokens, qk ? "k" : "attn", num_keys, "keys", "Nk", op_name);
    TORCH_CHECK_VALUE(
        key_positions->size(-1) == positions.size(-1), op_name,
        ": key_positions must have as many coordinates K per token as positions (K = ", positions.size(-1),
        "), got shape ", key_positions->sizes(), " and positions of shape ", positions.sizes());
  } else {
    TORCH_CHECK_VALUE(num_keys == num_queries, op_name, ": ", qk ? "the attention" : "attn", " is rectangular [..., ",
                      num_queries, ", ", num_keys, "]", qk ? " (q and k have different token counts)" : "",
                      "; pass key_positions [..., ", num_keys, ", K] for its keys");
  }
  int64_t num_matrices = 1;
  for (const int64_t size : lead) num_matrices *= size;
  const PositionLayout layout{num_queries,  num_keys,    positions.size(-1),
                              num_matrices, renormalize, reduction == "mean"};
  const TokenPositions queries = prepare_side(positions, lead, acc_dtype, check_values, "positions", op_name);
  const TokenPositions keys =
      key_positions.has_value() ? prepare_side(*key_positions, lead, acc_dtype, check_values, "key_positions", op_name)
                                : queries;
  return PositionArgs{layout, queries, keys};
}

at::Tensor per_query_grad(const at::Tensor& grad, const at::Tensor& attn, const PositionArgs& args) {
  const PositionLayout& l = args.layout;
  const at::Tensor g = check_mad_grad(grad, attn, l.reduce_mean, l.num_queries);
  const std::vector<int64_t> lead(attn.sizes().begin(), attn.sizes().end() - 2);
  std::vector<int64_t> per_query_shape = lead;
  per_query_shape.push_back(l.num_queries);
  if (!l.reduce_mean) return g.contiguous().view({l.num_matrices, l.num_queries});
  // Queries with a position per matrix of positions; the division broadcasts them against attn's leading dims.
  const at::Tensor counts = args.queries.values.select(-1, 0).isnan().logical_not().sum(-1).to(g.scalar_type());
  return (g / counts).unsqueeze(-1).expand(per_query_shape).contiguous().view({l.num_matrices, l.num_queries});
}

}  // namespace vitmad

TORCH_LIBRARY_FRAGMENT(vitmad, m) {
  m.def("_trust_positions(Tensor positions) -> ()");
  m.def("_trust_same_tokens(Tensor times, Tensor positions) -> ()");
}

TORCH_LIBRARY_IMPL(vitmad, CompositeExplicitAutograd, m) {
  m.impl("_trust_positions", &vitmad::trust_positions_op);
  m.impl("_trust_same_tokens", &vitmad::trust_same_tokens_op);
}
