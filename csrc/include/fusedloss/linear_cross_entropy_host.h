#pragma once
// linear_cross_entropy: the cross entropy of the logits x W^T (+ b) computed
// without the (N, V) logits ever existing in full.
//
// The chunk loop (csrc/linear_cross_entropy.cpp), device-generic: rows of x in
// chunks of R; per chunk the device's GEMM (cuBLAS, oneDNN/MKL) writes the
// chunk's logits into one reused (R, V) buffer, a cross-entropy row phase (the
// row engine of cross_entropy, csrc/{cpu,cuda}/cross_entropy.*) turns them in
// place into per-row results and, when gradients are wanted, into the logits'
// gradient, and the chunk's gradient GEMMs write grad_input's rows and add the
// chunk's share of grad_weight and grad_bias, in chunk order.
//
// The row phases, over all chunks, are the internal API other variants build
// on (a vocabulary-parallel one: each rank holds rows [v0, v0 + V_local) of W):
//   kStats  per row (max, log-sum-exp), loss, mean weight [, target mass];
//           no gradient. (A vocabulary-parallel variant runs its own stats row
//           function here, all-reduces max and a packed sum across ranks, and
//           then runs kGrad with the global per-row (max, lse).)
//   kGrad   given each row's final (max, log(sum exp(x - max))) [and target
//           mass]: the gradient, written over the logits.
//   kFused  kStats then kGrad on each row while it is still in cache: the
//           single-device fast path (the mean's denominator is computed from
//           the targets first, on the device, so the gradient can be written
//           right after the stats).
// lce_chunks() runs any per-chunk function between a chunk's logits GEMM and
// its gradient GEMMs; lce_ce_rows() is the cross-entropy row phase used here.

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <fusedloss/cross_entropy_host.h>

#include <array>
#include <functional>
#include <optional>
#include <tuple>

namespace fusedloss {

enum class CeRowPhase : int8_t { kStats = 0, kGrad = 1, kFused = 2 };

// The cross-entropy row engine of each device, for chunks of logits that
// other ops produce (exported by csrc/cpu/cross_entropy.cpp and
// csrc/cuda/cross_entropy.cu). kFused needs p.lse == p.lse_out and, in place,
// p.grad_input == p.input, one distribution per row (g.S == 1).
namespace cpu {
template <typename scalar_t>
void ce_rows(CeRowPhase phase, bool prob, const CeParams<scalar_t>& p);
}  // namespace cpu
namespace cuda {
template <typename scalar_t>
void ce_rows(CeRowPhase phase, bool prob, const CeParams<scalar_t>& p);
}  // namespace cuda

// Element size of a dtype code (dtypes.h).
C10_HOST_DEVICE inline int64_t dtype_code_size(int8_t d) { return d == kF64 ? 8 : d == kF32 ? 4 : 2; }

// Rows [r0, r0 + n) of a row-phase parameter block whose rows are one
// distribution each (g.S == 1): every per-row pointer moved to row r0.
template <typename scalar_t>
CeParams<scalar_t> ce_params_rows(CeParams<scalar_t> q, int64_t r0, int64_t n) {
  q.g.N = n;
  q.input += r0 * q.g.sN;
  if (q.target_index != nullptr) q.target_index += r0;
  if (q.target_prob != nullptr)
    q.target_prob = static_cast<const char*>(q.target_prob) + r0 * q.tN * dtype_code_size(q.target_dtype);
  if (q.lse_out != nullptr) q.lse_out += 2 * r0;
  if (q.loss_out != nullptr) q.loss_out += r0;
  if (q.weight_out != nullptr) q.weight_out += r0;
  if (q.target_mass_out != nullptr) q.target_mass_out += r0;
  if (q.lse != nullptr) q.lse += 2 * r0;
  if (q.target_mass != nullptr) q.target_mass += r0;
  if (q.grad != nullptr && q.grad_per_row) q.grad += r0;
  if (q.grad_input != nullptr) q.grad_input += r0 * q.gN;
  if (q.grad_target != nullptr)
    q.grad_target = static_cast<char*>(q.grad_target) + r0 * q.gtN * dtype_code_size(q.grad_target_dtype);
  return q;
}

// What linear_cross_entropy needs from a device: the row phases, the GEMMs
// and deterministic sums. The GEMMs must give the same bits on every run (and
// on the CPU for every thread count) and never split a reduction by atomics.
struct LceDevice {
  virtual ~LceDevice() = default;
  virtual void rows(CeRowPhase phase, bool prob, const CeParams<double>& p) const = 0;
  virtual void rows(CeRowPhase phase, bool prob, const CeParams<float>& p) const = 0;
  virtual void rows(CeRowPhase phase, bool prob, const CeParams<at::Half>& p) const = 0;
  virtual void rows(CeRowPhase phase, bool prob, const CeParams<at::BFloat16>& p) const = 0;
  // out (n, V) = x (n, D) w^T (+ b), as torch's linear computes it.
  virtual void logits(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) const = 0;
  // out (n, D) = dlogits (n, V) w (V, D), in the operands' dtype.
  virtual void grad_input(const at::Tensor& out, const at::Tensor& dlogits, const at::Tensor& w) const = 0;
  // acc (V, D) = (first) or += dlogits^T x, and acc_b (V) the same for the
  // column sums of dlogits; either may be undefined (not wanted). An
  // accumulator is fp32 for fp16/bf16 operands (accumulated over chunks,
  // rounded once by the caller) or has the operands' dtype.
  virtual void grad_weight(const at::Tensor& acc, const at::Tensor& acc_b, const at::Tensor& dlogits,
                           const at::Tensor& x, bool first) const = 0;
  // Deterministic sum of a 1-D accumulation-type tensor into out (0-d).
  virtual void sum(const at::Tensor& t, const at::Tensor& out) const = 0;
  // The loss of reduction 'mean'/'sum' from per-row losses and mean weights
  // (cross_entropy's reduction); a mean also writes its denominator.
  virtual void reduce(const at::Tensor& loss_rows, const at::Tensor& weight_rows, int64_t reduction,
                      at::Tensor& loss, at::Tensor* denominator) const = 0;
  // Bytes of one chunk's logits when the caller gives no chunk size.
  virtual int64_t chunk_budget_bytes() const = 0;
};

// A call's arguments as the chunk loop reads them.
struct LceInputs {
  at::Tensor x;       // (N, D)
  at::Tensor w;       // (V, D)
  at::Tensor b;       // (V), or undefined
  at::Tensor target;  // class indices: (N) int64, contiguous; probabilities: (N, V) in their own dtype
  at::Tensor weight;  // class weight (V) in the accumulation dtype, contiguous, or undefined
  bool prob = false;
  int64_t N = 0, D = 0, V = 0;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0, lse_square_scale = 0.0;
  std::optional<double> softcap;
};

// Per-row state of the phases, accumulation dtype, contiguous.
struct LceRowState {
  at::Tensor lse;          // (N, 2): max m and log(sum exp(x - m)); written by kStats/kFused, read by kGrad/kFused
  at::Tensor rows;         // (2, N): loss and mean weight of each row (kStats/kFused)
  at::Tensor target_mass;  // (N) for probability targets, else (0)
  at::Tensor stats;        // (2): [denominator of the mean, sum(weight)]
  at::Tensor grad;         // grad_output: (N) per row, or one value
  bool grad_per_row = false;
  bool divide = false;  // grad / stats[0] (mean)
};

// Gradient outputs and accumulators; undefined: not wanted.
struct LceGrads {
  at::Tensor input;   // (N, D): rows written chunk by chunk
  at::Tensor weight;  // (V, D) accumulator
  at::Tensor bias;    // (V) accumulator
};

// Each device's LceDevice (csrc/cpu/linear_cross_entropy.cpp,
// csrc/cuda/linear_cross_entropy.cu), for ops outside this loss that run the
// chunk loop (the vocabulary-parallel linear variant).
namespace cpu {
const LceDevice& lce_device();
}  // namespace cpu
namespace cuda {
const LceDevice& lce_device();
}  // namespace cuda

// Gradient buffers of a call (mask: input, weight, bias): grad_input in the
// input's dtype; grad_weight and grad_bias accumulators in fp32 for fp16/bf16
// unless a single chunk gives them whole. lce_finish_grads returns them in
// their parameters' dtypes (accumulators rounded once), or empty (0,) tensors.
LceGrads lce_make_grads(const LceInputs& in, std::array<bool, 3> mask, int64_t chunk_rows);
std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_finish_grads(LceGrads& g, const at::Tensor& input,
                                                                const at::Tensor& w);

// Rows per chunk: `chunk_size` if positive, else as many rows as the device's
// budget holds (at least 1); then evened out so that no chunk is much shorter
// than the others.
int64_t lce_chunk_rows(const LceDevice& dev, int64_t N, int64_t V, at::ScalarType dtype, int64_t chunk_size);

using LceChunkFn = std::function<void(const at::Tensor& logits, int64_t r0, int64_t n)>;

// For each chunk of `chunk_rows` rows: logits = x[r0:r0+n] w^T (+ b) into the
// reused buffer, then on_chunk(logits, r0, n), which may overwrite them with
// their gradient; then, if `grads`, that gradient's GEMMs.
void lce_chunks(const LceDevice& dev, const LceInputs& in, int64_t chunk_rows, const LceChunkFn& on_chunk,
                LceGrads* grads);

// The cross-entropy row phase on one chunk of logits (rows r0 .. r0 + n).
void lce_ce_rows(const LceDevice& dev, const LceInputs& in, CeRowPhase phase, const LceRowState& st,
                 const at::Tensor& logits, int64_t r0, int64_t n);

// The op bodies (schemas in csrc/ops.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lce_forward(
    const LceDevice& dev, const at::Tensor& input, const at::Tensor& linear_weight, const at::Tensor& target,
    const std::optional<at::Tensor>& linear_bias, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    int64_t reduction, double label_smoothing, double lse_square_scale, std::optional<double> softcap,
    int64_t chunk_size, std::optional<at::ScalarType> out_dtype, std::array<bool, 3> grad_mask);

std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_backward(
    const LceDevice& dev, const at::Tensor& grad, const at::Tensor& input, const at::Tensor& linear_weight,
    const at::Tensor& target, const std::optional<at::Tensor>& linear_bias, const std::optional<at::Tensor>& weight,
    const at::Tensor& lse, const at::Tensor& stats, const at::Tensor& target_mass, int64_t ignore_index,
    int64_t reduction, double label_smoothing, double lse_square_scale, std::optional<double> softcap,
    int64_t chunk_size, std::array<bool, 3> output_mask);

// A device's row phases, by dtype, through its exported ce_rows.
template <void (*kD)(CeRowPhase, bool, const CeParams<double>&),
          void (*kF)(CeRowPhase, bool, const CeParams<float>&),
          void (*kH)(CeRowPhase, bool, const CeParams<at::Half>&),
          void (*kB)(CeRowPhase, bool, const CeParams<at::BFloat16>&)>
struct LceRowsOf : LceDevice {
  void rows(CeRowPhase ph, bool prob, const CeParams<double>& p) const override { kD(ph, prob, p); }
  void rows(CeRowPhase ph, bool prob, const CeParams<float>& p) const override { kF(ph, prob, p); }
  void rows(CeRowPhase ph, bool prob, const CeParams<at::Half>& p) const override { kH(ph, prob, p); }
  void rows(CeRowPhase ph, bool prob, const CeParams<at::BFloat16>& p) const override { kB(ph, prob, p); }
};

// Registers the ops' kernels for one device (kDevice returns its LceDevice).
template <const LceDevice& (*kDevice)()>
struct LceKernels {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& input, const at::Tensor& linear_weight, const at::Tensor& target,
      const std::optional<at::Tensor>& linear_bias, const std::optional<at::Tensor>& weight, int64_t ignore_index,
      int64_t reduction, double label_smoothing, double lse_square_scale, std::optional<double> softcap,
      int64_t chunk_size, std::optional<at::ScalarType> out_dtype, std::array<bool, 3> grad_mask) {
    return lce_forward(kDevice(), input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                       label_smoothing, lse_square_scale, softcap, chunk_size, out_dtype, grad_mask);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad, const at::Tensor& input, const at::Tensor& linear_weight, const at::Tensor& target,
      const std::optional<at::Tensor>& linear_bias, const std::optional<at::Tensor>& weight, const at::Tensor& lse,
      const at::Tensor& stats, const at::Tensor& target_mass, int64_t ignore_index, int64_t reduction,
      double label_smoothing, double lse_square_scale, std::optional<double> softcap, int64_t chunk_size,
      std::array<bool, 3> output_mask) {
    return lce_backward(kDevice(), grad, input, linear_weight, target, linear_bias, weight, lse, stats, target_mass,
                        ignore_index, reduction, label_smoothing, lse_square_scale, softcap, chunk_size, output_mask);
  }
  static void register_all(torch::Library& m) {
    m.impl("linear_cross_entropy_forward", &forward);
    m.impl("linear_cross_entropy_backward", &backward);
  }
};

}  // namespace fusedloss
