#pragma once
// The C++ signatures of the public loss ops (their schemas: csrc/ops.cpp), for
// the typed dispatcher calls made by their autograd kernels (csrc/autograd.cpp)
// and by their eager Python entry points (csrc/python_calls.cpp). A signature
// that does not match its schema raises on its first call, which
// tests/test_eager_calls.py makes for every op.

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>

namespace fusedloss::sig {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using OptDtype = std::optional<at::ScalarType>;

using Bce = Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t, OptDtype);
using Mse = Tensor(const Tensor&, const Tensor&, const OptTensor&, int64_t, OptDtype);
using CrossEntropy = Tensor(const Tensor&, const Tensor&, const OptTensor&, int64_t, int64_t, double, double,
                            std::optional<double>, bool, OptDtype);
using HingeEmbedding = Tensor(const Tensor&, const Tensor&, double, int64_t, OptDtype);
using SoftMargin = Tensor(const Tensor&, const Tensor&, int64_t, OptDtype);
using Hinge = Tensor(const Tensor&, const Tensor&, double, bool, int64_t, OptDtype);
using MultiMargin = Tensor(const Tensor&, const Tensor&, int64_t, double, const OptTensor&, int64_t, OptDtype);
using SigmoidFocal = Tensor(const Tensor&, const Tensor&, double, double, int64_t, OptDtype);
using MultilabelSoftMargin = Tensor(const Tensor&, const Tensor&, const OptTensor&, int64_t, OptDtype);
using Distill = Tensor(const Tensor&, const Tensor&, const OptTensor&, double, double, int64_t, int64_t, OptDtype);
using LinearCrossEntropy = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                  int64_t, int64_t, double, double, std::optional<double>, int64_t, OptDtype);

}  // namespace fusedloss::sig
