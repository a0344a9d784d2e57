"""Drop-in replacements for torch.nn.functional losses.

Every function has torch's name, signature, defaults, output dtype and shape,
and raises torch's exception type and message for bad input. Deviations from
torch are listed in each docstring.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn.functional as _F
from torch.nn import _reduction as _Reduction
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _checks, _composite, _validation
from .autograd import (
    _REDUCTION_NAMES,
    BCEWithLogitsFunction,
    CrossEntropyFunction,
    HingeEmbeddingFunction,
    HingeFunction,
    MSEFunction,
    MultiMarginFunction,
    SoftMarginFunction,
    eager_or_compiled,
)

__all__ = [
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "hinge_embedding_loss",
    "hinge_loss",
    "mse_loss",
    "multi_margin_loss",
    "soft_margin_loss",
]


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _legacy_reduction(size_average, reduce, reduction) -> int:
    if size_average is not None or reduce is not None:
        return _Reduction.legacy_get_enum(size_average, reduce)
    return _Reduction.get_enum(reduction)


def _autocast_fp32(*tensors):
    """torch runs its losses in fp32 inside torch.autocast (on the CPU and on
    CUDA); fusedloss does the same, so that mixed-precision code gets the
    dtypes, values and gradients it got from torch. fp64 stays fp64, as in
    autocast."""
    device = next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), "cpu")
    try:
        enabled = torch.is_autocast_enabled(device)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return tensors
    if not enabled:
        return tensors
    return tuple(
        t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors
    )


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sigmoid + binary cross entropy in one fused pass (forward) and one (backward).

    Same as :func:`torch.nn.functional.binary_cross_entropy_with_logits`:
    ``weight`` and ``pos_weight`` broadcast against the target (a 1-D
    ``pos_weight`` along the last dim), ``mean`` divides by the element count,
    the output has the target's dtype, and gradients reach ``input`` and
    ``target``. Computed in fp32 (fp64 for double) and rounded once.

    Deviation: with mixed input/target dtypes torch rounds intermediates to the
    target's dtype; fusedloss computes in the wider dtype and rounds only the
    result (differences are within one unit of the output dtype).
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
        )
    reduction_enum = _legacy_reduction(size_average, reduce, reduction)
    if not (target.size() == input.size()):
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    _checks.no_requires_grad("binary_cross_entropy_with_logits", weight=weight, pos_weight=pos_weight)
    if not (
        input.is_floating_point()
        and target.is_floating_point()
        and _checks.same_device(input, target, weight, pos_weight)
    ):
        _checks.raise_native(_F.binary_cross_entropy_with_logits, input, target, weight=weight, pos_weight=pos_weight)
    # torch computes log_sigmoid(input).mul_((pos_weight - 1).mul(target) + 1), then
    # loss.mul_(weight): these are its broadcast errors, in its order.
    if pos_weight is not None:
        _checks.inplace_broadcast(input.shape, _checks.broadcast_shape(pos_weight.shape, target.shape))
    if weight is not None:
        _checks.inplace_broadcast(input.shape, weight.shape)

    input, target, weight, pos_weight = _autocast_fp32(input, target, weight, pos_weight)
    dtype = torch.promote_types(input.dtype, target.dtype)
    loss = eager_or_compiled(BCEWithLogitsFunction).apply(
        _cast(input, dtype), _cast(target, dtype), _cast(weight, dtype), _cast(pos_weight, dtype), reduction_enum
    )
    return _cast(loss, target.dtype)


def _mse_loss(input, target, size_average, reduce, reduction, weight):
    if target.size() != input.size():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=3,
        )
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    expanded_input, expanded_target = torch.broadcast_tensors(input, target)
    input, target, weight, expanded_input, expanded_target = _autocast_fp32(
        input, target, weight, expanded_input, expanded_target
    )

    if weight is not None:
        if weight.size() != input.size():
            raise ValueError("Weights and input must have the same size.")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"Invalid reduction mode: {reduction}. Expected one of 'none', 'mean', 'sum'.")
        reduction_enum = _Reduction.get_enum(reduction)
        dtype = torch.promote_types(torch.promote_types(input.dtype, target.dtype), weight.dtype)
    else:
        reduction_enum = _Reduction.get_enum(reduction)
        dtype = torch.promote_types(input.dtype, target.dtype)
    if not (dtype.is_floating_point and _checks.same_device(input, target, weight)):
        if weight is None:
            _checks.raise_native(torch._C._nn.mse_loss, expanded_input, expanded_target, reduction_enum)
        _checks.raise_native(lambda x, y, w: (x - y) ** 2 * w, expanded_input, expanded_target, weight)
        raise RuntimeError(f"mse_loss: unsupported dtype {dtype}")  # pragma: no cover (torch raised above)

    if weight is not None and weight.shape != expanded_input.shape and reduction_enum == 1:
        # torch divides by the sum of the weight as given, not of its broadcast
        # (the rare, warned path: a target of another shape).
        loss, _ = eager_or_compiled(MSEFunction).apply(
            _cast(expanded_input, dtype),
            _cast(expanded_target, dtype),
            _cast(weight.expand(expanded_input.shape), dtype),
            2,
        )
        return loss / _cast(weight, dtype).sum()
    if weight is not None:
        weight = weight.expand(expanded_input.shape)
    loss, _ = eager_or_compiled(MSEFunction).apply(
        _cast(expanded_input, dtype), _cast(expanded_target, dtype), _cast(weight, dtype), reduction_enum
    )
    return loss


_MSE_DOC = """Squared error in one fused pass (forward) and one (backward).

    Same as :func:`torch.nn.functional.mse_loss`, including the UserWarning and
    broadcasting when target and input shapes differ (the target's gradient is
    summed back to its shape) and, on torch >= 2.13, ``weight=`` (a weighted mean
    divides by ``weight.sum()``). This function has ``weight`` exactly when the
    installed torch's ``mse_loss`` has it. Accumulates in fp32 (fp64 for double).

    Deviation: a weighted mean keeps ``weight.sum()`` in fp32 for fp16/bf16
    inputs where torch rounds it to the input dtype first.
    """

if "weight" in inspect.signature(_F.mse_loss).parameters:

    def mse_loss(
        input: torch.Tensor,
        target: torch.Tensor,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        weight: torch.Tensor | None = None,
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
            )
        return _mse_loss(input, target, size_average, reduce, reduction, weight)

else:

    def mse_loss(
        input: torch.Tensor,
        target: torch.Tensor,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        if has_torch_function_variadic(input, target):
            return handle_torch_function(
                mse_loss,
                (input, target),
                input,
                target,
                size_average=size_average,
                reduce=reduce,
                reduction=reduction,
            )
        return _mse_loss(input, target, size_average, reduce, reduction, None)


mse_loss.__doc__ = _MSE_DOC


def _cross_entropy_plan(input, target, weight, ignore_index, label_smoothing, inplace_backward):
    """The tensors the fused op takes for this call, or None when the call is
    invalid (torch then raises its own error) or outside what the kernels take
    (torch's composite computes it)."""
    if not (isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)):
        return None
    if input.dim() < 1 or not input.is_floating_point() or not _checks.same_device(input, target, weight):
        return None
    c = input.shape[0] if input.dim() == 1 else input.shape[1]
    if c == 0 or label_smoothing > 1.0:
        return None
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != c or not weight.is_floating_point()):
        return None
    if target.shape == input.shape:
        # Class probabilities. torch has a derivative for weight here; the
        # fused kernels do not, so a weight that requires grad goes composite.
        if not target.is_floating_point() or ignore_index >= 0:
            return None
        if weight is not None and weight.requires_grad and torch.is_grad_enabled():
            return None
        dtype = torch.promote_types(input.dtype, target.dtype)
        if weight is not None:
            dtype = torch.promote_types(dtype, weight.dtype)
        return _cast(input, dtype), _cast(target, dtype), _cast(weight, dtype)
    if target.dtype not in (torch.int64, torch.uint8):
        return None
    if input.dim() == 1:
        if not (target.dim() == 0 or (target.dim() == 1 and target.shape[0] == 1)):
            return None
    elif input.dim() == 2:
        if target.dim() != 1 or target.shape[0] != input.shape[0]:
            return None
    elif target.shape != (input.shape[0], *input.shape[2:]):
        return None
    if weight is not None and (weight.dtype != input.dtype or (weight.requires_grad and torch.is_grad_enabled())):
        return None
    if _validation.wanted(input):
        _validation.check_class_indices(target, c, ignore_index)
    return input, target if target.dtype == torch.int64 else target.long(), weight


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
) -> torch.Tensor:
    """Softmax + cross entropy: one read of the logits forward, one read and one
    write backward; only the logits, targets and an fp32 log-sum-exp per row are
    kept for backward.

    Same as :func:`torch.nn.functional.cross_entropy` for class-index targets
    (int64 or uint8) and class-probability targets, ``weight``,
    ``ignore_index``, ``label_smoothing`` and every reduction, on (C), (N, C) and
    (N, C, d1, ..., dK) inputs of any strides. Extras, off by default:

    * ``lse_square_scale`` (z-loss): each sample's loss gains
      ``lse_square_scale * logsumexp(x)**2`` (times the target's class weight for
      class-index targets); ignored samples gain nothing; the mean divides by
      torch's denominator.
    * ``softcap``: the logits become ``softcap * tanh(x / softcap)`` first.
    * ``inplace_backward``: the gradient is written over the logits, saving one
      logits-sized buffer. The logits' version counter is bumped, so autograd
      raises if anything else saved them for backward; the logits must not be a
      leaf. Ignored under torch.compile.

    Deviations from torch: an out-of-range class index on CUDA gives a NaN loss
    and NaN gradients for that row instead of a device-side assert (which
    would end the process's CUDA context); ``fusedloss.set_validation(True)`` or
    ``FUSEDLOSS_VALIDATE=1`` checks on the host and raises torch's IndexError
    (at the cost of a device sync). The CPU always raises. Rows whose target is
    ignored get a gradient of exactly 0 even when their logits are NaN. A
    probability-target call whose weight requires grad is computed by torch's
    composite ops (the fused kernels have no weight gradient).
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
        )
    reduction_enum = _legacy_reduction(size_average, reduce, reduction)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")
    if inplace_backward and input.requires_grad and input.is_leaf:
        raise ValueError(
            "inplace_backward=True writes the gradient over the logits, so they cannot be a leaf tensor "
            "(its .grad would alias its data); use it for logits computed by the model"
        )
    input, target, weight = _autocast_fp32(input, target, weight)
    plan = _cross_entropy_plan(input, target, weight, ignore_index, label_smoothing, inplace_backward)
    if plan is None:
        return _composite.cross_entropy(
            input,
            target,
            weight,
            ignore_index,
            _REDUCTION_NAMES[reduction_enum],
            label_smoothing,
            lse_square_scale,
            softcap,
        )
    x, t, w = plan
    inplace = bool(inplace_backward) and not torch.compiler.is_compiling()
    loss = eager_or_compiled(CrossEntropyFunction).apply(
        x,
        t,
        w,
        ignore_index,
        reduction_enum,
        float(label_smoothing),
        float(lse_square_scale),
        None if softcap is None else float(softcap),
        inplace,
    )[0]
    return loss


def hinge_embedding_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    margin: float = 1.0,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Hinge embedding loss in one fused pass (forward) and one (backward),
    where torch runs ~9 kernels and saves two masks.

    Same as :func:`torch.nn.functional.hinge_embedding_loss`, including targets
    outside {-1, 1} (both terms apply), broadcasting of input and target, a
    negative margin, NaN/inf propagation and the output dtype (the input's). The
    target gets no gradient, as in torch.
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
        )
    reduction_enum = _legacy_reduction(size_average, reduce, reduction)
    # torch's first broadcast is where(target != 1, ...): target is tensor a.
    _checks.broadcast_shape(target.shape, input.shape)
    input, target = _autocast_fp32(input, target)
    if not (input.is_floating_point() and not target.is_complex() and _checks.same_device(input, target)):
        return _F.hinge_embedding_loss(input, target, margin, reduction=_REDUCTION_NAMES[reduction_enum])
    dtype = torch.promote_types(input.dtype, target.dtype) if target.is_floating_point() else input.dtype
    x, y = torch.broadcast_tensors(input, target)
    loss = eager_or_compiled(HingeEmbeddingFunction).apply(
        _cast(x, dtype), _cast(y, dtype).detach(), float(margin), reduction_enum
    )
    return _cast(loss, input.dtype)


def soft_margin_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Soft margin loss log(1 + exp(-y x)) in one fused pass per direction.

    Same as :func:`torch.nn.functional.soft_margin_loss` (target broadcast to the
    input's shape, output in the input's dtype, no gradient for the target).

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
        )
    reduction_enum = _legacy_reduction(size_average, reduce, reduction)
    _checks.no_requires_grad("soft_margin_loss", target=target)
    _checks.inplace_broadcast(input.shape, target.shape)
    input, target = _autocast_fp32(input, target)
    if not (input.is_floating_point() and not target.is_complex() and _checks.same_device(input, target)):
        return _F.soft_margin_loss(input, target, reduction=_REDUCTION_NAMES[reduction_enum])
    dtype = torch.promote_types(input.dtype, target.dtype) if target.is_floating_point() else input.dtype
    loss = eager_or_compiled(SoftMarginFunction).apply(
        _cast(input, dtype), _cast(target.expand(input.shape), dtype), reduction_enum
    )
    return _cast(loss, input.dtype)


def hinge_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    margin: float = 1.0,
    squared: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary SVM hinge loss ``max(0, margin - target * input)`` (torch has none),
    squared for the L2-SVM, in one fused pass per direction.

    ``target`` holds labels in {-1, +1} (other values are used as given);
    input and target broadcast. Equals the composite
    ``torch.clamp(margin - target * input, min=0)`` (``** 2`` when squared),
    including its dtype, its gradient (0 at the kink and at NaN, as
    torch.clamp's) and gradients with respect to both input and target.
    """
    if has_torch_function_variadic(input, target):
        return handle_torch_function(
            hinge_loss, (input, target), input, target, margin=margin, squared=squared, reduction=reduction
        )
    reduction_enum = _Reduction.get_enum(reduction)
    x, y = torch.broadcast_tensors(input, target)
    dtype = torch.promote_types(input.dtype, target.dtype)
    if not (dtype.is_floating_point and _checks.same_device(input, target)):
        return _composite.hinge_loss(input, target, margin, squared, reduction)
    return eager_or_compiled(HingeFunction).apply(
        _cast(x, dtype), _cast(y, dtype), float(margin), bool(squared), reduction_enum
    )


def _multi_margin_supported(input, target, weight) -> bool:
    if not (input.is_floating_point() and input.dim() <= 2 and _checks.same_device(input, target, weight)):
        return False
    if input.dim() == 2 and input.shape[1] == 0 or input.dim() == 1 and input.shape[0] == 0:
        return False
    if target.dtype != torch.int64:
        return False
    if input.dim() == 2:
        if target.dim() != 1 or target.shape[0] != input.shape[0]:
            return False
    elif target.numel() != 1 or target.dim() > 1:
        return False
    if weight is not None:
        c = input.shape[-1] if input.dim() else 1
        if weight.shape != (c,) or weight.dtype != input.dtype or (weight.requires_grad and torch.is_grad_enabled()):
            return False
    return True


def multi_margin_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    p: int = 1,
    margin: float = 1.0,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Multi-class margin loss with rows in parallel: one read of each row
    forward, one read and one write backward.

    Same as :func:`torch.nn.functional.multi_margin_loss` (p in {1, 2}, margin,
    class weight applied after the power, division by C, (C) and 0-d inputs,
    torch's errors). Beyond torch: fp16 and bf16 on the CPU, and second
    derivatives (torch raises for them).

    Deviations: the mean of an empty batch is NaN (torch returns an unspecified
    value). On CUDA an out-of-range class index gives NaN for its row instead of
    a device-side assert; ``fusedloss.set_validation(True)`` raises torch's
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
        )
    reduction_enum = _legacy_reduction(size_average, reduce, reduction)
    if p != 1 and p != 2:
        raise ValueError("only p == 1 and p == 2 supported")
    if weight is not None:
        if weight.dim() != 1:
            raise ValueError("weight must be one-dimensional")
    input, weight = _autocast_fp32(input, weight)
    if not _multi_margin_supported(input, target, weight):
        # Invalid arguments: torch raises its own error.
        return _F.multi_margin_loss(input, target, p, margin, weight, reduction=_REDUCTION_NAMES[reduction_enum])
    if _validation.wanted(input):
        _validation.check_multi_margin_targets(target, input.shape[-1] if input.dim() else 1)
    return eager_or_compiled(MultiMarginFunction).apply(input, target, int(p), float(margin), weight, reduction_enum)
