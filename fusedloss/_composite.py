"""The losses written with torch's own ops, with fusedloss's exact semantics
(csrc/composite.cpp, reached through the ``torch.ops.fusedloss.<loss>_composite``
ops), under torch.nn.functional-style signatures.

They are the reference the fused kernels are tested against, the path of
second and higher derivatives, forward-mode AD and torch.func transforms, and
the fallback for the argument combinations the kernels do not take. They
call ATen directly, never torch.nn.functional, so they stay torch's own
implementation whatever a user has patched.
"""

from __future__ import annotations

import torch

from ._ops import ops

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """torch's cross_entropy, plus z-loss and softcap (see fusedloss.functional.cross_entropy)."""
    return ops.cross_entropy_composite(
        input, target, weight, ignore_index, _REDUCTIONS[reduction], label_smoothing, lse_square_scale, softcap
    )


def hinge_loss(input, target, margin=1.0, squared=False, reduction="mean"):
    """Binary (SVM) hinge max(0, margin - target * input), squared for the L2-SVM."""
    return ops.hinge_composite(input, target, float(margin), bool(squared), _REDUCTIONS[reduction])


def soft_margin_loss(input, target, reduction="mean"):
    """log(1 + exp(-target * input)) as softplus, finite where torch's form overflows."""
    return ops.soft_margin_composite(input, target, _REDUCTIONS[reduction])


def multi_margin_loss(input, target, p=1, margin=1.0, weight=None, reduction="mean"):
    """torch's multi_margin_loss as differentiable ops (a NaN margin counts nothing,
    as in torch's kernels); an empty batch's mean is NaN."""
    return ops.multi_margin_composite(input, target, int(p), float(margin), weight, _REDUCTIONS[reduction])


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2, reduction="none"):
    """torchvision's sigmoid_focal_loss with 1 - p_t formed exactly (see
    fusedloss.functional.sigmoid_focal_loss)."""
    return ops.sigmoid_focal_composite(inputs, targets, float(alpha), float(gamma), _REDUCTIONS[reduction])


def multilabel_soft_margin_loss(input, target, weight=None, reduction="mean"):
    """torch's multilabel_soft_margin_loss, op for op."""
    return ops.multilabel_soft_margin_composite(input, target, weight, _REDUCTIONS[reduction])


_DISTILL_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2, "batchmean": 3}


def distill(student_logits, teacher_logits, target=None, beta=0.0, temperature=1.0, reduction="batchmean",
            ignore_index=-100):  # fmt: skip
    """KL (beta 0: teacher || student; 1: student || teacher) or generalised JSD
    on logits over the last dim, times T^2, with fusedloss's semantics for
    ignored rows, reductions and masked (-inf) classes (0 log 0 = 0)."""
    return ops.distill_composite(
        student_logits, teacher_logits, target, float(beta), float(temperature), int(ignore_index),
        _DISTILL_REDUCTIONS[reduction],
    )  # fmt: skip
