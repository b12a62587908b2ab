// Autograd of vitmad::mad (the grid form) in C++, for every device: the gradient with respect to attn is the op
// vitmad::mad_backward. The same formula is registered from Python (python/vitmad/ops/mad_op.py) when this library
// is not loaded; here it costs about a microsecond per call instead of the nine that the Python autograd kernel
// adds to a call that needs no gradient (a single ViT-B/16 image's attention is read in about forty).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

namespace vitmad {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_mad(const at::Tensor& attn, int64_t patch, int64_t num_prefix_tokens, at::OptionalIntArrayRef grid,
                    bool renormalize, c10::string_view reduction) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vitmad::mad", "")
                             .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, at::OptionalIntArrayRef, bool,
                                               c10::string_view)>();
  return op.call(attn, patch, num_prefix_tokens, grid, renormalize, reduction);
}

at::Tensor call_mad_backward(const at::Tensor& grad, const at::Tensor& attn, int64_t patch, int64_t num_prefix_tokens,
                             at::OptionalIntArrayRef grid, bool renormalize, c10::string_view reduction) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("vitmad::mad_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                               at::OptionalIntArrayRef, bool, c10::string_view)>();
  return op.call(grad, attn, patch, num_prefix_tokens, grid, renormalize, reduction);
}

class MadFunction : public torch::autograd::Function<MadFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& attn, int64_t patch, int64_t num_prefix_tokens,
                            at::OptionalIntArrayRef grid, bool renormalize, c10::string_view reduction) {
    ctx->save_for_backward({attn});
    ctx->saved_data["patch"] = patch;
    ctx->saved_data["num_prefix_tokens"] = num_prefix_tokens;
    ctx->saved_data["grid"] = grid.has_value() ? c10::IValue(grid->vec()) : c10::IValue();
    ctx->saved_data["renormalize"] = renormalize;
    ctx->saved_data["reduction"] = std::string(reduction);
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_mad(attn, patch, num_prefix_tokens, grid, renormalize, reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor attn = ctx->get_saved_variables()[0];
    const c10::IValue& grid_value = ctx->saved_data["grid"];
    std::optional<std::vector<int64_t>> grid;
    if (!grid_value.isNone()) grid = grid_value.toIntVector();
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    at::Tensor grad_attn = call_mad_backward(
        grads[0], attn, ctx->saved_data["patch"].toInt(), ctx->saved_data["num_prefix_tokens"].toInt(),
        grid.has_value() ? at::OptionalIntArrayRef(*grid) : at::OptionalIntArrayRef(),
        ctx->saved_data["renormalize"].toBool(), reduction);
    return {grad_attn, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor mad_autograd(const at::Tensor& attn, int64_t patch, int64_t num_prefix_tokens,
                        at::OptionalIntArrayRef grid, bool renormalize, c10::string_view reduction) {
  return MadFunction::apply(attn, patch, num_prefix_tokens, grid, renormalize, reduction);
}

}  // namespace

TORCH_LIBRARY_IMPL(vitmad, Autograd, m) { m.impl("mad", &mad_autograd); }

}  // namespace vitmad
