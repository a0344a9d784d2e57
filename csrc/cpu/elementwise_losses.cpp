// CPU registrations of the elementwise losses (binary_cross_entropy_with_logits,
// mse_loss, hinge_embedding_loss, soft_margin_loss, the binary hinge): the
// shared host code of fusedloss/elementwise_ops.h run by the vectorized OpenMP
// engine of elementwise.h.

#include <torch/library.h>

#include <fusedloss/elementwise_ops.h>

#include "elementwise.h"

namespace fusedloss::cpu {
namespace {

using Ops = ElementwiseOps<Engine>;

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
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

}  // namespace fusedloss::cpu
