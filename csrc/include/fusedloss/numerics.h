#pragma once
// The per-element math of every fusedloss loss, in one place.
//
// Each formula is a template over a value type V and uses only the primitives
// of Ops<V>. The CUDA kernels and the scalar CPU tails instantiate them with
// float/double (specialisations below); the vectorized CPU kernels instantiate
// the very same templates with at::vec::Vectorized<float/double>, whose Ops
// specialisation lives in csrc/cpu/vec_ops.h. So the CPU tests exercise the
// formulas the GPU runs.
//
// Values are always the accumulation type (float for fp16/bf16/fp32, double for
// fp64): inputs are widened on load and results narrowed on store.

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace fusedloss {

// The codes of at::Reduction, which torch.nn.functional passes to ATen.
enum Reduction : int64_t { kReductionNone = 0, kReductionMean = 1, kReductionSum = 2 };

namespace math {

template <typename V>
struct Ops;

// Scalar primitives. min/max propagate NaN like torch.minimum/clamp_min (the C
// fmin/fmax would drop it).
template <typename T>
struct ScalarOps {
  using V = T;
  using Mask = bool;
  C10_HOST_DEVICE static T exp(T x) { return ::exp(x); }
  C10_HOST_DEVICE static T log(T x) { return ::log(x); }
  C10_HOST_DEVICE static T log1p(T x) { return ::log1p(x); }
  C10_HOST_DEVICE static T tanh(T x) { return ::tanh(x); }
  C10_HOST_DEVICE static T abs(T x) { return ::fabs(x); }
  C10_HOST_DEVICE static T neg(T x) { return -x; }
  C10_HOST_DEVICE static T min(T a, T b) { return (a != a || a < b) ? a : b; }
  C10_HOST_DEVICE static T max(T a, T b) { return (a != a || a > b) ? a : b; }
  C10_HOST_DEVICE static Mask eq(T a, T b) { return a == b; }
  C10_HOST_DEVICE static Mask ne(T a, T b) { return a != b; }
  C10_HOST_DEVICE static Mask gt(T a, T b) { return a > b; }
  C10_HOST_DEVICE static Mask ge(T a, T b) { return a >= b; }
  C10_HOST_DEVICE static T where(Mask m, T a, T b) { return m ? a : b; }
};

template <>
struct Ops<double> : ScalarOps<double> {};

template <>
struct Ops<float> : ScalarOps<float> {
  // The float overloads of the C library (expf, ...) on host and device.
  C10_HOST_DEVICE static float exp(float x) { return ::expf(x); }
  C10_HOST_DEVICE static float log(float x) { return ::logf(x); }
  C10_HOST_DEVICE static float log1p(float x) { return ::log1pf(x); }
  C10_HOST_DEVICE static float tanh(float x) { return ::tanhf(x); }
  C10_HOST_DEVICE static float abs(float x) { return ::fabsf(x); }
};

// ---------------------------------------------------------------------------
// Sigmoid family
// ---------------------------------------------------------------------------

// log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)): finite for every finite x
// (the naive log(1/(1+exp(-x))) overflows for x < -88 in fp32). Same form as
// ATen's log_sigmoid, so special values (+-inf, NaN) agree with torch.
template <typename V>
C10_HOST_DEVICE inline V log_sigmoid(V x) {
  using O = Ops<V>;
  return O::min(x, V(0)) - O::log1p(O::exp(O::neg(O::abs(x))));
}

// softplus(z) = log(1 + exp(z)) = -log_sigmoid(-z), stable for large z.
template <typename V>
C10_HOST_DEVICE inline V softplus(V z) {
  using O = Ops<V>;
  return O::max(z, V(0)) + O::log1p(O::exp(O::neg(O::abs(z))));
}

template <typename V>
C10_HOST_DEVICE inline V sigmoid(V x) {
  using O = Ops<V>;
  return V(1) / (V(1) + O::exp(O::neg(x)));
}

// ---------------------------------------------------------------------------
// binary_cross_entropy_with_logits
//   loss = (1 - y) x - lw * log_sigmoid(x),  lw = 1 + (pos_weight - 1) y
// then times weight. With pos_weight == 1, lw is exactly 1, so pos_weight=ones
// gives bit-identical results to pos_weight=None.
// ---------------------------------------------------------------------------

template <typename V>
C10_HOST_DEVICE inline V bce_log_weight(V y, V pos_weight) {
  return V(1) + (pos_weight - V(1)) * y;
}

template <typename V>
C10_HOST_DEVICE inline V bce_logits_loss(V x, V y, V lw) {
  return (V(1) - y) * x - lw * log_sigmoid(x);
}

// d loss / d x = lw * sigmoid(x) - pos_weight * y
template <typename V>
C10_HOST_DEVICE inline V bce_logits_grad_input(V x, V y, V pos_weight, V lw) {
  return lw * sigmoid(x) - pos_weight * y;
}

// d loss / d y = -x - (pos_weight - 1) * log_sigmoid(x)
template <typename V>
C10_HOST_DEVICE inline V bce_logits_grad_target(V x, V pos_weight) {
  return Ops<V>::neg(x) - (pos_weight - V(1)) * log_sigmoid(x);
}

// ---------------------------------------------------------------------------
// mse_loss: (x - y)^2, d/dx = 2 (x - y), d/dy = -2 (x - y)
// ---------------------------------------------------------------------------

template <typename V>
C10_HOST_DEVICE inline V squared_error(V x, V y) {
  V d = x - y;
  return d * d;
}

template <typename V>
C10_HOST_DEVICE inline V squared_error_grad(V x, V y) {
  return V(2) * (x - y);
}

}  // namespace math
}  // namespace fusedloss
