// The autograd of every fusedloss loss, defined once, in C++, and registered as
// the loss op's Autograd kernel: the path torch's own losses take. A call from
// Python is one op call (no autograd.Function in Python, no Python in the
// backward), which is what keeps small losses as cheap as torch's.
//
// Each loss is one block: a struct written as a torch C++ Function (forward
// and backward on a context) whose forward runs the fused forward op and saves
// its inputs (and O(N) state), and whose backward runs the fused backward op,
// or, under create_graph=True, differentiates the composite
// (fusedloss/composite.h) so that higher derivatives are exact; and an entry
// point that sends forward-mode AD (which the node does not carry) and
// torch's not-differentiable arguments the way torch does. apply_loss builds
// the node (LossNode, on a LossCtx): a plain autograd Node like torch's own
// losses', with compiled-autograd support.
//
// Also here: the CompositeExplicitAutograd kernels of the losses whose forward
// op returns saved state (mse, cross_entropy), and the Autocast kernels of the
// losses torch runs in fp32 under autocast: they leave fp16/bf16 inputs as they
// are (the kernels widen in registers) and ask for an fp32 loss.

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/autograd/variable_info.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <fusedloss/composite.h>
#include <fusedloss/numerics.h>
#include <fusedloss/op_signatures.h>

#include <array>
#include <cstring>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace fusedloss {
namespace {

using at::Tensor;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;
using OptDtype = std::optional<at::ScalarType>;

// The typed handle of op fusedloss::<name>, looked up once per call site.
#define FUSEDLOSS_OP(name, Sig)                                                                          \
  ([]() -> const c10::TypedOperatorHandle<Sig>& {                                                        \
    static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("fusedloss::" name, "").typed<Sig>(); \
    return handle;                                                                                       \
  }())

Tensor value_or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// Probability targets have the logits' shape. Symbolic sizes (torch.compile
// with dynamic shapes) are compared without specializing them.
bool same_shape(const Tensor& a, const Tensor& b) { return a.sym_sizes() == b.sym_sizes(); }

bool has_fw_grad(const Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
bool has_fw_grad(const OptTensor& t) { return t.has_value() && has_fw_grad(*t); }

// Whether a call builds a graph: grad mode on and an operand that requires
// grad. Without one, torch::autograd::Function::apply would still make a node
// and a context for nothing; the entry points below run the op below autograd
// instead (a few microseconds a call: eval loops, frozen inputs).
bool graph_needed(std::initializer_list<const Tensor*> operands) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : operands) {
    if (t != nullptr && t->defined() && t->requires_grad()) return true;
  }
  return false;
}

// Tensors on different devices (a meta target next to CPU logits would
// otherwise send the call to the meta kernel): refused, so that
// fusedloss.functional's fallback raises torch's own error.
void check_same_device(const Tensor& input, std::initializer_list<const Tensor*> others) {
  for (const Tensor* t : others) {
    TORCH_CHECK(t == nullptr || !t->defined() || t->device() == input.device(),
                "fusedloss: expected all tensors on one device, got ", input.device(), " and ", t->device());
  }
}

const Tensor* ptr(const OptTensor& t) { return t.has_value() ? &*t : nullptr; }

// torch's refusal for arguments it has no derivative for (weight, pos_weight).
void check_no_requires_grad(const OptTensor& t, const char* name, const char* fn) {
  TORCH_CHECK(!(t.has_value() && t->defined() && t->requires_grad() && at::GradMode::is_enabled()),
              "The function '", fn, "' is not differentiable with respect to argument '", name,
              "'. This input cannot have requires_grad True.");
}

// Where torch.clamp passes its gradient at its bound (torch < 2.14: yes;
// 2.14: no). The hinge losses follow the installed torch; fusedloss probes it
// once at import (fusedloss/_ops.py calls this through the extension).
bool clamp_grad_at_bound() {
  static const bool at_bound = [] {
    at::AutoGradMode enable(true);
    const Tensor x = at::zeros({1}).requires_grad_();
    const auto g = torch::autograd::grad({at::clamp_min(x, 0).sum()}, {x});
    return g[0].item<float>() != 0.0f;
  }();
  return at_bound;
}

// Gradients of `loss` (the composite, built from the saved inputs under grad
// mode) as a differentiable graph: the create_graph=True path.
variable_list composite_grads(const Tensor& loss, const std::vector<Tensor>& inputs, const std::vector<bool>& needs,
                              const Tensor& grad) {
  variable_list wanted;
  for (size_t i = 0; i < inputs.size(); ++i)
    if (needs[i]) wanted.push_back(inputs[i]);
  variable_list out(inputs.size());
  if (wanted.empty()) return out;
  const auto gs = torch::autograd::grad({loss}, wanted, {grad}, /*retain_graph=*/true, /*create_graph=*/true,
                                        /*allow_unused=*/true);
  size_t k = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!needs[i]) continue;
    out[i] = gs[k].defined() ? gs[k] : at::zeros_like(inputs[i]);
    ++k;
  }
  return out;
}

// A backward's result: one entry per forward argument, gradients first.
variable_list grads_then_none(variable_list grads, size_t n_args) {
  grads.resize(n_args);
  return grads;
}

// What a loss's forward keeps for its backward. It offers the part of
// torch::autograd::AutogradContext the losses use, under the same names
// (save_for_backward, saved_data, get_saved_variables, needs_input_grad), so
// that each loss reads as a torch C++ Function; it costs less to fill and to
// free: a loss's few scalars sit in a fixed array searched by name, where an
// AutogradContext keeps a hash map and two hash sets, and the node below has
// none of CppNode's per-call vectors. At (64, 10) that bookkeeping cost more
// than the loss's math.
class LossCtx {
 public:
  // Scalar arguments by name (string literals, at most kMax per loss).
  class Scalars {
   public:
    c10::IValue& operator[](const char* key) {
      for (size_t i = 0; i < size_; ++i) {
        if (std::strcmp(keys_[i], key) == 0) return values_[i];
      }
      TORCH_CHECK(size_ < kMax, "fusedloss internal error: a loss saved more than ", kMax,
                  " scalars, or its backward read one it did not save (", key, ")");
      keys_[size_] = key;
      return values_[size_++];
    }
    size_t size() const { return size_; }
    const char* key(size_t i) const { return keys_[i]; }
    c10::IValue& value(size_t i) { return values_[i]; }
    const c10::IValue& value(size_t i) const { return values_[i]; }

   private:
    static constexpr size_t kMax = 8;
    std::array<const char*, kMax> keys_{};
    std::array<c10::IValue, kMax> values_{};
    size_t size_ = 0;
  };

  void save_for_backward(variable_list vars) { to_save_ = std::move(vars); }

  // The saved tensors. A node's saved variables, unpacked (raising torch's
  // error once a backward has freed them), or the tensors compiled autograd
  // passed to the node's functional form.
  variable_list get_saved_variables() const {
    if (node_ == nullptr) return to_save_;
    variable_list out;
    out.reserve(saved_.size());
    const auto self = c10::intrusive_ptr<torch::autograd::Node>::unsafe_reclaim_from_nonowning(node_);
    for (const auto& v : saved_) out.push_back(v.unpack(self));
    return out;
  }

  // Whether the gradient of the i-th tensor argument (counting defined
  // tensors only, as AutogradContext does) is wanted.
  bool needs_input_grad(size_t i) const {
    if (node_ != nullptr) return node_->task_should_compute_output(i);
    return i < needs_.size() && needs_[i];
  }

  Scalars saved_data;

  // Binds the context to its node once the forward ran: the tensors it
  // listed become saved variables. A saved output (mse keeps its loss) holds
  // its node weakly, as in torch.
  void attach(torch::autograd::Node* node, const Tensor& out) {
    node_ = node;
    saved_.reserve(to_save_.size());
    for (const auto& v : to_save_) {
      if (v.defined()) {
        saved_.emplace_back(v, /*is_output=*/v.is_same(out));
      } else {
        saved_.emplace_back();
      }
    }
    to_save_.clear();
  }

 private:
  template <class F>
  friend struct LossNode;

  variable_list to_save_;                                // the forward's list; the functional's tensors
  std::vector<torch::autograd::SavedVariable> saved_;   // a node's
  torch::autograd::Node* node_ = nullptr;               // the node, when there is one
  std::vector<bool> needs_;                             // the functional's needs_input_grad
};

// Which of a forward's arguments are tensors with an edge: a Tensor, or an
// optional one holding a defined tensor (the count of torch's extract_vars,
// kept here as a bit mask rather than its per-call std::vector<bool>).
inline void note_var(uint32_t& mask, size_t& i, variable_list& vars, const Tensor& t) {
  mask |= 1u << i++;
  vars.push_back(t);
}
inline void note_var(uint32_t& mask, size_t& i, variable_list& vars, const OptTensor& t) {
  if (t.has_value() && t->defined()) {
    mask |= 1u << i;
    vars.push_back(*t);
  }
  ++i;
}
template <class T>
void note_var(uint32_t& /*mask*/, size_t& i, variable_list& /*vars*/, const T& /*not a tensor*/) {
  ++i;
}

// The node of a loss's backward. Everything the engine, hooks, anomaly mode
// and saved-tensor hooks see is a torch::autograd::Node's; for compiled
// autograd it declares its saved state (compiled_args) and runs its backward
// as a functional through the compiler's interface (apply_with_saved), as a
// CppNode does.
template <class F>
struct LossNode final : torch::autograd::Node {
  LossCtx ctx_;
  torch::autograd::VariableInfo output_info_;
  uint32_t var_mask_ = 0;  // bit i: forward argument i has an edge
  size_t n_args_ = 0;

  std::string name() const override { return F::kNodeName; }

  variable_list apply(variable_list&& grads) override {
    // One backward at a time (the engine may run a graph from several
    // threads); a loss's backward may scale saved buffers in place.
    std::lock_guard<std::mutex> lock(mutex_);
    return run(ctx_, std::move(grads), output_info_, var_mask_, n_args_);
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& v : ctx_.saved_) v.reset_data();
  }

  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(std::string(F::kNodeName));
    args.collect_size(ctx_.saved_data.size());
    for (size_t i = 0; i < ctx_.saved_data.size(); ++i) {
      args.collect(std::string(ctx_.saved_data.key(i)));
      args.collect(ctx_.saved_data.value(i));
    }
    args.collect(ctx_.saved_, /*is_output=*/true);
    args.collect(output_info_);
    args.collect(var_mask_);
    args.collect(static_cast<uint64_t>(n_args_));
  }

  variable_list apply_with_saved(const variable_list& inputs,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    for (size_t i = 0; i < ctx_.saved_data.size(); ++i) saved.before(ctx_.saved_data.value(i));
    saved.before(ctx_.saved_);
    saved.before(output_info_);

    torch::dynamo::autograd::PackedArgs packed;
    std::vector<std::string> keys;
    for (size_t i = 0; i < ctx_.saved_data.size(); ++i) keys.emplace_back(ctx_.saved_data.key(i));
    packed.pack(keys);
    for (size_t i = 0; i < ctx_.saved_data.size(); ++i) packed.pack(ctx_.saved_data.value(i));
    packed.pack(ctx_.get_saved_variables());
    std::vector<bool> needs;
    for (size_t i = 0; i < next_edges().size(); ++i) needs.push_back(task_should_compute_output(i));
    packed.pack(needs);
    packed.pack(std::vector<torch::autograd::VariableInfo>{output_info_});
    packed.pack(static_cast<int64_t>(var_mask_));
    packed.pack(static_cast<int64_t>(n_args_));
    const auto args = std::move(packed).vec();

    std::vector<at::TypePtr> schema;
    schema.reserve(args.size());
    for (const auto& a : args) schema.emplace_back(a.isTensor() ? at::TensorType::get() : a.type());
    const auto& py = torch::dynamo::autograd::getPyCompilerInterface();
    static_assert(std::string_view(F::kNodeName).find("::") != std::string_view::npos);
    std::string fn_name = F::kNodeName;
    fn_name.replace(fn_name.find("::"), 2, "_");  // a Python identifier
    const auto bound = py->bind_function(saved.get_py_compiler(), fn_name, functional, schema,
                                         /*is_custom_function=*/true, /*is_traceable=*/false);
    const auto output_metadata =
        torch::dynamo::autograd::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
            torch::dynamo::autograd::get_input_metadata(next_edges()));
    auto results = py->call_function(saved.get_py_compiler(), "apply_functional", bound, inputs, args,
                                     output_metadata);

    for (size_t i = 0; i < ctx_.saved_data.size(); ++i) saved.after(ctx_.saved_data.value(i));
    saved.after(ctx_.saved_);
    saved.after(output_info_);
    return results;
  }

 private:
  // The backward on a context: an undefined incoming gradient becomes zeros
  // of the loss's shape (a Function's default), and the result keeps the
  // gradients of arguments with an edge.
  static variable_list run(LossCtx& ctx, variable_list&& grads, const torch::autograd::VariableInfo& output_info,
                           uint32_t var_mask, size_t n_args) {
    at::OptionalDeviceGuard device_guard;
    if (!grads[0].defined()) grads[0] = output_info.zeros(device_guard);
    variable_list all = F::backward(&ctx, std::move(grads));
    TORCH_CHECK(all.size() == n_args, "fusedloss internal error: ", F::kNodeName, " returned ", all.size(),
                " gradients for ", n_args, " arguments");
    size_t edges = 0;  // compacted in place
    for (size_t i = 0; i < n_args; ++i) {
      if (var_mask & (1u << i)) {
        if (edges != i) all[edges] = std::move(all[i]);
        ++edges;
      } else {
        TORCH_CHECK(!all[i].defined(), "fusedloss internal error: ", F::kNodeName,
                    " returned a gradient for argument ", i, ", which is not a tensor");
      }
    }
    all.resize(edges);
    return all;
  }

  // The backward as compiled autograd calls it: the state apply_with_saved
  // packed, in its order.
  static variable_list functional(const variable_list& inputs, const std::vector<c10::IValue>& args) {
    torch::dynamo::autograd::PackedArgs packed(args);
    const auto keys = packed.unpack<std::vector<std::string>>();  // outlives ctx, which points into it
    LossCtx ctx;
    for (const auto& k : keys) ctx.saved_data[k.c_str()] = packed.unpack<c10::IValue>();
    ctx.to_save_ = packed.unpack<variable_list>();
    ctx.needs_ = packed.unpack<std::vector<bool>>();
    const auto output_info = packed.unpack<std::vector<torch::autograd::VariableInfo>>();
    const auto var_mask = static_cast<uint32_t>(packed.unpack<int64_t>());
    const auto n_args = static_cast<size_t>(packed.unpack<int64_t>());
    return run(ctx, variable_list(inputs), output_info.at(0), var_mask, n_args);
  }
};

// A loss's graph-building call: the forward below autograd, then one node
// with an edge to each tensor argument, the forward's saved state, the
// output's metadata, and node creation hooks fired once it is complete. What
// torch::autograd::Function::apply does for a function with one new floating
// output that marks nothing (every loss's forward); its general wrapping of
// outputs that are inputs or views, dirty or non-differentiable tensors, does
// not apply, and forward-mode AD goes to the composite in each entry point (a
// tangent on any other argument has no effect here, as in torch, or the entry
// point raises torch's error first).
template <class F, class... Args>
Tensor apply_loss(Args&&... args) {
  if (const auto& functorch_tls = at::functorch::functorchTLSAccessor()) {
    functorch_tls->checkSupportsCppAutogradFunction();
  }
  static_assert(sizeof...(Args) <= 32, "var_mask_ has a bit per argument");
  auto node = c10::make_intrusive<LossNode<F>>();
  variable_list input_vars;
  input_vars.reserve(sizeof...(Args));
  size_t i = 0;
  (note_var(node->var_mask_, i, input_vars, args), ...);
  node->n_args_ = sizeof...(Args);
  const bool executable = at::GradMode::is_enabled() && torch::autograd::any_variable_requires_grad(input_vars);
  if (executable) node->set_next_edges(torch::autograd::collect_next_edges(input_vars));
  Tensor out;
  {
    at::AutoGradMode no_grad(false);
    out = F::forward(&node->ctx_, std::forward<Args>(args)...);
  }
  if (!executable) return out;
  for (const auto& v : input_vars) {
    TORCH_CHECK(!v.is_same(out), "fusedloss internal error: ", F::kNodeName, "'s forward returned one of its inputs");
  }
  torch::autograd::set_history(out, node);
  node->output_info_ = torch::autograd::VariableInfo(out);
  node->ctx_.attach(node.get(), out);
  torch::autograd::fire_node_creation_hooks(node);
  return out;
}

// ---------------------------------------------------------------------------
// binary_cross_entropy_with_logits: gradients for input and target.
struct BceWithLogits {
  static constexpr const char* kNodeName = "fusedloss::BinaryCrossEntropyWithLogitsBackward";

  static Tensor forward(LossCtx* ctx, const Tensor& input, const Tensor& target, const OptTensor& weight,
                        const OptTensor& pos_weight, int64_t reduction, OptDtype out_dtype) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({input, target, value_or_undefined(weight), value_or_undefined(pos_weight)});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["out_dtype"] = out_dtype;
    return FUSEDLOSS_OP("bce_with_logits", sig::Bce).call(input, target, weight, pos_weight, reduction, out_dtype);
  }

  static variable_list backward(LossCtx* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const std::vector<bool> needs{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    if (!grads[0].defined()) return variable_list(6);
    if (at::GradMode::is_enabled()) {
      const Tensor loss = composite::bce_with_logits(s[0], s[1], s[2], s[3], reduction,
                                                     ctx->saved_data["out_dtype"].toOptional<at::ScalarType>());
      return grads_then_none(composite_grads(loss, {s[0], s[1]}, needs, grads[0]), 6);
    }
    using Sig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                           const OptTensor&, int64_t, std::array<bool, 2>);
    auto [gx, gy] = FUSEDLOSS_OP("bce_with_logits_backward", Sig)
                        .call(grads[0], s[0], s[1], s[2], s[3], reduction, {needs[0], needs[1]});
    return grads_then_none({needs[0] ? gx : Tensor(), needs[1] ? gy : Tensor()}, 6);
  }
};

Tensor bce_with_logits(const Tensor& input, const Tensor& target, const OptTensor& weight, const OptTensor& pos_weight,
                       int64_t reduction, OptDtype out_dtype) {
  check_same_device(input, {&target, ptr(weight), ptr(pos_weight)});
  check_no_requires_grad(weight, "weight", "binary_cross_entropy_with_logits");
  check_no_requires_grad(pos_weight, "pos_weight", "binary_cross_entropy_with_logits");
  if (has_fw_grad(input) || has_fw_grad(target)) {
    return composite::bce_with_logits(input, target, weight, pos_weight, reduction, out_dtype);
  }
  if (!graph_needed({&input, &target})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return FUSEDLOSS_OP("bce_with_logits", sig::Bce).call(input, target, weight, pos_weight, reduction, out_dtype);
  }
  return apply_loss<BceWithLogits>(input, target, weight, pos_weight, reduction, out_dtype);
}

// ---------------------------------------------------------------------------
// mse_loss: gradients for input, target and weight.
using MseForwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, int64_t, OptDtype);

struct Mse {
  static constexpr const char* kNodeName = "fusedloss::MseLossBackward";

  static Tensor forward(LossCtx* ctx, const Tensor& input, const Tensor& target, const OptTensor& weight,
                        int64_t reduction, OptDtype out_dtype) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, denominator] = FUSEDLOSS_OP("mse_forward", MseForwardSig).call(input, target, weight, reduction, out_dtype);
    // A weighted mean's backward needs the loss and sum(weight).
    const bool weighted_mean = weight.has_value() && weight->defined() && reduction == kReductionMean;
    ctx->save_for_backward({input, target, value_or_undefined(weight), weighted_mean ? loss : Tensor(),
                            weighted_mean ? denominator : Tensor()});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["out_dtype"] = out_dtype;
    return loss;
  }

  static variable_list backward(LossCtx* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    // needs_input_grad counts tensor arguments only: the weight's is the third
    // when there is one.
    const std::vector<bool> needs{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                  s[2].defined() && ctx->needs_input_grad(2)};
    if (!grads[0].defined()) return variable_list(5);
    if (at::GradMode::is_enabled()) {
      const Tensor loss = composite::mse(s[0], s[1], s[2], reduction, ctx->saved_data["out_dtype"].toOptional<at::ScalarType>());
      return grads_then_none(composite_grads(loss, {s[0], s[1], s[2]}, needs, grads[0]), 5);
    }
    using Sig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                   const OptTensor&, const OptTensor&, int64_t, std::array<bool, 3>);
    auto [gx, gy, gw] = FUSEDLOSS_OP("mse_backward", Sig)
                            .call(grads[0], s[0], s[1], s[2], s[3], s[4], reduction, {needs[0], needs[1], needs[2]});
    return grads_then_none({needs[0] ? gx : Tensor(), needs[1] ? gy : Tensor(), needs[2] ? gw : Tensor()}, 5);
  }
};

// Defined below, with the no-grad kernels of the losses whose forward op
// returns saved state.
Tensor mse_no_grad(const Tensor& input, const Tensor& target, const OptTensor& weight, int64_t reduction,
                   OptDtype out_dtype);
Tensor cross_entropy_no_grad(const Tensor& input, const Tensor& target, const OptTensor& weight, int64_t ignore_index,
                             int64_t reduction, double label_smoothing, double lse_square_scale,
                             std::optional<double> softcap, bool inplace_backward, OptDtype out_dtype);

Tensor mse(const Tensor& input, const Tensor& target, const OptTensor& weight, int64_t reduction, OptDtype out_dtype) {
  check_same_device(input, {&target, ptr(weight)});
  if (has_fw_grad(input) || has_fw_grad(target) || has_fw_grad(weight)) {
    return composite::mse(input, target, weight, reduction, out_dtype);
  }
  if (!graph_needed({&input, &target, ptr(weight)})) return mse_no_grad(input, target, weight, reduction, out_dtype);
  return apply_loss<Mse>(input, target, weight, reduction, out_dtype);
}

// ---------------------------------------------------------------------------
// hinge_embedding_loss: the target only selects terms, so it gets no gradient
// (as in torch).
struct HingeEmbedding {
  static constexpr const char* kNodeName = "fusedloss::HingeEmbeddingLossBackward";

  static Tensor forward(LossCtx* ctx, const Tensor& input, const Tensor& target, double margin,
                        int64_t reduction, OptDtype out_dtype) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({input, target});
    ctx->saved_data["margin"] = margin;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["out_dtype"] = out_dtype;
    return FUSEDLOSS_OP("hinge_embedding", sig::HingeEmbedding).call(input, target, margin, reduction, out_dtype);
  }

  static variable_list backward(LossCtx* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const double margin = ctx->saved_data["margin"].toDouble();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return variable_list(5);
    if (at::GradMode::is_enabled()) {
      const Tensor loss = composite::hinge_embedding(s[0], s[1], margin, reduction,
                                                     ctx->saved_data["out_dtype"].toOptional<at::ScalarType>());
      return grads_then_none(composite_grads(loss, {s[0]}, {true}, grads[0]), 5);
    }
    using Sig = Tensor(const Tensor&, const Tensor&, const Tensor&, double, int64_t, bool);
    return grads_then_none({FUSEDLOSS_OP("hinge_embedding_backward", Sig)
                                .call(grads[0], s[0], s[1], margin, reduction, clamp_grad_at_bound())},
                           5);
  }
};

Tensor hinge_embedding(const Tensor& input, const Tensor& target, double margin, int64_t reduction,
                       OptDtype out_dtype) {
  check_same_device(input, {&target});
  if (has_fw_grad(input)) return composite::hinge_embedding(input, target, margin, reduction, out_dtype);
  // The target is not differentiated: keep it out of the graph.
  if (!graph_needed({&input})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return FUSEDLOSS_OP("hinge_embedding", sig::HingeEmbedding).call(input, target, margin, reduction, out_dtype);
  }
  return apply_loss<HingeEmbedding>(input, target.detach(), margin, reduction, out_dtype);
}

// ---------------------------------------------------------------------------
// soft_margin_loss: torch has no derivative for the target.
struct SoftMargin {
  static constexpr const char* kNodeName = "fusedloss::SoftMarginLossBackward";

  static Tensor forward(LossCtx* ctx, const Tensor& input, const Tensor& target, int64_t reduction,
                        OptDtype out_dtype) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({input, target});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["out_dtype"] = out_dtype;
    return FUSEDLOSS_OP("soft_margin", sig::SoftMargin).call(input, target, reduction, out_dtype);
  }

  static variable_list backward(LossCtx* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return variable_list(4);
    if (at::GradMode::is_enabled()) {
      const Tensor loss =
          composite::soft_margin(s[0], s[1], reduction, ctx->saved_data["out_dtype"].toOptional<at::ScalarType>());
      return grads_then_none(composite_grads(loss, {s[0]}, {true}, grads[0]), 4);
    }
    using Sig = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t);
    return grads_then_none({FUSEDLOSS_OP("soft_margin_backward", Sig).call(grads[0], s[0], s[1], reduction)}, 4);
  }
};

Tensor soft_margin(const Tensor& input, const Tensor& target, int64_t reduction, OptDtype out_dtype) {
  check_same_device(input, {&target});
  check_no_requires_grad(target, "target", "soft_margin_loss");
  if (has_fw_grad(input)) return composite::soft_margin(input, target, reduction, out_dtype);
  if (!graph_needed({&input})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return FUSEDLOSS_OP("soft_margin", sig::SoftMargin).call(input, target, reduction, out_dtype);
  }
  return apply_loss<SoftMargin>(input, target, reduction, out_dtype);
}

// ---------------------------------------------------------------------------
// The binary (SVM) hinge: gradients for input and target.
struct Hinge {
  static constexpr const char* kNodeName = "fusedloss::HingeLossBackward";

  static Tensor forward(LossCtx* ctx, const Tensor& input, const Tensor& target, double margin, bool squared,
                        int64_t reduction, OptDtype out_dtype) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({input, target});
    ctx->saved_data["margin"] = margin;
    ctx->saved_data["squared"] = squared;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["out_dtype"] = out_dtype;
    return FUSEDLOSS_OP("hinge", sig::Hinge).call(input, target, margin, squared, reduction, out_dtype);
  }

  static variable_list backward(LossCtx* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const double margin = ctx->saved_data["margin"].toDouble();
    const bool squared = ctx->saved_data["squared"].toBool();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const std::vector<bool> needs{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    if (!grads[0].defined()) return variable_list(6);
    if (at::GradMode::is_enabled()) {
      const Tensor loss = composite::hinge(s[0], s[1], margin, squared, reduction,
                                           ctx->saved_data["out_dtype"].toOptional<at::ScalarType>());
      return grads_then_none(composite_grads(loss, {s[0], s[1]}, needs, grads[0]), 6);
    }
    using Sig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double, bool, int64_t, bool,
                                           std::array<bool, 2>);
    auto [gx, gy] = FUSEDLOSS_OP("hinge_backward", Sig)
                        .call(grads[0], s[0], s[1], margin, squared, reduction, clamp_grad_at_bound(),
                              {needs[0], needs[1]});
    return grads_then_none({needs[0] ? gx : Tensor(), needs[1] ? gy : Tensor()}, 6);
  }
};

Tensor hinge(const Tensor& input, const Tensor& target, double margin, bool squared, int64_t reduction,
             OptDtype out_dtype) {
  check_same_device(input, {&target});
  if (has_fw_grad(input) || has_fw_grad(target)) {
    return composite::hinge(input, target, margin, squared, reduction, out_dtype);
  }
  if (!graph_needed({&input, &target})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return FUSEDLOSS_OP("hinge", sig::Hinge).call(input, target, margin, squared, reduction, out_dtype);
  }
  return apply_loss<Hinge>(input, target, margin, squared, reduction, out_dtype);
}

// ---------------------------------------------------------------------------
// multi_margin_loss: a gradient for the input only; second derivatives (which
// torch lacks) come from the composite.
struct MultiMargin {
  static constexpr const char* kNodeName = "fusedloss::MultiMarginLossBackward";

  static Tensor forward(LossCtx* ctx, const Tensor& input, const Tensor& target, int64_t p, double margin,
                        const OptTensor& weight, int64_t reduction, OptDtype out_dtype) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({input, target, value_or_undefined(weight)});
    ctx->saved_data["p"] = p;
    ctx->saved_data["margin"] = margin;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["out_dtype"] = out_dtype;
    return FUSEDLOSS_OP("multi_margin", sig::MultiMargin).call(input, target, p, margin, weight, reduction, out_dtype);
  }

  static variable_list backward(LossCtx* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const int64_t p = ctx->saved_data["p"].toInt();
    const double margin = ctx->saved_data["margin"].toDouble();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return variable_list(7);
    if (at::GradMode::is_enabled()) {
      const Tensor loss = composite::multi_margin(s[0], s[1], p, margin, s[2], reduction,
                                                  ctx->saved_data["out_dtype"].toOptional<at::ScalarType>());
      return grads_then_none(composite_grads(loss, {s[0]}, {true}, grads[0]), 7);
    }
    using Sig = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, double, const OptTensor&, int64_t);
    return grads_then_none(
        {FUSEDLOSS_OP("multi_margin_backward", Sig).call(grads[0], s[0], s[1], p, margin, s[2], reduction)}, 7);
  }
};

Tensor multi_margin(const Tensor& input, const Tensor& target, int64_t p, double margin, const OptTensor& weight,
                    int64_t reduction, OptDtype out_dtype) {
  check_same_device(input, {&target, ptr(weight)});
  check_no_requires_grad(weight, "weight", "multi_margin_loss");
  // torch has no forward AD for this loss; fusedloss has it for the input
  // (through the composite), and refuses a weight's tangent as torch does.
  TORCH_CHECK_NOT_IMPLEMENTED(!has_fw_grad(weight),
                              "Trying to use forward AD with multi_margin_loss that does not support it because it has "
                              "not been implemented yet.\nPlease file an issue to PyTorch at "
                              "https://github.com/pytorch/pytorch/issues/new?template=feature-request.yml so that we can "
                              "prioritize its implementation or submit a PR adding the implementation to "
                              "derivatives.yaml");
  if (has_fw_grad(input)) return composite::multi_margin(input, target, p, margin, weight, reduction, out_dtype);
  if (!graph_needed({&input})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return FUSEDLOSS_OP("multi_margin", sig::MultiMargin).call(input, target, p, margin, weight, reduction, out_dtype);
  }
  return apply_loss<MultiMargin>(input, target, p, margin, weight, reduction, out_dtype);
}

// ---------------------------------------------------------------------------
// cross_entropy: a gradient for the input, and for probability targets. The
// forward saves only the logits, the targets and the O(N) state of
// cross_entropy_forward. With inplace_backward, the logits' gradient is
// written over the logits, whose version counter is then bumped so that any
// other node that saved them refuses to run.
using CeForwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                                int64_t, int64_t, double, double, std::optional<double>,
                                                                OptDtype);

struct CrossEntropy {
  static constexpr const char* kNodeName = "fusedloss::CrossEntropyLossBackward";

  static Tensor forward(LossCtx* ctx, const Tensor& input, const Tensor& target, const OptTensor& weight,
                        int64_t ignore_index, int64_t reduction, double label_smoothing, double lse_square_scale,
                        std::optional<double> softcap, bool inplace_backward, OptDtype out_dtype) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, lse, stats, target_mass] =
        FUSEDLOSS_OP("cross_entropy_forward", CeForwardSig)
            .call(input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
                  out_dtype);
    ctx->save_for_backward({input, target, value_or_undefined(weight), lse, stats, target_mass});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["lse_square_scale"] = lse_square_scale;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["inplace_backward"] = inplace_backward;
    ctx->saved_data["out_dtype"] = out_dtype;
    return loss;
  }

  static variable_list backward(LossCtx* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const Tensor &input = s[0], &target = s[1];
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const double label_smoothing = ctx->saved_data["label_smoothing"].toDouble();
    const double lse_square_scale = ctx->saved_data["lse_square_scale"].toDouble();
    const auto softcap = ctx->saved_data["softcap"].toOptional<double>();
    const bool prob = same_shape(target, input);
    const std::vector<bool> needs{ctx->needs_input_grad(0), ctx->needs_input_grad(1) && prob};
    constexpr size_t kArgs = 10;
    if (!grads[0].defined()) return variable_list(kArgs);
    if (at::GradMode::is_enabled()) {
      const Tensor loss = composite::cross_entropy(input, target, s[2], ignore_index, reduction, label_smoothing,
                                                   lse_square_scale, softcap, false,
                                                   ctx->saved_data["out_dtype"].toOptional<at::ScalarType>());
      return grads_then_none(composite_grads(loss, {input, target}, needs, grads[0]), kArgs);
    }
    if (ctx->saved_data["inplace_backward"].toBool() && needs[0] && !needs[1]) {
      using Sig = void(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
                       const Tensor&, int64_t, int64_t, double, double, std::optional<double>);
      {
        at::AutoDispatchBelowADInplaceOrView below;
        FUSEDLOSS_OP("cross_entropy_backward_inplace", Sig)
            .call(grads[0], input, target, s[2], s[3], s[4], s[5], ignore_index, reduction, label_smoothing,
                  lse_square_scale, softcap);
      }
      // Any other node that saved these logits must now refuse to run.
      torch::autograd::impl::bump_version(input);
      return grads_then_none({input.detach()}, kArgs);
    }
    using Sig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                           const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, double,
                                           double, std::optional<double>, std::array<bool, 2>);
    auto [gx, gt] = FUSEDLOSS_OP("cross_entropy_backward", Sig)
                        .call(grads[0], input, target, s[2], s[3], s[4], s[5], ignore_index, reduction,
                              label_smoothing, lse_square_scale, softcap, {needs[0], needs[1]});
    return grads_then_none({needs[0] ? gx : Tensor(), needs[1] ? gt : Tensor()}, kArgs);
  }
};

// inplace_backward is allowed only where writing the gradient over the logits
// is provably safe: nothing in the logits' view chain is a leaf that requires
// grad (its data would become its own gradient, and its .grad would alias it),
// and the logits do not overlap themselves (checked again by the op itself).
void check_inplace_backward(const Tensor& input) {
  Tensor t = input;
  while (true) {
    TORCH_CHECK_VALUE(!(t.is_leaf() && t.requires_grad()),
                      "inplace_backward: the logits are ", t.is_same(input) ? "" : "a view of ",
                      "a leaf tensor that requires grad, whose data would be overwritten by its own gradient; "
                      "use inplace_backward=True only for logits computed by the model");
    if (!t.is_view()) break;
    t = t._base();
  }
  TORCH_CHECK_VALUE(at::has_internal_overlap(input) == at::MemOverlap::No && input.is_non_overlapping_and_dense(),
                    "inplace_backward: the logits overlap themselves in memory or are not dense (e.g. an expanded "
                    "or strided view), so their gradient cannot be written over them");
}

Tensor cross_entropy(const Tensor& input, const Tensor& target, const OptTensor& weight, int64_t ignore_index,
                     int64_t reduction, double label_smoothing, double lse_square_scale, std::optional<double> softcap,
                     bool inplace_backward, OptDtype out_dtype) {
  check_same_device(input, {&target, ptr(weight)});
  const bool prob = same_shape(target, input);
  const bool weight_rg = weight.has_value() && weight->defined() && weight->requires_grad() && at::GradMode::is_enabled();
  TORCH_CHECK(!(weight_rg && !prob),
              "The function 'nll_loss_forward' is not differentiable with respect to argument 'weight'. "
              "This input cannot have requires_grad True.");
  // torch differentiates the weight of probability targets; the kernels do not.
  if (weight_rg || has_fw_grad(input) || has_fw_grad(target) || has_fw_grad(weight)) {
    return composite::cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale,
                                    softcap, false, out_dtype);
  }
  if (!graph_needed({&input, &target})) {
    return cross_entropy_no_grad(input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale,
                                 softcap, inplace_backward, out_dtype);
  }
  if (inplace_backward && input.requires_grad() && at::GradMode::is_enabled()) check_inplace_backward(input);
  return apply_loss<CrossEntropy>(input, target, weight, ignore_index, reduction, label_smoothing,
                                  lse_square_scale, softcap, inplace_backward, out_dtype);
}

// Below autograd (inference mode, fake tensors), the losses whose forward op
// returns saved state are that op's first output.
Tensor mse_no_grad(const Tensor& input, const Tensor& target, const OptTensor& weight, int64_t reduction,
                   OptDtype out_dtype) {
  return std::get<0>(FUSEDLOSS_OP("mse_forward", MseForwardSig).call(input, target, weight, reduction, out_dtype));
}

Tensor cross_entropy_no_grad(const Tensor& input, const Tensor& target, const OptTensor& weight, int64_t ignore_index,
                             int64_t reduction, double label_smoothing, double lse_square_scale,
                             std::optional<double> softcap, bool /*inplace_backward*/, OptDtype out_dtype) {
  return std::get<0>(FUSEDLOSS_OP("cross_entropy_forward", CeForwardSig)
                         .call(input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale,
                               softcap, out_dtype));
}

// ---------------------------------------------------------------------------
// Autocast: torch runs these losses in fp32 (on the CPU and on CUDA). fusedloss
// returns the same fp32 loss without making fp32 copies of fp16/bf16 inputs:
// the kernels widen them in registers, and each gradient comes back in its
// input's dtype, rounded once (what torch's cast back gives).
bool half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// out_dtype under autocast: the caller's, else fp32 where torch's loss dtype
// would be fp16/bf16.
OptDtype autocast_dtype(const OptDtype& out_dtype, at::ScalarType torch_dtype) {
  if (out_dtype.has_value()) return out_dtype;
  return half(torch_dtype) ? OptDtype(at::kFloat) : std::nullopt;
}

template <c10::DispatchKey kAutocast>
struct AutocastKernels {
  using Guard = c10::impl::ExcludeDispatchKeyGuard;

  static Tensor bce_with_logits(const Tensor& input, const Tensor& target, const OptTensor& weight,
                                const OptTensor& pos_weight, int64_t reduction, OptDtype out_dtype) {
    Guard no_autocast(kAutocast);
    return FUSEDLOSS_OP("bce_with_logits", sig::Bce)
        .call(input, target, weight, pos_weight, reduction, autocast_dtype(out_dtype, target.scalar_type()));
  }
  static Tensor mse(const Tensor& input, const Tensor& target, const OptTensor& weight, int64_t reduction,
                    OptDtype out_dtype) {
    Guard no_autocast(kAutocast);
    using Sig = Tensor(const Tensor&, const Tensor&, const OptTensor&, int64_t, OptDtype);
    at::ScalarType t = c10::promoteTypes(input.scalar_type(), target.scalar_type());
    if (weight.has_value() && weight->defined()) t = c10::promoteTypes(t, weight->scalar_type());
    return FUSEDLOSS_OP("mse", Sig).call(input, target, weight, reduction, autocast_dtype(out_dtype, t));
  }
  static Tensor hinge_embedding(const Tensor& input, const Tensor& target, double margin, int64_t reduction,
                                OptDtype out_dtype) {
    Guard no_autocast(kAutocast);
    return FUSEDLOSS_OP("hinge_embedding", sig::HingeEmbedding)
        .call(input, target, margin, reduction, autocast_dtype(out_dtype, input.scalar_type()));
  }
  static Tensor soft_margin(const Tensor& input, const Tensor& target, int64_t reduction, OptDtype out_dtype) {
    Guard no_autocast(kAutocast);
    return FUSEDLOSS_OP("soft_margin", sig::SoftMargin)
        .call(input, target, reduction, autocast_dtype(out_dtype, input.scalar_type()));
  }
  static Tensor multi_margin(const Tensor& input, const Tensor& target, int64_t p, double margin,
                             const OptTensor& weight, int64_t reduction, OptDtype out_dtype) {
    Guard no_autocast(kAutocast);
    return FUSEDLOSS_OP("multi_margin", sig::MultiMargin)
        .call(input, target, p, margin, weight, reduction, autocast_dtype(out_dtype, input.scalar_type()));
  }
  static Tensor cross_entropy(const Tensor& input, const Tensor& target, const OptTensor& weight,
                              int64_t ignore_index, int64_t reduction, double label_smoothing,
                              double lse_square_scale, std::optional<double> softcap, bool inplace_backward,
                              OptDtype out_dtype) {
    Guard no_autocast(kAutocast);
    using Sig = Tensor(const Tensor&, const Tensor&, const OptTensor&, int64_t, int64_t, double, double,
                       std::optional<double>, bool, OptDtype);
    const bool prob = same_shape(target, input);
    const at::ScalarType t = prob ? c10::promoteTypes(input.scalar_type(), target.scalar_type()) : input.scalar_type();
    return FUSEDLOSS_OP("cross_entropy", Sig)
        .call(input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
              inplace_backward, autocast_dtype(out_dtype, t));
  }

  static void register_all(torch::Library& m) {
    m.impl("bce_with_logits", &bce_with_logits);
    m.impl("mse", &mse);
    m.impl("hinge_embedding", &hinge_embedding);
    m.impl("soft_margin", &soft_margin);
    m.impl("multi_margin", &multi_margin);
    m.impl("cross_entropy", &cross_entropy);
  }
};

}  // namespace

// Forces the probe of torch.clamp's gradient at its bound while grad mode is
// certainly available (at import), rather than on a first backward that might
// run in an unusual mode.
bool probe_clamp_grad_at_bound() { return clamp_grad_at_bound(); }

}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) {
  m.impl("bce_with_logits", &fusedloss::bce_with_logits);
  m.impl("mse", &fusedloss::mse);
  m.impl("hinge_embedding", &fusedloss::hinge_embedding);
  m.impl("soft_margin", &fusedloss::soft_margin);
  m.impl("hinge", &fusedloss::hinge);
  m.impl("multi_margin", &fusedloss::multi_margin);
  m.impl("cross_entropy", &fusedloss::cross_entropy);
}

TORCH_LIBRARY_IMPL(fusedloss, CompositeExplicitAutograd, m) {
  m.impl("mse", &fusedloss::mse_no_grad);
  m.impl("cross_entropy", &fusedloss::cross_entropy_no_grad);
}

TORCH_LIBRARY_IMPL(fusedloss, AutocastCPU, m) {
  fusedloss::AutocastKernels<c10::DispatchKey::AutocastCPU>::register_all(m);
}

TORCH_LIBRARY_IMPL(fusedloss, AutocastCUDA, m) {
  fusedloss::AutocastKernels<c10::DispatchKey::AutocastCUDA>::register_all(m);
}

// ---------------------------------------------------------------------------
// sigmoid_focal_loss, multilabel_soft_margin_loss and distillation on logits:
// their autograd, the no-grad path of distill (whose forward op returns saved
// state), and their Autocast kernels.
namespace fusedloss {
namespace {

// sigmoid_focal_loss: gradients for input and (soft) target.
struct SigmoidFocal {
  static constexpr const char* kNodeName = "fusedloss::SigmoidFocalLossBackward";

  static Tensor forward(LossCtx* ctx, const Tensor& input, const Tensor& target, double alpha, double gamma,
                        int64_t reduction, OptDtype out_dtype) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({input, target});
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["gamma"] = gamma;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["out_dtype"] = out_dtype;
    return FUSEDLOSS_OP("sigmoid_focal", sig::SigmoidFocal).call(input, target, alpha, gamma, reduction, out_dtype);
  }

  static variable_list backward(LossCtx* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const double alpha = ctx->saved_data["alpha"].toDouble();
    const double gamma = ctx->saved_data["gamma"].toDouble();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const std::vector<bool> needs{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    if (!grads[0].defined()) return variable_list(6);
    if (at::GradMode::is_enabled()) {
      const Tensor loss = composite::sigmoid_focal(s[0], s[1], alpha, gamma, reduction,
                                                   ctx->saved_data["out_dtype"].toOptional<at::ScalarType>());
      return grads_then_none(composite_grads(loss, {s[0], s[1]}, needs, grads[0]), 6);
    }
    using Sig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double, double, int64_t,
                                           std::array<bool, 2>);
    auto [gx, gy] = FUSEDLOSS_OP("sigmoid_focal_backward", Sig)
                        .call(grads[0], s[0], s[1], alpha, gamma, reduction, {needs[0], needs[1]});
    return grads_then_none({needs[0] ? gx : Tensor(), needs[1] ? gy : Tensor()}, 6);
  }
};

Tensor sigmoid_focal(const Tensor& input, const Tensor& target, double alpha, double gamma, int64_t reduction,
                     OptDtype out_dtype) {
  check_same_device(input, {&target});
  if (has_fw_grad(input) || has_fw_grad(target)) {
    return composite::sigmoid_focal(input, target, alpha, gamma, reduction, out_dtype);
  }
  if (!graph_needed({&input, &target})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return FUSEDLOSS_OP("sigmoid_focal", sig::SigmoidFocal).call(input, target, alpha, gamma, reduction, out_dtype);
  }
  return apply_loss<SigmoidFocal>(input, target, alpha, gamma, reduction, out_dtype);
}

// multilabel_soft_margin_loss: gradients for input and a floating target; a
// weight that requires grad goes to the composite (torch's loss is a
// composite, so torch differentiates the weight; the kernels do not).
struct MultilabelSoftMargin {
  static constexpr const char* kNodeName = "fusedloss::MultilabelSoftMarginLossBackward";

  static Tensor forward(LossCtx* ctx, const Tensor& input, const Tensor& target, const OptTensor& weight,
                        int64_t reduction, OptDtype out_dtype) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({input, target, value_or_undefined(weight)});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["out_dtype"] = out_dtype;
    return FUSEDLOSS_OP("multilabel_soft_margin", sig::MultilabelSoftMargin)
        .call(input, target, weight, reduction, out_dtype);
  }

  static variable_list backward(LossCtx* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const std::vector<bool> needs{ctx->needs_input_grad(0), ctx->needs_input_grad(1) && s[1].is_floating_point()};
    if (!grads[0].defined()) return variable_list(5);
    if (at::GradMode::is_enabled()) {
      const Tensor loss = composite::multilabel_soft_margin(s[0], s[1], s[2], reduction,
                                                            ctx->saved_data["out_dtype"].toOptional<at::ScalarType>());
      return grads_then_none(composite_grads(loss, {s[0], s[1]}, needs, grads[0]), 5);
    }
    using Sig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, int64_t,
                                           std::array<bool, 2>);
    auto [gx, gy] = FUSEDLOSS_OP("multilabel_soft_margin_backward", Sig)
                        .call(grads[0], s[0], s[1], s[2], reduction, {needs[0], needs[1]});
    return grads_then_none({needs[0] ? gx : Tensor(), needs[1] ? gy : Tensor()}, 5);
  }
};

Tensor multilabel_soft_margin(const Tensor& input, const Tensor& target, const OptTensor& weight, int64_t reduction,
                              OptDtype out_dtype) {
  check_same_device(input, {&target, ptr(weight)});
  const bool weight_rg = weight.has_value() && weight->defined() && weight->requires_grad() && at::GradMode::is_enabled();
  if (weight_rg || has_fw_grad(input) || has_fw_grad(target) || has_fw_grad(weight)) {
    return composite::multilabel_soft_margin(input, target, weight, reduction, out_dtype);
  }
  if (!graph_needed({&input, &target})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return FUSEDLOSS_OP("multilabel_soft_margin", sig::MultilabelSoftMargin)
        .call(input, target, weight, reduction, out_dtype);
  }
  return apply_loss<MultilabelSoftMargin>(input, target, weight, reduction, out_dtype);
}

// Distillation: gradients for the student and the teacher (each only when it
// requires grad); the target only selects rows. The forward saves the logits,
// the target and O(rows) state.
using DistillForwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, double,
                                                             double, int64_t, int64_t, OptDtype);

struct Distill {
  static constexpr const char* kNodeName = "fusedloss::DistillationLossBackward";

  static Tensor forward(LossCtx* ctx, const Tensor& student, const Tensor& teacher, const OptTensor& target,
                        double beta, double temperature, int64_t ignore_index, int64_t reduction, OptDtype out_dtype) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, stats, denominator] = FUSEDLOSS_OP("distill_forward", DistillForwardSig)
                                          .call(student, teacher, target, beta, temperature, ignore_index, reduction,
                                                out_dtype);
    ctx->save_for_backward({student, teacher, value_or_undefined(target), stats, denominator});
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["out_dtype"] = out_dtype;
    return loss;
  }

  static variable_list backward(LossCtx* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const double beta = ctx->saved_data["beta"].toDouble();
    const double temperature = ctx->saved_data["temperature"].toDouble();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const std::vector<bool> needs{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    constexpr size_t kArgs = 8;
    if (!grads[0].defined()) return variable_list(kArgs);
    const OptTensor target = s[2].defined() ? OptTensor(s[2]) : std::nullopt;
    if (at::GradMode::is_enabled()) {
      const Tensor loss = composite::distill(s[0], s[1], target, beta, temperature, ignore_index, reduction,
                                             ctx->saved_data["out_dtype"].toOptional<at::ScalarType>());
      return grads_then_none(composite_grads(loss, {s[0], s[1]}, needs, grads[0]), kArgs);
    }
    using Sig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                           const Tensor&, const Tensor&, double, double, int64_t, int64_t,
                                           std::array<bool, 2>);
    auto [gs, gt] = FUSEDLOSS_OP("distill_backward", Sig)
                        .call(grads[0], s[0], s[1], target, s[3], s[4], beta, temperature, ignore_index, reduction,
                              {needs[0], needs[1]});
    return grads_then_none({needs[0] ? gs : Tensor(), needs[1] ? gt : Tensor()}, kArgs);
  }
};

Tensor distill_no_grad(const Tensor& student, const Tensor& teacher, const OptTensor& target, double beta,
                       double temperature, int64_t ignore_index, int64_t reduction, OptDtype out_dtype);

Tensor distill(const Tensor& student, const Tensor& teacher, const OptTensor& target, double beta, double temperature,
               int64_t ignore_index, int64_t reduction, OptDtype out_dtype) {
  check_same_device(student, {&teacher, ptr(target)});
  if (has_fw_grad(student) || has_fw_grad(teacher)) {
    return composite::distill(student, teacher, target, beta, temperature, ignore_index, reduction, out_dtype);
  }
  if (!graph_needed({&student, &teacher})) {
    return distill_no_grad(student, teacher, target, beta, temperature, ignore_index, reduction, out_dtype);
  }
  return apply_loss<Distill>(student, teacher, target, beta, temperature, ignore_index, reduction, out_dtype);
}

Tensor distill_no_grad(const Tensor& student, const Tensor& teacher, const OptTensor& target, double beta,
                       double temperature, int64_t ignore_index, int64_t reduction, OptDtype out_dtype) {
  return std::get<0>(FUSEDLOSS_OP("distill_forward", DistillForwardSig)
                         .call(student, teacher, target, beta, temperature, ignore_index, reduction, out_dtype));
}

// Autocast. torch runs torchvision's focal loss in fp32 (its BCE is on both
// devices' fp32 lists), and the distillation composite too (log_softmax and
// kl_div). multilabel_soft_margin_loss keeps the input's dtype under CPU
// autocast (none of its ops is listed there) and gives fp32 under CUDA
// autocast (its sum is on CUDA's fp32 list): it has a CUDA kernel only.
template <c10::DispatchKey kAutocast>
struct SigmoidAndDistillAutocast {
  using Guard = c10::impl::ExcludeDispatchKeyGuard;

  static Tensor sigmoid_focal(const Tensor& input, const Tensor& target, double alpha, double gamma, int64_t reduction,
                              OptDtype out_dtype) {
    Guard no_autocast(kAutocast);
    const auto t = c10::promoteTypes(input.scalar_type(), target.scalar_type());
    return FUSEDLOSS_OP("sigmoid_focal", sig::SigmoidFocal)
        .call(input, target, alpha, gamma, reduction, autocast_dtype(out_dtype, t));
  }
  static Tensor multilabel_soft_margin(const Tensor& input, const Tensor& target, const OptTensor& weight,
                                       int64_t reduction, OptDtype out_dtype) {
    Guard no_autocast(kAutocast);
    return FUSEDLOSS_OP("multilabel_soft_margin", sig::MultilabelSoftMargin)
        .call(input, target, weight, reduction, autocast_dtype(out_dtype, input.scalar_type()));
  }
  static Tensor distill(const Tensor& student, const Tensor& teacher, const OptTensor& target, double beta,
                        double temperature, int64_t ignore_index, int64_t reduction, OptDtype out_dtype) {
    Guard no_autocast(kAutocast);
    using Sig = Tensor(const Tensor&, const Tensor&, const OptTensor&, double, double, int64_t, int64_t, OptDtype);
    const auto t = c10::promoteTypes(student.scalar_type(), teacher.scalar_type());
    return FUSEDLOSS_OP("distill", Sig)
        .call(student, teacher, target, beta, temperature, ignore_index, reduction, autocast_dtype(out_dtype, t));
  }
};

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) {
  m.impl("sigmoid_focal", &fusedloss::sigmoid_focal);
  m.impl("multilabel_soft_margin", &fusedloss::multilabel_soft_margin);
  m.impl("distill", &fusedloss::distill);
}

TORCH_LIBRARY_IMPL(fusedloss, CompositeExplicitAutograd, m) { m.impl("distill", &fusedloss::distill_no_grad); }

TORCH_LIBRARY_IMPL(fusedloss, AutocastCPU, m) {
  using K = fusedloss::SigmoidAndDistillAutocast<c10::DispatchKey::AutocastCPU>;
  m.impl("sigmoid_focal", &K::sigmoid_focal);
  m.impl("distill", &K::distill);
}

TORCH_LIBRARY_IMPL(fusedloss, AutocastCUDA, m) {
  using K = fusedloss::SigmoidAndDistillAutocast<c10::DispatchKey::AutocastCUDA>;
  m.impl("sigmoid_focal", &K::sigmoid_focal);
  m.impl("multilabel_soft_margin", &K::multilabel_soft_margin);
  m.impl("distill", &K::distill);
}

// ---------------------------------------------------------------------------
// linear_cross_entropy: gradients for the input, the linear weight and the
// linear bias. For a scalar loss the forward op computes them chunk by chunk
// (for grad_output = 1) and the backward scales them by grad_output on the
// device: no host sync, and in place unless the graph is kept for another
// backward (retain_graph) or the backward is being traced. For 'none', and
// for fp16 (whose gradients at grad_output = 1 could underflow where a loss
// scaler's grad_output would keep them), the backward recomputes them chunk
// by chunk from the saved per-row (max, log-sum-exp). create_graph,
// forward-mode AD, a class weight that requires grad and a probability target
// that requires grad take the composite (linear, then cross entropy).

namespace fusedloss {
namespace {

using LceForwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t, int64_t, double, double,
    std::optional<double>, int64_t, OptDtype, std::array<bool, 3>);
// A real tensor, not one being traced (torch.compile, make_fx) or wrapped,
// whose saved buffers may be scaled in place.
bool plain_tensor(const Tensor& t) {
  return !t.defined() || !t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                                   c10::DispatchKey::PythonTLSSnapshot}));
}

struct LinearCrossEntropy {
  static constexpr const char* kNodeName = "fusedloss::LinearCrossEntropyBackward";

  static Tensor forward(LossCtx* ctx, const Tensor& input, const Tensor& linear_weight, const Tensor& target,
                        const OptTensor& linear_bias, const OptTensor& weight, int64_t ignore_index, int64_t reduction,
                        double label_smoothing, double lse_square_scale, std::optional<double> softcap,
                        int64_t chunk_size, OptDtype out_dtype, bool precompute) {
    at::AutoDispatchBelowADInplaceOrView below;
    const bool has_bias = linear_bias.has_value() && linear_bias->defined();
    const std::array<bool, 3> mask{precompute && input.requires_grad(), precompute && linear_weight.requires_grad(),
                                   precompute && has_bias && linear_bias->requires_grad()};
    auto [loss, lse, stats, target_mass, gi, gw, gb] =
        FUSEDLOSS_OP("linear_cross_entropy_forward", LceForwardSig)
            .call(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing,
                  lse_square_scale, softcap, chunk_size, out_dtype, mask);
    ctx->save_for_backward({input, linear_weight, target, value_or_undefined(linear_bias), value_or_undefined(weight),
                            lse, stats, target_mass, gi, gw, gb});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["lse_square_scale"] = lse_square_scale;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["chunk_size"] = chunk_size;
    ctx->saved_data["out_dtype"] = out_dtype;
    ctx->saved_data["precomputed"] = precompute;
    return loss;
  }

  static variable_list backward(LossCtx* ctx, variable_list grads) {
    constexpr size_t kArgs = 13;
    auto s = ctx->get_saved_variables();
    const Tensor &input = s[0], &linear_weight = s[1], &target = s[2];
    const OptTensor bias = s[3].defined() ? OptTensor(s[3]) : std::nullopt;
    const OptTensor weight = s[4].defined() ? OptTensor(s[4]) : std::nullopt;
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const double label_smoothing = ctx->saved_data["label_smoothing"].toDouble();
    const double lse_square_scale = ctx->saved_data["lse_square_scale"].toDouble();
    const auto softcap = ctx->saved_data["softcap"].toOptional<double>();
    const int64_t chunk_size = ctx->saved_data["chunk_size"].toInt();
    const std::vector<bool> needs{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                  s[3].defined() && ctx->needs_input_grad(3)};
    if (!grads[0].defined() || !(needs[0] || needs[1] || needs[2])) return variable_list(kArgs);
    auto place = [&](Tensor gi, Tensor gw, Tensor gb) {
      variable_list out(kArgs);
      if (needs[0]) out[0] = gi;
      if (needs[1]) out[1] = gw;
      if (needs[2]) out[3] = gb;
      return out;
    };
    if (at::GradMode::is_enabled()) {
      const Tensor loss = composite::linear_cross_entropy(
          input, linear_weight, target, bias, weight, ignore_index, reduction, label_smoothing, lse_square_scale,
          softcap, chunk_size, ctx->saved_data["out_dtype"].toOptional<at::ScalarType>());
      const auto g = composite_grads(loss, {input, linear_weight, s[3].defined() ? s[3] : input}, needs, grads[0]);
      return place(g[0], g[1], g[2]);
    }
    if (ctx->saved_data["precomputed"].toBool()) {
      // The forward's gradients for grad_output = 1, times grad_output. When
      // this is the graph's last backward, they are scaled where they are and
      // handed over (the saved copies are released right after).
      const Tensor& g = grads[0];
      const bool in_place = !torch::autograd::get_current_graph_task_keep_graph() && plain_tensor(g) &&
                            plain_tensor(s[8]) && plain_tensor(s[9]) && plain_tensor(s[10]);
      auto scaled = [&](Tensor& t) { return in_place ? t.mul_(g) : t * g; };
      Tensor gi = needs[0] ? scaled(s[8]) : Tensor();
      Tensor gw = needs[1] ? scaled(s[9]) : Tensor();
      Tensor gb = needs[2] ? scaled(s[10]) : Tensor();
      s.clear();
      return place(gi, gw, gb);
    }
    using Sig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                   const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
                                                   const Tensor&, int64_t, int64_t, double, double,
                                                   std::optional<double>, int64_t, std::array<bool, 3>);
    auto [gi, gw, gb] = FUSEDLOSS_OP("linear_cross_entropy_backward", Sig)
                            .call(grads[0], input, linear_weight, target, bias, weight, s[5], s[6], s[7],
                                  ignore_index, reduction, label_smoothing, lse_square_scale, softcap, chunk_size,
                                  {needs[0], needs[1], needs[2]});
    return place(gi, gw, gb);
  }
};

Tensor linear_cross_entropy_no_grad(const Tensor& input, const Tensor& linear_weight, const Tensor& target,
                                    const OptTensor& linear_bias, const OptTensor& weight, int64_t ignore_index,
                                    int64_t reduction, double label_smoothing, double lse_square_scale,
                                    std::optional<double> softcap, int64_t chunk_size, OptDtype out_dtype);

Tensor linear_cross_entropy(const Tensor& input, const Tensor& linear_weight, const Tensor& target,
                            const OptTensor& linear_bias, const OptTensor& weight, int64_t ignore_index,
                            int64_t reduction, double label_smoothing, double lse_square_scale,
                            std::optional<double> softcap, int64_t chunk_size, OptDtype out_dtype) {
  check_same_device(input, {&linear_weight, &target, ptr(linear_bias), ptr(weight)});
  const bool grad_mode = at::GradMode::is_enabled();
  const bool prob = target.is_floating_point();
  const bool weight_rg = weight.has_value() && weight->defined() && weight->requires_grad() && grad_mode;
  TORCH_CHECK(!(weight_rg && !prob),
              "The function 'nll_loss_forward' is not differentiable with respect to argument 'weight'. "
              "This input cannot have requires_grad True.");
  if (weight_rg || (prob && target.requires_grad() && grad_mode) || has_fw_grad(input) ||
      has_fw_grad(linear_weight) || has_fw_grad(target) || has_fw_grad(linear_bias) || has_fw_grad(weight)) {
    return composite::linear_cross_entropy(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                                           label_smoothing, lse_square_scale, softcap, chunk_size, out_dtype);
  }
  if (!graph_needed({&input, &linear_weight, ptr(linear_bias)})) {
    return linear_cross_entropy_no_grad(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                                        label_smoothing, lse_square_scale, softcap, chunk_size, out_dtype);
  }
  const bool precompute = reduction != kReductionNone && input.scalar_type() != at::kHalf;
  return apply_loss<LinearCrossEntropy>(input, linear_weight, target, linear_bias, weight, ignore_index,
                                        reduction, label_smoothing, lse_square_scale, softcap, chunk_size, out_dtype,
                                        precompute);
}

// Below autograd (inference mode, fake tensors): the forward op's loss.
Tensor linear_cross_entropy_no_grad(const Tensor& input, const Tensor& linear_weight, const Tensor& target,
                                    const OptTensor& linear_bias, const OptTensor& weight, int64_t ignore_index,
                                    int64_t reduction, double label_smoothing, double lse_square_scale,
                                    std::optional<double> softcap, int64_t chunk_size, OptDtype out_dtype) {
  return std::get<0>(FUSEDLOSS_OP("linear_cross_entropy_forward", LceForwardSig)
                         .call(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                               label_smoothing, lse_square_scale, softcap, chunk_size, out_dtype,
                               {false, false, false}));
}

// Autocast: torch's reference path runs linear in the autocast dtype and
// cross entropy in fp32. Here the input, weight and bias are cast (through
// autocast's weight cache) and the loss comes back in fp32, computed from the
// fp16/bf16 logits in fp32 registers.
template <c10::DispatchKey kAutocast>
Tensor linear_cross_entropy_autocast(const Tensor& input, const Tensor& linear_weight, const Tensor& target,
                                     const OptTensor& linear_bias, const OptTensor& weight, int64_t ignore_index,
                                     int64_t reduction, double label_smoothing, double lse_square_scale,
                                     std::optional<double> softcap, int64_t chunk_size, OptDtype out_dtype) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocast);
  constexpr auto device = kAutocast == c10::DispatchKey::AutocastCPU ? c10::DeviceType::CPU : c10::DeviceType::CUDA;
  const at::ScalarType low = at::autocast::get_autocast_dtype(device);
  auto cast = [&](const Tensor& t) {
    return t.defined() && t.is_floating_point() ? at::autocast::cached_cast(low, t, device) : t;
  };
  const OptTensor bias =
      linear_bias.has_value() && linear_bias->defined() ? OptTensor(cast(*linear_bias)) : linear_bias;
  return FUSEDLOSS_OP("linear_cross_entropy", sig::LinearCrossEntropy)
      .call(cast(input), cast(linear_weight), target, bias, weight, ignore_index, reduction, label_smoothing,
            lse_square_scale, softcap, chunk_size, autocast_dtype(out_dtype, low));
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) { m.impl("linear_cross_entropy", &fusedloss::linear_cross_entropy); }

TORCH_LIBRARY_IMPL(fusedloss, CompositeExplicitAutograd, m) {
  m.impl("linear_cross_entropy", &fusedloss::linear_cross_entropy_no_grad);
}

TORCH_LIBRARY_IMPL(fusedloss, AutocastCPU, m) {
  m.impl("linear_cross_entropy", &fusedloss::linear_cross_entropy_autocast<c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(fusedloss, AutocastCUDA, m) {
  m.impl("linear_cross_entropy", &fusedloss::linear_cross_entropy_autocast<c10::DispatchKey::AutocastCUDA>);
}
