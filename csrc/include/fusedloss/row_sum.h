#pragma once
// Deterministic sums of per-row results (per-row losses, weights), run by the
// elementwise engine of either device: fixed-size partials added in a fixed
// order, on the device, with no host synchronization.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <fusedloss/elementwise_host.h>

namespace fusedloss {

// Passes N operands through, so that the engine's reduction sums each of
// them: (loss, weight) pairs of rows (a mean divides by the weight sum), or
// one vector.
template <typename acc_t, int N>
struct Sums {
  static constexpr int kIn = N;
  static constexpr int kOut = N;
  template <typename V>
  C10_HOST_DEVICE void operator()(const V* in, V* out) const {
    for (int k = 0; k < N; ++k) out[k] = in[k];
  }
};

// Deterministic device-side sum (or mean, the reduction) of `t` (1-D,
// accumulation dtype) into `out` (one value of any floating dtype).
template <typename ElementwiseEngine>
void sum_into(const at::Tensor& t, OutSlot out, int64_t reduction = kReductionSum) {
  ElementwiseCall c(t, opmath_type(t.scalar_type()));
  c.set(0, t);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "fusedloss_sum", [&] {
    ElementwiseEngine::template forward<scalar_t>(c, Sums<scalar_t, 1>{}, reduction, out, nullptr);
  });
}

template <typename ElementwiseEngine>
void sum_into(const at::Tensor& t, at::Tensor out, int64_t reduction = kReductionSum) {
  sum_into<ElementwiseEngine>(t, OutSlot{out.data_ptr(), out.scalar_type()}, reduction);
}

// The reduction of per-row losses with per-row weights (mean: sum of the
// losses over sum of the weights, which goes to *denominator when given).
template <typename ElementwiseEngine>
void sum_rows_into(const at::Tensor& loss_rows, const at::Tensor& weight_rows, int64_t reduction, at::Tensor& loss,
                   at::Tensor* denominator) {
  ElementwiseCall c(loss_rows, loss_rows.scalar_type());
  c.set(0, loss_rows);
  c.set(1, weight_rows);
  AT_DISPATCH_FLOATING_TYPES(loss_rows.scalar_type(), "fusedloss_sum_rows", [&] {
    ElementwiseEngine::template forward<scalar_t>(c, Sums<scalar_t, 2>{}, reduction, loss, denominator);
  });
}

}  // namespace fusedloss
