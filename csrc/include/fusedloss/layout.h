#pragma once
// Host-side description of how an operand of an elementwise loss is laid out
// relative to the loss's contiguous iteration order. Shared by the CPU and CUDA
// host code so both devices accept exactly the same inputs without copies.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace fusedloss {

// Element i (in row-major order of the loss's shape) of an operand lives at
// data[(i / inner) % period]. This covers, without materialising anything:
//   contiguous tensors                  inner 1,    period numel
//   0-d / single-element weights        inner 1,    period 1
//   pos_weight (C,) over (N, C)         inner 1,    period C
//   pos_weight (C,1,1) over (N,C,H,W)   inner H*W,  period C
//   target (N,1) broadcast over (N, C)  inner C,    period N
struct Layout {
  int64_t inner = 1;
  int64_t period = 1;
  bool contiguous(int64_t numel) const { return inner == 1 && period == numel; }
  bool constant() const { return period == 1; }
};

// Reads the Layout off a tensor already expanded to the loss's shape, if its
// strides fit the (i / inner) % period pattern.
inline bool describe_layout(const at::Tensor& t, Layout* out) {
  if (t.numel() == 0) {  // nothing is ever read
    *out = Layout{};
    return true;
  }
  int64_t inner = 1, period = 1, expected = 1;
  // Walking from the innermost dim: broadcast (stride-0) dims, then dims that
  // are contiguous with each other, then broadcast dims again.
  int phase = 0;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    const int64_t size = t.size(d);
    const int64_t stride = t.stride(d);
    if (size == 1) continue;
    if (stride == 0) {
      if (phase == 0) {
        inner *= size;
      } else {
        phase = 2;
      }
      continue;
    }
    if (phase == 2 || stride != expected) return false;
    phase = 1;
    period *= size;
    expected *= size;
  }
  if (phase == 0) inner = 1;  // every dim broadcast (or size 1): a single value
  out->inner = inner;
  out->period = period;
  return true;
}

// Expands `t` to `sizes` and returns a tensor whose Layout is in `layout`. Only a
// layout that fits no pattern (a transposed input, an exotic broadcast) costs a
// contiguous copy.
inline at::Tensor as_operand(const at::Tensor& t, at::IntArrayRef sizes, Layout* layout) {
  if (t.numel() == 1) {
    // One value read for every element (a reduced loss's grad_output, a 0-d
    // weight): its Layout needs no view, which would cost more than a small loss.
    *layout = Layout{};
    return t;
  }
  at::Tensor e = t.sizes() == sizes ? t : t.expand(sizes);
  if (describe_layout(e, layout)) return e;
  at::Tensor c = e.contiguous();
  const bool ok = describe_layout(c, layout);
  TORCH_INTERNAL_ASSERT(ok, "a contiguous tensor always has a Layout");
  return c;
}

}  // namespace fusedloss
