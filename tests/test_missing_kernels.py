"""A device fusedloss has no kernels for (CUDA tensors on a build made without
nvcc, or any other device): the loss runs torch's own implementation, with one
warning that says how to get the kernels, so training never stops for it."""

import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedloss.functional as FF


class _NoKernels:
    """torch.ops.fusedloss as a build without kernels for the tensors' device
    sees it: every loss op raises what the dispatcher raises then."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        if name.endswith("_composite"):
            return getattr(self._real, name)

        def missing(*args, **kwargs):
            raise NotImplementedError(f"Could not run 'fusedloss::{name}' with arguments from the 'CUDA' backend.")

        return types.SimpleNamespace(default=missing)


@pytest.mark.parametrize(
    "name,args",
    [
        ("cross_entropy", (torch.randn(4, 7), torch.randint(0, 7, (4,)))),
        ("binary_cross_entropy_with_logits", (torch.randn(4, 7), torch.rand(4, 7))),
        ("mse_loss", (torch.randn(4, 7), torch.randn(4, 7))),
        ("hinge_embedding_loss", (torch.randn(4, 7), torch.ones(4, 7))),
        ("soft_margin_loss", (torch.randn(4, 7), torch.ones(4, 7))),
        ("multi_margin_loss", (torch.randn(4, 7), torch.randint(0, 7, (4,)))),
    ],
)
def test_refused_call_runs_torchs_loss(monkeypatch, name, args):
    monkeypatch.setattr(FF, "ops", _NoKernels(torch.ops.fusedloss))
    x = args[0].requires_grad_()
    out = getattr(FF, name)(x, *args[1:])
    (g,) = torch.autograd.grad(out, x)
    xn = x.detach().requires_grad_()
    expected = getattr(F, name)(xn, *args[1:])
    (gn,) = torch.autograd.grad(expected, xn)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(g, gn)


def test_cuda_without_kernels_warns_once_with_the_fix(monkeypatch):
    monkeypatch.setattr(
        FF,
        "BUILD_INFO",
        {"cuda": False, "cuda_skipped_reason": "no nvcc was found", "cuda_enable_hint": "pip install <nvcc wheels>"},
    )
    monkeypatch.setattr(FF, "_warned_no_kernels", False)
    on_cuda = types.SimpleNamespace(device=torch.device("cuda"))
    error = NotImplementedError("Could not run 'fusedloss::cross_entropy' with arguments from the 'CUDA' backend.")
    with pytest.warns(RuntimeWarning, match=r"built without CUDA kernels \(no nvcc was found\)") as rec:
        FF._on_refusal(error, on_cuda, "cross_entropy")
    assert "pip install <nvcc wheels>" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FF._on_refusal(error, on_cuda, "cross_entropy")  # once only
    # A refusal for another reason (invalid input, or a build that has the
    # kernels) is not about missing kernels.
    monkeypatch.setattr(FF, "_warned_no_kernels", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FF._on_refusal(RuntimeError("bad target"), on_cuda, "cross_entropy")
        FF._on_refusal(error, types.SimpleNamespace(device=torch.device("cpu")), "cross_entropy")
