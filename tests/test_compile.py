"""torch.compile(fullgraph=True): every loss traces without graph breaks and
gives eager's values and gradients, with static and dynamic shapes."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
import fusedloss.functional as FF
from conftest import DEVICES, make


def _bce(device, n=8, c=5):
    x = make((n, c), torch.float32, device, requires_grad=True)
    y = make((n, c), torch.float32, device, 0, 1, requires_grad=True)
    kw = {"pos_weight": make((c,), torch.float32, device, 0, 2), "weight": make((n, 1), torch.float32, device, 0, 2)}
    return (lambda a, b: FF.binary_cross_entropy_with_logits(a, b, **kw)), (x, y)


def _mse(device, n=8, c=5):
    x = make((n, c), torch.float32, device, requires_grad=True)
    y = make((n, c), torch.float32, device, requires_grad=True)
    return (lambda a, b: FF.mse_loss(a, b, reduction="sum")), (x, y)


def _bce_module(device, n=8, c=5):
    m = fusedloss.nn.BCEWithLogitsLoss(pos_weight=make((c,), torch.float32, device, 0, 2))
    x = make((n, c), torch.float32, device, requires_grad=True)
    y = make((n, c), torch.float32, device, 0, 1)
    return m, (x, y)


def _ce(device, n=8, c=37):
    x = make((n, c), torch.float32, device, requires_grad=True)
    t = torch.randint(0, c, (n,), device=device)
    t[0] = -100
    w = make((c,), torch.float32, device, 0.5, 2)
    return (lambda a: FF.cross_entropy(a, t, weight=w, label_smoothing=0.1)), (x,)


def _ce_prob_extras(device, n=8, c=37):
    x = make((n, c), torch.float32, device, requires_grad=True)
    p = make((n, c), torch.float32, device, 0, 1, requires_grad=True)
    return (lambda a, b: FF.cross_entropy(a, b, lse_square_scale=1e-3, softcap=5.0)), (x, p)


def _ce_kdim_module(device):
    m = fusedloss.nn.CrossEntropyLoss(ignore_index=1, reduction="sum")
    x = make((2, 5, 4, 3), torch.float32, device, requires_grad=True)
    t = torch.randint(0, 5, (2, 4, 3), device=device)
    return (lambda a: m(a, t)), (x,)


def _margins(device):
    x = make((6, 9), torch.float32, device, requires_grad=True)
    y = torch.sign(make((6, 9), torch.float32, device))
    t = torch.randint(0, 9, (6,), device=device)
    w = make((9,), torch.float32, device, 0.5, 2)
    return (
        lambda a: (
            FF.hinge_embedding_loss(a, y, margin=0.5)
            + FF.soft_margin_loss(a, y, reduction="sum")
            + FF.hinge_loss(a, y, squared=True)
            + FF.multi_margin_loss(a, t, p=2, weight=w)
        )
    ), (x,)


def _lce(device, n=9, d=16, v=37):
    x = make((n, d), torch.float32, device, requires_grad=True)
    w = make((v, d), torch.float32, device, -0.5, 0.5, requires_grad=True)
    b = make((v,), torch.float32, device, requires_grad=True)
    t = torch.randint(0, v, (n,), device=device)
    t[0] = -100
    return (lambda a, c, e: FF.linear_cross_entropy(a, c, t, linear_bias=e, label_smoothing=0.1, chunk_size=4)), (
        x,
        w,
        b,
    )


def _lce_none_module(device, n=9, d=16, v=37):
    m = fusedloss.nn.LinearCrossEntropyLoss(d, v, bias=True, reduction="none", chunk_size=4).to(device)
    x = make((n, d), torch.float32, device, requires_grad=True)
    t = torch.randint(0, v, (n,), device=device)
    return (lambda a: m(a, t)), (x,)


CASES = {
    "lce": _lce,
    "lce_none_module": _lce_none_module,
    "margins": _margins,
    "bce": _bce,
    "mse": _mse,
    "bce_module": _bce_module,
    "ce": _ce,
    "ce_prob_extras": _ce_prob_extras,
    "ce_kdim_module": _ce_kdim_module,
}


def _grads(out, args):
    leaves = [a for a in args if a.requires_grad]
    return torch.autograd.grad(out, leaves, torch.ones_like(out))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_matches_eager(device, case, backend, dynamic):
    if device == "cuda" and backend == "inductor" and case not in ("ce", "bce"):
        pytest.skip("inductor on CUDA: two cases keep the GPU run short; aot_eager covers the rest")
    torch._dynamo.reset()
    fn, args = CASES[case](device)
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)
    eager_out = fn(*args)
    eager_grads = _grads(eager_out, args)
    out = compiled(*args)
    grads = _grads(out, args)
    torch.testing.assert_close(out, eager_out, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_no_graph_breaks(case):
    torch._dynamo.reset()
    torch.manual_seed(0)
    fn, args = CASES[case]("cpu")
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_dynamic_shapes_recompile_boundedly():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(
        lambda a, b: FF.binary_cross_entropy_with_logits(a, b), backend=counter, dynamic=True, fullgraph=True
    )
    for n, c in [(3, 4), (5, 7), (9, 2), (17, 33), (2, 100)]:
        x = make((n, c), torch.float32, "cpu", requires_grad=True)
        y = make((n, c), torch.float32, "cpu", 0, 1)
        fn(x, y).backward()
    assert counter.frame_count <= 2
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    ce = torch.compile(lambda a, b: FF.cross_entropy(a, b), backend=counter, dynamic=True, fullgraph=True)
    for n, c in [(3, 40), (5, 70), (9, 20), (17, 330), (2, 1000)]:
        x = make((n, c), torch.float32, "cpu", requires_grad=True)
        ce(x, torch.randint(0, c, (n,))).backward()
    assert counter.frame_count <= 2


# ---------------------------------------------------------------------------
# sigmoid_focal_loss, multilabel_soft_margin_loss, distillation: the same
# checks as above, over their own cases (added to CASES, which the checks read).
# ---------------------------------------------------------------------------


def _focal(device, n=8, c=5):
    x = make((n, c), torch.float32, device, requires_grad=True)
    y = make((n, c), torch.float32, device, 0, 1, requires_grad=True)
    m = fusedloss.nn.SigmoidFocalLoss(gamma=1.5, reduction="sum")
    return (lambda a, b: FF.sigmoid_focal_loss(a, b, reduction="mean") + m(a, b)), (x, y)


def _multilabel(device, n=8, c=5):
    x = make((n, c), torch.float32, device, requires_grad=True)
    y = torch.randint(0, 2, (n, c), device=device)
    w = make((c,), torch.float32, device, 0.5, 2)
    m = fusedloss.nn.MultiLabelSoftMarginLoss(weight=w, reduction="none")
    return (lambda a: FF.multilabel_soft_margin_loss(a, y, weight=w) + m(a, y).sum()), (x,)


def _distill(device, b=2, s=6, v=33):
    x = make((b, s, v), torch.float32, device, requires_grad=True)
    t = make((b, s, v), torch.float32, device, requires_grad=True)
    target = torch.randint(0, v, (b, s), device=device)
    target[0, 0] = -100
    m = fusedloss.nn.JSDWithLogitsLoss(beta=0.3, reduction="sum")
    return (lambda a, c: FF.kl_div_with_logits(a, c, temperature=2.0, target=target) + m(a, c, target)), (x, t)


NEW_CASES = {"focal": _focal, "multilabel_soft_margin": _multilabel, "distill": _distill}
CASES.update(NEW_CASES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(NEW_CASES))
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_new_losses_compiled_match_eager(device, case, backend, dynamic):
    test_compiled_matches_eager(device, case, backend, dynamic)


@pytest.mark.parametrize("case", list(NEW_CASES))
def test_new_losses_have_no_graph_breaks(case):
    test_no_graph_breaks(case)


def test_distill_dynamic_shapes_recompile_boundedly():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(lambda a, b: FF.kl_div_with_logits(a, b), backend=counter, dynamic=True, fullgraph=True)
    for n, c in [(3, 40), (5, 70), (9, 20), (17, 330), (2, 1000)]:
        fn(make((n, c), torch.float32, "cpu", requires_grad=True), make((n, c), torch.float32, "cpu")).backward()
    assert counter.frame_count <= 2


@pytest.mark.parametrize("strict", [False, True])
def test_export_drops_inplace_backward(strict):
    """An exported graph never writes gradients over the logits: non-strict
    export (which runs the functional layer for real, with is_compiling but not
    dynamo on) ignores inplace_backward as torch.compile does, so that a graph
    where another op also saved the logits still differentiates correctly."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 9)

        def forward(self, x, t):
            z = self.lin(x)
            return FF.cross_entropy(z, t, inplace_backward=True) + (z * z).sum() * 0.01

    torch.manual_seed(0)
    x, t = torch.randn(6, 5), torch.randint(0, 9, (6,))
    m = M()
    z = m.lin(x)
    expected = torch.autograd.grad(F.cross_entropy(z, t) + (z * z).sum() * 0.01, m.lin.weight)[0]
    ep = torch.export.export(m, (x, t), strict=strict)
    (node,) = [n for n in ep.graph.nodes if n.op == "call_function" and "fusedloss" in str(n.target)]
    bound = dict(zip([a.name for a in node.target._schema.arguments], node.args, strict=False)) | node.kwargs
    assert bound.get("inplace_backward", False) is False
    mod = ep.module()
    mod(x, t).backward()
    torch.testing.assert_close(mod.lin.weight.grad, expected)
