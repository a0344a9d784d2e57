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

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) { register_elementwise_ops<Ops>(m); }

}  // namespace fusedloss::cpu
