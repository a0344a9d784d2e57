// linear_cross_entropy on the CPU: the device part of the chunk loop
// (fusedloss/linear_cross_entropy_host.h): ATen's GEMMs (oneDNN for bf16/fp16,
// MKL for fp32/fp64), cut into tiles, and cross_entropy's CPU row engine.
//
// Why tiles: MKL partitions a GEMM by the thread count, and for some shapes
// its results then differ with it (measured with this torch: fp32 7 x 33 x 517,
// 1 vs 2 threads). Here every GEMM is cut into tiles whose shapes depend only
// on the problem, never splitting the reduction dimension; each tile is one
// library call, made inside at::parallel_for, where oneDNN and MKL run
// single-threaded. Every output element is thus computed by the same call on
// the same operands whatever the thread count: the same bits for 1 or N
// threads, and on every run. (Measured on the 2-core development machine, the
// tiles are also as fast as or faster than MKL's own threading for these
// shapes.)
//
// grad_weight of fp16/bf16 weights over several chunks: ATen has no CPU GEMM
// with fp16/bf16 operands and an fp32 result, so each tile's operands are
// widened to fp32 (exactly) and the fp32 GEMM adds into the fp32 accumulator;
// the per-tile copies are small (chunk rows x tile columns).

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <atomic>

#include <fusedloss/linear_cross_entropy_host.h>
#include <fusedloss/row_sum.h>

#include "elementwise.h"

namespace fusedloss::cpu {
namespace {

// Tiles: about kTiles per GEMM, cut along a dimension that is not summed over
// (logits: classes; grad_input: features; grad_weight: classes), never
// narrower than the minimum. Large tiles run the libraries' kernels at speed
// (measured here: oneDNN bf16 logits in tiles of 4000 classes took 0.6x the
// time of tiles of 1024); eight keep eight threads busy. The fp32 copies of
// grad_weight's fp16/bf16 tiles are (rows x tile) each, one per thread.
constexpr int64_t kTiles = 8;
constexpr int64_t kMinClassTile = 512;
constexpr int64_t kMinFeatureTile = 32;

// Rounded up to a multiple of 64 elements, or of the minimum where that is
// smaller: grad_input of 64 features is then two tiles of 32, one per thread,
// rather than one tile on one thread.
int64_t tile_size(int64_t n, int64_t count, int64_t minimum) {
  const int64_t t = (n + count - 1) / count;
  const int64_t align = std::min<int64_t>(minimum, 64);
  return std::max(minimum, (t + align - 1) / align * align);
}
// Default chunk: 32 MiB of logits (e.g. 262 rows of 32000 fp32 classes): a
// few times the L2 of the cores, large enough for the GEMMs to run at speed,
// small next to the gradients of an LM head.
constexpr int64_t kChunkBudgetBytes = int64_t(32) << 20;

// f(start, len) for each tile of [0, n), tiles taken by the threads in turn
// (a shared counter: a thread slowed by other work on the machine takes fewer
// tiles, and which thread computes a tile does not change its result). With
// more than one thread every tile runs inside an active parallel region, even
// a lone tile, so that MKL never splits a tile by its own threading, whose
// partition depends on the thread count. The caller's thread-local state
// (grad mode, the dispatch keys excluded below autograd, autocast) goes with
// each tile: the ATen ops in f dispatch from the worker threads.
template <typename F>
void for_tiles(int64_t n, int64_t tile, const F& f) {
  const int64_t count = (n + tile - 1) / tile;
  const at::ThreadLocalState state;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t b = next++; b < count; b = next++) f(b * tile, std::min(tile, n - b * tile));
  });
}

bool half_type(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

struct CpuLceDevice final : LceRowsOf<&ce_rows<double>, &ce_rows<float>, &ce_rows<at::Half>, &ce_rows<at::BFloat16>> {
  void logits(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) const override {
    for_tiles(w.size(0), tile_size(w.size(0), kTiles, kMinClassTile), [&](int64_t v0, int64_t len) {
      at::Tensor o = out.narrow(1, v0, len);
      const at::Tensor wt = w.narrow(0, v0, len).t();
      if (b.defined()) {
        at::addmm_out(o, b.narrow(0, v0, len), x, wt);  // torch's linear: addmm with the bias
      } else {
        at::mm_out(o, x, wt);
      }
    });
  }

  void grad_input(const at::Tensor& out, const at::Tensor& dlogits, const at::Tensor& w) const override {
    const int64_t D = out.size(1);
    for_tiles(D, tile_size(D, kTiles, kMinFeatureTile), [&](int64_t d0, int64_t len) {
      at::Tensor o = out.narrow(1, d0, len);
      at::mm_out(o, dlogits, w.narrow(1, d0, len));
    });
  }

  void grad_weight(const at::Tensor& acc, const at::Tensor& acc_b, const at::Tensor& dlogits, const at::Tensor& x,
                   bool first) const override {
    const bool wide = half_type(dlogits.scalar_type()) &&
                      ((acc.defined() && acc.scalar_type() == at::kFloat) ||
                       (acc_b.defined() && acc_b.scalar_type() == at::kFloat));
    const at::Tensor xs = wide && acc.defined() ? x.to(at::kFloat) : x;
    // Twice as many tiles: a wide tile's fp32 copy is what each thread holds.
    const int64_t V = dlogits.size(1);
    for_tiles(V, tile_size(V, 2 * kTiles, kMinClassTile), [&](int64_t v0, int64_t len) {
      at::Tensor d = dlogits.narrow(1, v0, len);
      if (wide) d = d.to(at::kFloat);  // exact
      if (acc.defined()) {
        at::Tensor a = acc.narrow(0, v0, len);
        if (first) {
          at::mm_out(a, d.t(), xs);
        } else {
          a.addmm_(d.t(), xs);
        }
      }
      if (acc_b.defined()) {
        const int64_t rows_dim[] = {0};
        at::Tensor a = acc_b.narrow(0, v0, len);
        if (first) {
          at::sum_out(a, d, rows_dim);
        } else {
          a.add_(d.sum(rows_dim));
        }
      }
    });
  }

  void sum(const at::Tensor& t, const at::Tensor& out) const override { sum_into<Engine>(t, out); }

  void reduce(const at::Tensor& loss_rows, const at::Tensor& weight_rows, int64_t reduction, at::Tensor& loss,
              at::Tensor* denominator) const override {
    sum_rows_into<Engine>(loss_rows, weight_rows, reduction, loss, denominator);
  }

  int64_t chunk_budget_bytes() const override { return kChunkBudgetBytes; }
};

}  // namespace

// Also the GEMMs of the vocabulary-parallel linear variant (vocab_parallel_host.h).
const LceDevice& lce_device() {
  static const CpuLceDevice device;
  return device;
}

}  // namespace fusedloss::cpu

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) { fusedloss::LceKernels<&fusedloss::cpu::lce_device>::register_all(m); }
