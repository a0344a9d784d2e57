#pragma once
// Every fusedloss loss written with torch's own differentiable ops, with
// fusedloss's exact semantics (torch's native loss wherever that is the
// semantics, plus the documented extensions). They are:
//  * the first derivative when a backward runs with create_graph=True, so
//    second and higher derivatives are exact (csrc/autograd.cpp);
//  * forward-mode AD (the fused autograd kernels have no jvp);
//  * the path under torch.func transforms (vmap, grad), and for the argument
//    combinations the kernels do not take, reached from Python through the
//    `<loss>_composite` ops;
//  * the reference the fused kernels are tested against.
// They call ATen directly, so a user's monkeypatching of torch.nn.functional
// can never route them back into fusedloss. Never the training hot path.

#include <ATen/core/Tensor.h>

#include <optional>

namespace fusedloss::composite {

at::Tensor bce_with_logits(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                           std::optional<at::ScalarType> out_dtype);

at::Tensor mse(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
               int64_t reduction, std::optional<at::ScalarType> out_dtype);

at::Tensor hinge_embedding(const at::Tensor& input, const at::Tensor& target, double margin, int64_t reduction,
                           std::optional<at::ScalarType> out_dtype);

at::Tensor soft_margin(const at::Tensor& input, const at::Tensor& target, int64_t reduction,
                       std::optional<at::ScalarType> out_dtype);

at::Tensor hinge(const at::Tensor& input, const at::Tensor& target, double margin, bool squared, int64_t reduction,
                 std::optional<at::ScalarType> out_dtype);

at::Tensor multi_margin(const at::Tensor& input, const at::Tensor& target, int64_t p, double margin,
                        const std::optional<at::Tensor>& weight, int64_t reduction,
                        std::optional<at::ScalarType> out_dtype);

at::Tensor cross_entropy(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         int64_t ignore_index, int64_t reduction, double label_smoothing, double lse_square_scale,
                         std::optional<double> softcap, bool inplace_backward, std::optional<at::ScalarType> out_dtype);

at::Tensor sigmoid_focal(const at::Tensor& input, const at::Tensor& target, double alpha, double gamma,
                         int64_t reduction, std::optional<at::ScalarType> out_dtype);

at::Tensor multilabel_soft_margin(const at::Tensor& input, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, int64_t reduction,
                                  std::optional<at::ScalarType> out_dtype);

at::Tensor distill(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                   double beta, double temperature, int64_t ignore_index, int64_t reduction,
                   std::optional<at::ScalarType> out_dtype);
at::Tensor linear_cross_entropy(const at::Tensor& input, const at::Tensor& linear_weight, const at::Tensor& target,
                                const std::optional<at::Tensor>& linear_bias, const std::optional<at::Tensor>& weight,
                                int64_t ignore_index, int64_t reduction, double label_smoothing,
                                double lse_square_scale, std::optional<double> softcap, int64_t chunk_size,
                                std::optional<at::ScalarType> out_dtype);

}  // namespace fusedloss::composite
