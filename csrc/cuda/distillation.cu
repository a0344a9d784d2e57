// Distillation on logits (KL and generalised JSD) on CUDA: a group of G
// threads per row (a warp for up to 2048 classes, 8 rows per block; a
// 256-thread block up to 16384; 512 threads beyond), reading both rows in
// 16-byte packs (the unaligned head and tail of a row element by element), U
// packs of each row in flight per thread.
//
// Forward: one read of both rows, the online state of numerics.h (both maxima,
// both sums of exps, the KL sum w) per thread, merged across the group with the
// rescale rules. JSD's mixture needs the normalised rows, so its forward makes
// a second sweep of the row after the group's merge (a re-read that the L2
// mostly serves). Backward: one read of both rows and one write of each wanted
// gradient, from the row's saved state; no reduction.
//
// The per-class math is numerics.h's (kl_class_terms, jsd_class_terms,
// distill_class_grads), the same the CPU kernels run. Per-row losses are summed
// by the deterministic engine of elementwise.cuh.

#include <torch/library.h>

#include <fusedloss/distillation_host.h>

#include <limits>

#include "common.cuh"
#include "row_state.cuh"
#include "elementwise.cuh"

namespace fusedloss::cuda {
namespace {

template <typename acc_t>
using KlState = math::KlState<acc_t>;

template <int G, typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x, acc_t* smem) {
  if constexpr (G == kWarp) {
    return warp_sum(x);
  } else {
    return block_sum(x, smem);
  }
}

template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> scaled(const DistillParams<scalar_t>& p, scalar_t v) {
  const at::opmath_type<scalar_t> x = static_cast<at::opmath_type<scalar_t>>(v);
  return p.scaled ? x * p.inv_t : x;
}

// Calls f(c, a, b) for every class of the row this thread owns, a and b the
// P and Q logits divided by T; f_pack(c0, a[VEC], b[VEC]) for the aligned packs
// (both rows in 16-byte packs when they share their alignment).
template <int G, typename scalar_t, typename F, typename FPack>
__device__ __forceinline__ void for_row(const DistillParams<scalar_t>& p, const scalar_t* arow, const scalar_t* brow,
                                        int lane, bool packable, F&& f, FPack&& f_pack) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = pack_size<scalar_t>();
  constexpr int U = row_unroll<scalar_t>();
  const int64_t C = p.g.C;
  const RowSplit sp = split_row(arow, C);
  if (!packable || split_row(brow, C).head != sp.head) {
    for (int64_t c = lane; c < C; c += G) f(c, scaled(p, arow[c]), scaled(p, brow[c]));
    return;
  }
  for (int64_t c = lane; c < sp.head; c += G) f(c, scaled(p, arow[c]), scaled(p, brow[c]));
  for (int64_t k0 = lane; k0 < sp.packs; k0 += static_cast<int64_t>(G) * U) {
    Pack<scalar_t, VEC> pa[U], pb[U];
    load_packs<G>(arow + sp.head, k0, sp.packs, pa);
    load_packs<G>(brow + sp.head, k0, sp.packs, pb);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + static_cast<int64_t>(u) * G;
      if (k >= sp.packs) break;
      acc_t a[VEC], b[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        a[j] = scaled(p, pa[u].v[j]);
        b[j] = scaled(p, pb[u].v[j]);
      }
      f_pack(sp.head + k * VEC, a, b);
    }
  }
  for (int64_t c = sp.tail + lane; c < C; c += G) f(c, scaled(p, arow[c]), scaled(p, brow[c]));
}

template <typename scalar_t, int G>
__global__ void __launch_bounds__(G > kWarp ? G : kRowBlock) distill_forward_rows(const DistillParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = pack_size<scalar_t>();
  constexpr int kRowsPerBlock = G > kWarp ? 1 : kRowBlock / kWarp;
  __shared__ KlState<acc_t> smem[G > kWarp ? G / kWarp : 1];
  __shared__ acc_t sums[kWarp];
  __shared__ acc_t row[6];
  const int lane = G > kWarp ? threadIdx.x : threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (G > kWarp ? 0 : threadIdx.x / kWarp);
  if (r >= p.g.rows()) return;  // whole groups only: a block-wide group never splits here
  if (p.ignored(r)) {
    if (lane == 0) p.store_ignored_row(r);
    return;
  }
  const scalar_t* arow = p.p_in + p.offset(r, p.pN, p.pS);
  const scalar_t* brow = p.q_in + p.offset(r, p.qN, p.qS);
  KlState<acc_t> st = math::kl_state_empty<acc_t>();
  for_row<G>(
      p, arow, brow, lane, true, [&](int64_t, acc_t a, acc_t b) { math::kl_push(st, a, b); },
      [&](int64_t, const acc_t(&a)[VEC], const acc_t(&b)[VEC]) {
        acc_t ma = a[0], mb = b[0];
#pragma unroll
        for (int j = 1; j < VEC; ++j) {
          ma = math::Ops<acc_t>::max(ma, a[j]);
          mb = math::Ops<acc_t>::max(mb, b[j]);
        }
        math::kl_rebase_p(st, math::Ops<acc_t>::max(st.mp, ma));
        math::kl_rebase_q(st, math::Ops<acc_t>::max(st.mq, mb));
#pragma unroll
        for (int j = 0; j < VEC; ++j) math::kl_add(st, a[j], b[j]);
      });
  st = group_merge<G>(st, smem);
  math::DistillRow<acc_t> d = math::kl_finish<acc_t>(st);  // right in the group's first thread
  if (p.mode == kDistillJsd) {
    // Every thread of the group needs the row's maxima and log sums.
    if constexpr (G > kWarp) {
      if (threadIdx.x == 0) {
        row[0] = d.mp;
        row[1] = d.mq;
        row[2] = d.sp;
        row[3] = d.sq;
        row[4] = d.c;
        row[5] = d.c_lo;
      }
      __syncthreads();
      d.mp = row[0];
      d.mq = row[1];
      d.sp = row[2];
      d.sq = row[3];
      d.c = row[4];
      d.c_lo = row[5];
    }
    acc_t kp = acc_t(0), kq = acc_t(0);
    auto terms = [&](acc_t a, acc_t b) {
      acc_t tp, tq;
      math::jsd_class_terms(a, b, d, p.beta, &tp, &tq);
      kp += tp;
      kq += tq;
    };
    for_row<G>(
        p, arow, brow, lane, true, [&](int64_t, acc_t a, acc_t b) { terms(a, b); },
        [&](int64_t, const acc_t(&a)[VEC], const acc_t(&b)[VEC]) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) terms(a[j], b[j]);
        });
    kp = group_sum<G>(kp, sums);
    kq = group_sum<G>(kq, sums);
    d.k1 = kp;
    d.k2 = kq;
  }
  if (lane == 0) p.store_row(r, d);
}

template <typename scalar_t, int G>
__global__ void __launch_bounds__(G > kWarp ? G : kRowBlock) distill_backward_rows(const DistillParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = pack_size<scalar_t>();
  constexpr int kRowsPerBlock = G > kWarp ? 1 : kRowBlock / kWarp;
  const int lane = G > kWarp ? threadIdx.x : threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (G > kWarp ? 0 : threadIdx.x / kWarp);
  if (r >= p.g.rows()) return;
  const int64_t C = p.g.C;
  scalar_t* gp = p.grad_p != nullptr ? p.grad_p + r * C : nullptr;
  scalar_t* gq = p.grad_q != nullptr ? p.grad_q + r * C : nullptr;
  const math::DistillRow<acc_t> d = p.saved_row(r);
  const bool jsd = p.mode == kDistillJsd;
  // As the CPU kernel: ignored rows get exact zeros; an infinite or NaN loss
  // NaN gradients (DistillParams::nan_grad_p / nan_grad_q).
  if (p.ignored(r)) {
    for (int64_t c = lane; c < C; c += G) {
      if (gp != nullptr) gp[c] = scalar_t(0);
      if (gq != nullptr) gq[c] = scalar_t(0);
    }
    return;
  }
  const bool nan_p = p.nan_grad_p(d), nan_q = p.nan_grad_q(d);
  if (nan_p || nan_q) {
    const scalar_t nan = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
    for (int64_t c = lane; c < C; c += G) {
      if (gp != nullptr && nan_p) gp[c] = nan;
      if (gq != nullptr && nan_q) gq[c] = nan;
    }
    if (nan_p) gp = nullptr;
    if (nan_q) gq = nullptr;
  }
  if (gp == nullptr && gq == nullptr) return;
  const acc_t g = p.row_grad(r);
  const acc_t wp = jsd ? g * p.beta : g, wq = jsd ? g * (acc_t(1) - p.beta) : g;
  const scalar_t* arow = p.p_in + p.offset(r, p.pN, p.pS);
  const scalar_t* brow = p.q_in + p.offset(r, p.qN, p.qS);
  const int64_t head = split_row(arow, C).head;
  const bool packable = (gp == nullptr || split_row(gp, C).head == head) && (gq == nullptr || split_row(gq, C).head == head);
  const bool want_p = gp != nullptr;
  const acc_t inv_sp = acc_t(1) / d.sp, inv_sq = acc_t(1) / d.sq;
  auto grads = [&](acc_t a, acc_t b, acc_t* dp, acc_t* dq) {
    math::distill_class_grads(a, b, d, inv_sp, inv_sq, p.beta, wp, wq, jsd, want_p, dp, dq);
  };
  for_row<G>(
      p, arow, brow, lane, packable,
      [&](int64_t c, acc_t a, acc_t b) {
        acc_t dp = acc_t(0), dq = acc_t(0);
        grads(a, b, &dp, &dq);
        if (gp != nullptr) gp[c] = static_cast<scalar_t>(dp);
        if (gq != nullptr) gq[c] = static_cast<scalar_t>(dq);
      },
      [&](int64_t c0, const acc_t(&a)[VEC], const acc_t(&b)[VEC]) {
        Pack<scalar_t, VEC> op, oq;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          acc_t dp = acc_t(0), dq = acc_t(0);
          grads(a[j], b[j], &dp, &dq);
          op.v[j] = static_cast<scalar_t>(dp);
          oq.v[j] = static_cast<scalar_t>(dq);
        }
        if (gp != nullptr) store_pack(gp + c0, op);
        if (gq != nullptr) store_pack(gq + c0, oq);
      });
}

struct CudaRowEngine {
  template <typename scalar_t>
  static void forward_rows(const DistillParams<scalar_t>& p) {
    launch<scalar_t, true>(p);
  }
  template <typename scalar_t>
  static void backward_rows(const DistillParams<scalar_t>& p) {
    launch<scalar_t, false>(p);
  }

 private:
  template <typename scalar_t, bool kForward>
  static void launch(const DistillParams<scalar_t>& p) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t rows = p.g.rows();
    if (p.g.C <= 2048) {
      const int64_t blocks = ceil_div(rows, kRowBlock / kWarp);
      if (kForward) {
        distill_forward_rows<scalar_t, kWarp><<<blocks, kRowBlock, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        distill_backward_rows<scalar_t, kWarp><<<blocks, kRowBlock, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    } else if (p.g.C <= 16384) {
      if (kForward) {
        distill_forward_rows<scalar_t, 256><<<rows, 256, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        distill_backward_rows<scalar_t, 256><<<rows, 256, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    } else if (kForward) {
      distill_forward_rows<scalar_t, 512><<<rows, 512, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      distill_backward_rows<scalar_t, 512><<<rows, 512, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
};

using Ops = DistillOps<CudaRowEngine, CudaEngine>;

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) { register_distill_ops<Ops>(m); }

}  // namespace fusedloss::cuda
