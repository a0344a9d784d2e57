"""The build: what it records, and the clear errors for a mismatched one."""

import os
import subprocess
import sys

import pytest
import torch

import fusedloss
from conftest import OUTSIDE_SOURCE
from fusedloss import _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_info_keys_and_values():
    info = fusedloss.build_info()
    assert info["version"] == fusedloss.__version__
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    assert info["openmp"] is True
    if info["cuda"]:
        assert info["cuda_archs"] and all(a[0].isdigit() for a in info["cuda_archs"])
    info["version"] = "changed"
    assert fusedloss.build_info()["version"] == fusedloss.__version__  # a copy


def test_version_mismatch_message():
    with pytest.raises(ImportError) as e:
        _ops.check_torch_version("2.11.0+cu130", "2.14.1+cu130")
    msg = str(e.value)
    assert "2.11.0+cu130" in msg and "2.14.1+cu130" in msg and "pip install --no-build-isolation" in msg


def test_import_under_another_torch_raises_importerror():
    # A real import with the running torch pretending to be another version.
    code = "import torch; torch.__version__ = '9.9.9'; import fusedloss"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=OUTSIDE_SOURCE)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "9.9.9" in r.stderr and torch.__version__ in r.stderr
    assert "Segmentation" not in r.stderr


def test_cpu_capability_check():
    _ops.check_cpu_capability("DEFAULT")  # always loadable
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    if "avx512f" not in flags:
        with pytest.raises(ImportError, match="AVX512"):
            _ops.check_cpu_capability("AVX512")
    else:
        _ops.check_cpu_capability("AVX512")


def test_cpu_buffer_cache_reuses_and_empties():
    ops = torch.ops.fusedloss
    fusedloss.empty_cpu_cache()
    x = torch.randn(1 << 20)
    y = torch.rand(1 << 20)
    g = torch.ones(())
    gx, _ = ops.bce_with_logits_backward(g, x, y, None, None, 1, [True, False])
    ptr = gx.data_ptr()
    del gx
    assert fusedloss.cpu_cache_bytes() >= 4 << 20
    gx2, _ = ops.bce_with_logits_backward(g, x, y, None, None, 1, [True, False])
    assert gx2.data_ptr() == ptr
    expected, _ = ops.bce_with_logits_backward(g, x.clone(), y, None, None, 1, [True, False])
    assert torch.equal(gx2, expected)
    del gx2, expected
    fusedloss.empty_cpu_cache()
    assert fusedloss.cpu_cache_bytes() == 0
