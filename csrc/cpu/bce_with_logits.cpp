// binary_cross_entropy_with_logits on the CPU, forward and backward, each one
// pass over the operands. Matches torch.nn.functional.binary_cross_entropy_with_logits;
// the math is in fusedloss/numerics.h, the functors in elementwise_losses.h.

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <fusedloss/dispatch.h>
#include <fusedloss/elementwise_losses.h>

#include "elementwise.h"

namespace fusedloss::cpu {
namespace {

constexpr const char* kFwd = "fusedloss::bce_with_logits";
constexpr const char* kBwd = "fusedloss::bce_with_logits_backward";

at::Tensor bce_with_logits(const at::Tensor& input, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  const ElementwiseCall c = bce_with_logits_call(kFwd, input, target, weight, pos_weight, reduction);
  at::Tensor loss = c.new_loss(reduction);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bce_with_logits_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    bool_switch(c.has(kBcePosWeight), [&](auto pw) {
      forward<scalar_t>(c, BceLogitsForward<acc_t, decltype(pw)::value>{}, reduction, loss);
    });
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> bce_with_logits_backward(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
    int64_t reduction, std::array<bool, 2> output_mask) {
  ElementwiseCall c = bce_with_logits_call(kBwd, input, target, weight, pos_weight, reduction);
  check_grad(kBwd, grad, input, reduction);
  c.set(kBceGrad, grad);
  at::Tensor grad_input = c.new_grad(output_mask[0]);
  at::Tensor grad_target = c.new_grad(output_mask[1]);
  if (c.numel == 0 || !(output_mask[0] || output_mask[1])) return {grad_input, grad_target};
  const double scale = reduction == kReductionMean ? 1.0 / static_cast<double>(c.numel) : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bce_with_logits_backward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const auto ops = operands<scalar_t, 5>(c);
    const std::array<scalar_t*, 2> out{
        output_mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr,
        output_mask[1] ? grad_target.mutable_data_ptr<scalar_t>() : nullptr};
    bool_switch(c.has(kBcePosWeight), [&](auto pw) {
      using F = BceLogitsBackward<acc_t, decltype(pw)::value>;
      map(c.numel, ops, F{static_cast<acc_t>(scale), output_mask[1]}, out);
    });
  });
  return {grad_input, grad_target};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("bce_with_logits", &bce_with_logits);
  m.impl("bce_with_logits_backward", &bce_with_logits_backward);
}

}  // namespace fusedloss::cpu
