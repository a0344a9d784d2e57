// The fusedloss operator library: every schema, in one place. CPU and CUDA
// kernels register their implementations from csrc/cpu and csrc/cuda with
// TORCH_LIBRARY_IMPL, so the dispatcher picks the device; fake (meta) kernels
// for torch.compile live in fusedloss/_ops.py.
//
// Reductions are at::Reduction codes: 0 none, 1 mean, 2 sum. Backward ops take
// an output_mask and return an empty tensor for every gradient not asked for.

#include <Python.h>
#include <torch/library.h>

#include <fusedloss/outputs.h>

#ifndef FUSEDLOSS_TORCH_VERSION
#error "setup.py defines FUSEDLOSS_TORCH_VERSION: build with pip install --no-build-isolation ."
#endif

TORCH_LIBRARY(fusedloss, m) {
  // binary_cross_entropy_with_logits
  m.def("bce_with_logits(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, int reduction) -> Tensor");
  m.def(
      "bce_with_logits_backward(Tensor grad, Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
      "int reduction, bool[2] output_mask) -> (Tensor, Tensor)");
  // mse_loss; the second output is sum(weight) for a weighted mean, else empty
  m.def("mse(Tensor input, Tensor target, Tensor? weight, int reduction) -> (Tensor, Tensor)");
  m.def(
      "mse_backward(Tensor grad, Tensor input, Tensor target, Tensor? weight, Tensor? loss, Tensor? denominator, "
      "int reduction, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // The margin family. Pair losses take input and target of one shape and dtype.
  // grad_at_kink: whether the clamp passes its gradient where its argument is
  // exactly 0 (torch's clamp changed this in 2.14; fusedloss follows the
  // installed torch).
  m.def("hinge_embedding(Tensor input, Tensor target, float margin, int reduction) -> Tensor");
  m.def(
      "hinge_embedding_backward(Tensor grad, Tensor input, Tensor target, float margin, int reduction, "
      "bool grad_at_kink) -> Tensor");
  m.def("soft_margin(Tensor input, Tensor target, int reduction) -> Tensor");
  m.def("soft_margin_backward(Tensor grad, Tensor input, Tensor target, int reduction) -> Tensor");
  m.def("hinge(Tensor input, Tensor target, float margin, bool squared, int reduction) -> Tensor");
  m.def(
      "hinge_backward(Tensor grad, Tensor input, Tensor target, float margin, bool squared, int reduction, "
      "bool grad_at_kink, bool[2] output_mask) -> (Tensor, Tensor)");
  // multi_margin_loss on (N, C) or (C) input with int64 class indices.
  m.def("multi_margin(Tensor input, Tensor target, int p, float margin, Tensor? weight, int reduction) -> Tensor");
  m.def(
      "multi_margin_backward(Tensor grad, Tensor input, Tensor target, int p, float margin, Tensor? weight, "
      "int reduction) -> Tensor");
  // cross_entropy (softmax + NLL) with class-index (int64) or probability targets.
  // Returns (loss, lse, stats, target_mass): lse = per row (max, log sum exp(x - max)),
  // stats = [denominator of the mean, sum(weight)], target_mass = sum_c w_c p'_c
  // per row for probability targets (empty otherwise). The backward reads them.
  m.def(
      "cross_entropy(Tensor input, Tensor target, Tensor? weight, int ignore_index, int reduction, "
      "float label_smoothing, float lse_square_scale, float? softcap) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cross_entropy_backward(Tensor grad, Tensor input, Tensor target, Tensor? weight, Tensor lse, Tensor stats, "
      "Tensor target_mass, int ignore_index, int reduction, float label_smoothing, float lse_square_scale, "
      "float? softcap, bool[2] output_mask) -> (Tensor, Tensor)");
  // The same gradient of the logits, written over the logits.
  m.def(
      "cross_entropy_backward_inplace(Tensor grad, Tensor(a!) input, Tensor target, Tensor? weight, Tensor lse, "
      "Tensor stats, Tensor target_mass, int ignore_index, int reduction, float label_smoothing, "
      "float lse_square_scale, float? softcap) -> ()");
}

namespace {

PyObject* empty_cpu_cache(PyObject*, PyObject*) {
  fusedloss::empty_cpu_cache();
  Py_RETURN_NONE;
}

PyObject* cpu_cache_bytes(PyObject*, PyObject*) { return PyLong_FromLongLong(fusedloss::cpu_cache_bytes()); }

PyMethodDef methods[] = {
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS, "Return the cached CPU output buffers to the system."},
    {"cpu_cache_bytes", cpu_cache_bytes, METH_NOARGS, "Bytes held by the CPU output buffer cache."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// A plain Python module whose import loads the library above. It carries the
// build's identity, which fusedloss checks against the running torch, and the
// CPU buffer cache's controls (not ops: they take no tensors).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "fusedloss operators (torch.ops.fusedloss)", -1,
                            methods};
  PyObject* mod = PyModule_Create(&def);
  if (mod == nullptr) return nullptr;
  PyModule_AddStringConstant(mod, "torch_version", FUSEDLOSS_TORCH_VERSION);
#ifdef FUSEDLOSS_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  return mod;
}
