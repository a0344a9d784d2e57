"""torch.library.opcheck on every fusedloss op: schema, fake (meta) kernel,
autograd registration and AOT dispatch with dynamic shapes, on each device."""

import pytest
import torch

from conftest import DEVICES, make

ops = torch.ops.fusedloss


def _bce(device, dtype, shape, rg, reduction, weighted):
    x = make(shape, dtype, device, requires_grad=rg)
    y = make(shape, dtype, device, 0, 1, requires_grad=rg)
    w = make(shape[-1:], dtype, device, 0, 2) if weighted else None
    pw = make(shape[:1] + (1,) * (len(shape) - 1), dtype, device, 0, 2) if weighted and shape else None
    return x, y, w, pw


def forward_samples(device):
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((4, 7), (2, 3, 5, 5), (0, 3), ()):
            for reduction in (0, 1, 2):
                for rg in (False, True):
                    for weighted in (False, True):
                        x, y, w, pw = _bce(device, dtype, shape, rg, reduction, weighted)
                        yield ops.bce_with_logits, (x, y, w, pw, reduction)
                        wm = make(shape, dtype, device, 0, 2, requires_grad=rg) if weighted else None
                        yield ops.mse, (x, y, wm, reduction)


def backward_samples(device):
    for dtype in (torch.float32, torch.float16):
        for shape in ((4, 7), (2, 3, 5, 5), (0, 3)):
            for reduction in (0, 1, 2):
                for weighted in (False, True):
                    x, y, w, pw = _bce(device, dtype, shape, False, reduction, weighted)
                    g = make(shape if reduction == 0 else (), dtype, device)
                    for mask in ([True, True], [True, False], [False, True]):
                        yield ops.bce_with_logits_backward, (g, x, y, w, pw, reduction, mask)
                    wm = make(shape, dtype, device, 0, 2) if weighted else None
                    loss, denom = ops.mse(x, y, wm, reduction)
                    for mask in ([True, True, True], [True, False, False], [False, False, True]):
                        yield ops.mse_backward, (g, x, y, wm, loss, denom if denom.numel() else None, reduction, mask)


ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _opcheck(op, args):
    utils = ALL_UTILS
    backward = op._qualified_op_name.endswith("_backward")
    x, reduction = (args[1], args[-2]) if backward else (args[0], args[-1])
    if x.numel() == 0 and reduction == 1:
        # An empty mean is NaN, and opcheck's eager-vs-AOT comparison treats
        # NaN != NaN; the other checks still run.
        utils = ALL_UTILS[:3]
    torch.library.opcheck(op, args, test_utils=utils)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward_ops(device):
    n = 0
    for op, args in forward_samples(device):
        _opcheck(op, args)
        n += 1
    assert n > 0


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_ops(device):
    n = 0
    for op, args in backward_samples(device):
        _opcheck(op, args)
        n += 1
    assert n > 0


def test_every_op_is_sampled():
    """A new op must come with opcheck samples."""
    sampled = {op._qualified_op_name for op, _ in forward_samples("cpu")} | {
        op._qualified_op_name for op, _ in backward_samples("cpu")
    }
    defined = {
        name
        for name in dir(ops)
        if not name.startswith("_") and isinstance(getattr(ops, name), torch._ops.OpOverloadPacket)
    }
    assert defined <= {s.split("::")[-1] for s in sampled}, defined - {s.split("::")[-1] for s in sampled}
