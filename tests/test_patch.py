"""fusedloss.patch_torch(): routing a library's torch.nn.functional losses and
torch.nn loss modules through fusedloss. With torch patched, every fallback
must still reach torch's own implementation (no recursion), double backward
must work, and every error path must raise torch's error."""

import warnings

import pytest
import test_bce_with_logits
import test_cross_entropy
import test_hinge_embedding
import test_linear_cross_entropy
import test_mse
import test_multi_margin
import test_soft_margin
import torch
import torch.nn.functional as F

import fusedloss
import fusedloss.functional as FF
from fusedloss._patch import FUNCTIONAL_NAMES, ORIGINAL_FUNCTIONAL, ORIGINAL_MODULES


@pytest.fixture
def patched():
    with fusedloss.patch_torch():
        yield
    assert F.cross_entropy is ORIGINAL_FUNCTIONAL["cross_entropy"]


def test_patch_and_unpatch():
    assert F.cross_entropy is ORIGINAL_FUNCTIONAL["cross_entropy"]
    fusedloss.patch_torch()
    try:
        for name in FUNCTIONAL_NAMES:
            assert getattr(F, name) is getattr(FF, name)
        assert torch.nn.CrossEntropyLoss is fusedloss.nn.CrossEntropyLoss
        assert torch.nn.modules.loss.MSELoss is fusedloss.nn.MSELoss
        # fusedloss's modules still subclass torch's own.
        assert issubclass(torch.nn.BCEWithLogitsLoss, ORIGINAL_MODULES["BCEWithLogitsLoss"])
    finally:
        fusedloss.unpatch_torch()
    for name in FUNCTIONAL_NAMES:
        assert getattr(F, name) is ORIGINAL_FUNCTIONAL[name]
    assert torch.nn.CrossEntropyLoss is ORIGINAL_MODULES["CrossEntropyLoss"]


def test_library_code_runs_fused(patched):
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 10)
            self.loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)  # built after the patch

        def forward(self, x, y):
            return self.loss(self.lin(x), y) + F.mse_loss(self.lin(x).sum(1), y.float())

    m = Head()
    assert isinstance(m.loss, fusedloss.nn.CrossEntropyLoss)
    out = m(torch.randn(4, 8), torch.randint(0, 10, (4,)))
    out.backward()
    assert m.lin.weight.grad is not None


def test_the_issues_recursions_are_gone(patched):
    x = torch.randn(64, 100, requires_grad=True)
    y = torch.randint(0, 100, (64,))
    (g,) = torch.autograd.grad(F.cross_entropy(x, y), x, create_graph=True)  # used to never return
    (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
    xn = x.detach().requires_grad_()
    (gn,) = torch.autograd.grad(ORIGINAL_FUNCTIONAL["cross_entropy"](xn, y), xn, create_graph=True)
    (ggn,) = torch.autograd.grad(gn.pow(2).sum(), xn)
    torch.testing.assert_close(g, gn)
    torch.testing.assert_close(gg, ggn)
    with pytest.raises(ValueError, match=r"Expected input batch_size \(64\) to match target batch_size \(10\)"):
        F.cross_entropy(x, y[:10])  # used to recurse
    # int32 targets, bf16 logits with an fp32 class weight, BCE with an integer
    # target: each raises torch's own error.
    for call in (
        lambda f: f(x, y.int()),
        lambda f: f(x.bfloat16(), y, weight=torch.rand(100)),
    ):
        with pytest.raises(RuntimeError) as native:
            call(ORIGINAL_FUNCTIONAL["cross_entropy"])
        with pytest.raises(RuntimeError) as fused:
            call(F.cross_entropy)
        assert str(fused.value) == str(native.value)
    t = torch.ones(4, 3, dtype=torch.long)
    with pytest.raises(RuntimeError) as native:
        ORIGINAL_FUNCTIONAL["binary_cross_entropy_with_logits"](torch.randn(4, 3), t)
    with pytest.raises(RuntimeError) as fused:
        F.binary_cross_entropy_with_logits(torch.randn(4, 3), t)
    assert str(fused.value) == str(native.value)


def _all_error_cases():
    def named(name, table):
        return [(name, case, args, kwargs) for case, (args, kwargs) in table.items()]

    cases = named("binary_cross_entropy_with_logits", test_bce_with_logits._error_cases("cpu"))
    cases += named("cross_entropy", test_cross_entropy._error_cases("cpu"))
    cases += named("mse_loss", test_mse._error_cases("cpu"))
    cases += named("multi_margin_loss", test_multi_margin._error_cases())
    cases += [("soft_margin_loss", c, a, k) for c, a, k in test_soft_margin.ERROR_CASES]
    cases += [("hinge_embedding_loss", c, a, k) for c, a, k in test_hinge_embedding.ERROR_CASES]
    if "linear_cross_entropy" in ORIGINAL_FUNCTIONAL:
        cases += [
            ("linear_cross_entropy", str(i), a, k) for i, (a, k) in enumerate(test_linear_cross_entropy._errors("cpu"))
        ]
    return cases


@pytest.mark.parametrize("name,case,args,kwargs", _all_error_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_error_path_under_the_patch(patched, name, case, args, kwargs):
    """Each loss's error cases, called through the patched torch name, raise
    exactly what torch's own function raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as native:
            ORIGINAL_FUNCTIONAL[name](*args, **kwargs)
        with pytest.raises(type(native.value)) as fused:
            getattr(F, name)(*args, **kwargs)
    assert str(fused.value) == str(native.value)


@pytest.mark.parametrize("name", FUNCTIONAL_NAMES)
def test_double_backward_under_the_patch(patched, name):
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    args = {
        "cross_entropy": (torch.randint(0, 7, (5,)),),
        "multi_margin_loss": (torch.randint(0, 7, (5,)),),
        "hinge_embedding_loss": (torch.randint(0, 2, (5, 7)).double() * 2 - 1,),
        "soft_margin_loss": (torch.randint(0, 2, (5, 7)).double() * 2 - 1,),
        "linear_cross_entropy": (torch.randn(4, 7, dtype=torch.float64), torch.randint(0, 4, (5,))),
    }.get(name, (torch.rand(5, 7, dtype=torch.float64),))
    fn = getattr(F, name)
    assert fn is getattr(FF, name)
    assert torch.autograd.gradgradcheck(lambda a: fn(a, *args), (x,))
