"""The comparison rules of fusedloss.testing, tested on wrong answers they must
reject: real fusedloss gradients with a term removed or rescaled, rows from the
wrong place. Each case also runs the rule it replaced, to show the hole was real."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss.functional as FF
from fusedloss.testing import (
    TOLERANCES,
    assert_as_accurate_as_torch,
    assert_matches_torch,
    assert_rows_match_float64,
    sample_rows,
    ulp,
)


def _old_rule_accepts(actual, native, oracle):
    """The fp16/bf16 rule fusedloss.testing used before: one bound for the whole
    tensor, fusedloss's largest error against float64 at most twice torch's
    largest, plus eps * max|oracle| and the dtype's atol."""
    a, n, o = actual.double(), native.double(), oracle.double()
    bound = 2 * (n - o).abs().max() + torch.finfo(actual.dtype).eps * o.abs().max() + TOLERANCES[actual.dtype][1]
    return bool((a - o).abs().max() <= bound)


def _old_last_rows_match(x, t, out, grad, rows=4):
    """The check the >2^31-element tests used before: the last rows against a
    float32 recomputation, with an absolute gradient tolerance of 2e-3."""
    tail = x[-rows:].detach().float().requires_grad_()
    ref = F.cross_entropy(tail, t[-rows:], reduction="none")
    (gref,) = torch.autograd.grad(ref.sum(), tail)
    try:
        torch.testing.assert_close(out[-rows:].float(), ref, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(grad[-rows:].float(), gref, rtol=2e-2, atol=2e-3)
    except AssertionError:
        return False
    return True


def _grad(fn, x, t, g, **kw):
    x = x.detach().clone().requires_grad_()
    out = fn(x, t, **kw)
    return torch.autograd.grad(out, x, g.to(out.dtype))[0]


# ---------------------------------------------------------------------------
# ulp
# ---------------------------------------------------------------------------


def test_ulp_at_each_magnitude():
    x = torch.tensor([1.0, 1.99, 2.0, -3.0, 0.0, 2.0**-130, 2.0**-126, 65504.0], dtype=torch.float64)
    expected_bf16 = [2**-7, 2**-7, 2**-6, 2**-6, 2**-133, 2**-133, 2**-133, 2**8]
    assert ulp(x, torch.bfloat16).tolist() == expected_bf16
    assert ulp(torch.tensor([1.0, 0.0, 65504.0, 2.0**-20]), torch.float16).tolist() == [2**-10, 2**-24, 32, 2**-24]
    assert ulp(torch.tensor([1.0, 0.75]), torch.float32).tolist() == [2**-23, 2**-24]


# ---------------------------------------------------------------------------
# The element-wise rule on real cross-entropy gradients
# ---------------------------------------------------------------------------

# The sizes at which the old rule let a wrong cross-entropy gradient through.
CE_CASES = [(torch.bfloat16, 3, 32000), (torch.bfloat16, 9, 1025), (torch.float16, 9, 4097)]


def _ce_gradients(dtype, n, C, reduction, label_smoothing):
    """fusedloss's, torch's and the float64 gradient of one cross entropy, and
    the softmax term of the exact gradient (row scale times softmax)."""
    gen = torch.Generator().manual_seed(n * C)
    x = (torch.rand(n, C, generator=gen, dtype=torch.float64) * 6 - 3).to(dtype)
    t = torch.randint(0, C, (n,), generator=gen)
    g = torch.randn(n if reduction == "none" else (), generator=gen, dtype=torch.float64).to(dtype)
    kw = {"reduction": reduction, "label_smoothing": label_smoothing}
    fused = _grad(FF.cross_entropy, x, t, g, **kw)
    native = _grad(F.cross_entropy, x, t, g, **kw)
    oracle = _grad(F.cross_entropy, x.double(), t, g.double(), **kw)
    scale = g.double().reshape(-1, 1) if reduction == "none" else g.double() / n
    return fused, native, oracle, scale * x.double().softmax(1)


@pytest.mark.parametrize("dtype,n,C", CE_CASES)
@pytest.mark.parametrize("reduction,label_smoothing", [("mean", 0.0), ("none", 0.1), ("sum", 0.0)])
def test_rule_rejects_cross_entropy_gradient_mutations_the_old_rule_accepted(dtype, n, C, reduction, label_smoothing):
    fused, native, oracle, softmax_term = _ce_gradients(dtype, n, C, reduction, label_smoothing)
    assert_as_accurate_as_torch(fused, native, oracle, "the true gradient")
    assert _old_rule_accepts(fused, native, oracle)
    mutations = {
        # only the -onehot (smoothed target) term left
        "softmax term removed": (fused.double() - softmax_term).to(dtype),
        "softmax term scaled by 1.1": (fused.double() + 0.1 * softmax_term).to(dtype),
    }
    for what, wrong in mutations.items():
        assert _old_rule_accepts(wrong, native, oracle), what
        with pytest.raises(AssertionError, match="farther from the float64 result"):
            assert_as_accurate_as_torch(wrong, native, oracle, what)
    with pytest.raises(AssertionError):
        assert_as_accurate_as_torch((fused.double() * 1.1).to(dtype), native, oracle, "gradient scaled by 1.1")


def test_assert_matches_torch_uses_the_rule():
    # The same hole through the public entry point: a cross entropy whose
    # backward drops the softmax term.
    class NoSoftmaxTerm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, t):
            ctx.save_for_backward(x, t)
            return FF.cross_entropy(x, t)

        @staticmethod
        def backward(ctx, g):
            x, t = ctx.saved_tensors
            onehot = F.one_hot(t, x.shape[1]).to(torch.float32)
            return (-onehot * g.float() / x.shape[0]).to(x.dtype), None

    x = (torch.rand(3, 32000, dtype=torch.float64) * 6 - 3).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, 32000, (3,))
    assert_matches_torch("cross_entropy", x, t)
    with pytest.raises(AssertionError, match="grad arg0"):
        assert_matches_torch("cross_entropy", x, t, fused=NoSoftmaxTerm.apply)


def test_rule_rejects_bce_gradient_scaled_by_one_percent():
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(64, 64, generator=gen, dtype=torch.float64) * 16 - 8).to(torch.bfloat16)
    y = torch.rand(64, 64, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    g = torch.randn(64, 64, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    fused = _grad(FF.binary_cross_entropy_with_logits, x, y, g, reduction="none")
    native = _grad(F.binary_cross_entropy_with_logits, x, y, g, reduction="none")
    oracle = _grad(F.binary_cross_entropy_with_logits, x.double(), y.double(), g.double(), reduction="none")
    assert_as_accurate_as_torch(fused, native, oracle, "the true gradient")
    wrong = (fused.double() * 1.01).to(torch.bfloat16)
    assert _old_rule_accepts(wrong, native, oracle)
    with pytest.raises(AssertionError, match="farther from the float64 result"):
        assert_as_accurate_as_torch(wrong, native, oracle, "scaled by 1.01")


# ---------------------------------------------------------------------------
# The rule's special cases
# ---------------------------------------------------------------------------


def test_rule_where_torch_overflows_or_has_no_kernel():
    oracle = torch.tensor([1.0, 1000.0, 3.0], dtype=torch.float64)
    native = torch.tensor([1.0, float("inf"), 3.0], dtype=torch.float16)  # torch overflowed at 1000
    step = ulp(oracle, torch.float16)
    two_off = (oracle + 2 * step).to(torch.float16)
    three_off = (oracle + 3 * step).to(torch.float16)
    assert_as_accurate_as_torch(oracle.to(torch.float16), native, oracle)
    with pytest.raises(AssertionError, match=r"worst at \(1,\)"):
        assert_as_accurate_as_torch(torch.tensor([1.0, three_off[1], 3.0], dtype=torch.float16), native, oracle)
    # No torch result: the exactly rounded oracle stands in for it.
    assert_as_accurate_as_torch(two_off, None, oracle)
    with pytest.raises(AssertionError):
        assert_as_accurate_as_torch(three_off, None, oracle)


def test_rule_requires_nan_and_inf_where_the_rounded_oracle_has_them():
    oracle = torch.tensor([float("nan"), 1e6, -float("inf"), 2.0], dtype=torch.float64)  # 1e6 overflows fp16
    right = oracle.to(torch.float16)
    assert_as_accurate_as_torch(right, right, oracle)
    for wrong in ([0.0, float("inf"), -float("inf"), 2.0], [float("nan"), 65504.0, -float("inf"), 2.0]):
        with pytest.raises(AssertionError, match="NaN/inf positions"):
            assert_as_accurate_as_torch(torch.tensor(wrong, dtype=torch.float16), right, oracle)
    with pytest.raises(AssertionError, match="signs of infinities"):
        flipped = torch.tensor([float("nan"), float("inf"), float("inf"), 2.0], dtype=torch.float16)
        assert_as_accurate_as_torch(flipped, right, oracle)


def _old_fp32_fallback_accepts(actual, native, oracle):
    """The float32 fallback fusedloss.testing used before, for a result outside
    torch's tolerance: its largest error against float64 at most twice torch's
    largest, plus eps * max|oracle|."""
    a, n, o = actual.double(), native.double(), oracle.double()
    return bool((a - o).abs().max() <= 2 * (n - o).abs().max() + torch.finfo(torch.float32).eps * o.abs().max())


def test_float32_results_outside_tolerance_are_judged_element_by_element():
    # torch's float32 result is off by 0.02 at element 0; fusedloss's by 0.01 at
    # element 7, where torch is exact. Only the float32 runs are off, so the
    # float64 run is exact.
    x = torch.linspace(900, 1000, 16, dtype=torch.float32, requires_grad=True)

    def off_by(where, by):
        def fn(a):
            out = a * 3
            return out + by * (torch.arange(16) == where).to(a.dtype) if a.dtype == torch.float32 else out

        return fn

    exact = x.detach().double() * 3
    fused, native = off_by(7, 0.01)(x.detach()), off_by(0, 0.02)(x.detach())
    assert _old_fp32_fallback_accepts(fused, native, exact)
    assert_matches_torch("triple", x, fused=off_by(7, 0.0), native=off_by(0, 0.02))
    with pytest.raises(AssertionError, match=r"worst at \(7,\)"):
        assert_matches_torch("triple", x, fused=off_by(7, 0.01), native=off_by(0, 0.02))


# ---------------------------------------------------------------------------
# Sampled rows of a cross entropy too large to recompute
# ---------------------------------------------------------------------------


def test_sample_rows_cover_the_32_bit_boundaries():
    for rows, classes in [(42731, 50257), (48 * 2047, 50000), (2**31 // 65536 + 1, 65536)]:
        sample = sample_rows(rows, classes)
        assert sample == sorted(set(sample)) and 0 <= sample[0] and sample[-1] < rows
        assert {0, rows - 1} <= set(sample)
        for boundary in (2**31, 2**32):
            if boundary < rows * classes:
                assert boundary // classes in sample
    assert sample_rows(8, 32000) == sorted(set(sample_rows(8, 32000)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "reduction,kw",
    [("none", {}), ("mean", {}), ("mean", {"ignore_index": 3, "label_smoothing": 0.1, "weight": True}), ("sum", {})],
)
def test_rows_helper_rejects_wrong_gradients_the_old_check_accepted(dtype, reduction, kw):
    # A small stand-in for the huge tests: logits in [-4, 4) over 32000 classes,
    # where every non-target entry of the gradient is below 1e-3.
    n, C = 8, 32000
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(n, C, generator=gen, dtype=torch.float64) * 8 - 4).to(dtype).requires_grad_()
    t = torch.randint(0, C, (n,), generator=gen)
    t[1] = 3
    kw = dict(kw)
    if kw.pop("weight", False):
        kw["weight"] = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    g = torch.randn(n if reduction == "none" else (), generator=gen, dtype=torch.float64).to(dtype)
    out = FF.cross_entropy(x, t, reduction=reduction, **kw)
    (grad,) = torch.autograd.grad(out, x, g, retain_graph=True)
    rows = sample_rows(n, C)
    check = dict(grad_output=g, reduction=reduction, **kw)
    if reduction == "none":
        check["loss"] = out
    assert_rows_match_float64(grad, x, t, rows, **check)

    zeroed = torch.where(F.one_hot(t, C).bool(), grad, torch.zeros_like(grad))
    # what a 32-bit offset bug produces: each row's gradient from the previous
    # row's logits, with its own target, written in its own place
    prev = x.detach().roll(1, 0).requires_grad_()
    (shifted,) = torch.autograd.grad(FF.cross_entropy(prev, t, reduction=reduction, **kw), prev, g)
    moved = grad.roll(1, 0)  # rows written one place down
    for wrong in {
        "non-target entries zeroed": zeroed,
        "logits one row off": shifted,
        "rows moved": moved,
    }.values():
        with pytest.raises(AssertionError, match="farther from the float64 result"):
            assert_rows_match_float64(wrong, x, t, rows, **{**check, "loss": None})
    if reduction == "none" and not kw:
        # the old check's case: last rows, unit grad_output, no options
        (unit,) = torch.autograd.grad(out.sum(), x)
        (unit_shifted,) = torch.autograd.grad(FF.cross_entropy(prev, t, reduction="none").sum(), prev)
        unit_zeroed = torch.where(F.one_hot(t, C).bool(), unit, torch.zeros_like(unit))
        assert _old_last_rows_match(x, t, out, unit)
        assert _old_last_rows_match(x, t, out, unit_zeroed)
        assert _old_last_rows_match(x, t, out, unit_shifted)
        for wrong in (unit_zeroed, unit_shifted):
            with pytest.raises(AssertionError):
                assert_rows_match_float64(wrong, x, t, rows, reduction="none")


def test_rows_helper_checks_the_loss_rows():
    x = (torch.rand(6, 500, dtype=torch.float64) * 8 - 4).to(torch.bfloat16)
    t = torch.randint(0, 500, (6,))
    out = FF.cross_entropy(x, t, reduction="none")
    grad = torch.autograd.grad(FF.cross_entropy(x.requires_grad_(), t, reduction="none").sum(), x)[0]
    assert_rows_match_float64(grad, x, t, [0, 5], loss=out, reduction="none")
    with pytest.raises(AssertionError, match="loss, rows"):
        assert_rows_match_float64(grad, x, t, [0, 5], loss=out.roll(1), reduction="none")
    with pytest.raises(ValueError):
        assert_rows_match_float64(grad, x, t, [6], reduction="none")
    with pytest.raises(ValueError, match="float16/bfloat16"):
        assert_rows_match_float64(grad.float(), x.float(), t, [0], reduction="none")
