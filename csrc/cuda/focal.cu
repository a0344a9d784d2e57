// CUDA registration of sigmoid_focal_loss: the shared host code of
// fusedloss/focal_host.h run by the elementwise engine of elementwise.cuh
// (16-byte packs, per-block partials summed in a fixed order).

#include <torch/library.h>

#include <fusedloss/focal_host.h>

#include "elementwise.cuh"

namespace fusedloss::cuda {
namespace {
using Ops = SigmoidFocalOps<CudaEngine>;
}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) { register_sigmoid_focal_ops<Ops>(m); }

}  // namespace fusedloss::cuda
