// mse_loss on the CPU, forward and backward, each one pass over the operands.
// Matches torch.nn.functional.mse_loss, including the weight= argument of
// torch >= 2.13 (a weighted mean divides by sum(weight)).

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <fusedloss/dispatch.h>
#include <fusedloss/elementwise_losses.h>

#include "elementwise.h"

namespace fusedloss::cpu {
namespace {

constexpr const char* kFwd = "fusedloss::mse";
constexpr const char* kBwd = "fusedloss::mse_backward";

std::tuple<at::Tensor, at::Tensor> mse(const at::Tensor& input, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight, int64_t reduction) {
  const ElementwiseCall c = mse_call(kFwd, input, target, weight, reduction);
  const bool weighted = c.has(kMseWeight);
  at::Tensor loss = c.new_loss(reduction);
  at::Tensor denominator = mse_denominator_like(c, weighted, reduction);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "mse_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    bool_switch(weighted, [&](auto w) {
      forward<scalar_t>(c, MseForward<acc_t, decltype(w)::value>{}, reduction, loss,
                        denominator.numel() ? &denominator : nullptr);
    });
  });
  return {loss, denominator};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mse_backward(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& loss,
    const std::optional<at::Tensor>& denominator, int64_t reduction, std::array<bool, 3> output_mask) {
  ElementwiseCall c = mse_call(kBwd, input, target, weight, reduction);
  check_grad(kBwd, grad, input, reduction);
  c.set(kMseGrad, grad);
  const bool weighted_mean = c.has(kMseWeight) && reduction == kReductionMean;
  if (weighted_mean) check_mse_weighted_mean_state(kBwd, c, input, loss, denominator);
  at::Tensor grad_input = c.new_grad(output_mask[0]);
  at::Tensor grad_target = c.new_grad(output_mask[1]);
  const bool want_weight = output_mask[2] && c.has(kMseWeight);
  at::Tensor grad_weight = c.new_grad(want_weight);
  if (c.numel == 0 || !(output_mask[0] || output_mask[1] || want_weight)) {
    return {grad_input, grad_target, grad_weight};
  }
  const double scale = reduction == kReductionMean && !weighted_mean ? 1.0 / static_cast<double>(c.numel) : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "mse_backward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const auto ops = operands<scalar_t, 5>(c);
    const std::array<scalar_t*, 3> out{
        output_mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr,
        output_mask[1] ? grad_target.mutable_data_ptr<scalar_t>() : nullptr,
        want_weight ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr};
    const acc_t* denom = weighted_mean ? denominator->const_data_ptr<acc_t>() : nullptr;
    map(c.numel, ops, MseBackward<acc_t>{static_cast<acc_t>(scale), denom, want_weight, weighted_mean}, out);
  });
  return {grad_input, grad_target, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("mse", &mse);
  m.impl("mse_backward", &mse_backward);
}

}  // namespace fusedloss::cpu
