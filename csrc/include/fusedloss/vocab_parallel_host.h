#pragma once
// Vocabulary-parallel cross entropy: the host code of the local ops that
// fusedloss/distributed.py runs around two torch.distributed collectives. The
// classes (vocabulary) of every row are split over the ranks of a process
// group; each rank holds the logits of its slice [start, start + C) and the
// targets (global class indices) of every row:
//
//   vocab_parallel_ce_local     one read of the local logits: per row the local
//                               max, and (numerics.h) S_other, x_t, rel against it
//   -- all_reduce(MAX) of the maxes --
//   vocab_parallel_ce_rebase    every rank moves its sums to the global max
//   -- all_reduce(SUM) of [S_other | x_t | rel | C] --
//   vocab_parallel_ce_finalize  the loss (identical bits on every rank), the
//                               per-row (max, ls, s_other) for backward, stats
//   vocab_parallel_ce_backward  one read and one write of the local logits
//
// The linear variant takes the hidden states x (N, D) and this rank's rows
// W_local (C, D) (and b_local) of the head instead of the logits, which then
// exist one chunk of rows at a time (linear_cross_entropy's chunk loop):
//   vocab_parallel_linear_ce_local     per chunk: logits GEMM, the local pass
//   -- rebase, the collectives and finalize as above --
//   vocab_parallel_linear_ce_backward  per chunk: logits GEMM, their gradient
//                                      in place, grad_input and grad_weight GEMMs
//
// The packed buffer is planar, so each field is a contiguous (N) view:
//   [S_other (N) | x_t (N) | rel (N), only with label smoothing | C (1)]
// x_t is the target's (capped) logit on the rank that holds the target and 0
// on the others; the last element is this rank's class count, so that after
// the SUM every rank knows the vocabulary size V without another collective.
//
// The op bodies are templated on a device Engine:
//   Engine::local_rows<scalar_t>(const VpParams&)     the local pass
//   Engine::backward_rows<scalar_t>(const VpParams&)  the gradient of the local logits
//   Engine::for_each_row(n, f)                         f(r) for r in [0, n): O(N) row functors
//   Engine::check_finalized(...)                       the CPU raises torch's errors; CUDA leaves NaN rows
//   Engine::lce_device()                               the device's GEMMs (linear_cross_entropy_host.h)
// and the elementwise Engine (elementwise_ops.h) for the deterministic sums.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <fusedloss/checks.h>
#include <fusedloss/elementwise_host.h>
#include <fusedloss/linear_cross_entropy_host.h>
#include <fusedloss/numerics.h>
#include <fusedloss/outputs.h>
#include <fusedloss/row_sum.h>

#include <array>
#include <limits>
#include <optional>
#include <tuple>

namespace fusedloss {

// Class counts travel as floating point values in the SUM: exact up to 2^24
// in fp32 (fp16/bf16/fp32 logits), 2^53 in fp64.
template <typename acc_t>
constexpr int64_t vp_max_classes() {
  return int64_t(1) << std::numeric_limits<acc_t>::digits;
}

// The vocabulary size V as the SUM delivered it, or -1 when it is no class
// count: a rank poisons its count with NaN when its arguments are unusable (so
// that every rank learns it without another collective), and converting NaN
// to an integer would be undefined.
template <typename acc_t>
C10_HOST_DEVICE inline int64_t vp_vocab_size(acc_t v) {
  return v >= acc_t(0) && v <= acc_t(vp_max_classes<acc_t>()) ? static_cast<int64_t>(v) : int64_t(-1);
}

// Everything a row kernel needs, as plain data (passed by value to CUDA kernels).
template <typename scalar_t>
struct VpParams {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t N = 0, C = 0;    // rows; classes of this rank's slice
  int64_t sN = 0, sC = 1;  // strides of the local logits
  int64_t start = 0;       // global class index of local class 0
  const scalar_t* input = nullptr;
  const int64_t* target = nullptr;  // global class indices, contiguous
  const acc_t* weight = nullptr;    // the full (V) class weight, contiguous, or null
  int64_t weight_numel = 0;
  int64_t ignore_index = -100;
  bool with_f = false;  // rel and mass wanted (label smoothing)
  bool has_softcap = false;
  acc_t softcap = 0, inv_softcap = 0;
  // local pass outputs
  acc_t* max_out = nullptr;
  acc_t* packed_out = nullptr;
  int64_t plane = 0;  // distance between the packed fields, when not N: a chunk's rows in a whole batch's buffer
  // backward
  const acc_t* state = nullptr;  // (N, 3): global max, ls, s_other
  const acc_t* stats = nullptr;  // [denominator of the mean, W, V]
  acc_t smoothing = 0, z_loss = 0;
  const acc_t* grad = nullptr;  // one per row ('none'), or a single value
  bool grad_per_row = false;
  bool mean = false;
  scalar_t* grad_input = nullptr;
  int64_t gN = 0, gC = 1;

  // The local class of global target t, or -1 when another rank holds it (or
  // t is no class at all). Written without t - start, which could overflow.
  C10_HOST_DEVICE int64_t local_class(int64_t t) const { return t >= start && t - start < C ? t - start : -1; }
  C10_HOST_DEVICE acc_t local_weight(int64_t c) const { return weight != nullptr ? weight[start + c] : acc_t(1); }
  C10_HOST_DEVICE const scalar_t* row(int64_t r) const { return input + r * sN; }

  C10_HOST_DEVICE int64_t plane_stride() const { return plane != 0 ? plane : N; }
  C10_HOST_DEVICE void store_local(int64_t r, const math::RowState<acc_t>& st, acc_t x_t) const {
    const int64_t P = plane_stride();
    max_out[r] = st.max;
    packed_out[r] = st.sum;
    packed_out[P + r] = x_t;
    if (with_f) packed_out[2 * P + r] = st.rel;
  }
  // An ignored row contributes nothing; -inf leaves the global max to the
  // other ranks (all of which ignore it too).
  C10_HOST_DEVICE void store_ignored_local(int64_t r) const {
    store_local(r, math::row_state_empty<acc_t>(), acc_t(0));
    if (with_f) packed_out[2 * plane_stride() + r] = acc_t(0);
  }

  // Backward: the options of the call, with V and W read from stats (on the
  // device, in a kernel).
  C10_HOST_DEVICE math::CeOptions<acc_t> options() const {
    math::CeOptions<acc_t> o;
    o.num_classes = vp_vocab_size(stats[2]);
    o.ignore_index = ignore_index;
    o.smoothing = smoothing;
    o.z_loss = z_loss;
    o.weight_sum = stats[1];
    return o;
  }
  C10_HOST_DEVICE acc_t row_grad(int64_t r) const {
    acc_t g = grad[grad_per_row ? r : 0];
    if (mean) g = g / stats[0];
    return g;
  }
  // The target's class weight, NaN for a target outside [0, V) (or beyond the
  // weight): its row's gradient is then NaN, never an out-of-bounds read.
  C10_HOST_DEVICE acc_t target_weight(int64_t t, int64_t V) const {
    if (t < 0 || t >= V || (weight != nullptr && t >= weight_numel)) return std::numeric_limits<acc_t>::quiet_NaN();
    return weight != nullptr ? weight[t] : acc_t(1);
  }
};

// After the MAX: a rank's sums, measured from its local max, move to the
// global max (numerics.h row_rebase). In place on a copy of the packed buffer.
template <typename acc_t>
struct VpRebaseRow {
  acc_t* packed;
  const acc_t* local_max;
  const acc_t* global_max;
  const acc_t* mass;  // sum of this rank's class weights (C when unweighted)
  int64_t N;
  bool with_f;
  C10_HOST_DEVICE void operator()(int64_t r) const {
    math::RowState<acc_t> st{local_max[r], packed[r], with_f ? *mass : acc_t(0), with_f ? packed[2 * N + r] : acc_t(0)};
    math::row_rebase(st, global_max[r]);
    packed[r] = st.sum;
    if (with_f) packed[2 * N + r] = st.rel;
  }
};

// After the SUM: a row's loss and its share of the mean's denominator (as
// cross entropy's CeParams::store_index_row), and (max, ls, s_other) for the
// backward. A target outside [0, V), a weight that does not hold exactly V
// classes, or a poisoned V (see vp_vocab_size) gives the row a NaN loss and a NaN max (so NaN gradients); the CPU
// raises torch's errors for them afterwards (check_finalized).
template <typename acc_t>
struct VpFinalizeRow {
  const acc_t* packed;
  const acc_t* global_max;
  const int64_t* target;
  const acc_t* weight;  // full (V) or null
  int64_t weight_numel;
  const acc_t* stats;  // W and V filled in
  int64_t N;
  int64_t ignore_index;
  acc_t smoothing, z_loss;
  bool with_f;
  acc_t* loss_out;    // (2, N): losses, then weights
  acc_t* state_out;   // (N, 3)
  C10_HOST_DEVICE void operator()(int64_t r) const {
    const int64_t t = target[r];
    if (t == ignore_index) {
      loss_out[r] = acc_t(0);
      loss_out[N + r] = acc_t(0);
      state_out[3 * r] = state_out[3 * r + 1] = state_out[3 * r + 2] = acc_t(0);
      return;
    }
    const int64_t V = vp_vocab_size(stats[2]);
    const bool valid = t >= 0 && t < V && (weight == nullptr || weight_numel == V);
    if (!valid) {
      const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
      loss_out[r] = nan;
      loss_out[N + r] = acc_t(0);
      state_out[3 * r] = nan;
      state_out[3 * r + 1] = nan;
      state_out[3 * r + 2] = nan;
      return;
    }
    math::CeOptions<acc_t> o;
    o.num_classes = V;
    o.ignore_index = ignore_index;
    o.smoothing = smoothing;
    o.z_loss = z_loss;
    o.weight_sum = stats[1];
    const acc_t m = global_max[r];
    const acc_t x_t = packed[N + r];
    const auto rs = math::vp_row_stats(m, packed[r], x_t);
    const acc_t w_t = weight != nullptr ? weight[t] : acc_t(1);
    loss_out[r] = math::ce_index_loss(m, rs.ls, with_f ? packed[2 * N + r] : acc_t(0), x_t, w_t, o);
    loss_out[N + r] = w_t;
    state_out[3 * r] = m;
    state_out[3 * r + 1] = rs.ls;
    state_out[3 * r + 2] = rs.s_other;
  }
};

// Fields of the packed buffer: 2, or 3 with label smoothing (rel).
inline int64_t vp_fields(double label_smoothing) { return label_smoothing > 0.0 ? 3 : 2; }

inline void check_vp_target(const char* op, const at::Tensor& target, int64_t N, const at::Tensor& ref) {
  check_device(op, "target", target, ref);
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte, op,
              ": class-index targets must be int64 or uint8, got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N, op, ": target must have shape [", N, "], got ",
              target.sizes());
}

// The slice [vocab_start, vocab_start + C) of N rows whose logits are (or are
// computed in) ref's dtype, with its target, weight and options.
inline void check_vp_slice(const char* op, const at::Tensor& ref, int64_t N, int64_t C, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight, int64_t vocab_start, double label_smoothing,
                           const std::optional<double>& softcap) {
  check_vp_target(op, target, N, ref);
  TORCH_CHECK(vocab_start >= 0, op, ": vocab_start must be non-negative, got ", vocab_start);
  const int64_t limit =
      ref.scalar_type() == at::kDouble ? vp_max_classes<double>() : vp_max_classes<float>();
  TORCH_CHECK(C <= limit && vocab_start <= limit - C, op, ": classes up to ", limit, " (exact in the ",
              ref.scalar_type() == at::kDouble ? "fp64" : "fp32", " sums) are supported, got slice [",
              vocab_start, ", ", vocab_start + C, ")");
  TORCH_CHECK(label_smoothing <= 1.0, op, ": label_smoothing must be at most 1, got ", label_smoothing);
  TORCH_CHECK(!softcap.has_value() || *softcap > 0.0, op, ": softcap must be positive");
  if (weight.has_value() && weight->defined()) {
    check_device(op, "weight", *weight, ref);
    check_floating(op, "weight", *weight);
    TORCH_CHECK(weight->dim() == 1 && weight->numel() >= vocab_start + C, op,
                ": weight must be the full 1-D class weight, holding at least the slice [", vocab_start, ", ",
                vocab_start + C, "); got shape ", weight->sizes());
  }
}

// The local logits, target, weight and options of a local pass or a backward.
inline void check_vp_inputs(const char* op, const at::Tensor& input, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, int64_t vocab_start, double label_smoothing,
                            const std::optional<double>& softcap) {
  check_floating(op, "input", input);
  TORCH_CHECK(input.dim() == 2, op, ": local logits must be 2-D (N, C_local), got shape ", input.sizes());
  check_vp_slice(op, input, input.size(0), input.size(1), target, weight, vocab_start, label_smoothing, softcap);
}

// The linear variant: hidden states (N, D), this rank's rows (C, D) of the
// head's weight and (C) of its bias, all of one dtype on one device.
inline void check_vp_linear_inputs(const char* op, const at::Tensor& input, const at::Tensor& w,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight, int64_t vocab_start,
                                   double label_smoothing, const std::optional<double>& softcap) {
  check_floating(op, "input", input);
  TORCH_CHECK(input.dim() == 2, op, ": input must be 2-D (N, D), got shape ", input.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(1) == input.size(1), op, ": linear_weight must be (C_local, ", input.size(1),
              "), got shape ", w.sizes());
  check_like(op, "linear_weight", w, input);
  if (bias.has_value() && bias->defined()) {
    check_like(op, "linear_bias", *bias, input);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), op, ": linear_bias must be (", w.size(0),
                "), got shape ", bias->sizes());
  }
  check_vp_slice(op, input, input.size(0), w.size(0), target, weight, vocab_start, label_smoothing, softcap);
}

inline void check_acc(const char* op, const char* name, const at::Tensor& t, int64_t numel, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device() && t.scalar_type() == ref.scalar_type() && t.numel() == numel &&
                  t.is_contiguous(),
              op, ": '", name, "' must be ", numel, " contiguous ", ref.scalar_type(), " values on ", ref.device(),
              ", got ", t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
}

// The backward ops' saved state: the finalize op's (N, 3) rows and 3 stats in
// the accumulation dtype of `input`, and a grad of the loss's shape.
inline void check_backward_state(const char* op, const at::Tensor& grad, const at::Tensor& input,
                                 const at::Tensor& state, const at::Tensor& stats, int64_t N, int64_t reduction) {
  const auto acc_type = opmath_type(input.scalar_type());
  TORCH_CHECK(state.scalar_type() == acc_type && stats.scalar_type() == acc_type, op,
              ": 'state' and 'stats' must be the finalize op's (", acc_type, ")");
  check_acc(op, "state", state, 3 * N, state);
  check_acc(op, "stats", stats, 3, state);
  check_device(op, "state", state, input);
  check_device(op, "grad", grad, input);
  check_floating(op, "grad", grad);
  TORCH_CHECK(grad.numel() == (reduction == kReductionNone ? N : 1), op, ": grad must have the loss's shape");
}

template <typename Engine, typename ElementwiseEngine>
struct VocabParallelCeOps {
 private:
  // The local pass's outputs for N rows of this rank's C classes, in the
  // accumulation dtype: (local_max (N), packed [fields x N | C], mass (): the
  // sum of this rank's class weights, C when unweighted) and the class weight
  // in the accumulation dtype (undefined when there is none).
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_buffers(
      const at::Tensor& input, int64_t N, int64_t C, const std::optional<at::Tensor>& weight_, int64_t vocab_start,
      double label_smoothing) {
    const auto acc_type = opmath_type(input.scalar_type());
    const auto acc_opts = input.options().dtype(acc_type);
    const int64_t P = vp_fields(label_smoothing);
    at::Tensor local_max = at::empty({N}, acc_opts);
    at::Tensor packed = at::empty({P * N + 1}, acc_opts);
    at::Tensor mass = at::empty({}, acc_opts);
    packed.narrow(0, P * N, 1).fill_(static_cast<double>(C));
    at::Tensor weight = acc_weight(weight_, acc_type);
    if (weight.defined()) {
      sum_into<ElementwiseEngine>(weight.narrow(0, vocab_start, C), mass);
    } else {
      mass.fill_(static_cast<double>(C));
    }
    return {local_max, packed, mass, weight};
  }

 public:
  // Returns (local_max (N), packed, mass ()): mass is the sum of this rank's
  // class weights (C when unweighted), which the rebase of rel needs.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> local(const at::Tensor& input_, const at::Tensor& target_,
                                                              const std::optional<at::Tensor>& weight_,
                                                              int64_t vocab_start, int64_t ignore_index,
                                                              double label_smoothing, std::optional<double> softcap) {
    constexpr const char* op = "fusedloss::vocab_parallel_ce_local";
    check_vp_inputs(op, input_, target_, weight_, vocab_start, label_smoothing, softcap);
    const c10::OptionalDeviceGuard guard(input_.device());
    const at::Tensor& input = input_;
    const int64_t N = input.size(0), C = input.size(1);
    at::Tensor local_max, packed, mass, weight;  // named, not bound: the dispatch lambdas capture them
    std::tie(local_max, packed, mass, weight) = local_buffers(input, N, C, weight_, vocab_start, label_smoothing);
    const at::Tensor target = finish(target_, at::kLong).contiguous();
    if (N == 0) return {local_max, packed, mass};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "vocab_parallel_ce_local", [&] {
      VpParams<scalar_t> p;
      fill_common(p, input, target, weight, vocab_start, ignore_index, label_smoothing, softcap);
      p.max_out = local_max.mutable_data_ptr<at::opmath_type<scalar_t>>();
      p.packed_out = packed.mutable_data_ptr<at::opmath_type<scalar_t>>();
      Engine::template local_rows<scalar_t>(p);
    });
    return {local_max, packed, mass};
  }

  static at::Tensor rebase(const at::Tensor& packed, const at::Tensor& local_max, const at::Tensor& global_max,
                           const at::Tensor& mass) {
    constexpr const char* op = "fusedloss::vocab_parallel_ce_rebase";
    check_floating(op, "packed", packed);
    const int64_t N = local_max.numel();
    const int64_t P = N > 0 ? (packed.numel() - 1) / N : 2;
    TORCH_CHECK(packed.dim() == 1 && packed.is_contiguous() && (P == 2 || P == 3) && packed.numel() == P * N + 1, op,
                ": 'packed' must be the local op's buffer (2 N + 1 or 3 N + 1 values), got shape ", packed.sizes(),
                " for ", N, " rows");
    check_acc(op, "local_max", local_max, N, packed);
    check_acc(op, "global_max", global_max, N, packed);
    check_acc(op, "mass", mass, 1, packed);
    const c10::OptionalDeviceGuard guard(packed.device());
    at::Tensor out = packed.clone();
    if (N == 0) return out;
    AT_DISPATCH_FLOATING_TYPES(packed.scalar_type(), "vocab_parallel_ce_rebase", [&] {
      VpRebaseRow<scalar_t> f{out.mutable_data_ptr<scalar_t>(), local_max.const_data_ptr<scalar_t>(),
                              global_max.const_data_ptr<scalar_t>(), mass.const_data_ptr<scalar_t>(), N, P == 3};
      Engine::for_each_row(N, f);
    });
    return out;
  }

  // Returns (loss, state (N, 3), stats (3)): state per row is (global max, ls,
  // s_other); stats is [denominator of the mean (1 unless mean), W, V].
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> finalize(
      const at::Tensor& packed, const at::Tensor& global_max, const at::Tensor& target_,
      const std::optional<at::Tensor>& weight_, int64_t ignore_index, int64_t reduction, double label_smoothing,
      double lse_square_scale, at::ScalarType loss_dtype) {
    constexpr const char* op = "fusedloss::vocab_parallel_ce_finalize";
    check_reduction(op, reduction);
    check_floating(op, "packed", packed);
    TORCH_CHECK(at::isFloatingType(loss_dtype), op, ": loss_dtype must be a floating dtype, got ", loss_dtype);
    const int64_t N = global_max.numel();
    const int64_t P = vp_fields(label_smoothing);
    check_acc(op, "packed", packed, P * N + 1, packed);
    check_acc(op, "global_max", global_max, N, packed);
    check_vp_target(op, target_, N, packed);
    if (weight_.has_value() && weight_->defined()) {
      check_device(op, "weight", *weight_, packed);
      check_floating(op, "weight", *weight_);
      TORCH_CHECK(weight_->dim() == 1, op, ": weight must be 1-D, got shape ", weight_->sizes());
    }
    const c10::OptionalDeviceGuard guard(packed.device());
    const auto acc_type = packed.scalar_type();
    const auto acc_opts = packed.options();
    at::Tensor rows = at::empty({2, N}, acc_opts);
    at::Tensor state = at::empty({N, 3}, acc_opts);
    at::Tensor stats = at::empty({3}, acc_opts);
    const at::Tensor V = packed.narrow(0, P * N, 1);
    stats.narrow(0, 2, 1).copy_(V);
    const at::Tensor weight = acc_weight(weight_, acc_type);
    if (weight.defined()) {
      sum_into<ElementwiseEngine>(weight, stats.select(0, 1));
    } else {
      stats.narrow(0, 1, 1).copy_(V);
    }
    const at::Tensor target = finish(target_, at::kLong).contiguous();
    if (N > 0) {
      AT_DISPATCH_FLOATING_TYPES(acc_type, "vocab_parallel_ce_finalize", [&] {
        VpFinalizeRow<scalar_t> f;
        f.packed = packed.const_data_ptr<scalar_t>();
        f.global_max = global_max.const_data_ptr<scalar_t>();
        f.target = target.const_data_ptr<int64_t>();
        f.weight = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
        f.weight_numel = weight.defined() ? weight.numel() : 0;
        f.stats = stats.const_data_ptr<scalar_t>();
        f.N = N;
        f.ignore_index = ignore_index;
        f.smoothing = label_smoothing > 0.0 ? static_cast<scalar_t>(label_smoothing) : scalar_t(0);
        f.z_loss = static_cast<scalar_t>(lse_square_scale);
        f.with_f = P == 3;
        f.loss_out = rows.mutable_data_ptr<scalar_t>();
        f.state_out = state.mutable_data_ptr<scalar_t>();
        Engine::for_each_row(N, f);
        Engine::check_finalized(f.target, N, ignore_index, f.stats, weight.defined() ? weight.numel() : -1);
      });
    }
    at::Tensor loss;
    if (reduction == kReductionNone) {
      loss = finish(rows.select(0, 0), loss_dtype);
      stats.select(0, 0).fill_(1);
    } else {
      ElementwiseCall c(rows.select(0, 0), acc_type);
      c.set(0, rows.select(0, 0));
      c.set(1, rows.select(0, 1));
      loss = at::empty({}, acc_opts.dtype(c.storable(loss_dtype)));
      at::Tensor denominator = stats.select(0, 0);
      AT_DISPATCH_FLOATING_TYPES(acc_type, "vocab_parallel_ce_sum", [&] {
        ElementwiseEngine::template forward<scalar_t>(c, Sums<scalar_t, 2>{}, reduction, loss,
                                                      reduction == kReductionMean ? &denominator : nullptr);
      });
      loss = finish(loss, loss_dtype);
      if (reduction != kReductionMean) denominator.fill_(1);
    }
    return {loss, state, stats};
  }

  static at::Tensor backward(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target_,
                             const std::optional<at::Tensor>& weight_, const at::Tensor& state,
                             const at::Tensor& stats, int64_t vocab_start, int64_t ignore_index, int64_t reduction,
                             double label_smoothing, double lse_square_scale, std::optional<double> softcap) {
    constexpr const char* op = "fusedloss::vocab_parallel_ce_backward";
    check_reduction(op, reduction);
    check_vp_inputs(op, input, target_, weight_, vocab_start, label_smoothing, softcap);
    const int64_t N = input.size(0), C = input.size(1);
    const auto acc_type = opmath_type(input.scalar_type());
    check_backward_state(op, grad, input, state, stats, N, reduction);
    const c10::OptionalDeviceGuard guard(input.device());
    at::Tensor grad_input = empty_output(input.sizes(), input.options());
    if (N == 0 || C == 0) return grad_input;
    const at::Tensor weight = acc_weight(weight_, acc_type);
    const at::Tensor target = finish(target_, at::kLong).contiguous();
    const at::Tensor g = finish(grad, acc_type).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "vocab_parallel_ce_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      VpParams<scalar_t> p;
      fill_common(p, input, target, weight, vocab_start, ignore_index, label_smoothing, softcap);
      p.state = state.const_data_ptr<acc_t>();
      p.stats = stats.const_data_ptr<acc_t>();
      p.smoothing = label_smoothing > 0.0 ? static_cast<acc_t>(label_smoothing) : acc_t(0);
      p.z_loss = static_cast<acc_t>(lse_square_scale);
      p.grad = g.const_data_ptr<acc_t>();
      p.grad_per_row = reduction == kReductionNone;
      p.mean = reduction == kReductionMean;
      p.grad_input = grad_input.mutable_data_ptr<scalar_t>();
      p.gN = grad_input.stride(0);
      p.gC = grad_input.stride(1);
      Engine::template backward_rows<scalar_t>(p);
    });
    return grad_input;
  }

  // The linear variant (fusedloss.distributed.vocab_parallel_linear_cross_entropy):
  // this rank's logits x W_local^T (+ b_local) exist one chunk of rows at a
  // time (linear_cross_entropy's chunk loop and GEMMs, Engine::lce_device()).
  //
  // linear_local: the local pass of every chunk, written straight into the
  // whole batch's buffers (VpParams::plane): the same outputs as `local` on
  // the (N, C) logits, which never exist.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_local(
      const at::Tensor& input, const at::Tensor& linear_weight, const at::Tensor& target_,
      const std::optional<at::Tensor>& linear_bias, const std::optional<at::Tensor>& weight_, int64_t vocab_start,
      int64_t ignore_index, double label_smoothing, std::optional<double> softcap, int64_t chunk_size) {
    constexpr const char* op = "fusedloss::vocab_parallel_linear_ce_local";
    const at::AutoDispatchBelowADInplaceOrView below;  // kernel-owned buffers: no autograd
    check_vp_linear_inputs(op, input, linear_weight, linear_bias, target_, weight_, vocab_start, label_smoothing,
                           softcap);
    const int64_t C = linear_weight.size(0);
    if (C == 0) {  // an empty slice: the state of no classes, without a GEMM
      return local(at::empty({input.size(0), 0}, input.options()), target_, weight_, vocab_start, ignore_index,
                   label_smoothing, softcap);
    }
    const c10::OptionalDeviceGuard guard(input.device());
    const LceInputs in = lce_inputs(input, linear_weight, linear_bias);
    const int64_t N = in.N;
    at::Tensor local_max, packed, mass, weight;  // named, not bound: the dispatch lambdas capture them
    std::tie(local_max, packed, mass, weight) = local_buffers(input, N, C, weight_, vocab_start, label_smoothing);
    const at::Tensor target = finish(target_, at::kLong).contiguous();
    if (N == 0) return {local_max, packed, mass};
    const LceDevice& dev = Engine::lce_device();
    const int64_t rows = lce_chunk_rows(dev, N, C, input.scalar_type(), chunk_size);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "vocab_parallel_linear_ce_local", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      acc_t* max_out = local_max.mutable_data_ptr<acc_t>();
      acc_t* packed_out = packed.mutable_data_ptr<acc_t>();
      lce_chunks(
          dev, in, rows,
          [&](const at::Tensor& logits, int64_t r0, int64_t n) {
            VpParams<scalar_t> p;
            fill_common(p, logits, target.narrow(0, r0, n), weight, vocab_start, ignore_index, label_smoothing,
                        softcap);
            p.plane = N;
            p.max_out = max_out + r0;
            p.packed_out = packed_out + r0;
            Engine::template local_rows<scalar_t>(p);
          },
          nullptr);
    });
    return {local_max, packed, mass};
  }

  // linear_backward: per chunk, the logits again, their gradient written over
  // them from the global per-row state (the row kernel of `backward`, in
  // place), then grad_input's rows and this chunk's share of grad_weight and
  // grad_bias (fp32 accumulators for fp16/bf16 over several chunks, rounded
  // once). grad_input is this slice's part of the hidden states' gradient
  // (the column-parallel layer's backward sums it over the group). Returns
  // empty (0,) tensors for the gradients not in output_mask.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
      const at::Tensor& grad, const at::Tensor& input, const at::Tensor& linear_weight, const at::Tensor& target_,
      const std::optional<at::Tensor>& linear_bias, const std::optional<at::Tensor>& weight_, const at::Tensor& state,
      const at::Tensor& stats, int64_t vocab_start, int64_t ignore_index, int64_t reduction, double label_smoothing,
      double lse_square_scale, std::optional<double> softcap, int64_t chunk_size, std::array<bool, 3> output_mask) {
    constexpr const char* op = "fusedloss::vocab_parallel_linear_ce_backward";
    const at::AutoDispatchBelowADInplaceOrView below;  // kernel-owned buffers: no autograd
    check_reduction(op, reduction);
    check_vp_linear_inputs(op, input, linear_weight, linear_bias, target_, weight_, vocab_start, label_smoothing,
                           softcap);
    const int64_t N = input.size(0), C = linear_weight.size(0);
    const auto acc_type = opmath_type(input.scalar_type());
    check_backward_state(op, grad, input, state, stats, N, reduction);
    const c10::OptionalDeviceGuard guard(input.device());
    const LceInputs in = lce_inputs(input, linear_weight, linear_bias);
    const std::array<bool, 3> mask{output_mask[0], output_mask[1], output_mask[2] && in.b.defined()};
    const LceDevice& dev = Engine::lce_device();
    const int64_t rows = lce_chunk_rows(dev, N, C, input.scalar_type(), chunk_size);
    LceGrads grads = lce_make_grads(in, mask, rows);
    if (N == 0 || C == 0) {
      // No rows, or no classes in this slice: every gradient is zero (an
      // empty slice adds nothing to the hidden states' gradient).
      for (at::Tensor* t : {&grads.input, &grads.weight, &grads.bias}) {
        if (t->defined()) t->zero_();
      }
      return lce_finish_grads(grads, input, linear_weight);
    }
    if (!(mask[0] || mask[1] || mask[2])) return lce_finish_grads(grads, input, linear_weight);
    const at::Tensor weight = acc_weight(weight_, acc_type);
    const at::Tensor target = finish(target_, at::kLong).contiguous();
    const at::Tensor g = finish(grad, acc_type).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "vocab_parallel_linear_ce_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      lce_chunks(
          dev, in, rows,
          [&](const at::Tensor& logits, int64_t r0, int64_t n) {
            VpParams<scalar_t> p;
            fill_common(p, logits, target.narrow(0, r0, n), weight, vocab_start, ignore_index, label_smoothing,
                        softcap);
            p.state = state.const_data_ptr<acc_t>() + 3 * r0;
            p.stats = stats.const_data_ptr<acc_t>();
            p.smoothing = label_smoothing > 0.0 ? static_cast<acc_t>(label_smoothing) : acc_t(0);
            p.z_loss = static_cast<acc_t>(lse_square_scale);
            p.grad_per_row = reduction == kReductionNone;
            p.grad = g.const_data_ptr<acc_t>() + (p.grad_per_row ? r0 : 0);
            p.mean = reduction == kReductionMean;
            // In place: the row kernels read every logit (and the target's)
            // before writing its gradient.
            p.grad_input = logits.mutable_data_ptr<scalar_t>();
            p.gN = logits.stride(0);
            p.gC = 1;
            Engine::template backward_rows<scalar_t>(p);
          },
          &grads);
    });
    return lce_finish_grads(grads, input, linear_weight);
  }

 private:
  static at::Tensor acc_weight(const std::optional<at::Tensor>& weight, at::ScalarType acc_type) {
    if (!weight.has_value() || !weight->defined()) return at::Tensor();
    return weight->to(acc_type).contiguous();
  }

  static LceInputs lce_inputs(const at::Tensor& input, const at::Tensor& w, const std::optional<at::Tensor>& b) {
    LceInputs in;
    in.x = input;
    in.w = w;
    in.b = b.has_value() && b->defined() ? *b : at::Tensor();
    in.N = input.size(0);
    in.D = input.size(1);
    in.V = w.size(0);
    return in;
  }

  template <typename scalar_t>
  static void fill_common(VpParams<scalar_t>& p, const at::Tensor& input, const at::Tensor& target,
                          const at::Tensor& weight, int64_t vocab_start, int64_t ignore_index,
                          double label_smoothing, const std::optional<double>& softcap) {
    using acc_t = at::opmath_type<scalar_t>;
    p.N = input.size(0);
    p.C = input.size(1);
    p.sN = input.stride(0);
    p.sC = input.stride(1);
    p.start = vocab_start;
    p.input = input.const_data_ptr<scalar_t>();
    p.target = target.const_data_ptr<int64_t>();
    if (weight.defined()) {
      p.weight = weight.const_data_ptr<acc_t>();
      p.weight_numel = weight.numel();
    }
    p.ignore_index = ignore_index;
    p.with_f = label_smoothing > 0.0;
    p.has_softcap = softcap.has_value();
    if (p.has_softcap) {
      p.softcap = static_cast<acc_t>(*softcap);
      p.inv_softcap = static_cast<acc_t>(1.0 / *softcap);
    }
  }
};

template <typename Ops>
void register_vocab_parallel_ops(torch::Library& m) {
  m.impl("vocab_parallel_ce_local", &Ops::local);
  m.impl("vocab_parallel_ce_rebase", &Ops::rebase);
  m.impl("vocab_parallel_ce_finalize", &Ops::finalize);
  m.impl("vocab_parallel_ce_backward", &Ops::backward);
  m.impl("vocab_parallel_linear_ce_local", &Ops::linear_local);
  m.impl("vocab_parallel_linear_ce_backward", &Ops::linear_backward);
}

}  // namespace fusedloss
