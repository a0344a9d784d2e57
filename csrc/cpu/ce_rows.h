#pragma once
// The row primitives of the CPU cross entropy (cross_entropy.cpp), for other
// row losses built from the same math: the vocabulary-parallel kernels
// (vocab_parallel.cpp). Defined and instantiated in cross_entropy.cpp.

#include <ATen/OpMathType.h>

#include <fusedloss/numerics.h>

#include <cstdint>

namespace fusedloss::cpu {

// A row of n logits (element stride `stride`) as contiguous accumulation-type
// values, softcapped when asked: the logits themselves when they already are
// (fp32/fp64, stride 1, no softcap), else a copy in buf (n values).
template <typename scalar_t>
const at::opmath_type<scalar_t>* ce_load_row(const scalar_t* src, int64_t stride, int64_t n,
                                             at::opmath_type<scalar_t>* buf, bool softcap,
                                             at::opmath_type<scalar_t> cap, at::opmath_type<scalar_t> inv_cap);

// The RowState (numerics.h) of n contiguous values: one exp per value, in L1
// blocks, summed in a fixed order. f: per-class factors (null: 1), used only
// when with_f.
template <typename T>
math::RowState<T> ce_row_state(const T* x, const T* f, bool with_f, int64_t n);

}  // namespace fusedloss::cpu
