#pragma once
// Cross entropy host code shared by the CPU and CUDA implementations:
// geometry of the logits, validation of the raw op's arguments, the kernel
// parameter block, and the op bodies templated on a device Engine that runs
// the per-row kernels:
//   Engine::forward_rows<scalar_t, kProb>(CeParams&)   lse, loss and mean weight per row
//   Engine::backward_rows<scalar_t, kProb>(CeParams&)  gradients, one pass over the logits
// plus the elementwise Engine (elementwise_ops.h) for the deterministic sum of
// the per-row losses.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <fusedloss/checks.h>
#include <fusedloss/dtypes.h>
#include <fusedloss/elementwise_host.h>
#include <fusedloss/numerics.h>
#include <fusedloss/outputs.h>
#include <fusedloss/row_sum.h>

#include <optional>
#include <tuple>

namespace fusedloss {

// The logits as (N, C, S): batch, classes, and the flattened trailing dims, with
// one stride each. Row r = n * S + s is the distribution at (n, s).
struct CeGeometry {
  int64_t N = 1, C = 1, S = 1;
  int64_t sN = 0, sC = 1, sS = 0;
  C10_HOST_DEVICE int64_t rows() const { return N * S; }
};

// Strides of t (shaped like the logits) as (N, C, S), if its trailing dims
// merge into one stride.
inline bool ce_strides(const at::Tensor& t, int64_t* sN, int64_t* sC, int64_t* sS) {
  const int64_t nd = t.dim();
  if (nd == 1) {
    *sN = 0;
    *sC = t.stride(0);
    *sS = 0;
    return true;
  }
  *sN = t.stride(0);
  *sC = t.stride(1);
  int64_t stride = 0, span = 1;
  bool first = true;
  for (int64_t d = nd - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;
    if (first) {
      stride = t.stride(d);
      first = false;
    } else if (t.stride(d) != stride * span) {
      return false;
    }
    span *= t.size(d);
  }
  *sS = first ? 1 : stride;
  return true;
}

// The geometry of `input`; `input` is replaced by a contiguous copy only if its
// trailing dims cannot be merged (a layout no model produces in practice).
inline CeGeometry ce_geometry(at::Tensor& input) {
  CeGeometry g;
  if (input.dim() == 1) {
    g.C = input.size(0);
  } else {
    g.N = input.size(0);
    g.C = input.size(1);
    for (int64_t d = 2; d < input.dim(); ++d) g.S *= input.size(d);
  }
  if (!ce_strides(input, &g.sN, &g.sC, &g.sS)) {
    input = input.contiguous();
    ce_strides(input, &g.sN, &g.sC, &g.sS);
  }
  return g;
}

// Shape of per-row outputs: () for unbatched logits, else (N, d1, ..., dK).
inline std::vector<int64_t> ce_batch_shape(const at::Tensor& input) {
  std::vector<int64_t> shape;
  if (input.dim() == 1) return shape;
  shape.push_back(input.size(0));
  for (int64_t d = 2; d < input.dim(); ++d) shape.push_back(input.size(d));
  return shape;
}

// Everything a row kernel needs, as plain data (passed by value to CUDA kernels).
template <typename scalar_t>
struct CeParams {
  using acc_t = at::opmath_type<scalar_t>;
  CeGeometry g;
  const scalar_t* input = nullptr;
  const int64_t* target_index = nullptr;  // class indices, one per row (contiguous)
  const void* target_prob = nullptr;      // probabilities, shaped like the logits, in their own dtype
  int8_t target_dtype = kF32;
  int64_t tN = 0, tC = 0, tS = 0;
  const acc_t* weight = nullptr;          // (C) in the accumulation type, contiguous, or null
  const acc_t* weight_sum = nullptr;      // sum(weight) on the device (read by kernels), or null
  math::CeOptions<acc_t> opt{};
  bool has_softcap = false;
  acc_t softcap = 0, inv_softcap = 0;
  // forward outputs, per row; lse_out holds (max, log(sum exp(x - max))) pairs
  acc_t* lse_out = nullptr;
  acc_t* loss_out = nullptr;
  acc_t* weight_out = nullptr;       // the row's share of the mean's denominator
  acc_t* target_mass_out = nullptr;  // sum_c w_c p'_c (probability targets)
  // backward inputs and outputs
  const acc_t* lse = nullptr;
  const acc_t* target_mass = nullptr;
  const acc_t* grad = nullptr;  // one per row ('none'), or a single value
  bool grad_per_row = false;
  const acc_t* denominator = nullptr;  // divides grad (mean), or null
  scalar_t* grad_input = nullptr;      // shaped like the logits
  int64_t gN = 0, gC = 0, gS = 0;
  void* grad_target = nullptr;         // probability targets only, in the target's dtype
  int8_t grad_target_dtype = kF32;
  int64_t gtN = 0, gtC = 0, gtS = 0;

  // Probability target element `idx` (an offset under tN/tC/tS), widened.
  C10_HOST_DEVICE acc_t target_at(int64_t idx) const { return load_value<acc_t>(target_prob, target_dtype, idx); }
  C10_HOST_DEVICE acc_t weight_at(int64_t c) const { return weight != nullptr ? weight[c] : acc_t(1); }

  // Element offset of `row` under strides (sN, sS).
  C10_HOST_DEVICE int64_t offset(int64_t row, int64_t sN_, int64_t sS_) const {
    const int64_t n = row / g.S;
    return n * sN_ + (row - n * g.S) * sS_;
  }
  // Options with the weight sum read (on the device, in a kernel).
  C10_HOST_DEVICE math::CeOptions<acc_t> options() const {
    math::CeOptions<acc_t> o = opt;
    if (weight_sum != nullptr) o.weight_sum = *weight_sum;
    return o;
  }
  // A row's grad_output, divided by the mean's denominator.
  C10_HOST_DEVICE acc_t row_grad(int64_t row) const {
    acc_t gv = grad[grad_per_row ? row : 0];
    if (denominator != nullptr) gv = gv / *denominator;
    return gv;
  }

  // Forward outputs of a row, from its merged state. An ignored row adds
  // nothing to the loss or the mean's denominator.
  C10_HOST_DEVICE void store_ignored_row(int64_t row) const {
    lse_out[2 * row] = acc_t(0);
    lse_out[2 * row + 1] = acc_t(0);
    loss_out[row] = acc_t(0);
    weight_out[row] = acc_t(0);
  }
  // x_t and w_t: the target's (capped) logit and class weight.
  C10_HOST_DEVICE void store_index_row(int64_t row, const math::RowState<acc_t>& st, acc_t x_t, acc_t w_t,
                                       const math::CeOptions<acc_t>& o) const {
    store_index_row_with_log(row, st, math::Ops<acc_t>::log(st.sum), x_t, w_t, o);
  }
  // The same, with ls = log(st.sum) already taken (the CPU takes the logs of
  // a vector's worth of rows in one call).
  C10_HOST_DEVICE void store_index_row_with_log(int64_t row, const math::RowState<acc_t>& st, acc_t ls, acc_t x_t,
                                                acc_t w_t, const math::CeOptions<acc_t>& o) const {
    lse_out[2 * row] = st.max;
    lse_out[2 * row + 1] = ls;
    loss_out[row] = math::ce_index_loss(st.max, ls, st.rel, x_t, w_t, o);
    weight_out[row] = w_t;
  }
  C10_HOST_DEVICE void store_prob_row(int64_t row, const math::RowState<acc_t>& st,
                                      const math::CeOptions<acc_t>& o) const {
    const acc_t ls = store_lse(row, st);
    target_mass_out[row] = st.mass;
    loss_out[row] = math::ce_prob_loss(st.max, ls, st.mass, st.rel, o);
    weight_out[row] = acc_t(1);
  }

 private:
  C10_HOST_DEVICE acc_t store_lse(int64_t row, const math::RowState<acc_t>& st) const {
    const acc_t ls = math::Ops<acc_t>::log(st.sum);
    lse_out[2 * row] = st.max;
    lse_out[2 * row + 1] = ls;
    return ls;
  }
};

// The raw op's arguments: Python validates with torch's messages first; these
// checks keep a direct call memory safe. Probability targets may have any
// floating dtype, the class weight too (the functional applies torch's dtype
// rules; the kernels read both widened).
inline void check_cross_entropy(const char* op, const at::Tensor& input, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, int64_t reduction, double label_smoothing,
                                const std::optional<double>& softcap) {
  check_reduction(op, reduction);
  check_floating(op, "input", input);
  TORCH_CHECK(input.dim() >= 1, op, ": input must have a class dimension");
  check_device(op, "target", target, input);
  TORCH_CHECK(label_smoothing <= 1.0, op, ": label_smoothing must be at most 1, got ", label_smoothing);
  TORCH_CHECK(!softcap.has_value() || *softcap > 0.0, op, ": softcap must be positive");
  const int64_t C = input.dim() == 1 ? input.size(0) : input.size(1);
  TORCH_CHECK(C > 0, op, ": input must have at least one class");
  if (weight.has_value() && weight->defined()) {
    check_device(op, "weight", *weight, input);
    check_floating(op, "weight", *weight);
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == C, op, ": weight must have shape [", C, "], got ",
                weight->sizes());
  }
  if (target.sizes() == input.sizes()) {
    check_floating(op, "target", target);
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte, op,
                ": class-index targets must be int64 or uint8, got ", target.scalar_type());
    const auto batch = ce_batch_shape(input);
    TORCH_CHECK(target.numel() == c10::multiply_integers(batch) &&
                    (input.dim() == 1 || target.sizes() == at::IntArrayRef(batch)),
                op, ": target of shape ", target.sizes(), " does not match the input's batch shape ",
                at::IntArrayRef(batch));
  }
}

// The dtype the kernels compute in: the input's, or fp64 when probability
// targets or the class weight bring fp64 to non-fp64 logits (torch promotes;
// the rare call then reads an fp64 copy of the logits).
inline at::ScalarType ce_compute_dtype(const at::Tensor& input, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight) {
  const bool prob = target.sizes() == input.sizes();
  if (input.scalar_type() == at::kDouble) return at::kDouble;
  if ((prob && target.scalar_type() == at::kDouble) ||
      (prob && weight.has_value() && weight->defined() && weight->scalar_type() == at::kDouble)) {
    return at::kDouble;
  }
  return input.scalar_type();
}

// torch's loss dtype: the input's for class indices; promoted with the target
// (and weight) for probabilities.
inline at::ScalarType ce_loss_dtype(const at::Tensor& input, const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight,
                                    const std::optional<at::ScalarType>& out_dtype) {
  if (out_dtype.has_value()) {
    TORCH_CHECK(at::isFloatingType(*out_dtype), "fusedloss: out_dtype must be a floating dtype, got ", *out_dtype);
    return *out_dtype;
  }
  if (target.sizes() != input.sizes()) return input.scalar_type();
  at::ScalarType t = c10::promoteTypes(input.scalar_type(), target.scalar_type());
  if (weight.has_value() && weight->defined()) t = c10::promoteTypes(t, weight->scalar_type());
  return t;
}

// The gradient is written over the logits only where that is memory safe:
// every element written exactly once, by the row that read it.
inline void check_inplace_target(const char* op, const at::Tensor& input) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(input) == at::MemOverlap::No, op,
                    ": the logits overlap themselves in memory (e.g. an expanded tensor), so their gradient "
                    "cannot be written over them");
  TORCH_CHECK_VALUE(input.is_non_overlapping_and_dense(), op,
                    ": the logits are not dense in memory, so their gradient cannot be written over them");
}

// Saved state of a forward, read by the backward.
//   lse          (batch, 2) accumulation dtype: per row the max m and ls = log(sum exp(x - m)),
//                apart because exp((x - m) - ls) is accurate where exp(x - (m + ls)) is not
//   stats        (2,): [denominator of the mean (reduction 'mean' only), sum(weight) (C if none)]
//   target_mass  (batch) sum_c w_c p'_c for probability targets, (0,) for class indices
template <typename Engine, typename ElementwiseEngine>
struct CrossEntropyOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& input_, const at::Tensor& target_, const std::optional<at::Tensor>& weight_,
      int64_t ignore_index, int64_t reduction, double label_smoothing, double lse_square_scale,
      std::optional<double> softcap, std::optional<at::ScalarType> out_dtype) {
    constexpr const char* op = "fusedloss::cross_entropy_forward";
    check_cross_entropy(op, input_, target_, weight_, reduction, label_smoothing, softcap);
    TORCH_CHECK(target_.sizes() != input_.sizes() || ignore_index < 0,
                "ignore_index is not supported for floating point target");
    const c10::OptionalDeviceGuard guard(input_.device());
    const bool prob = target_.sizes() == input_.sizes();
    const at::ScalarType loss_type = ce_loss_dtype(input_, target_, weight_, out_dtype);
    at::Tensor input = compute_input(input_, target_, weight_);
    const CeGeometry g = ce_geometry(input);
    const auto batch = ce_batch_shape(input_);
    const auto acc_type = opmath_type(input.scalar_type());
    const auto acc_opts = input.options().dtype(acc_type);
    auto lse_shape = batch;
    lse_shape.push_back(2);
    at::Tensor lse = at::empty(lse_shape, acc_opts);
    // Per row: the loss, then its weight in the mean's denominator. For
    // 'none' the losses are the output (shaped like the batch).
    const bool none = reduction == kReductionNone;
    at::Tensor rows = at::empty({none ? g.rows() : 2 * g.rows()}, acc_opts);
    at::Tensor row_loss = none ? at::empty(batch, acc_opts) : rows;
    at::Tensor target_mass = at::empty(prob ? at::IntArrayRef(batch) : at::IntArrayRef({0}), acc_opts);
    // [the mean's denominator (written by the sum below; unused for 'none' and
    // 'sum'), sum(weight)]: one fill, then the sums write their entries.
    at::Tensor stats = at::empty({2}, acc_opts);
    if (stats.is_cpu()) {
      // Two stores: a fill_ would set up a TensorIterator, ~0.3 us of a call
      // that at small batches takes a few.
      AT_DISPATCH_FLOATING_TYPES(acc_type, "cross_entropy_stats", [&] {
        scalar_t* s = stats.mutable_data_ptr<scalar_t>();
        s[0] = s[1] = static_cast<scalar_t>(g.C);
      });
    } else {
      stats.fill_(static_cast<double>(g.C));
    }
    Keep keep;
    keep.weight = acc_weight(weight_, acc_type);
    keep.target = target_;
    if (keep.weight.defined()) {
      sum_into<ElementwiseEngine>(keep.weight, OutSlot{static_cast<char*>(stats.data_ptr()) + stats.element_size(),
                                                       acc_type});
    }

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cross_entropy", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      CeParams<scalar_t> p;
      fill_common(p, g, input, keep.weight, stats, ignore_index, label_smoothing, lse_square_scale, softcap);
      p.lse_out = lse.mutable_data_ptr<acc_t>();
      p.loss_out = row_loss.mutable_data_ptr<acc_t>();
      p.weight_out = rows.mutable_data_ptr<acc_t>() + (none ? 0 : g.rows());
      if (prob) p.target_mass_out = target_mass.mutable_data_ptr<acc_t>();
      set_target(p, keep.target, prob, acc_type);
      if (g.rows() == 0) return;
      if (prob) {
        Engine::template forward_rows<scalar_t, true>(p);
      } else {
        Engine::template forward_rows<scalar_t, false>(p);
      }
    });

    at::Tensor loss;
    if (none) {
      loss = finish(row_loss, loss_type);
    } else {
      loss = at::empty({}, input.options().dtype(loadable(loss_type, acc_type) ? loss_type : acc_type));
      const OutSlot out{loss.data_ptr(), loss.scalar_type()};
      AT_DISPATCH_FLOATING_TYPES(acc_type, "cross_entropy_sum", [&] {
        scalar_t* denominator = reduction == kReductionMean ? stats.mutable_data_ptr<scalar_t>() : nullptr;
        if (host_summable(rows)) {
          const scalar_t* r = rows.const_data_ptr<scalar_t>();
          host_sums<scalar_t>(r, r + g.rows(), g.rows(), reduction, out, denominator);
          return;
        }
        ElementwiseCall c(g.rows(), input.device(), acc_type);
        c.set_flat(0, rows, 0);
        c.set_flat(1, rows, g.rows());
        ElementwiseEngine::template forward<scalar_t>(c, Sums<scalar_t, 2>{}, reduction, out, denominator);
      });
      loss = finish(loss, loss_type);
    }
    return {loss, lse, stats, target_mass};
  }

  static std::tuple<at::Tensor, at::Tensor> backward(
      const at::Tensor& grad, const at::Tensor& input_, const at::Tensor& target,
      const std::optional<at::Tensor>& weight_, const at::Tensor& lse, const at::Tensor& stats,
      const at::Tensor& target_mass, int64_t ignore_index, int64_t reduction, double label_smoothing,
      double lse_square_scale, std::optional<double> softcap, std::array<bool, 2> output_mask) {
    constexpr const char* op = "fusedloss::cross_entropy_backward";
    check_cross_entropy(op, input_, target, weight_, reduction, label_smoothing, softcap);
    const c10::OptionalDeviceGuard guard(input_.device());
    at::Tensor input = compute_input(input_, target, weight_);
    check_saved(op, grad, input, target, lse, stats, target_mass, reduction);
    const bool prob = target.sizes() == input_.sizes();
    const CeGeometry g = ce_geometry(input);
    const bool want_target = output_mask[1] && prob;
    // Written in the compute dtype; an fp64 computation for non-fp64 logits
    // (see ce_compute_dtype) rounds its gradient once at the end.
    at::Tensor grad_input =
        output_mask[0] ? empty_output(input_.sizes(), input.options()) : at::empty({0}, input_.options());
    // The target's gradient in its dtype, unless an fp64 computation cannot
    // store that dtype: then in fp64, rounded at the end.
    const auto acc_type = opmath_type(input.scalar_type());
    const auto target_store = loadable(target.scalar_type(), acc_type) ? target.scalar_type() : acc_type;
    at::Tensor grad_target = want_target ? empty_output(target.sizes(), target.options().dtype(target_store))
                                         : at::empty({0}, target.options());
    if (g.rows() > 0 && g.C > 0 && (output_mask[0] || want_target)) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cross_entropy_backward", [&] {
        CeParams<scalar_t> p;
        Keep keep;
        fill_backward(p, keep, g, grad, input, target, weight_, lse, stats, target_mass, ignore_index, reduction,
                      label_smoothing, lse_square_scale, softcap, prob);
        if (output_mask[0]) {
          p.grad_input = grad_input.mutable_data_ptr<scalar_t>();
          ce_strides(grad_input, &p.gN, &p.gC, &p.gS);
        }
        if (want_target) {
          p.grad_target = grad_target.data_ptr();
          p.grad_target_dtype = dtype_code(grad_target.scalar_type());
          ce_strides(grad_target, &p.gtN, &p.gtC, &p.gtS);
        }
        run_backward(p, prob);
      });
    }
    if (output_mask[0]) grad_input = finish(grad_input, input_.scalar_type());
    if (want_target) grad_target = finish(grad_target, target.scalar_type());
    return {grad_input, grad_target};
  }

  // The gradient of the logits written over the logits themselves. Engines read
  // a whole row into fp32 before writing any of it, and round each gradient
  // once, so this equals the out-of-place gradient bit for bit; it refuses
  // logits whose elements overlap (check_inplace_target).
  static void backward_inplace(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight_, const at::Tensor& lse,
                               const at::Tensor& stats, const at::Tensor& target_mass, int64_t ignore_index,
                               int64_t reduction, double label_smoothing, double lse_square_scale,
                               std::optional<double> softcap) {
    constexpr const char* op = "fusedloss::cross_entropy_backward_inplace";
    check_cross_entropy(op, input, target, weight_, reduction, label_smoothing, softcap);
    check_inplace_target(op, input);
    TORCH_CHECK_VALUE(ce_compute_dtype(input, target, weight_) == input.scalar_type(), op,
                      ": fp64 targets or weights with lower-precision logits cannot be written in place");
    const c10::OptionalDeviceGuard guard(input.device());
    check_saved(op, grad, input, target, lse, stats, target_mass, reduction);
    at::Tensor view = input;
    const CeGeometry g = ce_geometry(view);
    TORCH_CHECK(view.is_same(input), op, ": the logits' memory layout cannot be overwritten in place");
    const bool prob = target.sizes() == input.sizes();
    if (g.rows() == 0 || g.C == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cross_entropy_backward_", [&] {
      CeParams<scalar_t> p;
      Keep keep;
      fill_backward(p, keep, g, grad, input, target, weight_, lse, stats, target_mass, ignore_index, reduction,
                    label_smoothing, lse_square_scale, softcap, prob);
      p.grad_input = input.mutable_data_ptr<scalar_t>();
      p.gN = g.sN;
      p.gC = g.sC;
      p.gS = g.sS;
      run_backward(p, prob);
    });
  }

 private:
  // Tensors made for one call (contiguous, widened), alive until it returns.
  struct Keep {
    at::Tensor grad, weight, target;
  };

  static at::Tensor compute_input(const at::Tensor& input, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight) {
    const at::ScalarType t = ce_compute_dtype(input, target, weight);
    return t == input.scalar_type() ? input : input.to(t);
  }

  // The class weight as contiguous accumulation-type values (C of them).
  static at::Tensor acc_weight(const std::optional<at::Tensor>& weight, at::ScalarType acc_type) {
    if (!weight.has_value() || !weight->defined()) return at::Tensor();
    return weight->to(acc_type).contiguous();
  }

  template <typename scalar_t>
  static void fill_common(CeParams<scalar_t>& p, const CeGeometry& g, const at::Tensor& input,
                          const at::Tensor& weight, const at::Tensor& stats, int64_t ignore_index,
                          double label_smoothing, double lse_square_scale, const std::optional<double>& softcap) {
    using acc_t = at::opmath_type<scalar_t>;
    p.g = g;
    p.input = input.const_data_ptr<scalar_t>();
    p.opt.num_classes = g.C;
    p.opt.ignore_index = ignore_index;
    p.opt.smoothing = label_smoothing > 0.0 ? static_cast<acc_t>(label_smoothing) : acc_t(0);
    p.opt.z_loss = static_cast<acc_t>(lse_square_scale);
    p.opt.weight_sum = static_cast<acc_t>(g.C);
    if (weight.defined()) {
      p.weight = weight.const_data_ptr<acc_t>();
      p.weight_sum = stats.const_data_ptr<acc_t>() + 1;
    }
    p.has_softcap = softcap.has_value();
    if (p.has_softcap) {
      p.softcap = static_cast<acc_t>(*softcap);
      p.inv_softcap = static_cast<acc_t>(1.0 / *softcap);
    }
  }

  // Points p at the target. Probability targets keep their strides and dtype
  // (fp16/bf16/fp32 for fp32 math; others are converted once); class indices
  // are read as contiguous int64.
  template <typename scalar_t>
  static void set_target(CeParams<scalar_t>& p, at::Tensor& target, bool prob, at::ScalarType acc_type) {
    if (prob) {
      if (!loadable(target.scalar_type(), acc_type)) target = target.to(acc_type);
      CeGeometry tg = ce_geometry(target);
      p.target_prob = target.const_data_ptr();
      p.target_dtype = dtype_code(target.scalar_type());
      p.tN = tg.sN;
      p.tC = tg.sC;
      p.tS = tg.sS;
    } else {
      target = finish(target, at::kLong).contiguous();
      p.target_index = target.const_data_ptr<int64_t>();
    }
  }

  template <typename scalar_t>
  static void fill_backward(CeParams<scalar_t>& p, Keep& keep, const CeGeometry& g, const at::Tensor& grad,
                            const at::Tensor& input, const at::Tensor& target_, const std::optional<at::Tensor>& weight_,
                            const at::Tensor& lse, const at::Tensor& stats, const at::Tensor& target_mass,
                            int64_t ignore_index, int64_t reduction, double label_smoothing, double lse_square_scale,
                            const std::optional<double>& softcap, bool prob) {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    keep.grad = finish(grad, acc_type).contiguous();
    keep.weight = acc_weight(weight_, acc_type);
    keep.target = target_;
    fill_common(p, g, input, keep.weight, stats, ignore_index, label_smoothing, lse_square_scale, softcap);
    set_target(p, keep.target, prob, acc_type);
    p.lse = lse.const_data_ptr<acc_t>();
    if (prob) p.target_mass = target_mass.const_data_ptr<acc_t>();
    p.grad = keep.grad.template const_data_ptr<acc_t>();
    p.grad_per_row = reduction == kReductionNone;
    p.denominator = reduction == kReductionMean ? stats.const_data_ptr<acc_t>() : nullptr;
  }

  template <typename scalar_t>
  static void run_backward(CeParams<scalar_t>& p, bool prob) {
    if (prob) {
      Engine::template backward_rows<scalar_t, true>(p);
    } else {
      Engine::template backward_rows<scalar_t, false>(p);
    }
  }

  static void check_saved(const char* op, const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
                          const at::Tensor& lse, const at::Tensor& stats, const at::Tensor& target_mass,
                          int64_t reduction) {
    const auto batch = ce_batch_shape(input);
    const int64_t rows = c10::multiply_integers(batch);
    const auto acc_type = opmath_type(input.scalar_type());
    auto saved = [&](const at::Tensor& t, int64_t n, const char* name) {
      TORCH_CHECK(t.scalar_type() == acc_type && t.device() == input.device() && t.numel() == n &&
                      t.is_contiguous(),
                  op, ": '", name, "' must be the forward's (", n, " contiguous ", acc_type, " values)");
    };
    saved(lse, 2 * rows, "lse");
    saved(stats, 2, "stats");
    saved(target_mass, target.sizes() == input.sizes() ? rows : 0, "target_mass");
    check_device(op, "grad", grad, input);
    check_floating(op, "grad", grad);
    TORCH_CHECK(grad.numel() == (reduction == kReductionNone ? rows : 1), op,
                ": grad must have the loss's shape");
  }
};

template <typename Ops>
void register_cross_entropy_ops(torch::Library& m) {
  m.impl("cross_entropy_forward", &Ops::forward);
  m.impl("cross_entropy_backward", &Ops::backward);
  m.impl("cross_entropy_backward_inplace", &Ops::backward_inplace);
}

}  // namespace fusedloss
