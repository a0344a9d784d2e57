// linear_cross_entropy: the chunk loop and the op bodies, written once for
// every device (see fusedloss/linear_cross_entropy_host.h). torch's reference
// is linear(input, linear_weight, linear_bias) followed by cross_entropy; the
// logits here exist one chunk of rows at a time, in the input's dtype as
// torch's linear returns them, and everything after the GEMM is computed in
// fp32 (fp64 for fp64) registers by cross_entropy's row engine.
//
// Gradients: for a scalar loss the forward can compute them for grad_output =
// 1 (kFused), so that the backward only scales them; for 'none' the forward
// keeps the per-row (max, lse) and the backward recomputes each chunk's logits
// (kGrad). grad_input's rows come from one GEMM per chunk and are complete
// after it (a chunk holds whole rows); grad_weight and grad_bias are summed
// over chunks in chunk order, in fp32 for fp16/bf16 weights, and rounded once.

#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <fusedloss/checks.h>
#include <fusedloss/elementwise_host.h>
#include <fusedloss/linear_cross_entropy_host.h>
#include <fusedloss/outputs.h>

#include <algorithm>

namespace fusedloss {
namespace {

bool half_type(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// The raw ops' arguments: fusedloss.functional raises torch's messages first;
// these keep a direct call memory safe. Calls the kernels do not take (a
// K-dimensional weight, mixed dtypes torch would promote or refuse) are
// refused, and the functional runs the composite, which raises torch's error
// or computes torch's result.
void check_lce(const char* op, const at::Tensor& input, const at::Tensor& w, const at::Tensor& target,
               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& weight, int64_t reduction,
               double label_smoothing, const std::optional<double>& softcap) {
  check_reduction(op, reduction);
  check_floating(op, "input", input);
  TORCH_CHECK(input.dim() == 1 || input.dim() == 2, op, ": input must be (D) or (N, D), got ", input.sizes());
  TORCH_CHECK(w.dim() == 2, op, ": linear_weight must be (V, D), got ", w.sizes());
  check_like(op, "linear_weight", w, input);
  TORCH_CHECK(w.size(1) == input.size(-1), op, ": linear_weight ", w.sizes(), " does not match input ",
              input.sizes());
  const int64_t V = w.size(0);
  TORCH_CHECK(V > 0, op, ": linear_weight must have at least one row");
  if (bias.has_value() && bias->defined()) {
    check_like(op, "linear_bias", *bias, input);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V, op, ": linear_bias must be (", V, "), got ",
                bias->sizes());
  }
  TORCH_CHECK(label_smoothing <= 1.0, op, ": label_smoothing must be at most 1, got ", label_smoothing);
  TORCH_CHECK(!softcap.has_value() || *softcap > 0.0, op, ": softcap must be positive");
  check_device(op, "target", target, input);
  std::vector<int64_t> logits_shape = input.sizes().vec();
  logits_shape.back() = V;
  const bool prob = target.sizes() == at::IntArrayRef(logits_shape);
  if (weight.has_value() && weight->defined()) {
    check_device(op, "weight", *weight, input);
    check_floating(op, "weight", *weight);
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == V, op, ": weight must have shape [", V, "], got ",
                weight->sizes());
  }
  if (prob) {
    check_floating(op, "target", target);
    // fp64 probabilities (or weight) promote torch's computation to fp64.
    const bool wide = target.scalar_type() == at::kDouble ||
                      (weight.has_value() && weight->defined() && weight->scalar_type() == at::kDouble);
    TORCH_CHECK(input.scalar_type() == at::kDouble || !wide, op,
                ": fp64 probabilities or class weight with lower-precision logits are not fused");
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte, op,
                ": class-index targets must be int64 or uint8, got ", target.scalar_type());
    const int64_t n = input.dim() == 2 ? input.size(0) : 1;
    TORCH_CHECK(target.numel() == n && target.dim() == input.dim() - 1, op, ": target of shape ", target.sizes(),
                " does not match the input's batch");
  }
}

LceInputs prepare(const at::Tensor& input, const at::Tensor& w, const at::Tensor& target,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& weight,
                  int64_t ignore_index, double label_smoothing, double lse_square_scale,
                  const std::optional<double>& softcap) {
  LceInputs in;
  in.x = input.dim() == 1 ? input.unsqueeze(0) : input;
  in.w = w;
  in.b = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  in.N = in.x.size(0);
  in.D = in.x.size(1);
  in.V = w.size(0);
  std::vector<int64_t> logits_shape = input.sizes().vec();
  logits_shape.back() = in.V;
  in.prob = target.sizes() == at::IntArrayRef(logits_shape);
  if (in.prob) {
    in.target = input.dim() == 1 ? target.unsqueeze(0) : target;  // read with its own strides and dtype
  } else {
    in.target = finish(target.reshape({in.N}), at::kLong).contiguous();
  }
  const auto acc = opmath_type(input.scalar_type());
  if (weight.has_value() && weight->defined()) in.weight = weight->to(acc).contiguous();
  in.ignore_index = ignore_index;
  in.label_smoothing = label_smoothing;
  in.lse_square_scale = lse_square_scale;
  in.softcap = softcap;
  return in;
}

// torch's loss dtype: the logits' (the input's) for class indices, promoted
// with the probabilities (and class weight) for probability targets.
at::ScalarType loss_dtype(const LceInputs& in, at::ScalarType input_type, const std::optional<at::Tensor>& weight,
                          const std::optional<at::ScalarType>& out) {
  if (out.has_value()) {
    TORCH_CHECK(at::isFloatingType(*out), "fusedloss: out_dtype must be a floating dtype, got ", *out);
    return *out;
  }
  if (!in.prob) return input_type;
  at::ScalarType t = c10::promoteTypes(input_type, in.target.scalar_type());
  if (weight.has_value() && weight->defined()) t = c10::promoteTypes(t, weight->scalar_type());
  return t;
}

std::vector<int64_t> batch_shape(const at::Tensor& input) {
  return input.dim() == 2 ? std::vector<int64_t>{input.size(0)} : std::vector<int64_t>{};
}

}  // namespace

// Gradient buffers of a call: grad_input in the input's dtype; grad_weight and
// grad_bias accumulators in fp32 for fp16/bf16 unless a single chunk gives
// them whole (then in their own dtype: one GEMM, rounded once).
LceGrads lce_make_grads(const LceInputs& in, std::array<bool, 3> mask, int64_t chunk_rows) {
  LceGrads g;
  const bool single = in.N <= chunk_rows;
  const auto t = in.x.scalar_type();
  const auto acc = half_type(t) && !single ? at::kFloat : t;
  if (mask[0]) g.input = empty_output({in.N, in.D}, in.x.options());
  // An fp32 accumulator is transient (rounded into the gradient at the end):
  // not cached either.
  if (mask[1]) g.weight = acc == t ? empty_output({in.V, in.D}, in.x.options()) : at::empty({in.V, in.D}, in.x.options().dtype(acc));
  if (mask[2] && in.b.defined()) g.bias = at::empty({in.V}, in.x.options().dtype(acc));
  return g;
}

// The gradients as returned: each in its parameter's dtype and shape (the
// accumulators rounded once), or an empty (0,) tensor when not wanted.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_finish_grads(LceGrads& g, const at::Tensor& input,
                                                                const at::Tensor& w) {
  const auto opts = input.options();
  auto done = [&](at::Tensor& t, at::ScalarType dtype) {
    if (!t.defined()) return at::empty({0}, opts);
    at::Tensor r = finish(t, dtype);
    t = at::Tensor();  // an fp32 accumulator is freed before the next is rounded
    return r;
  };
  at::Tensor gi = g.input.defined() ? g.input.view(input.sizes()) : at::empty({0}, opts);
  at::Tensor gw = done(g.weight, w.scalar_type());
  at::Tensor gb = done(g.bias, w.scalar_type());
  return {gi, gw, gb};
}

int64_t lce_chunk_rows(const LceDevice& dev, int64_t N, int64_t V, at::ScalarType dtype, int64_t chunk_size) {
  if (N <= 0) return 1;
  int64_t rows = chunk_size;
  if (rows <= 0) {
    rows = std::max<int64_t>(1, dev.chunk_budget_bytes() / std::max<int64_t>(1, V * c10::elementSize(dtype)));
  }
  rows = std::min(rows, N);
  const int64_t chunks = (N + rows - 1) / rows;
  return (N + chunks - 1) / chunks;
}

void lce_chunks(const LceDevice& dev, const LceInputs& in, int64_t chunk_rows, const LceChunkFn& on_chunk,
                LceGrads* grads) {
  if (in.N == 0) return;
  // One buffer for every chunk's logits (and then their gradient). Not from
  // the CPU output cache: it is freed before the gradients are rounded, and
  // a cached copy would stay resident through the rest of the step.
  const at::Tensor buffer = at::empty({chunk_rows, in.V}, in.x.options());
  int64_t k = 0;
  for (int64_t r0 = 0; r0 < in.N; r0 += chunk_rows, ++k) {
    const int64_t n = std::min(chunk_rows, in.N - r0);
    const at::Tensor logits = buffer.narrow(0, 0, n);
    const at::Tensor xc = in.x.narrow(0, r0, n);
    dev.logits(logits, xc, in.w, in.b);
    on_chunk(logits, r0, n);
    if (grads == nullptr) continue;
    if (grads->input.defined()) dev.grad_input(grads->input.narrow(0, r0, n), logits, in.w);
    if (grads->weight.defined() || grads->bias.defined()) dev.grad_weight(grads->weight, grads->bias, logits, xc, k == 0);
  }
}

void lce_ce_rows(const LceDevice& dev, const LceInputs& in, CeRowPhase phase, const LceRowState& st,
                 const at::Tensor& logits, int64_t r0, int64_t n) {
  TORCH_INTERNAL_ASSERT(logits.dim() == 2 && logits.stride(1) == 1 && logits.size(0) == n && logits.size(1) == in.V);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "linear_cross_entropy_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    CeParams<scalar_t> p;
    p.g.N = n;
    p.g.C = in.V;
    p.g.S = 1;
    p.g.sN = logits.stride(0);
    p.g.sC = 1;
    p.g.sS = 1;
    p.input = logits.const_data_ptr<scalar_t>();
    if (in.prob) {
      const at::Tensor t = in.target.narrow(0, r0, n);
      p.target_prob = t.const_data_ptr();
      p.target_dtype = dtype_code(t.scalar_type());
      p.tN = t.stride(0);
      p.tC = t.stride(1);
      p.tS = 0;
    } else {
      p.target_index = in.target.const_data_ptr<int64_t>() + r0;
    }
    p.opt.num_classes = in.V;
    p.opt.ignore_index = in.ignore_index;
    p.opt.smoothing = in.label_smoothing > 0.0 ? static_cast<acc_t>(in.label_smoothing) : acc_t(0);
    p.opt.z_loss = static_cast<acc_t>(in.lse_square_scale);
    p.opt.weight_sum = static_cast<acc_t>(in.V);
    if (in.weight.defined()) {
      p.weight = in.weight.const_data_ptr<acc_t>();
      p.weight_sum = st.stats.const_data_ptr<acc_t>() + 1;
    }
    p.has_softcap = in.softcap.has_value();
    if (p.has_softcap) {
      p.softcap = static_cast<acc_t>(*in.softcap);
      p.inv_softcap = static_cast<acc_t>(1.0 / *in.softcap);
    }
    if (phase != CeRowPhase::kGrad) {
      p.lse_out = st.lse.mutable_data_ptr<acc_t>() + 2 * r0;
      p.loss_out = st.rows.mutable_data_ptr<acc_t>() + r0;
      p.weight_out = p.loss_out + in.N;
      if (in.prob) p.target_mass_out = st.target_mass.mutable_data_ptr<acc_t>() + r0;
    }
    if (phase != CeRowPhase::kStats) {
      p.lse = st.lse.const_data_ptr<acc_t>() + 2 * r0;
      if (in.prob) p.target_mass = st.target_mass.const_data_ptr<acc_t>() + r0;
      p.grad = st.grad.const_data_ptr<acc_t>() + (st.grad_per_row ? r0 : 0);
      p.grad_per_row = st.grad_per_row;
      p.denominator = st.divide ? st.stats.const_data_ptr<acc_t>() : nullptr;
      p.grad_input = logits.mutable_data_ptr<scalar_t>();
      p.gN = logits.stride(0);
      p.gC = 1;
      p.gS = 1;
    }
    dev.rows(phase, in.prob, p);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lce_forward(
    const LceDevice& dev, const at::Tensor& input, const at::Tensor& linear_weight, const at::Tensor& target,
    const std::optional<at::Tensor>& linear_bias, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    int64_t reduction, double label_smoothing, double lse_square_scale, std::optional<double> softcap,
    int64_t chunk_size, std::optional<at::ScalarType> out_dtype, std::array<bool, 3> grad_mask) {
  constexpr const char* op = "fusedloss::linear_cross_entropy_forward";
  // The ATen ops below work on the kernel's own buffers: no autograd, also
  // when a direct call passes tensors that require grad.
  const at::AutoDispatchBelowADInplaceOrView below;
  check_lce(op, input, linear_weight, target, linear_bias, weight, reduction, label_smoothing, softcap);
  const c10::OptionalDeviceGuard guard(input.device());
  const LceInputs in =
      prepare(input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing, lse_square_scale,
              softcap);
  TORCH_CHECK(!in.prob || ignore_index < 0, "ignore_index is not supported for floating point target");
  const at::ScalarType loss_type = loss_dtype(in, input.scalar_type(), weight, out_dtype);
  const auto acc_type = opmath_type(input.scalar_type());
  const auto acc_opts = input.options().dtype(acc_type);
  const auto batch = batch_shape(input);

  LceRowState st;
  st.lse = at::empty({in.N, 2}, acc_opts);
  st.rows = at::empty({2, in.N}, acc_opts);
  st.target_mass = at::empty({in.prob ? in.N : 0}, acc_opts);
  st.stats = at::empty({2}, acc_opts);
  if (in.weight.defined()) {
    dev.sum(in.weight, st.stats.select(0, 1));
  } else {
    st.stats.select(0, 1).fill_(static_cast<double>(in.V));
  }

  const int64_t chunk_rows = lce_chunk_rows(dev, in.N, in.V, input.scalar_type(), chunk_size);
  const bool want_grads = reduction != kReductionNone && (grad_mask[0] || grad_mask[1] || grad_mask[2]);
  LceGrads grads;
  if (want_grads) {
    grads = lce_make_grads(in, grad_mask, chunk_rows);
    // The mean's denominator is needed before the first chunk's gradient:
    // the weights of the kept targets, summed on the device.
    at::Tensor denominator = st.stats.select(0, 0);
    if (reduction == kReductionSum) {
      denominator.fill_(1);
    } else if (in.prob) {
      denominator.fill_(static_cast<double>(in.N));
    } else {
      const at::Tensor kept = in.target.ne(in.ignore_index);
      // Out-of-range targets are reported by the row phase; here they must not index out of bounds.
      const at::Tensor w_t = in.weight.defined() ? in.weight.index_select(0, in.target.clamp(0, in.V - 1))
                                                 : at::ones({in.N}, acc_opts);
      dev.sum(at::where(kept, w_t, at::zeros_like(w_t)), denominator);
    }
    st.grad = at::ones({1}, acc_opts);
    st.divide = reduction == kReductionMean;
  }
  const CeRowPhase phase = want_grads ? CeRowPhase::kFused : CeRowPhase::kStats;
  lce_chunks(
      dev, in, chunk_rows,
      [&](const at::Tensor& logits, int64_t r0, int64_t n) { lce_ce_rows(dev, in, phase, st, logits, r0, n); },
      want_grads ? &grads : nullptr);
  if (want_grads && in.N == 0) {
    if (grads.weight.defined()) grads.weight.zero_();
    if (grads.bias.defined()) grads.bias.zero_();
  }

  at::Tensor loss;
  if (reduction == kReductionNone) {
    loss = finish(st.rows.select(0, 0).view(batch), loss_type);
    st.stats.select(0, 0).fill_(1);
  } else {
    loss = at::empty({}, input.options().dtype(loadable(loss_type, acc_type) ? loss_type : acc_type));
    at::Tensor denominator = st.stats.select(0, 0);
    dev.reduce(st.rows.select(0, 0), st.rows.select(0, 1), reduction, loss,
               reduction == kReductionMean ? &denominator : nullptr);
    loss = finish(loss, loss_type);
    if (reduction != kReductionMean) denominator.fill_(1);
  }
  auto [gi, gw, gb] = lce_finish_grads(grads, input, linear_weight);
  auto lse_shape = batch;
  lse_shape.push_back(2);
  return {loss, st.lse.view(lse_shape), st.stats, st.target_mass.view(in.prob ? at::IntArrayRef(batch) : at::IntArrayRef({0})),
          gi, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_backward(
    const LceDevice& dev, const at::Tensor& grad, const at::Tensor& input, const at::Tensor& linear_weight,
    const at::Tensor& target, const std::optional<at::Tensor>& linear_bias, const std::optional<at::Tensor>& weight,
    const at::Tensor& lse, const at::Tensor& stats, const at::Tensor& target_mass, int64_t ignore_index,
    int64_t reduction, double label_smoothing, double lse_square_scale, std::optional<double> softcap,
    int64_t chunk_size, std::array<bool, 3> output_mask) {
  constexpr const char* op = "fusedloss::linear_cross_entropy_backward";
  // The ATen ops below work on the kernel's own buffers: no autograd, also
  // when a direct call passes tensors that require grad.
  const at::AutoDispatchBelowADInplaceOrView below;
  check_lce(op, input, linear_weight, target, linear_bias, weight, reduction, label_smoothing, softcap);
  const c10::OptionalDeviceGuard guard(input.device());
  const LceInputs in =
      prepare(input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing, lse_square_scale,
              softcap);
  const auto acc_type = opmath_type(input.scalar_type());
  auto saved = [&](const at::Tensor& t, int64_t n, const char* name) {
    TORCH_CHECK(t.scalar_type() == acc_type && t.device() == input.device() && t.numel() == n && t.is_contiguous(),
                op, ": '", name, "' must be the forward's (", n, " contiguous ", acc_type, " values)");
  };
  saved(lse, 2 * in.N, "lse");
  saved(stats, 2, "stats");
  saved(target_mass, in.prob ? in.N : 0, "target_mass");
  check_device(op, "grad", grad, input);
  check_floating(op, "grad", grad);
  TORCH_CHECK(grad.numel() == (reduction == kReductionNone ? in.N : 1), op, ": grad must have the loss's shape");

  LceRowState st;
  st.lse = lse;
  st.target_mass = target_mass;
  st.stats = stats;
  st.grad = finish(grad, acc_type).contiguous().view({-1});
  st.grad_per_row = reduction == kReductionNone;
  st.divide = reduction == kReductionMean;
  const int64_t chunk_rows = lce_chunk_rows(dev, in.N, in.V, input.scalar_type(), chunk_size);
  const std::array<bool, 3> mask{output_mask[0], output_mask[1], output_mask[2] && in.b.defined()};
  LceGrads grads = lce_make_grads(in, mask, chunk_rows);
  if (mask[0] || mask[1] || mask[2]) {
    lce_chunks(
        dev, in, chunk_rows,
        [&](const at::Tensor& logits, int64_t r0, int64_t n) {
          lce_ce_rows(dev, in, CeRowPhase::kGrad, st, logits, r0, n);
        },
        &grads);
    if (in.N == 0) {
      if (grads.weight.defined()) grads.weight.zero_();
      if (grads.bias.defined()) grads.bias.zero_();
    }
  }
  return lce_finish_grads(grads, input, linear_weight);
}

}  // namespace fusedloss
