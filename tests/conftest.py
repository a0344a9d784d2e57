import os
import tempfile

import pytest
import torch

import fusedloss  # noqa: F401  (loads the ops before any test module imports them)

HAS_CUDA = torch.cuda.is_available() and fusedloss.build_info()["cuda"]

# Working directory for tests that start a Python subprocess: outside the
# source tree, so that it imports the installed fusedloss (with -e or without).
OUTSIDE_SOURCE = tempfile.gettempdir()

# Every parity test runs on each available device: CPU here and in CI, and the
# same parametrization on CUDA on a GPU machine.
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["none", "mean", "sum"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def cuda_only():
    return pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build")


def make(shape, dtype, device, low=-3.0, high=3.0, requires_grad=False, layout="contiguous"):
    """A random tensor of `shape`; `layout` picks how its memory is arranged
    (values are the same function of the index in every layout)."""
    base = torch.empty(shape, dtype=torch.float64).uniform_(low, high)
    if layout == "contiguous" or base.dim() < 2 and layout == "transposed":
        t = base.to(device=device, dtype=dtype)
    elif layout == "transposed":
        t = base.transpose(0, -1).contiguous().to(device=device, dtype=dtype).transpose(0, -1)
    elif layout == "offset":
        flat = torch.empty(base.numel() + 1, dtype=dtype, device=device)
        flat[1:] = base.reshape(-1).to(device=device, dtype=dtype)
        t = flat[1:].view(shape)
    elif layout == "strided":
        big = torch.zeros(*shape, 2, dtype=dtype, device=device)
        big[..., 0] = base.to(device=device, dtype=dtype)
        t = big[..., 0]
    else:
        raise ValueError(layout)
    assert t.shape == tuple(shape)
    return t.requires_grad_(requires_grad)


os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
