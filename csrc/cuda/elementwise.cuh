#pragma once
// The CUDA engine of the elementwise losses: the CUDA twin of
// csrc/cpu/elementwise.h, running the same functors (elementwise_losses.h).
//
// Each block owns a fixed slice of kBlockElems elements; threads read 16-byte
// packs of contiguous operands (coalesced across the warp), each in its own
// dtype, and compute in fp32/fp64. A reduction writes one partial per block,
// and a single-block kernel adds the partials in a fixed order and applies the
// mean, on the device: no float atomics (bitwise repeatable), no host
// synchronization.
// Indices are 64-bit throughout.

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <fusedloss/dtypes.h>
#include <fusedloss/elementwise_host.h>

#include <array>
#include <climits>
#include <type_traits>

#include "common.cuh"

namespace fusedloss::cuda {

constexpr int kThreads = 256;
constexpr int kItemsPerThread = 16;
constexpr int64_t kBlockElems = int64_t(kThreads) * kItemsPerThread;
constexpr int kFinalizeThreads = 512;

enum OperandKind : int8_t { kAbsent = 0, kConstant, kContiguous, kBroadcast };

// Elements per thread per step: 16 bytes of the narrowest dtype (8 fp16/bf16
// values; fp32 operands then take two 16-byte loads), or two fp64 values.
template <typename acc_t>
constexpr int vec_width() {
  return std::is_same_v<acc_t, double> ? 2 : 8;
}

template <int N>
struct DeviceOperands {
  const void* data[N];
  int64_t inner[N];
  int64_t period[N];
  int8_t kind[N];
  int8_t dtype[N];
};

template <int N>
struct Outputs {
  void* ptr[N];  // nullptr: not requested
  int8_t dtype[N];
};

// Calls f with a null pointer of the C++ type of dtype code d (fp64
// computation only ever sees fp64).
template <typename acc_t, typename F>
__device__ __forceinline__ void with_type(int d, F&& f) {
  if constexpr (std::is_same_v<acc_t, double>) {
    f(static_cast<double*>(nullptr));
  } else if (d == kF16) {
    f(static_cast<at::Half*>(nullptr));
  } else if (d == kBF16) {
    f(static_cast<at::BFloat16*>(nullptr));
  } else {
    f(static_cast<float*>(nullptr));
  }
}

template <typename acc_t, int VEC>
struct Vals {
  acc_t v[VEC];
};

// VEC values from element i of a 16-byte aligned array (i a multiple of VEC),
// as 16-byte loads.
template <int VEC, typename acc_t>
__device__ __forceinline__ Vals<acc_t, VEC> load_vals(const void* p, int d, int64_t i) {
  Vals<acc_t, VEC> out;
  with_type<acc_t>(d, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int PK = pack_size<T>();
    static_assert(VEC % PK == 0, "a step is whole 16-byte packs");
    const T* q = static_cast<const T*>(p) + i;
#pragma unroll
    for (int h = 0; h < VEC / PK; ++h) {
      const Pack<T, PK> pk = load_pack<T, PK>(q + h * PK);
#pragma unroll
      for (int j = 0; j < PK; ++j) out.v[h * PK + j] = static_cast<acc_t>(pk.v[j]);
    }
  });
  return out;
}

template <int VEC, typename acc_t>
__device__ __forceinline__ void store_vals(void* p, int d, int64_t i, const acc_t (&v)[VEC]) {
  with_type<acc_t>(d, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int PK = pack_size<T>();
    T* q = static_cast<T*>(p) + i;
#pragma unroll
    for (int h = 0; h < VEC / PK; ++h) {
      Pack<T, PK> pk;
#pragma unroll
      for (int j = 0; j < PK; ++j) pk.v[j] = static_cast<T>(v[h * PK + j]);
      store_pack(q + h * PK, pk);
    }
  });
}

// Operand k at element i.
template <typename acc_t, int N>
__device__ __forceinline__ acc_t operand_at(const DeviceOperands<N>& ops, int k, int64_t i) {
  switch (ops.kind[k]) {
    case kAbsent:
      return acc_t(1);
    case kConstant:
      return load_value<acc_t>(ops.data[k], ops.dtype[k], 0);
    case kContiguous:
      return load_value<acc_t>(ops.data[k], ops.dtype[k], i);
    default:
      return load_value<acc_t>(ops.data[k], ops.dtype[k], (i / ops.inner[k]) % ops.period[k]);
  }
}

// Operand k at elements i .. i+VEC-1 (i a multiple of VEC, all in range).
// Returned by value: filling an array passed by reference from several
// switch arms made nvcc keep it in local memory.
template <int VEC, typename acc_t, int N>
__device__ __forceinline__ Vals<acc_t, VEC> operand_pack(const DeviceOperands<N>& ops, int k, int64_t i) {
  Vals<acc_t, VEC> out;
  const int kind = ops.kind[k];
  if (kind == kContiguous) {
    out = load_vals<VEC, acc_t>(ops.data[k], ops.dtype[k], i);
  } else if (kind == kBroadcast) {
    // One division per pack (32-bit when the indices fit: a 64-bit one costs
    // several times the instructions); the run then advances by counting.
    const int64_t inner = ops.inner[k];
    const int64_t period = ops.period[k];
    int64_t r, p;
    if (i <= INT32_MAX && inner <= INT32_MAX && period <= INT32_MAX) {
      const uint32_t ui = static_cast<uint32_t>(i), un = static_cast<uint32_t>(inner);
      const uint32_t q = inner == 1 ? ui : ui / un;
      r = static_cast<int64_t>(ui - q * un);
      p = static_cast<int64_t>(q % static_cast<uint32_t>(period));
    } else {
      const int64_t q = i / inner;
      r = i - q * inner;
      p = q % period;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      out.v[j] = load_value<acc_t>(ops.data[k], ops.dtype[k], p);
      if (++r == inner) {
        r = 0;
        if (++p == period) p = 0;
      }
    }
  } else {
    const acc_t c = kind == kConstant ? load_value<acc_t>(ops.data[k], ops.dtype[k], 0) : acc_t(1);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = c;
  }
  return out;
}

// f on element e alone (tails, unaligned data), its outputs handed to `sink`.
template <typename acc_t, typename F, typename Sink>
__device__ __forceinline__ void apply_one(const DeviceOperands<F::kIn>& ops, const F& f, int64_t e, Sink& sink) {
  acc_t x[F::kIn];
  acc_t o[F::kOut];
#pragma unroll
  for (int k = 0; k < F::kIn; ++k) x[k] = operand_at<acc_t>(ops, k, e);
  f(x, o);
  sink.one(e, o);
}

// Runs f over the block's slice and hands each element's outputs to `sink`
// (element index, outputs). vec_ok: every contiguous operand and output is
// 16-byte aligned, so packs can be used.
template <typename acc_t, typename F, typename Sink>
__device__ __forceinline__ void for_each_element(const DeviceOperands<F::kIn>& ops, const F& f, int64_t numel,
                                                 bool vec_ok, Sink&& sink) {
  constexpr int VEC = vec_width<acc_t>();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kBlockElems;
  if (vec_ok) {
#pragma unroll
    for (int it = 0; it < kItemsPerThread / VEC; ++it) {
      const int64_t i = base + (static_cast<int64_t>(it) * kThreads + threadIdx.x) * VEC;
      if (i + VEC <= numel) {
        Vals<acc_t, VEC> in[F::kIn];
#pragma unroll
        for (int k = 0; k < F::kIn; ++k) in[k] = operand_pack<VEC, acc_t>(ops, k, i);
        acc_t out[F::kOut][VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          acc_t x[F::kIn];
          acc_t o[F::kOut];
#pragma unroll
          for (int k = 0; k < F::kIn; ++k) x[k] = in[k].v[j];
          f(x, o);
#pragma unroll
          for (int k = 0; k < F::kOut; ++k) out[k][j] = o[k];
        }
        sink.pack(i, out);
      } else {
        for (int64_t e = i; e < numel; ++e) apply_one<acc_t>(ops, f, e, sink);
      }
    }
  } else {
#pragma unroll 4
    for (int it = 0; it < kItemsPerThread; ++it) {
      const int64_t e = base + static_cast<int64_t>(it) * kThreads + threadIdx.x;
      if (e < numel) apply_one<acc_t>(ops, f, e, sink);
    }
  }
}

template <typename acc_t, int NO, int VEC>
struct SumSink {
  acc_t acc[NO];
  __device__ __forceinline__ void pack(int64_t, const acc_t (&o)[NO][VEC]) {
#pragma unroll
    for (int k = 0; k < NO; ++k)
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[k] += o[k][j];
  }
  __device__ __forceinline__ void one(int64_t, const acc_t (&o)[NO]) {
#pragma unroll
    for (int k = 0; k < NO; ++k) acc[k] += o[k];
  }
};

template <typename acc_t, int NO, int VEC>
struct StoreSink {
  Outputs<NO> out;
  __device__ __forceinline__ void pack(int64_t i, const acc_t (&o)[NO][VEC]) {
#pragma unroll
    for (int k = 0; k < NO; ++k) {
      if (out.ptr[k] != nullptr) store_vals<VEC>(out.ptr[k], out.dtype[k], i, o[k]);
    }
  }
  __device__ __forceinline__ void one(int64_t e, const acc_t (&o)[NO]) {
#pragma unroll
    for (int k = 0; k < NO; ++k)
      if (out.ptr[k] != nullptr) store_value(out.ptr[k], out.dtype[k], e, o[k]);
  }
};

template <typename acc_t, typename F>
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(DeviceOperands<F::kIn> ops, F f, int64_t numel, bool vec_ok, acc_t* partials) {
  __shared__ acc_t smem[kWarp];
  SumSink<acc_t, F::kOut, vec_width<acc_t>()> sink;
#pragma unroll
  for (int k = 0; k < F::kOut; ++k) sink.acc[k] = acc_t(0);
  for_each_element<acc_t>(ops, f, numel, vec_ok, sink);
#pragma unroll
  for (int k = 0; k < F::kOut; ++k) {
    const acc_t s = block_sum(sink.acc[k], smem);
    if (threadIdx.x == 0) partials[static_cast<int64_t>(blockIdx.x) * F::kOut + k] = s;
  }
}

template <typename acc_t, typename F>
__global__ void __launch_bounds__(kThreads)
    map_kernel(DeviceOperands<F::kIn> ops, F f, int64_t numel, bool vec_ok, Outputs<F::kOut> out) {
  StoreSink<acc_t, F::kOut, vec_width<acc_t>()> sink{out};
  for_each_element<acc_t>(ops, f, numel, vec_ok, sink);
}

// Adds the per-block partials in a fixed order (in double) and writes the
// reduced loss, rounded once to its dtype; a mean divides by numel, or by the
// sum of partial column NO-1 (a weighted mean), which then also goes to
// `denominator`.
template <typename acc_t, int NO>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const acc_t* partials, int64_t nblocks, int64_t numel, int64_t reduction, void* loss,
                    int8_t loss_dtype, acc_t* denominator) {
  __shared__ double smem[kWarp];
  double s[NO];
#pragma unroll
  for (int k = 0; k < NO; ++k) s[k] = 0.0;
  for (int64_t b = threadIdx.x; b < nblocks; b += blockDim.x)
#pragma unroll
    for (int k = 0; k < NO; ++k) s[k] += static_cast<double>(partials[b * NO + k]);
#pragma unroll
  for (int k = 0; k < NO; ++k) s[k] = block_sum(s[k], smem);
  if (threadIdx.x == 0) {
    double v = s[0];
    if (reduction == kReductionMean) {
      const double d = NO == 2 ? s[NO - 1] : static_cast<double>(numel);
      v /= d;  // 0/0 = NaN for an empty mean, as torch
      if (denominator != nullptr) *denominator = static_cast<acc_t>(d);
    }
    store_value(loss, loss_dtype, 0, static_cast<acc_t>(v));
  }
}

template <int N>
DeviceOperands<N> device_operands(const ElementwiseCall& c, bool* vec_ok) {
  DeviceOperands<N> ops;
  for (int k = 0; k < N; ++k) {
    const at::Tensor& t = c.tensor[k];
    ops.data[k] = t.defined() ? c.data(k) : nullptr;
    ops.dtype[k] = t.defined() ? dtype_code(t.scalar_type()) : kF32;
    ops.inner[k] = c.layout[k].inner;
    ops.period[k] = c.layout[k].period;
    if (!t.defined()) {
      ops.kind[k] = kAbsent;
    } else if (c.layout[k].constant()) {
      ops.kind[k] = kConstant;
    } else if (c.layout[k].contiguous(c.numel)) {
      ops.kind[k] = kContiguous;
      *vec_ok = *vec_ok && aligned_to(ops.data[k], 16);
    } else {
      ops.kind[k] = kBroadcast;
    }
  }
  return ops;
}

struct CudaEngine {
  template <typename acc_t, typename F>
  static void map(const ElementwiseCall& c, const F& f, const std::array<OutSlot, F::kOut>& out) {
    if (c.numel == 0) return;
    const c10::cuda::CUDAGuard guard(c.device);
    bool vec_ok = true;
    const auto ops = device_operands<F::kIn>(c, &vec_ok);
    Outputs<F::kOut> outs;
    for (int k = 0; k < F::kOut; ++k) {
      outs.ptr[k] = out[k].data;
      outs.dtype[k] = dtype_code(out[k].dtype);
      if (out[k].data != nullptr) vec_ok = vec_ok && aligned_to(out[k].data, 16);
    }
    const int64_t blocks = ceil_div(c.numel, kBlockElems);
    map_kernel<acc_t, F><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(ops, f, c.numel, vec_ok, outs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename acc_t, typename F>
  static void forward(const ElementwiseCall& c, const F& f, int64_t reduction, at::Tensor& loss,
                      at::Tensor* denominator) {
    forward<acc_t>(c, f, reduction, OutSlot{loss.data_ptr(), loss.scalar_type()},
                   denominator != nullptr ? denominator->mutable_data_ptr<acc_t>() : nullptr);
  }

  template <typename acc_t, typename F>
  static void forward(const ElementwiseCall& c, const F& f, int64_t reduction, OutSlot loss, acc_t* denominator) {
    if (reduction == kReductionNone) {
      std::array<OutSlot, F::kOut> out{};
      out[0] = loss;
      map<acc_t>(c, f, out);
      return;
    }
    const c10::cuda::CUDAGuard guard(c.device);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t blocks = ceil_div(c.numel, kBlockElems);
    at::Tensor partials = at::empty({std::max<int64_t>(blocks, 1) * F::kOut}, c.options(c.acc));
    if (blocks > 0) {
      bool vec_ok = true;
      const auto ops = device_operands<F::kIn>(c, &vec_ok);
      reduce_kernel<acc_t, F><<<blocks, kThreads, 0, stream>>>(ops, f, c.numel, vec_ok,
                                                              partials.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    finalize_kernel<acc_t, F::kOut><<<1, kFinalizeThreads, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), blocks, c.numel, reduction, loss.data, dtype_code(loss.dtype), denominator);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace fusedloss::cuda
