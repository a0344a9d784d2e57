// CPU registration of sigmoid_focal_loss: the shared host code of
// fusedloss/focal_host.h run by the vectorized OpenMP elementwise engine.

#include <torch/library.h>

#include <fusedloss/focal_host.h>

#include "elementwise.h"

namespace fusedloss::cpu {
namespace {
using Ops = SigmoidFocalOps<Engine>;
}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) { register_sigmoid_focal_ops<Ops>(m); }

}  // namespace fusedloss::cpu
