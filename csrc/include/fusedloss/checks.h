#pragma once
// Argument checks of the raw ops (torch.ops.fusedloss.*), shared by the CPU and
// CUDA host code. The Python API validates first and raises torch's own
// messages; these checks keep a direct op call from ever touching memory it
// should not, with a message that names the op and the argument.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <fusedloss/numerics.h>

#include <optional>

namespace fusedloss {

inline void check_reduction(const char* op, int64_t reduction) {
  TORCH_CHECK(reduction == kReductionNone || reduction == kReductionMean || reduction == kReductionSum,
              op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected a floating point '", name,
              "', got ", t.scalar_type());
}

// `t` must be on `ref`'s device.
inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": '", name, "' is on ", t.device(), " but the input is on ",
              ref.device());
}

inline void check_device(const char* op, const char* name, const std::optional<at::Tensor>& t,
                         const at::Tensor& ref) {
  if (t.has_value() && t->defined()) check_device(op, name, *t, ref);
}

// `t` must match `ref` in device and dtype.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": '", name, "' is on ", t.device(),
              " but the input is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": '", name, "' has dtype ", t.scalar_type(),
              " but the input has ", ref.scalar_type());
}

inline void check_like(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& ref) {
  if (t.has_value() && t->defined()) check_like(op, name, *t, ref);
}

// `t` must broadcast to `sizes` (without changing them).
inline void check_broadcasts_to(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef sizes) {
  const int64_t nd = static_cast<int64_t>(sizes.size());
  bool ok = t.dim() <= nd;
  for (int64_t i = 0; ok && i < t.dim(); ++i) {
    const int64_t s = t.size(t.dim() - 1 - i);
    ok = s == 1 || s == sizes[nd - 1 - i];
  }
  TORCH_CHECK(ok, op, ": '", name, "' of shape ", t.sizes(), " does not broadcast to ", sizes);
}

inline void check_broadcasts_to(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                at::IntArrayRef sizes) {
  if (t.has_value() && t->defined()) check_broadcasts_to(op, name, *t, sizes);
}

inline at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

}  // namespace fusedloss
