#pragma once
// multi_margin_loss host code shared by the CPU and CUDA implementations:
// checks, the kernel parameter block, and the op bodies templated on a device
// Engine that runs the per-row kernels:
//   Engine::forward_rows<scalar_t>(MmParams&)   one loss per row
//   Engine::backward_rows<scalar_t>(MmParams&)  the gradient, one pass per row
//
// Per row with target t: loss = w_t / C * sum_{i != t} h(margin - x_t + x_i),
// h(z) = z (p = 1) or z^2 (p = 2) where z > 0, else 0 (torch's kernels: the
// weight multiplies after the power, and a NaN z counts nothing). Gradient:
// d/dx_i = g w_t / C h'(z_i) for i != t, and d/dx_t = -(the sum of those).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <fusedloss/checks.h>
#include <fusedloss/numerics.h>
#include <fusedloss/outputs.h>
#include <fusedloss/row_sum.h>

#include <optional>

namespace fusedloss {

template <typename scalar_t>
struct MmParams {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t N = 0, C = 0;            // rows, classes; rows contiguous
  const scalar_t* input = nullptr;
  const int64_t* target = nullptr;  // one per row
  const acc_t* weight = nullptr;    // (C) in the accumulation type, or null
  int64_t p = 1;
  acc_t margin = 1;
  acc_t* loss_out = nullptr;        // forward: one per row
  const acc_t* grad = nullptr;      // backward: one per row ('none') or one value
  bool grad_per_row = false;
  acc_t scale = 1;                  // 1/N for a mean
  scalar_t* grad_input = nullptr;   // (N, C) contiguous

  // Row r's coefficient w_t / C (times its grad_output in backward).
  C10_HOST_DEVICE acc_t row_scale(int64_t t) const {
    const acc_t w = weight != nullptr ? weight[t] : acc_t(1);
    return w / static_cast<acc_t>(C);
  }
  // Row r's backward coefficient: its grad_output times scale and w_t / C.
  C10_HOST_DEVICE acc_t row_grad_scale(int64_t r, int64_t t) const {
    return grad[grad_per_row ? r : 0] * scale * row_scale(t);
  }
};

inline void check_multi_margin(const char* op, const at::Tensor& input, const at::Tensor& target, int64_t p,
                               const std::optional<at::Tensor>& weight, int64_t reduction) {
  check_reduction(op, reduction);
  check_floating(op, "input", input);
  TORCH_CHECK(p == 1 || p == 2, op, ": p must be 1 or 2, got ", p);
  TORCH_CHECK(input.dim() <= 2, op, ": input must be (N, C) or (C), got ", input.sizes());
  TORCH_CHECK(input.dim() == 0 || input.size(-1) > 0, op, ": input must have classes");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.device() == input.device(), op,
              ": target must be int64 on the input's device");
  const int64_t N = input.dim() == 2 ? input.size(0) : 1;
  TORCH_CHECK(input.dim() == 2 ? (target.dim() == 1 && target.size(0) == N) : (target.dim() <= 1 && target.numel() == 1),
              op, ": target must have one class index per row, got ", target.sizes());
  if (weight.has_value() && weight->defined()) {
    check_device(op, "weight", *weight, input);
    check_floating(op, "weight", *weight);
    const int64_t C = input.dim() == 0 ? 1 : input.size(-1);
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == C, op, ": weight must have shape [", C, "]");
  }
}

template <typename Engine, typename ElementwiseEngine>
struct MultiMarginOps {
  static at::Tensor acc_weight(const std::optional<at::Tensor>& weight, at::ScalarType acc_type) {
    if (!weight.has_value() || !weight->defined()) return at::Tensor();
    return weight->to(acc_type).contiguous();
  }

  static at::Tensor forward(const at::Tensor& input_, const at::Tensor& target_, int64_t p, double margin,
                            const std::optional<at::Tensor>& weight_, int64_t reduction,
                            std::optional<at::ScalarType> out_dtype) {
    constexpr const char* op = "fusedloss::multi_margin";
    check_multi_margin(op, input_, target_, p, weight_, reduction);
    const c10::OptionalDeviceGuard guard(input_.device());
    const at::Tensor input = input_.contiguous();
    const at::Tensor target = target_.contiguous();
    const auto acc_type = opmath_type(input.scalar_type());
    const at::Tensor weight = acc_weight(weight_, acc_type);
    const int64_t N = input.dim() == 2 ? input.size(0) : 1;
    const int64_t C = input.dim() == 0 ? 1 : input.size(-1);
    const at::ScalarType loss_type = out_dtype.value_or(input.scalar_type());
    TORCH_CHECK(at::isFloatingType(loss_type), op, ": out_dtype must be a floating dtype, got ", loss_type);
    at::Tensor row_loss = at::empty({N}, input.options().dtype(acc_type));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "multi_margin", [&] {
      MmParams<scalar_t> m;
      fill(m, input, target, weight, p, margin, N, C);
      m.loss_out = row_loss.mutable_data_ptr<at::opmath_type<scalar_t>>();
      if (N > 0) Engine::template forward_rows<scalar_t>(m);
    });
    if (reduction == kReductionNone) {
      // torch: one value per row, or a 0-d loss for a 0-d target
      return finish(row_loss.view(target_.dim() > 0 ? at::IntArrayRef({N}) : at::IntArrayRef({})), loss_type);
    }
    at::Tensor total = at::empty({}, input.options().dtype(acc_type));
    // A mean over no rows is 0/0 = NaN (torch returns an unspecified value).
    sum_into<ElementwiseEngine>(row_loss, total, reduction);
    return finish(total, loss_type);
  }

  static at::Tensor backward(const at::Tensor& grad_, const at::Tensor& input_, const at::Tensor& target_, int64_t p,
                             double margin, const std::optional<at::Tensor>& weight_, int64_t reduction) {
    constexpr const char* op = "fusedloss::multi_margin_backward";
    check_multi_margin(op, input_, target_, p, weight_, reduction);
    const c10::OptionalDeviceGuard guard(input_.device());
    const at::Tensor input = input_.contiguous();
    const at::Tensor target = target_.contiguous();
    const auto acc_type = opmath_type(input.scalar_type());
    check_device(op, "grad", grad_, input);
    check_floating(op, "grad", grad_);
    const at::Tensor grad = finish(grad_, acc_type).contiguous();
    const at::Tensor weight = acc_weight(weight_, acc_type);
    const int64_t N = input.dim() == 2 ? input.size(0) : 1;
    const int64_t C = input.dim() == 0 ? 1 : input.size(-1);
    TORCH_CHECK(grad.numel() == (reduction == kReductionNone ? N : 1), op, ": grad must have the loss's shape");
    at::Tensor grad_input = empty_output(input_.sizes(), input_.options());
    if (N == 0) return grad_input;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "multi_margin_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      MmParams<scalar_t> m;
      fill(m, input, target, weight, p, margin, N, C);
      m.grad = grad.const_data_ptr<acc_t>();
      m.grad_per_row = reduction == kReductionNone;
      m.scale = reduction == kReductionMean ? acc_t(1) / static_cast<acc_t>(N) : acc_t(1);
      m.grad_input = grad_input.mutable_data_ptr<scalar_t>();
      Engine::template backward_rows<scalar_t>(m);
    });
    return grad_input;
  }

 private:
  template <typename scalar_t>
  static void fill(MmParams<scalar_t>& m, const at::Tensor& input, const at::Tensor& target,
                   const at::Tensor& weight, int64_t p, double margin, int64_t N, int64_t C) {
    m.N = N;
    m.C = C;
    m.input = input.const_data_ptr<scalar_t>();
    m.target = target.const_data_ptr<int64_t>();
    m.weight = weight.defined() ? weight.const_data_ptr<at::opmath_type<scalar_t>>() : nullptr;
    m.p = p;
    m.margin = static_cast<at::opmath_type<scalar_t>>(margin);
  }
};

template <typename Ops>
void register_multi_margin_ops(torch::Library& m) {
  m.impl("multi_margin", &Ops::forward);
  m.impl("multi_margin_backward", &Ops::backward);
}

}  // namespace fusedloss
