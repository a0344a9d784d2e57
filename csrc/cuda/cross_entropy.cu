// Cross entropy (softmax + NLL) on CUDA.
//
// Rows whose classes are contiguous (class stride 1: (N, C) logits, also
// channels-last maps) go to row kernels: a group of G threads per row (a warp
// for C <= 2048, 256 threads up to 16384, 512 beyond), 16-byte packs with the
// unaligned head and tail of each row (storage offsets, odd C) done element by
// element, U packs in flight per thread. Forward: one read of the row, an online
// max/sum-exp per thread (one exp per logit), merged across the group with the
// rescale rule; the target logit is read once by the group's first thread.
// Backward: one read and one write of the row, softmax recomputed from the saved
// fp32 log-sum-exp; the target term is applied in fp32 before rounding.
//
// Rows with a class stride (N, C, d1, ...) go to strided kernels: one thread per
// row, consecutive threads on consecutive positions, so every load and store of
// a warp is coalesced, looping over the classes.
//
// Out-of-range class indices are never dereferenced: their rows get a NaN loss
// and NaN gradients (fusedloss/_validation.py has the strict mode). Per-row
// results are summed by the deterministic engine of elementwise.cuh.

#include <torch/library.h>

#include <fusedloss/cross_entropy_host.h>
#include <fusedloss/linear_cross_entropy_host.h>

#include <limits>

#include "common.cuh"
#include "row_state.cuh"
#include "elementwise.cuh"

namespace fusedloss::cuda {
namespace {

using math::CeOptions;

// Plain block-wide groups keep 1536 threads per SM in up to six blocks (at most
// 42 registers each), so that while one block computes others wait on memory
// (measured on an H200: a lone 1024-thread block per SM left the forward at
// 55% of copy bandwidth).
template <int G>
constexpr int min_blocks() {
  return G > kWarp ? 1536 / G : 1;
}

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
__device__ __forceinline__ T nan_value() {
  return std::numeric_limits<T>::quiet_NaN();
}

template <typename acc_t>
using RowState = math::RowState<acc_t>;

template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> capped(const CeParams<scalar_t>& p, scalar_t v) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t x = static_cast<acc_t>(v);
  return p.has_softcap ? math::softcap_value(x, p.softcap, p.inv_softcap) : x;
}

// The option factor f_c of a logit (numerics.h): w_c p'_c, or w_c.
template <bool kProb, typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> factor(const CeParams<scalar_t>& p,
                                                            const CeOptions<at::opmath_type<scalar_t>>& o,
                                                            int64_t tbase, int64_t c) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t w = p.weight_at(c);
  if (kProb) return w * math::ce_smoothed_target(p.target_at(tbase + c * p.tC), o);
  return w;
}

template <bool kProb, typename scalar_t>
__device__ __forceinline__ void push_one(const CeParams<scalar_t>& p, const CeOptions<at::opmath_type<scalar_t>>& o,
                                         int64_t tbase, int64_t c, scalar_t v, bool with_f,
                                         RowState<at::opmath_type<scalar_t>>& st) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t x = capped(p, v);
  math::row_push(st, x, with_f ? factor<kProb>(p, o, tbase, c) : acc_t(0), with_f);
}

// Writes the row's forward outputs from its merged state (one thread).
template <bool kProb, typename scalar_t>
__device__ __forceinline__ void finish_row(const CeParams<scalar_t>& p, const CeOptions<at::opmath_type<scalar_t>>& o,
                                           int64_t r, int64_t t, int64_t xbase, const RowState<at::opmath_type<scalar_t>>& st) {
  using acc_t = at::opmath_type<scalar_t>;
  if (kProb) {
    p.store_prob_row(r, st, o);
  } else if (t < 0 || t >= p.g.C) {
    // Out-of-range class index: a NaN logit gives the row a NaN loss that
    // shows, weight 0, and the target is never dereferenced.
    p.store_index_row(r, st, nan_value<acc_t>(), acc_t(0), o);
  } else {
    p.store_index_row(r, st, capped(p, p.input[xbase + t * p.g.sC]), p.weight_at(t), o);
  }
}

template <typename scalar_t, bool kProb, int G, bool kPlain>
__global__ void __launch_bounds__(G > kWarp ? G : kRowBlock, kPlain ? min_blocks<G>() : 1)
    ce_forward_rows(const CeParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = pack_size<scalar_t>();
  constexpr int kRowsPerBlock = G > kWarp ? 1 : kRowBlock / kWarp;
  __shared__ RowState<acc_t> smem[G > kWarp ? G / kWarp : 1];
  const int lane = G > kWarp ? threadIdx.x : threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (G > kWarp ? 0 : threadIdx.x / kWarp);
  if (r >= p.g.rows()) return;  // whole groups only: a block-wide group never splits here
  const CeOptions<acc_t> o = p.options();
  const int64_t C = p.g.C;
  const int64_t t = kProb ? 0 : p.target_index[r];
  if (!kProb && t == o.ignore_index) {
    if (lane == 0) p.store_ignored_row(r);
    return;
  }
  const int64_t xbase = p.offset(r, p.g.sN, p.g.sS);
  const int64_t tbase = kProb ? p.offset(r, p.tN, p.tS) : 0;
  const scalar_t* row = p.input + xbase;
  const bool with_f = kProb || o.smoothing > acc_t(0);
  RowState<acc_t> st = math::row_state_empty<acc_t>();
  const RowSplit sp = split_row(row, C);
  for (int64_t c = lane; c < sp.head; c += G) push_one<kProb>(p, o, tbase, c, row[c], with_f, st);
  constexpr int kUnroll = row_unroll<scalar_t>();
  for (int64_t k0 = lane; k0 < sp.packs; k0 += static_cast<int64_t>(G) * kUnroll) {
    Pack<scalar_t, VEC> pk[kUnroll];
    load_packs<G>(row + sp.head, k0, sp.packs, pk);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + static_cast<int64_t>(u) * G;
      if (k >= sp.packs) break;
      acc_t x[VEC];
      acc_t pm = neg_inf<acc_t>();
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        x[j] = kPlain ? static_cast<acc_t>(pk[u].v[j]) : capped(p, pk[u].v[j]);
        pm = math::Ops<acc_t>::max(pm, x[j]);
      }
      math::row_rebase(st, math::Ops<acc_t>::max(st.max, pm));
      if (st.max != neg_inf<acc_t>()) {  // else only -inf logits so far: exp terms are 0
#pragma unroll
        for (int j = 0; j < VEC; ++j) st.sum += math::Ops<acc_t>::exp_fast(x[j] - st.max);
      }
      if (!kPlain && with_f) {
        const int64_t c0 = sp.head + k * VEC;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t f = factor<kProb>(p, o, tbase, c0 + j);
          st.rel += f * (st.max != neg_inf<acc_t>() ? x[j] - st.max : x[j]);
          st.mass += f;
        }
      }
    }
  }
  for (int64_t c = sp.tail + lane; c < C; c += G) push_one<kProb>(p, o, tbase, c, row[c], with_f, st);
  st = group_merge<G>(st, smem);
  if (lane == 0) finish_row<kProb>(p, o, r, t, xbase, st);
}

// The gradient of one element: g (q a - m_c) [- target term], times the softcap slope.
template <bool kProb, typename scalar_t>
struct RowGrad {
  using acc_t = at::opmath_type<scalar_t>;
  math::CeGradCoefs<acc_t> k;
  acc_t m, ls;  // the row's max and log(sum exp(x - max))
  acc_t g;      // the row's grad_output over the mean's denominator
  acc_t w_t;    // the target's class weight (class indices)
  int64_t t;
  int64_t tbase;

  // q_c: the probability of a class with (capped) logit x.
  __device__ __forceinline__ acc_t prob(acc_t x) const { return math::Ops<acc_t>::exp_fast((x - m) - ls); }

  // The gradient of class c with probability q, but for a class-index
  // target's own entry (target()); before the softcap slope.
  __device__ __forceinline__ acc_t operator()(const CeParams<scalar_t>& p, const CeOptions<acc_t>& o, int64_t c,
                                              acc_t q) const {
    acc_t v = q * k.ga;
    if (kProb) {
      v -= k.m_scale * p.weight_at(c) * math::ce_smoothed_target(p.target_at(tbase + c * p.tC), o);
    } else if (k.m_scale != acc_t(0)) {
      v -= k.m_scale * p.weight_at(c);
    }
    return v;
  }

  // The gradient of element c in fp32 before rounding, softcap slope included
  // (a class-index target's own entry is rewritten by target()).
  __device__ __forceinline__ acc_t full(const CeParams<scalar_t>& p, const CeOptions<acc_t>& o, int64_t c,
                                        acc_t x) const {
    acc_t v = (*this)(p, o, c, prob(x));
    if (p.has_softcap) v *= math::softcap_slope(x, p.inv_softcap);
    return v;
  }

  // A class-index target's own entry (numerics.h ce_index_target_grad), from
  // its (capped) logit and the sum of the other classes' probabilities.
  __device__ __forceinline__ acc_t target(const CeParams<scalar_t>& p, const CeOptions<acc_t>& o, acc_t x_t,
                                          acc_t s_other) const {
    acc_t v = math::ce_index_target_grad(g, prob(x_t), s_other, m + ls, w_t, o);
    if (p.has_softcap) v *= math::softcap_slope(x_t, p.inv_softcap);
    return v;
  }
};

template <bool kProb, typename scalar_t>
__device__ __forceinline__ bool prepare_row_grad(const CeParams<scalar_t>& p, const CeOptions<at::opmath_type<scalar_t>>& o,
                                                 int64_t r, RowGrad<kProb, scalar_t>& rg, bool* ignored) {
  using acc_t = at::opmath_type<scalar_t>;
  *ignored = false;
  const acc_t g = p.row_grad(r);
  rg.g = g;
  rg.m = p.lse[2 * r];
  rg.ls = p.lse[2 * r + 1];
  const acc_t lse = rg.m + rg.ls;
  rg.tbase = kProb ? p.offset(r, p.tN, p.tS) : 0;
  if (kProb) {
    rg.k = math::ce_prob_grad_coefs(g, lse, p.target_mass[r], o);
    rg.t = -1;
    return true;
  }
  rg.t = p.target_index[r];
  if (rg.t == o.ignore_index) {
    *ignored = true;
    return true;
  }
  if (rg.t < 0 || rg.t >= p.g.C) return false;
  rg.w_t = p.weight_at(rg.t);
  rg.k = math::ce_index_grad_coefs(g, lse, rg.w_t, o);
  return true;
}

template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> target_grad(const CeParams<scalar_t>& p,
                                                                 const CeOptions<at::opmath_type<scalar_t>>& o,
                                                                 at::opmath_type<scalar_t> g, at::opmath_type<scalar_t> m,
                                                                 at::opmath_type<scalar_t> ls, int64_t c,
                                                                 at::opmath_type<scalar_t> x) {
  using acc_t = at::opmath_type<scalar_t>;
  return math::ce_target_grad(g, p.weight_at(c), m, ls, x, o);
}

// kPlain: class-index targets without smoothing or softcap, the common
// training case, compiled without the general path's registers.
//
// A class-index target's own entry needs the sum of the other classes'
// probabilities (numerics.h ce_index_target_grad): every thread reads the
// target logit first (a group barrier follows, so that in-place writes cannot
// overtake that read), adds the probabilities of its other classes, and after
// the group's sum the group's first thread writes the target's entry over the
// provisional value its owner stored with its pack.
template <typename scalar_t, bool kProb, int G, bool kPlain>
__global__ void __launch_bounds__(G > kWarp ? G : kRowBlock, kPlain ? min_blocks<G>() : 1)
    ce_backward_rows(const CeParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = pack_size<scalar_t>();
  constexpr int kRowsPerBlock = G > kWarp ? 1 : kRowBlock / kWarp;
  __shared__ acc_t smem[kWarp];
  const int lane = G > kWarp ? threadIdx.x : threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (G > kWarp ? 0 : threadIdx.x / kWarp);
  if (r >= p.g.rows()) return;  // whole groups only
  const CeOptions<acc_t> o = p.options();
  const int64_t C = p.g.C;
  RowGrad<kProb, scalar_t> rg;
  bool ignored;
  const bool valid = prepare_row_grad<kProb>(p, o, r, rg, &ignored);
  const scalar_t* row = p.input + p.offset(r, p.g.sN, p.g.sS);
  scalar_t* out = p.grad_input != nullptr ? p.grad_input + p.offset(r, p.gN, p.gS) : nullptr;
  const int64_t tbase_out = p.offset(r, p.gtN, p.gtS);
  // The target's gradient is packed only when it has the logits' dtype.
  const bool tout_packable = p.grad_target_dtype == dtype_code(c10::CppTypeToScalarType<scalar_t>::value);
  scalar_t* tout = p.grad_target != nullptr ? static_cast<scalar_t*>(p.grad_target) + tbase_out : nullptr;
  const acc_t g = p.row_grad(r);
  // Group-uniform: whether this row has a class-index target entry to write.
  const bool own_target = !kProb && valid && !ignored && out != nullptr;
  acc_t x_t = acc_t(0);
  if (own_target) x_t = capped(p, row[rg.t]);
  if constexpr (G > kWarp) {
    __syncthreads();
  } else {
    __syncwarp();
  }
  acc_t s_other = acc_t(0);  // sum of q_c over this thread's c != t
  // Uniform per row: packs only when input and output rows share their alignment.
  const RowSplit sp = split_row(row, C);
  const bool packed = p.gC == 1 && (out == nullptr || split_row(out, C).head == sp.head) &&
                      (tout == nullptr || (tout_packable && p.gtC == 1 && split_row(tout, C).head == sp.head));
  auto one = [&](int64_t c) {
    if (ignored) {
      if (out != nullptr) out[c * p.gC] = scalar_t(0);
      return;
    }
    if (!valid) {
      if (out != nullptr) out[c * p.gC] = static_cast<scalar_t>(nan_value<acc_t>());
      return;
    }
    const acc_t x = capped(p, row[c]);
    if (!kProb && c != rg.t) s_other += rg.prob(x);
    if (out != nullptr) out[c * p.gC] = static_cast<scalar_t>(rg.full(p, o, c, x));
    if (tout != nullptr) {
      store_value(p.grad_target, p.grad_target_dtype, tbase_out + c * p.gtC, target_grad(p, o, g, rg.m, rg.ls, c, x));
    }
  };
  if (!packed) {
    for (int64_t c = lane; c < C; c += G) one(c);
  } else {
    for (int64_t c = lane; c < sp.head; c += G) one(c);
    constexpr int kUnroll = row_unroll<scalar_t>();
    for (int64_t k0 = lane; k0 < sp.packs; k0 += static_cast<int64_t>(G) * kUnroll) {
      Pack<scalar_t, VEC> pk[kUnroll];
      if (!ignored) load_packs<G>(row + sp.head, k0, sp.packs, pk);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = k0 + static_cast<int64_t>(u) * G;
        if (k >= sp.packs) break;
        const int64_t c0 = sp.head + k * VEC;
        Pack<scalar_t, VEC> go, gt;
        if (ignored || !valid) {
          const scalar_t fill = ignored ? scalar_t(0) : static_cast<scalar_t>(nan_value<acc_t>());
#pragma unroll
          for (int j = 0; j < VEC; ++j) go.v[j] = fill;
        } else if constexpr (kPlain) {
          const int64_t t_in_pack = rg.t - c0;  // compared with the constant j: no 64-bit index per element
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t q = rg.prob(static_cast<acc_t>(pk[u].v[j]));
            s_other += t_in_pack == j ? acc_t(0) : q;
            go.v[j] = static_cast<scalar_t>(q * rg.k.ga);
          }
        } else {
          const int64_t t_in_pack = rg.t - c0;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t x = capped(p, pk[u].v[j]);
            const acc_t q = rg.prob(x);
            if (!kProb && t_in_pack != j) s_other += q;
            acc_t v = rg(p, o, c0 + j, q);
            if (p.has_softcap) v *= math::softcap_slope(x, p.inv_softcap);
            go.v[j] = static_cast<scalar_t>(v);
            if (tout != nullptr) gt.v[j] = static_cast<scalar_t>(target_grad(p, o, g, rg.m, rg.ls, c0 + j, x));
          }
        }
        if (out != nullptr) store_pack(out + c0, go);
        if (tout != nullptr && valid && !ignored) store_pack(tout + c0, gt);
      }
    }
    for (int64_t c = sp.tail + lane; c < C; c += G) one(c);
  }
  if (own_target) {
    // The sum is in the group's first thread; the barrier inside the group
    // sum (or the warp sync) orders the owner's provisional store before this
    // one.
    if constexpr (G > kWarp) {
      s_other = block_sum(s_other, smem);
    } else {
      s_other = warp_sum(s_other);
      __syncwarp();
    }
    if (lane == 0) out[rg.t * p.gC] = static_cast<scalar_t>(rg.target(p, o, x_t, s_other));
  }
}

// One thread per row, looping over strided classes.
template <typename scalar_t, bool kProb>
__global__ void __launch_bounds__(kRowBlock) ce_forward_strided(const CeParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowBlock + threadIdx.x;
  if (r >= p.g.rows()) return;
  const CeOptions<acc_t> o = p.options();
  const int64_t t = kProb ? 0 : p.target_index[r];
  if (!kProb && t == o.ignore_index) {
    p.store_ignored_row(r);
    return;
  }
  const int64_t xbase = p.offset(r, p.g.sN, p.g.sS);
  const int64_t tbase = kProb ? p.offset(r, p.tN, p.tS) : 0;
  const bool with_f = kProb || o.smoothing > acc_t(0);
  RowState<acc_t> st = math::row_state_empty<acc_t>();
  for (int64_t c = 0; c < p.g.C; ++c) push_one<kProb>(p, o, tbase, c, p.input[xbase + c * p.g.sC], with_f, st);
  finish_row<kProb>(p, o, r, t, xbase, st);
}

template <typename scalar_t, bool kProb>
__global__ void __launch_bounds__(kRowBlock) ce_backward_strided(const CeParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowBlock + threadIdx.x;
  if (r >= p.g.rows()) return;
  const CeOptions<acc_t> o = p.options();
  RowGrad<kProb, scalar_t> rg;
  bool ignored;
  const bool valid = prepare_row_grad<kProb>(p, o, r, rg, &ignored);
  const int64_t xbase = p.offset(r, p.g.sN, p.g.sS);
  scalar_t* out = p.grad_input != nullptr ? p.grad_input + p.offset(r, p.gN, p.gS) : nullptr;
  const int64_t tbase_out = p.offset(r, p.gtN, p.gtS);
  const acc_t g = p.row_grad(r);
  const bool own_target = !kProb && valid && !ignored && out != nullptr;
  // Read before the row is overwritten (in place); see ce_backward_rows.
  const acc_t x_t = own_target ? capped(p, p.input[xbase + rg.t * p.g.sC]) : acc_t(0);
  acc_t s_other = acc_t(0);
  for (int64_t c = 0; c < p.g.C; ++c) {
    if (ignored || !valid) {
      if (out != nullptr) out[c * p.gC] = ignored ? scalar_t(0) : static_cast<scalar_t>(nan_value<acc_t>());
      continue;
    }
    const acc_t x = capped(p, p.input[xbase + c * p.g.sC]);
    if (!kProb && c != rg.t) s_other += rg.prob(x);
    if (out != nullptr) out[c * p.gC] = static_cast<scalar_t>(rg.full(p, o, c, x));
    if (p.grad_target != nullptr) {
      store_value(p.grad_target, p.grad_target_dtype, tbase_out + c * p.gtC, target_grad(p, o, g, rg.m, rg.ls, c, x));
    }
  }
  if (own_target) out[rg.t * p.gC] = static_cast<scalar_t>(rg.target(p, o, x_t, s_other));
}

struct CudaRowEngine {
  template <typename scalar_t, bool kProb>
  static void forward_rows(const CeParams<scalar_t>& p) {
    launch<scalar_t, kProb, true>(p);
  }
  template <typename scalar_t, bool kProb>
  static void backward_rows(const CeParams<scalar_t>& p) {
    launch<scalar_t, kProb, false>(p);
  }
  // linear_cross_entropy's fused phase: the forward kernel, then the backward
  // kernel in place (p.grad_input == p.input, p.lse == p.lse_out) on the same
  // stream. A chunk of rows is larger than L2 at vocabulary sizes, so the
  // second sweep reads the logits from memory again either way; what the
  // fusion saves on the CPU (an L2-resident row) a single two-sweep kernel
  // would save here only for rows still in L2.
  template <typename scalar_t, bool kProb>
  static void forward_backward_rows(const CeParams<scalar_t>& p) {
    launch<scalar_t, kProb, true>(p);
    launch<scalar_t, kProb, false>(p);
  }

 private:
  template <typename scalar_t, bool kProb, bool kForward>
  static void launch(const CeParams<scalar_t>& p) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t rows = p.g.rows();
    if (p.g.sC != 1) {
      const int64_t blocks = ceil_div(rows, kRowBlock);
      if (kForward) {
        ce_forward_strided<scalar_t, kProb><<<blocks, kRowBlock, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        ce_backward_strided<scalar_t, kProb><<<blocks, kRowBlock, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return;
    }
    if (p.g.C <= 2048) {
      launch_rows<scalar_t, kProb, kForward, kWarp>(p, ceil_div(rows, kRowBlock / kWarp), kRowBlock, stream);
    } else if (p.g.C <= 16384) {
      launch_rows<scalar_t, kProb, kForward, 256>(p, rows, 256, stream);
    } else {
      launch_rows<scalar_t, kProb, kForward, 512>(p, rows, 512, stream);
    }
  }

  template <typename scalar_t, bool kProb, bool kForward, int G>
  static void launch_rows(const CeParams<scalar_t>& p, int64_t blocks, int threads, cudaStream_t stream) {
    const bool plain = !kProb && p.opt.smoothing == 0 && !p.has_softcap;
    if (kForward && plain) {
      ce_forward_rows<scalar_t, kProb, G, !kProb><<<blocks, threads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (kForward) {
      ce_forward_rows<scalar_t, kProb, G, false><<<blocks, threads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (plain && p.grad_target == nullptr) {
      ce_backward_rows<scalar_t, kProb, G, !kProb><<<blocks, threads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      ce_backward_rows<scalar_t, kProb, G, false><<<blocks, threads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
};

using Ops = CrossEntropyOps<CudaRowEngine, CudaEngine>;

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) { register_cross_entropy_ops<Ops>(m); }

}  // namespace fusedloss::cuda

// ---------------------------------------------------------------------------
// The row phases on chunks of logits that other ops produce
// (linear_cross_entropy, fusedloss/linear_cross_entropy_host.h).
namespace fusedloss::cuda {

template <typename scalar_t>
void ce_rows(CeRowPhase phase, bool prob, const CeParams<scalar_t>& p) {
  if (p.g.rows() == 0) return;
  switch (phase) {
    case CeRowPhase::kStats:
      return prob ? CudaRowEngine::forward_rows<scalar_t, true>(p) : CudaRowEngine::forward_rows<scalar_t, false>(p);
    case CeRowPhase::kGrad:
      return prob ? CudaRowEngine::backward_rows<scalar_t, true>(p)
                  : CudaRowEngine::backward_rows<scalar_t, false>(p);
    case CeRowPhase::kFused:
      return prob ? CudaRowEngine::forward_backward_rows<scalar_t, true>(p)
                  : CudaRowEngine::forward_backward_rows<scalar_t, false>(p);
  }
}

template void ce_rows<double>(CeRowPhase, bool, const CeParams<double>&);
template void ce_rows<float>(CeRowPhase, bool, const CeParams<float>&);
template void ce_rows<at::Half>(CeRowPhase, bool, const CeParams<at::Half>&);
template void ce_rows<at::BFloat16>(CeRowPhase, bool, const CeParams<at::BFloat16>&);

}  // namespace fusedloss::cuda
