#pragma once
// Deterministic sums of per-row results (per-row losses, weights), run by the
// elementwise engine of either device: fixed-size partials added in a fixed
// order, on the device, with no host synchronization.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <fusedloss/elementwise_host.h>

namespace fusedloss {

// Sum of the per-row (loss, weight) pairs: a mean divides by the weight sum.
template <typename acc_t>
struct RowSum {
  static constexpr int kIn = 2;
  static constexpr int kOut = 2;
  template <typename V>
  C10_HOST_DEVICE void operator()(const V* in, V* out) const {
    out[0] = in[0];
    out[1] = in[1];
  }
};

template <typename acc_t>
struct Identity {
  static constexpr int kIn = 1;
  static constexpr int kOut = 1;
  template <typename V>
  C10_HOST_DEVICE void operator()(const V* in, V* out) const {
    out[0] = in[0];
  }
};

// Deterministic device-side sum (or mean, the reduction) of `t` (1-D,
// accumulation dtype) into `out` (0-d, same dtype; may be a view).
template <typename ElementwiseEngine>
void sum_into(const at::Tensor& t, at::Tensor out, int64_t reduction = kReductionSum) {
  ElementwiseCall c(t);
  c.set(0, t);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "fusedloss_sum", [&] {
    ElementwiseEngine::template forward<scalar_t>(c, Identity<scalar_t>{}, reduction, out, nullptr);
  });
}

}  // namespace fusedloss
