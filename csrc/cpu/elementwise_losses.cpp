// CPU registrations of the elementwise losses (binary_cross_entropy_with_logits,
// mse_loss): the shared host code of fusedloss/elementwise_ops.h run by the
// vectorized OpenMP engine of elementwise.h.

#include <torch/library.h>

#include <fusedloss/elementwise_ops.h>

#include "elementwise.h"

namespace fusedloss::cpu {
namespace {

struct CpuEngine {
  template <typename scalar_t, typename F>
  static void forward(const ElementwiseCall& c, const F& f, int64_t reduction, at::Tensor& loss,
                      at::Tensor* denominator) {
    cpu::forward<scalar_t>(c, f, reduction, loss, denominator);
  }
  template <typename scalar_t, typename F>
  static void map(const ElementwiseCall& c, const F& f, const std::array<scalar_t*, F::kOut>& out) {
    cpu::map(c.numel, operands<scalar_t, F::kIn>(c), f, out);
  }
};

using Ops = ElementwiseOps<CpuEngine>;

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("bce_with_logits", &Ops::bce_with_logits);
  m.impl("bce_with_logits_backward", &Ops::bce_with_logits_backward);
  m.impl("mse", &Ops::mse);
  m.impl("mse_backward", &Ops::mse_backward);
}

}  // namespace fusedloss::cpu
