"""torch.func transforms (vmap, grad, vmap(grad) per-sample gradients, jvp),
forward-mode AD, and TorchScript: every loss works under them and matches
torch, or (torch.jit.script of a module) refuses with a clear error."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

import fusedloss
import fusedloss.functional as FF
from fusedloss.testing import reference


def _sign(*shape):
    return torch.randint(0, 2, shape, dtype=torch.float64) * 2 - 1


# name -> (input shape, target maker for that shape, extra kwargs)
LOSSES = {
    "cross_entropy": ((6, 10), lambda s: torch.randint(0, s[-1], s[:-1]), {"label_smoothing": 0.1}),
    "binary_cross_entropy_with_logits": ((6, 10), lambda s: torch.rand(s, dtype=torch.float64), {}),
    "mse_loss": ((6, 10), lambda s: torch.randn(s, dtype=torch.float64), {}),
    "hinge_embedding_loss": ((6, 10), lambda s: _sign(*s), {"margin": 0.5}),
    "soft_margin_loss": ((6, 10), lambda s: _sign(*s), {}),
    "multi_margin_loss": ((6, 10), lambda s: torch.randint(0, s[-1], s[:-1]), {"p": 2}),
    "hinge_loss": ((6, 10), lambda s: _sign(*s), {"squared": True}),
}


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_vmap_matches_torch(name, reduction, capfd):
    shape, make_target, kw = LOSSES[name]
    x3 = torch.randn(3, *shape, dtype=torch.float64)
    y = make_target(shape)
    fused = vmap(lambda z: getattr(FF, name)(z, y, reduction=reduction, **kw))(x3)
    native = vmap(lambda z: reference(name)(z, y, reduction=reduction, **kw))(x3)
    torch.testing.assert_close(fused, native)
    # The composite runs as ATen ops, each with torch's batching rule: no
    # per-sample loop fallback.
    assert "performance drop" not in capfd.readouterr().err


@pytest.mark.parametrize("name", list(LOSSES))
def test_per_sample_gradients(name):
    """vmap(grad(loss)): the recipe of differential privacy and influence functions."""
    shape, make_target, kw = LOSSES[name]
    n, c = shape
    w = torch.randn(4, c, dtype=torch.float64)
    xs = torch.randn(n, 4, dtype=torch.float64)
    ys = make_target(shape)

    def per_sample(loss):
        def one(w, xi, yi):
            return loss((xi @ w)[None], yi[None], **kw)

        return vmap(grad(one), in_dims=(None, 0, 0))(w, xs, ys)

    torch.testing.assert_close(per_sample(getattr(FF, name)), per_sample(reference(name)))


def _tangent_from_reverse_mode(fn, x, t):
    """J t, from torch's reverse mode (for losses torch has no forward AD for)."""
    jac = torch.autograd.functional.jacobian(fn, x)
    return (jac * t).reshape(*jac.shape[: jac.dim() - x.dim()], -1).sum(-1)


@pytest.mark.parametrize("name", list(LOSSES))
def test_forward_mode_ad(name):
    shape, make_target, kw = LOSSES[name]
    x, t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    y = make_target(shape)
    for reduction in ("none", "mean"):
        fused = lambda z, r=reduction: getattr(FF, name)(z, y, reduction=r, **kw)  # noqa: E731
        native = lambda z, r=reduction: reference(name)(z, y, reduction=r, **kw)  # noqa: E731
        if name == "multi_margin_loss":  # torch has no forward AD for it; fusedloss does
            expected = (native(x), _tangent_from_reverse_mode(native, x, t))
        else:
            expected = jvp(native, (x,), (t,))
        torch.testing.assert_close(jvp(fused, (x,), (t,)), expected)
        with fwAD.dual_level():
            out = fused(fwAD.make_dual(x, t))
            torch.testing.assert_close(fwAD.unpack_dual(out).tangent, expected[1])


def test_jit_script_refuses_clearly_and_trace_works():
    m = fusedloss.nn.CrossEntropyLoss()
    with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script"):
        torch.jit.script(m)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loss = fusedloss.nn.MSELoss()

        def forward(self, x, y):
            return self.loss(x, y)

    with pytest.raises(RuntimeError, match="fusedloss.nn.MSELoss cannot be compiled"):
        torch.jit.script(Model())
    x, y = torch.randn(4, 5), torch.randint(0, 5, (4,))
    traced = torch.jit.trace(m, (x, y))
    torch.testing.assert_close(traced(x, y), F.cross_entropy(x, y))
