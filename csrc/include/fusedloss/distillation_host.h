#pragma once
// Distillation on logits (kl_div_with_logits, jsd_with_logits), host code
// shared by the CPU and CUDA implementations: geometry, checks, the kernel
// parameter block and the op bodies templated on a device Engine that runs the
// per-row kernels:
//   Engine::forward_rows<scalar_t>(DistillParams&)   per row: loss, mean weight, saved state (8 values)
//   Engine::backward_rows<scalar_t>(DistillParams&)  the gradients, one read of both rows
// plus the elementwise engine for the deterministic sum of the row losses.
//
// A row is one position's two distributions over the last (class) dim:
// teacher logits t and student logits s, both divided by the temperature T.
// The kernels see a "P" row and a "Q" row (numerics.h): forward KL
// (beta == 0) is KL(P = teacher || Q = student); reverse KL (beta == 1) is
// KL(student || teacher), the same kernels with the rows swapped; generalised
// JSD (0 < beta < 1) is beta KL(P || M) + (1 - beta) KL(Q || M),
// M = beta P + (1 - beta) Q, P = teacher. Every row loss is times T^2.
//
// Reductions (codes): 0 none (per row), 1 mean (sum / (kept rows * C), as
// kl_div's 'mean' over elements), 2 sum, 3 batchmean (sum / kept rows). Rows
// whose target equals ignore_index are kept out of the loss and the
// denominator and get zero gradients; a mean over no kept rows is 0/0 = NaN.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <fusedloss/checks.h>
#include <fusedloss/elementwise_host.h>
#include <fusedloss/numerics.h>
#include <fusedloss/outputs.h>
#include <fusedloss/row_sum.h>

#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace fusedloss {

enum DistillReduction : int64_t { kDistillBatchmean = 3 };
enum DistillMode : int { kDistillKl = 0, kDistillJsd = 1 };
// Columns of the saved per-row state (DistillRow: P max, Q max, P sum of
// exps, Q sum, k1, k2, c, c_lo).
constexpr int64_t kDistillStats = 8;

// A row's offset: rows are (n, s) over the flattened leading dims, classes contiguous.
struct DistillGeometry {
  int64_t N = 1, S = 1, C = 1;
  C10_HOST_DEVICE int64_t rows() const { return N * S; }
};

// Strides (sN, sS) of t's rows over (N, S), if its leading dims after the first
// merge into one stride and its classes are contiguous.
inline bool distill_strides(const at::Tensor& t, int64_t* sN, int64_t* sS) {
  const int64_t nd = t.dim();
  if (t.size(-1) > 1 && t.stride(-1) != 1) return false;
  if (nd == 1) {
    *sN = 0;
    *sS = 0;
    return true;
  }
  *sN = t.stride(0);
  int64_t stride = 0, span = 1;
  bool first = true;
  for (int64_t d = nd - 2; d >= 1; --d) {
    if (t.size(d) == 1) continue;
    if (first) {
      stride = t.stride(d);
      first = false;
    } else if (t.stride(d) != stride * span) {
      return false;
    }
    span *= t.size(d);
  }
  *sS = first ? 0 : stride;
  return true;
}

template <typename scalar_t>
struct DistillParams {
  using acc_t = at::opmath_type<scalar_t>;
  DistillGeometry g;
  int mode = kDistillKl;
  // The P and Q rows (see above), each with its own row strides.
  const scalar_t* p_in = nullptr;
  int64_t pN = 0, pS = 0;
  const scalar_t* q_in = nullptr;
  int64_t qN = 0, qS = 0;
  const int64_t* target = nullptr;  // one per row, contiguous; null: every row counts
  int64_t ignore_index = -100;
  acc_t inv_t = 1;        // 1 / T: logits are multiplied by it
  bool scaled = false;    // T != 1
  acc_t beta = 0;         // JSD's weight of P
  acc_t t2 = 1;           // T^2
  acc_t row_weight = 1;   // a kept row's share of the mean's denominator (C for 'mean', else 1)
  // forward outputs, per row
  acc_t* stats_out = nullptr;  // (rows, kDistillStats)
  acc_t* loss_out = nullptr;
  acc_t* weight_out = nullptr;
  // backward
  const acc_t* stats = nullptr;
  const acc_t* grad = nullptr;  // one per row ('none') or one value
  bool grad_per_row = false;
  const acc_t* denominator = nullptr;  // divides grad (mean, batchmean), or null
  acc_t grad_scale = 1;                // T: d(T^2 L(x / T)) / dx = T L'
  scalar_t* grad_p = nullptr;          // (rows, C) contiguous, or null when not wanted
  scalar_t* grad_q = nullptr;

  C10_HOST_DEVICE int64_t offset(int64_t row, int64_t sN, int64_t sS) const {
    const int64_t n = row / g.S;
    return n * sN + (row - n * g.S) * sS;
  }
  C10_HOST_DEVICE bool ignored(int64_t row) const { return target != nullptr && target[row] == ignore_index; }
  // grad_output times T over the mean's denominator.
  C10_HOST_DEVICE acc_t row_grad(int64_t row) const {
    acc_t gv = grad[grad_per_row ? row : 0] * grad_scale;
    if (denominator != nullptr) gv = gv / *denominator;
    return gv;
  }
  C10_HOST_DEVICE void store_ignored_row(int64_t row) const {
    for (int k = 0; k < kDistillStats; ++k) stats_out[row * kDistillStats + k] = acc_t(0);
    loss_out[row] = acc_t(0);
    weight_out[row] = acc_t(0);
  }
  // The row's forward outputs, from its finished state: the loss is T^2 times
  // KL(P || Q) (k2) or beta KL(P || M) + (1 - beta) KL(Q || M) (k1, k2).
  C10_HOST_DEVICE void store_row(int64_t row, const math::DistillRow<acc_t>& d) const {
    acc_t* s = stats_out + row * kDistillStats;
    s[0] = d.mp;
    s[1] = d.mq;
    s[2] = d.sp;
    s[3] = d.sq;
    s[4] = d.k1;
    s[5] = d.k2;
    s[6] = d.c;
    s[7] = d.c_lo;
    loss_out[row] = t2 * row_loss(d);
    weight_out[row] = row_weight;
  }
  // KL(P || Q), or beta KL(P || M) + (1 - beta) KL(Q || M); NaN for a JSD row
  // whose log-sum-exps are not finite (NaN logits, or all -inf), whose terms
  // the 0 log 0 rule would otherwise drop.
  C10_HOST_DEVICE acc_t row_loss(const math::DistillRow<acc_t>& d) const {
    if (mode == kDistillKl) return d.k2;
    if (!(d.c - d.c == acc_t(0))) return d.c - d.c;
    return beta * d.k1 + (acc_t(1) - beta) * d.k2;
  }
  C10_HOST_DEVICE math::DistillRow<acc_t> saved_row(int64_t row) const {
    const acc_t* s = stats + row * kDistillStats;
    return {s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]};
  }
  // Where a row's loss is infinite or NaN, its gradients are NaN (the
  // composite's are not finite either), but for the Q gradient of a KL that
  // is +inf (not NaN): T (Q - P) stays exact where only Q masks a class P has
  // mass on.
  C10_HOST_DEVICE bool nan_grad_p(const math::DistillRow<acc_t>& d) const {
    const acc_t v = row_loss(d);
    return !(v - v == acc_t(0));
  }
  C10_HOST_DEVICE bool nan_grad_q(const math::DistillRow<acc_t>& d) const {
    const acc_t v = row_loss(d);
    return mode == kDistillKl ? v != v : !(v - v == acc_t(0));
  }
};

// The raw op's arguments (the Python API checks first, with clear messages).
inline void check_distill(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                          const std::optional<at::Tensor>& target, double beta, double temperature,
                          int64_t reduction) {
  TORCH_CHECK(reduction >= kReductionNone && reduction <= kDistillBatchmean, op,
              ": reduction must be 0 (none), 1 (mean), 2 (sum) or 3 (batchmean), got ", reduction);
  check_floating(op, "student", student);
  check_floating(op, "teacher", teacher);
  check_device(op, "teacher", teacher, student);
  TORCH_CHECK(student.dim() >= 1 && student.size(-1) > 0, op, ": logits must have a non-empty class dimension");
  TORCH_CHECK(teacher.sizes() == student.sizes(), op, ": teacher of shape ", teacher.sizes(),
              " must have the student's shape ", student.sizes());
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, op, ": beta must be in [0, 1], got ", beta);
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), op, ": temperature must be positive, got ",
              temperature);
  if (target.has_value() && target->defined()) {
    check_device(op, "target", *target, student);
    TORCH_CHECK(at::isIntegralType(target->scalar_type(), /*includeBool=*/false), op,
                ": target must hold integer class indices, got ", target->scalar_type());
    TORCH_CHECK(target->sizes() == student.sizes().slice(0, student.dim() - 1), op, ": target of shape ",
                target->sizes(), " must have the logits' leading shape ",
                student.sizes().slice(0, student.dim() - 1));
  }
}

// The dtype the kernels read: the logits' common dtype (fp16/bf16/fp32/fp64;
// teacher and student of different dtypes are converted once to the promoted one).
inline at::ScalarType distill_compute_dtype(const at::Tensor& student, const at::Tensor& teacher) {
  return c10::promoteTypes(student.scalar_type(), teacher.scalar_type());
}

template <typename Engine, typename ElementwiseEngine>
struct DistillOps {
  // (loss, stats (rows, 8), denominator ()): the backward reads stats and the
  // denominator (1 unless the reduction is a mean).
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& student_,
                                                                const at::Tensor& teacher_,
                                                                const std::optional<at::Tensor>& target_,
                                                                double beta, double temperature,
                                                                int64_t ignore_index, int64_t reduction,
                                                                std::optional<at::ScalarType> out_dtype) {
    constexpr const char* op = "fusedloss::distill_forward";
    check_distill(op, student_, teacher_, target_, beta, temperature, reduction);
    const c10::OptionalDeviceGuard guard(student_.device());
    const at::ScalarType dtype = distill_compute_dtype(student_, teacher_);
    at::ScalarType loss_type = dtype;
    if (out_dtype.has_value()) {
      TORCH_CHECK(at::isFloatingType(*out_dtype), "fusedloss: out_dtype must be a floating dtype, got ", *out_dtype);
      loss_type = *out_dtype;
    }
    Keep keep = prepare(student_, teacher_, target_, dtype, beta);
    const DistillGeometry g = keep.g;
    const auto acc_type = opmath_type(dtype);
    const auto acc_opts = student_.options().dtype(acc_type);
    at::Tensor stats = at::empty({g.rows(), kDistillStats}, acc_opts);
    at::Tensor rows = at::empty({2, g.rows()}, acc_opts);  // per row: the loss, its weight in the mean
    at::Tensor denominator = at::empty({}, acc_opts);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "distill", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      DistillParams<scalar_t> p;
      fill(p, keep, beta, temperature, ignore_index, reduction);
      p.stats_out = stats.mutable_data_ptr<acc_t>();
      p.loss_out = rows.mutable_data_ptr<acc_t>();
      p.weight_out = p.loss_out + g.rows();
      if (g.rows() > 0) Engine::template forward_rows<scalar_t>(p);
    });
    const auto batch = student_.sizes().slice(0, student_.dim() - 1);
    at::Tensor loss;
    if (reduction == kReductionNone) {
      loss = finish(rows.select(0, 0).view(batch), loss_type);
      denominator.fill_(1);
    } else {
      ElementwiseCall c(rows.select(0, 0), acc_type);
      c.set(0, rows.select(0, 0));
      c.set(1, rows.select(0, 1));
      loss = at::empty({}, student_.options().dtype(c.storable(loss_type)));
      const bool mean = reduction != kReductionSum;
      AT_DISPATCH_FLOATING_TYPES(acc_type, "distill_sum", [&] {
        ElementwiseEngine::template forward<scalar_t>(c, Sums<scalar_t, 2>{}, mean ? kReductionMean : kReductionSum,
                                                      loss, mean ? &denominator : nullptr);
      });
      loss = finish(loss, loss_type);
      if (!mean) denominator.fill_(1);
    }
    return {loss, stats, denominator};
  }

  static std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& student_,
                                                     const at::Tensor& teacher_,
                                                     const std::optional<at::Tensor>& target_,
                                                     const at::Tensor& stats, const at::Tensor& denominator,
                                                     double beta, double temperature, int64_t ignore_index,
                                                     int64_t reduction, std::array<bool, 2> output_mask) {
    constexpr const char* op = "fusedloss::distill_backward";
    check_distill(op, student_, teacher_, target_, beta, temperature, reduction);
    const c10::OptionalDeviceGuard guard(student_.device());
    const at::ScalarType dtype = distill_compute_dtype(student_, teacher_);
    Keep keep = prepare(student_, teacher_, target_, dtype, beta);
    const DistillGeometry g = keep.g;
    const auto acc_type = opmath_type(dtype);
    auto saved = [&](const at::Tensor& t, int64_t n, const char* name) {
      TORCH_CHECK(t.scalar_type() == acc_type && t.device() == student_.device() && t.numel() == n &&
                      t.is_contiguous(),
                  op, ": '", name, "' must be the forward's (", n, " contiguous ", acc_type, " values)");
    };
    saved(stats, g.rows() * kDistillStats, "stats");
    saved(denominator, 1, "denominator");
    check_device(op, "grad", grad, student_);
    check_floating(op, "grad", grad);
    TORCH_CHECK(grad.numel() == (reduction == kReductionNone ? g.rows() : 1), op,
                ": grad must have the loss's shape");
    const at::Tensor grad_acc = finish(grad, acc_type).contiguous();
    const auto opts = student_.options().dtype(dtype);
    at::Tensor grad_student =
        output_mask[0] ? empty_output(student_.sizes(), opts) : at::empty({0}, student_.options());
    at::Tensor grad_teacher =
        output_mask[1] ? empty_output(teacher_.sizes(), opts) : at::empty({0}, teacher_.options());
    if (g.rows() > 0 && (output_mask[0] || output_mask[1])) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "distill_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        DistillParams<scalar_t> p;
        fill(p, keep, beta, temperature, ignore_index, reduction);
        p.stats = stats.const_data_ptr<acc_t>();
        p.grad = grad_acc.const_data_ptr<acc_t>();
        p.grad_per_row = reduction == kReductionNone;
        p.denominator = reduction == kReductionMean || reduction == kDistillBatchmean
                            ? denominator.const_data_ptr<acc_t>()
                            : nullptr;
        scalar_t* gs = output_mask[0] ? grad_student.mutable_data_ptr<scalar_t>() : nullptr;
        scalar_t* gt = output_mask[1] ? grad_teacher.mutable_data_ptr<scalar_t>() : nullptr;
        p.grad_p = keep.swapped ? gs : gt;
        p.grad_q = keep.swapped ? gt : gs;
        Engine::template backward_rows<scalar_t>(p);
      });
    }
    if (output_mask[0]) grad_student = finish(grad_student, student_.scalar_type());
    if (output_mask[1]) grad_teacher = finish(grad_teacher, teacher_.scalar_type());
    return {grad_student, grad_teacher};
  }

 private:
  // Tensors made for one call (converted, contiguous), alive until it returns.
  struct Keep {
    at::Tensor p, q, target;
    int64_t pN = 0, pS = 0, qN = 0, qS = 0;
    DistillGeometry g;
    bool swapped = false;  // P is the student (reverse KL)
  };

  static Keep prepare(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                      at::ScalarType dtype, double beta) {
    Keep k;
    at::Tensor s = finish(student, dtype);
    at::Tensor t = finish(teacher, dtype);
    int64_t sN, sS, tN, tS;
    if (!distill_strides(s, &sN, &sS)) {
      s = s.contiguous();
      distill_strides(s, &sN, &sS);
    }
    if (!distill_strides(t, &tN, &tS)) {
      t = t.contiguous();
      distill_strides(t, &tN, &tS);
    }
    k.g.C = student.size(-1);
    k.g.N = student.dim() >= 2 ? student.size(0) : 1;
    k.g.S = 1;
    for (int64_t d = 1; d + 1 < student.dim(); ++d) k.g.S *= student.size(d);
    if (target.has_value() && target->defined()) k.target = target->to(at::kLong).contiguous();
    // Forward KL and JSD: P is the teacher. Reverse KL: the rows swap roles.
    k.swapped = beta == 1.0;
    k.p = k.swapped ? s : t;
    k.pN = k.swapped ? sN : tN;
    k.pS = k.swapped ? sS : tS;
    k.q = k.swapped ? t : s;
    k.qN = k.swapped ? tN : sN;
    k.qS = k.swapped ? tS : sS;
    return k;
  }

  template <typename scalar_t>
  static void fill(DistillParams<scalar_t>& p, const Keep& k, double beta, double temperature, int64_t ignore_index,
                   int64_t reduction) {
    using acc_t = at::opmath_type<scalar_t>;
    p.g = k.g;
    p.mode = beta > 0.0 && beta < 1.0 ? kDistillJsd : kDistillKl;
    p.p_in = k.p.template const_data_ptr<scalar_t>();
    p.pN = k.pN;
    p.pS = k.pS;
    p.q_in = k.q.template const_data_ptr<scalar_t>();
    p.qN = k.qN;
    p.qS = k.qS;
    p.target = k.target.defined() ? k.target.template const_data_ptr<int64_t>() : nullptr;
    p.ignore_index = ignore_index;
    p.inv_t = static_cast<acc_t>(1.0 / temperature);
    p.scaled = temperature != 1.0;
    p.beta = static_cast<acc_t>(beta);
    p.t2 = static_cast<acc_t>(temperature * temperature);
    p.row_weight = reduction == kReductionMean ? static_cast<acc_t>(k.g.C) : acc_t(1);
    p.grad_scale = static_cast<acc_t>(temperature);
  }
};

template <typename Ops>
void register_distill_ops(torch::Library& m) {
  m.impl("distill_forward", &Ops::forward);
  m.impl("distill_backward", &Ops::backward);
}

}  // namespace fusedloss
