// linear_cross_entropy on CUDA: the device part of the chunk loop
// (fusedloss/linear_cross_entropy_host.h): cuBLAS through ATen, and
// cross_entropy's CUDA row engine.
//
// cuBLAS gives the same bits on every run for a given GPU and library, and
// reductions here add chunk after chunk in a fixed order: no atomics. The
// fp32 accumulator of fp16/bf16 weights is updated by cuBLAS directly from
// the fp16/bf16 operands (addmm with out_dtype=float32: fp32 accumulation,
// C read and written in fp32), so no fp32 copy of an operand is made.
// Everything runs on the current stream; nothing waits on the host.

#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <fusedloss/linear_cross_entropy_host.h>
#include <fusedloss/row_sum.h>

#include "common.cuh"
#include "elementwise.cuh"

namespace fusedloss::cuda {
namespace {

// Default chunk: 1 GiB of logits (4096 rows of 128256 bf16 classes). GEMMs of
// that height run near peak, and the fp32 grad_weight accumulator, read and
// written once per chunk (V x D x 8 bytes), stays a small share of the time.
constexpr int64_t kChunkBudgetBytes = int64_t(1) << 30;

struct CudaLceDevice final
    : LceRowsOf<&ce_rows<double>, &ce_rows<float>, &ce_rows<at::Half>, &ce_rows<at::BFloat16>> {
  void logits(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) const override {
    at::Tensor o = out;
    if (b.defined()) {
      at::addmm_out(o, b, x, w.t());  // torch's linear: addmm with the bias
    } else {
      at::mm_out(o, x, w.t());
    }
  }

  void grad_input(const at::Tensor& out, const at::Tensor& dlogits, const at::Tensor& w) const override {
    at::Tensor o = out;
    at::mm_out(o, dlogits, w);
  }

  void grad_weight(const at::Tensor& acc, const at::Tensor& acc_b, const at::Tensor& dlogits, const at::Tensor& x,
                   bool first) const override {
    if (acc.defined()) {
      at::Tensor a = acc;
      if (acc.scalar_type() == dlogits.scalar_type()) {
        if (first) {
          at::mm_out(a, dlogits.t(), x);
        } else {
          a.addmm_(dlogits.t(), x);
        }
      } else if (first) {
        at::mm_out(a, dlogits.t(), x, acc.scalar_type());
      } else {
        at::addmm_out(a, acc, dlogits.t(), x, acc.scalar_type());
      }
    }
    if (acc_b.defined()) {
      const int64_t rows_dim[] = {0};
      const at::Tensor s = at::sum(dlogits, rows_dim, false, acc_b.scalar_type());
      at::Tensor a = acc_b;
      if (first) {
        a.copy_(s);
      } else {
        a.add_(s);
      }
    }
  }

  void sum(const at::Tensor& t, const at::Tensor& out) const override { sum_into<CudaEngine>(t, out); }

  void reduce(const at::Tensor& loss_rows, const at::Tensor& weight_rows, int64_t reduction, at::Tensor& loss,
              at::Tensor* denominator) const override {
    sum_rows_into<CudaEngine>(loss_rows, weight_rows, reduction, loss, denominator);
  }

  int64_t chunk_budget_bytes() const override { return kChunkBudgetBytes; }
};

}  // namespace

// Also the GEMMs of the vocabulary-parallel linear variant (vocab_parallel_host.h).
const LceDevice& lce_device() {
  static const CudaLceDevice device;
  return device;
}

}  // namespace fusedloss::cuda

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) { fusedloss::LceKernels<&fusedloss::cuda::lce_device>::register_all(m); }
