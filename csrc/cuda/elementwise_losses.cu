// CUDA registrations of the elementwise losses (binary_cross_entropy_with_logits,
// mse_loss, hinge_embedding_loss, soft_margin_loss, the binary hinge): the
// shared host code of fusedloss/elementwise_ops.h run by the engine of
// elementwise.cuh.

#include <torch/library.h>

#include <fusedloss/elementwise_ops.h>

#include "elementwise.cuh"

namespace fusedloss::cuda {
namespace {
using Ops = ElementwiseOps<CudaEngine>;
}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) { register_elementwise_ops<Ops>(m); }

}  // namespace fusedloss::cuda
