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

# The loss ops' eager entry points (csrc/python_calls.cpp, which names them):
# the dispatcher call of ops.<name>.default with a cheaper conversion of the
# Python arguments (a small call's largest cost after the math), each bound
# here to its torch.ops overload, where it sends arguments it does not
# convert. torch.compile must see the op itself, so callers take
# ops.<name>.default while compiling.
_EAGER_CALLS = tuple(name for name in dir(_C.calls) if not name.startswith("_"))
for _name in _EAGER_CALLS:
    _C.calls._bind(_name, getattr(ops, _name).default)
del _name
eager = _C.calls


# Whether the installed torch's clamp passes the gradient where its input
# equals the bound (torch < 2.14: yes; 2.14: no). The hinge losses follow it;
# the extension probes it once, here, at import.
CLAMP_GRAD_AT_BOUND = _C.clamp_grad_at_bound()


# ---------------------------------------------------------------------------
# Fake kernels. They mirror the real ones exactly: outputs are contiguous, the
# loss has torch's dtype for it (or out_dtype), each gradient its input's dtype,
# and gradients not asked for are empty (0,) tensors. Arguments the schema gives
# defaults have the same defaults here: calls from C++ leave trailing defaults out.
# The public losses mse and cross_entropy need none: their
# CompositeExplicitAutograd kernels call the `_forward` ops below; the
# `_composite` ops decompose into torch's ops.
# ---------------------------------------------------------------------------


def _acc(*tensors) -> torch.dtype:
    """The accumulation dtype of a call: fp64 if any operand is fp64, else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _loss(input: torch.Tensor, reduction: int, dtype: torch.dtype) -> torch.Tensor:
    return input.new_empty(input.shape if reduction == 0 else (), dtype=dtype)


def _grad(like: torch.Tensor, wanted: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    return like.new_empty(like.shape if wanted else (0,), dtype=dtype or like.dtype)


def _promote(*tensors) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@torch.library.register_fake("fusedloss::bce_with_logits")
def _(input, target, weight=None, pos_weight=None, reduction=1, out_dtype=None):
    return _loss(input, reduction, out_dtype or target.dtype)


@torch.library.register_fake("fusedloss::bce_with_logits_backward")
def _(grad, input, target, weight, pos_weight, reduction, output_mask):
    return _grad(input, output_mask[0]), _grad(target, output_mask[1])


@torch.library.register_fake("fusedloss::mse_forward")
def _(input, target, weight, reduction, out_dtype):
    denom_shape = () if (weight is not None and reduction == 1) else (0,)
    loss = _loss(input, reduction, out_dtype or _promote(input, target, weight))
    return loss, input.new_empty(denom_shape, dtype=_acc(input, target, weight))


@torch.library.register_fake("fusedloss::mse_backward")
def _(grad, input, target, weight, loss, denominator, reduction, output_mask):
    want_weight = output_mask[2] and weight is not None
    return (
        _grad(input, output_mask[0]),
        _grad(target, output_mask[1]),
        _grad(weight, True) if want_weight else _grad(input, False),
    )


def _margin_target_grad_dtype(input, target):
    return target.dtype if target.is_floating_point() else input.dtype


@torch.library.register_fake("fusedloss::hinge_embedding")
def _(input, target, margin=1.0, reduction=1, out_dtype=None):
    return _loss(input, reduction, out_dtype or input.dtype)


@torch.library.register_fake("fusedloss::hinge_embedding_backward")
def _(grad, input, target, margin, reduction, grad_at_kink):
    return input.new_empty(input.shape)


@torch.library.register_fake("fusedloss::soft_margin")
def _(input, target, reduction=1, out_dtype=None):
    return _loss(input, reduction, out_dtype or input.dtype)


@torch.library.register_fake("fusedloss::soft_margin_backward")
def _(grad, input, target, reduction):
    return input.new_empty(input.shape)


@torch.library.register_fake("fusedloss::hinge")
def _(input, target, margin=1.0, squared=False, reduction=1, out_dtype=None):
    return _loss(input, reduction, out_dtype or _promote(input, target))


@torch.library.register_fake("fusedloss::hinge_backward")
def _(grad, input, target, margin, squared, reduction, grad_at_kink, output_mask):
    return _grad(input, output_mask[0]), _grad(input, output_mask[1], _margin_target_grad_dtype(input, target))


@torch.library.register_fake("fusedloss::multi_margin")
def _(input, target, p=1, margin=1.0, weight=None, reduction=1, out_dtype=None):
    dtype = out_dtype or input.dtype
    if reduction != 0:
        return input.new_empty((), dtype=dtype)
    n = input.shape[0] if input.dim() == 2 else 1
    return input.new_empty((n,) if target.dim() > 0 else (), dtype=dtype)


@torch.library.register_fake("fusedloss::multi_margin_backward")
def _(grad, input, target, p, margin, weight, reduction):
    return input.new_empty(input.shape)


def _ce_compute_dtype(input, target, weight) -> torch.dtype:
    """csrc: ce_compute_dtype (fp64 probability targets or weights promote the logits)."""
    prob = target.shape == input.shape
    if input.dtype == torch.float64 or (
        prob and (target.dtype == torch.float64 or (weight is not None and weight.dtype == torch.float64))
    ):
        return torch.float64
    return input.dtype


@torch.library.register_fake("fusedloss::cross_entropy_forward")
def _(input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap, out_dtype):
    batch = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    acc = _acc(input.new_empty((), dtype=_ce_compute_dtype(input, target, weight)))
    prob = target.shape == input.shape
    dtype = out_dtype or (_promote(input, target, weight) if prob else input.dtype)
    return (
        input.new_empty(batch if reduction == 0 else (), dtype=dtype),
        input.new_empty((*batch, 2), dtype=acc),
        input.new_empty((2,), dtype=acc),
        input.new_empty(batch if prob else (0,), dtype=acc),
    )


@torch.library.register_fake("fusedloss::cross_entropy_backward")
def _(grad, input, target, *saved_and_options):
    output_mask = saved_and_options[-1]
    prob = target.shape == input.shape
    return _grad(input, output_mask[0]), _grad(target, output_mask[1] and prob)


@torch.library.register_fake("fusedloss::cross_entropy_backward_inplace")
def _(grad, input, *rest):
    return None


# Vocabulary-parallel cross entropy (fusedloss/distributed.py): the local ops
# around its two collectives. Every buffer is in the accumulation dtype.
@torch.library.register_fake("fusedloss::vocab_parallel_ce_local")
def _(input, target, weight, vocab_start, ignore_index, label_smoothing, softcap):
    acc = _acc(input)
    n = input.shape[0]
    fields = 3 if label_smoothing > 0 else 2
    return (
        input.new_empty((n,), dtype=acc),
        input.new_empty((fields * n + 1,), dtype=acc),
        input.new_empty((), dtype=acc),
    )


@torch.library.register_fake("fusedloss::vocab_parallel_ce_rebase")
def _(packed, local_max, global_max, mass):
    return packed.new_empty(packed.shape)


@torch.library.register_fake("fusedloss::vocab_parallel_ce_finalize")
def _(packed, global_max, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, loss_dtype):
    n = global_max.shape[0]
    return (
        packed.new_empty((n,) if reduction == 0 else (), dtype=loss_dtype),
        packed.new_empty((n, 3)),
        packed.new_empty((3,)),
    )


@torch.library.register_fake("fusedloss::vocab_parallel_ce_backward")
def _(grad, input, *rest):
    return input.new_empty(input.shape)


# The linear variant: input (N, D), linear_weight (C_local, D).
@torch.library.register_fake("fusedloss::vocab_parallel_linear_ce_local")
def _(input, linear_weight, target, linear_bias, weight, vocab_start, ignore_index, label_smoothing, softcap, chunk):
    acc = _acc(input)
    n = input.shape[0]
    fields = 3 if label_smoothing > 0 else 2
    return (
        input.new_empty((n,), dtype=acc),
        input.new_empty((fields * n + 1,), dtype=acc),
        input.new_empty((), dtype=acc),
    )


@torch.library.register_fake("fusedloss::vocab_parallel_linear_ce_backward")
def _(grad, input, linear_weight, target, linear_bias, weight, *saved_and_options):
    output_mask = saved_and_options[-1]
    return (
        _grad(input, output_mask[0]),
        _grad(linear_weight, output_mask[1]),
        _grad(linear_bias, output_mask[2]) if linear_bias is not None else _grad(input, False),
    )


# sigmoid_focal_loss, multilabel_soft_margin_loss, distillation on logits.
# distill, like mse and cross_entropy, runs distill_forward below autograd.


@torch.library.register_fake("fusedloss::sigmoid_focal")
def _(input, target, alpha=0.25, gamma=2.0, reduction=0, out_dtype=None):
    return _loss(input, reduction, out_dtype or _promote(input, target))


@torch.library.register_fake("fusedloss::sigmoid_focal_backward")
def _(grad, input, target, alpha, gamma, reduction, output_mask):
    return _grad(input, output_mask[0]), _grad(target, output_mask[1])


def _multilabel_dtype(input, target, weight):
    """csrc: multilabel_soft_margin_dtype (torch's type promotion of its composite)."""
    dtype = torch.result_type(input, target)
    if weight is not None and not (weight.dim() == 0 and dtype.is_floating_point and weight.dtype.is_floating_point):
        dtype = torch.promote_types(dtype, weight.dtype)
    return dtype


@torch.library.register_fake("fusedloss::multilabel_soft_margin")
def _(input, target, weight=None, reduction=1, out_dtype=None):
    shape = input.shape[:-1] if reduction == 0 else ()
    return input.new_empty(shape, dtype=out_dtype or _multilabel_dtype(input, target, weight))


@torch.library.register_fake("fusedloss::multilabel_soft_margin_backward")
def _(grad, input, target, weight, reduction, output_mask):
    want_target = output_mask[1] and target.is_floating_point()
    return _grad(input, output_mask[0]), _grad(target, want_target) if want_target else _grad(input, False)


@torch.library.register_fake("fusedloss::distill_forward")
def _(student, teacher, target, beta, temperature, ignore_index, reduction, out_dtype):
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    batch = student.shape[:-1]
    rows = 1
    for d in batch:
        rows = rows * d
    return (
        student.new_empty(batch if reduction == 0 else (), dtype=out_dtype or dtype),
        student.new_empty((rows, 8), dtype=acc),
        student.new_empty((), dtype=acc),
    )


@torch.library.register_fake("fusedloss::distill_backward")
def _(grad, student, teacher, target, stats, denominator, beta, temperature, ignore_index, reduction, output_mask):
    return _grad(student, output_mask[0]), _grad(teacher, output_mask[1])


# linear_cross_entropy (csrc/linear_cross_entropy.cpp): input (D) or (N, D),
# linear_weight (V, D); probability targets have the logits' shape.
def _lce_prob(input, linear_weight, target) -> bool:
    return tuple(target.shape) == (*input.shape[:-1], linear_weight.shape[0])


@torch.library.register_fake("fusedloss::linear_cross_entropy_forward")
def _(
    input,
    linear_weight,
    target,
    linear_bias,
    weight,
    ignore_index,
    reduction,
    label_smoothing,
    lse_square_scale,
    softcap,
    chunk_size,
    out_dtype,
    grad_mask,
):
    batch = tuple(input.shape[:-1])
    acc = _acc(input)
    prob = _lce_prob(input, linear_weight, target)
    dtype = out_dtype or (_promote(input, target, weight) if prob else input.dtype)
    grads = reduction != 0 and any(grad_mask)
    return (
        input.new_empty(batch if reduction == 0 else (), dtype=dtype),
        input.new_empty((*batch, 2), dtype=acc),
        input.new_empty((2,), dtype=acc),
        input.new_empty(batch if prob else (0,), dtype=acc),
        _grad(input, grads and grad_mask[0]),
        _grad(linear_weight, grads and grad_mask[1]),
        _grad(linear_bias, grads and grad_mask[2]) if linear_bias is not None else _grad(input, False),
    )


@torch.library.register_fake("fusedloss::linear_cross_entropy_backward")
def _(grad, input, linear_weight, target, linear_bias, weight, *saved_and_options):
    output_mask = saved_and_options[-1]
    return (
        _grad(input, output_mask[0]),
        _grad(linear_weight, output_mask[1]),
        _grad(linear_bias, output_mask[2]) if linear_bias is not None else _grad(input, False),
    )
