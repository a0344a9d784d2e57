#pragma once
// Values whose dtype is known only at run time (a probability target or its
// gradient may be fp16, bf16 or fp32 next to logits of another of these), read
// and written from host and device code. Computation is always in the
// accumulation type: fp32, or fp64 for fp64 calls (which see only fp64 data).

#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace fusedloss {

enum DtypeCode : int8_t { kF32 = 0, kF16, kBF16, kF64 };

C10_HOST_DEVICE inline constexpr int8_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    case at::kDouble:
      return kF64;
    default:
      return kF32;
  }
}

// Element i of p (dtype code d), widened to acc_t.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t load_value(const void* p, int d, int64_t i) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return static_cast<const double*>(p)[i];
  } else {
    switch (d) {
      case kF16:
        return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
      case kBF16:
        return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
      default:
        return static_cast<const float*>(p)[i];
    }
  }
}

// v rounded once into element i of p (dtype code d).
template <typename acc_t>
C10_HOST_DEVICE inline void store_value(void* p, int d, int64_t i, acc_t v) {
  if constexpr (std::is_same_v<acc_t, double>) {
    static_cast<double*>(p)[i] = v;
  } else {
    switch (d) {
      case kF16:
        static_cast<c10::Half*>(p)[i] = static_cast<c10::Half>(v);
        break;
      case kBF16:
        static_cast<c10::BFloat16*>(p)[i] = static_cast<c10::BFloat16>(v);
        break;
      default:
        static_cast<float*>(p)[i] = v;
    }
  }
}

}  // namespace fusedloss
