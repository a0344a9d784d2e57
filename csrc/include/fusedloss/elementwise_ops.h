#pragma once
// Host implementations of the elementwise loss ops, written once for both
// devices. `Engine` runs functors over an ElementwiseCall:
//   Engine::forward<acc_t>(call, functor, reduction, loss, denominator*)
//   Engine::map<acc_t>(call, functor, std::array<OutSlot, kOut> outputs)
// (csrc/cpu/elementwise.h, csrc/cuda/elementwise.cuh). Each device file
// instantiates these with its engine and registers them for its dispatch key.
//
// Dtypes: the loss is computed in the call's accumulation type and rounded
// once to the loss dtype (torch's rule for the loss, or `out_dtype`); each
// gradient comes out in its own operand's dtype, rounded once.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <fusedloss/dispatch.h>
#include <fusedloss/elementwise_host.h>
#include <fusedloss/elementwise_losses.h>

#include <tuple>

namespace fusedloss {

// The loss dtype: out_dtype when given, else torch's.
inline at::ScalarType loss_dtype(const std::optional<at::ScalarType>& out_dtype, at::ScalarType torch_dtype) {
  if (out_dtype.has_value()) {
    TORCH_CHECK(at::isFloatingType(*out_dtype), "fusedloss: out_dtype must be a floating dtype, got ", *out_dtype);
    return *out_dtype;
  }
  return torch_dtype;
}

#define FUSEDLOSS_DISPATCH_ACC(acc, name, ...) AT_DISPATCH_FLOATING_TYPES(acc, name, __VA_ARGS__)

template <typename Engine>
struct ElementwiseOps {
  // ---- binary_cross_entropy_with_logits (the loss has the target's dtype) --
  static at::Tensor bce_with_logits(const at::Tensor& input, const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                                    std::optional<at::ScalarType> out_dtype) {
    const ElementwiseCall c =
        bce_with_logits_call("fusedloss::bce_with_logits", input, target, weight, pos_weight, reduction);
    const auto dtype = loss_dtype(out_dtype, target.scalar_type());
    at::Tensor loss = c.new_loss(reduction, dtype);
    FUSEDLOSS_DISPATCH_ACC(c.acc, "bce_with_logits", [&] {
      bool_switch(c.has(kBcePosWeight), [&](auto pw) {
        Engine::template forward<scalar_t>(c, BceLogitsForward<scalar_t, decltype(pw)::value>{}, reduction, loss,
                                           nullptr);
      });
    });
    return finish(loss, dtype);
  }

  static std::tuple<at::Tensor, at::Tensor> bce_with_logits_backward(
      const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight, int64_t reduction,
      std::array<bool, 2> output_mask) {
    constexpr const char* op = "fusedloss::bce_with_logits_backward";
    check_grad(op, grad, input, reduction);
    const ElementwiseCall c = bce_with_logits_call(op, input, target, weight, pos_weight, reduction, &grad);
    at::Tensor grad_input = c.new_grad(output_mask[0], input.scalar_type());
    at::Tensor grad_target = c.new_grad(output_mask[1], target.scalar_type());
    if (c.numel == 0 || !(output_mask[0] || output_mask[1])) return {grad_input, grad_target};
    const double scale = reduction == kReductionMean ? 1.0 / static_cast<double>(c.numel) : 1.0;
    FUSEDLOSS_DISPATCH_ACC(c.acc, "bce_with_logits_backward", [&] {
      bool_switch(c.has(kBcePosWeight), [&](auto pw) {
        using F = BceLogitsBackward<scalar_t, decltype(pw)::value>;
        Engine::template map<scalar_t>(c, F{static_cast<scalar_t>(scale), output_mask[1]},
                                       {out_slot(grad_input, output_mask[0]), out_slot(grad_target, output_mask[1])});
      });
    });
    return {finish(grad_input, input.scalar_type()), finish(grad_target, target.scalar_type())};
  }

  // ---- mse_loss (the loss has the promoted dtype) ---------------------------
  static std::tuple<at::Tensor, at::Tensor> mse_forward(const at::Tensor& input, const at::Tensor& target,
                                                        const std::optional<at::Tensor>& weight, int64_t reduction,
                                                        std::optional<at::ScalarType> out_dtype) {
    const ElementwiseCall c = mse_call("fusedloss::mse_forward", input, target, weight, reduction);
    const bool weighted = c.has(kMseWeight);
    at::ScalarType dtype = c10::promoteTypes(input.scalar_type(), target.scalar_type());
    if (weighted) dtype = c10::promoteTypes(dtype, weight->scalar_type());
    dtype = loss_dtype(out_dtype, dtype);
    at::Tensor loss = c.new_loss(reduction, dtype);
    at::Tensor denominator = mse_denominator_like(c, weighted, reduction);
    FUSEDLOSS_DISPATCH_ACC(c.acc, "mse", [&] {
      bool_switch(weighted, [&](auto w) {
        Engine::template forward<scalar_t>(c, MseForward<scalar_t, decltype(w)::value>{}, reduction, loss,
                                           denominator.numel() ? &denominator : nullptr);
      });
    });
    return {finish(loss, dtype), denominator};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> mse_backward(
      const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& loss,
      const std::optional<at::Tensor>& denominator, int64_t reduction, std::array<bool, 3> output_mask) {
    constexpr const char* op = "fusedloss::mse_backward";
    check_grad(op, grad, input, reduction);
    ElementwiseCall c = mse_call(op, input, target, weight, reduction, &grad);
    const bool weighted_mean = c.has(kMseWeight) && reduction == kReductionMean;
    if (weighted_mean) check_mse_weighted_mean_state(op, c, input, loss, denominator);
    at::Tensor grad_input = c.new_grad(output_mask[0], input.scalar_type());
    at::Tensor grad_target = c.new_grad(output_mask[1], target.scalar_type());
    const bool want_weight = output_mask[2] && c.has(kMseWeight);
    at::Tensor grad_weight = c.new_grad(want_weight, want_weight ? weight->scalar_type() : input.scalar_type());
    if (c.numel == 0 || !(output_mask[0] || output_mask[1] || want_weight)) {
      return {grad_input, grad_target, grad_weight};
    }
    const double scale =
        reduction == kReductionMean && !weighted_mean ? 1.0 / static_cast<double>(c.numel) : 1.0;
    FUSEDLOSS_DISPATCH_ACC(c.acc, "mse_backward", [&] {
      const scalar_t* denom = weighted_mean ? denominator->const_data_ptr<scalar_t>() : nullptr;
      Engine::template map<scalar_t>(
          c, MseBackward<scalar_t>{static_cast<scalar_t>(scale), denom, want_weight, weighted_mean},
          {out_slot(grad_input, output_mask[0]), out_slot(grad_target, output_mask[1]),
           out_slot(grad_weight, want_weight)});
    });
    return {finish(grad_input, input.scalar_type()), finish(grad_target, target.scalar_type()),
            want_weight ? finish(grad_weight, weight->scalar_type()) : grad_weight};
  }

  // ---- margin losses on (input, target) pairs of one shape ------------------
  // hinge_embedding_loss, soft_margin_loss and the binary hinge share these.

  template <typename MakeForward>
  static at::Tensor pair_forward(const char* op, const at::Tensor& input, const at::Tensor& target,
                                 int64_t reduction, at::ScalarType dtype, MakeForward make) {
    const ElementwiseCall c = pair_call(op, input, target, reduction);
    at::Tensor loss = c.new_loss(reduction, dtype);
    FUSEDLOSS_DISPATCH_ACC(c.acc, "margin_loss",
                           [&] { Engine::template forward<scalar_t>(c, make(scalar_t{}), reduction, loss, nullptr); });
    return finish(loss, dtype);
  }

  // Gradients of a pair loss; make(acc_t{}, scale) builds the backward functor
  // (out[0] = d/dinput, out[1] = d/dtarget when it has two outputs).
  template <int kGrads, typename MakeBackward>
  static std::array<at::Tensor, kGrads> pair_backward(const char* op, const at::Tensor& grad, const at::Tensor& input,
                                                      const at::Tensor& target, int64_t reduction,
                                                      std::array<bool, kGrads> mask, MakeBackward make) {
    check_grad(op, grad, input, reduction);
    const ElementwiseCall c = pair_call(op, input, target, reduction, &grad);
    std::array<at::Tensor, kGrads> out;
    std::array<at::ScalarType, kGrads> dtypes;
    std::array<OutSlot, kGrads> slots;
    bool any = false;
    for (int k = 0; k < kGrads; ++k) {
      dtypes[k] = k == 0 || !at::isFloatingType(target.scalar_type()) ? input.scalar_type() : target.scalar_type();
      out[k] = c.new_grad(mask[k], dtypes[k]);
      slots[k] = out_slot(out[k], mask[k]);
      any = any || mask[k];
    }
    if (c.numel == 0 || !any) return out;
    const double scale = reduction == kReductionMean ? 1.0 / static_cast<double>(c.numel) : 1.0;
    FUSEDLOSS_DISPATCH_ACC(c.acc, "margin_loss_backward", [&] {
      Engine::template map<scalar_t>(c, make(scalar_t{}, static_cast<scalar_t>(scale)), slots);
    });
    for (int k = 0; k < kGrads; ++k)
      if (mask[k]) out[k] = finish(out[k], dtypes[k]);
    return out;
  }

  static at::Tensor hinge_embedding(const at::Tensor& input, const at::Tensor& target, double margin,
                                    int64_t reduction, std::optional<at::ScalarType> out_dtype) {
    return pair_forward("fusedloss::hinge_embedding", input, target, reduction,
                        loss_dtype(out_dtype, input.scalar_type()), [&](auto acc) {
                          return HingeEmbeddingForward<decltype(acc)>{static_cast<decltype(acc)>(margin)};
                        });
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

  static at::Tensor soft_margin(const at::Tensor& input, const at::Tensor& target, int64_t reduction,
                                std::optional<at::ScalarType> out_dtype) {
    return pair_forward("fusedloss::soft_margin", input, target, reduction,
                        loss_dtype(out_dtype, input.scalar_type()),
                        [&](auto acc) { return SoftMarginForward<decltype(acc)>{}; });
  }

  static at::Tensor soft_margin_backward(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
                                         int64_t reduction) {
    return pair_backward<1>("fusedloss::soft_margin_backward", grad, input, target, reduction, {true},
                            [&](auto acc, auto scale) { return SoftMarginBackward<decltype(acc)>{scale}; })[0];
  }

  static at::Tensor hinge(const at::Tensor& input, const at::Tensor& target, double margin, bool squared,
                          int64_t reduction, std::optional<at::ScalarType> out_dtype) {
    const auto dtype = loss_dtype(out_dtype, c10::promoteTypes(input.scalar_type(), target.scalar_type()));
    return pair_forward("fusedloss::hinge", input, target, reduction, dtype, [&](auto acc) {
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
  m.impl("mse_forward", &Ops::mse_forward);
  m.impl("mse_backward", &Ops::mse_backward);
  m.impl("hinge_embedding", &Ops::hinge_embedding);
  m.impl("hinge_embedding_backward", &Ops::hinge_embedding_backward);
  m.impl("soft_margin", &Ops::soft_margin);
  m.impl("soft_margin_backward", &Ops::soft_margin_backward);
  m.impl("hinge", &Ops::hinge);
  m.impl("hinge_backward", &Ops::hinge_backward);
}

}  // namespace fusedloss
