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
#include <limits>

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
  static constexpr bool kWide = sizeof(T) == 8;  // fp64 math
  C10_HOST_DEVICE static T exp(T x) { return ::exp(x); }
  // exp for softmax sums and probabilities, where a few ulp do not matter
  // (see the float specialisation).
  C10_HOST_DEVICE static T exp_fast(T x) { return ::exp(x); }
  C10_HOST_DEVICE static T log(T x) { return ::log(x); }
  C10_HOST_DEVICE static T log1p(T x) { return ::log1p(x); }
  C10_HOST_DEVICE static T expm1(T x) { return ::expm1(x); }
  C10_HOST_DEVICE static T tanh(T x) { return ::tanh(x); }
  C10_HOST_DEVICE static T pow(T x, T y) { return ::pow(x, y); }
  C10_HOST_DEVICE static T abs(T x) { return ::fabs(x); }
  C10_HOST_DEVICE static T neg(T x) { return -x; }
  C10_HOST_DEVICE static T min(T a, T b) { return (a != a || a < b) ? a : b; }
  C10_HOST_DEVICE static T max(T a, T b) { return (a != a || a > b) ? a : b; }
  C10_HOST_DEVICE static Mask eq(T a, T b) { return a == b; }
  C10_HOST_DEVICE static Mask ne(T a, T b) { return a != b; }
  C10_HOST_DEVICE static Mask gt(T a, T b) { return a > b; }
  C10_HOST_DEVICE static Mask lt(T a, T b) { return a < b; }
  C10_HOST_DEVICE static Mask ge(T a, T b) { return a >= b; }
  C10_HOST_DEVICE static T where(Mask m, T a, T b) { return m ? a : b; }
};

template <>
struct Ops<double> : ScalarOps<double> {};

template <>
struct Ops<float> : ScalarOps<float> {
  // The float overloads of the C library (expf, ...) on host and device.
  C10_HOST_DEVICE static float exp(float x) { return ::expf(x); }
  // On the GPU the multi-function unit's exp2 (__expf: 2 + 1.2 |x| ulp): the
  // accurate expf costs ~10x the instructions, and cross entropy at vocabulary
  // sizes is then bound by them rather than by memory.
  C10_HOST_DEVICE static float exp_fast(float x) {
#if defined(__CUDA_ARCH__)
    return __expf(x);
#else
    return ::expf(x);
#endif
  }
  C10_HOST_DEVICE static float log(float x) { return ::logf(x); }
  C10_HOST_DEVICE static float log1p(float x) { return ::log1pf(x); }
  C10_HOST_DEVICE static float expm1(float x) { return ::expm1f(x); }
  C10_HOST_DEVICE static float tanh(float x) { return ::tanhf(x); }
  C10_HOST_DEVICE static float pow(float x, float y) { return ::powf(x, y); }
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


// ---------------------------------------------------------------------------
// Cross entropy (softmax + NLL). One "row" is one distribution over C classes.
//
// A row is summarised, in one pass, by its running max m, s = sum_c exp(x_c - m),
// and for the options that need them mass = sum_c f_c and rel = sum_c f_c (x_c - m),
// where f_c = w_c p'_c for probability targets (p' = (1 - eps) p + eps/C) and
// f_c = w_c for smoothed class-index targets (w = 1 when unweighted). The
// backward keeps m and ls = log(s) apart: exp((x - m) - ls) stays accurate for
// logits of large magnitude, where x - lse in fp32 would not (ulp(1e4) ~ 1e-3).
// Likewise rel is kept relative to the running max.
//
// Per-row loss, z = lse_square_scale, W = sum_c w_c, lse = m + ls:
//   class index t:   (1 - eps) w_t ((m - x_t) + ls) + eps/C (W ls - rel) + w_t z lse^2
//   probabilities:   mass ls - rel + z lse^2
// which is ATen's cross_entropy (cross_entropy_loss_label_smoothing and
// cross_entropy_loss_prob_target in LossNLL.cpp) plus the z-loss term.
// Gradient w.r.t. the (capped) logit c, with g the row's grad_output already
// divided by the mean's denominator and q_c = exp((x_c - m) - ls):
//   class index t:   g (q_c a - (1 - eps) w_t [c == t] - eps/C w_c),
//                    a = (1 - eps) w_t + eps/C W + 2 z lse w_t
//                    (the target's own entry rewritten without cancellation:
//                    ce_index_target_grad)
//   probabilities:   g (q_c a - w_c p'_c),  a = mass + 2 z lse
// ---------------------------------------------------------------------------

template <typename T>
struct RowState {
  T max;   // running max; -inf while only -inf logits were seen
  T sum;   // sum exp(x - max)
  T mass;  // sum f
  T rel;   // sum f (x - max)
};

template <typename T>
C10_HOST_DEVICE inline RowState<T> row_state_empty() {
  return {-std::numeric_limits<T>::infinity(), T(0), T(0), T(0)};
}

// Moves the reference of st to m >= st.max (NaN m poisons the row).
template <typename T>
C10_HOST_DEVICE inline void row_rebase(RowState<T>& st, T m) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  if (!(m > st.max) && m == m) return;
  if (st.max != kNegInf) {
    // exp(-inf - -inf) would be NaN: an all -inf prefix has sum 0 and rel
    // made of -inf terms measured from nothing, so it has no reference to move.
    st.sum = st.sum * Ops<T>::exp_fast(st.max - m);
    if (st.mass != T(0)) st.rel = st.rel - (m - st.max) * st.mass;
  }
  st.max = m;
}

// Adds logit x (<= st.max after row_rebase) with option factor f.
template <typename T>
C10_HOST_DEVICE inline void row_add(RowState<T>& st, T x, T f, bool with_f) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  if (st.max != kNegInf) {
    st.sum = st.sum + Ops<T>::exp_fast(x - st.max);
    if (with_f) st.rel = st.rel + f * (x - st.max);
  } else if (with_f) {
    st.rel = st.rel + f * x;  // x is -inf here
  }
  if (with_f) st.mass = st.mass + f;
}

template <typename T>
C10_HOST_DEVICE inline void row_push(RowState<T>& st, T x, T f, bool with_f) {
  row_rebase(st, x);
  row_add(st, x, f, with_f);
}

template <typename T>
C10_HOST_DEVICE inline RowState<T> row_merge(RowState<T> a, RowState<T> b) {
  const T m = Ops<T>::max(a.max, b.max);
  row_rebase(a, m);
  row_rebase(b, m);
  return {m, a.sum + b.sum, a.mass + b.mass, a.rel + b.rel};
}

// softcap: s * tanh(x / s), and its derivative 1 - tanh^2 from the capped value.
template <typename V>
C10_HOST_DEVICE inline V softcap_value(V x, V cap, V inv_cap) {
  return cap * Ops<V>::tanh(x * inv_cap);
}

template <typename V>
C10_HOST_DEVICE inline V softcap_slope(V capped, V inv_cap) {
  const V t = capped * inv_cap;
  return V(1) - t * t;
}

// Options of one cross entropy call, as the kernels see them.
template <typename T>
struct CeOptions {
  int64_t num_classes;
  int64_t ignore_index;
  T smoothing;   // eps, 0 when off (torch treats eps <= 0 as off)
  T z_loss;      // lse_square_scale
  T weight_sum;  // W = sum_c w_c (C when unweighted)
};

// Loss of a row with a class-index target (already known valid and not ignored).
template <typename T>
C10_HOST_DEVICE inline T ce_index_loss(T m, T ls, T rel, T x_t, T w_t, const CeOptions<T>& o) {
  T loss = w_t * ((m - x_t) + ls);
  if (o.smoothing > T(0)) {
    const T smooth = o.weight_sum * ls - rel;
    loss = (T(1) - o.smoothing) * loss + o.smoothing / T(o.num_classes) * smooth;
  }
  if (o.z_loss != T(0)) {
    const T lse = m + ls;
    loss += w_t * o.z_loss * lse * lse;
  }
  return loss;
}

// Coefficient a of q_c in the gradient of a class-index row.
template <typename T>
C10_HOST_DEVICE inline T ce_index_grad_scale(T lse, T w_t, const CeOptions<T>& o) {
  T a = (T(1) - o.smoothing) * w_t + o.smoothing / T(o.num_classes) * o.weight_sum;
  if (o.z_loss != T(0)) a += T(2) * o.z_loss * lse * w_t;
  return a;
}

template <typename T>
C10_HOST_DEVICE inline T ce_smoothed_target(T p, const CeOptions<T>& o) {
  return o.smoothing > T(0) ? (T(1) - o.smoothing) * p + o.smoothing / T(o.num_classes) : p;
}

template <typename T>
C10_HOST_DEVICE inline T ce_prob_loss(T m, T ls, T mass, T rel, const CeOptions<T>& o) {
  T loss = mass * ls - rel;
  if (o.z_loss != T(0)) {
    const T lse = m + ls;
    loss += o.z_loss * lse * lse;
  }
  return loss;
}

template <typename T>
C10_HOST_DEVICE inline T ce_prob_grad_scale(T lse, T mass, const CeOptions<T>& o) {
  return o.z_loss != T(0) ? mass + T(2) * o.z_loss * lse : mass;
}

// A row's gradient coefficients, g already divided by the mean's denominator:
//   d loss / d x_c = ga q_c - m_scale f_c
// with f_c = w_c p'_c (probabilities) or w_c (class indices; 1 when unweighted),
// for every class but a class-index target's own (ce_index_target_grad).
template <typename T>
struct CeGradCoefs {
  T ga;       // g a
  T m_scale;  // g (probabilities) or g eps / C (class indices)
};

template <typename T>
C10_HOST_DEVICE inline CeGradCoefs<T> ce_index_grad_coefs(T g, T lse, T w_t, const CeOptions<T>& o) {
  return {g * ce_index_grad_scale(lse, w_t, o), g * o.smoothing / T(o.num_classes)};
}

template <typename T>
C10_HOST_DEVICE inline CeGradCoefs<T> ce_prob_grad_coefs(T g, T lse, T mass, const CeOptions<T>& o) {
  return {g * ce_prob_grad_scale(lse, mass, o), g};
}

// The gradient of a class-index target's own logit,
//   g ((eps/C) (W q_t - w_t) + 2 z lse w_t q_t - (1 - eps) w_t s_other),
// from s_other = sum_{c != t} q_c (= 1 - q_t), summed over the other classes.
// The general formula's g a q_t - (1 - eps) w_t g cancels where the target takes
// nearly all the probability (q_t within an ulp of 1 leaves only rounding), and
// leaves rounding noise where the exact gradient is 0 (one class, smoothed);
// this form has neither cancellation.
template <typename T>
C10_HOST_DEVICE inline T ce_index_target_grad(T g, T q_t, T s_other, T lse, T w_t, const CeOptions<T>& o) {
  T d = -(T(1) - o.smoothing) * w_t * s_other;
  if (o.smoothing > T(0)) d += o.smoothing / T(o.num_classes) * (o.weight_sum * q_t - w_t);
  if (o.z_loss != T(0)) d += T(2) * o.z_loss * lse * w_t * q_t;
  return g * d;
}

// d loss / d p_c of a probability target: g (1 - eps) w_c (lse - x_c).
template <typename T>
C10_HOST_DEVICE inline T ce_target_grad(T g, T w_c, T m, T ls, T x, const CeOptions<T>& o) {
  return g * (T(1) - o.smoothing) * w_c * ((m - x) + ls);
}


// ---------------------------------------------------------------------------
// Margin losses
// ---------------------------------------------------------------------------

// hinge_embedding_loss, as torch's composite: targets other than +-1 take both
// terms; clamp_min propagates NaN, and its gradient is 0 at NaN and, at the kink
// margin - x == 0, what the installed torch's clamp gives (`at_kink`: 1 before
// torch 2.14, 0 since).
//   loss = (y != 1 ? max(margin - x, 0) : 0) + (y != -1 ? x : 0)
//   d/dx = (y != 1 ? -[margin - x > 0] : 0) + (y != -1 ? 1 : 0)
template <typename V>
C10_HOST_DEVICE inline V hinge_embedding(V x, V y, V margin) {
  using O = Ops<V>;
  return O::where(O::ne(y, V(1)), O::max(margin - x, V(0)), V(0)) + O::where(O::ne(y, V(-1)), x, V(0));
}

// [z > 0], or [z >= 0] when at_kink: where torch.clamp(z, min=0) passes its gradient.
template <typename V>
C10_HOST_DEVICE inline typename Ops<V>::Mask clamp_active(V z, bool at_kink) {
  using O = Ops<V>;
  return at_kink ? O::ge(z, V(0)) : O::gt(z, V(0));
}

template <typename V>
C10_HOST_DEVICE inline V hinge_embedding_grad(V x, V y, V margin, bool at_kink) {
  using O = Ops<V>;
  const V clamp_slope = O::where(clamp_active(margin - x, at_kink), V(-1), V(0));
  return O::where(O::ne(y, V(1)), clamp_slope, V(0)) + O::where(O::ne(y, V(-1)), V(1), V(0));
}

// soft_margin_loss in the stable softplus form: log(1 + exp(-y x)) without
// overflow (torch's log1p(exp(.)) is inf beyond -y x ~ 88 in fp32).
//   d/dx = -y sigmoid(-y x)
template <typename V>
C10_HOST_DEVICE inline V soft_margin(V x, V y) {
  return softplus(Ops<V>::neg(y * x));
}

template <typename V>
C10_HOST_DEVICE inline V soft_margin_grad(V x, V y) {
  return Ops<V>::neg(y) * sigmoid(Ops<V>::neg(y * x));
}

// Binary (SVM) hinge: h = max(0, margin - y x) (NaN-propagating, as
// torch.clamp), loss h or h^2. dh/dx = -y [margin - y x > 0], dh/dy = -x [...]
// (torch.clamp's gradient: 0 at NaN; at the kink, see clamp_active).
template <typename V>
C10_HOST_DEVICE inline V hinge_residual(V x, V y, V margin) {
  return Ops<V>::max(margin - y * x, V(0));
}

// d loss / d (margin - y x): [z > 0], times 2 z when squared.
template <typename V>
C10_HOST_DEVICE inline V hinge_slope(V x, V y, V margin, bool squared, bool at_kink) {
  using O = Ops<V>;
  const V z = margin - y * x;
  return O::where(clamp_active(z, at_kink), squared ? V(2) * z : V(1), V(0));
}

// multi_margin_loss term of class i against the target class: z = margin - x_t + x_i,
// counted only where z > 0 (as torch's kernels: a NaN z counts nothing).
template <typename V>
C10_HOST_DEVICE inline V multi_margin_term(V z, int64_t p) {
  using O = Ops<V>;
  return O::where(O::gt(z, V(0)), p == 1 ? z : z * z, V(0));
}

template <typename V>
C10_HOST_DEVICE inline V multi_margin_grad_term(V z, int64_t p) {
  using O = Ops<V>;
  return O::where(O::gt(z, V(0)), p == 1 ? V(1) : V(2) * z, V(0));
}

// ---------------------------------------------------------------------------
// Vocabulary-parallel cross entropy (fusedloss/distributed.py): the classes of
// a row are split over the ranks of a process group. Each rank summarises its
// slice as a RowState whose sum leaves out the target's own term
// (row_push_except_sum), all ranks take the MAX of the maxes, rebase their
// states to it (row_rebase) and SUM them, so that every rank holds, per row,
// the global max M, S_other = sum_{c != t} exp(x_c - M), rel and x_t. Then
//   S = S_other + exp(x_t - M),  ls = log S,  s_other = S_other / S,
// the loss is ce_index_loss and the target's gradient ce_index_target_grad with
// this s_other: summed, over every rank's classes, without the cancellation of
// 1 - q_t, and without a collective in the backward.
// ---------------------------------------------------------------------------

// Adds logit x to the max, rel and mass of a row, but not to its sum of
// exponentials (the target's own term; x may be the row's largest logit, so it
// moves the reference like any other).
template <typename T>
C10_HOST_DEVICE inline void row_push_except_sum(RowState<T>& st, T x, T f, bool with_f) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  row_rebase(st, Ops<T>::max(st.max, x));
  if (with_f) {
    st.rel = st.rel + f * (st.max != kNegInf ? x - st.max : x);
    st.mass = st.mass + f;
  }
}

// A row's log-sum-exp and the other classes' share of the probability, from
// the global max m, S_other and the target's logit x_t. m >= x_t, so exp(x_t -
// m) <= 1; S >= 1 whenever m is finite (the largest logit contributes 1).
template <typename T>
struct VpRowStats {
  T ls;       // log(sum_c exp(x_c - m))
  T s_other;  // sum_{c != t} q_c
};

template <typename T>
C10_HOST_DEVICE inline VpRowStats<T> vp_row_stats(T m, T s_other_sum, T x_t) {
  const T s = s_other_sum + Ops<T>::exp(x_t - m);
  return {Ops<T>::log(s), s_other_sum / s};
}

// ---------------------------------------------------------------------------
// Sigmoid focal loss (torchvision.ops.sigmoid_focal_loss, RetinaNet):
//   ce  = ((1 - y) x - min(x, 0)) + log1p(exp(-|x|))    (BCE with logits)
//   u   = 1 - p_t = p (1 - y) + (1 - p) y,  p = sigmoid(x)
//   loss = a_t ce u^gamma,  a_t = alpha y + (1 - alpha)(1 - y)  (1 when alpha < 0)
// u is formed from sigmoid(x) and sigmoid(-x) separately, both accurate: 1 - p_t
// as torchvision writes it rounds to 0 once p rounds to 1 (x > 17 in fp32).
// ce is ATen's (1 - y) x - log_sigmoid(x) grouped so that (1 - y) x - min(x, 0)
// cancels exactly: ATen's form rounds ce = log1p(exp(x)) to 0 for y = 0 and
// x < -17 in fp32 (and for y = 1, x > 17 symmetrically it was already exact);
// the NaN/inf cases (x = -inf; x = +inf with y = 1) are ATen's.
// Gradients, with p q = sigmoid'(x), q = 1 - p:
//   d/dx = a_t [((1 - y) p - y q) u^gamma + ce gamma u^(gamma - 1) p q (1 - 2y)]
//   d/dy = (2 alpha - 1) ce u^gamma + a_t [-x u^gamma + ce gamma u^(gamma - 1) (q - p)]
// ((1 - y) p - y q is p - y without the cancellation where p is near y.)
// gamma u^(gamma - 1) is 0 for gamma == 0, as torch.pow's gradient.
// ---------------------------------------------------------------------------

// exp(-|x|), from which log_sigmoid(x), log_sigmoid(-x), sigmoid(x) and
// sigmoid(-x) all follow: the sigmoid losses below pay one exp per element.
template <typename V>
C10_HOST_DEVICE inline V exp_neg_abs(V x) {
  using O = Ops<V>;
  return O::exp(O::neg(O::abs(x)));
}

// log_sigmoid(x) from l1 = log1p(exp(-|x|)): ATen's form, so +-inf and NaN
// come out as torch's.
template <typename V>
C10_HOST_DEVICE inline V log_sigmoid_from(V x, V l1) {
  return Ops<V>::min(x, V(0)) - l1;
}

// sigmoid(x) and sigmoid(-x) from e = exp(-|x|), each to full relative accuracy.
template <typename V>
struct SigmoidPair {
  V p;  // sigmoid(x)
  V q;  // sigmoid(-x) = 1 - sigmoid(x)
};

template <typename V>
C10_HOST_DEVICE inline SigmoidPair<V> sigmoid_pair(V x, V e) {
  using O = Ops<V>;
  const V r = V(1) / (V(1) + e);  // sigmoid(|x|)
  const V s = e * r;              // sigmoid(-|x|)
  const auto pos = O::ge(x, V(0));
  return {O::where(pos, r, s), O::where(pos, s, r)};
}

template <typename V>
C10_HOST_DEVICE inline V focal_alpha_t(V y, V alpha) {
  return (V(1) - alpha) + (V(2) * alpha - V(1)) * y;
}

// u^gamma; `square` when gamma == 2 (torchvision's default), exactly u * u as torch.pow.
template <typename V>
C10_HOST_DEVICE inline V focal_modulator(V u, V gamma, bool square) {
  return square ? u * u : Ops<V>::pow(u, gamma);
}

// d u^gamma / du = gamma u^(gamma - 1), 0 for gamma == 0 (torch.pow's gradient).
template <typename V>
C10_HOST_DEVICE inline V focal_modulator_slope(V u, V gamma, bool square, bool zero_gamma) {
  if (square) return V(2) * u;
  if (zero_gamma) return V(0);
  return gamma * Ops<V>::pow(u, gamma - V(1));
}

// BCE with logits from e = exp(-|x|), grouped as above.
template <typename V>
C10_HOST_DEVICE inline V focal_bce(V x, V y, V e) {
  using O = Ops<V>;
  return ((V(1) - y) * x - O::min(x, V(0))) + O::log1p(e);
}

template <typename V>
C10_HOST_DEVICE inline V sigmoid_focal(V x, V y, V alpha, bool has_alpha, V gamma, bool square) {
  const V e = exp_neg_abs(x);
  const V ce = focal_bce(x, y, e);
  const SigmoidPair<V> s = sigmoid_pair(x, e);
  const V u = s.p * (V(1) - y) + s.q * y;
  const V loss = ce * focal_modulator(u, gamma, square);
  return has_alpha ? focal_alpha_t(y, alpha) * loss : loss;
}

// Gradients of sigmoid_focal (times nothing: the caller scales by grad_output).
// The target's is computed only when want_y.
template <typename V>
C10_HOST_DEVICE inline void sigmoid_focal_grads(V x, V y, V alpha, bool has_alpha, V gamma, bool square,
                                                bool zero_gamma, bool want_y, V* dx, V* dy) {
  using O = Ops<V>;
  const V e = exp_neg_abs(x);
  const V ce = focal_bce(x, y, e);
  const SigmoidPair<V> s = sigmoid_pair(x, e);
  const V u = s.p * (V(1) - y) + s.q * y;
  const V m = focal_modulator(u, gamma, square);
  const V ce_dm = ce * focal_modulator_slope(u, gamma, square, zero_gamma);
  const V a_t = has_alpha ? focal_alpha_t(y, alpha) : V(1);
  *dx = a_t * (((V(1) - y) * s.p - y * s.q) * m + ce_dm * (s.p * s.q) * (V(1) - V(2) * y));
  if (want_y) {
    V d = a_t * (O::neg(x) * m + ce_dm * (s.q - s.p));
    if (has_alpha) d = d + (V(2) * alpha - V(1)) * ce * m;
    *dy = d;
  }
}

// ---------------------------------------------------------------------------
// multilabel_soft_margin_loss, per element, exactly torch's composite
//   -(y log_sigmoid(x) + (1 - y) log_sigmoid(-x))
// (not the BCE form (1 - y) x - log_sigmoid(x): the two differ at x = -inf,
// where torch gives inf and the BCE form NaN). One exp and one log1p serve
// both log_sigmoids. Gradients:
//   d/dx = (1 - y) sigmoid(x) - y sigmoid(-x),   d/dy = -(log_sigmoid(x) - log_sigmoid(-x))
// ---------------------------------------------------------------------------

template <typename V>
C10_HOST_DEVICE inline V multilabel_soft_margin(V x, V y) {
  using O = Ops<V>;
  const V l1 = O::log1p(exp_neg_abs(x));
  return O::neg(y * log_sigmoid_from(x, l1) + (V(1) - y) * log_sigmoid_from(O::neg(x), l1));
}

template <typename V>
C10_HOST_DEVICE inline V multilabel_soft_margin_grad_input(V x, V y) {
  const SigmoidPair<V> s = sigmoid_pair(x, exp_neg_abs(x));
  return (V(1) - y) * s.p - y * s.q;
}

template <typename V>
C10_HOST_DEVICE inline V multilabel_soft_margin_grad_target(V x) {
  using O = Ops<V>;
  const V l1 = O::log1p(exp_neg_abs(x));
  return O::neg(log_sigmoid_from(x, l1) - log_sigmoid_from(O::neg(x), l1));
}

// ---------------------------------------------------------------------------
// Distillation on logits: a row holds a teacher's and a student's logits over
// the same classes, already divided by the temperature T. With P = softmax of
// one row and Q = softmax of the other:
//   KL(P || Q)            = sum_c P_c (log P_c - log Q_c)
//   JSD_beta(P, Q)        = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q
// (terms with P_c = 0 count 0: 0 log 0 = 0, so masked classes, logit -inf,
// contribute nothing; a class masked in Q but not in P makes KL(P || Q) +inf).
// The losses are T^2 times these.
//
// KL in one pass, both log-sum-exps online: with running maxima mp, mq,
//   sp = sum exp(a - mp),  sq = sum exp(b - mq),  w = sum exp(a - mp) d,
//   d = (a - mp) - (b - mq),
//   KL = w / sp + log(sq) - log(sp)
// where the maxima cancel exactly (no lse_p - lse_q cancellation at large
// logits). Rebasing mp by D scales sp and w by exp(-D) and lowers every d by D;
// rebasing mq by D raises every d by D.
// Gradients (per unit of the T^2-scaled loss, logits before dividing by T):
//   d/db_c (the Q logits) = T (Q_c - P_c)
//   d/da_c (the P logits) = T P_c (log P_c - log Q_c - KL) = T P_c (d_c - w / sp)
// ---------------------------------------------------------------------------

template <typename T>
struct KlState {
  T mp, sp;  // P row: running max and sum exp(a - mp)
  T mq, sq;  // Q row: the same
  T w;       // sum exp(a - mp) ((a - mp) - (b - mq))
};

template <typename T>
C10_HOST_DEVICE inline KlState<T> kl_state_empty() {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  return {kNegInf, T(0), kNegInf, T(0), T(0)};
}

// The reference a row's values are measured from: its max, or 0 while only
// -inf was seen (then every exp is 0, and a -inf Q logit gives d = +inf, as it
// should wherever P has mass).
template <typename T>
C10_HOST_DEVICE inline T kl_ref(T m) {
  return m == -std::numeric_limits<T>::infinity() ? T(0) : m;
}

// Moves the P reference to m >= st.mp (NaN poisons the row).
template <typename T>
C10_HOST_DEVICE inline void kl_rebase_p(KlState<T>& st, T m) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  if (!(m > st.mp) && m == m) return;
  if (st.mp != kNegInf) {
    const T scale = Ops<T>::exp_fast(st.mp - m);
    if (st.sp != T(0)) st.w = (st.w - (m - st.mp) * st.sp) * scale;
    st.sp = st.sp * scale;
  }
  st.mp = m;
}

template <typename T>
C10_HOST_DEVICE inline void kl_rebase_q(KlState<T>& st, T m) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  if (!(m > st.mq) && m == m) return;
  if (st.mq != kNegInf) {
    st.sq = st.sq * Ops<T>::exp_fast(st.mq - m);
    if (st.sp != T(0)) st.w = st.w + (m - st.mq) * st.sp;
  }
  st.mq = m;
}

// A term of w from ea = exp(a - ref_p), ar = a - ref_p, br = b - ref_q: 0 where P has no mass.
template <typename V>
C10_HOST_DEVICE inline V kl_w_term(V ea, V ar, V br) {
  using O = Ops<V>;
  return O::where(O::gt(ea, V(0)), ea * (ar - br), V(0));
}

// A class's forward terms from ar = a - ref_p, br = b - ref_q: its exps in
// both rows and its term of w. (The CPU's vector loops and kl_add both.)
template <typename V>
C10_HOST_DEVICE inline void kl_class_terms(V ar, V br, V* ea, V* eb, V* wt) {
  *ea = Ops<V>::exp_fast(ar);
  *eb = Ops<V>::exp_fast(br);
  *wt = kl_w_term(*ea, ar, br);
}

// Adds one class (a <= st.mp, b <= st.mq after the rebases).
template <typename T>
C10_HOST_DEVICE inline void kl_add(KlState<T>& st, T a, T b) {
  T ea, eb, wt;
  kl_class_terms(a - kl_ref(st.mp), b - kl_ref(st.mq), &ea, &eb, &wt);
  st.sp = st.sp + ea;
  st.sq = st.sq + eb;
  st.w = st.w + wt;
}

template <typename T>
C10_HOST_DEVICE inline void kl_push(KlState<T>& st, T a, T b) {
  kl_rebase_p(st, a);
  kl_rebase_q(st, b);
  kl_add(st, a, b);
}

template <typename T>
C10_HOST_DEVICE inline KlState<T> kl_merge(KlState<T> x, KlState<T> y) {
  const T mp = Ops<T>::max(x.mp, y.mp), mq = Ops<T>::max(x.mq, y.mq);
  kl_rebase_p(x, mp);
  kl_rebase_p(y, mp);
  kl_rebase_q(x, mq);
  kl_rebase_q(y, mq);
  return {mp, x.sp + y.sp, mq, x.sq + y.sq, x.w + y.w};
}

// What a row keeps for its backward (and JSD's second sweep): the maxima, the
// sums of exps, two KL values, and c = (mp - mq) - log(sq / sp), so that
// log Q_c - log P_c = (b_c - a_c) + c. Probabilities are exp(a - mp) / sp:
// exp((a - mp) - log sp) would carry the rounding of log sp (~1e-7 log C, the
// same for the whole row) into every P_c and into the sums the gradients
// subtract. The per-class log ratios are formed from t = log Q_c - log P_c
// for the same reason, with c kept to double precision as a pair
// (c + c_lo): where P_c is near Q_c, t is a small difference of b - a and c.
template <typename T>
struct DistillRow {
  T mp, mq, sp, sq;
  T k1, k2;  // KL: w / sp and KL(P || Q); JSD: KL(P || M) and KL(Q || M)
  T c, c_lo;
};

// The row's saved values from its state (computed in double, once per row;
// S is the state's type, double on the CPU, whose blocks add in double).
template <typename T, typename S>
C10_HOST_DEVICE inline DistillRow<T> kl_finish(const KlState<S>& st) {
  const double sp = st.sp, sq = st.sq;
  const double lr = ::log(sq / sp);
  const double wbar = static_cast<double>(st.w) / sp;
  const double c = (static_cast<double>(st.mp) - static_cast<double>(st.mq)) - lr;
  const T c_hi = static_cast<T>(c);
  return {static_cast<T>(st.mp), static_cast<T>(st.mq), static_cast<T>(sp), static_cast<T>(sq),
          static_cast<T>(wbar),  static_cast<T>(wbar + lr), c_hi, static_cast<T>(c - static_cast<double>(c_hi))};
}

// log Q_c - log P_c from the scaled logits a, b: (b - a) is exact for logits
// of one dtype, and adding c in two parts keeps t exact to its own rounding.
template <typename V>
C10_HOST_DEVICE inline V distill_log_ratio(V a, V b, const DistillRow<V>& r) {
  return ((b - a) + r.c) + r.c_lo;
}

// expm1(x) for |x| <= kExpm1Poly: in fp32 math Taylor to x^7 / 7! (relative
// error below 1e-9 there; beyond, exp(x) - 1 loses at most ~4.5 ulp, so callers
// switch to it), in fp64 math the library's. Sleef's fp32 vector expm1 costs
// several exps; this is 7 multiply-adds.
constexpr double kExpm1Poly = 0.25;

template <typename V>
C10_HOST_DEVICE inline V expm1_small(V x) {
  if constexpr (Ops<V>::kWide) return Ops<V>::expm1(x);
  V r = V(1.0 / 5040);
  r = r * x + V(1.0 / 720);
  r = r * x + V(1.0 / 120);
  r = r * x + V(1.0 / 24);
  r = r * x + V(1.0 / 6);
  r = r * x + V(0.5);
  r = r * x + V(1);
  return r * x;
}

// expm1(-|t|), for the log ratios below.
template <typename V>
C10_HOST_DEVICE inline V expm1_neg_abs(V t) {
  using O = Ops<V>;
  const V x = O::neg(O::abs(t));
  return O::where(O::gt(x, V(-kExpm1Poly)), expm1_small(x), O::exp(x) - V(1));
}

// log(P_c / M_c) and log(Q_c / M_c), M = beta P + (1 - beta) Q, from
// t = log Q_c - log P_c: their difference is -t, and the smaller one is
// -log1p(w expm1(-|t|)) (w = beta for t >= 0, else 1 - beta), exact near
// P_c = Q_c (where both vanish) and free of overflow where they are far apart.
template <typename V>
C10_HOST_DEVICE inline void jsd_log_ratios(V t, V beta, V* lpm, V* lqm) {
  using O = Ops<V>;
  const auto pos = O::ge(t, V(0));
  const V u = expm1_neg_abs(t);
  const V small = O::neg(O::log1p(O::where(pos, beta, V(1) - beta) * u));
  *lpm = O::where(pos, small - t, small);
  *lqm = O::where(pos, small, small + t);
}

// JSD's terms of one class, P (log P - log M) and Q (log Q - log M) with
// 0 log 0 = 0, from the scaled logits a (P row) and b (Q row) and the row's
// saved values (the forward's second sweep).
template <typename V>
C10_HOST_DEVICE inline void jsd_class_terms(V a, V b, const DistillRow<V>& r, V beta, V* tp, V* tq) {
  using O = Ops<V>;
  const V p = O::exp_fast(a - r.mp) / r.sp, q = O::exp_fast(b - r.mq) / r.sq;
  V lpm, lqm;
  jsd_log_ratios(distill_log_ratio(a, b, r), beta, &lpm, &lqm);
  *tp = O::where(O::gt(p, V(0)), p * lpm, V(0));
  *tq = O::where(O::gt(q, V(0)), q * lqm, V(0));
}

// The gradients of one class of a distillation row (per unit of the T^2-scaled
// loss, times gp / gq = grad_output T, and beta / (1 - beta) for JSD), from the
// scaled logits a (P row), b (Q row) and the row's saved values; inv_sp and
// inv_sq are 1 / sp and 1 / sq (KL only: there a scale error of half an ulp
// shared by a row's probabilities is harmless):
//   KL:  dQ = Q_c - P_c, for |t| < kExpm1Poly as max(P_c, Q_c) expm1(-|t|)
//        (t = log Q_c - log P_c: exact where Q_c is near P_c), beyond as the
//        plain difference; dP = P_c (d_c - w / sp), d_c = (a - b) + (mq - mp)
//   JSD: dP = P_c (log(P_c / M_c) - KL(P || M)), dQ = Q_c (log(Q_c / M_c) - KL(Q || M))
// with 0 where the probability is 0. KL's dP is computed only when want_p.
template <typename V>
C10_HOST_DEVICE inline void distill_class_grads(V a, V b, const DistillRow<V>& r, V inv_sp, V inv_sq, V beta, V gp,
                                                V gq, bool jsd, bool want_p, V* dp, V* dq) {
  using O = Ops<V>;
  const V ar = a - r.mp, br = b - r.mq;
  const V t = distill_log_ratio(a, b, r);
  if (jsd) {
    const V p = O::exp_fast(ar) / r.sp, q = O::exp_fast(br) / r.sq;
    V lpm, lqm;
    jsd_log_ratios(t, beta, &lpm, &lqm);
    *dp = O::where(O::gt(p, V(0)), gp * (p * (lpm - r.k1)), V(0));
    *dq = O::where(O::gt(q, V(0)), gq * (q * (lqm - r.k2)), V(0));
    return;
  }
  const V p = O::exp_fast(ar) * inv_sp, q = O::exp_fast(br) * inv_sq;
  const auto pos = O::gt(t, V(0));
  const V near = O::where(pos, q, p) * expm1_small(O::neg(O::abs(t)));
  *dq = gq * O::where(O::lt(O::abs(t), V(kExpm1Poly)), O::where(pos, O::neg(near), near), q - p);
  if (want_p) *dp = O::where(O::gt(p, V(0)), gp * (p * (((a - b) + (r.mq - r.mp)) - r.k1)), V(0));
}

}  // namespace math
}  // namespace fusedloss
