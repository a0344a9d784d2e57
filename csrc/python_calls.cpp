// Eager calls of the loss ops from fusedloss.functional, straight into the
// dispatcher.
//
// torch.ops.fusedloss.<op>(...) converts its Python arguments by walking the
// op's schema into a boxed stack and unboxes them again for the kernel: about
// 2 us a call on the 2-core development machine, as much as the whole loss at
// (32, 10) and the part of a small call where fusedloss was slower than
// torch's own losses (whose Python bindings are generated C++). The functions
// here take the same arguments in the schema's order and make the same typed
// dispatcher call as the C++ code does, so every dispatch key (autograd,
// autocast, tracing, Python modes and tensor subclasses) sees exactly the call
// torch.ops makes; only the conversion differs.
//
// Each function holds the op's plain torch.ops overload, bound once at import
// (fusedloss/_ops.py calls _bind). An argument of a type converted here by no
// rule below (a SymInt, a numpy scalar, a wrong type) sends the call there
// unchanged, so that what it accepts and the errors it raises stay
// torch.ops's. Under torch.compile the functional layer calls the overload
// itself (fusedloss/_ops.py registers the substitution for dynamo), so the
// traced graph holds the op.

#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <fusedloss/op_signatures.h>

#include <cstring>
#include <optional>
#include <tuple>
#include <utility>

namespace fusedloss {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using OptDtype = std::optional<at::ScalarType>;

// One argument's conversion: get() converts `o` into `out` and returns true
// when `o` is of a type this rule converts exactly as the schema would, and
// returns false (leaving no Python error set) otherwise.
template <typename T>
struct From;

template <>
struct From<const Tensor&> {
  using type = Tensor;
  static bool get(PyObject* o, type& out) {
    if (!THPVariable_Check(o)) return false;
    out = THPVariable_Unpack(o);
    return true;
  }
};

template <>
struct From<const OptTensor&> {
  using type = OptTensor;
  static bool get(PyObject* o, type& out) {
    if (o == Py_None) return true;  // out stays empty
    if (!THPVariable_Check(o)) return false;
    out = THPVariable_Unpack(o);
    return true;
  }
};

// A Python int within int64 (bool is an int subclass the schema refuses).
template <>
struct From<int64_t> {
  using type = int64_t;
  static bool get(PyObject* o, type& out) {
    if (!PyLong_CheckExact(o)) return false;
    int overflow = 0;
    out = PyLong_AsLongLongAndOverflow(o, &overflow);
    return overflow == 0;
  }
};

// A Python float, or an int within int64 (the schema takes both).
template <>
struct From<double> {
  using type = double;
  static bool get(PyObject* o, type& out) {
    if (PyFloat_CheckExact(o)) {
      out = PyFloat_AS_DOUBLE(o);
      return true;
    }
    int64_t i = 0;
    if (!From<int64_t>::get(o, i)) return false;
    out = static_cast<double>(i);
    return true;
  }
};

template <>
struct From<bool> {
  using type = bool;
  static bool get(PyObject* o, type& out) {
    out = o == Py_True;
    return PyBool_Check(o);
  }
};

template <>
struct From<std::optional<double>> {
  using type = std::optional<double>;
  static bool get(PyObject* o, type& out) {
    if (o == Py_None) return true;
    double v = 0;
    if (!From<double>::get(o, v)) return false;
    out = v;
    return true;
  }
};

template <>
struct From<OptDtype> {
  using type = OptDtype;
  static bool get(PyObject* o, type& out) {
    if (o == Py_None) return true;
    if (!THPDtype_Check(o)) return false;
    out = reinterpret_cast<THPDtype*>(o)->scalar_type;
    return true;
  }
};

// The GIL is let go for the op, as torch.ops does: a long loss does not stop
// the process's other Python threads. The dispatcher takes it back wherever
// Python runs (modes, subclasses).
struct WithoutGil {
  PyThreadState* state = PyEval_SaveThread();
  ~WithoutGil() { PyEval_RestoreThread(state); }
};

template <const char* Name, typename Sig>
struct Call;

template <const char* Name, typename... Args>
struct Call<Name, Tensor(Args...)> {
  static constexpr Py_ssize_t kArgs = sizeof...(Args);
  static inline PyObject* overload = nullptr;  // a strong reference, kept for the process

  static PyObject* fn(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
    HANDLE_TH_ERRORS
    std::tuple<typename From<Args>::type...> values;
    if (nargs != kArgs || !convert(args, values, std::index_sequence_for<Args...>{})) {
      if (overload == nullptr) {
        PyErr_Format(PyExc_RuntimeError, "fusedloss internal error: no overload bound for %s", Name);
        return nullptr;
      }
      return PyObject_Vectorcall(overload, args, nargs, nullptr);
    }
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(Name, "").typed<Tensor(Args...)>();
    Tensor out;
    {
      WithoutGil released;
      out = std::apply([](auto&... v) { return op.call(v...); }, values);
    }
    return THPVariable_Wrap(std::move(out));
    END_HANDLE_TH_ERRORS
  }

  template <size_t... I>
  static bool convert(PyObject* const* a, std::tuple<typename From<Args>::type...>& values,
                      std::index_sequence<I...>) {
    return (From<Args>::get(a[I], std::get<I>(values)) && ...);
  }
};

// The ops by qualified name; their C++ signatures: fusedloss/op_signatures.h.
constexpr char kBce[] = "fusedloss::bce_with_logits";
constexpr char kMse[] = "fusedloss::mse";
constexpr char kCe[] = "fusedloss::cross_entropy";
constexpr char kHingeEmbedding[] = "fusedloss::hinge_embedding";
constexpr char kSoftMargin[] = "fusedloss::soft_margin";
constexpr char kHinge[] = "fusedloss::hinge";
constexpr char kMultiMargin[] = "fusedloss::multi_margin";
constexpr char kSigmoidFocal[] = "fusedloss::sigmoid_focal";
constexpr char kMultilabelSoftMargin[] = "fusedloss::multilabel_soft_margin";
constexpr char kDistill[] = "fusedloss::distill";
constexpr char kLce[] = "fusedloss::linear_cross_entropy";

// (Python name, op, signature) of every eager call.
#define FUSEDLOSS_CALLS(X)                                                             \
  X("bce_with_logits", kBce, sig::Bce)                                                 \
  X("mse", kMse, sig::Mse)                                                             \
  X("cross_entropy", kCe, sig::CrossEntropy)                                           \
  X("hinge_embedding", kHingeEmbedding, sig::HingeEmbedding)                           \
  X("soft_margin", kSoftMargin, sig::SoftMargin)                                       \
  X("hinge", kHinge, sig::Hinge)                                                       \
  X("multi_margin", kMultiMargin, sig::MultiMargin)                                    \
  X("sigmoid_focal", kSigmoidFocal, sig::SigmoidFocal)                                 \
  X("multilabel_soft_margin", kMultilabelSoftMargin, sig::MultilabelSoftMargin)        \
  X("distill", kDistill, sig::Distill)                                                 \
  X("linear_cross_entropy", kLce, sig::LinearCrossEntropy)

// A rebinding (a reload of fusedloss._ops) keeps the old overload alive: a
// call on another thread may be using it.
void set_overload(PyObject*& slot, PyObject* overload) {
  Py_INCREF(overload);
  slot = overload;
}

// _bind(name, overload): the torch.ops overload call `name` falls back to.
PyObject* bind(PyObject* /*module*/, PyObject* args) {
  const char* name = nullptr;
  PyObject* overload = nullptr;
  if (!PyArg_ParseTuple(args, "sO", &name, &overload)) return nullptr;
#define FUSEDLOSS_BIND(py_name, Name, Sig)             \
  if (std::strcmp(name, py_name) == 0) {               \
    set_overload(Call<Name, Sig>::overload, overload); \
    Py_RETURN_NONE;                                    \
  }
  FUSEDLOSS_CALLS(FUSEDLOSS_BIND)
#undef FUSEDLOSS_BIND
  PyErr_Format(PyExc_KeyError, "no eager call named %s", name);
  return nullptr;
}

#define FUSEDLOSS_CALL(py_name, Name, Sig) \
  {py_name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&Call<Name, Sig>::fn)), METH_FASTCALL, nullptr},

PyMethodDef calls[] = {FUSEDLOSS_CALLS(FUSEDLOSS_CALL){"_bind", bind, METH_VARARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};

#undef FUSEDLOSS_CALL

}  // namespace

// fusedloss._C.calls: a submodule holding the functions above.
PyObject* make_calls_module() {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "fusedloss._C.calls",
                            "Eager calls of the loss ops (fusedloss/functional.py)", -1, calls};
  return PyModule_Create(&def);
}

}  // namespace fusedloss
