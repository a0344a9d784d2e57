"""Check fusedloss against native PyTorch on your own inputs.

    from fusedloss.testing import assert_matches_torch
    x = torch.randn(8, 50257, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 50257, (8,), device="cuda")
    report = assert_matches_torch("cross_entropy", x, y, label_smoothing=0.1)

Runs the fusedloss function and its torch reference on copies of the same
inputs, backpropagates one random (non-contiguous) grad_output through both,
and compares the loss and every gradient of an argument that requires grad:

* float64/float32: ``torch.testing.assert_close`` with the tolerances below;
  a float32 result outside them still passes if its error against a float64
  run is at most twice torch's (torch's fp32 result is sometimes the less
  exact one).
* float16/bfloat16: both are compared with a float64 run on the same rounded
  inputs, and fusedloss's largest error may be at most twice native's plus one
  unit in the last place of the output dtype (native rounds intermediates to
  the low precision dtype; fusedloss accumulates in fp32).

NaN and infinity positions must agree exactly. Returns a dict of the largest
absolute errors; raises AssertionError on a mismatch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["assert_matches_torch", "make_tensor", "reference", "TOLERANCES"]

LAYOUTS = ("contiguous", "transposed", "offset", "strided")


def make_tensor(
    shape, dtype, device="cpu", low=-3.0, high=3.0, layout="contiguous", requires_grad=False, generator=None
):
    """A tensor of uniform values in [low, high) whose memory is laid out as
    `layout`: "contiguous"; "transposed" (first and last dims swapped in memory);
    "offset" (storage offset 1, so not 16-byte aligned); "strided" (every other
    element of a wider buffer). The values do not depend on the layout."""
    base = torch.rand(shape, dtype=torch.float64, generator=generator) * (high - low) + low
    if layout == "transposed" and base.dim() >= 2:
        t = base.transpose(0, -1).contiguous().to(device=device, dtype=dtype).transpose(0, -1)
    elif layout == "offset":
        flat = torch.zeros(base.numel() + 1, dtype=dtype, device=device)
        flat[1:] = base.reshape(-1).to(device=device, dtype=dtype)
        t = flat[1:].view(shape)
    elif layout == "strided":
        big = torch.zeros(*shape, 2, dtype=dtype, device=device)
        big[..., 1] = base.to(device=device, dtype=dtype)
        t = big[..., 1]
    elif layout in LAYOUTS:
        t = base.to(device=device, dtype=dtype)
    else:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    return t.requires_grad_(requires_grad)


# (rtol, atol) against native in the same dtype.
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-5),
}
# fp32 sums over many elements carry more rounding (flash-attn's rule).
LARGE_FP32 = (1e-5, 1e-5)


def _hinge_loss_reference(input, target, margin=1.0, squared=False, reduction="mean"):
    loss = torch.clamp(margin - target * input, min=0)
    if squared:
        loss = loss * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


_EXTRA_REFERENCES: dict[str, Callable] = {"hinge_loss": _hinge_loss_reference}


def reference(name: str) -> Callable:
    """The torch function fusedloss.functional.<name> is checked against."""
    if name in _EXTRA_REFERENCES:
        return _EXTRA_REFERENCES[name]
    return getattr(F, name)


def _clone_args(args, kwargs, dtype_map=None):
    def one(a):
        if not isinstance(a, torch.Tensor):
            return a
        t = a.detach()
        if dtype_map is not None and t.is_floating_point():
            t = t.to(dtype_map)
        else:
            t = t.clone()
        # Keep the caller's layout: clone() preserves strides of dense tensors
        # but a dtype cast does not need to.
        return t.requires_grad_(a.requires_grad)

    return [one(a) for a in args], {k: one(v) for k, v in kwargs.items()}


def _leaves(args, kwargs):
    named = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    return [(n, a) for n, a in named if isinstance(a, torch.Tensor) and a.requires_grad]


def _random_grad(out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random grad_output; non-contiguous whenever the output has dimensions."""
    if out.dim() == 0:
        return torch.randn((), generator=generator, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
    g = torch.randn(*out.shape, 2, generator=generator, dtype=torch.float64)
    return g.to(device=out.device, dtype=out.dtype)[..., 1]


def _run(fn, args, kwargs, grad_out):
    out = fn(*args, **kwargs)
    leaves = _leaves(args, kwargs)
    grads = {}
    if leaves and out.requires_grad:
        gs = torch.autograd.grad(out, [a for _, a in leaves], grad_out(out), allow_unused=True)
        grads = {n: g for (n, _), g in zip(leaves, gs, strict=True)}
    return out.detach(), grads


def _check_special(name, actual, expected):
    nan_ok = torch.equal(torch.isnan(actual), torch.isnan(expected))
    inf_ok = torch.equal(torch.isinf(actual), torch.isinf(expected))
    if not (nan_ok and inf_ok):
        raise AssertionError(f"{name}: NaN/inf positions differ from torch\nfusedloss: {actual}\ntorch:     {expected}")
    if inf_ok and torch.isinf(actual).any():
        both = torch.isinf(actual)
        if not torch.equal(actual[both], expected[both]):
            raise AssertionError(f"{name}: signs of infinities differ from torch")


def _compare(name, actual, expected, oracle, rtol, atol) -> float:
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != torch's {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype} != torch's {expected.dtype}")
    if actual.numel() == 0:
        return 0.0
    if oracle is None or actual.dtype in (torch.float32, torch.float64):
        _check_special(name, actual, expected)
        finite = torch.isfinite(expected)
        a = actual[finite].double()
        e = expected[finite].double()
        if a.numel() == 0:
            return 0.0
        try:
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        except AssertionError:
            # Not within tolerance of torch: still fine if at least as accurate
            # (torch's own fp32 result can be the less exact one).
            if oracle is None:
                raise
            o = oracle.to(actual.device)[finite].double()
            err_fused = (a - o).abs().max().item()
            err_native = (e - o).abs().max().item()
            if not err_fused <= 2 * err_native + torch.finfo(actual.dtype).eps * o.abs().max().item():
                raise
            return err_fused
        return (a - e).abs().max().item()
    # Low precision: NaN/inf where the exact result, rounded to the output dtype,
    # has them (torch itself can overflow in fp16 intermediates where the exact
    # value is finite); elsewhere fusedloss's error vs the float64 run may be at
    # most twice torch's plus one ulp.
    o = oracle.to(actual.device)
    _check_special(name, actual, o.to(actual.dtype))
    finite = torch.isfinite(o.to(actual.dtype))
    a = actual[finite].double()
    od = o[finite].double()
    e = expected[finite].double()
    if a.numel() == 0:
        return 0.0
    native_ok = torch.isfinite(e)
    err = (a - od).abs()
    err_native = (e[native_ok] - od[native_ok]).abs().max().item() if native_ok.any() else 0.0
    ulp = torch.finfo(actual.dtype).eps * od.abs().max().item()
    bound = 2 * err_native + ulp + atol
    if native_ok.any() and not err[native_ok].max().item() <= bound:
        raise AssertionError(
            f"{name}: fusedloss error vs float64 {err[native_ok].max().item():.3g} exceeds twice torch's "
            f"{err_native:.3g} (+1 ulp {ulp:.3g}) in {actual.dtype}"
        )
    if (~native_ok).any():  # where torch overflowed: close to the exact value
        d_rtol, d_atol = TOLERANCES.get(actual.dtype, (rtol, atol))
        lim = d_rtol * od[~native_ok].abs() + d_atol + ulp
        if not bool((err[~native_ok] <= lim).all()):
            raise AssertionError(f"{name}: fusedloss far from the float64 result where torch overflowed")
    return err.max().item()


def assert_matches_torch(
    name: str,
    *args,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    fused: Callable | None = None,
    native: Callable | None = None,
    **kwargs,
) -> dict:
    """Compare fusedloss.functional.<name>(*args, **kwargs) with torch's.

    Gradients are compared for every tensor argument with requires_grad=True.
    ``fused``/``native`` override the two functions (e.g. a module's forward).
    ``rtol``/``atol`` override the dtype's tolerance for float32/float64.
    """
    import fusedloss.functional as FF

    fused = fused or getattr(FF, name)
    native = native or reference(name)

    def grad_out_factory():
        state = {}

        def make(out):
            if "g" not in state:
                gen = torch.Generator().manual_seed(seed)
                state["g"] = _random_grad(out, gen)
            g = state["g"]
            return g if g.dtype == out.dtype else g.to(out.dtype)

        return make

    shared_grad = grad_out_factory()
    f_args, f_kwargs = _clone_args(args, kwargs)
    n_args, n_kwargs = _clone_args(args, kwargs)
    f_out, f_grads = _run(fused, f_args, f_kwargs, shared_grad)
    n_out, n_grads = _run(native, n_args, n_kwargs, shared_grad)
    out_dtype = n_out.dtype

    # The float64 run on the same (rounded) inputs: the judge for low-precision
    # results, and for fp32 results that differ from torch's.
    needs_oracle = out_dtype != torch.float64 or any(
        isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64
        for a in list(args) + list(kwargs.values())
    )
    o_out, o_grads = None, {}
    if needs_oracle:
        o_args, o_kwargs = _clone_args(args, kwargs, dtype_map=torch.float64)
        try:
            o_out, o_grads = _run(native, o_args, o_kwargs, lambda out: shared_grad(out).double())
        except RuntimeError:
            # e.g. a module whose float32 buffers refuse float64 inputs: no oracle,
            # so results are held to torch's tolerances alone.
            if out_dtype in (torch.float16, torch.bfloat16):
                raise
            o_out, o_grads = None, {}

    d_rtol, d_atol = TOLERANCES.get(out_dtype, (1e-5, 1e-5))
    if (
        out_dtype == torch.float32
        and max((a.numel() for a in f_args if isinstance(a, torch.Tensor)), default=0) >= 10**6
    ):
        d_rtol, d_atol = LARGE_FP32
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol

    report = {"loss": _compare(f"{name} loss", f_out, n_out, o_out, rtol, atol)}
    for key, ng in n_grads.items():
        fg = f_grads.get(key)
        if (fg is None) != (ng is None):
            ours, theirs = ("has no", "has one") if fg is None else ("has one", "has none")
            raise AssertionError(f"{name} grad {key}: fusedloss {ours} gradient, torch {theirs}")
        if ng is None:
            continue
        g_rtol, g_atol = TOLERANCES.get(ng.dtype, (rtol, atol)) if ng.dtype != out_dtype else (rtol, atol)
        report[f"grad_{key}"] = _compare(f"{name} grad {key}", fg, ng, o_grads.get(key), g_rtol, g_atol)
    return report
