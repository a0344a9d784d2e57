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
    loss = F.cross_entropy(
        x, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
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
    # All targets ignored: torch's mean is NaN already, and ignored samples get
    # zero gradient; dividing the (zero) z sum by 1 keeps it that way.
    if isinstance(denom, torch.Tensor):
        denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    return loss + z.sum() / denom


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def hinge_loss(input, target, margin=1.0, squared=False, reduction="mean"):
    """Binary (SVM) hinge max(0, margin - target * input), squared for the L2-SVM."""
    loss = torch.clamp(margin - target * input, min=0)
    if squared:
        loss = loss * loss
    return _reduce(loss, reduction)


def soft_margin_loss(input, target, reduction="mean"):
    """log(1 + exp(-target * input)) as softplus, finite where torch's form overflows."""
    return _reduce(F.softplus(-target * input).to(input.dtype), reduction)


def multi_margin_loss(input, target, p=1, margin=1.0, weight=None, reduction="mean"):
    """torch's multi_margin_loss as differentiable ops (a NaN margin counts nothing,
    as in torch's kernels); an empty batch's mean is NaN."""
    x = input.reshape(1, -1) if input.dim() < 2 else input
    t = target.reshape(-1, 1)
    z = margin - x.gather(1, t) + x
    h = torch.where(z > 0, z if p == 1 else z * z, torch.zeros_like(z))
    h = h.masked_fill(torch.zeros_like(h, dtype=torch.bool).scatter_(1, t, True), 0)
    if weight is not None:
        h = h * weight[t]
    loss = h.sum(1) / x.shape[1]
    if input.dim() < 2:
        loss = loss.reshape(())
    return _reduce(loss, reduction)
