"""Random cases for every loss, shared by the property test (tests/test_fuzz.py)
and the soak run (bench/soak.py): shapes with empty and size-1 dims, every
dtype, transposed/offset/strided layouts, and each loss's options."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from . import _composite
from .testing import LAYOUTS, make_tensor

LOSSES = (
    "binary_cross_entropy_with_logits",
    "mse_loss",
    "cross_entropy",
    "cross_entropy_probabilities",
    "hinge_embedding_loss",
    "soft_margin_loss",
    "hinge_loss",
    "multi_margin_loss",
)
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass
class Case:
    name: str  # the fusedloss.functional function
    args: tuple
    kwargs: dict
    native: Callable | None = None  # reference other than torch's function of that name

    def describe(self) -> str:
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in self.args]
        dtypes = {str(a.dtype) for a in self.args if isinstance(a, torch.Tensor)}
        return f"{self.name} shapes={shapes} dtypes={sorted(dtypes)} kwargs={sorted(self.kwargs)}"


def _pick(g: torch.Generator, options):
    return options[int(torch.randint(0, len(options), (1,), generator=g))]


def _uniform(g, shape, lo, hi):
    return torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo


def _tensor(g, shape, dtype, device, lo, hi, layout, requires_grad=False):
    return make_tensor(shape, dtype, device, lo, hi, layout=layout, requires_grad=requires_grad, generator=g)


def _shape(g, min_dims=0, max_dims=3, class_dim=False):
    nd = int(torch.randint(min_dims, max_dims + 1, (1,), generator=g))
    sizes = [int(_pick(g, (0, 1, 2, 3, 5, 8, 13))) for _ in range(nd)]
    if class_dim and nd >= 1:
        sizes[min(1, nd - 1)] = int(_pick(g, (1, 2, 3, 7, 33, 130)))
    return tuple(sizes)


def draw_case(loss: str, g: torch.Generator, device: str = "cpu") -> Case:
    dtype = _pick(g, DTYPES)
    layout = _pick(g, LAYOUTS)
    reduction = _pick(g, ("none", "mean", "sum"))
    if loss in (
        "binary_cross_entropy_with_logits",
        "mse_loss",
        "hinge_embedding_loss",
        "soft_margin_loss",
        "hinge_loss",
    ):
        shape = _shape(g)
        x = _tensor(g, shape, dtype, device, -6, 6, layout, requires_grad=True)
        if loss == "binary_cross_entropy_with_logits":
            y = _tensor(g, shape, dtype, device, 0, 1, _pick(g, LAYOUTS), requires_grad=True)
            kw = {"reduction": reduction}
            if shape and _pick(g, (True, False)):
                kw["pos_weight"] = _tensor(g, shape[-1:], dtype, device, 0, 3, "contiguous")
            if _pick(g, (True, False)):
                kw["weight"] = _tensor(g, shape[-1:] if shape else (), dtype, device, 0, 2, "strided")
            return Case(loss, (x, y), kw)
        if loss == "mse_loss":
            y = _tensor(g, shape, dtype, device, -6, 6, _pick(g, LAYOUTS), requires_grad=True)
            return Case(loss, (x, y), {"reduction": reduction})
        pm1 = torch.sign(_uniform(g, shape, -1, 1)).to(device=device, dtype=dtype)
        if loss == "hinge_embedding_loss":
            return Case(loss, (x, pm1), {"reduction": reduction, "margin": float(_uniform(g, (), -3, 3))})
        if loss == "soft_margin_loss":
            return Case(loss, (x, pm1), {"reduction": reduction})
        y = pm1.clone().requires_grad_()
        return Case(loss, (x, y), {"reduction": reduction, "margin": 0.5, "squared": bool(_pick(g, (True, False)))})
    if loss in ("cross_entropy", "cross_entropy_probabilities"):
        shape = _shape(g, min_dims=1, max_dims=4, class_dim=True)
        C = shape[0] if len(shape) == 1 else shape[1]
        x = _tensor(g, shape, dtype, device, -8, 8, layout, requires_grad=True)
        kw = {"reduction": reduction, "label_smoothing": float(_pick(g, (0.0, 0.0, 0.1, 0.9)))}
        if _pick(g, (True, False)):
            kw["weight"] = _tensor(g, (C,), dtype, device, 0.1, 2, "contiguous")
        if loss == "cross_entropy_probabilities":
            p = _tensor(g, shape, dtype, device, 0, 1, _pick(g, LAYOUTS), requires_grad=True)
            return Case("cross_entropy", (x, p), kw)
        tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
        t = torch.randint(0, C, tshape, generator=g).to(device)
        ignore = int(_pick(g, (-100, 0, 1)))
        if t.numel() and ignore >= 0:
            t.view(-1)[::3] = ignore
        kw["ignore_index"] = ignore
        extras = _pick(g, ({}, {}, {"lse_square_scale": 1e-3}, {"softcap": 5.0}))
        kw.update(extras)
        native = _composite.cross_entropy if extras else None
        return Case("cross_entropy", (x, t), kw, native=native)
    if loss == "multi_margin_loss":
        dtype = _pick(g, (torch.float64, torch.float32))  # torch's CPU kernel: no fp16/bf16
        rows = int(_pick(g, (0, 1, 2, 5, 17)))
        C = int(_pick(g, (1, 2, 5, 33)))
        shape = _pick(g, ((rows, C), (C,)))
        x = _tensor(g, shape, dtype, device, -3, 3, layout, requires_grad=True)
        t = torch.randint(0, C, (rows,) if len(shape) == 2 else (), generator=g).to(device)
        kw = {
            # torch's CPU kernel leaves the mean and the sum of an empty batch
            # unset (whatever the allocation held, NaN at times): compare
            # only the (empty) per-row losses there.
            "reduction": reduction if rows or len(shape) == 1 else "none",
            "p": int(_pick(g, (1, 2))),
            "margin": float(_pick(g, (0.0, 1.0, -0.5, 3.0))),
        }
        if _pick(g, (True, False)):
            kw["weight"] = _tensor(g, (C,), dtype, device, -2, 2, "contiguous")
        return Case(loss, (x, t), kw)
    raise ValueError(loss)
