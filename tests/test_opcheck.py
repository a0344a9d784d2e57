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


def margin_forward_samples(device):
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((4, 7), (0, 3), ()):
            for reduction in (0, 1, 2):
                for rg in (False, True):
                    x = make(shape, dtype, device, requires_grad=rg)
                    y = torch.sign(make(shape, dtype, device)).requires_grad_(rg)
                    yield ops.hinge_embedding, (x, y.detach(), 0.5, reduction)
                    yield ops.soft_margin, (x, y.detach(), reduction)
                    yield ops.hinge, (x, y, 1.0, rg, reduction)
        for shape, tshape in (((5, 9), (5,)), ((9,), ()), ((0, 9), (0,))):
            for reduction in (0, 1, 2):
                for rg in (False, True):
                    x = make(shape, dtype, device, requires_grad=rg)
                    t = torch.randint(0, 9, tshape, device=device)
                    w = make((9,), dtype, device, 0.5, 2)
                    yield ops.multi_margin, (x, t, 1 if rg else 2, 0.7, w if rg else None, reduction)


def margin_backward_samples(device):
    for dtype in (torch.float32, torch.float16):
        for shape in ((4, 7), (0, 3)):
            for reduction in (0, 1, 2):
                x = make(shape, dtype, device)
                y = torch.sign(make(shape, dtype, device))
                g = make(shape if reduction == 0 else (), dtype, device)
                yield ops.hinge_embedding_backward, (g, x, y, 0.5, reduction, reduction == 1)
                yield ops.soft_margin_backward, (g, x, y, reduction)
                for mask in ([True, True], [False, True]):
                    yield ops.hinge_backward, (g, x, y, 1.0, True, reduction, mask[0], mask)
        for reduction in (0, 1, 2):
            x = make((5, 9), dtype, device)
            t = torch.randint(0, 9, (5,), device=device)
            g = make((5,) if reduction == 0 else (), dtype, device)
            yield ops.multi_margin_backward, (g, x, t, 2, 0.7, make((9,), dtype, device, 0.5, 2), reduction)


def mixed_dtype_samples(device):
    """Operands in their own dtypes and out_dtype (autocast-style calls)."""
    for reduction in (0, 1, 2):
        for rg in (False, True):
            x = make((4, 7), torch.bfloat16, device, requires_grad=rg)
            y = make((4, 7), torch.float32, device, 0, 1, requires_grad=rg)
            w = make((7,), torch.float32, device, 0, 2)
            yield ops.bce_with_logits, (x, y, w, None, reduction, torch.float32)
            yield ops.mse, (x, y, None, reduction, torch.float32)
            yield ops.mse_forward, (x, y, None, reduction, None)
            t = torch.randint(0, 7, (4,), device=device)
            yield ops.cross_entropy, (x, t, w, -100, reduction, 0.1, 0.0, None, False, torch.float32)
            yield ops.cross_entropy, (x, y.detach().softmax(-1).requires_grad_(rg), None, -100, reduction)
            yield ops.multi_margin, (x, t, 1, 1.0, w, reduction, torch.float32)
            yield ops.hinge_embedding, (x, torch.sign(y.detach() - 0.5), 1.0, reduction, torch.float32)
            yield ops.soft_margin, (x, torch.sign(y.detach() - 0.5), reduction, torch.float32)
            yield ops.hinge, (x, y, 1.0, False, reduction, torch.float32)


def composite_samples(device):
    x = make((5, 9), torch.float32, device, requires_grad=True)
    y = make((5, 9), torch.float32, device, 0, 1, requires_grad=True)
    s = torch.sign(make((5, 9), torch.float32, device))
    t = torch.randint(0, 9, (5,), device=device)
    w = make((9,), torch.float32, device, 0.5, 2)
    for reduction in (0, 1, 2):
        yield ops.bce_with_logits_composite, (x, y, w, w, reduction)
        yield ops.mse_composite, (x, y, y.detach(), reduction)
        yield ops.hinge_embedding_composite, (x, s, 0.5, reduction)
        yield ops.soft_margin_composite, (x, s, reduction)
        yield ops.hinge_composite, (x, y, 1.0, True, reduction)
        yield ops.multi_margin_composite, (x, t, 2, 0.7, w, reduction)
        yield ops.cross_entropy_composite, (x, t, w, -100, reduction, 0.1, 1e-3, 5.0)
        p = y.detach().softmax(-1)
        yield ops.cross_entropy_composite, (x, p, None, -100, reduction, 0.0, 0.0, None, False, torch.float64)


def forward_samples(device):
    yield from cross_entropy_forward_samples(device)
    yield from vocab_parallel_samples(device)
    yield from linear_cross_entropy_forward_samples(device)
    yield from margin_forward_samples(device)
    yield from sigmoid_multilabel_distill_forward_samples(device)
    yield from mixed_dtype_samples(device)
    yield from composite_samples(device)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((4, 7), (2, 3, 5, 5), (0, 3), ()):
            for reduction in (0, 1, 2):
                for rg in (False, True):
                    for weighted in (False, True):
                        x, y, w, pw = _bce(device, dtype, shape, rg, reduction, weighted)
                        yield ops.bce_with_logits, (x, y, w, pw, reduction)
                        wm = make(shape, dtype, device, 0, 2, requires_grad=rg) if weighted else None
                        yield ops.mse, (x, y, wm, reduction)
                        yield ops.mse_forward, (x, y, wm, reduction, None)


def _ce_inputs(device, dtype, shape, prob, rg, weighted):
    C = shape[0] if len(shape) == 1 else shape[1]
    x = make(shape, dtype, device, requires_grad=rg)
    if prob:
        t = make(shape, dtype, device, 0, 1, requires_grad=rg)
    else:
        tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
        t = torch.randint(0, max(C, 1), tshape, device=device)
        if t.numel():
            t.view(-1)[0] = -100
    w = make((C,), dtype, device, 0.5, 2) if weighted else None
    return x, t, w


CE_SHAPES = ((6, 37), (2, 5, 3, 4), (11,), (0, 4))
# (ignore_index, label_smoothing, lse_square_scale, softcap)
CE_OPTIONS = ((-100, 0.0, 0.0, None), (-100, 0.1, 1e-3, 8.0))


def cross_entropy_forward_samples(device):
    for dtype in (torch.float32, torch.bfloat16):
        for shape in CE_SHAPES:
            for prob in (False, True):
                for reduction in (0, 1, 2):
                    for rg in (False, True):
                        for opts in CE_OPTIONS:
                            x, t, w = _ce_inputs(device, dtype, shape, prob, rg, opts[1] > 0)
                            yield ops.cross_entropy, (x, t, w, opts[0], reduction, *opts[1:])
                            yield ops.cross_entropy_forward, (x, t, w, opts[0], reduction, *opts[1:], None)


def cross_entropy_backward_samples(device):
    for dtype in (torch.float32, torch.float16):
        for shape in CE_SHAPES:
            for prob in (False, True):
                for reduction in (0, 1, 2):
                    for opts in CE_OPTIONS:
                        x, t, w = _ce_inputs(device, dtype, shape, prob, False, opts[1] > 0)
                        _, lse, stats, mass = ops.cross_entropy_forward(x, t, w, opts[0], reduction, *opts[1:], None)
                        g = make(lse.shape[:-1] if reduction == 0 else (), dtype, device)
                        saved = (lse, stats, mass)
                        for mask in ([True, True], [True, False], [False, True]):
                            yield ops.cross_entropy_backward, (g, x, t, w, *saved, opts[0], reduction, *opts[1:], mask)
                        yield (
                            ops.cross_entropy_backward_inplace,
                            (g, x.clone(), t, w, *saved, opts[0], reduction, *opts[1:]),
                        )


def backward_samples(device):
    yield from cross_entropy_backward_samples(device)
    yield from linear_cross_entropy_backward_samples(device)
    yield from margin_backward_samples(device)
    yield from sigmoid_multilabel_distill_backward_samples(device)
    for dtype in (torch.float32, torch.float16):
        for shape in ((4, 7), (2, 3, 5, 5), (0, 3)):
            for reduction in (0, 1, 2):
                for weighted in (False, True):
                    x, y, w, pw = _bce(device, dtype, shape, False, reduction, weighted)
                    g = make(shape if reduction == 0 else (), dtype, device)
                    for mask in ([True, True], [True, False], [False, True]):
                        yield ops.bce_with_logits_backward, (g, x, y, w, pw, reduction, mask)
                    wm = make(shape, dtype, device, 0, 2) if weighted else None
                    loss, denom = ops.mse_forward(x, y, wm, reduction, None)
                    for mask in ([True, True, True], [True, False, False], [False, False, True]):
                        yield ops.mse_backward, (g, x, y, wm, loss, denom if denom.numel() else None, reduction, mask)


def vocab_parallel_samples(device):
    """The local ops of fusedloss.distributed, as one rank of two runs them
    (the collectives replaced by their results: this rank's own state). An
    empty slice and an empty batch with the first options and a mean only."""
    for dtype, shape, start in ((torch.float32, (6, 13), 4), (torch.bfloat16, (6, 13), 0), (torch.float32, (5, 0), 9),
                                (torch.bfloat16, (0, 7), 0)):  # fmt: skip
        for opts in CE_OPTIONS if shape == (6, 13) else CE_OPTIONS[:1]:
            ii, eps, z, cap = opts
            x = make(shape, dtype, device)
            t = torch.randint(0, 20, shape[:1], device=device)
            if t.numel():
                t[0] = ii
            w = make((20,), dtype, device, 0.5, 2) if eps > 0 else None
            yield ops.vocab_parallel_ce_local, (x, t, w, start, ii, eps, cap)
            local_max, packed, mass = ops.vocab_parallel_ce_local(x, t, w, start, ii, eps, cap)
            gmax = local_max + 1
            yield ops.vocab_parallel_ce_rebase, (packed, local_max, gmax, mass)
            packed = ops.vocab_parallel_ce_rebase(packed, local_max, gmax, mass)
            packed[-1] = 20  # the whole vocabulary, as the SUM gives it
            for reduction in (0, 1, 2) if shape == (6, 13) else (1,):
                yield ops.vocab_parallel_ce_finalize, (packed, gmax, t, w, ii, reduction, eps, z, dtype)
                _, state, stats = ops.vocab_parallel_ce_finalize(packed, gmax, t, w, ii, reduction, eps, z, dtype)
                g = make(shape[:1] if reduction == 0 else (), dtype, device)
                yield ops.vocab_parallel_ce_backward, (g, x, t, w, state, stats, start, ii, reduction, eps, z, cap)
    yield from vocab_parallel_linear_samples(device)


def vocab_parallel_linear_samples(device):
    """The linear variant's ops, as one rank of two runs them: hidden states
    (N, D) and this rank's rows of the head (an empty slice and an empty batch
    too), in several chunks and one, with and without a bias."""
    for dtype, n, rows, start in ((torch.float32, 6, 13, 4), (torch.bfloat16, 6, 13, 0), (torch.float32, 5, 0, 9),
                                  (torch.bfloat16, 0, 7, 0)):  # fmt: skip
        for k, opts in enumerate(CE_OPTIONS if rows == 13 else CE_OPTIONS[:1]):
            ii, eps, z, cap = opts
            chunk = (0, 4)[k % 2]
            x = make((n, 8), dtype, device)
            lw = make((rows, 8), dtype, device)
            lb = make((rows,), dtype, device) if k % 2 == 0 or dtype == torch.bfloat16 else None
            t = torch.randint(0, 20, (n,), device=device)
            if t.numel():
                t[0] = ii
            w = make((20,), dtype, device, 0.5, 2) if eps > 0 else None
            yield ops.vocab_parallel_linear_ce_local, (x, lw, t, lb, w, start, ii, eps, cap, chunk)
            local_max, packed, mass = ops.vocab_parallel_linear_ce_local(x, lw, t, lb, w, start, ii, eps, cap, chunk)
            gmax = local_max + 1
            packed = ops.vocab_parallel_ce_rebase(packed, local_max, gmax, mass)
            packed[-1] = 20  # the whole vocabulary, as the SUM gives it
            for reduction in (0, 1, 2) if rows == 13 else (1,):
                _, state, stats = ops.vocab_parallel_ce_finalize(packed, gmax, t, w, ii, reduction, eps, z, dtype)
                g = make((n,) if reduction == 0 else (), dtype, device)
                for mask in ([True, True, True], [True, False, False], [False, True, True]):
                    yield ops.vocab_parallel_linear_ce_backward, (
                        g, x, lw, t, lb, w, state, stats, start, ii, reduction, eps, z, cap, chunk, mask,
                    )  # fmt: skip


ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _has_nan(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return any(isinstance(o, torch.Tensor) and o.is_floating_point() and bool(torch.isnan(o).any()) for o in outs)


def _opcheck(op, args):
    utils = ALL_UTILS
    with torch.no_grad():
        copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        nan = _has_nan(op(*copies))
    if nan:
        # An empty or all-ignored mean is NaN, and opcheck's eager-vs-AOT
        # comparison treats NaN != NaN; the other checks still run.
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
    defined = {name for name in dir(ops) if isinstance(getattr(ops, name), torch._ops.OpOverloadPacket)}
    assert defined <= {s.split("::")[-1] for s in sampled}, defined - {s.split("::")[-1] for s in sampled}


# ---------------------------------------------------------------------------
# sigmoid_focal, multilabel_soft_margin, distill: their samples join the two
# generators above (wrapped here, so that this block stands on its own).
# ---------------------------------------------------------------------------


def sigmoid_multilabel_distill_forward_samples(device):
    for dtype in (torch.float32, torch.bfloat16):
        for reduction in (0, 1, 2):
            for rg in (False, True):
                for shape in ((4, 7), (0, 3), ()):
                    x = make(shape, dtype, device, requires_grad=rg)
                    y = make(shape, dtype, device, 0, 1, requires_grad=rg)
                    yield ops.sigmoid_focal, (x, y, 0.25, 2.0, reduction)
                    yield ops.sigmoid_focal, (x, y, -1.0, 1.5, reduction, torch.float32)
                for shape in ((4, 7), (0, 3), (7,), (2, 3, 5)):
                    x = make(shape, dtype, device, requires_grad=rg)
                    y = make(shape, dtype, device, 0, 1, requires_grad=rg)
                    w = make(shape[-1:], dtype, device, 0.5, 2)
                    yield ops.multilabel_soft_margin, (x, y, w if rg else None, reduction)
                    yield ops.multilabel_soft_margin, (x, torch.randint(0, 2, shape, device=device), None, reduction)
        for reduction in (0, 1, 2, 3):
            for rg in (False, True):
                for shape in ((4, 7), (2, 3, 5), (7,), (0, 4)):
                    s = make(shape, dtype, device, requires_grad=rg)
                    t = make(shape, dtype, device, requires_grad=rg)
                    target = torch.randint(0, 5, shape[:-1], device=device)
                    if target.numel():
                        target.view(-1)[0] = -100
                    for beta in (0.0, 0.5, 1.0):
                        yield ops.distill, (s, t, target if rg else None, beta, 2.0, -100, reduction)
                    yield ops.distill_forward, (s, t, target, 0.3, 1.0, -100, reduction, torch.float32)
    x = make((5, 9), torch.float32, device, requires_grad=True)
    y = make((5, 9), torch.float32, device, 0, 1, requires_grad=True)
    target = torch.tensor([1, -100, 2, 3, 4], device=device)
    for reduction in (0, 1, 2):
        yield ops.sigmoid_focal_composite, (x, y, 0.25, 2.0, reduction)
        yield ops.multilabel_soft_margin_composite, (x, y, make((9,), torch.float32, device, 0.5, 2), reduction)
    for reduction in (0, 1, 2, 3):
        for beta in (0.0, 0.4, 1.0):
            yield ops.distill_composite, (x, y, target, beta, 1.5, -100, reduction)


def sigmoid_multilabel_distill_backward_samples(device):
    for dtype in (torch.float32, torch.float16):
        for reduction in (0, 1, 2):
            x = make((4, 7), dtype, device)
            y = make((4, 7), dtype, device, 0, 1)
            for mask in ([True, True], [True, False], [False, True]):
                g = make((4, 7) if reduction == 0 else (), dtype, device)
                yield ops.sigmoid_focal_backward, (g, x, y, 0.25, 2.0, reduction, mask)
                yield ops.sigmoid_focal_backward, (g, x, y, -1.0, 0.5, reduction, mask)
                g = make((4,) if reduction == 0 else (), dtype, device)
                yield ops.multilabel_soft_margin_backward, (g, x, y, make((7,), dtype, device), reduction, mask)
        for reduction in (0, 1, 2, 3):
            for shape in ((4, 7), (2, 3, 5)):
                s = make(shape, dtype, device)
                t = make(shape, dtype, device)
                target = torch.randint(0, 5, shape[:-1], device=device)
                target.view(-1)[0] = -100
                for beta in (0.0, 0.5, 1.0):
                    _, stats, denom = ops.distill_forward(s, t, target, beta, 2.0, -100, reduction, None)
                    g = make(shape[:-1] if reduction == 0 else (), dtype, device)
                    for mask in ([True, True], [True, False], [False, True]):
                        yield ops.distill_backward, (g, s, t, target, stats, denom, beta, 2.0, -100, reduction, mask)


# linear_cross_entropy: (N, D) and (D) inputs, an empty batch, class indices
# and probabilities, with and without bias, one chunk and several.
LCE_SHAPES = ((6, 5, 13), (5, 13), (0, 5, 13))  # (N, D, V) or (D, V)


def _lce_inputs(device, dtype, shape, prob, rg, bias):
    D, V = shape[-2:]
    batch = shape[:-2]
    x = make((*batch, D), dtype, device, requires_grad=rg)
    w = make((V, D), dtype, device, -0.5, 0.5, requires_grad=rg)
    b = make((V,), dtype, device, requires_grad=rg) if bias else None
    if prob:
        t = make((*batch, V), dtype, device, 0, 1)
    else:
        t = torch.randint(0, V, batch, device=device)
        if t.numel() > 1:
            t.view(-1)[1] = -100
    return x, w, t, b


def linear_cross_entropy_forward_samples(device):
    for dtype in (torch.float32, torch.bfloat16):
        for shape in LCE_SHAPES:
            for prob in (False, True):
                for reduction in (0, 1, 2):
                    # (requires grad, bias and class weight, chunk rows)
                    for rg, bias, chunk in ((False, False, 0), (True, True, 4)):
                        x, w, t, b = _lce_inputs(device, dtype, shape, prob, rg, bias)
                        cw = make((shape[-1],), dtype, device, 0.5, 2) if bias else None
                        opts = (-100, reduction, 0.1 if bias else 0.0, 0.0, None, chunk)
                        yield ops.linear_cross_entropy, (x, w, t, b, cw, *opts)
                        if dtype == torch.float32:
                            mask = [rg, rg, rg and bias]
                            yield ops.linear_cross_entropy_forward, (x, w, t, b, cw, *opts, None, mask)
                            yield ops.linear_cross_entropy_composite, (x, w, t, b, cw, *opts)
    # extras, out_dtype, and a K-dimensional weight (composite)
    x, w, t, b = _lce_inputs(device, torch.bfloat16, (6, 5, 13), False, True, True)
    yield ops.linear_cross_entropy, (x, w, t, b, None, -100, 1, 0.0, 1e-3, 5.0, 2, torch.float32)
    x = make((4, 5), torch.float32, device, requires_grad=True)
    w3 = make((7, 3, 5), torch.float32, device, requires_grad=True)
    yield ops.linear_cross_entropy_composite, (x, w3, torch.randint(0, 7, (4, 3), device=device))


def linear_cross_entropy_backward_samples(device):
    for dtype in (torch.float32, torch.float16):
        for shape in LCE_SHAPES:
            for prob in (False, True):
                for reduction in (0, 1, 2):
                    x, w, t, b = _lce_inputs(device, dtype, shape, prob, False, True)
                    opts = (-100, reduction, 0.1, 0.0, None, 3)
                    _, lse, stats, mass, *_ = ops.linear_cross_entropy_forward(
                        x, w, t, b, None, *opts, None, [False, False, False]
                    )
                    g = make(lse.shape[:-1] if reduction == 0 else (), dtype, device)
                    for mask in ([True, True, True], [False, True, False]):
                        yield ops.linear_cross_entropy_backward, (g, x, w, t, b, None, lse, stats, mass, *opts, mask)
