#pragma once
// multilabel_soft_margin_loss host code shared by the CPU and CUDA
// implementations. torch's loss, per row of the last (class) dim:
//   loss_r = sum_c w_c l(x_rc, y_rc) / C,  l = -(y log_sigmoid(x) + (1 - y) log_sigmoid(-x))
// then the reduction over rows. The per-element math is the elementwise
// functor MultilabelSoftMarginForward (elementwise_losses.h); a row engine sums
// it per row:
//   RowEngine::row_sums<acc_t>(ElementwiseCall&, functor, rows, C, acc_t* out)  out[r] = sum / C
// one read of the operands, each row summed in a fixed order. The backward is
// elementwise (the row's grad_output broadcast along it) on the elementwise
// engine: one read, one write per gradient. Nothing of the input's size is
// saved; torch saves log_sigmoid of x and -x and three temporaries.

#include <ATen/ops/result_type.h>

#include <fusedloss/elementwise_ops.h>
#include <fusedloss/row_sum.h>

#include <vector>

namespace fusedloss {

// Operand slots: x, y, weight (, g).
inline ElementwiseCall multilabel_soft_margin_call(const char* op, const at::Tensor& input, const at::Tensor& target,
                                                   const std::optional<at::Tensor>& weight, int64_t reduction) {
  check_reduction(op, reduction);
  check_floating(op, "input", input);
  TORCH_CHECK(input.dim() >= 1, op, ": input must have a class dimension");
  check_device(op, "target", target, input);
  // torch multiplies integer (multi-hot) targets in; the engine reads them
  // converted once to the accumulation type.
  TORCH_CHECK(!at::isComplexType(target.scalar_type()) && target.scalar_type() != at::kBool, op,
              ": target must be real and not bool, got ", target.scalar_type());
  TORCH_CHECK(target.sizes() == input.sizes(), op, ": target of shape ", target.sizes(),
              " must have the input's shape ", input.sizes());
  check_device(op, "weight", weight, input);
  if (weight.has_value() && weight->defined()) check_floating(op, "weight", *weight);
  check_broadcasts_to(op, "weight", weight, input.sizes());
  const at::Tensor* t = target.is_floating_point() ? &target : nullptr;
  ElementwiseCall c(input, call_acc_type({&input, t, opt_ptr(weight)}));
  c.set(0, input);
  c.set(1, target);
  c.set(2, weight);
  return c;
}

// torch's dtype for the loss: the target promotes the input (an integer target
// does not), then a weight of one or more dims promotes it (a 0-d one of the
// same category does not), as torch's composite's type promotion gives.
inline at::ScalarType multilabel_soft_margin_dtype(const at::Tensor& input, const at::Tensor& target,
                                                   const std::optional<at::Tensor>& weight) {
  at::ScalarType t = at::result_type(input, target);
  if (weight.has_value() && weight->defined()) {
    const bool same_category = at::isFloatingType(t) && at::isFloatingType(weight->scalar_type());
    if (!(weight->dim() == 0 && same_category)) t = c10::promoteTypes(t, weight->scalar_type());
  }
  return t;
}

// Rows and classes of an input (..., C).
inline std::pair<int64_t, int64_t> multilabel_rows(const at::Tensor& input) {
  const int64_t C = input.size(-1);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < input.dim(); ++d) rows *= input.size(d);
  return {rows, C};
}

template <typename RowEngine, typename ElementwiseEngine>
struct MultilabelSoftMarginOps {
  static at::Tensor forward(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                            int64_t reduction, std::optional<at::ScalarType> out_dtype) {
    constexpr const char* op = "fusedloss::multilabel_soft_margin";
    const ElementwiseCall c = multilabel_soft_margin_call(op, input, target, weight, reduction);
    const auto dtype = loss_dtype(out_dtype, multilabel_soft_margin_dtype(input, target, weight));
    const auto [rows, C] = multilabel_rows(input);
    at::Tensor row_loss = at::empty({rows}, c.options(c.acc));
    FUSEDLOSS_DISPATCH_ACC(c.acc, "multilabel_soft_margin", [&] {
      if (rows > 0) {
        RowEngine::template row_sums<scalar_t>(c, MultilabelSoftMarginForward<scalar_t>{}, rows, C,
                                               row_loss.mutable_data_ptr<scalar_t>());
      }
    });
    if (reduction == kReductionNone) {
      const auto shape = input.sizes().slice(0, input.dim() - 1);
      return finish(row_loss.view(shape), dtype);
    }
    at::Tensor total = at::empty({}, c.options(c.acc));
    sum_into<ElementwiseEngine>(row_loss, total, reduction);  // an empty mean is 0/0 = NaN, as torch
    return finish(total, dtype);
  }

  static std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& input,
                                                     const at::Tensor& target,
                                                     const std::optional<at::Tensor>& weight, int64_t reduction,
                                                     std::array<bool, 2> output_mask) {
    constexpr const char* op = "fusedloss::multilabel_soft_margin_backward";
    ElementwiseCall c = multilabel_soft_margin_call(op, input, target, weight, reduction);
    const auto [rows, C] = multilabel_rows(input);
    check_device(op, "grad", grad, input);
    check_floating(op, "grad", grad);
    TORCH_CHECK(grad.numel() == (reduction == kReductionNone ? rows : 1), op, ": grad must have the loss's shape");
    const bool want_target = output_mask[1] && target.is_floating_point();
    at::Tensor grad_input = c.new_grad(output_mask[0], input.scalar_type());
    at::Tensor grad_target = c.new_grad(want_target, want_target ? target.scalar_type() : input.scalar_type());
    if (c.numel == 0 || !(output_mask[0] || want_target)) return {grad_input, grad_target};
    // The row's grad_output along its classes: a (rows, 1) operand broadcast
    // over C (Layout inner C, period rows), never expanded in memory.
    std::vector<int64_t> gshape(input.sizes().begin(), input.sizes().end());
    gshape.back() = 1;
    c.set(3, reduction == kReductionNone ? grad.contiguous().view(gshape) : grad.reshape({}));
    const double denom = static_cast<double>(C) * (reduction == kReductionMean ? static_cast<double>(rows) : 1.0);
    FUSEDLOSS_DISPATCH_ACC(c.acc, "multilabel_soft_margin_backward", [&] {
      ElementwiseEngine::template map<scalar_t>(
          c, MultilabelSoftMarginBackward<scalar_t>{static_cast<scalar_t>(1.0 / denom), output_mask[0], want_target},
          {out_slot(grad_input, output_mask[0]), out_slot(grad_target, want_target)});
    });
    return {finish(grad_input, input.scalar_type()),
            want_target ? finish(grad_target, target.scalar_type()) : grad_target};
  }
};

template <typename Ops>
void register_multilabel_soft_margin_ops(torch::Library& m) {
  m.impl("multilabel_soft_margin", &Ops::forward);
  m.impl("multilabel_soft_margin_backward", &Ops::backward);
}

}  // namespace fusedloss
