"""Public torch.autograd.Function classes, one per loss.

Each forward is one fused op (torch.ops.fusedloss.*) and each backward one fused
op. They take already-validated tensors of one floating dtype and an integer
reduction (0 none, 1 mean, 2 sum); fusedloss.functional does the validation,
dtype promotion and broadcasting that torch.nn.functional does, and is what most
code should call.

Higher-order derivatives: when a backward runs with create_graph=True, the
first derivative is recomputed from the loss written as differentiable
composite torch ops (the native torch loss where its semantics are ours), so
second and higher derivatives are exact. That path is for gradient penalties
and gradgradcheck; training never takes it. Forward-mode AD (jvp) is derived
from the fused backward op.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ._ops import ops

__all__ = ["BCEWithLogitsFunction", "MSEFunction"]

_REDUCTION_NAMES = {0: "none", 1: "mean", 2: "sum"}


def composite_backward(
    loss_fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor | None],
    needs: Sequence[bool],
    grad: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of loss_fn(*inputs) for the inputs in `needs`, as a differentiable
    graph (the create_graph=True path)."""
    wanted = [t for t, n in zip(inputs, needs) if n]
    with torch.enable_grad():
        loss = loss_fn(*inputs)
        grads = iter(torch.autograd.grad(loss, wanted, grad, create_graph=True, allow_unused=True))
    out = []
    for t, n in zip(inputs, needs):
        if not n:
            out.append(None)
            continue
        g = next(grads)
        out.append(torch.zeros_like(t) if g is None else g)
    return tuple(out)


def ones_grad(input: torch.Tensor, reduction: int) -> torch.Tensor:
    """grad_output = 1 for the loss's output shape (the derivative itself)."""
    return torch.ones(input.shape if reduction == 0 else (), dtype=input.dtype, device=input.device)


def contract(derivs: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor | None], reduction: int, like: torch.Tensor):
    """Tangent of the loss from its per-element derivatives and input tangents."""
    out = None
    for d, t in zip(derivs, tangents):
        if t is None:
            continue
        term = d * t
        out = term if out is None else out + term
    if out is None:
        return torch.zeros_like(like)
    return out if reduction == 0 else out.sum().to(like.dtype)


class BCEWithLogitsFunction(torch.autograd.Function):
    """Sigmoid + binary cross entropy, fused: apply(input, target, weight, pos_weight, reduction).

    input and target have one shape and one floating dtype; weight and pos_weight
    (either may be None) broadcast to that shape and share the dtype. Gradients
    flow to input and target; weight and pos_weight take none (as in torch).
    """

    @staticmethod
    def forward(input, target, weight, pos_weight, reduction):
        return ops.bce_with_logits(input, target, weight, pos_weight, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, pos_weight, reduction = inputs
        ctx.save_for_backward(input, target, weight, pos_weight)
        ctx.save_for_forward(input, target, weight, pos_weight)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx, grad):
        input, target, weight, pos_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():
            reduction = _REDUCTION_NAMES[ctx.reduction]
            gx, gy = composite_backward(
                lambda x, y: F.binary_cross_entropy_with_logits(
                    x, y, weight, reduction=reduction, pos_weight=pos_weight
                ),
                (input, target),
                needs,
                grad,
            )
        else:
            gx, gy = ops.bce_with_logits_backward(grad, input, target, weight, pos_weight, ctx.reduction, list(needs))
            gx = gx if needs[0] else None
            gy = gy if needs[1] else None
        return gx, gy, None, None, None

    @staticmethod
    def jvp(ctx, t_input, t_target, t_weight, t_pos_weight, _):
        input, target, weight, pos_weight = ctx.saved_tensors
        mask = [t_input is not None, t_target is not None]
        d = ops.bce_with_logits_backward(
            ones_grad(input, ctx.reduction), input, target, weight, pos_weight, ctx.reduction, mask
        )
        return contract(d, (t_input, t_target), ctx.reduction, input if ctx.reduction == 0 else input.new_empty(()))


class MSEFunction(torch.autograd.Function):
    """Squared error, fused: apply(input, target, weight, reduction) -> (loss, denominator).

    input, target and weight (or None) have one shape and one floating dtype.
    With a weight, mean divides by sum(weight) (torch >= 2.13 semantics) and
    `denominator` is that sum (not differentiable); otherwise it is empty.
    Gradients flow to input, target and weight.
    """

    @staticmethod
    def forward(input, target, weight, reduction):
        return ops.mse(input, target, weight, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, reduction = inputs
        loss, denominator = output
        ctx.mark_non_differentiable(denominator)
        weighted_mean = weight is not None and reduction == 1
        saved = (input, target, weight, loss if weighted_mean else None, denominator if weighted_mean else None)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx, grad, _grad_denominator):
        input, target, weight, loss, denominator = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            reduction = _REDUCTION_NAMES[ctx.reduction]

            def loss_fn(x, y, w):
                if w is None:
                    return F.mse_loss(x, y, reduction=reduction)
                se = (x - y) ** 2 * w
                if ctx.reduction == 0:
                    return se
                return se.sum() / w.sum() if ctx.reduction == 1 else se.sum()

            return composite_backward(loss_fn, (input, target, weight), needs, grad) + (None,)
        gx, gy, gw = ops.mse_backward(grad, input, target, weight, loss, denominator, ctx.reduction, list(needs))
        return (gx if needs[0] else None, gy if needs[1] else None, gw if needs[2] else None, None)

    @staticmethod
    def jvp(ctx, t_input, t_target, t_weight, _):
        input, target, weight, loss, denominator = ctx.saved_tensors
        mask = [t_input is not None, t_target is not None, t_weight is not None]
        d = ops.mse_backward(
            ones_grad(input, ctx.reduction), input, target, weight, loss, denominator, ctx.reduction, mask
        )
        like = input if ctx.reduction == 0 else input.new_empty(())
        t_loss = contract(d, (t_input, t_target, t_weight), ctx.reduction, like)
        return t_loss, None
