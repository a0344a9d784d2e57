#pragma once
// Per-element functors of the elementwise losses, run by both engines
// (csrc/cpu/elementwise.h with V = at::vec::Vectorized, csrc/cuda/elementwise.cuh
// with V = float/double).
//
// A functor sees kIn operand values, already widened to the accumulation type,
// and writes kOut values:
//   forward:  out[0] = the loss of the element (weighted); further outs are
//             extra sums a reduction needs (e.g. the weight for a weighted mean)
//   backward: out[k] = gradient of the k-th differentiable operand; only the
//             requested ones need to be right (want_*), so costly unused terms
//             are skipped.
// Absent optional operands (weight, pos_weight) arrive as the constant 1.
// The backward gradient operand g already carries grad_output; `scale` folds
// in the mean's 1/N.

#include <fusedloss/numerics.h>

namespace fusedloss {

// ---------------------------------------------------------------------------
// binary_cross_entropy_with_logits: operands x, y, weight, pos_weight (, g)
// ---------------------------------------------------------------------------
template <typename acc_t, bool kPosWeight>
struct BceLogitsForward {
  static constexpr int kIn = 4;
  static constexpr int kOut = 1;
  template <typename V>
  C10_HOST_DEVICE void operator()(const V* in, V* out) const {
    const V lw = kPosWeight ? math::bce_log_weight(in[1], in[3]) : V(1);
    out[0] = math::bce_logits_loss(in[0], in[1], lw) * in[2];
  }
};

template <typename acc_t, bool kPosWeight>
struct BceLogitsBackward {
  static constexpr int kIn = 5;
  static constexpr int kOut = 2;
  acc_t scale;
  bool want_target;
  template <typename V>
  C10_HOST_DEVICE void operator()(const V* in, V* out) const {
    const V& x = in[0];
    const V& y = in[1];
    const V g = in[4] * in[2] * V(scale);
    if (kPosWeight) {
      const V lw = math::bce_log_weight(y, in[3]);
      out[0] = math::bce_logits_grad_input(x, y, in[3], lw) * g;
      if (want_target) out[1] = math::bce_logits_grad_target(x, in[3]) * g;
    } else {
      out[0] = (math::sigmoid(x) - y) * g;
      if (want_target) out[1] = math::Ops<V>::neg(x) * g;
    }
  }
};

// ---------------------------------------------------------------------------
// mse_loss: operands x, y, weight (, g, loss)
// ---------------------------------------------------------------------------
template <typename acc_t, bool kWeighted>
struct MseForward {
  static constexpr int kIn = 3;
  // out[1] is the weight itself: a weighted mean divides by its sum.
  static constexpr int kOut = kWeighted ? 2 : 1;
  template <typename V>
  C10_HOST_DEVICE void operator()(const V* in, V* out) const {
    const V se = math::squared_error(in[0], in[1]);
    if (kWeighted) {
      out[0] = se * in[2];
      out[kOut - 1] = in[2];
    } else {
      out[0] = se;
    }
  }
};

// Gradients of L = f(sum_i w_i d_i^2) with d = x - y:
//   dx = 2 d w g,   dy = -dx,   dw = (d^2 - shift) g
// g = grad_output * scale (scale = 1/N or 1/sum(w) for a mean); shift is the
// forward loss for a weighted mean (d/dw_i of S/W = (d_i^2 - S/W)/W), else 0.
template <typename acc_t>
struct MseBackward {
  static constexpr int kIn = 5;  // x, y, weight, g, shift
  static constexpr int kOut = 3;
  acc_t scale;
  const acc_t* denominator;  // scalar dividing g (weighted mean), or null
  bool want_weight;
  bool has_shift;
  template <typename V>
  C10_HOST_DEVICE void operator()(const V* in, V* out) const {
    V g = in[3] * V(scale);
    if (denominator != nullptr) g = g / V(*denominator);
    const V dx = math::squared_error_grad(in[0], in[1]) * in[2] * g;
    out[0] = dx;
    out[1] = math::Ops<V>::neg(dx);
    if (want_weight) {
      const V se = math::squared_error(in[0], in[1]);
      out[2] = (has_shift ? se - in[4] : se) * g;
    }
  }
};

// ---------------------------------------------------------------------------
// hinge_embedding_loss: operands x, y (, g)
// ---------------------------------------------------------------------------
template <typename acc_t>
struct HingeEmbeddingForward {
  static constexpr int kIn = 2;
  static constexpr int kOut = 1;
  acc_t margin;
  template <typename V>
  C10_HOST_DEVICE void operator()(const V* in, V* out) const {
    out[0] = math::hinge_embedding(in[0], in[1], V(margin));
  }
};

template <typename acc_t>
struct HingeEmbeddingBackward {
  static constexpr int kIn = 3;
  static constexpr int kOut = 1;
  acc_t margin;
  acc_t scale;
  bool at_kink;
  template <typename V>
  C10_HOST_DEVICE void operator()(const V* in, V* out) const {
    out[0] = math::hinge_embedding_grad(in[0], in[1], V(margin), at_kink) * in[2] * V(scale);
  }
};

// ---------------------------------------------------------------------------
// soft_margin_loss: operands x, y (, g)
// ---------------------------------------------------------------------------
template <typename acc_t>
struct SoftMarginForward {
  static constexpr int kIn = 2;
  static constexpr int kOut = 1;
  template <typename V>
  C10_HOST_DEVICE void operator()(const V* in, V* out) const {
    out[0] = math::soft_margin(in[0], in[1]);
  }
};

template <typename acc_t>
struct SoftMarginBackward {
  static constexpr int kIn = 3;
  static constexpr int kOut = 1;
  acc_t scale;
  template <typename V>
  C10_HOST_DEVICE void operator()(const V* in, V* out) const {
    out[0] = math::soft_margin_grad(in[0], in[1]) * in[2] * V(scale);
  }
};

// ---------------------------------------------------------------------------
// Binary hinge: operands x, y (, g)
// ---------------------------------------------------------------------------
template <typename acc_t>
struct HingeForward {
  static constexpr int kIn = 2;
  static constexpr int kOut = 1;
  acc_t margin;
  bool squared;
  template <typename V>
  C10_HOST_DEVICE void operator()(const V* in, V* out) const {
    const V h = math::hinge_residual(in[0], in[1], V(margin));
    out[0] = squared ? h * h : h;
  }
};

template <typename acc_t>
struct HingeBackward {
  static constexpr int kIn = 3;
  static constexpr int kOut = 2;
  acc_t margin;
  acc_t scale;
  bool squared;
  bool at_kink;
  template <typename V>
  C10_HOST_DEVICE void operator()(const V* in, V* out) const {
    const V s = math::hinge_slope(in[0], in[1], V(margin), squared, at_kink) * in[2] * V(scale);
    out[0] = math::Ops<V>::neg(in[1]) * s;
    out[1] = math::Ops<V>::neg(in[0]) * s;
  }
};

// ---------------------------------------------------------------------------
// sigmoid_focal_loss: operands x, y (, g). kSquare: gamma == 2, the default
// (u * u, no pow); kAlpha: alpha >= 0 (alpha = -1 disables the class weight).
// ---------------------------------------------------------------------------
template <typename acc_t, bool kAlpha, bool kSquare>
struct SigmoidFocalForward {
  static constexpr int kIn = 2;
  static constexpr int kOut = 1;
  acc_t alpha;
  acc_t gamma;
  template <typename V>
  C10_HOST_DEVICE void operator()(const V* in, V* out) const {
    out[0] = math::sigmoid_focal(in[0], in[1], V(alpha), kAlpha, V(gamma), kSquare);
  }
};

template <typename acc_t, bool kAlpha, bool kSquare>
struct SigmoidFocalBackward {
  static constexpr int kIn = 3;
  static constexpr int kOut = 2;
  acc_t alpha;
  acc_t gamma;
  acc_t scale;
  bool want_target;
  template <typename V>
  C10_HOST_DEVICE void operator()(const V* in, V* out) const {
    V dx, dy;
    math::sigmoid_focal_grads(in[0], in[1], V(alpha), kAlpha, V(gamma), kSquare, gamma == acc_t(0), want_target,
                              &dx, &dy);
    const V g = in[2] * V(scale);
    out[0] = dx * g;
    if (want_target) out[1] = dy * g;
  }
};

// ---------------------------------------------------------------------------
// multilabel_soft_margin_loss: operands x, y, weight (, g). The forward's
// per-element terms are summed per row by a row kernel; the backward is
// elementwise, with the row's grad_output broadcast along it and `scale` = 1/C
// (times 1/N for a mean).
// ---------------------------------------------------------------------------
template <typename acc_t>
struct MultilabelSoftMarginForward {
  static constexpr int kIn = 3;
  static constexpr int kOut = 1;
  template <typename V>
  C10_HOST_DEVICE void operator()(const V* in, V* out) const {
    out[0] = math::multilabel_soft_margin(in[0], in[1]) * in[2];
  }
};

template <typename acc_t>
struct MultilabelSoftMarginBackward {
  static constexpr int kIn = 4;
  static constexpr int kOut = 2;
  acc_t scale;
  bool want_input;
  bool want_target;
  template <typename V>
  C10_HOST_DEVICE void operator()(const V* in, V* out) const {
    const V g = in[3] * in[2] * V(scale);
    if (want_input) out[0] = math::multilabel_soft_margin_grad_input(in[0], in[1]) * g;
    if (want_target) out[1] = math::multilabel_soft_margin_grad_target(in[0]) * g;
  }
};

}  // namespace fusedloss
