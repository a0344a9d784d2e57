#pragma once
// Ops<Vectorized<T>>: the at::vec (Sleef-backed) primitives that let the
// formulas of numerics.h run 8/16 lanes at a time on the CPU. Which instruction
// set at::vec targets is fixed at build time (setup.py: CPU_CAPABILITY).

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <fusedloss/numerics.h>

#include <cstring>
#include <limits>

namespace fusedloss::math {

template <typename T>
struct Ops<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using Mask = V;  // lanes of all ones / all zeros, as at::vec comparisons return
  static constexpr bool kWide = sizeof(T) == 8;  // fp64 math
  static V exp(const V& x) { return x.exp(); }  // Sleef, 1 ulp
  static V exp_fast(const V& x) { return x.exp(); }
  static V log(const V& x) { return x.log(); }
  // Sleef's vector log1p runs ~8x slower than its log on AVX-512. log(1 + x)
  // times x / ((1 + x) - 1) is as accurate (the ratio undoes the rounding of
  // 1 + x, Goldberg 1991); where 1 + x rounds to 1, log1p(x) = x.
  static V log1p(const V& x) {
    const V u = V(T(1)) + x;
    const V d = u - V(T(1));
    const V r = u.log() * (x / d);
    const V inf(std::numeric_limits<T>::infinity());
    return V::blendv(V::blendv(r, x, d == V(T(0))), u, u == inf);
  }
  static V tanh(const V& x) { return x.tanh(); }
  static V pow(const V& x, const V& y) { return x.pow(y); }
  static V expm1(const V& x) { return x.expm1(); }
  static V abs(const V& x) { return x.abs(); }
  static V neg(const V& x) { return x.neg(); }
  static V min(const V& a, const V& b) { return at::vec::minimum(a, b); }  // propagates NaN
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static Mask eq(const V& a, const V& b) { return a == b; }
  static Mask ne(const V& a, const V& b) { return a != b; }
  static Mask gt(const V& a, const V& b) { return a > b; }
  static Mask lt(const V& a, const V& b) { return a < b; }
  static Mask ge(const V& a, const V& b) { return a >= b; }
  static V where(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
};

}  // namespace fusedloss::math

namespace fusedloss::cpu {

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// Widen n values to the accumulation type (fp16/bf16 -> fp32).
template <typename scalar_t>
inline void widen(const scalar_t* src, opmath_t<scalar_t>* dst, int64_t n) {
  using acc_t = opmath_t<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    using fVec = at::vec::Vectorized<float>;
    int64_t i = 0;
    for (; i + fVec::size() <= n; i += fVec::size()) {
      fVec v;
      at::vec::load_to_float(src + i, v);
      v.store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// Narrow n accumulation-type values to the output dtype (round to nearest even).
template <typename scalar_t>
inline void narrow(const opmath_t<scalar_t>* src, scalar_t* dst, int64_t n) {
  using acc_t = opmath_t<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    using fVec = at::vec::Vectorized<float>;
    constexpr int64_t W = 2 * fVec::size();
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      auto lo = fVec::loadu(src + i);
      auto hi = fVec::loadu(src + i + fVec::size());
      at::vec::convert_from_float<scalar_t>(lo, hi).store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// The engines keep each operand's own dtype and compute in acc_t: fp32 reads
// fp16, bf16 and fp32 values; fp64 reads fp64 (elementwise_host.h `loadable`).
#define FUSEDLOSS_CPU_LOAD_CASES(acc_t, CASE)                                 \
  if constexpr (std::is_same_v<acc_t, double>) {                             \
    CASE(double)                                                             \
  } else {                                                                   \
    switch (st) {                                                            \
      case at::kHalf:                                                        \
        CASE(at::Half)                                                       \
      case at::kBFloat16:                                                    \
        CASE(at::BFloat16)                                                   \
      default:                                                               \
        CASE(float)                                                          \
    }                                                                        \
  }

// n values of dtype st at element `offset` of src, widened into dst.
template <typename acc_t>
inline void load_widen(const void* src, at::ScalarType st, int64_t offset, acc_t* dst, int64_t n) {
#define FUSEDLOSS_WIDEN(T)                                      \
  widen(static_cast<const T*>(src) + offset, dst, n);          \
  return;
  FUSEDLOSS_CPU_LOAD_CASES(acc_t, FUSEDLOSS_WIDEN)
#undef FUSEDLOSS_WIDEN
}

// Element i of src (dtype st), widened.
template <typename acc_t>
inline acc_t load_one(const void* src, at::ScalarType st, int64_t i) {
#define FUSEDLOSS_ONE(T) return static_cast<acc_t>(static_cast<const T*>(src)[i]);
  FUSEDLOSS_CPU_LOAD_CASES(acc_t, FUSEDLOSS_ONE)
#undef FUSEDLOSS_ONE
}

// n accumulation values rounded once into dst (dtype st) at element `offset`.
template <typename acc_t>
inline void store_narrow(const acc_t* src, void* dst, at::ScalarType st, int64_t offset, int64_t n) {
#define FUSEDLOSS_NARROW(T)                          \
  narrow(src, static_cast<T*>(dst) + offset, n);    \
  return;
  FUSEDLOSS_CPU_LOAD_CASES(acc_t, FUSEDLOSS_NARROW)
#undef FUSEDLOSS_NARROW
}

}  // namespace fusedloss::cpu
