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

from . import _checks
from .autograd import BCEWithLogitsFunction, MSEFunction, eager_or_compiled

__all__ = ["binary_cross_entropy_with_logits", "mse_loss"]


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


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
    if size_average is not None or reduce is not None:
        reduction_enum = _Reduction.legacy_get_enum(size_average, reduce)
    else:
        reduction_enum = _Reduction.get_enum(reduction)
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
            _cast(expanded_input, dtype), _cast(expanded_target, dtype), _cast(weight.expand(expanded_input.shape), dtype), 2
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
