// Distillation on logits (KL and generalised JSD) on the CPU: rows in
// parallel (at::parallel_for; each row computed in a fixed order, so results
// do not depend on the thread count), each row vectorized with at::vec in
// L1-sized blocks of both rows: one read from memory per row forward (the
// block max, then one exp per logit of each row against the running maxima)
// and one read of both rows plus one write per gradient backward. Logits are
// read in their own dtype, widened (fp16/bf16) and divided by T in registers,
// and gradients rounded once on store: nothing of the logits' size is
// allocated besides the gradients, and no pass copies a row.
//
// JSD's mixture needs both rows normalised before its log, so its forward
// sweeps a row twice: the log-sum-exps, then the terms; the second sweep
// reads the row again from cache (a 32000-class fp32 row pair is 256 KB).

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <fusedloss/dispatch.h>
#include <fusedloss/distillation_host.h>

#include <limits>
#include <vector>

#include "elementwise.h"

namespace fusedloss::cpu {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

constexpr int64_t kBlock = 2048;  // classes per L1 block of each row

template <typename T>
Vec<T> load_n(const T* x, int64_t cnt) {
  return cnt == Vec<T>::size() ? Vec<T>::loadu(x) : Vec<T>::loadu(x, cnt);
}

// cnt (<= one vector's) logits at x as accumulation-type values, widened in
// registers (fp16/bf16), times 1 / T when kScaled (x * (1 / T): within an ulp
// of torch's x / T, at a fraction of a division's cost). Lanes past cnt are 0.
template <bool kScaled, typename scalar_t>
Vec<opmath_t<scalar_t>> load_vec(const scalar_t* x, int64_t cnt, const Vec<opmath_t<scalar_t>>& inv_t) {
  using acc_t = opmath_t<scalar_t>;
  Vec<acc_t> v;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v = load_n(x, cnt);
  } else if (cnt == Vec<acc_t>::size()) {
    at::vec::load_to_float(x, v);
  } else {
    alignas(64) acc_t tmp[Vec<acc_t>::size()] = {};
    for (int64_t k = 0; k < cnt; ++k) tmp[k] = static_cast<acc_t>(x[k]);
    v = Vec<acc_t>::loadu(tmp);
  }
  return kScaled ? v * inv_t : v;
}

// cnt values of v into dst, rounded once to its dtype.
template <typename scalar_t>
void store_vec(const Vec<opmath_t<scalar_t>>& v, scalar_t* dst, int64_t cnt) {
  if constexpr (std::is_same_v<scalar_t, opmath_t<scalar_t>>) {
    if (cnt == Vec<scalar_t>::size()) {
      v.store(dst);
    } else {
      v.store(dst, cnt);
    }
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(dst, cnt);  // the first half of the lanes is v
  }
}

// Zero beyond the first cnt lanes.
template <typename T>
Vec<T> keep_n(const Vec<T>& v, int64_t cnt) {
  return cnt == Vec<T>::size() ? v : Vec<T>::set(Vec<T>(T(0)), v, cnt);
}

struct CpuRowEngine {
  template <typename scalar_t>
  static void forward_rows(const DistillParams<scalar_t>& p) {
    using acc_t = opmath_t<scalar_t>;
    const int64_t R = p.g.rows(), C = p.g.C;
    at::parallel_for(0, R, softmax_row_grain(C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (p.ignored(r)) {
          p.store_ignored_row(r);
          continue;
        }
        const scalar_t* prow = p.p_in + p.offset(r, p.pN, p.pS);
        const scalar_t* qrow = p.q_in + p.offset(r, p.qN, p.qS);
        math::DistillRow<acc_t> d;
        bool_switch(p.scaled, [&](auto scaled) {
          constexpr bool kScaled = decltype(scaled)::value;
          if (p.mode == kDistillKl) {
            d = math::kl_finish<acc_t>(row_state<true, kScaled>(p, prow, qrow));
          } else {
            d = math::kl_finish<acc_t>(row_state<false, kScaled>(p, prow, qrow));
            jsd_sweep<kScaled>(p, prow, qrow, d);
          }
        });
        p.store_row(r, d);
      }
    });
  }

  template <typename scalar_t>
  static void backward_rows(const DistillParams<scalar_t>& p) {
    using acc_t = opmath_t<scalar_t>;
    const int64_t R = p.g.rows(), C = p.g.C;
    at::parallel_for(0, R, softmax_row_grain(C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* gp = p.grad_p != nullptr ? p.grad_p + r * C : nullptr;
        scalar_t* gq = p.grad_q != nullptr ? p.grad_q + r * C : nullptr;
        if (p.ignored(r)) {  // exactly zero, whatever the logits hold
          if (gp != nullptr) std::fill(gp, gp + C, scalar_t(0));
          if (gq != nullptr) std::fill(gq, gq + C, scalar_t(0));
          continue;
        }
        const math::DistillRow<acc_t> d = p.saved_row(r);
        const acc_t g = p.row_grad(r);
        const bool jsd = p.mode == kDistillJsd;
        const bool nan_p = p.nan_grad_p(d), nan_q = p.nan_grad_q(d);
        const scalar_t nan = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
        if (nan_p && gp != nullptr) std::fill(gp, gp + C, nan);
        if (nan_q && gq != nullptr) std::fill(gq, gq + C, nan);
        const bool want_p = gp != nullptr && !nan_p;
        const bool want_q = gq != nullptr && !nan_q;
        if (!want_p && !want_q) continue;
        const scalar_t* prow = p.p_in + p.offset(r, p.pN, p.pS);
        const scalar_t* qrow = p.q_in + p.offset(r, p.qN, p.qS);
        const math::DistillRow<Vec<acc_t>> vd{d.mp, d.mq, d.sp, d.sq, d.k1, d.k2, d.c, d.c_lo};
        const Vec<acc_t> vbeta(p.beta), vinv_sp(acc_t(1) / d.sp), vinv_sq(acc_t(1) / d.sq);
        // KL: grad T on both rows. JSD: grad T beta (P), grad T (1 - beta) (Q).
        const Vec<acc_t> vgp(jsd ? g * p.beta : g), vgq(jsd ? g * (acc_t(1) - p.beta) : g);
        const Vec<acc_t> vt(p.inv_t);
        bool_switch(p.scaled, [&](auto scaled) {
          constexpr bool kScaled = decltype(scaled)::value;
          constexpr int64_t W = Vec<acc_t>::size();
          auto grads = [&](int64_t i, int64_t cnt, Vec<acc_t>* dp, Vec<acc_t>* dq) {
            math::distill_class_grads(load_vec<kScaled>(prow + i, cnt, vt), load_vec<kScaled>(qrow + i, cnt, vt), vd,
                                      vinv_sp, vinv_sq, vbeta, vgp, vgq, jsd, want_p, dp, dq);
          };
          int64_t i = 0;
          if constexpr (!std::is_same_v<scalar_t, acc_t>) {
            // Two float vectors per step: one full store of 2W fp16/bf16 values.
            for (; i + 2 * W <= C; i += 2 * W) {
              Vec<acc_t> dp0, dq0, dp1, dq1;
              grads(i, W, &dp0, &dq0);
              grads(i + W, W, &dp1, &dq1);
              if (want_p) at::vec::convert_from_float<scalar_t>(dp0, dp1).store(gp + i);
              if (want_q) at::vec::convert_from_float<scalar_t>(dq0, dq1).store(gq + i);
            }
          }
          for (; i < C; i += W) {
            const int64_t cnt = std::min<int64_t>(W, C - i);
            Vec<acc_t> dp, dq;
            grads(i, cnt, &dp, &dq);
            if (want_p) store_vec(dp, gp + i, cnt);
            if (want_q) store_vec(dq, gq + i, cnt);
          }
        });
      }
    });
  }

 private:
  // Both rows' running maxima and sums of exps in one read (and, kWithW, the
  // KL sum w): per block, the block maxima first, then one exp per logit of
  // each row against the running maxima, summed in vector lanes; the blocks'
  // sums are added in double (the row's log-normalizer difference c needs
  // them to ~1e-9: numerics.h DistillRow).
  template <bool kWithW, bool kScaled, typename scalar_t>
  static math::KlState<double> row_state(const DistillParams<scalar_t>& p, const scalar_t* prow,
                                         const scalar_t* qrow) {
    using acc_t = opmath_t<scalar_t>;
    using V = Vec<acc_t>;
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    const int64_t C = p.g.C;
    math::KlState<double> st = math::kl_state_empty<double>();
    const V vt(p.inv_t);
    for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
      const int64_t len = std::min(kBlock, C - b0);
      const scalar_t* a = prow + b0;
      const scalar_t* b = qrow + b0;
      // The block maxima of the raw logits, scaled once (1 / T > 0 keeps the order).
      V vma(kNegInf), vmb(kNegInf);
      for (int64_t i = 0; i < len; i += V::size()) {
        const int64_t cnt = std::min<int64_t>(V::size(), len - i);
        vma = at::vec::maximum(vma, V::set(V(kNegInf), load_vec<false>(a + i, cnt, vt), cnt));
        vmb = at::vec::maximum(vmb, V::set(V(kNegInf), load_vec<false>(b + i, cnt, vt), cnt));
      }
      if (kScaled) {
        vma = vma * vt;
        vmb = vmb * vt;
      }
      math::kl_rebase_p(st, math::Ops<double>::max(st.mp, static_cast<double>(lane_max(vma))));
      math::kl_rebase_q(st, math::Ops<double>::max(st.mq, static_cast<double>(lane_max(vmb))));
      // The maxima are logits: exact in acc_t.
      const V rp(static_cast<acc_t>(math::kl_ref(st.mp))), rq(static_cast<acc_t>(math::kl_ref(st.mq)));
      V vsp(acc_t(0)), vsq(acc_t(0)), vw(acc_t(0));
      for (int64_t i = 0; i < len; i += V::size()) {
        const int64_t cnt = std::min<int64_t>(V::size(), len - i);
        V ea, eb, wt;
        math::kl_class_terms(load_vec<kScaled>(a + i, cnt, vt) - rp, load_vec<kScaled>(b + i, cnt, vt) - rq, &ea, &eb,
                             &wt);
        vsp = vsp + keep_n(ea, cnt);
        vsq = vsq + keep_n(eb, cnt);
        if (kWithW) vw = vw + keep_n(wt, cnt);
      }
      st.sp += lane_sum(vsp);
      st.sq += lane_sum(vsq);
      if (kWithW) st.w += lane_sum(vw);
    }
    return st;
  }

  // JSD's second sweep: KL(P || M) into d.k1 and KL(Q || M) into d.k2.
  template <bool kScaled, typename scalar_t>
  static void jsd_sweep(const DistillParams<scalar_t>& p, const scalar_t* prow, const scalar_t* qrow,
                        math::DistillRow<opmath_t<scalar_t>>& d) {
    using acc_t = opmath_t<scalar_t>;
    using V = Vec<acc_t>;
    const int64_t C = p.g.C;
    const math::DistillRow<V> vd{d.mp, d.mq, d.sp, d.sq, d.k1, d.k2, d.c, d.c_lo};
    const V vbeta(p.beta), vt(p.inv_t);
    double kp = 0, kq = 0;
    for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
      const int64_t len = std::min(kBlock, C - b0);
      const scalar_t* a = prow + b0;
      const scalar_t* b = qrow + b0;
      V vkp(acc_t(0)), vkq(acc_t(0));
      for (int64_t i = 0; i < len; i += V::size()) {
        const int64_t cnt = std::min<int64_t>(V::size(), len - i);
        V tp, tq;
        math::jsd_class_terms(load_vec<kScaled>(a + i, cnt, vt), load_vec<kScaled>(b + i, cnt, vt), vd, vbeta, &tp,
                              &tq);
        vkp = vkp + keep_n(tp, cnt);
        vkq = vkq + keep_n(tq, cnt);
      }
      kp += lane_sum(vkp);
      kq += lane_sum(vkq);
    }
    d.k1 = static_cast<acc_t>(kp);
    d.k2 = static_cast<acc_t>(kq);
  }
};

using Ops = DistillOps<CpuRowEngine, Engine>;

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) { register_distill_ops<Ops>(m); }

}  // namespace fusedloss::cpu
