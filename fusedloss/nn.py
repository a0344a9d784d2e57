"""Drop-in loss modules: subclasses of the torch.nn losses that override only
``forward``, so constructor signatures, defaults, buffers (``weight``,
``pos_weight``), ``repr``, ``state_dict`` and ``.to()`` are torch's own."""

from __future__ import annotations

import torch

from . import functional as F


class _NotScriptable:
    """torch.jit.script cannot compile fusedloss's Python API; say so plainly
    (torch.jit.trace and torch.compile work)."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"fusedloss.nn.{type(self).__name__} cannot be compiled by torch.jit.script, whose "
            "TorchScript subset does not cover fusedloss's Python API. Use torch.compile (or "
            "torch.jit.trace), or torch's own loss module in code that must be scripted."
        )


__all__ = [
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "HingeEmbeddingLoss",
    "HingeLoss",
    "MSELoss",
    "MultiMarginLoss",
    "SoftMarginLoss",
]


class BCEWithLogitsLoss(_NotScriptable, torch.nn.BCEWithLogitsLoss):
    """:class:`torch.nn.BCEWithLogitsLoss`, computed by
    :func:`fusedloss.functional.binary_cross_entropy_with_logits`."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(
            input, target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction
        )


class MSELoss(_NotScriptable, torch.nn.MSELoss):
    """:class:`torch.nn.MSELoss`, computed by :func:`fusedloss.functional.mse_loss`."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(input, target, reduction=self.reduction)


class CrossEntropyLoss(_NotScriptable, torch.nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss`, computed by :func:`fusedloss.functional.cross_entropy`.

    The extras ``lse_square_scale``, ``softcap``, ``inplace_backward`` and
    ``out_dtype`` are keyword-only constructor arguments (see the functional for their meaning);
    with their defaults the module is torch's, ``repr`` included.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        lse_square_scale: float = 0.0,
        softcap: float | None = None,
        inplace_backward: bool = False,
        out_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.out_dtype = out_dtype

    def extra_repr(self) -> str:
        extras = []
        if self.lse_square_scale:
            extras.append(f"lse_square_scale={self.lse_square_scale}")
        if self.softcap is not None:
            extras.append(f"softcap={self.softcap}")
        if self.inplace_backward:
            extras.append("inplace_backward=True")
        if self.out_dtype is not None:
            extras.append(f"out_dtype={self.out_dtype}")
        return ", ".join(extras)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            lse_square_scale=self.lse_square_scale,
            softcap=self.softcap,
            inplace_backward=self.inplace_backward,
            out_dtype=self.out_dtype,
        )


class HingeEmbeddingLoss(_NotScriptable, torch.nn.HingeEmbeddingLoss):
    """:class:`torch.nn.HingeEmbeddingLoss`, computed by :func:`fusedloss.functional.hinge_embedding_loss`."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.hinge_embedding_loss(input, target, margin=self.margin, reduction=self.reduction)


class SoftMarginLoss(_NotScriptable, torch.nn.SoftMarginLoss):
    """:class:`torch.nn.SoftMarginLoss`, computed by :func:`fusedloss.functional.soft_margin_loss`
    (stable for large margins; see its deviation note)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.soft_margin_loss(input, target, reduction=self.reduction)


class MultiMarginLoss(_NotScriptable, torch.nn.MultiMarginLoss):
    """:class:`torch.nn.MultiMarginLoss`, computed by :func:`fusedloss.functional.multi_margin_loss`."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.multi_margin_loss(
            input, target, p=self.p, margin=self.margin, weight=self.weight, reduction=self.reduction
        )


class HingeLoss(_NotScriptable, torch.nn.Module):
    """Binary (SVM) hinge loss ``max(0, margin - target * input)`` with labels in
    {-1, +1}; ``squared=True`` gives the L2-SVM loss. torch has no such module;
    see :func:`fusedloss.functional.hinge_loss`."""

    __constants__ = ["margin", "squared", "reduction"]

    def __init__(self, margin: float = 1.0, squared: bool = False, reduction: str = "mean") -> None:
        super().__init__()
        self.margin = margin
        self.squared = squared
        self.reduction = reduction

    def extra_repr(self) -> str:
        return f"margin={self.margin}, squared={self.squared}, reduction={self.reduction!r}"

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.hinge_loss(input, target, margin=self.margin, squared=self.squared, reduction=self.reduction)


# sigmoid_focal_loss (torchvision's function; torch has no module),
# multilabel_soft_margin_loss and distillation on logits.

__all__ += ["JSDWithLogitsLoss", "KLDivWithLogitsLoss", "MultiLabelSoftMarginLoss", "SigmoidFocalLoss"]


class MultiLabelSoftMarginLoss(torch.nn.MultiLabelSoftMarginLoss):
    """:class:`torch.nn.MultiLabelSoftMarginLoss`, computed by
    :func:`fusedloss.functional.multilabel_soft_margin_loss`."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.multilabel_soft_margin_loss(input, target, weight=self.weight, reduction=self.reduction)


class SigmoidFocalLoss(torch.nn.Module):
    """Sigmoid focal loss as a module: :func:`torchvision.ops.sigmoid_focal_loss`
    (which has no module) with its defaults, computed by
    :func:`fusedloss.functional.sigmoid_focal_loss`. ``forward(inputs, targets)``."""

    __constants__ = ["alpha", "gamma", "reduction"]

    def __init__(
        self, alpha: float = 0.25, gamma: float = 2, reduction: str = "none", *, out_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction
        self.out_dtype = out_dtype

    def extra_repr(self) -> str:
        extra = f", out_dtype={self.out_dtype}" if self.out_dtype is not None else ""
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}" + extra

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.sigmoid_focal_loss(
            inputs, targets, alpha=self.alpha, gamma=self.gamma, reduction=self.reduction, out_dtype=self.out_dtype
        )


class KLDivWithLogitsLoss(torch.nn.Module):
    """Distillation loss ``T**2 * KL(softmax(teacher / T) || softmax(student / T))``
    over the last dim; see :func:`fusedloss.functional.kl_div_with_logits`.
    ``forward(student_logits, teacher_logits, target=None)``: rows whose
    ``target`` equals ``ignore_index`` are skipped."""

    __constants__ = ["temperature", "reduction", "ignore_index"]

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        out_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.out_dtype = out_dtype

    def extra_repr(self) -> str:
        extra = f", out_dtype={self.out_dtype}" if self.out_dtype is not None else ""
        return f"temperature={self.temperature}, reduction={self.reduction!r}, ignore_index={self.ignore_index}" + extra

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.kl_div_with_logits(
            student_logits,
            teacher_logits,
            temperature=self.temperature,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            target=target,
            out_dtype=self.out_dtype,
        )


class JSDWithLogitsLoss(torch.nn.Module):
    """Generalised JSD distillation loss over the last dim (``beta=0``: forward
    KL, teacher || student; ``beta=1``: reverse KL); see
    :func:`fusedloss.functional.jsd_with_logits`.
    ``forward(student_logits, teacher_logits, target=None)``."""

    __constants__ = ["beta", "temperature", "reduction", "ignore_index"]

    def __init__(
        self,
        *,
        beta: float = 0.5,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        out_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.beta = beta
        self.temperature = temperature
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.out_dtype = out_dtype

    def extra_repr(self) -> str:
        extra = f", out_dtype={self.out_dtype}" if self.out_dtype is not None else ""
        return (
            f"beta={self.beta}, temperature={self.temperature}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}" + extra
        )

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.jsd_with_logits(
            student_logits,
            teacher_logits,
            beta=self.beta,
            temperature=self.temperature,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            target=target,
            out_dtype=self.out_dtype,
        )


# Fused linear + cross entropy (fusedloss/linear_cross_entropy.py).
from .linear_cross_entropy import LinearCrossEntropyLoss  # noqa: E402, F401

__all__.append("LinearCrossEntropyLoss")
