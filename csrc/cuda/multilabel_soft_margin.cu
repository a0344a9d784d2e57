// multilabel_soft_margin_loss on CUDA: the per-row sums of the forward, read
// as the elementwise engine reads its operands (elementwise.cuh: each operand
// in its own dtype, 16-byte packs of the contiguous ones, broadcast weights by
// index arithmetic), a warp per row up to 1024 classes (8 rows per block), a
// 256-thread block per row beyond. Each thread sums its packs; the group adds
// the partial sums in a fixed order (no atomics). The backward is the
// elementwise engine's map.

#include <torch/library.h>

#include <fusedloss/multilabel_soft_margin_host.h>

#include <limits>

#include "common.cuh"
#include "elementwise.cuh"

namespace fusedloss::cuda {
namespace {

constexpr int kRowThreads = 256;

template <typename acc_t, typename F, int G>
__global__ void __launch_bounds__(kRowThreads)
    row_sums_kernel(DeviceOperands<F::kIn> ops, F f, int64_t rows, int64_t C, bool vec_ok, acc_t* out) {
  constexpr int VEC = vec_width<acc_t>();
  constexpr int kRowsPerBlock = kRowThreads / G;
  __shared__ acc_t smem[kWarp];
  const int lane = threadIdx.x % G;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / G;
  if (r >= rows) return;  // whole groups only: a block-wide group never splits here
  const int64_t base = r * C;
  // Elements [base, base + head) one by one, then packs at multiples of VEC
  // (where every contiguous operand is 16-byte aligned), then the tail.
  int64_t head = vec_ok ? (VEC - base % VEC) % VEC : C;
  head = head < C ? head : C;
  const int64_t packs = (C - head) / VEC;
  const int64_t tail = head + packs * VEC;
  SumSink<acc_t, F::kOut, VEC> sink;
  sink.acc[0] = acc_t(0);
  for (int64_t c = lane; c < head; c += G) apply_one<acc_t>(ops, f, base + c, sink);
  for (int64_t k = lane; k < packs; k += G) {
    const int64_t i = base + head + k * VEC;
    Vals<acc_t, VEC> in[F::kIn];
#pragma unroll
    for (int q = 0; q < F::kIn; ++q) in[q] = operand_pack<VEC, acc_t>(ops, q, i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_t x[F::kIn];
      acc_t o[F::kOut];
#pragma unroll
      for (int q = 0; q < F::kIn; ++q) x[q] = in[q].v[j];
      f(x, o);
      sink.acc[0] += o[0];
    }
  }
  for (int64_t c = tail + lane; c < C; c += G) apply_one<acc_t>(ops, f, base + c, sink);
  acc_t acc = sink.acc[0];
  if constexpr (G == kWarp) {
    acc = warp_sum(acc);
  } else {
    acc = block_sum(acc, smem);
  }
  // C == 0 gives 0 / 0 = NaN, torch's value for a row without classes.
  if (lane == 0) out[r] = acc / static_cast<acc_t>(C);
}

struct CudaRowEngine {
  template <typename acc_t, typename F>
  static void row_sums(const ElementwiseCall& c, const F& f, int64_t rows, int64_t C, acc_t* out) {
    const c10::cuda::CUDAGuard guard(c.device);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    bool vec_ok = true;
    const auto ops = device_operands<F::kIn>(c, &vec_ok);
    if (C <= 1024) {
      const int64_t blocks = ceil_div(rows, kRowThreads / kWarp);
      row_sums_kernel<acc_t, F, kWarp><<<blocks, kRowThreads, 0, stream>>>(ops, f, rows, C, vec_ok, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      row_sums_kernel<acc_t, F, kRowThreads><<<rows, kRowThreads, 0, stream>>>(ops, f, rows, C, vec_ok, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
};

using Ops = MultilabelSoftMarginOps<CudaRowEngine, CudaEngine>;

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) { register_multilabel_soft_margin_ops<Ops>(m); }

}  // namespace fusedloss::cuda
