"""Check fusedloss against native PyTorch on your own inputs.

    from fusedloss.testing import assert_matches_torch
    x = torch.randn(8, 50257, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 50257, (8,), device="cuda")
    report = assert_matches_torch("cross_entropy", x, y, label_smoothing=0.1)

Runs the fusedloss function and its torch reference on copies of the same
inputs, backpropagates one random (non-contiguous) grad_output through both,
and compares the loss and every gradient of an argument that requires grad.
The judge is torch's own result and, where that is not exact enough, a float64
run of torch on the same (already rounded) inputs, the "oracle":

* float64/float32: ``torch.testing.assert_close`` against torch with the
  tolerances below. An element outside them still passes if it is no farther
  from the oracle than torch's own element is, plus ``ULPS`` units in the last
  place (torch's fp32 result is sometimes the less exact one).
* float16/bfloat16: every element must be no farther from the oracle than
  torch's element is, plus ``ULPS`` units in the last place of the output
  dtype at that element's own magnitude::

      |fused[i] - oracle[i]| <= |torch[i] - oracle[i]| + ULPS * ulp(oracle[i])

  Where torch's element is NaN or infinite but the oracle, rounded to the
  output dtype, is finite (torch overflowed in a low-precision intermediate),
  fusedloss must be within ``ULPS * ulp(oracle[i])`` of the oracle.

NaN and infinity positions must agree exactly: with torch's result in
float32/float64, with the oracle rounded to the output dtype in
float16/bfloat16 (where torch itself may overflow).

Why element-wise, and why ``ULPS = 2``: one bound for the whole tensor is
set by its largest elements, so an error in the small ones goes unseen. A
cross-entropy gradient at 32000 classes has target entries near 1/N and
softmax entries near 1/C; with a max-norm bound the softmax entries could be
dropped or scaled by 1.1 without failing. The ulp is taken at each element's
own magnitude (for zero and subnormal magnitudes, the subnormal spacing), so
an error of a few ulp is caught in every element, small or large. fusedloss
accumulates in fp32 and rounds once to the output dtype: the rounding costs
up to half an ulp, and the fp32 error before it (including CUDA's fast
``__expf``) can tip the result to the other neighbour, one ulp more; two ulp
covers both with a little room. Less would fail correct results; more would
let through a 1% error in bf16, which is 1.3 to 2.6 ulp. torch's own error
is the allowance on top, element by element: fusedloss never has to be more
exact than torch, only never worse by more than two ulp. Where an element
is a near-cancellation (its exact value far below the terms it is computed
from), fp32 rounding of the terms can exceed two ulp of the result, and the
rule then asks fusedloss to do as well as torch there.

Returns a dict of the largest absolute errors; raises AssertionError on a
mismatch. ``assert_as_accurate_as_torch`` applies the element-wise rule to
tensors you computed yourself, and ``assert_rows_match_float64`` applies it
to a sample of rows of a cross-entropy gradient too large to recompute whole
(beyond 2^31 elements).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "assert_as_accurate_as_torch",
    "assert_matches_torch",
    "assert_rows_match_float64",
    "make_tensor",
    "reference",
    "sample_rows",
    "ulp",
    "TOLERANCES",
    "ULPS",
]

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


# (rtol, atol) against native in the same dtype. assert_matches_torch uses the
# float32/float64 entries; it holds float16/bfloat16 results to the element-wise
# rule instead (their entries are the test matrix's figures, kept for callers).
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-5),
}
# fp32 sums over many elements carry more rounding (flash-attn's rule).
LARGE_FP32 = (1e-5, 1e-5)
# Units in the last place allowed per element beyond torch's own error
# against the float64 result (the module docstring says why two).
ULPS = 2


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


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at the magnitude of each element of `x`, in float64:
    ``eps * 2**e`` for ``2**e <= |x| < 2**(e+1)``; for zero and subnormal
    magnitudes, the subnormal spacing ``eps * tiny``."""
    fi = torch.finfo(dtype)
    mag = x.detach().double().abs().clamp(min=fi.tiny)
    _, e = torch.frexp(mag)  # mag = m * 2**e with m in [0.5, 1)
    return torch.ldexp(torch.full_like(mag, fi.eps), e - 1)


def _worst(name, dtype, ulps, actual, native, oracle, err, bound, bad) -> str:
    """A message naming how many elements broke the rule and the worst one."""
    excess = torch.where(bad, err - bound, torch.zeros_like(err))
    flat = int(excess.reshape(-1).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(err.shape))) if err.dim() else ()
    a = actual.double().reshape(-1)[flat].item()
    o = oracle.double().reshape(-1)[flat].item()
    n = "none" if native is None else f"{native.double().reshape(-1)[flat].item():.6g}"
    return (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements farther from the float64 result than torch's "
        f"(+{ulps} ulp) in {dtype}; worst at {idx}: fusedloss {a:.6g}, torch {n}, float64 {o:.6g}, "
        f"|error| {err.reshape(-1)[flat].item():.3g} > allowed {bound.reshape(-1)[flat].item():.3g}"
    )


def _elementwise_bound(native, oracle, dtype, ulps):
    """Per element: torch's distance from the oracle plus `ulps` ulp of the
    output dtype; where torch is not finite, `ulps` ulp alone."""
    slack = ulps * ulp(oracle, dtype)
    if native is None:  # no torch result in this dtype: the exactly rounded oracle stands in for it
        native = oracle.to(dtype)
    nd = native.double()
    native_err = (nd - oracle).abs()
    return torch.where(torch.isfinite(nd), native_err + slack, slack)


def assert_as_accurate_as_torch(
    actual: torch.Tensor,
    native: torch.Tensor | None,
    oracle: torch.Tensor,
    name: str = "result",
    ulps: int | None = None,
) -> float:
    """The element-wise rule for a float16/bfloat16 result (see the module
    docstring): ``actual`` may be no farther from ``oracle`` (the float64
    result on the same rounded inputs) than ``native`` (torch's result in
    ``actual``'s dtype) is, plus ``ulps`` ulp, in every element. ``native=None``
    where torch has no kernel for the dtype: the oracle rounded to the dtype
    stands in for it. NaN/inf positions must equal those of the rounded
    oracle. Returns the largest absolute error against the oracle."""
    ulps = ULPS if ulps is None else ulps
    if actual.shape != oracle.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != float64 result's {tuple(oracle.shape)}")
    if native is not None and native.shape != actual.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != torch's {tuple(native.shape)}")
    if actual.numel() == 0:
        return 0.0
    o = oracle.detach().to(device=actual.device, dtype=torch.float64)
    n = None if native is None else native.detach().to(actual.device)
    _check_special(name, actual, o.to(actual.dtype))
    finite = torch.isfinite(o.to(actual.dtype))
    a = actual.detach().double()
    err = torch.where(finite, (a - o).abs(), torch.zeros_like(o))
    bound = _elementwise_bound(n, torch.where(finite, o, torch.zeros_like(o)), actual.dtype, ulps)
    bad = finite & ~(err <= bound)
    if bad.any():
        raise AssertionError(_worst(name, actual.dtype, ulps, a, n, o, err, bound, bad))
    return err.max().item()


def _compare(name, actual, expected, oracle, rtol, atol) -> float:
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != torch's {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype} != torch's {expected.dtype}")
    if actual.numel() == 0:
        return 0.0
    if actual.dtype in (torch.float16, torch.bfloat16):
        if oracle is None:
            raise AssertionError(f"{name}: a {actual.dtype} result needs a float64 run to be judged")
        return assert_as_accurate_as_torch(actual, expected, oracle, name)
    _check_special(name, actual, expected)
    finite = torch.isfinite(expected)
    a = torch.where(finite, actual, torch.zeros_like(actual)).double()
    e = torch.where(finite, expected, torch.zeros_like(expected)).double()
    outside = finite & ~((a - e).abs() <= atol + rtol * e.abs())
    if not outside.any():
        return (a - e).abs().max().item()
    if oracle is None:
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        raise AssertionError(f"{name}: outside rtol={rtol:g}, atol={atol:g} of torch's result")
    # Outside torch's tolerance: still fine where at least as close to the
    # float64 result as torch's own element (torch's fp32 result can be the
    # less exact one), element by element.
    o = torch.where(finite, oracle.to(actual.device), torch.zeros_like(e)).double()
    err = (a - o).abs()
    bound = _elementwise_bound(e, o, actual.dtype, ULPS)
    bad = outside & ~(err <= bound)
    if bad.any():
        raise AssertionError(
            _worst(name, actual.dtype, ULPS, a, e, o, err, bound, bad)
            + f" (and outside rtol={rtol:g}, atol={atol:g} of torch's)"
        )
    return (a - e).abs().max().item()


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
    ``rtol``/``atol`` override the dtype's tolerance for float32/float64;
    float16/bfloat16 results are held to the element-wise rule alone.
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


def sample_rows(n_rows: int, row_size: int, count: int = 8, seed: int = 0) -> list[int]:
    """Rows of an (n_rows, row_size) tensor worth checking when it is too large
    to check whole: the first and the last two, each row holding element 2**31
    or 2**32 (where 32-bit offsets wrap) with its neighbours, and `count`
    random rows."""
    rows = {0, n_rows - 2, n_rows - 1}
    for boundary in (2**31, 2**32):
        r = boundary // row_size
        rows.update((r - 1, r, r + 1))
    gen = torch.Generator().manual_seed(seed)
    rows.update(torch.randint(0, n_rows, (count,), generator=gen).tolist())
    return sorted(r for r in rows if 0 <= r < n_rows)


def assert_rows_match_float64(
    grad: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    rows,
    *,
    grad_output: torch.Tensor | float | None = None,
    loss: torch.Tensor | None = None,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> float:
    """Check chosen rows of a cross-entropy result on (N, C) float16/bfloat16
    logits with class indices, for problems too large to recompute whole
    (beyond 2^31 elements).

    ``grad`` is the gradient of the loss with respect to ``logits`` after
    backpropagating ``grad_output`` (a (N,) tensor for reduction="none", a
    scalar otherwise; default 1). For each row in ``rows``, torch recomputes
    exactly that row in float64 (the oracle) and in the logits' dtype, and
    every element of ``grad[row]`` must satisfy the element-wise rule of
    ``assert_as_accurate_as_torch``: a gradient whose softmax entries are
    missing, or whose rows come from the wrong offset, fails. With
    reduction="none", ``loss`` (the (N,) losses) is checked at those rows too.
    Returns the largest absolute gradient error against the oracle.
    """
    if logits.dim() != 2 or target.dim() != 1 or target.is_floating_point():
        raise ValueError("assert_rows_match_float64 takes (N, C) logits and (N,) class indices")
    if logits.dtype not in (torch.float16, torch.bfloat16):
        # In float32 both torch and fusedloss carry fp32 rounding of the terms a
        # gradient entry is formed from, which no per-element ulp bound allows.
        raise ValueError("assert_rows_match_float64 checks float16/bfloat16 logits (the element-wise rule)")
    n = logits.shape[0]
    idx = torch.tensor(sorted(set(int(r) for r in rows)), dtype=torch.long)
    if idx.numel() == 0 or idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"rows must be a non-empty set of indices in [0, {n})")
    idx = idx.to(logits.device)
    t = target[idx]
    if reduction == "none":
        g = torch.ones(n, dtype=torch.float64, device=logits.device) if grad_output is None else grad_output
        scale = g[idx].detach().double()
    elif reduction in ("mean", "sum"):
        g = 1.0 if grad_output is None else grad_output
        g = float(g.item()) if isinstance(g, torch.Tensor) else float(g)
        scale = torch.full((idx.numel(),), g, dtype=torch.float64, device=logits.device)
        if reduction == "mean":
            # torch's denominator: the summed class weights of the non-ignored targets
            kept = target != ignore_index
            w = (
                kept.double()
                if weight is None
                else weight.double()[target.clamp(0, logits.shape[1] - 1)] * kept.double()
            )
            scale = scale / w.sum()
    else:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    kw = {"ignore_index": ignore_index, "label_smoothing": label_smoothing, "reduction": "none"}

    def rows_in(dtype):
        x = logits.detach()[idx].to(dtype).requires_grad_()
        w = None if weight is None else weight.detach().to(dtype)
        out = F.cross_entropy(x, t, weight=w, **kw)
        (gx,) = torch.autograd.grad(out, x, scale.to(out.dtype))
        return out.detach(), gx

    native_loss, native_grad = rows_in(logits.dtype)
    oracle_loss, oracle_grad = rows_in(torch.float64)
    shown = ", ".join(str(r) for r in idx.tolist())
    err = assert_as_accurate_as_torch(grad[idx], native_grad, oracle_grad, f"cross_entropy gradient, rows [{shown}]")
    if loss is not None:
        if reduction != "none":
            raise ValueError("loss rows can only be checked for reduction='none'")
        assert_as_accurate_as_torch(loss[idx], native_loss, oracle_loss, f"cross_entropy loss, rows [{shown}]")
    return err


# ---------------------------------------------------------------------------
# References of the losses torch.nn.functional has not: torchvision's focal
# loss, and distillation written with torch.nn.functional's log_softmax.
# ---------------------------------------------------------------------------


def _sigmoid_focal_loss_reference(inputs, targets, alpha=0.25, gamma=2, reduction="none"):
    """torchvision.ops.sigmoid_focal_loss where torchvision is installed, else
    the same ops written out (torchvision's formula, op for op)."""
    try:
        from torchvision.ops import sigmoid_focal_loss
    except ImportError:
        p = torch.sigmoid(inputs)
        ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
        p_t = p * targets + (1 - p) * (1 - targets)
        loss = ce * ((1 - p_t) ** gamma)
        if alpha >= 0:
            loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
        return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]
    return sigmoid_focal_loss(inputs, targets, alpha=alpha, gamma=gamma, reduction=reduction)


def _distill_reference(student, teacher, beta, temperature, reduction, ignore_index, target):
    ls = F.log_softmax(student / temperature, dim=-1)
    lt = F.log_softmax(teacher / temperature, dim=-1)

    def kl(lp, lq):  # sum P (log P - log Q), 0 log 0 = 0
        p = lp.exp()
        pos = p != 0
        return torch.where(pos, p * (torch.where(pos, lp, 0) - torch.where(pos, lq, 0)), 0).sum(-1)

    if beta == 0:
        rows = kl(lt, ls)
    elif beta == 1:
        rows = kl(ls, lt)
    else:
        m = beta * lt.exp() + (1 - beta) * ls.exp()
        lm = torch.where(m != 0, m, 1).log()
        rows = beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)
    rows = rows * temperature**2
    keep = torch.ones_like(rows, dtype=torch.bool) if target is None else target != ignore_index
    rows = torch.where(keep, rows, 0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = keep.sum() * (student.shape[-1] if reduction == "mean" else 1)
    return rows.sum() / count


def _kl_div_with_logits_reference(
    student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", ignore_index=-100, target=None
):
    """T^2 KL(softmax(teacher / T) || softmax(student / T)) per row, with
    torch.nn.functional ops: kl_div(log_softmax(s / T), log_softmax(t / T),
    log_target=True) * T^2, with fusedloss's rows, ignored rows and 0 log 0 = 0."""
    return _distill_reference(student_logits, teacher_logits, 0.0, temperature, reduction, ignore_index, target)


def _jsd_with_logits_reference(
    student_logits, teacher_logits, *, beta=0.5, temperature=1.0, reduction="batchmean", ignore_index=-100, target=None
):
    """T^2 (beta KL(P || M) + (1 - beta) KL(Q || M)) with torch.nn.functional ops."""
    return _distill_reference(student_logits, teacher_logits, beta, temperature, reduction, ignore_index, target)


_EXTRA_REFERENCES.update(
    {
        "sigmoid_focal_loss": _sigmoid_focal_loss_reference,
        "kl_div_with_logits": _kl_div_with_logits_reference,
        "jsd_with_logits": _jsd_with_logits_reference,
    }
)
