"""Drop-in replacements for torch.nn.functional losses.

Every function has torch's name, signature, defaults, output dtype and shape,
and raises torch's exception type and message for bad input. Deviations from
torch are listed in each docstring.

How a call runs: the Python checks torch itself makes in Python (its
ValueErrors and warnings), then one call of the loss op
(``torch.ops.fusedloss.<loss>``), whose C++ autograd kernel records the fused
backward. Outside torch.compile the op is called through its eager entry
point (``fusedloss._ops.eager``: the same dispatcher call, with the Python
arguments converted by typed C++ rather than torch.ops's schema walk). If the
op refuses the arguments (invalid input, or a combination the kernels do not
take), the call is computed by the loss's composite (torch's
own ATen ops, fusedloss/_composite.py), which raises torch's error for invalid
input or returns torch's result. The same composite runs under torch.func
transforms (vmap, grad), which the fused kernels have no batching rules for.
Nothing here calls a ``torch.nn.functional`` function, so patching torch with
fusedloss (``fusedloss.patch_torch()``) cannot recurse.

Extras beyond torch are keyword-only. Every loss takes ``out_dtype``: the dtype
of the returned loss, computed in fp32 registers (fp64 for fp64 inputs) and
rounded once into it, e.g. ``out_dtype=torch.float32`` for an fp32 loss of
bf16 logits without an fp32 copy of them; gradients keep each input's dtype.

Inside ``torch.autocast``, the losses torch runs in fp32 return an fp32 loss
as torch does, but read fp16/bf16 inputs as they are (no fp32 copies); each
gradient comes back in its input's dtype, rounded once from fp32.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch.nn import _reduction as _Reduction
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _validation
from ._ops import BUILD_INFO, eager, ops, rebuild_command

__all__ = [
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "hinge_embedding_loss",
    "hinge_loss",
    "mse_loss",
    "multi_margin_loss",
    "soft_margin_loss",
]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_REDUCTION_NAMES = {0: "none", 1: "mean", 2: "sum"}

# What an op raises for arguments it does not take.
_REFUSALS = (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError)

_functorch_stack = torch._C._functorch.peek_interpreter_stack
_compiling = torch.compiler.is_compiling


def _reduction_enum(size_average, reduce, reduction) -> int:
    if size_average is not None or reduce is not None:
        return _Reduction.legacy_get_enum(size_average, reduce)
    enum = _REDUCTIONS.get(reduction) if isinstance(reduction, str) else None
    return _Reduction.get_enum(reduction) if enum is None else enum


def _transformed(compiling: bool) -> bool:
    """Whether a torch.func transform (vmap, grad, jvp) is active; `compiling`
    is _compiling(), asked once per call by the caller, which also picks the
    op's entry point by it."""
    return not compiling and _functorch_stack() is not None


def _decomposed(composite, *args):
    """A `<loss>_composite` op run as its ATen decomposition: under torch.func
    transforms each of its ATen ops is batched or differentiated by torch (the
    op itself has no batching rule)."""
    return composite.default.decompose(*args)


def _autocast(t: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(t.device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return False


_warned_no_kernels = False


def _on_refusal(error: BaseException, input: torch.Tensor, name: str) -> None:
    """A CUDA tensor on a build without CUDA kernels runs torch's loss, once with
    a warning that says how to get the fused kernels; training never stops."""
    global _warned_no_kernels
    if (
        isinstance(error, NotImplementedError)
        and input.device.type == "cuda"
        and not BUILD_INFO.get("cuda")
        and not _warned_no_kernels
    ):
        _warned_no_kernels = True
        hint = BUILD_INFO.get("cuda_enable_hint")
        warnings.warn(
            f"fusedloss was built without CUDA kernels ({BUILD_INFO.get('cuda_skipped_reason') or 'not built'}), "
            f"so {name} on CUDA tensors runs torch's own implementation, unfused. "
            + (
                f"To build them:\n{hint}"
                if hint
                else f"Rebuild fusedloss with nvcc available:\n    {rebuild_command()}"
            ),
            RuntimeWarning,
            stacklevel=3,
        )


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sigmoid + binary cross entropy in one fused pass (forward) and one (backward).

    Same as :func:`torch.nn.functional.binary_cross_entropy_with_logits`:
    ``weight`` and ``pos_weight`` broadcast against the target (a 1-D
    ``pos_weight`` along the last dim), ``mean`` divides by the element count,
    the output has the target's dtype, and gradients reach ``input`` and
    ``target``. Computed in fp32 (fp64 if any argument is fp64) and rounded
    once; every argument is read in its own dtype. ``out_dtype``: see the module
    docstring.

    Deviation: with mixed input/target dtypes torch rounds intermediates to the
    target's dtype; fusedloss computes in fp32/fp64 and rounds only the result
    (differences are within one unit of the output dtype).
    """
    if has_torch_function_variadic(input, target, weight, pos_weight):
        return handle_torch_function(
            binary_cross_entropy_with_logits,
            (input, target, weight, pos_weight),
            input,
            target,
            weight=weight,
            size_average=size_average,
            reduce=reduce,
            reduction=reduction,
            pos_weight=pos_weight,
            out_dtype=out_dtype,
        )
    red = _reduction_enum(size_average, reduce, reduction)
    if not (target.size() == input.size()):
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    compiling = _compiling()
    if _transformed(compiling):
        return _decomposed(ops.bce_with_logits_composite, input, target, weight, pos_weight, red, out_dtype)
    try:
        return (ops.bce_with_logits.default if compiling else eager.bce_with_logits)(
            input, target, weight, pos_weight, red, out_dtype
        )
    except _REFUSALS as e:
        _on_refusal(e, input, "binary_cross_entropy_with_logits")
    return ops.bce_with_logits_composite.default(input, target, weight, pos_weight, red, out_dtype)


def _as(loss: torch.Tensor, out_dtype: torch.dtype | None) -> torch.Tensor:
    return loss if out_dtype is None else loss.to(out_dtype)


def _broadcast_pair(input, target):
    return (input, target) if input.shape == target.shape else torch.broadcast_tensors(input, target)


def _mse_loss(input, target, size_average, reduce, reduction, weight, out_dtype):
    # torch's checks, in torch's order.
    if target.size() != input.size():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=3,
        )
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    x, y = _broadcast_pair(input, target)
    if weight is not None:
        if weight.size() != input.size():
            raise ValueError("Weights and input must have the same size.")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"Invalid reduction mode: {reduction}. Expected one of 'none', 'mean', 'sum'.")
        red = _REDUCTIONS[reduction]
        if weight.shape != x.shape:
            # A weight of the input's shape over a broadcast target (the rare,
            # warned path): torch's weighted mean divides by the sum of the
            # weight as given, not of its broadcast.
            loss = mse_loss(x, y, reduction="sum" if red == 1 else reduction, weight=weight.expand(x.shape))
            return _as(loss / weight.sum() if red == 1 else loss, out_dtype)
    else:
        red = _reduction_enum(None, None, reduction)
    compiling = _compiling()
    if _transformed(compiling):
        return _decomposed(ops.mse_composite, x, y, weight, red, out_dtype)
    try:
        return (ops.mse.default if compiling else eager.mse)(x, y, weight, red, out_dtype)
    except _REFUSALS as e:
        _on_refusal(e, input, "mse_loss")
    return ops.mse_composite.default(x, y, weight, red, out_dtype)


_MSE_DOC = """Squared error in one fused pass (forward) and one (backward).

    Same as :func:`torch.nn.functional.mse_loss`, including the UserWarning and
    broadcasting when target and input shapes differ (the target's gradient is
    summed back to its shape) and ``weight=`` (torch >= 2.13: a weighted mean
    divides by ``weight.sum()``; on older torch, where mse_loss has no weight,
    fusedloss offers it as a keyword-only extra). Accumulates in fp32 (fp64 for
    double). ``out_dtype``: see the module docstring.

    Deviation: a weighted mean keeps ``weight.sum()`` in fp32 for fp16/bf16
    inputs where torch rounds it to the input dtype first.
    """

if "weight" in inspect.signature(torch.nn.functional.mse_loss).parameters:

    def mse_loss(
        input: torch.Tensor,
        target: torch.Tensor,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        weight: torch.Tensor | None = None,
        *,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        if has_torch_function_variadic(input, target, weight):
            return handle_torch_function(
                mse_loss,
                (input, target, weight),
                input,
                target,
                size_average=size_average,
                reduce=reduce,
                reduction=reduction,
                weight=weight,
                out_dtype=out_dtype,
            )
        return _mse_loss(input, target, size_average, reduce, reduction, weight, out_dtype)

else:  # torch < 2.13: torch's signature, the weight keyword-only

    def mse_loss(
        input: torch.Tensor,
        target: torch.Tensor,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        *,
        weight: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        if has_torch_function_variadic(input, target, weight):
            return handle_torch_function(
                mse_loss,
                (input, target, weight),
                input,
                target,
                size_average=size_average,
                reduce=reduce,
                reduction=reduction,
                weight=weight,
                out_dtype=out_dtype,
            )
        return _mse_loss(input, target, size_average, reduce, reduction, weight, out_dtype)


mse_loss.__doc__ = _MSE_DOC


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Softmax + cross entropy: one read of the logits forward, one read and one
    write backward; only the logits, targets and an fp32 log-sum-exp per row are
    kept for backward.

    Same as :func:`torch.nn.functional.cross_entropy` for class-index targets
    (int64 or uint8) and class-probability targets (of any floating dtype),
    ``weight``, ``ignore_index``, ``label_smoothing`` and every reduction, on
    (C), (N, C) and (N, C, d1, ..., dK) inputs of any strides. Extras, off by
    default:

    * ``lse_square_scale`` (z-loss): each sample's loss gains
      ``lse_square_scale * logsumexp(x)**2`` (times the target's class weight for
      class-index targets); ignored samples gain nothing; the mean divides by
      torch's denominator.
    * ``softcap``: the logits become ``softcap * tanh(x / softcap)`` first.
    * ``inplace_backward``: the gradient is written over the logits, saving one
      logits-sized buffer. Allowed only where that is provably safe: a
      ``ValueError`` says why otherwise (the logits, or the tensor they are a
      view of, are a leaf that requires grad; or they overlap themselves in
      memory or are not dense, e.g. expanded). The logits' version counter is
      bumped, so autograd raises if anything else saved them for backward. The
      in-place gradient equals the out-of-place one bit for bit. Ignored under
      torch.compile.
    * ``out_dtype``: see the module docstring (``torch.float32`` gives an fp32
      loss of bf16 logits with no fp32 copy of them).

    Deviations from torch: an out-of-range class index on CUDA gives a NaN loss
    and NaN gradients for that row instead of a device-side assert (which
    would end the process's CUDA context); ``fusedloss.set_validation(True)`` or
    ``FUSEDLOSS_VALIDATE=1`` checks on the host and raises torch's IndexError
    (at the cost of a device sync). The CPU always raises. Rows whose target is
    ignored get a gradient of exactly 0 even when their logits are NaN. A
    probability-target call whose weight requires grad, and forward-mode AD,
    are computed by the composite (the fused kernels have no weight gradient
    and no jvp).

    DTensor logits of shape (N, C) sharded on the class dimension (``Shard(1)``
    on one mesh dimension, ``Replicate`` on the others) with a replicated
    target and weight are computed by
    :func:`fusedloss.distributed.vocab_parallel_cross_entropy` on the local
    shards: the result of torch's ``loss_parallel()`` (a replicated DTensor
    loss, the gradient sharded as the logits), with two collectives per call
    and no fp32 copy of the shard, and with label smoothing, z-loss and softcap
    too (``loss_parallel`` has no label smoothing); ``inplace_backward`` is
    ignored there. Other DTensor layouts take DTensor's own path.
    """
    if has_torch_function_variadic(input, target, weight):
        return handle_torch_function(
            cross_entropy,
            (input, target, weight),
            input,
            target,
            weight=weight,
            size_average=size_average,
            ignore_index=ignore_index,
            reduce=reduce,
            reduction=reduction,
            label_smoothing=label_smoothing,
            lse_square_scale=lse_square_scale,
            softcap=softcap,
            inplace_backward=inplace_backward,
            out_dtype=out_dtype,
        )
    red = _reduction_enum(size_average, reduce, reduction)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")
    if type(input) is not torch.Tensor:
        # A DTensor sharded on the class dimension: the vocabulary-parallel
        # kernels (fusedloss.distributed), the result of torch's loss_parallel().
        from . import distributed

        if distributed.is_dtensor(input):
            loss = distributed.dtensor_cross_entropy(
                input, target, weight, ignore_index, red, label_smoothing, lse_square_scale, softcap, out_dtype
            )
            if loss is not None:
                return loss
    compiling = _compiling()
    if inplace_backward and compiling:
        inplace_backward = False
    if _transformed(compiling):
        return _decomposed(
            ops.cross_entropy_composite,
            input, target, weight, ignore_index, red, label_smoothing, lse_square_scale, softcap, False, out_dtype,
        )  # fmt: skip
    # torch refuses a class weight of another dtype for class indices (under
    # autocast, or with an out_dtype, the computation is fp32 for both): the
    # composite below raises torch's error.
    if (
        weight is None
        or weight.dtype == input.dtype
        or target.is_floating_point()
        or out_dtype is not None
        or _autocast(input)
    ):
        if _validation._enabled and input.device.type != "cpu" and not target.is_floating_point():
            _validation.check_class_indices(target, input.shape[0 if input.dim() == 1 else 1], ignore_index)
        try:
            return (ops.cross_entropy.default if compiling else eager.cross_entropy)(
                input, target, weight, ignore_index, red, label_smoothing, lse_square_scale, softcap,
                inplace_backward, out_dtype,
            )  # fmt: skip
        except _REFUSALS as e:
            if inplace_backward and isinstance(e, ValueError):
                raise  # the in-place gradient was refused: say why
            _on_refusal(e, input, "cross_entropy")
    return ops.cross_entropy_composite.default(
        input, target, weight, ignore_index, red, label_smoothing, lse_square_scale, softcap, False, out_dtype
    )


def hinge_embedding_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    margin: float = 1.0,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Hinge embedding loss in one fused pass (forward) and one (backward),
    where torch runs ~9 kernels and saves two masks.

    Same as :func:`torch.nn.functional.hinge_embedding_loss`, including targets
    outside {-1, 1} (both terms apply), broadcasting of input and target, a
    negative margin, NaN/inf propagation and the output dtype (the input's). The
    target gets no gradient, as in torch. ``out_dtype``: see the module
    docstring.
    """
    if has_torch_function_variadic(input, target):
        return handle_torch_function(
            hinge_embedding_loss,
            (input, target),
            input,
            target,
            margin=margin,
            size_average=size_average,
            reduce=reduce,
            reduction=reduction,
            out_dtype=out_dtype,
        )
    red = _reduction_enum(size_average, reduce, reduction)
    compiling = _compiling()
    if _transformed(compiling):
        return _decomposed(ops.hinge_embedding_composite, input, target, float(margin), red, out_dtype)
    try:
        x, y = _broadcast_pair(input, target)
        return (ops.hinge_embedding.default if compiling else eager.hinge_embedding)(
            x, y, float(margin), red, out_dtype
        )
    except _REFUSALS as e:
        _on_refusal(e, input, "hinge_embedding_loss")
    return ops.hinge_embedding_composite.default(input, target, float(margin), red, out_dtype)


def soft_margin_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Soft margin loss log(1 + exp(-y x)) in one fused pass per direction.

    Same as :func:`torch.nn.functional.soft_margin_loss` (target broadcast to the
    input's shape, output in the input's dtype, no gradient for the target).
    ``out_dtype``: see the module docstring.

    Deviation: fusedloss uses the stable form max(z, 0) + log1p(exp(-|z|)),
    z = -y x, so the loss stays finite where torch's log1p(exp(z)) overflows to
    inf (z > ~88 in fp32, pytorch#77529), and the gradient -y sigmoid(z) stays
    finite where torch's z / (1 + z) form gives NaN.
    """
    if has_torch_function_variadic(input, target):
        return handle_torch_function(
            soft_margin_loss,
            (input, target),
            input,
            target,
            size_average=size_average,
            reduce=reduce,
            reduction=reduction,
            out_dtype=out_dtype,
        )
    red = _reduction_enum(size_average, reduce, reduction)
    compiling = _compiling()
    if _transformed(compiling):
        return _decomposed(ops.soft_margin_composite, input, target, red, out_dtype)
    try:
        y = target if target.shape == input.shape else target.expand(input.shape)
        return (ops.soft_margin.default if compiling else eager.soft_margin)(input, y, red, out_dtype)
    except _REFUSALS as e:
        _on_refusal(e, input, "soft_margin_loss")
    # torch's own kernel (its errors for invalid arguments are its kernel's).
    return _as(torch._C._nn.soft_margin_loss(input, target, red), out_dtype)


def hinge_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    margin: float = 1.0,
    squared: bool = False,
    reduction: str = "mean",
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Binary SVM hinge loss ``max(0, margin - target * input)`` (torch has none),
    squared for the L2-SVM, in one fused pass per direction.

    ``target`` holds labels in {-1, +1} (other values are used as given);
    input and target broadcast. Equals the composite
    ``torch.clamp(margin - target * input, min=0)`` (``** 2`` when squared),
    including its dtype (also under autocast, where clamp keeps the input's
    dtype), its gradient (0 at the kink and at NaN, as torch.clamp's) and
    gradients with respect to both input and target. ``out_dtype``: see the
    module docstring.
    """
    if has_torch_function_variadic(input, target):
        return handle_torch_function(
            hinge_loss,
            (input, target),
            input,
            target,
            margin=margin,
            squared=squared,
            reduction=reduction,
            out_dtype=out_dtype,
        )
    red = _Reduction.get_enum(reduction)
    compiling = _compiling()
    if _transformed(compiling):
        return _decomposed(ops.hinge_composite, input, target, float(margin), bool(squared), red, out_dtype)
    try:
        x, y = _broadcast_pair(input, target)
        return (ops.hinge.default if compiling else eager.hinge)(x, y, float(margin), bool(squared), red, out_dtype)
    except _REFUSALS as e:
        _on_refusal(e, input, "hinge_loss")
    return ops.hinge_composite.default(input, target, float(margin), bool(squared), red, out_dtype)


def multi_margin_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    p: int = 1,
    margin: float = 1.0,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Multi-class margin loss with rows in parallel: one read of each row
    forward, one read and one write backward.

    Same as :func:`torch.nn.functional.multi_margin_loss` (p in {1, 2}, margin,
    class weight applied after the power, division by C, (C) and 0-d inputs,
    torch's errors). Beyond torch: fp16 and bf16 on the CPU, second derivatives
    (torch raises for them), and ``out_dtype`` (see the module docstring).

    Deviations: the mean of an empty batch is NaN and its sum 0 (torch returns
    an unspecified value for both: its CPU kernel leaves them unset). On CUDA
    an out-of-range class index gives NaN for its row instead of a device-side
    assert; ``fusedloss.set_validation(True)`` raises torch's
    ``RuntimeError: target out of range`` instead.
    """
    if has_torch_function_variadic(input, target, weight):
        return handle_torch_function(
            multi_margin_loss,
            (input, target, weight),
            input,
            target,
            p=p,
            margin=margin,
            weight=weight,
            size_average=size_average,
            reduce=reduce,
            reduction=reduction,
            out_dtype=out_dtype,
        )
    red = _reduction_enum(size_average, reduce, reduction)
    if p != 1 and p != 2:
        raise ValueError("only p == 1 and p == 2 supported")
    if weight is not None and weight.dim() != 1:
        raise ValueError("weight must be one-dimensional")
    compiling = _compiling()
    if _transformed(compiling):
        return _decomposed(ops.multi_margin_composite, input, target, int(p), float(margin), weight, red, out_dtype)
    # torch refuses a class weight of another dtype (under autocast, or with an
    # out_dtype, the computation is fp32 for both).
    if weight is None or weight.dtype == input.dtype or out_dtype is not None or _autocast(input):
        if _validation._enabled and input.device.type != "cpu":
            _validation.check_multi_margin_targets(target, input.shape[-1] if input.dim() else 1)
        try:
            return (ops.multi_margin.default if compiling else eager.multi_margin)(
                input, target, int(p), float(margin), weight, red, out_dtype
            )
        except _REFUSALS as e:
            _on_refusal(e, input, "multi_margin_loss")
    # torch's own kernel (its errors for invalid arguments are its kernel's).
    return _as(torch._C._nn.multi_margin_loss(input, target, p, margin, weight, red), out_dtype)


# ---------------------------------------------------------------------------
# sigmoid_focal_loss (torchvision's), multilabel_soft_margin_loss, and
# distillation on logits (kl_div_with_logits, jsd_with_logits)
# ---------------------------------------------------------------------------

__all__ += ["jsd_with_logits", "kl_div_with_logits", "multilabel_soft_margin_loss", "sigmoid_focal_loss"]


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2,
    reduction: str = "none",
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sigmoid focal loss (RetinaNet, https://arxiv.org/abs/1708.02002) in one
    fused pass forward and one backward, where torchvision runs ~7 ops and
    saves full-size intermediates for its backward.

    Same as :func:`torchvision.ops.sigmoid_focal_loss`: arguments, defaults
    (``reduction="none"``), output dtype (inputs and targets promoted) and
    shape, and its errors (``alpha`` outside [0, 1] other than -1, targets of
    another shape, an invalid reduction, raised after the loss is computed as
    torchvision does). ``alpha=-1`` turns the class weight off; ``gamma=0`` is
    BCE with logits. Gradients reach ``inputs`` and (soft) ``targets``.
    Computed in fp32 (fp64 if either is fp64) and rounded once;
    ``out_dtype``: see the module docstring. Under ``torch.autocast`` the
    loss is fp32, as torchvision's (its BCE runs in fp32).

    Deviations: ``1 - p_t`` is formed as ``sigmoid(x) (1 - t) + sigmoid(-x) t``,
    exact where torchvision's ``1 - (p t + (1 - p)(1 - t))`` rounds to 0 (a
    confident correct prediction, |x| > ~17 in fp32): there fusedloss gives the
    true, tiny loss and gradient (below 1e-20) where torchvision gives 0, and
    for ``gamma < 1`` a finite gradient where torchvision's is NaN (the
    gradient of ``0 ** gamma``). fp16/bf16 inputs are computed in fp32, not
    rounded op by op.
    """
    if has_torch_function_variadic(inputs, targets):
        return handle_torch_function(
            sigmoid_focal_loss,
            (inputs, targets),
            inputs,
            targets,
            alpha=alpha,
            gamma=gamma,
            reduction=reduction,
            out_dtype=out_dtype,
        )
    # torchvision's checks, in its order.
    if not (0 <= alpha <= 1) and alpha != -1:
        raise ValueError(f"Invalid alpha value: {alpha}. alpha must be in the range [0,1] or -1 for ignore.")
    if not (targets.size() == inputs.size()):
        raise ValueError(f"Target size ({targets.size()}) must be the same as input size ({inputs.size()})")
    red = _REDUCTIONS.get(reduction) if isinstance(reduction, str) else None
    a, g = float(alpha), float(gamma)
    if red is None:
        # torchvision computes the loss before it looks at the reduction.
        ops.sigmoid_focal_composite.default(inputs, targets, a, g, 0, out_dtype)
        raise ValueError(
            f"Invalid Value for arg 'reduction': '{reduction} \n Supported reduction modes: 'none', 'mean', 'sum'"
        )
    compiling = _compiling()
    if _transformed(compiling):
        return _decomposed(ops.sigmoid_focal_composite, inputs, targets, a, g, red, out_dtype)
    try:
        return (ops.sigmoid_focal.default if compiling else eager.sigmoid_focal)(inputs, targets, a, g, red, out_dtype)
    except _REFUSALS as e:
        _on_refusal(e, inputs, "sigmoid_focal_loss")
    return ops.sigmoid_focal_composite.default(inputs, targets, a, g, red, out_dtype)


def multilabel_soft_margin_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Multilabel soft margin loss: per row (the last dim) the mean of
    ``-(y log sigmoid(x) + (1 - y) log sigmoid(-x))``, weighted, in one fused
    pass forward (one read of each row) and one backward.

    Same as :func:`torch.nn.functional.multilabel_soft_margin_loss`: class
    ``weight`` (broadcast against the input; its gradient when it requires
    grad, through torch's composite), the mean over classes then the
    reduction, soft and integer (multi-hot) targets (broadcast to the input),
    gradients for input and floating targets, inputs of any rank (the class
    dim is the last), torch's dtype and errors (an invalid reduction is
    raised after the loss is computed, as torch does). ``out_dtype``: see the
    module docstring. Under CPU autocast the loss keeps the input's dtype, and
    under CUDA autocast it is fp32, as torch's.

    Deviations: fp16/bf16 inputs are computed in fp32 and rounded once (torch
    rounds every intermediate to the input's dtype); integer targets are read
    as one fp32 (fp64) copy.
    """
    if has_torch_function_variadic(input, target, weight):
        return handle_torch_function(
            multilabel_soft_margin_loss,
            (input, target, weight),
            input,
            target,
            weight=weight,
            size_average=size_average,
            reduce=reduce,
            reduction=reduction,
            out_dtype=out_dtype,
        )
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    red = _REDUCTIONS.get(reduction) if isinstance(reduction, str) else None
    if red is None:
        # torch computes the loss (and raises its errors) before it looks at the reduction.
        ops.multilabel_soft_margin_composite.default(input, target, weight, 0, out_dtype)
        raise ValueError(reduction + " is not valid")
    compiling = _compiling()
    if _transformed(compiling):
        return _decomposed(ops.multilabel_soft_margin_composite, input, target, weight, red, out_dtype)
    if input.dim() >= 1:
        try:
            # A broadcast target is read in place; autograd sums its gradient back.
            y = target if target.shape == input.shape else target.expand(input.shape)
            return (ops.multilabel_soft_margin.default if compiling else eager.multilabel_soft_margin)(
                input, y, weight, red, out_dtype
            )
        except _REFUSALS as e:
            _on_refusal(e, input, "multilabel_soft_margin_loss")
    return ops.multilabel_soft_margin_composite.default(input, target, weight, red, out_dtype)


_DISTILL_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2, "batchmean": 3}

_DISTILL_DOC = """
    Both logits have the same shape ``(..., C)``; the class dim is the last
    (``(N, C)``, or ``(B, S, V)`` for language models, read with its strides,
    e.g. a ``logits[:, :-1]`` slice, without a copy). Each row is a position;
    ``P = softmax(teacher_logits / T)``, ``Q = softmax(student_logits / T)``,
    ``T = temperature > 0``. Computed in one read of both rows forward (both
    log-sum-exps online, fp32 registers for fp16/bf16/fp32, fp64 for fp64)
    and one read of both rows plus one write per gradient backward; only the
    logits, the target and six fp32 values per row are saved. Gradients reach
    ``student_logits``, and ``teacher_logits`` when it requires grad.

    * **T^2 scaling**: the loss is ``T**2`` times the divergence (Hinton et
      al.), so gradient magnitudes do not shrink as ``1/T**2`` when T grows.
    * **target, ignore_index**: with ``target`` (integer, shape ``(...)``), rows
      whose target equals ``ignore_index`` are skipped: no loss, not counted by
      the means, gradients exactly 0 (also where their logits are NaN).
      ``target=None`` keeps every row.
    * **reduction**: ``"batchmean"`` (default) divides the sum of the row
      losses by the number of kept rows: per token for ``(B, S, V)`` logits,
      as cross_entropy's mean over non-ignored targets, so the loss does not
      scale with padding and mixes with a cross-entropy term at a fixed
      weight. (``torch.nn.functional.kl_div``'s batchmean divides by
      ``input.size(0)``: the same for ``(N, C)`` logits without ignored rows,
      B instead of B*S for 3-d ones.) ``"mean"`` divides by kept rows times C,
      as kl_div's elementwise mean; ``"sum"`` sums; ``"none"`` returns the
      per-row losses, shape ``(...)`` (kl_div's ``"none"`` is per element: the
      fused op never writes an ``(..., C)`` loss).
    * **All rows ignored**: the means are NaN (0/0, as cross_entropy's with
      every target ignored) with zero gradients; ``"sum"`` is 0.
    * **Masked classes** (``-inf`` logits): ``0 log 0 = 0``, so a class with
      no probability contributes nothing (masked in both, or only in the
      distribution the KL is taken from). A KL is ``+inf`` where its second
      distribution masks a class the first has mass on (forward KL: the
      student masks a class the teacher does not); the second's gradient stays
      finite there, ``T (Q - P)``, and the first's is NaN for that row. JSD
      stays finite (M has mass wherever P or Q has). A row of all ``-inf``
      logits gives NaN.
    * **fp16/bf16** logits are read as they are and computed in fp32 (no
      rounding of the scaled logits or probabilities to the input dtype); the
      loss has the logits' dtype (``out_dtype`` to choose; teacher and student
      of different dtypes are promoted, with one converted copy). Under
      ``torch.autocast`` the loss is fp32, as torch's composite (log_softmax,
      kl_div) is.
"""


def _distill(student_logits, teacher_logits, target, beta, temperature, reduction, ignore_index, out_dtype, name):
    red = _DISTILL_REDUCTIONS.get(reduction) if isinstance(reduction, str) else None
    if red is None:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{name}: student_logits of shape {tuple(student_logits.shape)} and teacher_logits of shape "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if student_logits.dim() < 1:
        raise ValueError(f"{name}: the logits need a class dimension (the last), got a 0-d tensor")
    if not (0.0 < float(temperature) < float("inf")):
        raise ValueError(f"{name}: temperature must be a positive number, got {temperature}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"{name}: beta must be in [0, 1], got {beta}")
    if target is not None:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f"{name}: target must hold integer class indices, got {target.dtype}")
        if target.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"{name}: target of shape {tuple(target.shape)} must have the logits' leading shape "
                f"{tuple(student_logits.shape[:-1])}"
            )
    args = (float(beta), float(temperature), int(ignore_index), red, out_dtype)
    compiling = _compiling()
    if _transformed(compiling):
        return _decomposed(ops.distill_composite, student_logits, teacher_logits, target, *args)
    try:
        return (ops.distill.default if compiling else eager.distill)(student_logits, teacher_logits, target, *args)
    except _REFUSALS as e:
        _on_refusal(e, student_logits, name)
    return ops.distill_composite.default(student_logits, teacher_logits, target, *args)


def kl_div_with_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    target: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    if has_torch_function_variadic(student_logits, teacher_logits, target):
        return handle_torch_function(
            kl_div_with_logits,
            (student_logits, teacher_logits, target),
            student_logits,
            teacher_logits,
            temperature=temperature,
            reduction=reduction,
            ignore_index=ignore_index,
            target=target,
            out_dtype=out_dtype,
        )
    return _distill(
        student_logits, teacher_logits, target, 0.0, temperature, reduction, ignore_index, out_dtype,
        "kl_div_with_logits",
    )  # fmt: skip


kl_div_with_logits.__doc__ = (
    """Knowledge distillation loss: the forward KL divergence of the student's
    softmax from the teacher's, ``T**2 * KL(P || Q)``, per row
    ``sum_c P_c (log P_c - log Q_c)``. Equals
    ``kl_div(log_softmax(s / T, -1), log_softmax(t / T, -1), log_target=True,
    reduction="batchmean") * T**2`` for ``(N, C)`` logits (5+ passes and an fp32
    copy per input in torch).
"""
    + _DISTILL_DOC
)


def jsd_with_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    target: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    if has_torch_function_variadic(student_logits, teacher_logits, target):
        return handle_torch_function(
            jsd_with_logits,
            (student_logits, teacher_logits, target),
            student_logits,
            teacher_logits,
            beta=beta,
            temperature=temperature,
            reduction=reduction,
            ignore_index=ignore_index,
            target=target,
            out_dtype=out_dtype,
        )
    return _distill(
        student_logits, teacher_logits, target, beta, temperature, reduction, ignore_index, out_dtype,
        "jsd_with_logits",
    )  # fmt: skip


jsd_with_logits.__doc__ = (
    """Generalised Jensen-Shannon divergence between the teacher's and the
    student's softmax, ``T**2 * JSD_beta``, per row

        JSD_beta(P, Q) = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q

    with P the teacher's distribution and Q the student's (the definition of
    GKD, Agarwal et al. 2024, as in TRL and Liger-Kernel). ``beta=0.5`` is the
    symmetric JSD. The endpoints are the limits of JSD_beta / beta and
    JSD_beta / (1 - beta), not the formula's value there (which is 0):
    ``beta=0`` is the forward KL, ``KL(P || Q)`` (teacher || student, exactly
    :func:`kl_div_with_logits`), and ``beta=1`` the reverse KL,
    ``KL(Q || P)`` (student || teacher). ``beta`` must lie in [0, 1]. In the
    fused forward the mixture needs both rows normalised first, so JSD reads
    each row twice (the second time from cache).
"""
    + _DISTILL_DOC
)


# Fused linear + cross entropy (fusedloss/linear_cross_entropy.py).
from .linear_cross_entropy import linear_cross_entropy  # noqa: E402, F401

__all__.append("linear_cross_entropy")
