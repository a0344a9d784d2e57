"""linear_cross_entropy: parity with torch's reference path (linear, then
cross_entropy) over the option grid, chunk boundaries, layouts, dtypes and
errors; determinism and thread-count invariance; autograd (precomputed,
recomputed and composite gradients); memory; a small language-model loop.

How results are judged. fp64/fp32: torch's tolerances, and where an element
is outside them it must be as close to the float64 result as torch's element
(fusedloss.testing). fp16/bf16: the loss element-wise against the float64
result (assert_as_accurate_as_torch); the gradients, which are GEMMs over the
logits' gradient rounded to fp16/bf16, element-wise with an allowance for
that one rounding: |ours - oracle| <= |torch - oracle| + 2 ulp(oracle) +
eps * (|dlogits| @ |other operand|), the largest difference two correct
implementations can have when each rounds every dlogit once, possibly to the
other neighbour. Half-precision inputs are drawn so that the logits are exact
in the dtype (torch's and ours are then the same numbers): otherwise a
logit rounded to the other neighbour (1 ulp of a logit of 8 is 6% of exp)
would be judged instead of the implementation.
"""

import itertools
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fusedloss
import fusedloss.functional as FF
from conftest import DEVICES, OUTSIDE_SOURCE
from fusedloss import testing as T

HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy")
HALF = (torch.float16, torch.bfloat16)
REDUCTIONS = ("none", "mean", "sum")


def reference(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
              ignore_index=None, label_smoothing=0.0, **_):  # fmt: skip
    """torch's reference path (F.linear_cross_entropy with options=None)."""
    logits = F.linear(input, linear_weight, linear_bias)
    return F.cross_entropy(
        logits,
        target,
        weight=weight,
        reduction=reduction,
        ignore_index=-100 if ignore_index is None else ignore_index,
        label_smoothing=label_smoothing,
    )


def exact_inputs(N, D, V, dtype, device, bias):
    """x, W (and b) whose logits are exact in fp16/bf16 (multiples of 1/32 below 8)."""
    x = (torch.randint(-2, 3, (N, D)) / 2).to(dtype)
    w = (torch.randint(-8, 9, (V, D)) / 16).to(dtype)
    b = (torch.randint(-16, 17, (V,)) / 32).to(dtype) if bias else None
    assert D <= 16, "keeps every logit below 8"
    return [t if t is None else t.to(device) for t in (x, w, b)]


def random_inputs(N, D, V, dtype, device, bias, scale=1.0):
    x = torch.randn(N, D, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, D, dtype=torch.float64) * scale / D**0.5).to(dtype)
    b = torch.randn(V, dtype=torch.float64).to(dtype) if bias else None
    return [t if t is None else t.to(device) for t in (x, w, b)]


def _run(fn, tensors, kwargs, grad_out):
    """loss and the gradients of every tensor that requires grad."""
    out = fn(*tensors["pos"], **{**kwargs, **tensors["kw"]})
    leaves = [
        (k, v)
        for k, v in list(enumerate(tensors["pos"])) + list(tensors["kw"].items())
        if v is not None and v.requires_grad
    ]
    grads = {}
    if leaves:
        gs = torch.autograd.grad(out, [v for _, v in leaves], grad_out(out), allow_unused=True)
        grads = {k: g for (k, _), g in zip(leaves, gs, strict=True)}
    return out.detach(), grads


def _clone(tensors, dtype=None):
    def one(t):
        if t is None:
            return None
        c = t.detach().to(dtype) if (dtype is not None and t.is_floating_point()) else t.detach().clone()
        return c.requires_grad_(t.requires_grad)

    return {"pos": [one(t) for t in tensors["pos"]], "kw": {k: one(v) for k, v in tensors["kw"].items()}}


def _gemm_allowance(key, dlogits, tensors, eps):
    """eps * (|dlogits| @ |operand|) for the gradient `key` (see the module docstring)."""
    x, w = tensors["pos"][0].detach().double(), tensors["pos"][1].detach().double()
    a = dlogits.abs()
    if key == 0:  # grad_input = dlogits @ W
        return eps * (a @ w.abs()).reshape(x.shape)
    if key == 1:  # grad_weight = dlogits^T @ x
        return eps * (a.reshape(-1, w.shape[0]).t() @ x.abs().reshape(-1, w.shape[1]))
    if key == "linear_bias":
        return eps * a.reshape(-1, w.shape[0]).sum(0)
    return None


def _oracle_dlogits(tensors, kwargs, grad_out):
    """The float64 gradient of the logits (the GEMM allowance's dlogits)."""
    t = _clone(tensors, torch.float64)
    x, w = t["pos"][0].detach(), t["pos"][1].detach()
    b = t["kw"].get("linear_bias")
    logits = F.linear(x, w, None if b is None else b.detach()).requires_grad_()
    kw = {k: v for k, v in kwargs.items() if k in ("reduction", "ignore_index", "label_smoothing")}
    kw["ignore_index"] = -100 if kw.get("ignore_index") is None else kw["ignore_index"]
    weight = t["kw"].get("weight")
    loss = F.cross_entropy(logits, t["pos"][2].detach() if t["pos"][2].is_floating_point() else t["pos"][2],
                           weight=None if weight is None else weight.detach(), **kw)  # fmt: skip
    (d,) = torch.autograd.grad(loss, logits, grad_out(loss).double())
    return d


def _fused(*args, **kwargs):
    """fusedloss's function, checking that the fused op ran (not the composite
    fallback, which would hide a refusal behind torch's numbers)."""
    loss = FF.linear_cross_entropy(*args, **kwargs)
    target = args[2]
    composite = target.is_floating_point() and target.requires_grad or not torch.is_grad_enabled()
    if loss.requires_grad and not composite:
        assert loss.grad_fn.name() == "fusedloss::LinearCrossEntropyBackward", loss.grad_fn.name()
    return loss


def check_parity(tensors, kwargs, fused_kwargs=None, seed=0):
    """Ours against torch's reference path (and the float64 oracle), loss and every gradient."""
    fused_kwargs = fused_kwargs or {}
    gen = torch.Generator().manual_seed(seed)
    state = {}

    def grad_out(out):
        if "g" not in state:
            g = (
                torch.randn(*out.shape, 2, generator=gen, dtype=torch.float64)[..., 1]
                if out.dim()
                else torch.randn((), generator=gen, dtype=torch.float64)
            )
            state["g"] = g.to(out.device)
        return state["g"].to(out.dtype)

    ours = _run(lambda *a, **k: _fused(*a, **k, **fused_kwargs), _clone(tensors), kwargs, grad_out)
    torch_ = _run(reference, _clone(tensors), kwargs, grad_out)
    oracle = _run(reference, _clone(tensors, torch.float64), kwargs, lambda out: grad_out(out).double())
    dtype = torch_[0].dtype
    assert ours[0].dtype == dtype and ours[0].shape == torch_[0].shape
    assert set(ours[1]) == set(torch_[1])
    if dtype in HALF:
        T.assert_as_accurate_as_torch(ours[0], torch_[0], oracle[0], "loss")
    else:
        T._compare("loss", ours[0], torch_[0], oracle[0], *T.TOLERANCES[dtype])
    dlogits = None
    for key, g in ours[1].items():
        ng, og = torch_[1][key], oracle[1][key]
        assert g.dtype == ng.dtype and g.shape == ng.shape, key
        if g.dtype not in HALF:
            T._compare(f"grad {key}", g, ng, og, *T.TOLERANCES[g.dtype])
            continue
        if key == 2:  # a probability target's gradient: element-wise, no GEMM in it
            T.assert_as_accurate_as_torch(g, ng, og, f"grad {key}")
            continue
        if dlogits is None:
            dlogits = _oracle_dlogits(tensors, kwargs, grad_out)
        assert_within_rounding(
            f"grad {key}", g, ng, og, _gemm_allowance(key, dlogits, tensors, torch.finfo(g.dtype).eps)
        )
    return ours, torch_


def assert_within_rounding(name, actual, native, oracle, allowance):
    """Element-wise: |actual - oracle| <= |native - oracle| + 2 ulp(oracle) + allowance."""
    a, n, o = actual.double(), native.double(), oracle.double()
    assert torch.equal(torch.isnan(a), torch.isnan(o.to(actual.dtype).double())), f"{name}: NaN positions"
    err = (a - o).abs()
    bound = (n - o).abs() + T.ULPS * T.ulp(o, actual.dtype) + allowance
    bad = ~(err <= bound) & torch.isfinite(o)
    if bad.any():
        i = int((err - bound).masked_fill(~bad, -1).reshape(-1).argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements out of bounds; worst: fusedloss "
            f"{a.reshape(-1)[i].item():.6g}, torch {n.reshape(-1)[i].item():.6g}, "
            f"float64 {o.reshape(-1)[i].item():.6g}, allowed {bound.reshape(-1)[i].item():.3g}"
        )


def make_case(device, dtype, *, N=13, D=16, V=37, bias=False, prob=False, weighted=False, unbatched=False,
              ignore=None, rg=(True, True, True), target_rg=False, layout="contiguous"):  # fmt: skip
    maker = exact_inputs if dtype in HALF else random_inputs
    x, w, b = maker(N, D, V, dtype, device, bias)
    if layout == "transposed":  # a tied embedding's transpose: W = E^T with E (D, V) contiguous
        w = w.t().contiguous().t()
        x = x.t().contiguous().t()
    elif layout == "strided":
        w = torch.stack([w, torch.zeros_like(w)], -1)[..., 0]
        x = torch.stack([torch.zeros_like(x), x], -1)[..., 1]
    if prob:
        t = torch.rand(N, V, dtype=torch.float64).softmax(-1).to(device=device, dtype=dtype).requires_grad_(target_rg)
    else:
        t = torch.randint(0, V, (N,), device=device)
        if ignore is not None:
            t[::3] = -100 if ignore == "default" else ignore
    if unbatched:
        x, t = x[0], t[0]
    kw = {"linear_bias": None if b is None else b.requires_grad_(rg[2])}
    if weighted:
        kw["weight"] = (torch.rand(V, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
    return {"pos": [x.requires_grad_(rg[0]), w.requires_grad_(rg[1]), t], "kw": kw}


# ---------------------------------------------------------------------------
# The option grid
# ---------------------------------------------------------------------------

OPTIONS = [
    {},
    {"label_smoothing": 0.15},
    {"ignore_index": 5},
    {"ignore_index": -100, "label_smoothing": 0.1},
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias,weighted", [(False, False), (True, True)])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_index_targets(device, dtype, reduction, bias, weighted, chunk_size):
    for opts in OPTIONS:
        ignore = opts.get("ignore_index")
        case = make_case(device, dtype, bias=bias, weighted=weighted, ignore=ignore)
        if ignore is not None:
            case["pos"][2][::4] = ignore
        check_parity(case, {"reduction": reduction, **opts}, {"chunk_size": chunk_size})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias,weighted,smoothing", [(False, False, 0.0), (True, True, 0.2)])
def test_probability_targets(device, dtype, reduction, bias, weighted, smoothing):
    case = make_case(device, dtype, bias=bias, weighted=weighted, prob=True)
    check_parity(case, {"reduction": reduction, "label_smoothing": smoothing}, {"chunk_size": 4})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_probability_target_gradient(device, dtype):
    """A target that requires grad (distillation from a trained teacher): torch's
    reference path differentiates it; so does fusedloss (through the composite)."""
    case = make_case(device, dtype, bias=True, prob=True, target_rg=True)
    ours, _ = check_parity(case, {"reduction": "sum", "label_smoothing": 0.1})
    assert 2 in ours[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prob", [False, True])
def test_unbatched(device, dtype, reduction, prob):
    case = make_case(device, dtype, bias=True, prob=prob, unbatched=True)
    ours, _ = check_parity(case, {"reduction": reduction})
    assert ours[0].shape == ()
    # unbatched equals a batch of one, squeezed
    x, w, t = case["pos"]
    b = case["kw"]["linear_bias"]
    one = FF.linear_cross_entropy(x[None], w, t[None], linear_bias=b, reduction=reduction)
    torch.testing.assert_close(ours[0], one.detach().reshape(()), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_ignore_index_none_rule(device):
    """torch's rule: ignore_index=None means -100 for class indices; any
    ignore_index with probability targets raises."""
    case = make_case(device, torch.float32, ignore="default")
    x, w, t = case["pos"]
    a = FF.linear_cross_entropy(x, w, t)
    b = FF.linear_cross_entropy(x, w, t, ignore_index=-100)
    assert torch.equal(a, b)
    assert torch.isfinite(a)
    p = torch.rand(x.shape[0], w.shape[0], device=device).softmax(-1)
    for ii in (-100, 3):
        with pytest.raises(RuntimeError, match="ignore_index cannot be specified when target contains probabilities"):
            FF.linear_cross_entropy(x, w, p, ignore_index=ii)


# ---------------------------------------------------------------------------
# Chunks, shapes, layouts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,chunk", [(13, 5), (13, 13), (13, 14), (4, 100), (1, 1), (1, 4), (16, 4), (17, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_boundaries(device, N, chunk, dtype):
    for reduction in REDUCTIONS:
        case = make_case(device, dtype, N=N, bias=True, weighted=True)
        check_parity(case, {"reduction": reduction, "label_smoothing": 0.05}, {"chunk_size": chunk})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_chunks(device, reduction):
    """A chunk whose rows are all ignored gives zero gradients there; all rows
    ignored gives torch's NaN mean and zero gradients."""
    case = make_case(device, torch.float32, N=12, bias=True)
    case["pos"][2][4:8] = -100  # the second chunk of 4
    check_parity(case, {"reduction": reduction}, {"chunk_size": 4})
    case["pos"][2][:] = -100
    ours, torch_ = check_parity(case, {"reduction": reduction}, {"chunk_size": 4})
    for g in ours[1].values():
        assert torch.count_nonzero(g) == 0
    if reduction == "mean":
        assert torch.isnan(ours[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V", [1, 2, 15, 17, 33, 255, 1003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_counts(device, V, dtype):
    """V not a multiple of any vector width (and V = 1: loss 0, gradients 0)."""
    case = make_case(device, dtype, V=V, bias=True)
    check_parity(case, {"reduction": "mean", "label_smoothing": 0.1}, {"chunk_size": 6})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noncontiguous_input_and_weight(device, layout, dtype):
    case = make_case(device, dtype, bias=True, layout=layout)
    assert not case["pos"][1].is_contiguous() and not case["pos"][0].is_contiguous()
    ours, _ = check_parity(case, {"reduction": "mean"}, {"chunk_size": 5})
    # and what the contiguous operands give, up to the GEMM's summation order
    # (the library picks another kernel for transposed operands)
    x, w, t = case["pos"]
    b = case["kw"]["linear_bias"]
    contiguous = FF.linear_cross_entropy(x.contiguous(), w.contiguous(), t, linear_bias=b, chunk_size=5)
    torch.testing.assert_close(ours[0], contiguous.detach())


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    for reduction in REDUCTIONS:
        case = make_case(device, torch.float32, N=0, bias=True)
        ours, torch_ = check_parity(case, {"reduction": reduction})
        assert torch.count_nonzero(ours[1][1]) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_extras_match_cross_entropy(device):
    """lse_square_scale, softcap and out_dtype mean what they mean for fusedloss's cross_entropy."""
    x, w, b = random_inputs(9, 16, 40, torch.float32, device, True, scale=4.0)
    t = torch.randint(0, 40, (9,), device=device)
    for kw in ({"lse_square_scale": 1e-2}, {"softcap": 3.0}, {"out_dtype": torch.float64}):
        leaves = [a.detach().clone().requires_grad_() for a in (x, w, b)]
        ours = FF.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], chunk_size=4, **kw)
        go = torch.autograd.grad(ours, leaves)
        ref_leaves = [a.detach().clone().requires_grad_() for a in (x, w, b)]
        ref = FF.cross_entropy(F.linear(*ref_leaves), t, **kw)
        gr = torch.autograd.grad(ref, ref_leaves)
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, rtol=2e-6, atol=1e-6)
        for a, r in zip(go, gr, strict=True):
            torch.testing.assert_close(a, r, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_k_dimensional_weight_runs_reference(device):
    x = torch.randn(4, 6, device=device, requires_grad=True)
    w = torch.randn(5, 3, 6, device=device, requires_grad=True)
    b = torch.randn(5, 3, device=device, requires_grad=True)
    t = torch.randint(0, 5, (4, 3), device=device)
    ours = FF.linear_cross_entropy(x, w, t, linear_bias=b, reduction="sum")
    ref = F.cross_entropy(F.linear(x, w.reshape(15, 6), b.reshape(15)).reshape(4, 5, 3), t, reduction="sum")
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, (x, w, b)), torch.autograd.grad(ref, (x, w, b)))


# ---------------------------------------------------------------------------
# torch's own function and module, errors
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TORCH_LCE, reason="torch < 2.14 has no linear_cross_entropy")
@pytest.mark.parametrize("device", DEVICES)
def test_equals_torch_linear_cross_entropy(device):
    x, w, b = random_inputs(11, 16, 29, torch.float32, device, True)
    t = torch.randint(0, 29, (11,), device=device)
    t[3] = -100
    for kw in ({}, {"reduction": "sum", "label_smoothing": 0.2}, {"reduction": "none"}):
        ours = FF.linear_cross_entropy(x, w, t, linear_bias=b, **kw)
        theirs = F.linear_cross_entropy(x, w, t, linear_bias=b, **kw)
        chunked = F.linear_cross_entropy(x, w, t, linear_bias=b, options=torch.nn.LinearCrossEntropyOptions(), **kw)
        opt = FF.linear_cross_entropy(x, w, t, linear_bias=b, options=torch.nn.LinearCrossEntropyOptions(), **kw)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(opt, ours, rtol=0, atol=0)
        if not kw.get("label_smoothing"):
            torch.testing.assert_close(chunked, theirs)


def test_options_batch_chunk_size_bounds_the_chunk():
    from fusedloss.linear_cross_entropy import _chunk_rows

    class Opts:
        batch_chunk_size = 8

    assert _chunk_rows(None, None) == 0
    assert _chunk_rows(None, Opts()) == 8
    assert _chunk_rows(4, Opts()) == 4
    assert _chunk_rows(16, Opts()) == 8
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        _chunk_rows(0, None)


def _errors(device):
    x = torch.randn(5, 8, device=device)
    w = torch.randn(11, 8, device=device)
    t = torch.randint(0, 11, (5,), device=device)
    yield (torch.randn(2, 5, 8, device=device), w, t), {}
    yield (x, torch.randn(11, device=device), t), {}
    yield (x, torch.randn(11, 7, device=device), t), {}
    yield (x, w, t), {"linear_bias": torch.randn(10, device=device)}
    yield (x[0], torch.randn(11, 2, 8, device=device), t[0]), {}
    yield (x, w, torch.rand(5, 11, device=device)), {"ignore_index": -100}
    yield (x, w.double(), t), {}
    yield (x, w, t), {"linear_bias": torch.randn(11, device=device, dtype=torch.float64)}
    yield (x, w, t), {"reduction": "avg"}
    yield (x, w, t), {"label_smoothing": 1.5}
    yield (x, w, t), {"weight": torch.ones(11, device=device, dtype=torch.float64)}
    yield (x, w, t), {"weight": torch.ones(10, device=device)}
    yield (x, w, t[:4]), {}
    yield (x, w, t.int()), {}
    yield (x, w, t.float()), {}
    yield (x, torch.randn(0, 8, device=device), t), {}
    if device == "cpu":
        yield (x, w, torch.tensor([0, 1, 2, 3, 11])), {}
        yield (x, w, torch.tensor([0, 1, -5, 3, 4])), {}


@pytest.mark.parametrize("device", DEVICES)
def test_errors_match_torch(device):
    n = 0
    for args, kw in _errors(device):
        with pytest.raises(Exception) as theirs:
            reference(*args, **kw) if not HAS_TORCH_LCE else F.linear_cross_entropy(*args, **kw)
        with pytest.raises(type(theirs.value)) as ours:
            FF.linear_cross_entropy(*args, **kw)
        assert str(ours.value) == str(theirs.value), (kw, str(ours.value), str(theirs.value))
        n += 1
    assert n >= 16


def test_weight_requires_grad_refused_like_torch():
    x, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    cw = torch.rand(5, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        FF.linear_cross_entropy(x, w, t, weight=cw)


# ---------------------------------------------------------------------------
# Determinism, threads, autograd paths
# ---------------------------------------------------------------------------


def _all_outputs(x, w, b, t, reduction, chunk, **kw):
    leaves = [a.detach().clone().requires_grad_() for a in (x, w, b)]
    loss = FF.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], reduction=reduction,
                                   chunk_size=chunk, **kw)  # fmt: skip
    g = torch.ones_like(loss) if reduction == "none" else None
    loss.backward(g)
    return [loss.detach()] + [a.grad for a in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_deterministic_and_thread_count_invariant(dtype):
    """Same bits on every run and for 1 or 2 threads, at shapes where MKL's own
    threading differs with the thread count (7 x 33 x 517 fp32)."""
    before = torch.get_num_threads()
    try:
        for N, D, V, chunk in [(7, 33, 517, None), (300, 64, 3000, 128)]:
            x, w, b = random_inputs(N, D, V, dtype, "cpu", True)
            t = torch.randint(0, V, (N,))
            t[::5] = -100
            for reduction in ("mean", "none"):
                runs = []
                for threads in (2, 1, 2):
                    torch.set_num_threads(threads)
                    runs.append(_all_outputs(x, w, b, t, reduction, chunk, label_smoothing=0.1))
                for other in runs[1:]:
                    for a, c in zip(runs[0], other, strict=True):
                        assert torch.equal(a, c), (N, D, V, dtype, reduction)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_retain_graph_and_grad_output_scaling(device, dtype):
    """The precomputed gradients times grad_output: two backwards over a
    retained graph agree; the last one may scale in place and still agrees."""
    x, w, b = random_inputs(10, 16, 21, dtype, device, True)
    t = torch.randint(0, 21, (10,), device=device)
    leaves = [a.detach().clone().requires_grad_() for a in (x, w, b)]
    loss = FF.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], chunk_size=3)
    g1 = torch.autograd.grad(loss * 2.0, leaves, retain_graph=True)
    g2 = torch.autograd.grad(loss * 2.0, leaves, retain_graph=True)
    g3 = torch.autograd.grad(loss * 2.0, leaves)  # the last: in place
    for a, c, d in zip(g1, g2, g3, strict=True):
        assert torch.equal(a, c) and torch.equal(a, d)
    # and what one backward of a fresh graph gives
    fresh = [a.detach().clone().requires_grad_() for a in (x, w, b)]
    gf = torch.autograd.grad(
        FF.linear_cross_entropy(fresh[0], fresh[1], t, linear_bias=fresh[2], chunk_size=3) * 2.0, fresh
    )
    for a, f in zip(g1, gf, strict=True):
        assert torch.equal(a, f)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_recomputes_in_backward(device):
    """fp16 scalar losses keep no fp16 gradients from the forward (a loss
    scaler's grad_output would otherwise meet gradients rounded at 1): the
    backward recomputes them with grad_output folded in, like 'none'."""
    x, w, b = exact_inputs(8, 16, 19, torch.float16, device, True)
    t = torch.randint(0, 19, (8,), device=device)
    leaves = [a.requires_grad_() for a in (x, w, b)]
    loss = FF.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2])
    assert loss.grad_fn is not None
    scale = 2.0**14
    scaled = torch.autograd.grad(loss, leaves, torch.tensor(scale, dtype=torch.float16))
    plain = torch.autograd.grad(FF.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2]), leaves)
    # the scaled gradient keeps digits the unscaled one lost to fp16's range
    assert (scaled[1].double() / scale - plain[1].double()).abs().max() < 1e-3
    assert torch.count_nonzero(scaled[1]) >= torch.count_nonzero(plain[1])


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck(device):
    for reduction, prob in itertools.product(REDUCTIONS, (False, True)):
        x = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
        w = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
        b = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
        if prob:
            t = torch.rand(5, 6, dtype=torch.float64, device=device).softmax(-1).requires_grad_()
            kw = {"label_smoothing": 0.1}
            args = (x, w, b, t)
        else:
            t = torch.tensor([0, 5, -100, 2, 3], device=device)
            kw = {"label_smoothing": 0.1, "weight": torch.rand(6, dtype=torch.float64, device=device) + 0.5}
            args = (x, w, b)

        def fn(x, w, b, t=t, reduction=reduction, kw=kw):
            return FF.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=2, **kw)

        assert torch.autograd.gradcheck(fn, args, check_forward_ad=True, check_batched_grad=True)
        assert torch.autograd.gradgradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args, gen_non_contig_grad_outputs=True)


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_and_partial_requires_grad(device):
    x, w, b = random_inputs(7, 16, 23, torch.float32, device, True)
    t = torch.randint(0, 23, (7,), device=device)
    ref = reference(x, w, t, linear_bias=b)
    with torch.no_grad():
        torch.testing.assert_close(FF.linear_cross_entropy(x, w, t, linear_bias=b), ref)
    with torch.inference_mode():
        torch.testing.assert_close(FF.linear_cross_entropy(x, w, t, linear_bias=b), ref)
    # only the weight requires grad (a frozen trunk)
    w2 = w.clone().requires_grad_()
    (gw,) = torch.autograd.grad(FF.linear_cross_entropy(x, w2, t, linear_bias=b), w2)
    w3 = w.clone().requires_grad_()
    (rw,) = torch.autograd.grad(reference(x, w3, t, linear_bias=b), w3)
    torch.testing.assert_close(gw, rw)


def test_autocast_matches_torch_reference():
    """Under CPU autocast torch's reference path runs linear in bf16 and cross
    entropy in fp32 (an fp32 loss); so does fusedloss, with gradients to the
    fp32 parameters through autocast's casts."""
    x, w, b = exact_inputs(9, 16, 31, torch.float32, "cpu", True)
    t = torch.randint(0, 31, (9,))
    ours_leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    ref_leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = FF.linear_cross_entropy(ours_leaves[0], ours_leaves[1], t, linear_bias=ours_leaves[2])
        ref = reference(ref_leaves[0], ref_leaves[1], t, linear_bias=ref_leaves[2])
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    go, gr = torch.autograd.grad(ours, ours_leaves), torch.autograd.grad(ref, ref_leaves)
    for a, r in zip(go, gr, strict=True):
        assert a.dtype == r.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-3)


# ---------------------------------------------------------------------------
# The judges catch a wrong gradient
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_comparisons_catch_a_wrong_gradient(dtype, monkeypatch):
    """Scaling one row of grad_weight by 1 + 2^-6 (bf16: 2 ulp; fp32: far more),
    or grad_input of one row, must fail the parity check that passes unmutated."""
    case = make_case("cpu", dtype, bias=True)
    kwargs = {"reduction": "sum"}
    check_parity(case, kwargs)
    real = FF.linear_cross_entropy

    for which in (0, 1):

        class Wrong(torch.autograd.Function):
            row = which

            @staticmethod
            def forward(ctx, x, w, b, t):
                ctx.save_for_backward(x, w, b, t)
                return real(x, w, t, linear_bias=b, reduction="sum")

            @staticmethod
            def backward(ctx, g):
                x, w, b, t = ctx.saved_tensors
                with torch.enable_grad():
                    leaves = [a.detach().requires_grad_() for a in (x, w, b)]
                    gs = list(
                        torch.autograd.grad(
                            real(leaves[0], leaves[1], t, linear_bias=leaves[2], reduction="sum"), leaves, g
                        )
                    )
                k = Wrong.row
                gs[k] = gs[k].clone()
                gs[k][3] *= 1 + 2**-6
                return gs[0], gs[1], gs[2], None

        monkeypatch.setattr(
            FF, "linear_cross_entropy", lambda x, w, t, linear_bias=None, **kw: Wrong.apply(x, w, linear_bias, t)
        )
        with pytest.raises(AssertionError):
            check_parity(case, kwargs)
        monkeypatch.setattr(FF, "linear_cross_entropy", real)


# ---------------------------------------------------------------------------
# Module, memory, a language model
# ---------------------------------------------------------------------------


def test_module_matches_torch_module():
    torch.manual_seed(0)
    kw = {"bias": True, "reduction": "sum", "label_smoothing": 0.1, "weight": torch.rand(13) + 0.5}
    ours = fusedloss.nn.LinearCrossEntropyLoss(8, 13, chunk_size=3, **kw)
    x, t = torch.randn(6, 8), torch.randint(0, 13, (6,))
    if hasattr(torch.nn, "LinearCrossEntropyLoss"):
        theirs = torch.nn.LinearCrossEntropyLoss(8, 13, **kw)
        theirs.load_state_dict(ours.state_dict())
        assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
        assert repr(theirs) in repr(ours) or repr(ours).startswith(repr(theirs).split("\n")[0][:-1])
        torch.testing.assert_close(ours(x, t), theirs(x, t))
        assert set(ours.state_dict()) == set(theirs.state_dict())
    ref = reference(x, ours.linear.weight, t, linear_bias=ours.linear.bias, weight=ours.weight, reduction="sum",
                    label_smoothing=0.1)  # fmt: skip
    torch.testing.assert_close(ours(x, t), ref)
    assert "chunk_size=3" in repr(ours)
    kdim = fusedloss.nn.LinearCrossEntropyLoss(8, 5, out_features=(3,), bias=True)
    torch.testing.assert_close(kdim(x, torch.randint(0, 5, (6, 3))).shape, torch.Size([]))


PEAK_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import fusedloss.functional as FF
    from fusedloss.benchmark import reset_peak_rss, rss_mb
    N, D, V = 2048, 64, 32000
    torch.manual_seed(0)
    x = torch.randn(N, D, requires_grad=True)
    w = (torch.randn(V, D) / 8).requires_grad_()
    t = torch.randint(0, V, (N,))
    reset_peak_rss()
    base = rss_mb()
    FF.linear_cross_entropy(x, w, t, reduction=sys.argv[1]).sum().backward()
    print(rss_mb("VmHWM") - base)
    """
)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_never_exist(reduction):
    """Peak memory of a forward + backward at N x V = 2048 x 32000 fp32 (logits:
    262 MB) stays below the chunk (32 MiB) + gradients (8.2 MB) + slack."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, reduction],
        capture_output=True,
        text=True,
        cwd=OUTSIDE_SOURCE,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    grown_mb = float(out.stdout.strip().splitlines()[-1])
    assert grown_mb < 100, grown_mb


def _lm_steps(loss_fn, steps=20, dtype=torch.float32):
    """A tiny tied-embedding language model trained for `steps` steps."""
    torch.manual_seed(0)
    V, D, B, S = 97, 32, 4, 12
    emb = torch.nn.Embedding(V, D).to(dtype)
    torch.nn.init.normal_(emb.weight, std=0.2)
    mix = torch.nn.Linear(D, D).to(dtype)
    params = list(emb.parameters()) + list(mix.parameters())
    opt = torch.optim.SGD(params, lr=2.0)
    # sequences with a learnable rule: the next token is 3 * token + 1 (mod V)
    data = torch.empty(steps, B, S + 1, dtype=torch.long)
    data[..., 0] = torch.randint(0, V, (steps, B))
    for j in range(S):
        data[..., j + 1] = (3 * data[..., j] + 1) % V
    losses = []
    for i in range(steps):
        ids, labels = data[i, :, :-1], data[i, :, 1:]
        hidden = torch.tanh(mix(emb(ids))).reshape(-1, D)
        labels = labels.reshape(-1).clone()
        labels[::7] = -100
        loss = loss_fn(hidden, emb.weight, labels)  # the head is the tied embedding
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_language_model_loss_curve(dtype, tol):
    """20 SGD steps of a tied-embedding LM: fusedloss's loss curve equals the
    reference path's (fp32: to rounding; bf16: within the bf16 noise, which
    compounds over steps)."""
    ours = _lm_steps(lambda h, w, y: FF.linear_cross_entropy(h, w, y, chunk_size=16), dtype=dtype)
    ref = _lm_steps(lambda h, w, y: reference(h, w, y), dtype=dtype)
    assert ours[-1] < ours[0] - 0.05  # it learns
    for a, r in zip(ours, ref, strict=True):
        assert abs(a - r) <= tol * max(1.0, abs(r)), (ours, ref)


def test_torch_func_transforms_run_the_reference():
    """vmap and grad (torch.func) run the composite, batched by torch."""
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    w = torch.randn(11, 8, dtype=torch.float64)
    t = torch.randint(0, 11, (3, 5))
    batched = torch.func.vmap(lambda a, y: FF.linear_cross_entropy(a, w, y, label_smoothing=0.1))(x, t)
    looped = torch.stack([reference(x[i], w, t[i], label_smoothing=0.1) for i in range(3)])
    torch.testing.assert_close(batched, looped)
    g = torch.func.grad(lambda ww: FF.linear_cross_entropy(x[0], ww, t[0]))(w)
    wr = w.clone().requires_grad_()
    (gr,) = torch.autograd.grad(reference(x[0], wr, t[0]), wr)
    torch.testing.assert_close(g, gr)


# ---------------------------------------------------------------------------
# CUDA: no host syncs, graph capture, CPU parity, the GPU shape's memory
# ---------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device and a CUDA build")


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_no_host_sync(reduction):
    x, w, b = random_inputs(300, 64, 5000, torch.bfloat16, "cuda", True)
    t = torch.randint(0, 5000, (300,), device="cuda")
    leaves = [a.requires_grad_() for a in (x, w, b)]
    FF.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], reduction=reduction)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = FF.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], reduction=reduction,
                                       chunk_size=128)  # fmt: skip
        torch.autograd.grad(loss, leaves, torch.ones_like(loss))
    finally:
        torch.cuda.set_sync_debug_mode(0)


@needs_cuda
@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    x, w, b = random_inputs(256, 64, 3000, torch.bfloat16, "cuda", True)
    t = torch.randint(0, 3000, (256,), device="cuda")
    static = [a.clone().requires_grad_() for a in (x, w, b)]

    def step():
        loss = FF.linear_cross_entropy(static[0], static[1], t, linear_bias=static[2], chunk_size=100)
        return (loss, *torch.autograd.grad(loss, static))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    fresh = [a * 0.5 for a in (x, w, b)]
    with torch.no_grad():
        for st, fr in zip(static, fresh, strict=True):
            st.copy_(fr)
    graph.replay()
    torch.cuda.synchronize()
    eager = [a.clone().requires_grad_() for a in fresh]
    ref = FF.linear_cross_entropy(eager[0], eager[1], t, linear_bias=eager[2], chunk_size=100)
    for o, r in zip(outs, (ref, *torch.autograd.grad(ref, eager)), strict=True):
        assert torch.equal(o, r)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_and_is_deterministic(dtype):
    x, w, b = random_inputs(700, 64, 5003, dtype, "cpu", True)
    t = torch.randint(0, 5003, (700,))
    t[::7] = -100
    runs = []
    for device in ("cpu", "cuda", "cuda"):
        leaves = [a.to(device).requires_grad_() for a in (x, w, b)]
        loss = FF.linear_cross_entropy(leaves[0], leaves[1], t.to(device), linear_bias=leaves[2], chunk_size=256)
        runs.append([r.cpu() for r in (loss, *torch.autograd.grad(loss, leaves))])
    for a, c in zip(runs[1], runs[2], strict=True):
        assert torch.equal(a, c)  # the same bits on every run
    tol = {"rtol": 1e-4, "atol": 4e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    for a, c in zip(runs[0], runs[1], strict=True):
        torch.testing.assert_close(c, a, **tol)


@needs_cuda
@pytest.mark.cuda
def test_cuda_memory_beyond_gradients_is_one_chunk():
    """bf16 (N, D, V) = (4096, 1024, 32000): logits 262 MB. Peak beyond the
    inputs: the gradients, the fp32 grad_weight accumulator and one chunk."""
    N, D, V = 4096, 1024, 32000
    x = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, D, device="cuda", dtype=torch.bfloat16) / 32).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    chunk = 1024
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    FF.linear_cross_entropy(x, w, t, chunk_size=chunk).backward()
    peak = torch.cuda.max_memory_allocated() - base
    grads = (N * D + V * D) * 2
    allowed = grads + V * D * 4 + chunk * V * 2 + 16 * 2**20
    assert peak <= allowed, (peak / 2**20, allowed / 2**20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prob", [False, True])
def test_fused_phase_equals_stats_then_grad(dtype, prob):
    """The phases a vocabulary-parallel variant builds on: the single-device
    fused phase (stats and gradient per row while it is in cache) gives the
    same bits as the stats phase over all chunks followed by the gradient
    phase from the saved per-row (max, log-sum-exp)."""
    ops = torch.ops.fusedloss
    x, w, b = random_inputs(37, 24, 301, dtype, "cpu", True)
    if prob:
        t = torch.rand(37, 301, dtype=torch.float64).softmax(-1).to(dtype)
    else:
        t = torch.randint(0, 301, (37,))
        t[::6] = -100
    cw = torch.rand(301) + 0.5 if not prob else None
    opts = (-100, 1, 0.1, 1e-3, 20.0, 8)
    fused = ops.linear_cross_entropy_forward(x, w, t, b, cw, *opts, None, [True, True, True])
    stats = ops.linear_cross_entropy_forward(x, w, t, b, cw, *opts, None, [False, False, False])
    for a, c in zip(fused[:4], stats[:4], strict=True):
        assert torch.equal(a, c)
    grads = ops.linear_cross_entropy_backward(
        torch.ones((), dtype=fused[0].dtype), x, w, t, b, cw, *stats[1:4], *opts, [True, True, True]
    )
    for a, c in zip(fused[4:], grads, strict=True):
        assert torch.equal(a, c)
