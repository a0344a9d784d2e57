import os
import tempfile

import pytest
import torch

import fusedloss  # noqa: F401  (loads the ops before any test module imports them)
from fusedloss.testing import make_tensor

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
    """A random tensor of `shape` laid out as `layout` (fusedloss.testing.make_tensor)."""
    t = make_tensor(shape, dtype, device, low, high, layout=layout, requires_grad=requires_grad)
    assert t.shape == tuple(shape)
    return t


os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
