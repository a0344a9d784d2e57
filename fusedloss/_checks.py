"""Argument checks that raise exactly what torch raises for the same bad input.

The messages are torch's own: either reproduced from the rule torch applies (the
broadcast rules of TensorIterator, the autograd "not differentiable" check) or,
for dtype and device errors whose text depends on the torch version and the
device, obtained by running the native function on one-element stand-ins of the
offending arguments. Only error paths pay for that; valid calls never do.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def broadcast_shape(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """Broadcast shape of a and b, or torch's RuntimeError (a, b named as in torch)."""
    ndim = max(len(a), len(b))
    out = [1] * ndim
    for i in range(ndim - 1, -1, -1):
        offset = ndim - 1 - i
        size_a = a[len(a) - 1 - offset] if len(a) - 1 - offset >= 0 else 1
        size_b = b[len(b) - 1 - offset] if len(b) - 1 - offset >= 0 else 1
        if size_a != size_b and size_a != 1 and size_b != 1:
            raise RuntimeError(
                f"The size of tensor a ({size_a}) must match the size of tensor b ({size_b}) "
                f"at non-singleton dimension {i}"
            )
        out[i] = size_b if size_a == 1 else size_a
    return out


def inplace_broadcast(out_shape: Sequence[int], other_shape: Sequence[int]) -> None:
    """What `out.mul_(other)` raises when other does not broadcast into out's shape."""
    shape = broadcast_shape(out_shape, other_shape)
    if list(shape) != list(out_shape):
        raise RuntimeError(f"output with shape {list(out_shape)} doesn't match the broadcast shape {list(shape)}")


def no_requires_grad(function: str, **tensors: torch.Tensor | None) -> None:
    """torch's check for arguments it has no derivative for (weight, pos_weight)."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"The function '{function}' is not differentiable with respect to argument "
                f"'{name}'. This input cannot have requires_grad True."
            )


def stand_in(t):
    """A one-element tensor with t's dtype and device (non-tensors pass through)."""
    if isinstance(t, torch.Tensor):
        return torch.zeros((1,) * min(t.dim(), 1), dtype=t.dtype, device=t.device)
    return t


def raise_native(native: Callable, *args, **kwargs) -> None:
    """Run `native` on stand-ins of the tensor arguments so that it raises the error
    torch gives for their dtypes/devices. Returns only if torch accepts them."""
    native(*[stand_in(a) for a in args], **{k: stand_in(v) for k, v in kwargs.items()})


def same_device(*tensors: torch.Tensor | None) -> bool:
    devices = {t.device for t in tensors if t is not None}
    return len(devices) <= 1
