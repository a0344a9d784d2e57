"""Losses written as differentiable composite torch ops, with fusedloss's exact
semantics (native torch wherever that is the semantics).

They are the reference the fused kernels are tested against, the path that
computes higher-order gradients (create_graph=True), and the fallback for the
few argument combinations the kernels do not take (each listed where
fusedloss.functional falls back); they are never the training hot path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """torch's cross_entropy, plus z-loss and softcap.

    softcap: logits become ``softcap * tanh(input / softcap)`` first.
    z-loss: each sample's loss gains ``lse_square_scale * logsumexp(x)^2``,
    scaled by the target class's weight for class-index targets (unweighted for
    probability targets); ignored samples gain nothing, and a mean divides by
    torch's own denominator.
    """
    x = input if softcap is None else softcap * torch.tanh(input / softcap)
    loss = F.cross_entropy(x, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    if not lse_square_scale:
        return loss
    class_dim = 0 if x.dim() == 1 else 1
    lse = torch.logsumexp(x, dim=class_dim)
    z = lse_square_scale * lse * lse
    if target.shape == input.shape:  # probabilities
        denom = lse.numel()
    else:
        keep = target != ignore_index
        w_t = keep.to(z.dtype)
        if weight is not None:
            w_t = w_t * weight[torch.where(keep, target, 0).long()].to(z.dtype)
        z = z * w_t
        denom = w_t.sum()
    if reduction == "none":
        return loss + z
    if reduction == "sum":
        return loss + z.sum()
    return loss + z.sum() / denom
