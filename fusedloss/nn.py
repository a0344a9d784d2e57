"""Drop-in loss modules: subclasses of the torch.nn losses that override only
``forward``, so constructor signatures, defaults, buffers (``weight``,
``pos_weight``), ``repr``, ``state_dict`` and ``.to()`` are torch's own."""

from __future__ import annotations

import torch

from . import functional as F

__all__ = ["BCEWithLogitsLoss", "MSELoss"]


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
