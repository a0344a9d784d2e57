#pragma once
// Allocation of the large outputs of fusedloss ops (per-element losses and
// gradients).

#include <ATen/core/Tensor.h>

namespace fusedloss {

// Like at::empty, except that on the CPU buffers of 1 MiB and more are
// recycled: see csrc/cpu/buffer_pool.cpp.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// t in `dtype`: t itself when it has it already (an output the engine stored in
// its final dtype, an fp32 grad_output, int64 targets). Tensor::to returns t
// then too, but after a trip through the dispatcher, a visible part of a small
// loss's call.
inline at::Tensor finish(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// The CPU buffer cache: release every cached buffer; bytes cached now.
void empty_cpu_cache();
int64_t cpu_cache_bytes();

}  // namespace fusedloss
