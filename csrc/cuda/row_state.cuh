// The row kernels' common shape (cross entropy, vocabulary-parallel cross
// entropy, distillation): a group of G threads per row, U 16-byte packs in
// flight per thread, and a per-thread online state (math::RowState, the max /
// sum-exp of a row; math::KlState, distillation's two of them) merged over the
// group. One definition of that merge, so that every row kernel reduces in the
// same fixed order (a butterfly within a warp, then the warps in index order):
// the same bits on every run, no atomics.
#pragma once

#include <fusedloss/numerics.h>

#include "common.cuh"

namespace fusedloss::cuda {

constexpr int kRowBlock = 256;  // threads per block of the warp-per-row and thread-per-row kernels

// Packs in flight per thread: four 16-byte loads for fp32, two for the 16-bit
// types, whose 8-element packs cost twice the registers once widened.
template <typename scalar_t>
constexpr int row_unroll() {
  return sizeof(scalar_t) == 2 ? 2 : 4;
}

template <typename acc_t>
__device__ __forceinline__ math::RowState<acc_t> shfl_xor_state(const math::RowState<acc_t>& s, int mask) {
  return {__shfl_xor_sync(0xffffffffu, s.max, mask), __shfl_xor_sync(0xffffffffu, s.sum, mask),
          __shfl_xor_sync(0xffffffffu, s.mass, mask), __shfl_xor_sync(0xffffffffu, s.rel, mask)};
}

template <typename acc_t>
__device__ __forceinline__ math::KlState<acc_t> shfl_xor_state(const math::KlState<acc_t>& s, int mask) {
  return {__shfl_xor_sync(0xffffffffu, s.mp, mask), __shfl_xor_sync(0xffffffffu, s.sp, mask),
          __shfl_xor_sync(0xffffffffu, s.mq, mask), __shfl_xor_sync(0xffffffffu, s.sq, mask),
          __shfl_xor_sync(0xffffffffu, s.w, mask)};
}

template <typename acc_t>
__device__ __forceinline__ math::RowState<acc_t> state_merge(const math::RowState<acc_t>& a,
                                                             const math::RowState<acc_t>& b) {
  return math::row_merge(a, b);
}

template <typename acc_t>
__device__ __forceinline__ math::KlState<acc_t> state_merge(const math::KlState<acc_t>& a,
                                                            const math::KlState<acc_t>& b) {
  return math::kl_merge(a, b);
}

template <typename acc_t>
__device__ __forceinline__ void state_clear(math::RowState<acc_t>* s) {
  *s = math::row_state_empty<acc_t>();
}

template <typename acc_t>
__device__ __forceinline__ void state_clear(math::KlState<acc_t>* s) {
  *s = math::kl_state_empty<acc_t>();
}

// Merge over the G threads of a row: valid in every lane of a warp group, in
// thread 0 of a block-wide group (G > 32), whose `smem` holds G / 32 states.
template <int G, typename State>
__device__ __forceinline__ State group_merge(State s, State* smem) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) s = state_merge(s, shfl_xor_state(s, off));
  if constexpr (G > kWarp) {
    const int warp = threadIdx.x / kWarp;
    if (threadIdx.x % kWarp == 0) smem[warp] = s;
    __syncthreads();
    if (warp == 0) {
      constexpr int kWarps = G / kWarp;
      if (threadIdx.x < kWarps) {
        s = smem[threadIdx.x];
      } else {
        state_clear(&s);
      }
#pragma unroll
      for (int off = kWarp / 2; off > 0; off /= 2) s = state_merge(s, shfl_xor_state(s, off));
    }
  }
  return s;
}

}  // namespace fusedloss::cuda
