#pragma once
// Host-side preparation of an elementwise loss call, shared by the CPU and CUDA
// implementations: validate, lay out every operand against the loss's shape
// (fusedloss/layout.h; copies only what fits no layout), allocate outputs.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <fusedloss/checks.h>
#include <fusedloss/layout.h>
#include <fusedloss/outputs.h>

#include <array>
#include <vector>

namespace fusedloss {

constexpr int kMaxOperands = 6;

struct ElementwiseCall {
  std::vector<int64_t> sizes;
  int64_t numel = 0;
  at::TensorOptions options;
  std::array<at::Tensor, kMaxOperands> tensor;  // undefined: absent (the constant 1)
  std::array<Layout, kMaxOperands> layout;

  explicit ElementwiseCall(const at::Tensor& input)
      : sizes(input.sizes().vec()), numel(input.numel()), options(input.options()) {}

  void set(int slot, const at::Tensor& t) {
    if (t.defined()) tensor[slot] = as_operand(t, sizes, &layout[slot]);
  }
  void set(int slot, const std::optional<at::Tensor>& t) {
    if (t.has_value()) set(slot, *t);
  }
  bool has(int slot) const { return tensor[slot].defined(); }

  // The loss output: the loss's shape for 'none', else a 0-d tensor.
  at::Tensor new_loss(int64_t reduction) const {
    return reduction == kReductionNone ? empty_output(sizes, options) : at::empty({}, options);
  }
  // A gradient output, or an empty placeholder when it was not requested.
  at::Tensor new_grad(bool wanted) const { return wanted ? empty_output(sizes, options) : at::empty({0}, options); }
};

// Common checks: input floating point, `others` of the input's dtype/device and
// shape-compatible. Gradients and same-shape operands are checked by callers.
inline void check_elementwise(const char* op, const at::Tensor& input, const at::Tensor& target, int64_t reduction) {
  check_reduction(op, reduction);
  check_floating(op, "input", input);
  check_like(op, "target", target, input);
  TORCH_CHECK(target.sizes() == input.sizes(), op, ": target of shape ", target.sizes(),
              " must have the input's shape ", input.sizes());
}

inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& input, int64_t reduction) {
  check_like(op, "grad", grad, input);
  if (reduction == kReductionNone) {
    TORCH_CHECK(grad.sizes() == input.sizes(), op, ": grad of shape ", grad.sizes(),
                " must have the input's shape ", input.sizes(), " for reduction='none'");
  } else {
    TORCH_CHECK(grad.numel() == 1, op, ": grad must have one element for a reduced loss, got shape ",
                grad.sizes());
  }
}

// ---------------------------------------------------------------------------
// binary_cross_entropy_with_logits. Operand slots:
enum BceSlot { kBceInput = 0, kBceTarget, kBceWeight, kBcePosWeight, kBceGrad };

inline ElementwiseCall bce_with_logits_call(const char* op, const at::Tensor& input, const at::Tensor& target,
                                            const std::optional<at::Tensor>& weight,
                                            const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  check_elementwise(op, input, target, reduction);
  check_like(op, "weight", weight, input);
  check_like(op, "pos_weight", pos_weight, input);
  check_broadcasts_to(op, "weight", weight, input.sizes());
  check_broadcasts_to(op, "pos_weight", pos_weight, input.sizes());
  ElementwiseCall c(input);
  c.set(kBceInput, input);
  c.set(kBceTarget, target);
  c.set(kBceWeight, weight);
  c.set(kBcePosWeight, pos_weight);
  return c;
}

// ---------------------------------------------------------------------------
// mse_loss. Operand slots:
enum MseSlot { kMseInput = 0, kMseTarget, kMseWeight, kMseGrad, kMseShift };

inline ElementwiseCall mse_call(const char* op, const at::Tensor& input, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, int64_t reduction) {
  check_elementwise(op, input, target, reduction);
  check_like(op, "weight", weight, input);
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->sizes() == input.sizes(), op, ": weight of shape ", weight->sizes(),
                " must have the input's shape ", input.sizes());
  }
  ElementwiseCall c(input);
  c.set(kMseInput, input);
  c.set(kMseTarget, target);
  c.set(kMseWeight, weight);
  return c;
}

// Accumulation dtype of a loss dtype: what the weighted-mean denominator of
// mse is kept in.
inline at::ScalarType opmath_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace fusedloss

namespace fusedloss {

// mse's second output: sum(weight) for a weighted mean (its backward divides by
// it), else an empty placeholder.
inline at::Tensor mse_denominator_like(const ElementwiseCall& c, bool weighted, int64_t reduction) {
  const auto opts = c.options.dtype(opmath_type(c.options.dtype().toScalarType()));
  return weighted && reduction == kReductionMean ? at::empty({}, opts) : at::empty({0}, opts);
}

// The weighted-mean backward needs the forward's loss and denominator.
inline void check_mse_weighted_mean_state(const char* op, ElementwiseCall& c, const at::Tensor& input,
                                          const std::optional<at::Tensor>& loss,
                                          const std::optional<at::Tensor>& denominator) {
  TORCH_CHECK(loss.has_value() && loss->defined() && denominator.has_value() && denominator->defined(), op,
              ": a weighted mean needs the forward's loss and denominator");
  check_like(op, "loss", *loss, input);
  TORCH_CHECK(loss->numel() == 1, op, ": loss must have one element");
  TORCH_CHECK(denominator->device() == input.device() && denominator->numel() == 1 &&
                  denominator->scalar_type() == opmath_type(input.scalar_type()),
              op, ": denominator must be a one-element ", opmath_type(input.scalar_type()), " tensor on ",
              input.device());
  c.set(kMseShift, *loss);
}

}  // namespace fusedloss
