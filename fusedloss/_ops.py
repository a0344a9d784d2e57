"""Loading of the compiled operators, with the checks that turn a mismatched
build into a clear ImportError, and the fake (meta) kernels that let
torch.compile and torch.library.opcheck reason about every op without running it.
"""

from __future__ import annotations

import json
import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCE_ROOT = os.path.dirname(_HERE)

# ISA extensions each CPU build needs (names as in /proc/cpuinfo).
_CPU_FLAGS = {
    "AVX2": ("avx2", "fma", "f16c"),
    "AVX512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"),
}


def rebuild_command() -> str:
    where = _SOURCE_ROOT if os.path.exists(os.path.join(_SOURCE_ROOT, "setup.py")) else "<fusedloss source>"
    return f"pip install --no-build-isolation --force-reinstall --no-deps {where}"


def read_build_info() -> dict:
    path = os.path.join(_HERE, "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ImportError(
            f"fusedloss has not been built (no fusedloss/_build_info.json). Build it with:\n    {rebuild_command()}"
        ) from None


def check_torch_version(built: str, running: str) -> None:
    """The extension links against one torch's C++ ABI; any other torch may crash."""
    if built != running:
        raise ImportError(
            f"fusedloss was built against torch {built}, but torch {running} is installed. "
            "Rebuild fusedloss against the installed torch:\n"
            f"    {rebuild_command()}"
        )


def check_cpu_capability(capability: str) -> None:
    """A build for AVX-512 would die of SIGILL on a CPU without it; say so instead."""
    needed = _CPU_FLAGS.get(capability)
    if not needed or not sys.platform.startswith("linux"):
        return
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return
    if flags is None:
        return
    missing = [flag for flag in needed if flag not in flags]
    if missing:
        raise ImportError(
            f"fusedloss was built for {capability} CPUs, but this CPU lacks {', '.join(missing)}. "
            "Rebuild it here (FUSEDLOSS_CPU_CAPABILITY=default gives a portable build):\n"
            f"    {rebuild_command()}"
        )


def load() -> tuple[object, dict]:
    info = read_build_info()
    check_torch_version(info["torch_version"], torch.__version__)
    check_cpu_capability(info.get("cpu_capability", "DEFAULT"))
    try:
        from . import _C
    except ImportError as e:
        if not any(name.startswith("_C.") for name in os.listdir(_HERE)):
            raise ImportError(
                f"fusedloss's compiled extension is not in {_HERE}. If fusedloss was installed with "
                "`pip install .` (not -e), this source tree shadows the installed copy: run from another "
                "directory, or install with `pip install --no-build-isolation -e .`"
            ) from e
        raise ImportError(
            f"fusedloss's compiled extension failed to load ({e}). Rebuild it against the installed "
            f"torch {torch.__version__}:\n    {rebuild_command()}"
        ) from e
    # The metadata file and the binary could come from different builds.
    check_torch_version(_C.torch_version, torch.__version__)
    return _C, info


_C, BUILD_INFO = load()
ops = torch.ops.fusedloss


def _clamp_grad_at_bound() -> bool:
    """Whether the installed torch's clamp passes the gradient where its input
    equals the bound (torch < 2.14: yes; 2.14: no). The hinge losses follow it."""
    x = torch.zeros(1, requires_grad=True)
    (g,) = torch.autograd.grad(torch.clamp_min(x, 0).sum(), x)
    return bool(g.item() != 0)


CLAMP_GRAD_AT_BOUND = _clamp_grad_at_bound()


# ---------------------------------------------------------------------------
# Fake kernels. They mirror the real ones exactly: outputs are contiguous, in
# the input's dtype, and gradients not asked for are empty (0,) tensors.
# ---------------------------------------------------------------------------


def _loss_like(input: torch.Tensor, reduction: int) -> torch.Tensor:
    return input.new_empty(input.shape if reduction == 0 else ())


def _grad_like(input: torch.Tensor, wanted: bool) -> torch.Tensor:
    return input.new_empty(input.shape if wanted else (0,))


def _opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fusedloss::bce_with_logits")
def _(input, target, weight, pos_weight, reduction):
    return _loss_like(input, reduction)


@torch.library.register_fake("fusedloss::bce_with_logits_backward")
def _(grad, input, target, weight, pos_weight, reduction, output_mask):
    return _grad_like(input, output_mask[0]), _grad_like(input, output_mask[1])


@torch.library.register_fake("fusedloss::mse")
def _(input, target, weight, reduction):
    denom_shape = () if (weight is not None and reduction == 1) else (0,)
    return _loss_like(input, reduction), input.new_empty(denom_shape, dtype=_opmath_dtype(input.dtype))


@torch.library.register_fake("fusedloss::mse_backward")
def _(grad, input, target, weight, loss, denominator, reduction, output_mask):
    return (
        _grad_like(input, output_mask[0]),
        _grad_like(input, output_mask[1]),
        _grad_like(input, output_mask[2] and weight is not None),
    )


@torch.library.register_fake("fusedloss::cross_entropy")
def _(input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap):
    batch = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    acc = _opmath_dtype(input.dtype)
    prob = target.shape == input.shape
    return (
        input.new_empty(batch if reduction == 0 else ()),
        input.new_empty((*batch, 2), dtype=acc),
        input.new_empty((2,), dtype=acc),
        input.new_empty(batch if prob else (0,), dtype=acc),
    )


@torch.library.register_fake("fusedloss::cross_entropy_backward")
def _(grad, input, target, *saved_and_options):
    output_mask = saved_and_options[-1]
    prob = target.shape == input.shape
    return _grad_like(input, output_mask[0]), _grad_like(input, output_mask[1] and prob)


@torch.library.register_fake("fusedloss::cross_entropy_backward_inplace")
def _(grad, input, *rest):
    return None


@torch.library.register_fake("fusedloss::hinge_embedding")
def _(input, target, margin, reduction):
    return _loss_like(input, reduction)


@torch.library.register_fake("fusedloss::hinge_embedding_backward")
def _(grad, input, target, margin, reduction, grad_at_kink):
    return input.new_empty(input.shape)


@torch.library.register_fake("fusedloss::soft_margin")
def _(input, target, reduction):
    return _loss_like(input, reduction)


@torch.library.register_fake("fusedloss::soft_margin_backward")
def _(grad, input, target, reduction):
    return input.new_empty(input.shape)


@torch.library.register_fake("fusedloss::hinge")
def _(input, target, margin, squared, reduction):
    return _loss_like(input, reduction)


@torch.library.register_fake("fusedloss::hinge_backward")
def _(grad, input, target, margin, squared, reduction, grad_at_kink, output_mask):
    return _grad_like(input, output_mask[0]), _grad_like(input, output_mask[1])


@torch.library.register_fake("fusedloss::multi_margin")
def _(input, target, p, margin, weight, reduction):
    if reduction != 0:
        return input.new_empty(())
    n = input.shape[0] if input.dim() == 2 else 1
    return input.new_empty((n,) if target.dim() > 0 else ())


@torch.library.register_fake("fusedloss::multi_margin_backward")
def _(grad, input, target, p, margin, weight, reduction):
    return input.new_empty(input.shape)


# Inside torch.autocast torch runs its losses in fp32; the raw ops do too, so
# direct op calls and compiled graphs get the same dtypes as fusedloss.functional
# (which casts before its autograd.Function).
for _op in ("bce_with_logits", "mse", "cross_entropy", "hinge_embedding", "soft_margin", "multi_margin"):
    for _device in ("cpu", "cuda"):
        torch.library.register_autocast(f"fusedloss::{_op}", _device, torch.float32)
