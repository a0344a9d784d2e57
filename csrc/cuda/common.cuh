#pragma once
// Building blocks shared by the CUDA kernels: launch helpers, 16-byte vector
// access, and deterministic block reductions (fixed shuffle tree; no atomics).

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace fusedloss::cuda {

constexpr int kWarp = 32;

// N consecutive scalars moved as one 16-byte (or smaller) access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& x) {
  *reinterpret_cast<Pack<T, N>*>(p) = x;
}

template <typename scalar_t>
constexpr int pack_size() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

// Elements [0, head) and [tail, C) of a row are handled one by one, [head, tail)
// in 16-byte packs starting aligned (rows of odd C, or with a storage offset,
// start anywhere).
struct RowSplit {
  int64_t head, packs, tail;
};

template <typename scalar_t>
__device__ __forceinline__ RowSplit split_row(const scalar_t* row, int64_t C) {
  constexpr int VEC = pack_size<scalar_t>();
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % 16);
  int64_t head = mis == 0 ? 0 : (16 - mis) / static_cast<int64_t>(sizeof(scalar_t));
  if (mis % sizeof(scalar_t) != 0) head = C;  // not even element-aligned: no packs
  head = head < C ? head : C;
  const int64_t packs = (C - head) / VEC;
  return {head, packs, head + packs * VEC};
}

// Issues the loads of packs k0, k0 + G, ..., k0 + (U - 1) G of an aligned span
// (those below `packs`) before any is used, so U loads are in flight.
template <int G, typename scalar_t, int VEC, int U>
__device__ __forceinline__ void load_packs(const scalar_t* span, int64_t k0, int64_t packs,
                                           Pack<scalar_t, VEC> (&pk)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t k = k0 + static_cast<int64_t>(u) * G;
    if (k < packs) pk[u] = load_pack<scalar_t, VEC>(span + k * VEC);
  }
}

inline bool aligned_to(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Sum over a warp; every lane returns the total. The butterfly order is fixed,
// so the result is the same bits on every run.
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum of `x` over the block (blockDim.x a multiple of 32, at most 1024); the
// result is valid in thread 0. `smem` holds 32 values.
template <typename T>
__device__ __forceinline__ T block_sum(T x, T* smem) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  x = warp_sum(x);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  const int nwarps = blockDim.x / kWarp;
  x = (threadIdx.x < nwarps) ? smem[threadIdx.x] : T(0);
  if (warp == 0) x = warp_sum(x);
  return x;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace fusedloss::cuda
