// Vocabulary-parallel cross entropy on CUDA: the local kernels around the two
// collectives of fusedloss/distributed.py (the math: numerics.h, the op
// bodies: vocab_parallel_host.h).
//
// Local pass: a group of G threads per row (a warp for slices up to 2048
// classes, 256 threads up to 16384, 512 beyond), 16-byte packs of the logits
// in their own dtype (fp16/bf16 widened in registers: no fp32 copy of the
// shard), an online max / sum-exp per thread merged over the group with the
// rescale rule, as cross_entropy.cu's forward. The target's own exp is left
// out of the sum by the thread that meets it (row_push_except_sum), so no
// thread needs to know where the target is but by its index.
// Backward: the same groups, one read and one write per logit; the target's
// entry needs no reduction within the row (its s_other was summed over every
// rank in the forward), only a group barrier before it is written.
// O(N) row steps (rebase, finalize): one thread per row.
// Rows with a class stride other than 1 take the same kernels element by
// element. Out-of-range targets give NaN rows (finalize), never a read.

#include <torch/library.h>

#include <fusedloss/vocab_parallel_host.h>

#include <limits>

#include "common.cuh"
#include "row_state.cuh"
#include "elementwise.cuh"

namespace fusedloss::cuda {
namespace {

template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> vp_capped(const VpParams<scalar_t>& p, scalar_t v) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t x = static_cast<acc_t>(v);
  return p.has_softcap ? math::softcap_value(x, p.softcap, p.inv_softcap) : x;
}

// One logit of local class c into a thread's state; the target's (c == tl)
// stays out of the sum of exponentials.
template <typename scalar_t>
__device__ __forceinline__ void vp_push(const VpParams<scalar_t>& p, int64_t c, int64_t tl, scalar_t v,
                                        math::RowState<at::opmath_type<scalar_t>>& st) {
  const auto x = vp_capped(p, v);
  const auto f = p.with_f ? p.local_weight(c) : at::opmath_type<scalar_t>(0);
  if (c == tl) {
    math::row_push_except_sum(st, x, f, p.with_f);
  } else {
    math::row_push(st, x, f, p.with_f);
  }
}

// kPlain: no smoothing and no softcap (the common case), without their registers.
template <typename scalar_t, int G, bool kPlain>
__global__ void __launch_bounds__(G > kWarp ? G : kRowBlock) vp_local_kernel(const VpParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = pack_size<scalar_t>();
  constexpr int kRowsPerBlock = G > kWarp ? 1 : kRowBlock / kWarp;
  __shared__ math::RowState<acc_t> smem[G > kWarp ? G / kWarp : 1];
  const int lane = G > kWarp ? threadIdx.x : threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (G > kWarp ? 0 : threadIdx.x / kWarp);
  if (r >= p.N) return;  // whole groups only: a block-wide group never splits here
  const int64_t t = p.target[r];
  if (t == p.ignore_index) {
    if (lane == 0) p.store_ignored_local(r);
    return;
  }
  const int64_t C = p.C;
  const int64_t tl = p.local_class(t);
  const scalar_t* row = p.row(r);
  math::RowState<acc_t> st = math::row_state_empty<acc_t>();
  if (p.sC != 1) {
    for (int64_t c = lane; c < C; c += G) vp_push(p, c, tl, row[c * p.sC], st);
  } else {
    const RowSplit sp = split_row(row, C);
    for (int64_t c = lane; c < sp.head; c += G) vp_push(p, c, tl, row[c], st);
    constexpr int kUnroll = row_unroll<scalar_t>();
    for (int64_t k0 = lane; k0 < sp.packs; k0 += static_cast<int64_t>(G) * kUnroll) {
      Pack<scalar_t, VEC> pk[kUnroll];
      load_packs<G>(row + sp.head, k0, sp.packs, pk);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = k0 + static_cast<int64_t>(u) * G;
        if (k >= sp.packs) break;
        const int64_t c0 = sp.head + k * VEC;
        acc_t x[VEC];
        acc_t pm = -std::numeric_limits<acc_t>::infinity();
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          x[j] = kPlain ? static_cast<acc_t>(pk[u].v[j]) : vp_capped(p, pk[u].v[j]);
          pm = math::Ops<acc_t>::max(pm, x[j]);
        }
        math::row_rebase(st, math::Ops<acc_t>::max(st.max, pm));
        const bool finite_ref = st.max != -std::numeric_limits<acc_t>::infinity();
        if (finite_ref) {  // else only -inf logits so far: exp terms are 0
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            if (c0 + j != tl) st.sum += math::Ops<acc_t>::exp_fast(x[j] - st.max);
          }
        }
        if (!kPlain && p.with_f) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t f = p.local_weight(c0 + j);
            st.rel += f * (finite_ref ? x[j] - st.max : x[j]);
            st.mass += f;
          }
        }
      }
    }
    for (int64_t c = sp.tail + lane; c < C; c += G) vp_push(p, c, tl, row[c], st);
  }
  st = group_merge<G>(st, smem);
  if (lane == 0) p.store_local(r, st, tl >= 0 ? vp_capped(p, row[tl * p.sC]) : acc_t(0));
}

// The gradient of one logit of a row, in fp32 before rounding, but for the
// target's own entry (target()). kPlain: no smoothing and no softcap.
template <typename scalar_t, bool kPlain>
struct VpRowGrad {
  using acc_t = at::opmath_type<scalar_t>;
  math::CeOptions<acc_t> o;
  math::CeGradCoefs<acc_t> k;
  acc_t m, ls, s_other, g, w_t;
  int64_t tl;

  __device__ __forceinline__ acc_t operator()(const VpParams<scalar_t>& p, int64_t c, acc_t x) const {
    acc_t v = math::Ops<acc_t>::exp_fast((x - m) - ls) * k.ga;
    if constexpr (!kPlain) {
      if (k.m_scale != acc_t(0)) v -= k.m_scale * p.local_weight(c);
      if (p.has_softcap) v *= math::softcap_slope(x, p.inv_softcap);
    }
    return v;
  }

  // The target's own entry, from the other classes' share summed over every
  // rank in the forward: no cancellation, and no reduction within the row.
  __device__ __forceinline__ acc_t target(const VpParams<scalar_t>& p, acc_t x_t) const {
    acc_t v = math::ce_index_target_grad(g, math::Ops<acc_t>::exp((x_t - m) - ls), s_other, m + ls, w_t, o);
    if (p.has_softcap) v *= math::softcap_slope(x_t, p.inv_softcap);
    return v;
  }
};

// A barrier over the G threads of a row (the whole block when G > kWarp).
template <int G>
__device__ __forceinline__ void vp_group_sync() {
  if constexpr (G > kWarp) {
    __syncthreads();
  } else {
    __syncwarp();
  }
}

// Every element takes the general formula; then the group's first thread
// rewrites the target's entry, after a group barrier that orders the
// provisional store (by whichever thread held the target) before its own.
// The gradient may be written over the logits (grad_input == input, as the
// linear variant runs it): the target's logit is read before a barrier that
// precedes every store, and every other element is read by the thread that
// writes it, just before.
template <typename scalar_t, int G, bool kPlain>
__global__ void __launch_bounds__(G > kWarp ? G : kRowBlock) vp_backward_kernel(const VpParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = pack_size<scalar_t>();
  constexpr int kRowsPerBlock = G > kWarp ? 1 : kRowBlock / kWarp;
  const int lane = G > kWarp ? threadIdx.x : threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (G > kWarp ? 0 : threadIdx.x / kWarp);
  if (r >= p.N) return;  // whole groups only
  const int64_t C = p.C;
  const scalar_t* row = p.row(r);
  scalar_t* out = p.grad_input + r * p.gN;
  const int64_t t = p.target[r];
  if (t == p.ignore_index) {  // exactly zero
    for (int64_t c = lane; c < C; c += G) out[c * p.gC] = scalar_t(0);
    return;
  }
  VpRowGrad<scalar_t, kPlain> rg;
  rg.o = p.options();
  rg.m = p.state[3 * r];
  rg.ls = p.state[3 * r + 1];
  rg.s_other = p.state[3 * r + 2];
  rg.g = p.row_grad(r);
  rg.w_t = p.target_weight(t, rg.o.num_classes);
  rg.k = math::ce_index_grad_coefs(rg.g, rg.m + rg.ls, rg.w_t, rg.o);
  rg.tl = p.local_class(t);
  acc_t x_t = acc_t(0);
  if (rg.tl >= 0) {  // uniform over the group
    if (lane == 0) x_t = vp_capped(p, row[rg.tl * p.sC]);
    vp_group_sync<G>();
  }
  const RowSplit sp = split_row(row, C);
  const bool packed = p.sC == 1 && p.gC == 1 && split_row(static_cast<const scalar_t*>(out), C).head == sp.head;
  if (!packed) {
    for (int64_t c = lane; c < C; c += G) {
      out[c * p.gC] = static_cast<scalar_t>(rg(p, c, vp_capped(p, row[c * p.sC])));
    }
  } else {
    for (int64_t c = lane; c < sp.head; c += G) out[c] = static_cast<scalar_t>(rg(p, c, vp_capped(p, row[c])));
    constexpr int kUnroll = row_unroll<scalar_t>();
    for (int64_t k0 = lane; k0 < sp.packs; k0 += static_cast<int64_t>(G) * kUnroll) {
      Pack<scalar_t, VEC> pk[kUnroll];
      load_packs<G>(row + sp.head, k0, sp.packs, pk);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = k0 + static_cast<int64_t>(u) * G;
        if (k >= sp.packs) break;
        const int64_t c0 = sp.head + k * VEC;
        Pack<scalar_t, VEC> go;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t x = kPlain ? static_cast<acc_t>(pk[u].v[j]) : vp_capped(p, pk[u].v[j]);
          go.v[j] = static_cast<scalar_t>(rg(p, c0 + j, x));
        }
        store_pack(out + c0, go);
      }
    }
    for (int64_t c = sp.tail + lane; c < C; c += G) out[c] = static_cast<scalar_t>(rg(p, c, vp_capped(p, row[c])));
  }
  if (rg.tl >= 0) {
    vp_group_sync<G>();
    if (lane == 0) out[rg.tl * p.gC] = static_cast<scalar_t>(rg.target(p, x_t));
  }
}

template <typename F>
__global__ void __launch_bounds__(kRowBlock) vp_row_kernel(int64_t n, const F f) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowBlock + threadIdx.x;
  if (r < n) f(r);
}

struct CudaVpEngine {
  template <typename scalar_t>
  static void local_rows(const VpParams<scalar_t>& p) {
    const bool plain = !p.with_f && !p.has_softcap;
    if (plain) {
      launch<scalar_t, true, true>(p);
    } else {
      launch<scalar_t, true, false>(p);
    }
  }

  template <typename scalar_t>
  static void backward_rows(const VpParams<scalar_t>& p) {
    const bool plain = p.smoothing == 0 && !p.has_softcap;
    if (plain) {
      launch<scalar_t, false, true>(p);
    } else {
      launch<scalar_t, false, false>(p);
    }
  }

  static const LceDevice& lce_device() { return ::fusedloss::cuda::lce_device(); }

  template <typename F>
  static void for_each_row(int64_t n, const F& f) {
    const int64_t blocks = ceil_div(n, kRowBlock);
    vp_row_kernel<F><<<blocks, kRowBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(n, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Bad targets and a weight of the wrong size leave NaN rows on CUDA (a host
  // check would synchronize; fusedloss.set_validation(True) raises instead).
  template <typename acc_t>
  static void check_finalized(const int64_t*, int64_t, int64_t, const acc_t*, int64_t) {}

 private:
  template <typename scalar_t, bool kLocal, bool kPlain>
  static void launch(const VpParams<scalar_t>& p) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    if (p.C <= 2048) {
      launch_rows<scalar_t, kLocal, kPlain, kWarp>(p, ceil_div(p.N, kRowBlock / kWarp), kRowBlock, stream);
    } else if (p.C <= 16384) {
      launch_rows<scalar_t, kLocal, kPlain, 256>(p, p.N, 256, stream);
    } else {
      launch_rows<scalar_t, kLocal, kPlain, 512>(p, p.N, 512, stream);
    }
  }

  template <typename scalar_t, bool kLocal, bool kPlain, int G>
  static void launch_rows(const VpParams<scalar_t>& p, int64_t blocks, int threads, cudaStream_t stream) {
    if constexpr (kLocal) {
      vp_local_kernel<scalar_t, G, kPlain><<<blocks, threads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      vp_backward_kernel<scalar_t, G, kPlain><<<blocks, threads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
};

using VpOps = VocabParallelCeOps<CudaVpEngine, CudaEngine>;

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) { register_vocab_parallel_ops<VpOps>(m); }

}  // namespace fusedloss::cuda
