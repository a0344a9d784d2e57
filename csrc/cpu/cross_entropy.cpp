// Cross entropy (softmax + NLL) on the CPU: rows in parallel (at::parallel_for,
// each row summed in a fixed order, so results do not depend on the thread
// count), each row vectorized with at::vec.
//
// Forward, per row: one read of the logits from memory, in L1-sized blocks: a
// block max, then exp(x - max) summed against the running max (one exp per
// logit), plus the sums smoothing and probability targets need. Backward, per
// row: exp(x - lse) times the row's coefficient, minus the target/smoothing
// terms, written once. Rows whose class stride is not 1 (N, C, H, W) or whose
// dtype is fp16/bf16 are first widened/gathered into an L1/L2-resident buffer.

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <fusedloss/cross_entropy_host.h>
#include <fusedloss/linear_cross_entropy_host.h>

#include <atomic>
#include <limits>
#include <vector>

#include "elementwise.h"

namespace fusedloss::cpu {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

constexpr int64_t kBlock = 2048;  // logits per L1 block of the online max/sum-exp

// A row as contiguous accumulation-type values: the logits in place when they
// already are, else copied (widened, gathered, softcapped) into buf.
template <typename scalar_t>
const at::opmath_type<scalar_t>* load_row(const scalar_t* src, int64_t stride, int64_t n,
                                          at::opmath_type<scalar_t>* buf, bool softcap,
                                          at::opmath_type<scalar_t> cap, at::opmath_type<scalar_t> inv_cap) {
  using acc_t = at::opmath_type<scalar_t>;
  if (stride == 1 && std::is_same_v<scalar_t, acc_t> && !softcap) return reinterpret_cast<const acc_t*>(src);
  if (stride == 1) {
    widen(src, buf, n);
  } else {
    for (int64_t c = 0; c < n; ++c) buf[c] = static_cast<acc_t>(src[c * stride]);
  }
  if (softcap) {
    const Vec<acc_t> vc(cap), vi(inv_cap);
    int64_t c = 0;
    for (; c + Vec<acc_t>::size() <= n; c += Vec<acc_t>::size())
      math::softcap_value(Vec<acc_t>::loadu(buf + c), vc, vi).store(buf + c);
    for (; c < n; ++c) buf[c] = math::softcap_value(buf[c], cap, inv_cap);
  }
  return buf;
}

// The RowState of a row (numerics.h), in L1 blocks: a block max, then one exp
// per logit against the running max. f: per-class option factors (null: 1),
// used only when with_f.
template <typename T>
math::RowState<T> row_state(const T* x, const T* f, bool with_f, int64_t n) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  math::RowState<T> st = math::row_state_empty<T>();
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    const T* xb = x + b;
    const T* fb = f != nullptr ? f + b : nullptr;
    Vec<T> vm(kNegInf);
    int64_t i = 0;
    for (; i + Vec<T>::size() <= len; i += Vec<T>::size()) vm = at::vec::maximum(vm, Vec<T>::loadu(xb + i));
    if (i < len) vm = at::vec::maximum(vm, Vec<T>::set(Vec<T>(kNegInf), Vec<T>::loadu(xb + i, len - i), len - i));
    const T bm = lane_max(vm);
    math::row_rebase(st, math::Ops<T>::max(st.max, bm));
    const bool finite_ref = st.max != kNegInf;
    const Vec<T> vmax(finite_ref ? st.max : T(0));
    if (!with_f) {
      // The common case (no smoothing, no probability target): the sum of the
      // exps alone, in two accumulators so that consecutive exps do not wait
      // on each other's sum.
      if (finite_ref) {  // else every exp so far is of -inf: the sum stays 0
        constexpr int64_t kV = Vec<T>::size();
        Vec<T> s0(T(0)), s1(T(0));
        for (i = 0; i + 2 * kV <= len; i += 2 * kV) {
          s0 = s0 + vec_exp(Vec<T>::loadu(xb + i) - vmax);
          s1 = s1 + vec_exp(Vec<T>::loadu(xb + i + kV) - vmax);
        }
        if (i + kV <= len) {
          s0 = s0 + vec_exp(Vec<T>::loadu(xb + i) - vmax);
          i += kV;
        }
        if (i < len) s1 = s1 + Vec<T>::set(Vec<T>(T(0)), vec_exp(Vec<T>::loadu(xb + i, len - i) - vmax), len - i);
        st.sum += tree_sum(s0 + s1);
      }
      continue;
    }
    Vec<T> vs(T(0)), vrel(T(0)), vmass(T(0));
    auto add = [&](const Vec<T>& vx, const Vec<T>& vf, int64_t cnt) {
      const Vec<T> d = vx - vmax;  // x itself (-inf) while no finite logit was seen
      Vec<T> e = finite_ref ? vec_exp(d) : Vec<T>(T(0));
      Vec<T> fd = vf * d;
      Vec<T> ff = vf;
      if (cnt < Vec<T>::size()) {  // lanes past the row end contribute nothing
        e = Vec<T>::set(Vec<T>(T(0)), e, cnt);
        fd = Vec<T>::set(Vec<T>(T(0)), fd, cnt);
        ff = Vec<T>::set(Vec<T>(T(0)), ff, cnt);
      }
      vs = vs + e;
      if (with_f) {
        vrel = vrel + fd;
        vmass = vmass + ff;
      }
    };
    const Vec<T> one(T(1));
    for (i = 0; i + Vec<T>::size() <= len; i += Vec<T>::size())
      add(Vec<T>::loadu(xb + i), fb != nullptr ? Vec<T>::loadu(fb + i) : one, Vec<T>::size());
    if (i < len) add(Vec<T>::loadu(xb + i, len - i), fb != nullptr ? Vec<T>::loadu(fb + i, len - i) : one, len - i);
    st.sum += tree_sum(vs);
    if (with_f) {
      st.rel += tree_sum(vrel);
      st.mass += tree_sum(vmass);
    }
  }
  return st;
}

template <typename T>
struct RowBuffers {
  std::vector<T> x, p, out, out2;
};

// Smoothed probability targets of a row, times the class weights.
template <typename scalar_t>
void load_target_row(const CeParams<scalar_t>& p, int64_t r, const math::CeOptions<at::opmath_type<scalar_t>>& o,
                     at::opmath_type<scalar_t>* dst) {
  const int64_t base = p.offset(r, p.tN, p.tS);
  for (int64_t c = 0; c < p.g.C; ++c) {
    const auto pc = math::ce_smoothed_target(p.target_at(base + c * p.tC), o);
    dst[c] = p.weight != nullptr ? p.weight[c] * pc : pc;
  }
}

[[noreturn]] void out_of_bounds(int64_t target) {
  TORCH_CHECK_INDEX(false, "Target ", target, " is out of bounds.");
}

struct CpuRowEngine {
  template <typename scalar_t, bool kProb>
  static void forward_rows(const CeParams<scalar_t>& p) {
    using acc_t = at::opmath_type<scalar_t>;
    const auto o = p.options();
    const int64_t R = p.g.rows(), C = p.g.C;
    std::atomic<int64_t> first_bad{R};
    at::parallel_for(0, R, softmax_row_grain(C), [&](int64_t r0, int64_t r1) {
      RowBuffers<acc_t> buf;
      buf.x.resize(C);
      const acc_t* w = p.weight;
      if (kProb) buf.p.resize(C);
      // Index-target rows wait in groups of one vector for their log(sum exp):
      // one vector log per group instead of a scalar log per row (a tenth of
      // the time of rows of ~100 classes went to scalar logf).
      constexpr int64_t kG = Vec<acc_t>::size();
      int64_t g_row[kG];
      math::RowState<acc_t> g_st[kG];
      alignas(64) acc_t g_sum[kG];
      acc_t g_xt[kG], g_wt[kG];
      int64_t g_n = 0;
      auto flush = [&] {
        alignas(64) acc_t ls[kG];
        Vec<acc_t>::loadu(g_sum, g_n).log().store(ls);  // lanes past g_n: log(0), unused
        for (int64_t k = 0; k < g_n; ++k) p.store_index_row_with_log(g_row[k], g_st[k], ls[k], g_xt[k], g_wt[k], o);
        g_n = 0;
      };
      for (int64_t r = r0; r < r1; ++r) {
        int64_t t = 0;
        if (!kProb) {
          t = p.target_index[r];
          if (t == o.ignore_index) {
            p.store_ignored_row(r);
            continue;
          }
          if (t < 0 || t >= C) {
            int64_t prev = first_bad.load();
            while (r < prev && !first_bad.compare_exchange_weak(prev, r)) {
            }
            continue;
          }
        }
        const acc_t* x = load_row(p.input + p.offset(r, p.g.sN, p.g.sS), p.g.sC, C, buf.x.data(), p.has_softcap,
                                  p.softcap, p.inv_softcap);
        if (kProb) load_target_row(p, r, o, buf.p.data());
        const bool with_f = kProb || o.smoothing > acc_t(0);
        const math::RowState<acc_t> st = row_state(x, kProb ? buf.p.data() : w, with_f, C);
        if (kProb) {
          p.store_prob_row(r, st, o);
        } else {
          g_row[g_n] = r;
          g_st[g_n] = st;
          g_sum[g_n] = st.sum;
          g_xt[g_n] = x[t];
          g_wt[g_n] = w != nullptr ? w[t] : acc_t(1);
          if (++g_n == kG) flush();
        }
      }
      if (g_n > 0) flush();
    });
    if (first_bad.load() < R) out_of_bounds(p.target_index[first_bad.load()]);
  }

  template <typename scalar_t, bool kProb>
  static void backward_rows(const CeParams<scalar_t>& p) {
    using acc_t = at::opmath_type<scalar_t>;
    const auto o = p.options();
    const int64_t R = p.g.rows(), C = p.g.C;
    if (!kProb) {
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = p.target_index[r];
        if (t != o.ignore_index && (t < 0 || t >= C)) out_of_bounds(t);
      }
    }
    const bool direct_out = p.grad_input != nullptr && p.gC == 1 && std::is_same_v<scalar_t, acc_t>;
    at::parallel_for(0, R, softmax_row_grain(C), [&](int64_t r0, int64_t r1) {
      RowBuffers<acc_t> buf;
      buf.x.resize(C);
      buf.out.resize(C);
      const acc_t* w = p.weight;
      if (kProb) buf.p.resize(C);
      if (p.grad_target != nullptr) buf.out2.resize(C);
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* gout = p.grad_input != nullptr ? p.grad_input + p.offset(r, p.gN, p.gS) : nullptr;
        acc_t* g_row = direct_out ? reinterpret_cast<acc_t*>(gout) : buf.out.data();
        const int64_t t = kProb ? 0 : p.target_index[r];
        if (!kProb && t == o.ignore_index) {
          if (gout != nullptr) store_row(gout, p.gC, nullptr, C);  // exactly zero
          continue;
        }
        const acc_t gv = p.row_grad(r);
        const acc_t m = p.lse[2 * r], ls = p.lse[2 * r + 1];
        const acc_t lse = m + ls;
        const acc_t* x = load_row(p.input + p.offset(r, p.g.sN, p.g.sS), p.g.sC, C, buf.x.data(), p.has_softcap,
                                  p.softcap, p.inv_softcap);
        if (kProb) load_target_row(p, r, o, buf.p.data());
        if (gout != nullptr) {
          const math::CeGradCoefs<acc_t> k =
              kProb ? math::ce_prob_grad_coefs(gv, lse, p.target_mass[r], o)
                    : math::ce_index_grad_coefs(gv, lse, w != nullptr ? w[t] : acc_t(1), o);
          const acc_t* f = kProb ? buf.p.data() : w;  // f_c: w_c p'_c, or w_c (null: 1)
          const Vec<acc_t> va(k.ga), vm(m), vls(ls), vms(k.m_scale);
          // The target's logit, read before the row is overwritten (in place).
          const acc_t x_t = kProb ? acc_t(0) : x[t];
          Vec<acc_t> q_other(acc_t(0));  // sum of q_c over c != t
          auto grad_vec = [&](int64_t c, int64_t cnt) {
            const bool full = cnt == Vec<acc_t>::size();
            const Vec<acc_t> vx = full ? Vec<acc_t>::loadu(x + c) : Vec<acc_t>::loadu(x + c, cnt);
            const Vec<acc_t> q = vec_exp((vx - vm) - vls);
            if (!kProb) {
              Vec<acc_t> qo = full ? q : Vec<acc_t>::set(Vec<acc_t>(acc_t(0)), q, cnt);
              if (t >= c && t < c + cnt) qo = zero_lane(qo, t - c);
              q_other = q_other + qo;
            }
            Vec<acc_t> v = q * va;
            if (k.m_scale != acc_t(0)) {
              const Vec<acc_t> vf = f == nullptr ? Vec<acc_t>(acc_t(1))
                                                 : (full ? Vec<acc_t>::loadu(f + c) : Vec<acc_t>::loadu(f + c, cnt));
              v = v - vf * vms;
            }
            if (p.has_softcap) v = v * math::softcap_slope(vx, Vec<acc_t>(p.inv_softcap));
            if (full) {
              v.store(g_row + c);
            } else {
              v.store(g_row + c, cnt);
            }
          };
          int64_t c = 0;
          for (; c + Vec<acc_t>::size() <= C; c += Vec<acc_t>::size()) grad_vec(c, Vec<acc_t>::size());
          if (c < C) grad_vec(c, C - c);
          if (!kProb) {
            // The target's own entry, in the accumulation type before any rounding.
            const acc_t q_t = math::Ops<acc_t>::exp((x_t - m) - ls);
            acc_t d = math::ce_index_target_grad(gv, q_t, tree_sum(q_other), lse, w != nullptr ? w[t] : acc_t(1), o);
            if (p.has_softcap) d = d * math::softcap_slope(x_t, p.inv_softcap);
            g_row[t] = d;
          }
          if (!direct_out) store_row(gout, p.gC, g_row, C);
        }
        if (p.grad_target != nullptr) {
          for (int64_t c = 0; c < C; ++c) {
            buf.out2[c] = math::ce_target_grad(gv, w != nullptr ? w[c] : acc_t(1), m, ls, x[c], o);
          }
          const int64_t base = p.offset(r, p.gtN, p.gtS);
          for (int64_t c = 0; c < C; ++c) store_value(p.grad_target, p.grad_target_dtype, base + c * p.gtC, buf.out2[c]);
        }
      }
    });
  }

  // linear_cross_entropy's fused phase: forward_rows then backward_rows (in
  // place, p.grad_input == p.input, p.lse == p.lse_out) on blocks of rows that
  // stay in L2 between the two sweeps, so each logit comes from memory once
  // and its gradient goes back once. Each block is one task; the per-row math
  // is that of the two sweeps, so results equal running them one after the
  // other. One distribution per row (g.S == 1).
  template <typename scalar_t, bool kProb>
  static void forward_backward_rows(const CeParams<scalar_t>& p) {
    TORCH_INTERNAL_ASSERT(p.g.S == 1, "forward_backward_rows: one distribution per row");
    const int64_t R = p.g.rows(), C = p.g.C;
    if (!kProb) {
      // The first invalid target in row order, whatever the thread count.
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = p.target_index[r];
        if (t != p.opt.ignore_index && (t < 0 || t >= C)) out_of_bounds(t);
      }
    }
    // Blocks of rows that stay in L2; fewer rows than that are still split
    // over the threads, down to a task's grain.
    constexpr int64_t kL2Bytes = 256 * 1024;
    const int64_t l2_rows = std::max<int64_t>(1, kL2Bytes / (C * static_cast<int64_t>(sizeof(at::opmath_type<scalar_t>))));
    const int64_t threads = at::get_num_threads();
    const int64_t block = std::min(l2_rows, std::max(softmax_row_grain(C), (R + threads - 1) / threads));
    const int64_t blocks = (R + block - 1) / block;
    // Blocks taken in turn (a shared counter), so that a thread slowed by
    // other work takes fewer; a block's result does not depend on its thread.
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(blocks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      for (int64_t b = next++; b < blocks; b = next++) {
        const int64_t r0 = b * block;
        const CeParams<scalar_t> q = ce_params_rows(p, r0, std::min(block, R - r0));
        forward_rows<scalar_t, kProb>(q);  // nested parallel_for: runs inline
        backward_rows<scalar_t, kProb>(q);
      }
    });
  }

 private:
  // Writes n values (nullptr: zeros) to dst with the given element stride.
  template <typename scalar_t>
  static void store_row(scalar_t* dst, int64_t stride, const at::opmath_type<scalar_t>* src, int64_t n) {
    if (stride == 1 && src != nullptr) {
      narrow(src, dst, n);
      return;
    }
    for (int64_t c = 0; c < n; ++c) dst[c * stride] = src != nullptr ? static_cast<scalar_t>(src[c]) : scalar_t(0);
  }
};

using Ops = CrossEntropyOps<CpuRowEngine, Engine>;

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) { register_cross_entropy_ops<Ops>(m); }

}  // namespace fusedloss::cpu

// ---------------------------------------------------------------------------
// The row primitives above, exported for the other CPU row kernels (ce_rows.h):
// one implementation of the online max / sum-exp on the CPU.
#include "ce_rows.h"

namespace fusedloss::cpu {

template <typename scalar_t>
const at::opmath_type<scalar_t>* ce_load_row(const scalar_t* src, int64_t stride, int64_t n,
                                             at::opmath_type<scalar_t>* buf, bool softcap,
                                             at::opmath_type<scalar_t> cap, at::opmath_type<scalar_t> inv_cap) {
  return load_row(src, stride, n, buf, softcap, cap, inv_cap);
}

template <typename T>
math::RowState<T> ce_row_state(const T* x, const T* f, bool with_f, int64_t n) {
  return row_state(x, f, with_f, n);
}

#define FUSEDLOSS_CE_LOAD_ROW(scalar_t)                                                                         \
  template const at::opmath_type<scalar_t>* ce_load_row<scalar_t>(const scalar_t*, int64_t, int64_t,           \
                                                                  at::opmath_type<scalar_t>*, bool,             \
                                                                  at::opmath_type<scalar_t>, at::opmath_type<scalar_t>);
FUSEDLOSS_CE_LOAD_ROW(float)
FUSEDLOSS_CE_LOAD_ROW(double)
FUSEDLOSS_CE_LOAD_ROW(at::Half)
FUSEDLOSS_CE_LOAD_ROW(at::BFloat16)
#undef FUSEDLOSS_CE_LOAD_ROW
template math::RowState<float> ce_row_state<float>(const float*, const float*, bool, int64_t);
template math::RowState<double> ce_row_state<double>(const double*, const double*, bool, int64_t);

// The row phases on chunks of logits that other ops produce
// (linear_cross_entropy, fusedloss/linear_cross_entropy_host.h).
template <typename scalar_t>
void ce_rows(CeRowPhase phase, bool prob, const CeParams<scalar_t>& p) {
  if (p.g.rows() == 0) return;
  switch (phase) {
    case CeRowPhase::kStats:
      return prob ? CpuRowEngine::forward_rows<scalar_t, true>(p) : CpuRowEngine::forward_rows<scalar_t, false>(p);
    case CeRowPhase::kGrad:
      return prob ? CpuRowEngine::backward_rows<scalar_t, true>(p) : CpuRowEngine::backward_rows<scalar_t, false>(p);
    case CeRowPhase::kFused:
      return prob ? CpuRowEngine::forward_backward_rows<scalar_t, true>(p)
                  : CpuRowEngine::forward_backward_rows<scalar_t, false>(p);
  }
}

template void ce_rows<double>(CeRowPhase, bool, const CeParams<double>&);
template void ce_rows<float>(CeRowPhase, bool, const CeParams<float>&);
template void ce_rows<at::Half>(CeRowPhase, bool, const CeParams<at::Half>&);
template void ce_rows<at::BFloat16>(CeRowPhase, bool, const CeParams<at::BFloat16>&);

}  // namespace fusedloss::cpu
