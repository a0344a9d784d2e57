"""torch.compile(fullgraph=True): every loss traces without graph breaks and
gives eager's values and gradients, with static and dynamic shapes."""

import pytest
import torch

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


CASES = {"bce": _bce, "mse": _mse, "bce_module": _bce_module}


def _grads(out, args):
    leaves = [a for a in args if a.requires_grad]
    return torch.autograd.grad(out, leaves, torch.ones_like(out))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_matches_eager(device, case, backend, dynamic):
    torch._dynamo.reset()
    fn, args = CASES[case](device)
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)
    eager_out = fn(*args)
    eager_grads = _grads(eager_out, args)
    out = compiled(*args)
    grads = _grads(out, args)
    torch.testing.assert_close(out, eager_out, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_no_graph_breaks(case):
    torch._dynamo.reset()
    fn, args = CASES[case]("cpu")
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_dynamic_shapes_recompile_boundedly():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(lambda a, b: FF.binary_cross_entropy_with_logits(a, b), backend=counter, dynamic=True, fullgraph=True)
    for n, c in [(3, 4), (5, 7), (9, 2), (17, 33), (2, 100)]:
        x = make((n, c), torch.float32, "cpu", requires_grad=True)
        y = make((n, c), torch.float32, "cpu", 0, 1)
        fn(x, y).backward()
    assert counter.frame_count <= 2
