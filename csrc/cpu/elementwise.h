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
// buffers; contiguous operands of the accumulation dtype are read in place.
// Each operand keeps its own dtype, and each output is rounded once into its
// own dtype.

#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <c10/util/irange.h>

#include <fusedloss/elementwise_host.h>
#include <fusedloss/layout.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "vec_ops.h"

namespace fusedloss::cpu {

constexpr int64_t kTile = 2048;
constexpr int64_t kChunk = 16 * kTile;

// Rows per parallel task of the softmax-row kernels (an exp per logit, ~0.5 ns
// each): about 4096 logits, a few microseconds, a little more than an OpenMP
// region costs on a warm pool. With a grain of a whole chunk, rows of a few
// hundred to a thousand classes ran on one thread up to 32 rows, where torch's
// log_softmax (a task per ~2048 logits) used all of them and was up to 1.6x
// faster at such sizes (measured on 2 cores: 32 x 1000, 64 x 200, 128 x 100).
// Each row is computed whole by one thread, so results do not depend on it.
inline int64_t softmax_row_grain(int64_t C) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)); }

// One operand of a loss, in its own dtype. data == nullptr means "absent":
// the constant 1.
struct Operand {
  const void* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  Layout layout;
};


// Values of `op` at positions [start, start + len), widened, into dst.
template <typename acc_t>
void gather(const Operand& op, int64_t start, int64_t len, acc_t* dst) {
  const int64_t inner = op.layout.inner;
  const int64_t period = op.layout.period;
  int64_t p = (start / inner) % period;
  int64_t i = 0;
  if (inner == 1) {
    while (i < len) {
      const int64_t run = std::min(period - p, len - i);
      load_widen(op.data, op.dtype, p, dst + i, run);
      i += run;
      p = 0;
    }
  } else {
    int64_t r = start % inner;
    while (i < len) {
      const int64_t run = std::min(inner - r, len - i);
      std::fill(dst + i, dst + i + run, load_one<acc_t>(op.data, op.dtype, p));
      i += run;
      r = 0;
      p = (p + 1 == period) ? 0 : p + 1;
    }
  }
}

// The operands of one tile, each either a pointer to len widened values or a
// broadcast constant. Its buffers, for `cap` elements each (kTile, or less for
// a call smaller than one tile), are allocated by the first operand that needs
// a copy: a small loss on contiguous fp32 operands allocates nothing.
template <typename acc_t, int N>
struct Tile {
  std::array<const acc_t*, N> ptr;
  std::array<acc_t, N> value;
  int64_t cap;
  std::unique_ptr<acc_t[]> storage;  // uninitialised: always written before read

  explicit Tile(int64_t cap) : cap(cap) {}

  acc_t* buf(int k) {
    if (!storage) storage.reset(new acc_t[N * cap]);
    return storage.get() + k * cap;
  }

  void load(const std::array<Operand, N>& ops, int64_t numel, int64_t start, int64_t len) {
    constexpr at::ScalarType kAcc = c10::CppTypeToScalarType<acc_t>::value;
    for (int k = 0; k < N; ++k) {
      const Operand& op = ops[k];
      if (op.data == nullptr) {
        ptr[k] = nullptr;
        value[k] = acc_t(1);
      } else if (op.layout.constant()) {
        ptr[k] = nullptr;
        value[k] = load_one<acc_t>(op.data, op.dtype, 0);
      } else if (op.layout.contiguous(numel) && op.dtype == kAcc) {
        ptr[k] = static_cast<const acc_t*>(op.data) + start;
      } else if (op.layout.contiguous(numel)) {
        acc_t* dst = buf(k);
        load_widen(op.data, op.dtype, start, dst, len);
        ptr[k] = dst;
      } else {
        acc_t* dst = buf(k);
        gather(op, start, len, dst);
        ptr[k] = dst;
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

// v with lane `lane` set to zero.
template <typename T>
at::vec::Vectorized<T> zero_lane(const at::vec::Vectorized<T>& v, int64_t lane) {
  alignas(64) T tmp[at::vec::Vectorized<T>::size()];
  v.store(tmp);
  tmp[lane] = T(0);
  return at::vec::Vectorized<T>::loadu(tmp);
}

// The largest lane (NaN if any lane is NaN), in at::vec's vec_reduce_all
// order; a max is exact, so the order cannot change the result.
template <typename T>
T lane_max(const at::vec::Vectorized<T>& v) {
  using V = at::vec::Vectorized<T>;
  return at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, v);
}

// The sum of the lanes in at::vec's vec_reduce_all order: for float on
// AVX2/AVX-512 a tree of shuffles, a few dependent steps instead of lane_sum's
// 8 or 16 (over softmax rows of ~100 classes the lane-by-lane loop was a third
// of each row's time); other types take its generic fixed-order loop. Rounds
// differently from lane_sum, which the kernels that promise lane_sum's order
// keep.
template <typename T>
T tree_sum(const at::vec::Vectorized<T>& v) {
  using V = at::vec::Vectorized<T>;
  return at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, v);
}

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
template <typename acc_t, typename F>
std::array<double, F::kOut> reduce(int64_t numel, const std::array<Operand, F::kIn>& ops, const F& f) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int NO = F::kOut;
  const int64_t nchunks = (numel + kChunk - 1) / kChunk;
  c10::SmallVector<double, 4 * NO> partial(nchunks * NO, 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    Tile<acc_t, F::kIn> tile(std::min(kTile, numel));
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t end = std::min(numel, (c + 1) * kChunk);
      double chunk_sum[NO] = {};
      for (int64_t start = c * kChunk; start < end; start += kTile) {
        const int64_t len = std::min(kTile, end - start);
        tile.load(ops, numel, start, len);
        Vec acc[NO];
        for (int k = 0; k < NO; ++k) acc[k] = Vec(acc_t(0));
        Vec in[F::kIn];
        Vec out[NO];
        int64_t i = 0;
        for (; i + Vec::size() <= len; i += Vec::size()) {
          tile.fetch(i, Vec::size(), in);
          f(in, out);
          for (int k = 0; k < NO; ++k) acc[k] = acc[k] + out[k];
        }
        if (i < len) {
          const int64_t count = len - i;
          tile.fetch(i, count, in);
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

// Writes functor output k to out[k] (contiguous, numel elements, rounded once
// to its dtype) for every k with out[k].data != nullptr.
template <typename acc_t, typename F>
void map(int64_t numel, const std::array<Operand, F::kIn>& ops, const F& f, const std::array<OutSlot, F::kOut>& out) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int NO = F::kOut;
  constexpr at::ScalarType kAcc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t ntiles = (numel + kTile - 1) / kTile;
  const int64_t cap = std::min(kTile, numel);
  at::parallel_for(0, ntiles, kChunk / kTile, [&](int64_t t0, int64_t t1) {
    Tile<acc_t, F::kIn> tile(cap);
    // outputs narrower than acc_t are computed here, then rounded once
    bool narrow = false;
    for (int k = 0; k < NO; ++k) narrow |= out[k].data != nullptr && out[k].dtype != kAcc;
    std::unique_ptr<acc_t[]> obuf(narrow ? new acc_t[NO * cap] : nullptr);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t start = t * kTile;
      const int64_t len = std::min(kTile, numel - start);
      tile.load(ops, numel, start, len);
      Vec in[F::kIn];
      Vec res[NO];
      for (int64_t i = 0; i < len; i += Vec::size()) {
        const int64_t count = std::min<int64_t>(Vec::size(), len - i);
        tile.fetch(i, count, in);
        f(in, res);
        for (int k = 0; k < NO; ++k) {
          if (out[k].data == nullptr) continue;
          acc_t* dst = out[k].dtype == kAcc ? static_cast<acc_t*>(out[k].data) + start : obuf.get() + k * cap;
          if (count == Vec::size()) {
            res[k].store(dst + i);
          } else {
            res[k].store(dst + i, count);
          }
        }
      }
      for (int k = 0; k < NO; ++k)
        if (out[k].data != nullptr && out[k].dtype != kAcc) {
          store_narrow(obuf.get() + k * cap, out[k].data, out[k].dtype, start, len);
        }
    }
  });
}

template <int N>
std::array<Operand, N> operands(const ElementwiseCall& c) {
  std::array<Operand, N> o;
  for (int k = 0; k < N; ++k) {
    const at::Tensor& t = c.tensor[k];
    o[k] = Operand{t.defined() ? c.data(k) : nullptr, t.defined() ? t.scalar_type() : at::kFloat, c.layout[k]};
  }
  return o;
}

// Runs a forward functor. 'none' writes the per-element loss (out[0]); mean and
// sum reduce it. A functor with kOut == 2 also sums the mean's denominator in
// out[1] (a weighted mean); that total goes to *denominator when given.
template <typename acc_t, typename F>
void forward(const ElementwiseCall& c, const F& f, int64_t reduction, OutSlot loss, acc_t* denominator = nullptr) {
  const auto ops = operands<F::kIn>(c);
  if (reduction == kReductionNone) {
    std::array<OutSlot, F::kOut> out{};
    out[0] = loss;
    map<acc_t>(c.numel, ops, f, out);
    return;
  }
  const auto total = reduce<acc_t>(c.numel, ops, f);
  double value = total[0];
  if (reduction == kReductionMean) {
    const double denom = F::kOut == 2 ? total[F::kOut - 1] : static_cast<double>(c.numel);
    value /= denom;  // 0/0 = NaN for an empty mean, as torch
    if (denominator != nullptr) *denominator = static_cast<acc_t>(denom);
  }
  const acc_t v = static_cast<acc_t>(value);
  store_narrow(&v, loss.data, loss.dtype, 0, 1);
}

// The CPU engine as the shared host code (elementwise_ops.h, row_sum.h) uses it.
struct Engine {
  template <typename acc_t, typename F>
  static void forward(const ElementwiseCall& c, const F& f, int64_t reduction, OutSlot loss, acc_t* denominator) {
    cpu::forward<acc_t>(c, f, reduction, loss, denominator);
  }
  template <typename acc_t, typename F>
  static void forward(const ElementwiseCall& c, const F& f, int64_t reduction, at::Tensor& loss,
                      at::Tensor* denominator) {
    cpu::forward<acc_t>(c, f, reduction, OutSlot{loss.data_ptr(), loss.scalar_type()},
                        denominator != nullptr ? denominator->mutable_data_ptr<acc_t>() : nullptr);
  }
  template <typename acc_t, typename F>
  static void map(const ElementwiseCall& c, const F& f, const std::array<OutSlot, F::kOut>& out) {
    cpu::map<acc_t>(c.numel, operands<F::kIn>(c), f, out);
  }
};

}  // namespace fusedloss::cpu
