// The fusedloss operator library: every schema, in one place. CPU and CUDA
// kernels register their implementations from csrc/cpu and csrc/cuda with
// TORCH_LIBRARY_IMPL, so the dispatcher picks the device; the autograd and
// autocast kernels live in csrc/autograd.cpp, the composites in
// csrc/composite.cpp, and the fake (meta) kernels for torch.compile in
// fusedloss/_ops.py.
//
// Reductions are at::Reduction codes: 0 none, 1 mean, 2 sum. Backward ops take
// an output_mask and return an empty tensor for every gradient not asked for.

#include <Python.h>

#include <string>
#include <torch/library.h>

#include <fusedloss/outputs.h>

namespace fusedloss {
bool probe_clamp_grad_at_bound();  // csrc/autograd.cpp
}  // namespace fusedloss

#ifndef FUSEDLOSS_TORCH_VERSION
#error "setup.py defines FUSEDLOSS_TORCH_VERSION: build with pip install --no-build-isolation ."
#endif

TORCH_LIBRARY(fusedloss, m) {
  // Every loss has three kinds of ops:
  //  * the loss itself, e.g. bce_with_logits: what fusedloss.functional calls.
  //    It is differentiable by a C++ autograd kernel (csrc/autograd.cpp), and
  //    its Autocast kernels read fp16/bf16 inputs as they are and return the
  //    loss in fp32, as torch's fp32 autocast policy for losses does.
  //  * its backward (and for losses that save state, a `_forward` op that
  //    returns that state): CPU and CUDA kernels, no autograd of their own.
  //  * `<loss>_composite`: the same loss written with torch's own ops
  //    (csrc/composite.cpp), for second derivatives, forward-mode AD, vmap and
  //    the argument combinations the kernels do not take.
  // out_dtype: the loss's dtype, computed in fp32 (fp64) and rounded once into
  // it (default: torch's dtype for the loss). Gradients keep each input's dtype.

  // binary_cross_entropy_with_logits
  m.def(
      "bce_with_logits(Tensor input, Tensor target, Tensor? weight=None, Tensor? pos_weight=None, int reduction=1, "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "bce_with_logits_backward(Tensor grad, Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
      "int reduction, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def(
      "bce_with_logits_composite(Tensor input, Tensor target, Tensor? weight=None, Tensor? pos_weight=None, "
      "int reduction=1, ScalarType? out_dtype=None) -> Tensor");
  // mse_loss with an optional weight of the input's shape (a weighted mean
  // divides by sum(weight)); mse_forward's second output is that sum, else empty.
  m.def("mse(Tensor input, Tensor target, Tensor? weight=None, int reduction=1, ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "mse_forward(Tensor input, Tensor target, Tensor? weight, int reduction, ScalarType? out_dtype) -> "
      "(Tensor, Tensor)");
  m.def(
      "mse_backward(Tensor grad, Tensor input, Tensor target, Tensor? weight, Tensor? loss, Tensor? denominator, "
      "int reduction, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "mse_composite(Tensor input, Tensor target, Tensor? weight=None, int reduction=1, "
      "ScalarType? out_dtype=None) -> Tensor");
  // The margin family. Pair losses take input and target of one shape.
  // grad_at_kink: whether the clamp passes its gradient where its argument is
  // exactly 0 (torch's clamp changed this in 2.14; fusedloss follows the
  // installed torch).
  m.def(
      "hinge_embedding(Tensor input, Tensor target, float margin=1.0, int reduction=1, "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "hinge_embedding_backward(Tensor grad, Tensor input, Tensor target, float margin, int reduction, "
      "bool grad_at_kink) -> Tensor");
  m.def(
      "hinge_embedding_composite(Tensor input, Tensor target, float margin=1.0, int reduction=1, "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def("soft_margin(Tensor input, Tensor target, int reduction=1, ScalarType? out_dtype=None) -> Tensor");
  m.def("soft_margin_backward(Tensor grad, Tensor input, Tensor target, int reduction) -> Tensor");
  m.def("soft_margin_composite(Tensor input, Tensor target, int reduction=1, ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "hinge(Tensor input, Tensor target, float margin=1.0, bool squared=False, int reduction=1, "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "hinge_backward(Tensor grad, Tensor input, Tensor target, float margin, bool squared, int reduction, "
      "bool grad_at_kink, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def(
      "hinge_composite(Tensor input, Tensor target, float margin=1.0, bool squared=False, int reduction=1, "
      "ScalarType? out_dtype=None) -> Tensor");
  // multi_margin_loss on (N, C), (C) or 0-d input with int64 class indices.
  m.def(
      "multi_margin(Tensor input, Tensor target, int p=1, float margin=1.0, Tensor? weight=None, int reduction=1, "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "multi_margin_backward(Tensor grad, Tensor input, Tensor target, int p, float margin, Tensor? weight, "
      "int reduction) -> Tensor");
  m.def(
      "multi_margin_composite(Tensor input, Tensor target, int p=1, float margin=1.0, Tensor? weight=None, "
      "int reduction=1, ScalarType? out_dtype=None) -> Tensor");
  // cross_entropy (softmax + NLL) with class-index (int64/uint8) or probability
  // targets. cross_entropy_forward returns (loss, lse, stats, target_mass):
  // lse = per row (max, log sum exp(x - max)), stats = [denominator of the
  // mean, sum(weight)], target_mass = sum_c w_c p'_c per row for probability
  // targets (empty otherwise). The backward reads them. inplace_backward: the
  // logits' gradient is written over the logits (fusedloss.functional documents
  // when that is allowed).
  m.def(
      "cross_entropy(Tensor input, Tensor target, Tensor? weight=None, int ignore_index=-100, int reduction=1, "
      "float label_smoothing=0.0, float lse_square_scale=0.0, float? softcap=None, bool inplace_backward=False, "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, int ignore_index, int reduction, "
      "float label_smoothing, float lse_square_scale, float? softcap, ScalarType? out_dtype) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cross_entropy_backward(Tensor grad, Tensor input, Tensor target, Tensor? weight, Tensor lse, Tensor stats, "
      "Tensor target_mass, int ignore_index, int reduction, float label_smoothing, float lse_square_scale, "
      "float? softcap, bool[2] output_mask) -> (Tensor, Tensor)");
  // The same gradient of the logits, written over the logits.
  m.def(
      "cross_entropy_backward_inplace(Tensor grad, Tensor(a!) input, Tensor target, Tensor? weight, Tensor lse, "
      "Tensor stats, Tensor target_mass, int ignore_index, int reduction, float label_smoothing, "
      "float lse_square_scale, float? softcap) -> ()");
  m.def(
      "cross_entropy_composite(Tensor input, Tensor target, Tensor? weight=None, int ignore_index=-100, "
      "int reduction=1, float label_smoothing=0.0, float lse_square_scale=0.0, float? softcap=None, "
      "bool inplace_backward=False, ScalarType? out_dtype=None) -> Tensor");
  // Vocabulary-parallel cross entropy (fusedloss/distributed.py): the local
  // steps around its two collectives, on this rank's (N, C_local) logits whose
  // class 0 is global class vocab_start; targets are global class indices and
  // weight the full (V) class weight. local -> (local max, packed
  // [S_other | x_t | rel (smoothing only) | C_local], sum of this slice's class
  // weights); all_reduce(MAX) of the max; rebase -> packed measured from the
  // global max; all_reduce(SUM) of it; finalize -> (loss, per row (max, ls,
  // s_other), [denominator, W, V]); backward -> the local logits' gradient.
  // csrc/include/fusedloss/vocab_parallel_host.h has the details.
  m.def(
      "vocab_parallel_ce_local(Tensor input, Tensor target, Tensor? weight, int vocab_start, int ignore_index, "
      "float label_smoothing, float? softcap) -> (Tensor, Tensor, Tensor)");
  m.def("vocab_parallel_ce_rebase(Tensor packed, Tensor local_max, Tensor global_max, Tensor mass) -> Tensor");
  m.def(
      "vocab_parallel_ce_finalize(Tensor packed, Tensor global_max, Tensor target, Tensor? weight, int ignore_index, "
      "int reduction, float label_smoothing, float lse_square_scale, ScalarType loss_dtype) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "vocab_parallel_ce_backward(Tensor grad, Tensor input, Tensor target, Tensor? weight, Tensor state, "
      "Tensor stats, int vocab_start, int ignore_index, int reduction, float label_smoothing, "
      "float lse_square_scale, float? softcap) -> Tensor");
  // Its linear variant (vocab_parallel_linear_cross_entropy): input (N, D) and
  // this rank's rows (C_local, D) of the head's weight (and bias) in place of
  // the logits, which exist one chunk of chunk_size rows at a time (0: the
  // device's budget). linear_ce_local -> local's outputs; rebase and finalize
  // as above; linear_ce_backward -> (this slice's part of grad_input,
  // grad_linear_weight, grad_linear_bias), empty (0,) tensors where
  // output_mask is false.
  m.def(
      "vocab_parallel_linear_ce_local(Tensor input, Tensor linear_weight, Tensor target, Tensor? linear_bias, "
      "Tensor? weight, int vocab_start, int ignore_index, float label_smoothing, float? softcap, int chunk_size) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "vocab_parallel_linear_ce_backward(Tensor grad, Tensor input, Tensor linear_weight, Tensor target, "
      "Tensor? linear_bias, Tensor? weight, Tensor state, Tensor stats, int vocab_start, int ignore_index, "
      "int reduction, float label_smoothing, float lse_square_scale, float? softcap, int chunk_size, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // sigmoid_focal_loss (torchvision.ops.sigmoid_focal_loss): alpha in [0, 1],
  // or -1 for no class weight; reduction defaults to none, as torchvision's.
  m.def(
      "sigmoid_focal(Tensor input, Tensor target, float alpha=0.25, float gamma=2.0, int reduction=0, "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "sigmoid_focal_backward(Tensor grad, Tensor input, Tensor target, float alpha, float gamma, int reduction, "
      "bool[2] output_mask) -> (Tensor, Tensor)");
  m.def(
      "sigmoid_focal_composite(Tensor input, Tensor target, float alpha=0.25, float gamma=2.0, int reduction=0, "
      "ScalarType? out_dtype=None) -> Tensor");
  // multilabel_soft_margin_loss over the last dim; target of the input's shape
  // (floating, or integer multi-hot labels), weight broadcast to it.
  m.def(
      "multilabel_soft_margin(Tensor input, Tensor target, Tensor? weight=None, int reduction=1, "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "multilabel_soft_margin_backward(Tensor grad, Tensor input, Tensor target, Tensor? weight, int reduction, "
      "bool[2] output_mask) -> (Tensor, Tensor)");
  m.def(
      "multilabel_soft_margin_composite(Tensor input, Tensor target, Tensor? weight=None, int reduction=1, "
      "ScalarType? out_dtype=None) -> Tensor");
  // Distillation on logits (kl_div_with_logits, jsd_with_logits) over the last
  // dim: beta = 0 is KL(teacher || student), 1 is KL(student || teacher), in
  // between the generalised JSD; times temperature^2. Rows whose target equals
  // ignore_index are skipped. Reductions: 0 none (per row), 1 mean (over
  // kept rows x classes), 2 sum, 3 batchmean (over kept rows). distill_forward
  // returns (loss, stats, denominator): per row 8 values (maxima, log sums of
  // exps, KL terms) and the mean's denominator, for the backward.
  m.def(
      "distill(Tensor student, Tensor teacher, Tensor? target=None, float beta=0.0, float temperature=1.0, "
      "int ignore_index=-100, int reduction=3, ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "distill_forward(Tensor student, Tensor teacher, Tensor? target, float beta, float temperature, "
      "int ignore_index, int reduction, ScalarType? out_dtype) -> (Tensor, Tensor, Tensor)");
  m.def(
      "distill_backward(Tensor grad, Tensor student, Tensor teacher, Tensor? target, Tensor stats, "
      "Tensor denominator, float beta, float temperature, int ignore_index, int reduction, bool[2] output_mask) "
      "-> (Tensor, Tensor)");
  m.def(
      "distill_composite(Tensor student, Tensor teacher, Tensor? target=None, float beta=0.0, "
      "float temperature=1.0, int ignore_index=-100, int reduction=3, ScalarType? out_dtype=None) -> Tensor");

  // linear_cross_entropy: cross_entropy(input @ linear_weight^T + linear_bias,
  // target, ...) for input (D) or (N, D) and linear_weight (V, D), computed in
  // chunks of rows so that the (N, V) logits never exist in full. chunk_size:
  // rows per chunk (0: from the device's memory budget). The forward op returns
  // (loss, lse, stats, target_mass) as cross_entropy_forward does, and, for
  // mean/sum with grad_mask set, the gradients of (input, linear_weight,
  // linear_bias) for grad_output = 1 (empty (0,) tensors otherwise). The
  // backward op recomputes them chunk by chunk from the saved O(N) state.
  m.def(
      "linear_cross_entropy(Tensor input, Tensor linear_weight, Tensor target, Tensor? linear_bias=None, "
      "Tensor? weight=None, int ignore_index=-100, int reduction=1, float label_smoothing=0.0, "
      "float lse_square_scale=0.0, float? softcap=None, int chunk_size=0, ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "linear_cross_entropy_forward(Tensor input, Tensor linear_weight, Tensor target, Tensor? linear_bias, "
      "Tensor? weight, int ignore_index, int reduction, float label_smoothing, float lse_square_scale, "
      "float? softcap, int chunk_size, ScalarType? out_dtype, bool[3] grad_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_cross_entropy_backward(Tensor grad, Tensor input, Tensor linear_weight, Tensor target, "
      "Tensor? linear_bias, Tensor? weight, Tensor lse, Tensor stats, Tensor target_mass, int ignore_index, "
      "int reduction, float label_smoothing, float lse_square_scale, float? softcap, int chunk_size, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // torch's reference path: linear (a K-dimensional linear_weight (V, d1, ..., dK, D)
  // included), then the cross_entropy composite.
  m.def(
      "linear_cross_entropy_composite(Tensor input, Tensor linear_weight, Tensor target, Tensor? linear_bias=None, "
      "Tensor? weight=None, int ignore_index=-100, int reduction=1, float label_smoothing=0.0, "
      "float lse_square_scale=0.0, float? softcap=None, int chunk_size=0, ScalarType? out_dtype=None) -> Tensor");
}

// The ops that run below a loss's autograd (its saved-state forward, its
// backward, the local passes around vocabulary parallelism's collectives) are
// not differentiable themselves: autograd passes straight through to their
// kernels. Without this, every call would take torch's boxed "autograd not
// implemented" fallback, which costs more than a small loss. (The in-place
// backward keeps that fallback: it bumps the logits' version counter.)
TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) {
  for (const char* name :
       {"bce_with_logits_backward", "cross_entropy_backward", "cross_entropy_forward", "distill_backward",
        "distill_forward", "hinge_backward", "hinge_embedding_backward", "linear_cross_entropy_backward",
        "linear_cross_entropy_forward", "mse_backward", "mse_forward", "multi_margin_backward",
        "multilabel_soft_margin_backward", "sigmoid_focal_backward", "soft_margin_backward",
        "vocab_parallel_ce_backward", "vocab_parallel_ce_finalize", "vocab_parallel_ce_local",
        "vocab_parallel_ce_rebase", "vocab_parallel_linear_ce_backward", "vocab_parallel_linear_ce_local"}) {
    m.impl(name, torch::CppFunction::makeFallthrough());
  }
}

namespace fusedloss {
PyObject* make_calls_module();  // python_calls.cpp
}  // namespace fusedloss

namespace {

PyObject* empty_cpu_cache(PyObject*, PyObject*) {
  fusedloss::empty_cpu_cache();
  Py_RETURN_NONE;
}

PyObject* cpu_cache_bytes(PyObject*, PyObject*) { return PyLong_FromLongLong(fusedloss::cpu_cache_bytes()); }

PyObject* clamp_grad_at_bound(PyObject*, PyObject*) {
  bool at_bound = false;
  std::string error;
  // The probe runs the autograd engine, which must not hold the GIL.
  Py_BEGIN_ALLOW_THREADS;
  try {
    at_bound = fusedloss::probe_clamp_grad_at_bound();
  } catch (const std::exception& e) {
    error = e.what();
  }
  Py_END_ALLOW_THREADS;
  if (!error.empty()) {
    PyErr_SetString(PyExc_RuntimeError, error.c_str());
    return nullptr;
  }
  return PyBool_FromLong(at_bound);
}

PyMethodDef methods[] = {
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS, "Return the cached CPU output buffers to the system."},
    {"cpu_cache_bytes", cpu_cache_bytes, METH_NOARGS, "Bytes held by the CPU output buffer cache."},
    {"clamp_grad_at_bound", clamp_grad_at_bound, METH_NOARGS,
     "Whether the installed torch's clamp passes its gradient at the bound (probed once)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// A plain Python module whose import loads the library above. It carries the
// build's identity, which fusedloss checks against the running torch, the CPU
// buffer cache's controls (not ops: they take no tensors), and `calls`, the
// eager entry points of the loss ops (python_calls.cpp).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "fusedloss operators (torch.ops.fusedloss)", -1,
                            methods};
  PyObject* mod = PyModule_Create(&def);
  if (mod == nullptr) return nullptr;
  PyModule_AddStringConstant(mod, "torch_version", FUSEDLOSS_TORCH_VERSION);
  PyObject* calls = fusedloss::make_calls_module();
  if (calls == nullptr || PyModule_AddObject(mod, "calls", calls) < 0) {
    Py_XDECREF(calls);
    Py_DECREF(mod);
    return nullptr;
  }
#ifdef FUSEDLOSS_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  return mod;
}
