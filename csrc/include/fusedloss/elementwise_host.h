#pragma once
// Host-side preparation of an elementwise loss call, shared by the CPU and CUDA
// implementations: validate, lay out every operand against the loss's shape
// (fusedloss/layout.h; copies only what fits no layout), allocate outputs.
//
// Operands keep their own dtypes. The math runs in the accumulation type (fp64
// when any operand is fp64, else fp32), and the engines widen each operand on
// load and round each output once on store, so bf16 logits with fp32 targets
// (mixed precision, autocast) are read as they are: no fp32 copy of an input.
// Only dtypes an engine cannot load (integers, bool, and fp16/bf16/fp32 in an
// fp64 call) are converted, once, on the host.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <fusedloss/checks.h>
#include <fusedloss/layout.h>
#include <fusedloss/outputs.h>

#include <array>
#include <optional>
#include <vector>

namespace fusedloss {

constexpr int kMaxOperands = 6;

// Accumulation dtype of a value dtype.
inline at::ScalarType opmath_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Whether an engine computing in `acc` reads `t` directly.
inline bool loadable(at::ScalarType t, at::ScalarType acc) {
  if (acc == at::kDouble) return t == at::kDouble;
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// The accumulation dtype of a call over these operands.
inline at::ScalarType call_acc_type(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (t != nullptr && t->defined() && t->scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

inline const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

// One output of an elementwise pass: contiguous, `numel` elements of `dtype`,
// or absent (data == nullptr).
struct OutSlot {
  void* data = nullptr;
  at::ScalarType dtype = at::kFloat;
};

inline OutSlot out_slot(const at::Tensor& t, bool wanted) {
  return wanted ? OutSlot{t.data_ptr(), t.scalar_type()} : OutSlot{};
}

struct ElementwiseCall {
  std::vector<int64_t> sizes;
  int64_t numel = 0;
  at::Device device;
  at::ScalarType acc;                           // the accumulation dtype
  std::array<at::Tensor, kMaxOperands> tensor;  // undefined: absent (the constant 1)
  std::array<Layout, kMaxOperands> layout;

  std::array<int64_t, kMaxOperands> offset{};   // elements into tensor[k]'s data (set_flat)

  ElementwiseCall(const at::Tensor& shape_of, at::ScalarType acc_type)
      : sizes(shape_of.sizes().vec()), numel(shape_of.numel()), device(shape_of.device()), acc(acc_type) {}
  // A 1-D call over n elements (per-row results).
  ElementwiseCall(int64_t n, at::Device dev, at::ScalarType acc_type) : sizes{n}, numel(n), device(dev), acc(acc_type) {}

  void set(int slot, const at::Tensor& t) {
    if (!t.defined()) return;
    tensor[slot] = as_operand(loadable(t.scalar_type(), acc) ? t : t.to(acc), sizes, &layout[slot]);
  }
  // The numel contiguous values of `base` (the accumulation dtype) from
  // element `start` on, without making a view: for the few-microsecond losses
  // of small batches, a view costs more than the loss.
  void set_flat(int slot, const at::Tensor& base, int64_t start) {
    tensor[slot] = base;
    offset[slot] = start;
    layout[slot] = Layout{1, numel};
  }
  // Operand k's first element.
  const void* data(int k) const {
    return static_cast<const char*>(tensor[k].const_data_ptr()) + offset[k] * tensor[k].element_size();
  }
  void set(int slot, const std::optional<at::Tensor>& t) {
    if (t.has_value()) set(slot, *t);
  }
  bool has(int slot) const { return tensor[slot].defined(); }

  at::TensorOptions options(at::ScalarType dtype) const { return at::TensorOptions().dtype(dtype).device(device); }
  // The dtype an engine writes for a wanted `dtype`: itself, or the
  // accumulation type when the engine cannot store it (see finish()).
  at::ScalarType storable(at::ScalarType dtype) const { return loadable(dtype, acc) ? dtype : acc; }
  // The loss output: the loss's shape for 'none', else a 0-d tensor.
  at::Tensor new_loss(int64_t reduction, at::ScalarType dtype) const {
    const auto opts = options(storable(dtype));
    return reduction == kReductionNone ? empty_output(sizes, opts) : at::empty({}, opts);
  }
  // A gradient output, or an empty placeholder when it was not requested.
  at::Tensor new_grad(bool wanted, at::ScalarType dtype) const {
    return wanted ? empty_output(sizes, options(storable(dtype))) : at::empty({0}, options(dtype));
  }
};

// Common checks: input floating point, target on its device with its shape.
inline void check_elementwise(const char* op, const at::Tensor& input, const at::Tensor& target, int64_t reduction) {
  check_reduction(op, reduction);
  check_floating(op, "input", input);
  check_device(op, "target", target, input);
  TORCH_CHECK(target.sizes() == input.sizes(), op, ": target of shape ", target.sizes(),
              " must have the input's shape ", input.sizes());
}

inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& input, int64_t reduction) {
  check_device(op, "grad", grad, input);
  check_floating(op, "grad", grad);
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
                                            const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                                            const at::Tensor* grad = nullptr) {
  check_elementwise(op, input, target, reduction);
  check_floating(op, "target", target);
  check_device(op, "weight", weight, input);
  check_device(op, "pos_weight", pos_weight, input);
  check_broadcasts_to(op, "weight", weight, input.sizes());
  check_broadcasts_to(op, "pos_weight", pos_weight, input.sizes());
  ElementwiseCall c(input, call_acc_type({&input, &target, opt_ptr(weight), opt_ptr(pos_weight)}));
  c.set(kBceInput, input);
  c.set(kBceTarget, target);
  c.set(kBceWeight, weight);
  c.set(kBcePosWeight, pos_weight);
  if (grad != nullptr) c.set(kBceGrad, *grad);
  return c;
}

// ---------------------------------------------------------------------------
// mse_loss. Operand slots:
enum MseSlot { kMseInput = 0, kMseTarget, kMseWeight, kMseGrad, kMseShift };

inline ElementwiseCall mse_call(const char* op, const at::Tensor& input, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, int64_t reduction,
                                const at::Tensor* grad = nullptr) {
  check_elementwise(op, input, target, reduction);
  check_floating(op, "target", target);
  check_device(op, "weight", weight, input);
  if (weight.has_value() && weight->defined()) {
    check_floating(op, "weight", *weight);
    TORCH_CHECK(weight->sizes() == input.sizes(), op, ": weight of shape ", weight->sizes(),
                " must have the input's shape ", input.sizes());
  }
  ElementwiseCall c(input, call_acc_type({&input, &target, opt_ptr(weight)}));
  c.set(kMseInput, input);
  c.set(kMseTarget, target);
  c.set(kMseWeight, weight);
  if (grad != nullptr) c.set(kMseGrad, *grad);
  return c;
}

// mse's second output: sum(weight) for a weighted mean (its backward divides by
// it), else an empty placeholder.
inline at::Tensor mse_denominator_like(const ElementwiseCall& c, bool weighted, int64_t reduction) {
  return weighted && reduction == kReductionMean ? at::empty({}, c.options(c.acc)) : at::empty({0}, c.options(c.acc));
}

// The weighted-mean backward needs the forward's loss and denominator.
inline void check_mse_weighted_mean_state(const char* op, ElementwiseCall& c, const at::Tensor& input,
                                          const std::optional<at::Tensor>& loss,
                                          const std::optional<at::Tensor>& denominator) {
  TORCH_CHECK(loss.has_value() && loss->defined() && denominator.has_value() && denominator->defined(), op,
              ": a weighted mean needs the forward's loss and denominator");
  check_device(op, "loss", *loss, input);
  check_floating(op, "loss", *loss);
  TORCH_CHECK(loss->numel() == 1, op, ": loss must have one element");
  TORCH_CHECK(denominator->device() == input.device() && denominator->numel() == 1 &&
                  denominator->scalar_type() == c.acc,
              op, ": denominator must be a one-element ", c.acc, " tensor on ", input.device());
  c.set(kMseShift, *loss);
}

// ---------------------------------------------------------------------------
// Pair losses (hinge_embedding, soft_margin, binary hinge): operands x, y (, g).
inline ElementwiseCall pair_call(const char* op, const at::Tensor& input, const at::Tensor& target,
                                 int64_t reduction, const at::Tensor* grad = nullptr) {
  check_elementwise(op, input, target, reduction);
  ElementwiseCall c(input, call_acc_type({&input, &target}));
  c.set(0, input);
  c.set(1, target);
  if (grad != nullptr) c.set(2, *grad);
  return c;
}

}  // namespace fusedloss
