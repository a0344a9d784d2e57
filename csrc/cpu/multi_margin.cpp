// multi_margin_loss on the CPU: rows in parallel (torch's own CPU kernel is
// single-threaded and fp32/fp64 only), each row one vectorized read forward
// and one read + one write backward. The target class is excluded by masking
// its lane, never by subtracting its term (which would cancel catastrophically
// when that term dominates the row).

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <fusedloss/multi_margin_host.h>

#include <atomic>
#include <vector>

#include "elementwise.h"

namespace fusedloss::cpu {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

struct CpuRowEngine {
  template <typename scalar_t>
  static void forward_rows(const MmParams<scalar_t>& m) {
    using acc_t = at::opmath_type<scalar_t>;
    std::atomic<bool> bad{false};
    constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;  // rows read in place: no buffer
    at::parallel_for(0, m.N, row_grain(m.C), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(kDirect ? 0 : m.C);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = m.target[r];
        if (t < 0 || t >= m.C) {
          bad = true;
          continue;
        }
        const acc_t* x = row(m, r, buf.data());
        acc_t sum = 0;
        if (m.C < Vec<acc_t>::size()) {
          sum = short_row_sum(x, m.C, t, m.margin - x[t], [&](acc_t z) { return math::multi_margin_term(z, m.p); });
        } else {
          const Vec<acc_t> base(m.margin - x[t]);
          Vec<acc_t> acc(acc_t(0));
          for (int64_t c = 0; c < m.C; c += Vec<acc_t>::size()) {
            const int64_t cnt = std::min<int64_t>(Vec<acc_t>::size(), m.C - c);
            const bool full = cnt == Vec<acc_t>::size();
            Vec<acc_t> term = math::multi_margin_term(base + (full ? Vec<acc_t>::loadu(x + c) : Vec<acc_t>::loadu(x + c, cnt)), m.p);
            if (!full) term = Vec<acc_t>::set(Vec<acc_t>(acc_t(0)), term, cnt);
            if (t >= c && t < c + cnt) term = zero_lane(term, t - c);
            acc = acc + term;
          }
          sum = lane_sum(acc);
        }
        m.loss_out[r] = sum * m.row_scale(t);
      }
    });
    TORCH_CHECK(!bad.load(), "target out of range");
  }

  template <typename scalar_t>
  static void backward_rows(const MmParams<scalar_t>& m) {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t r = 0; r < m.N; ++r) TORCH_CHECK(m.target[r] >= 0 && m.target[r] < m.C, "target out of range");
    constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
    at::parallel_for(0, m.N, row_grain(m.C), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(kDirect ? 0 : m.C), out(kDirect ? 0 : m.C);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = m.target[r];
        const acc_t* x = row(m, r, buf.data());
        acc_t* g = kDirect ? reinterpret_cast<acc_t*>(m.grad_input + r * m.C) : out.data();
        const acc_t k = m.row_grad_scale(r, t);
        if (m.C < Vec<acc_t>::size()) {
          g[t] = -short_row_sum(x, m.C, t, m.margin - x[t], [&](acc_t z) { return math::multi_margin_grad_term(z, m.p) * k; }, g);
        } else {
          const Vec<acc_t> base(m.margin - x[t]), vk(k);
          Vec<acc_t> acc(acc_t(0));
          for (int64_t c = 0; c < m.C; c += Vec<acc_t>::size()) {
            const int64_t cnt = std::min<int64_t>(Vec<acc_t>::size(), m.C - c);
            const bool full = cnt == Vec<acc_t>::size();
            Vec<acc_t> d = math::multi_margin_grad_term(base + (full ? Vec<acc_t>::loadu(x + c) : Vec<acc_t>::loadu(x + c, cnt)), m.p) * vk;
            if (!full) d = Vec<acc_t>::set(Vec<acc_t>(acc_t(0)), d, cnt);
            if (t >= c && t < c + cnt) d = zero_lane(d, t - c);
            acc = acc + d;
            if (full) {
              d.store(g + c);
            } else {
              d.store(g + c, cnt);
            }
          }
          g[t] = -lane_sum(acc);
        }
        if (!kDirect) narrow(g, m.grad_input + r * m.C, m.C);
      }
    });
  }

 private:
  // A row shorter than one vector (small heads: tens of classes), in scalar
  // code: the vector loop's masked loads, lane zeroing and lane sum cost more
  // than its math there. Same terms, summed in the same order as the vector
  // loop's one partial vector (lane by lane from 0, the target's lane and the
  // tail adding +0), so the result is the same bits. term(base + x[c]) for
  // c != t, each stored to out[c] when out is given.
  template <typename acc_t, typename F>
  static acc_t short_row_sum(const acc_t* x, int64_t C, int64_t t, acc_t base, const F& term, acc_t* out = nullptr) {
    acc_t sum = 0;
    for (int64_t c = 0; c < C; ++c) {
      if (c == t) continue;
      const acc_t v = term(base + x[c]);
      if (out != nullptr) out[c] = v;
      sum += v;
    }
    return sum;
  }

  // Row r as accumulation-type values: in place for fp32/fp64, else widened.
  template <typename scalar_t>
  static const at::opmath_type<scalar_t>* row(const MmParams<scalar_t>& m, int64_t r, at::opmath_type<scalar_t>* buf) {
    using acc_t = at::opmath_type<scalar_t>;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return m.input + r * m.C;
    } else {
      widen(m.input + r * m.C, buf, m.C);
      return buf;
    }
  }
};

using Ops = MultiMarginOps<CpuRowEngine, Engine>;

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) { register_multi_margin_ops<Ops>(m); }

}  // namespace fusedloss::cpu
