#pragma once
// Host implementations of the elementwise loss ops, written once for both
// devices. `Engine` runs functors over an ElementwiseCall:
//   Engine::forward<scalar_t>(call, functor, reduction, loss, denominator*)
//   Engine::map<scalar_t>(call, functor, std::array<scalar_t*, kOut> outputs)
// (csrc/cpu/elementwise.h, csrc/cuda/elementwise.cuh). Each device file
// instantiates these with its engine and registers them for its dispatch key.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <fusedloss/dispatch.h>
#include <fusedloss/elementwise_host.h>
#include <fusedloss/elementwise_losses.h>

#include <tuple>

namespace fusedloss {

template <typename Engine>
struct ElementwiseOps {
  // ---- binary_cross_entropy_with_logits -----------------------------------
  static at::Tensor bce_with_logits(const at::Tensor& input, const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
    const ElementwiseCall c =
        bce_with_logits_call("fusedloss::bce_with_logits", input, target, weight, pos_weight, reduction);
    at::Tensor loss = c.new_loss(reduction);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bce_with_logits", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      bool_switch(c.has(kBcePosWeight), [&](auto pw) {
        Engine::template forward<scalar_t>(c, BceLogitsForward<acc_t, decltype(pw)::value>{}, reduction, loss,
                                           nullptr);
      });
    });
    return loss;
  }

  static std::tuple<at::Tensor, at::Tensor> bce_with_logits_backward(
      const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight, int64_t reduction,
      std::array<bool, 2> output_mask) {
    constexpr const char* op = "fusedloss::bce_with_logits_backward";
    ElementwiseCall c = bce_with_logits_call(op, input, target, weight, pos_weight, reduction);
    check_grad(op, grad, input, reduction);
    c.set(kBceGrad, grad);
    at::Tensor grad_input = c.new_grad(output_mask[0]);
    at::Tensor grad_target = c.new_grad(output_mask[1]);
    if (c.numel == 0 || !(output_mask[0] || output_mask[1])) return {grad_input, grad_target};
    const double scale = reduction == kReductionMean ? 1.0 / static_cast<double>(c.numel) : 1.0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bce_with_logits_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const std::array<scalar_t*, 2> out{
          output_mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr,
          output_mask[1] ? grad_target.mutable_data_ptr<scalar_t>() : nullptr};
      bool_switch(c.has(kBcePosWeight), [&](auto pw) {
        using F = BceLogitsBackward<acc_t, decltype(pw)::value>;
        Engine::template map<scalar_t>(c, F{static_cast<acc_t>(scale), output_mask[1]}, out);
      });
    });
    return {grad_input, grad_target};
  }

  // ---- mse_loss -------------------------------------------------------------
  static std::tuple<at::Tensor, at::Tensor> mse(const at::Tensor& input, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight, int64_t reduction) {
    const ElementwiseCall c = mse_call("fusedloss::mse", input, target, weight, reduction);
    const bool weighted = c.has(kMseWeight);
    at::Tensor loss = c.new_loss(reduction);
    at::Tensor denominator = mse_denominator_like(c, weighted, reduction);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "mse", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      bool_switch(weighted, [&](auto w) {
        Engine::template forward<scalar_t>(c, MseForward<acc_t, decltype(w)::value>{}, reduction, loss,
                                           denominator.numel() ? &denominator : nullptr);
      });
    });
    return {loss, denominator};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> mse_backward(
      const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& loss,
      const std::optional<at::Tensor>& denominator, int64_t reduction, std::array<bool, 3> output_mask) {
    constexpr const char* op = "fusedloss::mse_backward";
    ElementwiseCall c = mse_call(op, input, target, weight, reduction);
    check_grad(op, grad, input, reduction);
    c.set(kMseGrad, grad);
    const bool weighted_mean = c.has(kMseWeight) && reduction == kReductionMean;
    if (weighted_mean) check_mse_weighted_mean_state(op, c, input, loss, denominator);
    at::Tensor grad_input = c.new_grad(output_mask[0]);
    at::Tensor grad_target = c.new_grad(output_mask[1]);
    const bool want_weight = output_mask[2] && c.has(kMseWeight);
    at::Tensor grad_weight = c.new_grad(want_weight);
    if (c.numel == 0 || !(output_mask[0] || output_mask[1] || want_weight)) {
      return {grad_input, grad_target, grad_weight};
    }
    const double scale =
        reduction == kReductionMean && !weighted_mean ? 1.0 / static_cast<double>(c.numel) : 1.0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "mse_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const std::array<scalar_t*, 3> out{
          output_mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr,
          output_mask[1] ? grad_target.mutable_data_ptr<scalar_t>() : nullptr,
          want_weight ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr};
      const acc_t* denom = weighted_mean ? denominator->const_data_ptr<acc_t>() : nullptr;
      Engine::template map<scalar_t>(
          c, MseBackward<acc_t>{static_cast<acc_t>(scale), denom, want_weight, weighted_mean}, out);
    });
    return {grad_input, grad_target, grad_weight};
  }

  // ---- margin losses on (input, target) pairs of one shape and dtype -------
  // hinge_embedding_loss, soft_margin_loss and the binary hinge share these.

  template <typename MakeForward>
  static at::Tensor pair_forward(const char* op, const at::Tensor& input, const at::Tensor& target,
                                 int64_t reduction, MakeForward make) {
    check_elementwise(op, input, target, reduction);
    ElementwiseCall c(input);
    c.set(0, input);
    c.set(1, target);
    at::Tensor loss = c.new_loss(reduction);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "margin_loss", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      Engine::template forward<scalar_t>(c, make(acc_t{}), reduction, loss, nullptr);
    });
    return loss;
  }

  // Gradients of a pair loss; make(acc_t{}, scale) builds the backward functor
  // (out[0] = d/dinput, out[1] = d/dtarget when it has two outputs).
  template <int kGrads, typename MakeBackward>
  static std::array<at::Tensor, kGrads> pair_backward(const char* op, const at::Tensor& grad, const at::Tensor& input,
                                                      const at::Tensor& target, int64_t reduction,
                                                      std::array<bool, kGrads> mask, MakeBackward make) {
    check_elementwise(op, input, target, reduction);
    check_grad(op, grad, input, reduction);
    ElementwiseCall c(input);
    c.set(0, input);
    c.set(1, target);
    c.set(2, grad);
    std::array<at::Tensor, kGrads> out;
    bool any = false;
    for (int k = 0; k < kGrads; ++k) {
      out[k] = c.new_grad(mask[k]);
      any = any || mask[k];
    }
    if (c.numel == 0 || !any) return out;
    const double scale = reduction == kReductionMean ? 1.0 / static_cast<double>(c.numel) : 1.0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "margin_loss_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      std::array<scalar_t*, kGrads> ptrs;
      for (int k = 0; k < kGrads; ++k) ptrs[k] = mask[k] ? out[k].template mutable_data_ptr<scalar_t>() : nullptr;
      Engine::template map<scalar_t>(c, make(acc_t{}, static_cast<acc_t>(scale)), ptrs);
    });
    return out;
  }

  static at::Tensor hinge_embedding(const at::Tensor& input, const at::Tensor& target, double margin,
                                    int64_t reduction) {
    return pair_forward("fusedloss::hinge_embedding", input, target, reduction,
                        [&](auto acc) { return HingeEmbeddingForward<decltype(acc)>{static_cast<decltype(acc)>(margin)}; });
  }

  static at::Tensor hinge_embedding_backward(const at::Tensor& grad, const at::Tensor& input,
                                             const at::Tensor& target, double margin, int64_t reduction,
                                             bool grad_at_kink) {
    return pair_backward<1>("fusedloss::hinge_embedding_backward", grad, input, target, reduction, {true},
                            [&](auto acc, auto scale) {
                              return HingeEmbeddingBackward<decltype(acc)>{static_cast<decltype(acc)>(margin), scale,
                                                                           grad_at_kink};
                            })[0];
  }

  static at::Tensor soft_margin(const at::Tensor& input, const at::Tensor& target, int64_t reduction) {
    return pair_forward("fusedloss::soft_margin", input, target, reduction,
                        [&](auto acc) { return SoftMarginForward<decltype(acc)>{}; });
  }

  static at::Tensor soft_margin_backward(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
                                         int64_t reduction) {
    return pair_backward<1>("fusedloss::soft_margin_backward", grad, input, target, reduction, {true},
                            [&](auto acc, auto scale) { return SoftMarginBackward<decltype(acc)>{scale}; })[0];
  }

  static at::Tensor hinge(const at::Tensor& input, const at::Tensor& target, double margin, bool squared,
                          int64_t reduction) {
    return pair_forward("fusedloss::hinge", input, target, reduction, [&](auto acc) {
      return HingeForward<decltype(acc)>{static_cast<decltype(acc)>(margin), squared};
    });
  }

  static std::tuple<at::Tensor, at::Tensor> hinge_backward(const at::Tensor& grad, const at::Tensor& input,
                                                           const at::Tensor& target, double margin, bool squared,
                                                           int64_t reduction, bool grad_at_kink,
                                                           std::array<bool, 2> output_mask) {
    auto g = pair_backward<2>("fusedloss::hinge_backward", grad, input, target, reduction, output_mask,
                              [&](auto acc, auto scale) {
                                return HingeBackward<decltype(acc)>{static_cast<decltype(acc)>(margin), scale, squared,
                                                                    grad_at_kink};
                              });
    return {g[0], g[1]};
  }
};

// The registrations, the same for every device.
template <typename Ops>
void register_elementwise_ops(torch::Library& m) {
  m.impl("bce_with_logits", &Ops::bce_with_logits);
  m.impl("bce_with_logits_backward", &Ops::bce_with_logits_backward);
  m.impl("mse", &Ops::mse);
  m.impl("mse_backward", &Ops::mse_backward);
  m.impl("hinge_embedding", &Ops::hinge_embedding);
  m.impl("hinge_embedding_backward", &Ops::hinge_embedding_backward);
  m.impl("soft_margin", &Ops::soft_margin);
  m.impl("soft_margin_backward", &Ops::soft_margin_backward);
  m.impl("hinge", &Ops::hinge);
  m.impl("hinge_backward", &Ops::hinge_backward);
}

}  // namespace fusedloss
