#pragma once
// Ops<Vectorized<T>>: the at::vec (Sleef-backed) primitives, and an inline fp32
// exp, that let the formulas of numerics.h run 8/16 lanes at a time on the
// CPU. Which instruction set at::vec targets is fixed at build time (setup.py:
// CPU_CAPABILITY).

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <fusedloss/numerics.h>

#include <cstring>
#include <limits>

namespace fusedloss::cpu {

// exp of 16 (AVX-512) or 8 (AVX2) floats, inline. Sleef's exp is a call, and
// every vector register is caller-saved across it: in a softmax row the sum,
// the max and the loop state went through the stack at each exp, and the calls
// could not overlap. This one is exp(x) = 2^n exp(r), n = round(x / ln 2), r
// reduced with ln 2 in two parts (Cody-Waite), exp(r) by a degree-7 polynomial
// (Cephes' expf coefficients) on |r| <= ln(2) / 2. Error, measured against a
// float64 exp over every float in [-110, 89]: at most 1.01 ulp (Sleef's:
// 1.0), 22 of 2.2e9 inputs above 1 ulp. exp(-inf) = 0, exp(inf) = inf, NaN
// stays NaN, subnormal results are rounded once. fp64 and other instruction
// sets keep Sleef.
inline at::vec::Vectorized<float> vec_exp(const at::vec::Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  using R = __m512;
#define FL_OP(name) _mm512_##name
#else
  using R = __m256;
#define FL_OP(name) _mm256_##name
#endif
  auto c = [](float f) { return FL_OP(set1_ps)(f); };
  R x = v;
  // min/max return their second operand when one is NaN: NaN goes through.
  // Below about -104 the result rounds to 0 and from 89 up it overflows to
  // inf; clamping at -110 keeps n >= -159, which the AVX2 split below needs.
  x = FL_OP(max_ps)(c(-110.0f), FL_OP(min_ps)(c(89.0f), x));
#if defined(CPU_CAPABILITY_AVX512)
  const R n = _mm512_roundscale_ps(_mm512_mul_ps(x, c(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const R n = _mm256_round_ps(_mm256_mul_ps(x, c(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  R r = FL_OP(fnmadd_ps)(n, c(0.693359375f), x);  // ln 2 = 0.693359375 - 2.12194440e-4 + ...
  r = FL_OP(fnmadd_ps)(n, c(-2.12194440e-4f), r);
  R p = c(1.9875691500e-4f);
  p = FL_OP(fmadd_ps)(p, r, c(1.3981999507e-3f));
  p = FL_OP(fmadd_ps)(p, r, c(8.3334519073e-3f));
  p = FL_OP(fmadd_ps)(p, r, c(4.1665795894e-2f));
  p = FL_OP(fmadd_ps)(p, r, c(1.6666665459e-1f));
  p = FL_OP(fmadd_ps)(p, r, c(5.0000001201e-1f));
  const R y = FL_OP(add_ps)(FL_OP(fmadd_ps)(p, FL_OP(mul_ps)(r, r), r), c(1.0f));
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(y, n);
#else
  // 2^n as two normal factors 2^(n/2), so that n down to -159 (a subnormal
  // result) is rounded once, in the last product.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  auto pow2 = [](__m256i e) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  };
  return _mm256_mul_ps(_mm256_mul_ps(y, pow2(n1)), pow2(n2));
#endif
#undef FL_OP
#else
  return v.exp();
#endif
}

inline at::vec::Vectorized<double> vec_exp(const at::vec::Vectorized<double>& v) { return v.exp(); }

}  // namespace fusedloss::cpu

namespace fusedloss::math {

template <typename T>
struct Ops<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using Mask = V;  // lanes of all ones / all zeros, as at::vec comparisons return
  static constexpr bool kWide = sizeof(T) == 8;  // fp64 math
  static V exp(const V& x) { return cpu::vec_exp(x); }
  static V exp_fast(const V& x) { return cpu::vec_exp(x); }
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
