"""fusedloss: fused single-pass training losses for PyTorch.

import fusedloss
loss = fusedloss.nn.CrossEntropyLoss()(logits, target)     # like torch.nn
loss = fusedloss.functional.mse_loss(pred, target)         # like torch.nn.functional
"""

from __future__ import annotations

import copy

# _ops loads the extension first (a clear ImportError on a mismatched build).
from . import autograd, functional, nn
from ._ops import _C, ops
from ._ops import BUILD_INFO as _BUILD_INFO
from ._patch import patch_torch, unpatch_torch
from ._validation import set_validation
from ._version import __version__

__all__ = [
    "__version__",
    "autograd",
    "build_info",
    "cpu_cache_bytes",
    "empty_cpu_cache",
    "functional",
    "nn",
    "ops",
    "patch_torch",
    "set_validation",
    "unpatch_torch",
]


def build_info() -> dict:
    """How this fusedloss was built.

    Keys: ``version``, ``torch_version`` (built against), ``torch_cuda_version``,
    ``cuda`` (CUDA kernels compiled), ``cuda_archs`` (e.g. ``["8.0", "9.0+PTX"]``),
    ``cuda_home``, ``openmp``, ``cpu_capability`` (``DEFAULT``/``AVX2``/``AVX512``).
    """
    return copy.deepcopy(_BUILD_INFO)


def empty_cpu_cache() -> None:
    """Return the CPU output buffers fusedloss keeps for reuse to the system.

    Freed CPU losses and gradients of 1 MiB or more are cached (up to
    FUSEDLOSS_CPU_CACHE_MB, default 1024; 0 disables the cache), because the page
    faults of a fresh buffer cost more than the fused pass that fills it."""
    _C.empty_cpu_cache()


def cpu_cache_bytes() -> int:
    """Bytes currently held by the CPU output buffer cache."""
    return _C.cpu_cache_bytes()
