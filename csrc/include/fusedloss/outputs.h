#pragma once
// Allocation of the large outputs of fusedloss ops (per-element losses and
// gradients).

#include <ATen/core/Tensor.h>

namespace fusedloss {

// Like at::empty, except that on the CPU buffers of 1 MiB and more are
// recycled: see csrc/cpu/buffer_pool.cpp.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// The CPU buffer cache: release every cached buffer; bytes cached now.
void empty_cpu_cache();
int64_t cpu_cache_bytes();

}  // namespace fusedloss
