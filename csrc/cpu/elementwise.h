#pragma once
// The CPU engine of the elementwise losses: one pass over the operands, either
// reduced to per-chunk sums (forward with mean/sum) or mapped to outputs
// (forward with 'none', and every backward).
//
// Work is cut into fixed chunks of kChunk elements, independent of the thread
// count; each chunk is summed in a fixed order (vector lanes, then lanes in
// index order, then tiles in a double accumulator), and the chunk sums are
// added in chunk order. So a reduction gives the same bits for 1 or N threads
// and on every run.
//
// Inside a chunk, kTile elements at a time are widened (fp16/bf16 -> fp32) or
// gathered (broadcast operands, see fusedloss/layout.h) into L1-resident
// buffers; contiguous fp32/fp64 operands are read in place.

#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <fusedloss/layout.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "vec_ops.h"

namespace fusedloss::cpu {

constexpr int64_t kTile = 2048;
constexpr int64_t kChunk = 16 * kTile;

// One operand of a loss. data == nullptr means "absent": the constant 1.
template <typename scalar_t>
struct Operand {
  const scalar_t* data = nullptr;
  Layout layout;
};

template <typename scalar_t>
Operand<scalar_t> make_operand(const at::Tensor& t, const Layout& layout) {
  return Operand<scalar_t>{t.defined() ? t.const_data_ptr<scalar_t>() : nullptr, layout};
}

// Values of `op` at positions [start, start + len), widened, into dst.
template <typename scalar_t>
void gather(const Operand<scalar_t>& op, int64_t start, int64_t len, opmath_t<scalar_t>* dst) {
  const int64_t inner = op.layout.inner;
  const int64_t period = op.layout.period;
  int64_t p = (start / inner) % period;
  int64_t i = 0;
  if (inner == 1) {
    while (i < len) {
      const int64_t run = std::min(period - p, len - i);
      widen(op.data + p, dst + i, run);
      i += run;
      p = 0;
    }
  } else {
    int64_t r = start % inner;
    while (i < len) {
      const int64_t run = std::min(inner - r, len - i);
      std::fill(dst + i, dst + i + run, static_cast<opmath_t<scalar_t>>(op.data[p]));
      i += run;
      r = 0;
      p = (p + 1 == period) ? 0 : p + 1;
    }
  }
}

// The operands of one tile, each either a pointer to kTile widened values or a
// broadcast constant.
template <typename scalar_t, int N>
struct Tile {
  using acc_t = opmath_t<scalar_t>;
  std::array<const acc_t*, N> ptr;
  std::array<acc_t, N> value;
  alignas(64) acc_t buf[N][kTile];

  void load(const std::array<Operand<scalar_t>, N>& ops, int64_t numel, int64_t start, int64_t len) {
    for (int k = 0; k < N; ++k) {
      const Operand<scalar_t>& op = ops[k];
      if (op.data == nullptr) {
        ptr[k] = nullptr;
        value[k] = acc_t(1);
      } else if (op.layout.constant()) {
        ptr[k] = nullptr;
        value[k] = static_cast<acc_t>(op.data[0]);
      } else if (op.layout.contiguous(numel) && std::is_same_v<scalar_t, acc_t>) {
        ptr[k] = reinterpret_cast<const acc_t*>(op.data) + start;
      } else if (op.layout.contiguous(numel)) {
        widen(op.data + start, buf[k], len);
        ptr[k] = buf[k];
      } else {
        gather(op, start, len, buf[k]);
        ptr[k] = buf[k];
      }
    }
  }

  // Operand vectors at tile offset i; `count` < vector width only at the tail.
  template <typename Vec>
  void fetch(int64_t i, int64_t count, Vec* v) const {
    for (int k = 0; k < N; ++k) {
      if (ptr[k] == nullptr) {
        v[k] = Vec(value[k]);
      } else if (count == Vec::size()) {
        v[k] = Vec::loadu(ptr[k] + i);
      } else {
        v[k] = Vec::loadu(ptr[k] + i, count);
      }
    }
  }
};

template <typename T>
T lane_sum(const at::vec::Vectorized<T>& v) {
  alignas(64) T lanes[at::vec::Vectorized<T>::size()];
  v.store(lanes);
  T s = 0;
  for (int l = 0; l < at::vec::Vectorized<T>::size(); ++l) s += lanes[l];
  return s;
}

// Sums each of F::kOut functor outputs over all numel positions. Returns
// F::kOut totals in double (fp32 losses are summed in fp32 vectors per tile and
// in double across tiles and chunks).
template <typename scalar_t, typename F>
std::array<double, F::kOut> reduce(int64_t numel, const std::array<Operand<scalar_t>, F::kIn>& ops, const F& f) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int NO = F::kOut;
  const int64_t nchunks = (numel + kChunk - 1) / kChunk;
  std::vector<double> partial(nchunks * NO, 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    auto tile = std::make_unique<Tile<scalar_t, F::kIn>>();
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t end = std::min(numel, (c + 1) * kChunk);
      double chunk_sum[NO] = {};
      for (int64_t start = c * kChunk; start < end; start += kTile) {
        const int64_t len = std::min(kTile, end - start);
        tile->load(ops, numel, start, len);
        Vec acc[NO];
        for (int k = 0; k < NO; ++k) acc[k] = Vec(acc_t(0));
        Vec in[F::kIn];
        Vec out[NO];
        int64_t i = 0;
        for (; i + Vec::size() <= len; i += Vec::size()) {
          tile->fetch(i, Vec::size(), in);
          f(in, out);
          for (int k = 0; k < NO; ++k) acc[k] = acc[k] + out[k];
        }
        if (i < len) {
          const int64_t count = len - i;
          tile->fetch(i, count, in);
          f(in, out);
          // Lanes past the tail hold f(0, ...), which need not be 0.
          for (int k = 0; k < NO; ++k) acc[k] = acc[k] + Vec::set(Vec(acc_t(0)), out[k], count);
        }
        for (int k = 0; k < NO; ++k) chunk_sum[k] += static_cast<double>(lane_sum(acc[k]));
      }
      for (int k = 0; k < NO; ++k) partial[c * NO + k] = chunk_sum[k];
    }
  });
  std::array<double, NO> total{};
  for (int64_t c = 0; c < nchunks; ++c)
    for (int k = 0; k < NO; ++k) total[k] += partial[c * NO + k];
  return total;
}

// Writes functor output k to out[k] (contiguous, numel elements) for every k
// with out[k] != nullptr.
template <typename scalar_t, typename F>
void map(int64_t numel, const std::array<Operand<scalar_t>, F::kIn>& ops, const F& f,
         const std::array<scalar_t*, F::kOut>& out) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int NO = F::kOut;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t ntiles = (numel + kTile - 1) / kTile;
  at::parallel_for(0, ntiles, kChunk / kTile, [&](int64_t t0, int64_t t1) {
    auto tile = std::make_unique<Tile<scalar_t, F::kIn>>();
    std::unique_ptr<acc_t[]> obuf(kDirect ? nullptr : new acc_t[NO * kTile]);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t start = t * kTile;
      const int64_t len = std::min(kTile, numel - start);
      tile->load(ops, numel, start, len);
      Vec in[F::kIn];
      Vec res[NO];
      for (int64_t i = 0; i < len; i += Vec::size()) {
        const int64_t count = std::min<int64_t>(Vec::size(), len - i);
        tile->fetch(i, count, in);
        f(in, res);
        for (int k = 0; k < NO; ++k) {
          if (out[k] == nullptr) continue;
          acc_t* dst = kDirect ? reinterpret_cast<acc_t*>(out[k]) + start : obuf.get() + k * kTile;
          if (count == Vec::size()) {
            res[k].store(dst + i);
          } else {
            res[k].store(dst + i, count);
          }
        }
      }
      if (!kDirect) {
        for (int k = 0; k < NO; ++k)
          if (out[k] != nullptr) narrow(obuf.get() + k * kTile, out[k] + start, len);
      }
    }
  });
}

}  // namespace fusedloss::cpu

#include <fusedloss/elementwise_host.h>

namespace fusedloss::cpu {

template <typename scalar_t, int N>
std::array<Operand<scalar_t>, N> operands(const ElementwiseCall& c) {
  std::array<Operand<scalar_t>, N> o;
  for (int k = 0; k < N; ++k) o[k] = make_operand<scalar_t>(c.tensor[k], c.layout[k]);
  return o;
}

// Runs a forward functor. 'none' writes the per-element loss (out[0]); mean and
// sum reduce it. A functor with kOut == 2 also sums the mean's denominator in
// out[1] (a weighted mean); that total goes to *denominator when given.
template <typename scalar_t, typename F>
void forward(const ElementwiseCall& c, const F& f, int64_t reduction, at::Tensor& loss,
             at::Tensor* denominator = nullptr) {
  using acc_t = opmath_t<scalar_t>;
  const auto ops = operands<scalar_t, F::kIn>(c);
  if (reduction == kReductionNone) {
    std::array<scalar_t*, F::kOut> out{};
    out[0] = loss.mutable_data_ptr<scalar_t>();
    map(c.numel, ops, f, out);
    return;
  }
  const auto total = reduce(c.numel, ops, f);
  double value = total[0];
  if (reduction == kReductionMean) {
    const double denom = F::kOut == 2 ? total[F::kOut - 1] : static_cast<double>(c.numel);
    value /= denom;  // 0/0 = NaN for an empty mean, as torch
    if (denominator != nullptr) denominator->mutable_data_ptr<acc_t>()[0] = static_cast<acc_t>(denom);
  }
  loss.mutable_data_ptr<scalar_t>()[0] = static_cast<scalar_t>(static_cast<acc_t>(value));
}

// The CPU engine as the shared host code (elementwise_ops.h, row_sum.h) uses it.
struct Engine {
  template <typename scalar_t, typename F>
  static void forward(const ElementwiseCall& c, const F& f, int64_t reduction, at::Tensor& loss,
                      at::Tensor* denominator) {
    cpu::forward<scalar_t>(c, f, reduction, loss, denominator);
  }
  template <typename scalar_t, typename F>
  static void map(const ElementwiseCall& c, const F& f, const std::array<scalar_t*, F::kOut>& out) {
    cpu::map(c.numel, operands<scalar_t, F::kIn>(c), f, out);
  }
};

}  // namespace fusedloss::cpu
