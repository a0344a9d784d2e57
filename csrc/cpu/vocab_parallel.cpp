// Vocabulary-parallel cross entropy on the CPU: the local kernels around the
// two collectives of fusedloss/distributed.py (the math: numerics.h, the op
// bodies: vocab_parallel_host.h).
//
// Local pass, per row: one read of this rank's slice, with cross entropy's own
// row primitives (ce_rows.h: fp16/bf16 widened and softcapped into an L1/L2
// row buffer, an online max / sum-exp in fixed-order blocks). On the rank that
// holds the target, the slice is summarised in two parts, before and after the
// target, so that the target's own exp never enters the sum (S_other).
// Backward, per row: exp((x - M) - ls) times the row's coefficient, minus the
// smoothing term, one write; the target's entry from the global s_other.
// The gradient may be written over the logits (grad_input == input, as the
// linear variant runs it): each element is read just before it is written,
// and the target's logit before any. Rows in parallel, each in a fixed
// order: results do not depend on the thread count.

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <fusedloss/vocab_parallel_host.h>

#include <algorithm>
#include <vector>

#include "ce_rows.h"
#include "elementwise.h"

namespace fusedloss::cpu {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

struct CpuVpEngine {
  template <typename scalar_t>
  static void local_rows(const VpParams<scalar_t>& p) {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t C = p.C;
    const acc_t* f = p.weight != nullptr ? p.weight + p.start : nullptr;  // this slice's class weights
    at::parallel_for(0, p.N, softmax_row_grain(C), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(C);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = p.target[r];
        if (t == p.ignore_index) {
          p.store_ignored_local(r);
          continue;
        }
        const acc_t* x = ce_load_row(p.row(r), p.sC, C, buf.data(), p.has_softcap, p.softcap, p.inv_softcap);
        const int64_t tl = p.local_class(t);
        if (tl < 0) {
          p.store_local(r, ce_row_state(x, f, p.with_f, C), acc_t(0));
          continue;
        }
        math::RowState<acc_t> st =
            math::row_merge(ce_row_state(x, f, p.with_f, tl),
                            ce_row_state(x + tl + 1, f != nullptr ? f + tl + 1 : nullptr, p.with_f, C - tl - 1));
        math::row_push_except_sum(st, x[tl], f != nullptr ? f[tl] : acc_t(1), p.with_f);
        p.store_local(r, st, x[tl]);
      }
    });
  }

  template <typename scalar_t>
  static void backward_rows(const VpParams<scalar_t>& p) {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t C = p.C;
    const auto o = p.options();
    const acc_t* f = p.weight != nullptr ? p.weight + p.start : nullptr;
    const bool direct_out = p.gC == 1 && std::is_same_v<scalar_t, acc_t>;
    at::parallel_for(0, p.N, softmax_row_grain(C), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(C), out(C);
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* gout = p.grad_input + r * p.gN;
        const int64_t t = p.target[r];
        if (t == p.ignore_index) {
          for (int64_t c = 0; c < C; ++c) gout[c * p.gC] = scalar_t(0);  // exactly zero
          continue;
        }
        acc_t* g_row = direct_out ? reinterpret_cast<acc_t*>(gout) : out.data();
        const acc_t m = p.state[3 * r], ls = p.state[3 * r + 1], s_other = p.state[3 * r + 2];
        const acc_t g = p.row_grad(r);
        const acc_t w_t = p.target_weight(t, o.num_classes);
        const math::CeGradCoefs<acc_t> k = math::ce_index_grad_coefs(g, m + ls, w_t, o);
        const acc_t* x = ce_load_row(p.row(r), p.sC, C, buf.data(), p.has_softcap, p.softcap, p.inv_softcap);
        const int64_t tl = p.local_class(t);
        const acc_t x_t = tl >= 0 ? x[tl] : acc_t(0);
        const Vec<acc_t> va(k.ga), vm(m), vls(ls), vms(k.m_scale), vinv(p.inv_softcap);
        auto grad_vec = [&](int64_t c, int64_t cnt) {
          const bool full = cnt == Vec<acc_t>::size();
          const Vec<acc_t> vx = full ? Vec<acc_t>::loadu(x + c) : Vec<acc_t>::loadu(x + c, cnt);
          Vec<acc_t> v = vec_exp((vx - vm) - vls) * va;
          if (k.m_scale != acc_t(0)) {
            const Vec<acc_t> vf = f == nullptr ? Vec<acc_t>(acc_t(1))
                                               : (full ? Vec<acc_t>::loadu(f + c) : Vec<acc_t>::loadu(f + c, cnt));
            v = v - vf * vms;
          }
          if (p.has_softcap) v = v * math::softcap_slope(vx, vinv);
          if (full) {
            v.store(g_row + c);
          } else {
            v.store(g_row + c, cnt);
          }
        };
        int64_t c = 0;
        for (; c + Vec<acc_t>::size() <= C; c += Vec<acc_t>::size()) grad_vec(c, Vec<acc_t>::size());
        if (c < C) grad_vec(c, C - c);
        if (tl >= 0) {
          // The target's own entry, from the other classes' share summed over
          // every rank (finalize), in fp32 before any rounding.
          const acc_t q_t = math::Ops<acc_t>::exp((x_t - m) - ls);
          acc_t d = math::ce_index_target_grad(g, q_t, s_other, m + ls, w_t, o);
          if (p.has_softcap) d = d * math::softcap_slope(x_t, p.inv_softcap);
          g_row[tl] = d;
        }
        if (!direct_out) {
          if (p.gC == 1) {
            narrow(g_row, gout, C);
          } else {
            for (int64_t j = 0; j < C; ++j) gout[j * p.gC] = static_cast<scalar_t>(g_row[j]);
          }
        }
      }
    });
  }

  static const LceDevice& lce_device() { return ::fusedloss::cpu::lce_device(); }

  template <typename F>
  static void for_each_row(int64_t n, const F& f) {
    at::parallel_for(0, n, 4096, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) f(r);
    });
  }

  // torch's errors, on every rank alike (all hold the same targets and, after
  // the SUM, the same V), so no rank is left waiting in a collective.
  template <typename acc_t>
  static void check_finalized(const int64_t* target, int64_t N, int64_t ignore_index, const acc_t* stats,
                              int64_t weight_numel) {
    const int64_t V = vp_vocab_size(stats[2]);
    TORCH_CHECK(V >= 0, "vocab_parallel_cross_entropy: another rank of the group could not take its arguments "
                "(its error says why), so this call has no result");
    TORCH_CHECK(weight_numel < 0 || weight_numel == V, "weight tensor should be defined either for all ", V,
                " classes or no classes but got weight tensor of shape: [", weight_numel, "]");
    for (int64_t r = 0; r < N; ++r) {
      const int64_t t = target[r];
      TORCH_CHECK_INDEX(t == ignore_index || (t >= 0 && t < V), "Target ", t, " is out of bounds.");
    }
  }
};

using VpOps = VocabParallelCeOps<CpuVpEngine, Engine>;

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) { register_vocab_parallel_ops<VpOps>(m); }

}  // namespace fusedloss::cpu
