// multi_margin_loss on CUDA: a warp per row (several rows per block) for up to
// 4096 classes, a 256-thread block per row beyond; every thread sums its
// classes and the group adds the partial sums in a fixed order. Forward reads
// each row once; backward reads it once and writes it once (the target class's
// gradient, minus the sum of the others, is written after the group's sum).
// torch's CUDA kernel uses one thread for each row's reduction.
//
// An out-of-range class index gives the row a NaN loss and NaN gradients and is
// never dereferenced (fusedloss/_validation.py has the strict mode).

#include <torch/library.h>

#include <fusedloss/multi_margin_host.h>

#include <limits>

#include "common.cuh"
#include "elementwise.cuh"

namespace fusedloss::cuda {
namespace {

constexpr int kBlock = 256;

template <int G, typename T>
__device__ __forceinline__ T group_sum(T x, T* smem) {
  if constexpr (G == kWarp) {
    return warp_sum(x);
  } else {
    return block_sum(x, smem);
  }
}

constexpr int kUnroll = 4;  // packs in flight per thread

template <typename scalar_t, int G>
__global__ void __launch_bounds__(kBlock) mm_forward(const MmParams<scalar_t> m) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = pack_size<scalar_t>();
  constexpr int kRows = kBlock / G;
  __shared__ acc_t smem[kWarp];
  const int lane = threadIdx.x % G;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / G;
  if (r >= m.N) return;
  const int64_t t = m.target[r];
  if (t < 0 || t >= m.C) {
    if (lane == 0) m.loss_out[r] = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  const scalar_t* x = m.input + r * m.C;
  const acc_t base = m.margin - static_cast<acc_t>(x[t]);
  const RowSplit sp = split_row(x, m.C);
  const int64_t head = sp.head, packs = sp.packs, tail = sp.tail;
  acc_t acc = acc_t(0);
  auto one = [&](int64_t c) {
    if (c != t) acc += math::multi_margin_term(base + static_cast<acc_t>(x[c]), m.p);
  };
  for (int64_t c = lane; c < head; c += G) one(c);
  for (int64_t k0 = lane; k0 < packs; k0 += static_cast<int64_t>(G) * kUnroll) {
    Pack<scalar_t, VEC> pk[kUnroll];
    load_packs<G>(x + head, k0, packs, pk);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + static_cast<int64_t>(u) * G;
      if (k >= packs) break;
      const int64_t c0 = head + k * VEC;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t term = math::multi_margin_term(base + static_cast<acc_t>(pk[u].v[j]), m.p);
        acc += c0 + j == t ? acc_t(0) : term;
      }
    }
  }
  for (int64_t c = tail + lane; c < m.C; c += G) one(c);
  acc = group_sum<G>(acc, smem);
  if (lane == 0) m.loss_out[r] = acc * m.row_scale(t);
}

template <typename scalar_t, int G>
__global__ void __launch_bounds__(kBlock) mm_backward(const MmParams<scalar_t> m) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = pack_size<scalar_t>();
  constexpr int kRows = kBlock / G;
  __shared__ acc_t smem[kWarp];
  const int lane = threadIdx.x % G;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / G;
  if (r >= m.N) return;
  const int64_t t = m.target[r];
  scalar_t* out = m.grad_input + r * m.C;
  if (t < 0 || t >= m.C) {
    for (int64_t c = lane; c < m.C; c += G) out[c] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
    return;
  }
  const scalar_t* x = m.input + r * m.C;
  const acc_t k = m.row_grad_scale(r, t);
  const acc_t base = m.margin - static_cast<acc_t>(x[t]);
  const RowSplit sp = split_row(x, m.C);
  const bool aligned_alike = split_row(out, m.C).head == sp.head;
  // Differently aligned rows: element by element.
  const int64_t head = aligned_alike ? sp.head : 0, packs = aligned_alike ? sp.packs : 0;
  const int64_t tail = head + packs * VEC;
  acc_t acc = acc_t(0);
  auto one = [&](int64_t c) {
    if (c == t) return;
    const acc_t d = math::multi_margin_grad_term(base + static_cast<acc_t>(x[c]), m.p) * k;
    out[c] = static_cast<scalar_t>(d);
    acc += d;
  };
  for (int64_t c = lane; c < head; c += G) one(c);
  for (int64_t k0 = lane; k0 < packs; k0 += static_cast<int64_t>(G) * kUnroll) {
    Pack<scalar_t, VEC> pk[kUnroll];
    load_packs<G>(x + head, k0, packs, pk);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t kk = k0 + static_cast<int64_t>(u) * G;
      if (kk >= packs) break;
      const int64_t c0 = head + kk * VEC;
      Pack<scalar_t, VEC> go;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t d = c0 + j == t ? acc_t(0)
                                    : math::multi_margin_grad_term(base + static_cast<acc_t>(pk[u].v[j]), m.p) * k;
        go.v[j] = static_cast<scalar_t>(d);
        acc += d;
      }
      store_pack(out + c0, go);  // element t is rewritten below, after the sum
    }
  }
  for (int64_t c = tail + lane; c < m.C; c += G) one(c);
  acc = group_sum<G>(acc, smem);
  // The pack holding t wrote a 0 there; order that store before this one
  // (block_sum's barrier does it for a block-wide group).
  if constexpr (G == kWarp) __syncwarp();
  if (lane == 0) out[t] = static_cast<scalar_t>(-acc);
}

struct CudaRowEngine {
  template <typename scalar_t>
  static void forward_rows(const MmParams<scalar_t>& m) {
    launch<scalar_t, true>(m);
  }
  template <typename scalar_t>
  static void backward_rows(const MmParams<scalar_t>& m) {
    launch<scalar_t, false>(m);
  }

 private:
  template <typename scalar_t, bool kForward>
  static void launch(const MmParams<scalar_t>& m) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    if (m.C <= 4096) {
      const int64_t blocks = ceil_div(m.N, kBlock / kWarp);
      if (kForward) {
        mm_forward<scalar_t, kWarp><<<blocks, kBlock, 0, stream>>>(m);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        mm_backward<scalar_t, kWarp><<<blocks, kBlock, 0, stream>>>(m);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    } else if (kForward) {
      mm_forward<scalar_t, kBlock><<<m.N, kBlock, 0, stream>>>(m);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      mm_backward<scalar_t, kBlock><<<m.N, kBlock, 0, stream>>>(m);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
};

using Ops = MultiMarginOps<CudaRowEngine, CudaEngine>;

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) { register_multi_margin_ops<Ops>(m); }

}  // namespace fusedloss::cuda
