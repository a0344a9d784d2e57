#pragma once
// Runtime flags to compile-time constants, so inner loops carry no branches
// for options that are fixed per call.

#include <type_traits>
#include <utility>

namespace fusedloss {

template <typename F>
inline void bool_switch(bool flag, F&& f) {
  if (flag) {
    std::forward<F>(f)(std::true_type{});
  } else {
    std::forward<F>(f)(std::false_type{});
  }
}

}  // namespace fusedloss
