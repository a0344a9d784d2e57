"""The autograd node of every loss op (csrc/autograd.cpp, apply_loss and
LossNode): a plain autograd node under a fixed name, in place of the C++
Function node that torch::autograd::Function::apply builds. What that node
gave has to hold: the output's edge, the inputs' edges, saved-tensor checks and
hooks, hooks on the node, node creation hooks, retain_graph, and compiled
autograd."""

import weakref

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from test_eager_calls import _args
from torch._dynamo import compiled_autograd

from fusedloss._ops import eager

NODE_NAMES = {
    "bce_with_logits": "BinaryCrossEntropyWithLogitsBackward",
    "mse": "MseLossBackward",
    "cross_entropy": "CrossEntropyLossBackward",
    "hinge_embedding": "HingeEmbeddingLossBackward",
    "soft_margin": "SoftMarginLossBackward",
    "hinge": "HingeLossBackward",
    "multi_margin": "MultiMarginLossBackward",
    "sigmoid_focal": "SigmoidFocalLossBackward",
    "multilabel_soft_margin": "MultilabelSoftMarginLossBackward",
    "distill": "DistillationLossBackward",
    "linear_cross_entropy": "LinearCrossEntropyBackward",
}
LOSSES = sorted(NODE_NAMES)


def _leaves(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _fresh(args):
    """The same call on new leaves (same values), so that .grad starts empty."""
    return tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.requires_grad else a
                 for a in args)  # fmt: skip


@pytest.mark.parametrize("name", LOSSES)
def test_node_name_and_edges(name):
    args = _args(name, "cpu")
    loss = getattr(eager, name)(*args)
    node = loss.grad_fn
    assert node.name() == "fusedloss::" + NODE_NAMES[name]
    assert loss.requires_grad and not loss.is_leaf and loss.output_nr == 0
    # one edge per tensor argument, in order: the leaves' AccumulateGrad, None for the others
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    assert len(node.next_functions) == len(tensors)
    for t, (fn, _) in zip(tensors, node.next_functions, strict=True):
        if t.requires_grad:
            assert fn is not None and fn.variable is t
        else:
            assert fn is None
    # the output's metadata on the node, which the engine checks its gradient against
    for reduction in (0, 1):
        out = getattr(eager, name)(*_args(name, "cpu", reduction=reduction))
        (meta,) = out.grad_fn._input_metadata
        assert (list(meta.shape), meta.dtype, meta.device) == (list(out.shape), out.dtype, out.device)


@pytest.mark.parametrize("name", LOSSES)
def test_node_creation_hook_fires_once_on_a_complete_node(name):
    """The hook sees the node with its output's metadata bound and after every
    tensor it saves was packed."""
    args = _args(name, "cpu")
    events = []

    def pack(t):
        events.append("pack")
        return t

    def hook(node):
        if node.name().startswith("fusedloss::"):
            edges = sum(fn is not None for fn, _ in node.next_functions)
            events.append((node.name(), edges, len(node._input_metadata)))

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autograd.graph.node_creation_hook(hook):
            loss = getattr(eager, name)(*args)
    assert events[-1] == ("fusedloss::" + NODE_NAMES[name], len(_leaves(args)), 1)
    assert events[:-1] and set(events[:-1]) == {"pack"}
    assert loss.grad_fn.name() == events[-1][0]


@pytest.mark.parametrize("name", LOSSES)
def test_saved_tensor_hooks_pack_and_unpack_every_saved_tensor(name):
    """The backward reads each saved tensor through its unpack hook: the
    gradients come from what the hook returns."""
    args = _args(name, "cpu")
    call = getattr(eager, name)
    expected = torch.autograd.grad(call(*args), _leaves(args))
    packed, unpacked = [], []

    def pack(t):
        packed.append(t)
        return ("kept", t.detach().clone())

    def unpack(p):
        unpacked.append(p)
        return p[1]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = call(*args)
    assert packed and not unpacked
    grads = torch.autograd.grad(loss, _leaves(args))
    assert len(unpacked) == len(packed)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_a_saved_output_does_not_keep_its_graph_alive():
    """mse's weighted mean saves its own loss; the node holds that output
    weakly (as torch's nodes do), so dropping the loss frees both."""
    x = torch.randn(6, 9, requires_grad=True)
    y, w = torch.randn(6, 9), torch.rand(6, 9) + 0.5
    loss = eager.mse(x, y, w, 1, None)
    ref = weakref.ref(loss)
    del loss
    assert ref() is None


@pytest.mark.parametrize("name", LOSSES)
def test_hooks_retain_graph_and_a_second_backward(name):
    args = _args(name, "cpu")
    call = getattr(eager, name)
    leaves = _leaves(args)
    expected = torch.autograd.grad(call(*args), leaves)

    loss = call(*args)
    seen = {}
    loss.grad_fn.register_prehook(lambda grad_outputs: (grad_outputs[0] * 2,))
    loss.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.setdefault("in", grad_inputs))
    doubled = torch.autograd.grad(loss, leaves, retain_graph=True)
    for g, e in zip(doubled, expected, strict=True):
        torch.testing.assert_close(g, 2 * e, rtol=0, atol=0)
    assert sum(g is not None for g in seen["in"]) == len(leaves)
    again = torch.autograd.grad(loss, leaves)  # the graph was retained
    for g, e in zip(again, expected, strict=True):
        torch.testing.assert_close(g, 2 * e, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("name", LOSSES)
def test_a_saved_input_changed_in_place_is_refused(name):
    args = _args(name, "cpu")
    loss = getattr(eager, name)(*args)
    with torch.no_grad():
        _leaves(args)[0].add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


class _DropGrad(torch.autograd.Function):
    """Identity whose backward sends no gradient (None) to its input."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return None


@pytest.mark.parametrize("name", LOSSES)
def test_an_undefined_incoming_gradient_gives_zeros(name):
    """The node materialises an undefined gradient as zeros of the output's
    recorded shape and dtype (its output metadata), as torch's nodes do."""
    args = _args(name, "cpu", reduction=0)
    loss = getattr(eager, name)(*args)
    other = args[0].sum()
    grads = torch.autograd.grad(_DropGrad.apply(loss).sum() + other, _leaves(args), allow_unused=True)
    for leaf, g in zip(_leaves(args), grads, strict=True):
        assert g is not None  # the node ran, on zeros
        expected = torch.ones_like(leaf) if leaf is args[0] else torch.zeros_like(leaf)
        torch.testing.assert_close(g, expected, rtol=0, atol=0)


def test_tangents_on_non_differentiable_arguments_as_torch():
    """A forward-mode tangent on an argument torch does not differentiate is
    ignored where torch ignores it and refused where torch refuses it."""
    import torch.nn.functional as F

    import fusedloss.functional as FF

    x = torch.randn(4, 3, requires_grad=True)
    t = torch.randint(0, 3, (4,))
    y = torch.rand(4, 3)
    s = torch.sign(torch.randn(4, 3))
    cases = [
        lambda M, d: M.binary_cross_entropy_with_logits(x, y, weight=d(torch.rand(3))),
        lambda M, d: M.binary_cross_entropy_with_logits(x, y, pos_weight=d(torch.rand(3))),
        lambda M, d: M.soft_margin_loss(x, d(s)),
        lambda M, d: M.hinge_embedding_loss(x, d(s)),
        lambda M, d: M.cross_entropy(x, t, weight=d(torch.rand(3))),
        lambda M, d: M.multi_margin_loss(x, t, weight=d(torch.rand(3))),
        lambda M, d: M.multi_margin_loss(x.detach(), t, weight=d(torch.rand(3))),
    ]
    for case in cases:
        outcome = []
        for M in (F, FF):
            torch.manual_seed(0)
            with fwAD.dual_level():
                try:
                    loss = case(M, lambda v: fwAD.make_dual(v, torch.ones_like(v)))
                    outcome.append(("ok", fwAD.unpack_dual(loss).tangent, loss.detach()))
                except NotImplementedError as e:
                    outcome.append(("NotImplementedError", str(e)))
        assert outcome[0][0] == outcome[1][0], outcome
        if outcome[0][0] == "ok":
            assert outcome[0][1] is None and outcome[1][1] is None
            torch.testing.assert_close(outcome[1][2], outcome[0][2])
        else:
            assert outcome[0][1] == outcome[1][1]


@pytest.mark.parametrize("name", LOSSES)
def test_compiled_autograd_runs_the_node(name):
    """A backward under compiled autograd gives eager's gradients, also for a
    second call with other scalar arguments (the node's saved data), which
    compiled autograd passes to its graph at run time."""
    from torch._dynamo.utils import counters

    call = getattr(eager, name)
    args = _args(name, "cpu", reduction=1)
    # the second call changes the reduction and a float argument (if the loss
    # has one), both kept in the node's saved data
    changed = list(_args(name, "cpu", reduction=2))
    floats = [i for i, a in enumerate(args) if isinstance(a, float)]
    if floats:
        changed[floats[0]] = args[floats[0]] * 1.5 + 0.25
    counters.clear()
    for case in (args, tuple(changed)):
        eager_args, compiled_args = _fresh(case), _fresh(case)
        call(*eager_args).backward()
        loss = call(*compiled_args)
        with compiled_autograd._enable(torch.compile(backend="eager")):
            loss.backward()
        for e, c in zip(_leaves(eager_args), _leaves(compiled_args), strict=True):
            assert c.grad is not None
            torch.testing.assert_close(c.grad, e.grad, rtol=0, atol=0)
    assert counters["compiled_autograd"]["captures"] >= 1
