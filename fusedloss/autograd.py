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
from the fused backward op; it is available through fusedloss.functional (the
classes here leave jvp out because torch.compile cannot trace it).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import _composite
from ._ops import CLAMP_GRAD_AT_BOUND, ops

__all__ = [
    "BCEWithLogitsFunction",
    "CrossEntropyFunction",
    "HingeEmbeddingFunction",
    "HingeFunction",
    "MSEFunction",
    "MultiMarginFunction",
    "SoftMarginFunction",
]


_REDUCTION_NAMES = {0: "none", 1: "mean", 2: "sum"}


def composite_backward(
    loss_fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor | None],
    needs: Sequence[bool],
    grad: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of loss_fn(*inputs) for the inputs in `needs`, as a differentiable
    graph (the create_graph=True path)."""
    wanted = [t for t, n in zip(inputs, needs, strict=True) if n]
    with torch.enable_grad():
        loss = loss_fn(*inputs)
        grads = iter(torch.autograd.grad(loss, wanted, grad, create_graph=True, allow_unused=True))
    out = []
    for t, n in zip(inputs, needs, strict=True):
        if not n:
            out.append(None)
            continue
        g = next(grads)
        out.append(torch.zeros_like(t) if g is None else g)
    return tuple(out)


def ones_grad(input: torch.Tensor, reduction: int) -> torch.Tensor:
    """grad_output = 1 for the loss's output shape (the derivative itself)."""
    return torch.ones(input.shape if reduction == 0 else (), dtype=input.dtype, device=input.device)


def contract(
    derivs: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor | None], reduction: int, like: torch.Tensor
):
    """Tangent of the loss from its per-element derivatives and input tangents."""
    out = None
    for d, t in zip(derivs, tangents, strict=True):
        if t is None:
            continue
        term = d * t
        out = term if out is None else out + term
    if out is None:
        return torch.zeros_like(like)
    return out if reduction == 0 else out.sum().to(like.dtype)


def bce_with_logits_grads(grad, input, target, weight, pos_weight, reduction, needs):
    """(grad_input, grad_target) of the fused loss, None where not needed."""
    gx, gy = ops.bce_with_logits_backward(grad, input, target, weight, pos_weight, reduction, [needs[0], needs[1]])
    return (gx if needs[0] else None, gy if needs[1] else None)


def mse_grads(grad, input, target, weight, loss, denominator, reduction, needs):
    """(grad_input, grad_target, grad_weight) of the fused loss, None where not needed."""
    gs = ops.mse_backward(grad, input, target, weight, loss, denominator, reduction, [needs[0], needs[1], needs[2]])
    return tuple(g if n else None for g, n in zip(gs, needs, strict=True))


def cross_entropy_grads(grad, input, target, weight, lse, stats, target_mass, args, needs):
    """(grad_input, grad_target) of the fused cross entropy, None where not needed.
    args = (ignore_index, reduction, label_smoothing, lse_square_scale, softcap)."""
    gx, gt = ops.cross_entropy_backward(
        grad, input, target, weight, lse, stats, target_mass, *args, [needs[0], needs[1]]
    )
    return (gx if needs[0] else None, gt if needs[1] else None)


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
            gx, gy = bce_with_logits_grads(grad, input, target, weight, pos_weight, ctx.reduction, needs)
        return gx, gy, None, None, None


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
        return mse_grads(grad, input, target, weight, loss, denominator, ctx.reduction, needs) + (None,)


class CrossEntropyFunction(torch.autograd.Function):
    """Softmax + NLL, fused: apply(input, target, weight, ignore_index, reduction,
    label_smoothing, lse_square_scale, softcap, inplace_backward) -> (loss, lse, stats, target_mass).

    input is (C), (N, C) or (N, C, d1, ...); target holds int64 class indices of
    the batch shape, or probabilities of the input's shape and dtype; weight is
    (C) of the input's dtype or None. Only ``loss`` is differentiable; the other
    outputs are the O(N) state the backward reads (per-row log-sum-exp in fp32,
    the mean's denominator and sum(weight), and per-row target mass for
    probability targets). Gradients reach input, and the target when it holds
    probabilities. With inplace_backward=True the input's gradient is written
    over the input (its version counter is bumped, so any other use of those
    logits in the graph fails loudly instead of reading gradients).
    """

    @staticmethod
    def forward(
        input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap, inplace_backward
    ):
        return ops.cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap, inplace = inputs
        _, lse, stats, target_mass = output
        ctx.mark_non_differentiable(lse, stats, target_mass)
        ctx.save_for_backward(input, target, weight, lse, stats, target_mass)
        ctx.save_for_forward(input, target, weight, lse, stats, target_mass)
        ctx.args = (ignore_index, reduction, label_smoothing, lse_square_scale, softcap)
        ctx.inplace = inplace

    @staticmethod
    def backward(ctx, grad, *_):
        input, target, weight, lse, stats, target_mass = ctx.saved_tensors
        ignore_index, reduction, label_smoothing, lse_square_scale, softcap = ctx.args
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1] and target.shape == input.shape)
        rest = (None,) * 7
        if torch.is_grad_enabled():
            return (
                composite_backward(
                    lambda x, t: _composite.cross_entropy(
                        x,
                        t,
                        weight,
                        ignore_index,
                        _REDUCTION_NAMES[reduction],
                        label_smoothing,
                        lse_square_scale,
                        softcap,
                    ),
                    (input, target),
                    needs,
                    grad,
                )
                + rest
            )
        if ctx.inplace and needs[0] and not needs[1]:
            ops.cross_entropy_backward_inplace(grad, input, target, weight, lse, stats, target_mass, *ctx.args)
            # Any other node that saved these logits must now refuse to run.
            torch.autograd.graph.increment_version(input)
            return (input.detach(), None) + rest
        return cross_entropy_grads(grad, input, target, weight, lse, stats, target_mass, ctx.args, needs) + rest


class HingeEmbeddingFunction(torch.autograd.Function):
    """torch's hinge_embedding_loss, fused: apply(input, target, margin, reduction).

    input and target have one shape and floating dtype. The target only selects
    terms, so it gets no gradient (as in torch).
    """

    @staticmethod
    def forward(input, target, margin, reduction):
        return ops.hinge_embedding(input, target, margin, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, margin, reduction = inputs
        ctx.save_for_backward(input, target)
        ctx.save_for_forward(input, target)
        ctx.args = (margin, reduction)

    @staticmethod
    def backward(ctx, grad):
        input, target = ctx.saved_tensors
        margin, reduction = ctx.args
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if torch.is_grad_enabled():
            (gx,) = composite_backward(
                lambda x: F.hinge_embedding_loss(x, target, margin, reduction=_REDUCTION_NAMES[reduction]),
                (input,),
                (True,),
                grad,
            )
        else:
            gx = ops.hinge_embedding_backward(grad, input, target, margin, reduction, CLAMP_GRAD_AT_BOUND)
        return gx, None, None, None


class SoftMarginFunction(torch.autograd.Function):
    """soft_margin_loss in the stable softplus form, fused: apply(input, target, reduction).

    input and target have one shape and floating dtype; only the input gets a
    gradient (torch has none for the target).
    """

    @staticmethod
    def forward(input, target, reduction):
        return ops.soft_margin(input, target, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, reduction = inputs
        ctx.save_for_backward(input, target)
        ctx.save_for_forward(input, target)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx, grad):
        input, target = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        if torch.is_grad_enabled():
            (gx,) = composite_backward(
                lambda x: _composite.soft_margin_loss(x, target, _REDUCTION_NAMES[ctx.reduction]),
                (input,),
                (True,),
                grad,
            )
        else:
            gx = ops.soft_margin_backward(grad, input, target, ctx.reduction)
        return gx, None, None


class HingeFunction(torch.autograd.Function):
    """Binary (SVM) hinge max(0, margin - y x), squared for the L2-SVM, fused:
    apply(input, target, margin, squared, reduction). Gradients reach input and target."""

    @staticmethod
    def forward(input, target, margin, squared, reduction):
        return ops.hinge(input, target, margin, squared, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, margin, squared, reduction = inputs
        ctx.save_for_backward(input, target)
        ctx.save_for_forward(input, target)
        ctx.args = (margin, squared, reduction)

    @staticmethod
    def backward(ctx, grad):
        input, target = ctx.saved_tensors
        margin, squared, reduction = ctx.args
        needs = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():
            gx, gy = composite_backward(
                lambda x, y: _composite.hinge_loss(x, y, margin, squared, _REDUCTION_NAMES[reduction]),
                (input, target),
                needs,
                grad,
            )
        else:
            gx, gy = ops.hinge_backward(
                grad, input, target, margin, squared, reduction, CLAMP_GRAD_AT_BOUND, [needs[0], needs[1]]
            )
            gx, gy = (gx if needs[0] else None, gy if needs[1] else None)
        return gx, gy, None, None, None


class MultiMarginFunction(torch.autograd.Function):
    """multi_margin_loss, fused: apply(input, target, p, margin, weight, reduction).

    input is (N, C), (C) or 0-d floating; target int64 class indices, one per
    row; weight (C) of the input's dtype or None. Only the input gets a
    gradient; second derivatives (which torch lacks) come from the composite.
    """

    @staticmethod
    def forward(input, target, p, margin, weight, reduction):
        return ops.multi_margin(input, target, p, margin, weight, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, p, margin, weight, reduction = inputs
        ctx.save_for_backward(input, target, weight)
        ctx.save_for_forward(input, target, weight)
        ctx.args = (p, margin, reduction)

    @staticmethod
    def backward(ctx, grad):
        input, target, weight = ctx.saved_tensors
        p, margin, reduction = ctx.args
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        if torch.is_grad_enabled():
            (gx,) = composite_backward(
                lambda x: _composite.multi_margin_loss(x, target, p, margin, weight, _REDUCTION_NAMES[reduction]),
                (input,),
                (True,),
                grad,
            )
        else:
            gx = ops.multi_margin_backward(grad, input, target, p, margin, weight, reduction)
        return gx, None, None, None, None, None


def _register_op_autograd():
    """Make the forward ops differentiable on their own too (torch.ops.fusedloss.*
    used directly, and opcheck's autograd checks), with the same fused backward
    ops. The backward ops themselves are first-order only."""

    def bce_setup(ctx, inputs, output):
        input, target, weight, pos_weight, reduction = inputs
        ctx.save_for_backward(input, target, weight, pos_weight)
        ctx.reduction = reduction

    def bce_backward(ctx, grad):
        return bce_with_logits_grads(grad, *ctx.saved_tensors, ctx.reduction, ctx.needs_input_grad[:2]) + (
            None,
            None,
            None,
        )

    torch.library.register_autograd("fusedloss::bce_with_logits", bce_backward, setup_context=bce_setup)

    def mse_setup(ctx, inputs, output):
        input, target, weight, reduction = inputs
        loss, denominator = output
        weighted_mean = weight is not None and reduction == 1
        ctx.save_for_backward(
            input, target, weight, loss if weighted_mean else None, denominator if weighted_mean else None
        )
        ctx.reduction = reduction

    def mse_backward(ctx, grad, _grad_denominator):
        return mse_grads(grad, *ctx.saved_tensors, ctx.reduction, ctx.needs_input_grad[:3]) + (None,)

    torch.library.register_autograd("fusedloss::mse", mse_backward, setup_context=mse_setup)

    def ce_setup(ctx, inputs, output):
        input, target, weight, *args = inputs
        _, lse, stats, target_mass = output
        ctx.save_for_backward(input, target, weight, lse, stats, target_mass)
        ctx.args = tuple(args)

    def ce_backward(ctx, grad, *_):
        input, target = ctx.saved_tensors[:2]
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1] and target.shape == input.shape)
        return cross_entropy_grads(grad, *ctx.saved_tensors, ctx.args, needs) + (None,) * 6

    torch.library.register_autograd("fusedloss::cross_entropy", ce_backward, setup_context=ce_setup)

    def saving_setup(n_saved):
        def setup(ctx, inputs, output):
            ctx.save_for_backward(*inputs[:n_saved])
            ctx.args = tuple(inputs[n_saved:])

        return setup

    def hinge_embedding_backward(ctx, grad):
        return (
            ops.hinge_embedding_backward(grad, *ctx.saved_tensors, *ctx.args, CLAMP_GRAD_AT_BOUND),
            None,
            None,
            None,
        )

    torch.library.register_autograd(
        "fusedloss::hinge_embedding", hinge_embedding_backward, setup_context=saving_setup(2)
    )

    def soft_margin_backward(ctx, grad):
        return (ops.soft_margin_backward(grad, *ctx.saved_tensors, *ctx.args), None, None)

    torch.library.register_autograd("fusedloss::soft_margin", soft_margin_backward, setup_context=saving_setup(2))

    def hinge_backward(ctx, grad):
        needs = ctx.needs_input_grad[:2]
        gx, gy = ops.hinge_backward(grad, *ctx.saved_tensors, *ctx.args, CLAMP_GRAD_AT_BOUND, [needs[0], needs[1]])
        return (gx if needs[0] else None, gy if needs[1] else None, None, None, None)

    torch.library.register_autograd("fusedloss::hinge", hinge_backward, setup_context=saving_setup(2))

    def mm_setup(ctx, inputs, output):
        input, target, p, margin, weight, reduction = inputs
        ctx.save_for_backward(input, target, weight)
        ctx.args = (p, margin, reduction)

    def mm_backward(ctx, grad):
        input, target, weight = ctx.saved_tensors
        p, margin, reduction = ctx.args
        return (ops.multi_margin_backward(grad, input, target, p, margin, weight, reduction),) + (None,) * 5

    torch.library.register_autograd("fusedloss::multi_margin", mm_backward, setup_context=mm_setup)


_register_op_autograd()


# Forward-mode AD. Dynamo cannot trace an autograd.Function that defines jvp,
# so the public classes above leave it out and fusedloss.functional uses these
# subclasses outside torch.compile (see `eager_or_compiled`). Each tangent is
# the fused backward op's derivative (grad_output = 1) contracted with the
# input tangents.


class _BCEWithLogitsFunctionJvp(BCEWithLogitsFunction):
    @staticmethod
    def jvp(ctx, t_input, t_target, t_weight, t_pos_weight, _):
        input, target, weight, pos_weight = ctx.saved_tensors
        mask = [t_input is not None, t_target is not None]
        d = ops.bce_with_logits_backward(
            ones_grad(input, ctx.reduction), input, target, weight, pos_weight, ctx.reduction, mask
        )
        return contract(d, (t_input, t_target), ctx.reduction, input if ctx.reduction == 0 else input.new_empty(()))


class _MSEFunctionJvp(MSEFunction):
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


class _CrossEntropyFunctionJvp(CrossEntropyFunction):
    @staticmethod
    def jvp(ctx, t_input, t_target, *_):
        input, target, weight, lse, stats, target_mass = ctx.saved_tensors
        reduction = ctx.args[1]
        prob = target.shape == input.shape
        t_target = t_target if prob else None
        batch = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
        ones = torch.ones(batch if reduction == 0 else (), dtype=input.dtype, device=input.device)
        mask = [t_input is not None, t_target is not None]
        d = ops.cross_entropy_backward(ones, input, target, weight, lse, stats, target_mass, *ctx.args, mask)
        out = None
        for deriv, tangent in zip(d, (t_input, t_target), strict=True):
            if tangent is None:
                continue
            term = deriv * tangent
            term = term.sum(dim=0 if input.dim() == 1 else 1) if reduction == 0 else term.sum()
            out = term if out is None else out + term
        loss_like = input.new_empty(batch if reduction == 0 else ())
        return (torch.zeros_like(loss_like) if out is None else out.to(input.dtype)), None, None, None


class _HingeEmbeddingFunctionJvp(HingeEmbeddingFunction):
    @staticmethod
    def jvp(ctx, t_input, *_):
        input, target = ctx.saved_tensors
        margin, reduction = ctx.args
        if t_input is None:
            return torch.zeros_like(input if reduction == 0 else input.new_empty(()))
        d = ops.hinge_embedding_backward(
            ones_grad(input, reduction), input, target, margin, reduction, CLAMP_GRAD_AT_BOUND
        )
        return contract((d,), (t_input,), reduction, input)


class _SoftMarginFunctionJvp(SoftMarginFunction):
    @staticmethod
    def jvp(ctx, t_input, *_):
        input, target = ctx.saved_tensors
        if t_input is None:
            return torch.zeros_like(input if ctx.reduction == 0 else input.new_empty(()))
        d = ops.soft_margin_backward(ones_grad(input, ctx.reduction), input, target, ctx.reduction)
        return contract((d,), (t_input,), ctx.reduction, input)


class _HingeFunctionJvp(HingeFunction):
    @staticmethod
    def jvp(ctx, t_input, t_target, *_):
        input, target = ctx.saved_tensors
        margin, squared, reduction = ctx.args
        mask = [t_input is not None, t_target is not None]
        d = ops.hinge_backward(
            ones_grad(input, reduction), input, target, margin, squared, reduction, CLAMP_GRAD_AT_BOUND, mask
        )
        return contract(d, (t_input, t_target), reduction, input if reduction == 0 else input.new_empty(()))


class _MultiMarginFunctionJvp(MultiMarginFunction):
    @staticmethod
    def jvp(ctx, t_input, *_):
        input, target, weight = ctx.saved_tensors
        p, margin, reduction = ctx.args
        n = input.shape[0] if input.dim() == 2 else 1
        like = input.new_empty(((n,) if target.dim() > 0 else ()) if reduction == 0 else ())
        if t_input is None:
            return torch.zeros_like(like)
        ones = torch.ones(like.shape, dtype=input.dtype, device=input.device)
        d = ops.multi_margin_backward(ones, input, target, p, margin, weight, reduction)
        term = d * t_input
        if reduction != 0:
            return term.sum().to(input.dtype)
        return term.reshape(n, -1).sum(dim=-1).reshape(like.shape)


_JVP = {
    BCEWithLogitsFunction: _BCEWithLogitsFunctionJvp,
    MSEFunction: _MSEFunctionJvp,
    CrossEntropyFunction: _CrossEntropyFunctionJvp,
    HingeEmbeddingFunction: _HingeEmbeddingFunctionJvp,
    SoftMarginFunction: _SoftMarginFunctionJvp,
    HingeFunction: _HingeFunctionJvp,
    MultiMarginFunction: _MultiMarginFunctionJvp,
}


def eager_or_compiled(cls):
    """cls under torch.compile; outside it, its subclass with forward-mode AD."""
    return cls if torch.compiler.is_compiling() else _JVP[cls]
