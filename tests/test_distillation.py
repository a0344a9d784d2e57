"""kl_div_with_logits and jsd_with_logits: parity with the torch composite in
float64 (values and both gradients), every reduction, temperature, beta and
its endpoints, ignored rows, large vocabularies, masked (-inf) classes, bf16
gradients element-wise against float64, errors, autograd, the modules."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
import fusedloss.functional as FF
from conftest import DEVICES, make
from fusedloss import _composite
from fusedloss.testing import assert_matches_torch

DISTILL_REDUCTIONS = ["none", "mean", "sum", "batchmean"]


def composite_kl(s, t, temperature=1.0, reduction="batchmean", ignore_index=-100, target=None):
    return _composite.distill(s, t, target, 0.0, temperature, reduction, ignore_index)


def composite_jsd(s, t, beta=0.5, temperature=1.0, reduction="batchmean", ignore_index=-100, target=None):
    return _composite.distill(s, t, target, beta, temperature, reduction, ignore_index)


def in_float32(reference):
    """torch's composite with fp32 math on fp16/bf16 logits (as under autocast,
    or after .float()), rounded once to their dtype: torch's best result for
    them, and the allowance of the element-wise rule, which judges every
    element against float64. (Against the exactly rounded float64 result the
    rule would ask for 2 ulp also where a gradient element is a
    near-cancellation, P (log(P/M) - KL) with the bracket ~1e-5 of its terms,
    below what any fp32 computation resolves.)"""

    def run(s, t, **kw):
        if s.dtype == torch.float64:  # the float64 run that judges (assert_matches_torch's oracle)
            return reference(s, t, **kw)
        return reference(s.float(), t.float(), **kw).to(s.dtype)

    return run


def kl(s, t, **kw):
    return assert_matches_torch("kl_div_with_logits", s, t, native=composite_kl, **kw)


def jsd(s, t, **kw):
    return assert_matches_torch("jsd_with_logits", s, t, native=composite_jsd, **kw)


def logits(shape, dtype, device, scale=3.0, requires_grad=True, layout="contiguous"):
    return make(shape, dtype, device, -scale, scale, requires_grad=requires_grad, layout=layout)


def test_composite_is_torchs_kl_div():
    # The reference itself: kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True) * T^2.
    s = make((7, 50), torch.float64, "cpu")
    t = make((7, 50), torch.float64, "cpu")
    for T in (1.0, 2.0, 0.5):
        ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
        for reduction in ("batchmean", "sum", "mean"):
            ref = F.kl_div(ls, lt, log_target=True, reduction=reduction) * T * T
            torch.testing.assert_close(composite_kl(s, t, temperature=T, reduction=reduction), ref)
        ref = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1) * T * T
        torch.testing.assert_close(composite_kl(s, t, temperature=T, reduction="none"), ref)
        # reverse KL and JSD, written out
        torch.testing.assert_close(
            composite_jsd(s, t, beta=1.0, temperature=T, reduction="sum"),
            F.kl_div(lt, ls, log_target=True, reduction="sum") * T * T,
        )
        m = torch.log(0.3 * lt.exp() + 0.7 * ls.exp())
        ref = 0.3 * F.kl_div(m, lt, log_target=True, reduction="sum") + 0.7 * F.kl_div(
            m, ls, log_target=True, reduction="sum"
        )
        torch.testing.assert_close(composite_jsd(s, t, beta=0.3, temperature=T, reduction="sum"), ref * T * T)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(7, 50), (2, 3, 33), (50,), (0, 5), (3, 4100)])
@pytest.mark.parametrize("reduction", DISTILL_REDUCTIONS)
def test_kl_parity(device, dtype, shape, reduction):
    s, t = logits(shape, dtype, device), logits(shape, dtype, device)
    for T in (1.0, 2.0, 0.7):
        kl(s, t, temperature=T, reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.5, 0.1, 0.9, 0.0, 1.0])
@pytest.mark.parametrize("reduction", DISTILL_REDUCTIONS)
def test_jsd_parity(device, dtype, beta, reduction):
    for shape in ((7, 50), (2, 3, 33), (3, 4100)):
        s, t = logits(shape, dtype, device), logits(shape, dtype, device)
        jsd(s, t, beta=beta, temperature=2.0, reduction=reduction)
    jsd(s, t, beta=beta, reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_low_precision_gradients_against_float64(device, dtype, beta):
    # Every element of both gradients (and the loss) no farther from float64
    # than torch's fp32 computation, plus 2 ulp: logits or probabilities
    # rounded to bf16 before the fp32 math (a published fused JSD did) would
    # lose up to 23% of the gradient (see the next test).
    for shape, T in (((16, 1000), 1.0), ((4, 3, 257), 2.0), ((2, 32000), 1.0)):
        s, t = logits(shape, dtype, device, 4), logits(shape, dtype, device, 4)
        for reduction in ("batchmean", "none"):
            assert_matches_torch(
                "jsd_with_logits", s, t, beta=beta, temperature=T, reduction=reduction, native=in_float32(composite_jsd)
            )


def test_cpu_gradients_within_two_ulp_of_exact_rounding():
    # Stronger than the rule (torch's fp32 error + 2 ulp): the CPU kernels are
    # within 2 ulp of the exactly rounded float64 result in every element,
    # also at near-cancellations (the row sums add in double, and the
    # per-class log ratios come from log Q - log P kept to double precision).
    def exactly_rounded(reference):
        return lambda s, t, **kw: reference(s.double(), t.double(), **kw).to(s.dtype)

    for beta in (0.0, 0.5, 1.0):
        for shape, T in (((16, 1000), 1.0), ((4, 3, 257), 2.0), ((2, 32000), 1.0)):
            s, t = logits(shape, torch.bfloat16, "cpu", 4), logits(shape, torch.bfloat16, "cpu", 4)
            assert_matches_torch(
                "jsd_with_logits",
                s,
                t,
                beta=beta,
                temperature=T,
                reduction="none",
                native=exactly_rounded(composite_jsd),
            )


@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_check_sees_rounded_logits(device):
    # The test above fails a kernel that rounds the scaled logits to bf16
    # before its fp32 math (here at T = 3, where s / T is not exact in bf16).
    def rounds_logits(a, b, temperature, **kw):
        a = (a.float() / temperature).bfloat16().float() * temperature
        b = (b.float() / temperature).bfloat16().float() * temperature
        return FF.jsd_with_logits(a, b, temperature=temperature, **kw).bfloat16()

    s, t = logits((16, 1000), torch.bfloat16, device, 4), logits((16, 1000), torch.bfloat16, device, 4)
    kw = {"beta": 0.5, "temperature": 3.0, "reduction": "none", "native": in_float32(composite_jsd)}
    assert_matches_torch("jsd_with_logits", s, t, **kw)
    with pytest.raises(AssertionError):
        assert_matches_torch("jsd_with_logits", s, t, fused=rounds_logits, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocabulary(device, dtype):
    V = 131072
    s, t = logits((3, V), dtype, device, 8), logits((3, V), dtype, device, 8)
    s.detach()[:, -5:] = float("-inf")  # padded vocabulary, masked in both
    t.detach()[:, -5:] = float("-inf")
    ref = composite_kl if dtype == torch.float32 else in_float32(composite_kl)
    assert_matches_torch("kl_div_with_logits", s, t, temperature=2.0, reduction="none", native=ref)
    ref = composite_jsd if dtype == torch.float32 else in_float32(composite_jsd)
    assert_matches_torch("jsd_with_logits", s, t, reduction="sum", native=ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", DISTILL_REDUCTIONS)
def test_ignored_rows(device, reduction):
    s, t = logits((4, 6, 40), torch.float32, device), logits((4, 6, 40), torch.float32, device)
    target = torch.randint(0, 40, (4, 6), device=device)
    target[0, :4] = -100
    target[2] = -100
    kl(s, t, target=target, reduction=reduction)
    jsd(s, t, target=target, reduction=reduction, beta=0.3)
    target[1, 1] = 7
    kl(s, t, target=target, ignore_index=7, reduction=reduction, temperature=3.0)
    # ignored rows: no loss, exactly zero gradients even with NaN logits there
    s2, t2 = s.detach().clone(), t.detach().clone()
    s2[2] = float("nan")
    t2[0, 0] = float("nan")
    s2.requires_grad_()
    t2.requires_grad_()
    out = FF.kl_div_with_logits(s2, t2, target=target, reduction=reduction)
    assert torch.isfinite(out).all()
    gs, gt = torch.autograd.grad(out.sum(), (s2, t2))
    assert (gs[2] == 0).all() and (gt[2] == 0).all() and (gt[0, :4] == 0).all()
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("device", DEVICES)
def test_batchmean_divides_by_kept_rows(device):
    s, t = logits((2, 5, 30), torch.float64, device), logits((2, 5, 30), torch.float64, device)
    target = torch.tensor([[1, 2, -100, -100, 3], [-100, 4, 5, 6, -100]], device=device)
    rows = FF.kl_div_with_logits(s, t, target=target, reduction="none")
    kept = target != -100
    torch.testing.assert_close(FF.kl_div_with_logits(s, t, target=target), rows[kept].sum() / kept.sum())
    torch.testing.assert_close(
        FF.kl_div_with_logits(s, t, target=target, reduction="mean"), rows[kept].sum() / (kept.sum() * 30)
    )
    # without ignored rows, (N, C) logits: torch's kl_div batchmean exactly
    s2, t2 = s.reshape(10, 30), t.reshape(10, 30)
    ref = F.kl_div(F.log_softmax(s2, -1), F.log_softmax(t2, -1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(FF.kl_div_with_logits(s2, t2), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_all_rows_ignored(device, beta):
    s, t = logits((3, 20), torch.float32, device), logits((3, 20), torch.float32, device)
    target = torch.full((3,), -100, device=device)
    for reduction in DISTILL_REDUCTIONS:
        out = FF.jsd_with_logits(s, t, beta=beta, target=target, reduction=reduction)
        ref = composite_jsd(s, t, beta=beta, target=target, reduction=reduction)
        if reduction in ("mean", "batchmean"):
            assert torch.isnan(out) and torch.isnan(ref)  # 0/0, as cross_entropy's
        else:
            assert (out == 0).all() and (ref == 0).all()
        gs, gt = torch.autograd.grad(out.sum(), (s, t))
        assert (gs == 0).all() and (gt == 0).all()
        rs, rt = torch.autograd.grad(ref.sum(), (s, t))
        assert (rs == 0).all() and (rt == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_classes(device, dtype):
    ninf = float("-inf")
    C = 37
    s0, t0 = logits((6, C), dtype, device, requires_grad=False), logits((6, C), dtype, device, requires_grad=False)
    # rows 0-1: the same classes masked in both (vocabulary padding), also in
    # the first and last positions; rows 2-3: masked in the teacher only
    # (0 log 0 = 0); row 4: masked in the student only where the teacher has
    # none; row 5: untouched.
    for r, cols in ((0, [0, 5, C - 1]), (1, list(range(20, C)))):
        s0[r, cols] = ninf
        t0[r, cols] = ninf
    t0[2, [1, 2, 3]] = ninf
    t0[3, 10:] = ninf
    t0[4, [7, 8]] = ninf
    s0[4, [7, 8]] = ninf
    s0[4, 9] = ninf
    t0[4, 9] = ninf
    s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
    for reduction in DISTILL_REDUCTIONS:
        kl(s, t, reduction=reduction)
        kl(s, t, reduction=reduction, temperature=2.0)
        jsd(s, t, reduction=reduction, beta=0.5)
    # The reverse KL (student || teacher) of rows where only the teacher masks:
    # +inf, the next test's case from the other side.
    both = [0, 1, 4, 5]
    s, t = s0[both].clone().requires_grad_(), t0[both].clone().requires_grad_()
    for reduction in DISTILL_REDUCTIONS:
        jsd(s, t, reduction=reduction, beta=1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_a_kl_of_a_masked_class_with_mass_is_inf(device, beta):
    # Forward KL (teacher || student) where the student masks a class the
    # teacher has; reverse KL (student || teacher) where the teacher does.
    s, t = logits((3, 12), torch.float32, device), logits((3, 12), torch.float32, device)
    (s if beta == 0.0 else t).detach()[1, 4] = float("-inf")
    rows = FF.jsd_with_logits(s, t, beta=beta, reduction="none")
    ref = composite_jsd(s, t, beta=beta, reduction="none")
    assert torch.isinf(rows[1]) and torch.isinf(ref[1]) and torch.isfinite(rows[[0, 2]]).all()
    torch.testing.assert_close(rows[[0, 2]], ref[[0, 2]])
    g = torch.randn(3, device=device)
    gs, gt = torch.autograd.grad(rows, (s, t), g)
    rs, rt = torch.autograd.grad(ref, (s, t), g)
    # The masking side's gradient, T (Q - P), is exact also there; the other
    # side's is NaN for that row (the composite's is not finite either).
    exact, exact_ref, nan, nan_ref = (gs, rs, gt, rt) if beta == 0.0 else (gt, rt, gs, rs)
    torch.testing.assert_close(exact, exact_ref)
    torch.testing.assert_close(nan[[0, 2]], nan_ref[[0, 2]])
    assert torch.isnan(nan[1]).all() and not torch.isfinite(nan_ref[1]).all()
    # JSD stays finite: its mixture has mass wherever either has
    assert torch.isfinite(FF.jsd_with_logits(s, t, reduction="none")).all()


@pytest.mark.parametrize("device", DEVICES)
def test_rows_of_all_masked_or_nan_logits_are_nan(device):
    s, t = logits((3, 12), torch.float32, device), logits((3, 12), torch.float32, device)
    s.detach()[0] = float("-inf")
    t.detach()[2, 3] = float("nan")
    for beta in (0.0, 0.5, 1.0):
        rows = FF.jsd_with_logits(s, t, beta=beta, reduction="none")
        assert torch.isnan(rows[0]) and torch.isnan(rows[2]) and torch.isfinite(rows[1])
        ref = composite_jsd(s, t, beta=beta, reduction="none")
        assert torch.isnan(ref[0]) and torch.isnan(ref[2])


@pytest.mark.parametrize("device", DEVICES)
def test_beta_endpoints_are_forward_and_reverse_kl(device):
    s, t = logits((5, 3, 40), torch.float32, device), logits((5, 3, 40), torch.float32, device)
    target = torch.randint(0, 40, (5, 3), device=device)
    target[0, 0] = -100
    kw = {"temperature": 1.5, "target": target, "reduction": "none"}
    g = torch.randn(5, 3, device=device)
    # beta = 0 is kl_div_with_logits: KL(teacher || student), bit for bit
    a = FF.jsd_with_logits(s, t, beta=0.0, **kw)
    b = FF.kl_div_with_logits(s, t, **kw)
    assert torch.equal(a, b)
    ga, gb = torch.autograd.grad(a, (s, t), g), torch.autograd.grad(b, (s, t), g)
    assert torch.equal(ga[0], gb[0]) and torch.equal(ga[1], gb[1])
    # beta = 1 is KL(student || teacher): kl_div_with_logits with the roles swapped
    a = FF.jsd_with_logits(s, t, beta=1.0, **kw)
    b = FF.kl_div_with_logits(t, s, **kw)
    assert torch.equal(a, b)
    ga, gb = torch.autograd.grad(a, (s, t), g), torch.autograd.grad(b, (s, t), g)
    assert torch.equal(ga[0], gb[0]) and torch.equal(ga[1], gb[1])
    # in between, JSD_beta / beta and JSD_beta / (1 - beta) approach them
    fwd = FF.kl_div_with_logits(s, t, reduction="sum").item()
    rev = FF.kl_div_with_logits(t, s, reduction="sum").item()
    near0 = FF.jsd_with_logits(s.double(), t.double(), beta=1e-6, reduction="sum").item() / 1e-6
    near1 = FF.jsd_with_logits(s.double(), t.double(), beta=1 - 1e-6, reduction="sum").item() / 1e-6
    assert abs(near0 - fwd) < 1e-3 * fwd and abs(near1 - rev) < 1e-3 * rev
    # the symmetric JSD is symmetric
    torch.testing.assert_close(FF.jsd_with_logits(s, t, reduction="sum"), FF.jsd_with_logits(t, s, reduction="sum"))


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_gradient_only_when_it_requires_grad(device):
    s = logits((4, 30), torch.float32, device)
    t = logits((4, 30), torch.float32, device, requires_grad=False)
    out = FF.kl_div_with_logits(s, t, temperature=2.0)
    out.backward()
    assert t.grad is None and s.grad is not None
    kl(s, t, temperature=2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "offset", "strided"])
def test_non_contiguous_logits(device, layout):
    s, t = logits((9, 4, 35), torch.float32, device, layout=layout), logits((9, 4, 35), torch.float32, device)
    kl(s, t, reduction="none")
    jsd(s, t, reduction="sum")
    ref = FF.kl_div_with_logits(s.detach().contiguous(), t.detach(), reduction="none")
    assert torch.equal(FF.kl_div_with_logits(s, t, reduction="none").detach(), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_shifted_language_model_logits(device):
    # logits[:, :-1] of (B, S, V): rows read with their strides, no copy.
    s, t = logits((2, 9, 64), torch.bfloat16, device, 5), logits((2, 9, 64), torch.bfloat16, device, 5)
    labels = torch.randint(0, 64, (2, 9), device=device)
    labels[:, :3] = -100
    kw = {"target": labels[:, 1:], "reduction": "batchmean", "native": in_float32(composite_kl)}
    assert_matches_torch("kl_div_with_logits", s[:, :-1], t[:, :-1], **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_out_dtype_mixed_dtypes_and_autocast(device):
    s = logits((6, 50), torch.bfloat16, device)
    t = logits((6, 50), torch.bfloat16, device, requires_grad=False)
    exact = composite_kl(s.detach().double(), t.double(), temperature=2.0)
    out = FF.kl_div_with_logits(s, t, temperature=2.0, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)
    # autocast: torch's composite (log_softmax, kl_div) is fp32; so is fusedloss's loss
    with torch.autocast(device, torch.bfloat16):
        ours = FF.kl_div_with_logits(s, t, temperature=2.0)
        theirs = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="batchmean")
        assert FF.jsd_with_logits(s, t).dtype == torch.float32
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-6)
    assert torch.autograd.grad(ours, s)[0].dtype == torch.bfloat16
    # teacher in fp32, student in bf16: promoted, as torch's composite
    t32 = t.float()
    assert FF.kl_div_with_logits(s, t32).dtype == torch.float32
    assert_matches_torch("kl_div_with_logits", s, t32, native=composite_kl)


def _error_cases():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    return {
        "shape mismatch": ((s, t[:, :3]), {}, "must have the same shape"),
        "bad reduction": ((s, t), {"reduction": "avg"}, "avg is not a valid value for reduction"),
        "zero temperature": ((s, t), {"temperature": 0.0}, "temperature must be a positive number"),
        "negative temperature": ((s, t), {"temperature": -1.0}, "temperature must be a positive number"),
        "beta above 1": ((s, t), {"beta": 1.5}, "beta must be in"),
        "float target": ((s, t), {"target": torch.zeros(4)}, "integer class indices"),
        "target shape": ((s, t), {"target": torch.zeros(5, dtype=torch.long)}, "leading shape"),
        "0-d logits": ((torch.tensor(1.0), torch.tensor(1.0)), {}, "class dimension"),
    }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_errors(case):
    args, kwargs, message = _error_cases()[case]
    with pytest.raises(ValueError, match=message):
        FF.jsd_with_logits(*args, **kwargs)
    if "beta" not in kwargs:
        with pytest.raises(ValueError, match=message):
            FF.kl_div_with_logits(*args, **kwargs)


@pytest.mark.parametrize("reduction", DISTILL_REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_gradcheck_and_gradgradcheck(reduction, beta):
    s = make((3, 2, 7), torch.float64, "cpu", -3, 3, requires_grad=True)
    t = make((3, 2, 7), torch.float64, "cpu", -3, 3, requires_grad=True)
    target = torch.tensor([[1, -100], [2, 3], [-100, 4]])
    fn = lambda a, b: FF.jsd_with_logits(  # noqa: E731
        a, b, beta=beta, temperature=1.7, target=target, reduction=reduction
    )
    assert torch.autograd.gradcheck(
        fn, (s, t), check_forward_ad=True, check_batched_grad=True, check_undefined_grad=True
    )
    assert torch.autograd.gradgradcheck(fn, (s, t), gen_non_contig_grad_outputs=True)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_comparison_catches_a_wrong_gradient(which, beta):
    def wrong(a, b, **kw):
        args = [a, b]
        args[which] = _ScaleGradient.apply(args[which], 1.03)
        return FF.jsd_with_logits(*args, **kw)

    s, t = logits((8, 300), torch.bfloat16, "cpu", 4), logits((8, 300), torch.bfloat16, "cpu", 4)
    kw = {"beta": beta, "reduction": "none", "native": in_float32(composite_jsd)}
    assert_matches_torch("jsd_with_logits", s, t, **kw)
    with pytest.raises(AssertionError, match=f"grad arg{which}"):
        assert_matches_torch("jsd_with_logits", s, t, fused=wrong, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_modules(device):
    m = fusedloss.nn.KLDivWithLogitsLoss(temperature=2.0, ignore_index=0)
    assert repr(m) == "KLDivWithLogitsLoss(temperature=2.0, reduction='batchmean', ignore_index=0)"
    j = fusedloss.nn.JSDWithLogitsLoss(beta=0.25, reduction="sum")
    assert repr(j) == "JSDWithLogitsLoss(beta=0.25, temperature=1.0, reduction='sum', ignore_index=-100)"
    assert dict(m.state_dict()) == {} and dict(j.state_dict()) == {}
    s, t = logits((5, 20), torch.float32, device), logits((5, 20), torch.float32, device)
    target = torch.tensor([0, 1, 2, 0, 3], device=device)
    torch.testing.assert_close(
        m(s, t, target), FF.kl_div_with_logits(s, t, temperature=2.0, ignore_index=0, target=target)
    )
    torch.testing.assert_close(j(s, t), FF.jsd_with_logits(s, t, beta=0.25, reduction="sum"))


def test_thread_count_invariance_and_repeatability():
    s = logits((67, 5003), torch.float32, "cpu")
    t = logits((67, 5003), torch.bfloat16, "cpu").float()
    n = torch.get_num_threads()

    def run(beta):
        out = FF.jsd_with_logits(s, t, beta=beta, temperature=1.3)
        return (out.detach(), *torch.autograd.grad(out, (s, t)))

    try:
        for beta in (0.0, 0.5):
            torch.set_num_threads(1)
            one = run(beta)
            torch.set_num_threads(max(n, 2))
            for got in [run(beta) for _ in range(3)]:
                assert all(torch.equal(a, b) for a, b in zip(got, one, strict=True))
    finally:
        torch.set_num_threads(n)


def test_verify_cases_of_the_new_losses_pass():
    # What `python -m fusedloss verify --quick` runs for focal, multilabel soft
    # margin and distillation (the references of fusedloss.testing).
    from fusedloss.__main__ import new_loss_verify_cases

    names = set()
    for _label, name, args, kwargs in new_loss_verify_cases("cpu", quick=True):
        assert_matches_torch(name, *args, **kwargs)
        names.add(name)
    assert names == {"sigmoid_focal_loss", "multilabel_soft_margin_loss", "kl_div_with_logits", "jsd_with_logits"}


def test_distillation_reference_is_torchs_kl_div():
    from fusedloss.testing import reference

    s, t = make((6, 40), torch.float64, "cpu"), make((6, 40), torch.float64, "cpu")
    ref = F.kl_div(F.log_softmax(s / 3, -1), F.log_softmax(t / 3, -1), log_target=True, reduction="batchmean") * 9
    torch.testing.assert_close(reference("kl_div_with_logits")(s, t, temperature=3.0), ref)
    torch.testing.assert_close(reference("jsd_with_logits")(s, t, beta=0.0, temperature=3.0), ref)


def test_torch_func_transforms():
    # vmap and grad run the composite (the kernels have no batching rules).
    x, y = make((4, 6, 7), torch.float64, "cpu"), make((4, 6, 7), torch.float64, "cpu")
    target = torch.randint(0, 7, (4, 6))
    target[0, 0] = -100
    batched = torch.func.vmap(lambda u, v, w: FF.kl_div_with_logits(u, v, target=w, temperature=2.0))(x, y, target)
    looped = torch.stack([FF.kl_div_with_logits(x[i], y[i], target=target[i], temperature=2.0) for i in range(4)])
    torch.testing.assert_close(batched, looped)
    u = x[0].clone().requires_grad_()
    (expected,) = torch.autograd.grad(FF.jsd_with_logits(u, y[0], beta=0.3), u)
    torch.testing.assert_close(torch.func.grad(lambda v: FF.jsd_with_logits(v, y[0], beta=0.3))(x[0]), expected)
