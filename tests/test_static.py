"""Static checks of the CUDA sources: every kernel launch is on the current
stream and followed by a launch check (torch's own rule for its kernels)."""

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(
    glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh"))
)


def test_there_are_cuda_sources():
    assert any(p.endswith(".cu") for p in CUDA_SOURCES)


def test_every_launch_is_checked_and_on_the_current_stream():
    from torch.testing._internal.check_kernel_launches import check_code_for_cuda_kernel_launches

    launches = 0
    for path in CUDA_SOURCES:
        with open(path) as f:
            code = f.read()
        assert check_code_for_cuda_kernel_launches(code, path) == 0, path
        for m in re.finditer(r"<<<([^>]*)>>>", code):
            launches += 1
            params = [p.strip() for p in m.group(1).split(",")]
            assert len(params) == 4 and "getCurrentCUDAStream" in params[3] or params[3] == "stream", (path, m.group(0))
            if params[3] == "stream":
                before = code[: m.start()]
                assert re.search(r"stream\s*=\s*c10::cuda::getCurrentCUDAStream\(\)", before), (path, m.group(0))
    assert launches > 0


def test_cuda_sources_avoid_headers_that_need_cusparse():
    # ATen/cuda/CUDAContext.h pulls in cusparse.h, which some toolkits lack.
    for path in CUDA_SOURCES:
        with open(path) as f:
            assert "ATen/cuda/CUDAContext.h" not in f.read(), path


def test_cuda_code_has_no_float_atomics():
    # Reductions must be deterministic: partial sums, never atomicAdd on floats.
    for path in CUDA_SOURCES:
        with open(path) as f:
            assert "atomicAdd" not in f.read(), path
