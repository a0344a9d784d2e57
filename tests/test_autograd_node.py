"""The autograd node of every loss op (csrc/autograd.cpp, apply_loss): torch's
C++ Function node under a fixed name, built without the general output
wrapping of torch::autograd::Function::apply. What that wrapping gave has to
hold: the output's edge, the inputs' edges, saved-tensor checks, hooks on the
node, node creation hooks, retain_graph, and compiled autograd."""

import pytest
import torch
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
    args = _args(name, "cpu")
    seen = []

    def hook(node):
        seen.append((node.name(), sum(fn is not None for fn, _ in node.next_functions)))

    with torch.autograd.graph.node_creation_hook(hook):
        loss = getattr(eager, name)(*args)
    ours = [s for s in seen if s[0].startswith("fusedloss::")]
    assert ours == [("fusedloss::" + NODE_NAMES[name], len(_leaves(args)))]
    assert loss.grad_fn.name() == ours[0][0]


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


@pytest.mark.parametrize("name", LOSSES)
def test_compiled_autograd_runs_the_node(name):
    """A backward under compiled autograd gives eager's gradients, and a second
    call with other scalar arguments is not served a graph made for the first."""
    call = getattr(eager, name)
    args = _args(name, "cpu", reduction=1)
    # the second call changes the reduction and a float argument (if the loss
    # has one), both kept in the node's saved data
    changed = list(_args(name, "cpu", reduction=2))
    floats = [i for i, a in enumerate(args) if isinstance(a, float)]
    if floats:
        changed[floats[0]] = args[floats[0]] * 1.5 + 0.25
    for case in (args, tuple(changed)):
        eager_args, compiled_args = _fresh(case), _fresh(case)
        call(*eager_args).backward()
        loss = call(*compiled_args)
        with compiled_autograd._enable(torch.compile(backend="eager")):
            loss.backward()
        for e, c in zip(_leaves(eager_args), _leaves(compiled_args), strict=True):
            assert c.grad is not None
            torch.testing.assert_close(c.grad, e.grad, rtol=0, atol=0)
