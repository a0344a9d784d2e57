"""Drop-in loss modules: subclasses of the torch.nn losses that override only
``forward``, so constructor signatures, defaults, buffers (``weight``,
``pos_weight``), ``repr``, ``state_dict`` and ``.to()`` are torch's own."""

from __future__ import annotations

import torch

from . import functional as F

__all__ = ["BCEWithLogitsLoss", "CrossEntropyLoss", "MSELoss"]


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """:class:`torch.nn.BCEWithLogitsLoss`, computed by
    :func:`fusedloss.functional.binary_cross_entropy_with_logits`."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(
            input, target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction
        )


class MSELoss(torch.nn.MSELoss):
    """:class:`torch.nn.MSELoss`, computed by :func:`fusedloss.functional.mse_loss`."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(input, target, reduction=self.reduction)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss`, computed by :func:`fusedloss.functional.cross_entropy`.

    The extras ``lse_square_scale``, ``softcap`` and ``inplace_backward`` are
    keyword-only constructor arguments (see the functional for their meaning);
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
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.inplace_backward = inplace_backward

    def extra_repr(self) -> str:
        extras = []
        if self.lse_square_scale:
            extras.append(f"lse_square_scale={self.lse_square_scale}")
        if self.softcap is not None:
            extras.append(f"softcap={self.softcap}")
        if self.inplace_backward:
            extras.append("inplace_backward=True")
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
        )
