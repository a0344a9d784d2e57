#pragma once
// sigmoid_focal_loss (torchvision.ops.sigmoid_focal_loss), written once for
// both devices on the elementwise engines (elementwise_ops.h): one pass
// forward (the per-element loss, or its deterministic sum), one pass backward
// (the gradients of input and target together). torchvision runs ~7 kernels
// forward and saves full-size intermediates (sigmoid, BCE, p_t, the power) for
// its backward; here only the inputs are saved.
//
// The math is numerics.h `sigmoid_focal` / `sigmoid_focal_grads`; the loss has
// torchvision's dtype (input and target promoted) or out_dtype, computed in
// fp32 (fp64 when either operand is fp64) and rounded once.

#include <fusedloss/elementwise_ops.h>

namespace fusedloss {

// Operand slots: x, y (, g).
inline ElementwiseCall sigmoid_focal_call(const char* op, const at::Tensor& input, const at::Tensor& target,
                                          double alpha, int64_t reduction, const at::Tensor* grad = nullptr) {
  check_elementwise(op, input, target, reduction);
  check_floating(op, "target", target);
  TORCH_CHECK(alpha == -1.0 || (alpha >= 0.0 && alpha <= 1.0), op, ": alpha must be in [0, 1] or -1, got ", alpha);
  ElementwiseCall c(input, call_acc_type({&input, &target}));
  c.set(0, input);
  c.set(1, target);
  if (grad != nullptr) c.set(2, *grad);
  return c;
}

template <typename Engine>
struct SigmoidFocalOps {
  // Calls f(functor-maker) with alpha >= 0 and gamma == 2 lifted into template
  // constants, so the common call (alpha 0.25, gamma 2) has no pow and no branch.
  template <typename F>
  static void switch_options(double alpha, double gamma, F&& f) {
    bool_switch(alpha >= 0.0, [&](auto a) {
      bool_switch(gamma == 2.0, [&](auto sq) { f(a, sq); });
    });
  }

  static at::Tensor forward(const at::Tensor& input, const at::Tensor& target, double alpha, double gamma,
                            int64_t reduction, std::optional<at::ScalarType> out_dtype) {
    const ElementwiseCall c = sigmoid_focal_call("fusedloss::sigmoid_focal", input, target, alpha, reduction);
    const auto dtype = loss_dtype(out_dtype, c10::promoteTypes(input.scalar_type(), target.scalar_type()));
    at::Tensor loss = c.new_loss(reduction, dtype);
    FUSEDLOSS_DISPATCH_ACC(c.acc, "sigmoid_focal", [&] {
      switch_options(alpha, gamma, [&](auto a, auto sq) {
        using F = SigmoidFocalForward<scalar_t, decltype(a)::value, decltype(sq)::value>;
        Engine::template forward<scalar_t>(c, F{static_cast<scalar_t>(alpha), static_cast<scalar_t>(gamma)},
                                           reduction, loss, nullptr);
      });
    });
    return finish(loss, dtype);
  }

  static std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& input,
                                                     const at::Tensor& target, double alpha, double gamma,
                                                     int64_t reduction, std::array<bool, 2> output_mask) {
    constexpr const char* op = "fusedloss::sigmoid_focal_backward";
    check_grad(op, grad, input, reduction);
    const ElementwiseCall c = sigmoid_focal_call(op, input, target, alpha, reduction, &grad);
    at::Tensor grad_input = c.new_grad(output_mask[0], input.scalar_type());
    at::Tensor grad_target = c.new_grad(output_mask[1], target.scalar_type());
    if (c.numel == 0 || !(output_mask[0] || output_mask[1])) return {grad_input, grad_target};
    const double scale = reduction == kReductionMean ? 1.0 / static_cast<double>(c.numel) : 1.0;
    FUSEDLOSS_DISPATCH_ACC(c.acc, "sigmoid_focal_backward", [&] {
      switch_options(alpha, gamma, [&](auto a, auto sq) {
        using F = SigmoidFocalBackward<scalar_t, decltype(a)::value, decltype(sq)::value>;
        Engine::template map<scalar_t>(
            c, F{static_cast<scalar_t>(alpha), static_cast<scalar_t>(gamma), static_cast<scalar_t>(scale), output_mask[1]},
            {out_slot(grad_input, output_mask[0]), out_slot(grad_target, output_mask[1])});
      });
    });
    return {finish(grad_input, input.scalar_type()), finish(grad_target, target.scalar_type())};
  }
};

template <typename Ops>
void register_sigmoid_focal_ops(torch::Library& m) {
  m.impl("sigmoid_focal", &Ops::forward);
  m.impl("sigmoid_focal_backward", &Ops::backward);
}

}  // namespace fusedloss
