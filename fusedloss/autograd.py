"""The differentiable fused ops, under the names of fusedloss's former
``torch.autograd.Function`` classes.

Each loss's autograd is defined once, in C++ (csrc/autograd.cpp), as the
Autograd kernel of its op, the path torch's own losses take: the forward runs
the fused forward op and saves its inputs, the backward runs the fused
backward op (or, under ``create_graph=True``, differentiates the composite, so
higher derivatives are exact), and forward-mode AD runs the composite. So
``torch.ops.fusedloss.<loss>`` is differentiable on its own, and these names are
thin aliases kept for code that called ``XFunction.apply(...)``: they take
already-validated tensors and an integer reduction (0 none, 1 mean, 2 sum),
exactly as before, and are no longer ``torch.autograd.Function`` subclasses.
fusedloss.functional does torch's validation and is what most code should
call.
"""

from __future__ import annotations

from ._ops import ops

__all__ = [
    "BCEWithLogitsFunction",
    "CrossEntropyFunction",
    "HingeEmbeddingFunction",
    "HingeFunction",
    "MSEFunction",
    "MultiMarginFunction",
    "SoftMarginFunction",
]


class BCEWithLogitsFunction:
    """apply(input, target, weight, pos_weight, reduction) -> loss (torch.ops.fusedloss.bce_with_logits)."""

    @staticmethod
    def apply(input, target, weight, pos_weight, reduction):
        return ops.bce_with_logits(input, target, weight, pos_weight, reduction)


class MSEFunction:
    """apply(input, target, weight, reduction) -> (loss, denominator); the
    denominator (sum(weight) of a weighted mean, else empty) is not differentiable."""

    @staticmethod
    def apply(input, target, weight, reduction):
        loss = ops.mse(input, target, weight, reduction)
        if weight is not None and reduction == 1:
            return loss, weight.detach().sum(dtype=torch_acc(weight))
        return loss, loss.new_empty((0,)).detach()


class CrossEntropyFunction:
    """apply(input, target, weight, ignore_index, reduction, label_smoothing,
    lse_square_scale, softcap, inplace_backward) -> (loss,) (torch.ops.fusedloss.cross_entropy)."""

    @staticmethod
    def apply(input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap, inplace):
        return (
            ops.cross_entropy(
                input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap, inplace
            ),
        )


class HingeEmbeddingFunction:
    """apply(input, target, margin, reduction) -> loss (torch.ops.fusedloss.hinge_embedding)."""

    @staticmethod
    def apply(input, target, margin, reduction):
        return ops.hinge_embedding(input, target, margin, reduction)


class SoftMarginFunction:
    """apply(input, target, reduction) -> loss (torch.ops.fusedloss.soft_margin)."""

    @staticmethod
    def apply(input, target, reduction):
        return ops.soft_margin(input, target, reduction)


class HingeFunction:
    """apply(input, target, margin, squared, reduction) -> loss (torch.ops.fusedloss.hinge)."""

    @staticmethod
    def apply(input, target, margin, squared, reduction):
        return ops.hinge(input, target, margin, squared, reduction)


class MultiMarginFunction:
    """apply(input, target, p, margin, weight, reduction) -> loss (torch.ops.fusedloss.multi_margin)."""

    @staticmethod
    def apply(input, target, p, margin, weight, reduction):
        return ops.multi_margin(input, target, p, margin, weight, reduction)


def torch_acc(t):
    import torch

    return torch.float64 if t.dtype == torch.float64 else torch.float32
