#pragma once
// Deterministic sums of per-row results (per-row losses, weights), run by the
// elementwise engine of either device: fixed-size partials added in a fixed
// order, on the device, with no host synchronization. Small CPU sums are
// added on the host instead (host_sums), also in a fixed order.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <fusedloss/dtypes.h>
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

// Up to this many CPU values are summed on the host (host_sums): below it the
// engine's set-up (operand layouts, a dispatch, a parallel region, ~0.25 us of
// a small loss's ~2 us call) costs more than the adds; the host loop's four
// chains of double adds take about as long at 1024 values.
constexpr int64_t kHostSumMax = 1024;

// Whether t is a small CPU sum's operand: contiguous, on the CPU, at most
// kHostSumMax values.
inline bool host_summable(const at::Tensor& t) {
  return t.is_cpu() && t.numel() <= kHostSumMax && t.is_contiguous();
}

// Sum of the n values at p in double: four interleaved chains (value i goes
// to chain i % 4), added as (c0 + c1) + (c2 + c3); a fixed order, so the same
// bits on every run and for any thread count.
template <typename acc_t>
double host_sum(const acc_t* p, int64_t n) {
  double c[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int k = 0; k < 4; ++k) c[k] += static_cast<double>(p[i + k]);
  for (int k = 0; i < n; ++i, ++k) c[k] += static_cast<double>(p[i]);
  return (c[0] + c[1]) + (c[2] + c[3]);
}

// The reduction of the n values at a (mean: over the sum of the n values at
// b when given, else over n) into `out` and, for a mean, the denominator into
// *denominator (when given), on the host.
template <typename acc_t>
void host_sums(const acc_t* a, const acc_t* b, int64_t n, int64_t reduction, OutSlot out, acc_t* denominator) {
  double sa = host_sum(a, n);
  if (reduction == kReductionMean) {
    const double denom = b != nullptr ? host_sum(b, n) : static_cast<double>(n);
    sa /= denom;  // 0/0 = NaN for an empty mean, as the engine
    if (denominator != nullptr) *denominator = static_cast<acc_t>(denom);
  }
  store_value<acc_t>(out.data, dtype_code(out.dtype), 0, static_cast<acc_t>(sa));
}

// Deterministic sum (or mean, the reduction) of `t` (1-D, accumulation dtype)
// into `out` (one value of any floating dtype): on the device, or on the host
// for a small CPU sum.
template <typename ElementwiseEngine>
void sum_into(const at::Tensor& t, OutSlot out, int64_t reduction = kReductionSum) {
  if (host_summable(t)) {
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "fusedloss_host_sum", [&] {
      host_sums<scalar_t>(t.const_data_ptr<scalar_t>(), nullptr, t.numel(), reduction, out, nullptr);
    });
    return;
  }
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
  if (host_summable(loss_rows) && host_summable(weight_rows) && weight_rows.numel() == loss_rows.numel() &&
      weight_rows.scalar_type() == loss_rows.scalar_type()) {
    AT_DISPATCH_FLOATING_TYPES(loss_rows.scalar_type(), "fusedloss_host_sum_rows", [&] {
      host_sums<scalar_t>(loss_rows.const_data_ptr<scalar_t>(), weight_rows.const_data_ptr<scalar_t>(),
                          loss_rows.numel(), reduction, OutSlot{loss.data_ptr(), loss.scalar_type()},
                          denominator != nullptr ? denominator->mutable_data_ptr<scalar_t>() : nullptr);
    });
    return;
  }
  ElementwiseCall c(loss_rows, loss_rows.scalar_type());
  c.set(0, loss_rows);
  c.set(1, weight_rows);
  AT_DISPATCH_FLOATING_TYPES(loss_rows.scalar_type(), "fusedloss_sum_rows", [&] {
    ElementwiseEngine::template forward<scalar_t>(c, Sums<scalar_t, 2>{}, reduction, loss, denominator);
  });
}

}  // namespace fusedloss
