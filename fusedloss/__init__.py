"""fusedloss: fused single-pass training losses for PyTorch.

import fusedloss
loss = fusedloss.nn.CrossEntropyLoss()(logits, target)     # like torch.nn
loss = fusedloss.functional.mse_loss(pred, target)         # like torch.nn.functional
"""

from __future__ import annotations

import copy

from . import autograd, functional, nn  # noqa: E402
from ._ops import BUILD_INFO as _BUILD_INFO  # loads the extension (clear ImportError on mismatch)
from ._ops import ops
from ._validation import set_validation  # noqa: E402
from ._version import __version__

__all__ = ["__version__", "autograd", "build_info", "functional", "nn", "ops", "set_validation"]


def build_info() -> dict:
    """How this fusedloss was built.

    Keys: ``version``, ``torch_version`` (built against), ``torch_cuda_version``,
    ``cuda`` (CUDA kernels compiled), ``cuda_archs`` (e.g. ``["8.0", "9.0+PTX"]``),
    ``cuda_home``, ``openmp``, ``cpu_capability`` (``DEFAULT``/``AVX2``/``AVX512``).
    """
    return copy.deepcopy(_BUILD_INFO)
