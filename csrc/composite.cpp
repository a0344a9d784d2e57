// The losses as torch's own ops (see fusedloss/composite.h for what they are
// for), registered as CompositeImplicitAutograd kernels of the
// `<loss>_composite` ops, so they decompose into ATen ops under autograd,
// forward-mode AD, autocast, vmap and torch.compile alike.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <fusedloss/composite.h>
#include <fusedloss/numerics.h>

#include <limits>

namespace fusedloss::composite {
namespace {

// With an out_dtype, fp16/bf16 operands are computed on in fp32, as the
// fused kernels do in registers (the loss is then rounded once into
// out_dtype); without one, the composite is torch's loss, rounding included.
at::Tensor in_dtype(const at::Tensor& t, const std::optional<at::ScalarType>& out_dtype) {
  if (!out_dtype.has_value() || !t.defined()) return t;
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16 ? t.to(at::kFloat) : t;
}

std::optional<at::Tensor> in_dtype(const std::optional<at::Tensor>& t,
                                   const std::optional<at::ScalarType>& out_dtype) {
  if (!t.has_value()) return t;
  return in_dtype(*t, out_dtype);
}

at::Tensor as_out(const at::Tensor& loss, const std::optional<at::ScalarType>& out_dtype) {
  return out_dtype.has_value() && loss.scalar_type() != *out_dtype ? loss.to(*out_dtype) : loss;
}

at::Tensor reduce(const at::Tensor& loss, int64_t reduction) {
  if (reduction == kReductionMean) return loss.mean();
  if (reduction == kReductionSum) return loss.sum();
  return loss;
}

}  // namespace

at::Tensor bce_with_logits(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                           std::optional<at::ScalarType> out_dtype) {
  return as_out(at::binary_cross_entropy_with_logits(in_dtype(input, out_dtype), in_dtype(target, out_dtype),
                                                     in_dtype(weight, out_dtype), in_dtype(pos_weight, out_dtype),
                                                     reduction),
                out_dtype);
}

// torch's mse_loss; with a weight of the input's shape, its documented
// weighted form (a weighted mean divides by sum(weight)).
at::Tensor mse(const at::Tensor& input_, const at::Tensor& target_, const std::optional<at::Tensor>& weight_,
               int64_t reduction, std::optional<at::ScalarType> out_dtype) {
  const at::Tensor input = in_dtype(input_, out_dtype);
  const at::Tensor target = in_dtype(target_, out_dtype);
  if (!weight_.has_value() || !weight_->defined()) return as_out(at::mse_loss(input, target, reduction), out_dtype);
  const at::Tensor weight = in_dtype(*weight_, out_dtype);
  const at::Tensor weighted = at::pow(input - target, 2) * weight;
  if (reduction == kReductionNone) return as_out(weighted, out_dtype);
  if (reduction == kReductionSum) return as_out(weighted.sum(), out_dtype);
  return as_out(weighted.sum() / weight.sum(), out_dtype);
}

at::Tensor hinge_embedding(const at::Tensor& input, const at::Tensor& target, double margin, int64_t reduction,
                           std::optional<at::ScalarType> out_dtype) {
  return as_out(at::hinge_embedding_loss(in_dtype(input, out_dtype), target, margin, reduction), out_dtype);
}

// log(1 + exp(-y x)) as softplus: finite where torch's form overflows.
at::Tensor soft_margin(const at::Tensor& input_, const at::Tensor& target, int64_t reduction,
                       std::optional<at::ScalarType> out_dtype) {
  const at::Tensor input = in_dtype(input_, out_dtype);
  return as_out(reduce(at::softplus(-target * input).to(input.scalar_type()), reduction), out_dtype);
}

// Binary (SVM) hinge max(0, margin - y x), squared for the L2-SVM.
at::Tensor hinge(const at::Tensor& input, const at::Tensor& target, double margin, bool squared, int64_t reduction,
                 std::optional<at::ScalarType> out_dtype) {
  at::Tensor loss = at::clamp_min(margin - in_dtype(target, out_dtype) * in_dtype(input, out_dtype), 0);
  if (squared) loss = loss * loss;
  return as_out(reduce(loss, reduction), out_dtype);
}

// torch's multi_margin_loss as differentiable ops (a NaN margin counts nothing,
// as in torch's kernels). The output has torch's shape: one value per target
// element for 'none' (so a (C) input with a (1) target gives (1)); an empty
// batch's mean is NaN.
at::Tensor multi_margin(const at::Tensor& input_, const at::Tensor& target, int64_t p, double margin,
                        const std::optional<at::Tensor>& weight_, int64_t reduction,
                        std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK_VALUE(p == 1 || p == 2, "only p == 1 and p == 2 supported");
  const at::Tensor input = in_dtype(input_, out_dtype);
  const at::Tensor x = input.dim() < 2 ? input.reshape({1, -1}) : input;
  const at::Tensor t = target.reshape({-1, 1});
  const at::Tensor z = margin - x.gather(1, t) + x;
  at::Tensor h = at::where(z > 0, p == 1 ? z : z * z, at::zeros_like(z));
  // The target's own term is not counted (a comparison, not a scatter: it has
  // a vmap batching rule).
  h = h.masked_fill(at::arange(c10::Scalar(x.sym_size(1)), t.options()).unsqueeze(0) == t, 0);
  if (weight_.has_value() && weight_->defined()) h = h * in_dtype(*weight_, out_dtype).index({t});
  at::Tensor loss = h.sum(1) / x.sym_size(1);
  if (reduction == kReductionNone) return as_out(loss.reshape_symint(target.sym_sizes()), out_dtype);
  return as_out(reduce(loss, reduction), out_dtype);
}

// torch's cross_entropy, plus z-loss and softcap:
//   softcap: logits become softcap * tanh(input / softcap) first;
//   z-loss: each sample's loss gains lse_square_scale * logsumexp(x)^2, scaled
//   by the target class's weight for class-index targets (unweighted for
//   probability targets); ignored samples gain nothing, and a mean divides by
//   torch's own denominator.
at::Tensor cross_entropy(const at::Tensor& input_, const at::Tensor& target_, const std::optional<at::Tensor>& weight_,
                         int64_t ignore_index, int64_t reduction, double label_smoothing, double lse_square_scale,
                         std::optional<double> softcap, bool /*inplace_backward*/,
                         std::optional<at::ScalarType> out_dtype) {
  const at::Tensor input = in_dtype(input_, out_dtype);
  const bool prob = target_.sym_sizes() == input_.sym_sizes();
  const at::Tensor target = prob ? in_dtype(target_, out_dtype) : target_;
  const std::optional<at::Tensor> weight = in_dtype(weight_, out_dtype);
  const at::Tensor x = softcap.has_value() ? *softcap * at::tanh(input / *softcap) : input;
  at::Tensor loss = at::cross_entropy_loss(x, target, weight, reduction, ignore_index, label_smoothing);
  if (lse_square_scale == 0.0) return as_out(loss, out_dtype);
  const int64_t class_dim = x.dim() == 1 ? 0 : 1;
  const at::Tensor lse = at::logsumexp(x, {class_dim});
  at::Tensor z = lse_square_scale * lse * lse;
  at::Tensor denom;  // of a mean: torch's (the weight of the kept targets), or N
  if (prob) {
    if (reduction == kReductionMean) return as_out(loss + z.mean(), out_dtype);
  } else {
    const at::Tensor keep = target != ignore_index;
    at::Tensor w_t = keep.to(z.scalar_type());
    if (weight.has_value() && weight->defined()) {
      w_t = w_t * weight->index({at::where(keep, target, at::zeros_like(target)).to(at::kLong)}).to(z.scalar_type());
    }
    z = z * w_t;
    denom = w_t.sum();
  }
  if (reduction == kReductionNone) return as_out(loss + z, out_dtype);
  if (reduction == kReductionSum) return as_out(loss + z.sum(), out_dtype);
  // All targets ignored: torch's mean is NaN already, and ignored samples get
  // zero gradient; dividing the (zero) z sum by 1 keeps it that way.
  denom = at::where(denom == 0, at::ones_like(denom), denom);
  return as_out(loss + z.sum() / denom, out_dtype);
}

// torchvision's sigmoid_focal_loss with 1 - p_t formed as
// sigmoid(x) (1 - y) + sigmoid(-x) y, which is exact where torchvision's
// 1 - (p y + (1 - p)(1 - y)) rounds to 0 (p within an ulp of 1). The ops run in
// torchvision's order (sigmoid, then the BCE), so invalid arguments raise its errors.
at::Tensor sigmoid_focal(const at::Tensor& input_, const at::Tensor& target_, double alpha, double gamma,
                         int64_t reduction, std::optional<at::ScalarType> out_dtype) {
  const at::Tensor inputs = in_dtype(input_, out_dtype);
  const at::Tensor targets = in_dtype(target_, out_dtype);
  const at::Tensor p = at::sigmoid(inputs);
  const at::Tensor ce = at::binary_cross_entropy_with_logits(inputs, targets, {}, {}, kReductionNone);
  const at::Tensor u = p * at::rsub(targets, 1) + at::sigmoid(-inputs) * targets;
  at::Tensor loss = ce * at::pow(u, gamma);
  if (alpha >= 0) loss = (alpha * targets + (1 - alpha) * at::rsub(targets, 1)) * loss;
  return as_out(reduce(loss, reduction), out_dtype);
}

// torch's multilabel_soft_margin_loss, op for op: the class dim is the last.
at::Tensor multilabel_soft_margin(const at::Tensor& input_, const at::Tensor& target_,
                                  const std::optional<at::Tensor>& weight_, int64_t reduction,
                                  std::optional<at::ScalarType> out_dtype) {
  const at::Tensor input = in_dtype(input_, out_dtype);
  const at::Tensor target = in_dtype(target_, out_dtype);
  at::Tensor loss = -(target * at::log_sigmoid(input) + at::rsub(target, 1) * at::log_sigmoid(-input));
  if (weight_.has_value() && weight_->defined()) loss = loss * in_dtype(*weight_, out_dtype);
  loss = loss.sum(-1) / input.sym_size(-1);
  return as_out(reduce(loss, reduction), out_dtype);
}

namespace {

// sum_c P_c (l_c - lr_c) over the last dim, with P = exp(l) and 0 log 0 = 0:
// terms where P_c = 0 are 0, also in their gradients (the where()s keep -inf
// out of every product, so masked classes give no NaN backward). NaN stays NaN.
at::Tensor kl_rows(const at::Tensor& l, const at::Tensor& lr) {
  const at::Tensor p = at::exp(l);
  const at::Tensor pos = p != 0;
  const at::Tensor zero = at::zeros({}, l.options());
  return at::where(pos, p * (at::where(pos, l, zero) - at::where(pos, lr, zero)), zero).sum(-1);
}

}  // namespace

// KL(softmax(t / T) || softmax(s / T)) (beta 0), KL(softmax(s / T) || softmax(t / T))
// (beta 1) or the generalised JSD beta KL(P || M) + (1 - beta) KL(Q || M),
// M = beta P + (1 - beta) Q, P the teacher's, Q the student's; times T^2.
// Rows whose target is ignore_index count nothing: their logits are replaced by
// 0 before anything is computed, so even NaN there gives a zero gradient.
// Means over no kept rows are NaN with zero gradients.
at::Tensor distill(const at::Tensor& student_, const at::Tensor& teacher_, const std::optional<at::Tensor>& target,
                   double beta, double temperature, int64_t ignore_index, int64_t reduction,
                   std::optional<at::ScalarType> out_dtype) {
  at::Tensor s = in_dtype(student_, out_dtype);
  at::Tensor t = in_dtype(teacher_, out_dtype);
  const auto dtype = c10::promoteTypes(s.scalar_type(), t.scalar_type());
  s = s.to(dtype);
  t = t.to(dtype);
  const bool has_target = target.has_value() && target->defined();
  at::Tensor keep;
  if (has_target) {
    keep = *target != ignore_index;
    const at::Tensor zero = at::zeros({}, s.options());
    s = at::where(keep.unsqueeze(-1), s, zero);
    t = at::where(keep.unsqueeze(-1), t, zero);
  }
  const at::Tensor lq = at::log_softmax(s / temperature, -1);
  const at::Tensor lp = at::log_softmax(t / temperature, -1);
  at::Tensor rows;
  if (beta == 0.0) {
    rows = kl_rows(lp, lq);
  } else if (beta == 1.0) {
    rows = kl_rows(lq, lp);
  } else {
    const at::Tensor m = beta * at::exp(lp) + (1 - beta) * at::exp(lq);
    const at::Tensor lm = at::log(at::where(m != 0, m, at::ones({}, m.options())));
    rows = beta * kl_rows(lp, lm) + (1 - beta) * kl_rows(lq, lm);
  }
  rows = rows * (temperature * temperature);
  if (has_target) rows = at::where(keep, rows, at::zeros({}, rows.options()));
  if (reduction == kReductionNone) return as_out(rows, out_dtype);
  const at::Tensor total = rows.sum();
  if (reduction == kReductionSum) return as_out(total, out_dtype);
  at::Tensor count = has_target ? keep.sum().to(total.scalar_type())
                                : at::scalar_tensor(rows.sym_numel(), total.options());
  if (reduction == kReductionMean) count = count * s.sym_size(-1);
  const at::Tensor safe = at::clamp_min(count, 1);
  const at::Tensor nan_if_empty =
      at::where(count == 0, at::full({}, std::numeric_limits<double>::quiet_NaN(), total.options()),
                at::zeros({}, total.options()));
  return as_out(total / safe + nan_if_empty, out_dtype);
}

// torch's linear_cross_entropy reference path: linear (a K-dimensional
// weight (V, d1, ..., dK, D) is flattened to (V * d1 * ... * dK, D) and its
// logits reshaped to (N, V, d1, ..., dK)), then cross entropy. chunk_size has
// no meaning here.
at::Tensor linear_cross_entropy(const at::Tensor& input, const at::Tensor& linear_weight, const at::Tensor& target,
                                const std::optional<at::Tensor>& linear_bias, const std::optional<at::Tensor>& weight,
                                int64_t ignore_index, int64_t reduction, double label_smoothing,
                                double lse_square_scale, std::optional<double> softcap, int64_t /*chunk_size*/,
                                std::optional<at::ScalarType> out_dtype) {
  at::Tensor w = linear_weight;
  std::optional<at::Tensor> b = linear_bias;
  std::vector<c10::SymInt> logits_shape(input.sym_sizes().begin(), input.sym_sizes().end() - 1);
  for (int64_t d = 0; d + 1 < w.dim(); ++d) logits_shape.push_back(w.sym_size(d));
  if (w.dim() > 2) {
    w = w.reshape_symint({-1, w.sym_size(-1)});
    if (b.has_value() && b->defined()) b = b->reshape_symint({-1});
  }
  const at::Tensor logits = at::linear(input, w, b).reshape_symint(logits_shape);
  return cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
                       false, out_dtype);
}

}  // namespace fusedloss::composite

TORCH_LIBRARY_IMPL(fusedloss, CompositeImplicitAutograd, m) {
  using namespace fusedloss::composite;
  m.impl("bce_with_logits_composite", &bce_with_logits);
  m.impl("mse_composite", &mse);
  m.impl("hinge_embedding_composite", &hinge_embedding);
  m.impl("soft_margin_composite", &soft_margin);
  m.impl("hinge_composite", &hinge);
  m.impl("multi_margin_composite", &multi_margin);
  m.impl("cross_entropy_composite", &cross_entropy);
  m.impl("sigmoid_focal_composite", &sigmoid_focal);
  m.impl("multilabel_soft_margin_composite", &multilabel_soft_margin);
  m.impl("distill_composite", &distill);
  m.impl("linear_cross_entropy_composite", &linear_cross_entropy);
}
