"""Vocabulary-parallel linear cross entropy (fusedloss.distributed.vocab_parallel_linear_cross_entropy).

Each rank holds rows [start, start + V_local) of the head's weight (and
bias) and the same hidden states and targets; the loss must equal
single-process ``fusedloss.functional.linear_cross_entropy`` of the
concatenated weight, the weight and bias gradients must be its row slices, and
the hidden states' gradients of the ranks must sum to its input gradient (each
rank's is the part from its classes: the column-parallel layer's backward
all-reduces it, not the loss). Even and uneven splits, an empty slice, 2/3/4
spawned gloo ranks, ignore_index inside every slice and outside all,
all-ignored batches, fp64/fp32/bf16, several chunks per batch; exactly two
collectives per forward and none in the backward; a column-parallel training
loop against single-process training; torch's errors.

Accuracy rule, per element against a float64 computation (linear then cross
entropy, in float64, on the same rounded inputs: "the oracle"):
  loss: as tests/test_distributed.py (fp32: single-process fusedloss's own
    distance + 4 ulp; bf16: 2 bf16 ulp beyond it; fp64: 1e-12 relative).
  gradients (GEMM outputs: sums over classes for the input, over rows for
    the weight and bias): no farther from the oracle than single-process
    fusedloss is, plus k u S, where S is the element's sum of absolute terms
    with each logit gradient weighted by (4 + |x_c - lse|) -- the
    per-logit allowance of vocab_parallel_cross_entropy's rule, carried
    through the GEMM -- and k u = 4 * 2^-24 (fp32), 2 * 2^-8 (bf16), 1e-12
    (fp64). The sums are added in another order than in one process (per
    slice, then over ranks) and the logits' gradient may differ in its last
    bits; measured here the excess stays under 2.5 u S in fp32. A mutation
    test shows the rule catches a wrong target term and a missing rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_distributed import OPTIONS, SPLITS, Collectives, _CopyToTensorParallel, _opts, _starts, spawn

import fusedloss.functional as FF
from fusedloss.testing import assert_as_accurate_as_torch, ulp

ops = torch.ops.fusedloss
REDS = ("none", "mean", "sum")
_RED = {"none": 0, "mean": 1, "sum": 2}
_GRAD_K = {torch.float64: 1e-12, torch.float32: 4 * 2.0**-24, torch.bfloat16: 2 * 2.0**-8}

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed with gloo")


# ---------------------------------------------------------------------------
# References and the accuracy rule


def _single(x, W, b, t, g, opts):
    """Single-process fusedloss of the whole head: (loss, grad x, grad W, grad b)."""
    xr, Wr = x.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    br = None if b is None else b.detach().clone().requires_grad_()
    loss = FF.linear_cross_entropy(xr, Wr, t, linear_bias=br, **opts)
    loss.backward(g.to(loss.dtype))
    return loss.detach(), xr.grad, Wr.grad, None if br is None else br.grad


def _oracle(x, W, b, t, g, opts):
    """linear then torch's cross entropy ops (fusedloss's composite) in float64:
    (loss, grad x, grad W, grad b) and the rule's scales S of each gradient."""
    o = dict(opts)
    red = _RED[o.pop("reduction", "mean")]
    w = o.pop("weight", None)
    cap = o.get("softcap")
    xr, Wr = x.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    br = None if b is None else b.detach().double().requires_grad_()
    logits = xr @ Wr.T
    if br is not None:
        logits = logits + br
    logits.retain_grad()
    loss = ops.cross_entropy_composite(
        logits, t, None if w is None else w.double(), o.pop("ignore_index", -100), red, o.pop("label_smoothing", 0.0),
        o.pop("lse_square_scale", 0.0), o.pop("softcap", None),
    )  # fmt: skip
    loss.backward(g.double())
    z = logits.detach()
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    d = (4 + (z - torch.logsumexp(z, 1, keepdim=True)).abs()) * logits.grad.abs()
    d = torch.nan_to_num(d)
    scales = (d @ Wr.detach().abs(), d.T @ xr.detach().abs(), d.sum(0))
    return (loss.detach(), xr.grad, Wr.grad, None if br is None else br.grad), scales


def check_loss(actual, single, oracle, dtype):
    if dtype == torch.bfloat16:
        assert_as_accurate_as_torch(actual, single, oracle, "loss")
        return
    a, s, o = actual.double(), single.double(), oracle.double()
    assert torch.equal(a.isnan(), o.isnan()), (a, o)
    fin = o.isfinite()
    slack = 1e-12 * o.abs() + 1e-15 if dtype == torch.float64 else 4 * ulp(o, torch.float32)
    bad = fin & ~((a - o).abs() <= (s - o).abs() + slack)
    assert not bad.any(), f"loss ({dtype}): {a[bad].tolist()} vs float64 {o[bad].tolist()} (single {s[bad].tolist()})"


def check_grad(name, actual, single, oracle, scale, dtype):
    assert actual.shape == oracle.shape, (name, actual.shape, oracle.shape)
    a, s, o = actual.double(), single.double(), oracle.double()
    assert torch.equal(a.isnan(), o.isnan()), (name, a, o)
    fin = o.isfinite()
    err = torch.where(fin, (a - o).abs(), 0)
    bound = (s - o).abs() + _GRAD_K[dtype] * scale + 1e-30
    bad = fin & ~(err <= bound)
    if bad.any():
        i = int(torch.where(bad.reshape(-1), (err - bound).reshape(-1), -1).argmax())
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())} of {bad.numel()} elements out of bound; worst at {i}: "
            f"{a.reshape(-1)[i].item():.9g} vs float64 {o.reshape(-1)[i].item():.9g} (single-process "
            f"{s.reshape(-1)[i].item():.9g}), bound {bound.reshape(-1)[i].item():.3g}"
        )


def check_case(loss, gx, gW, gb, x, W, b, t, g, opts, dtype):
    """loss, the summed input gradient, the concatenated weight and bias
    gradients against single-process fusedloss and the float64 oracle."""
    single = _single(x, W, b, t, g, opts)
    oracle, scales = _oracle(x, W, b, t, g, opts)
    check_loss(loss, single[0], oracle[0], dtype)
    check_grad("grad input (sum over ranks)", gx, single[1], oracle[1], scales[0], dtype)
    check_grad("grad weight", gW, single[2], oracle[2], scales[1], dtype)
    if b is not None:
        check_grad("grad bias", gb, single[3], oracle[3], scales[2], dtype)
    ii = opts.get("ignore_index", -100)
    if (t == ii).all():
        assert gx.eq(0).all() and gW.eq(0).all() and (gb is None or gb.eq(0).all())


# ---------------------------------------------------------------------------
# Simulated groups: every rank's ops in one process.


def simulate(x, W, b, t, sizes, g, opts, chunk=0):
    """The linear ops of each rank, with torch.amax / sum in place of the two
    collectives: (loss, input gradient summed over ranks in float64, the
    per-rank input gradients, weight gradient, bias gradient)."""
    o = dict(opts)
    red = _RED[o.get("reduction", "mean")]
    w, ii = o.get("weight"), o.get("ignore_index", -100)
    eps, z, cap = o.get("label_smoothing", 0.0), o.get("lse_square_scale", 0.0), o.get("softcap")
    starts = _starts(sizes)
    Ws = torch.split(W, sizes, 0)
    bs = [None] * len(sizes) if b is None else torch.split(b, sizes, 0)
    loc = [
        ops.vocab_parallel_linear_ce_local(x, Wi, t, bi, w, s, ii, eps, cap, chunk)
        for Wi, bi, s in zip(Ws, bs, starts, strict=True)
    ]
    gmax = torch.stack([m for m, _, _ in loc]).amax(0)
    packed = torch.stack([ops.vocab_parallel_ce_rebase(p, m, gmax, mass) for m, p, mass in loc]).sum(0)
    loss, state, stats = ops.vocab_parallel_ce_finalize(packed, gmax, t, w, ii, red, eps, z, x.dtype)
    grads = [
        ops.vocab_parallel_linear_ce_backward(
            g.to(loss.dtype), x, Wi, t, bi, w, state, stats, s, ii, red, eps, z, cap, chunk, [True, True, True]
        )
        for Wi, bi, s in zip(Ws, bs, starts, strict=True)
    ]
    parts = [gi for gi, _, _ in grads]
    gW = torch.cat([gw for _, gw, _ in grads])
    gb = None if b is None else torch.cat([gbi for _, _, gbi in grads])
    return loss, torch.stack([p.double() for p in parts]).sum(0), parts, gW, gb


def _inputs(N, D, V, dtype, seed, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64).to(dtype)
    W = (torch.randn(V, D, generator=gen, dtype=torch.float64) * 0.6).to(dtype)
    b = (torch.randn(V, generator=gen, dtype=torch.float64)).to(dtype) if bias else None
    t = torch.randint(0, V, (N,), generator=gen)
    return x, W, b, t, gen


def _grad_out(opts, N, gen, dtype):
    if opts.get("reduction", "mean") == "none":
        return torch.randn(N, generator=gen, dtype=torch.float64).to(dtype)
    return torch.tensor(0.75, dtype=dtype)


@pytest.fixture
def one_thread():
    """The batteries run on one thread: they are about the math (the thread
    count's independence has its own test), and on a loaded 2-core machine
    each OpenMP region of the tiled CPU GEMMs can wait milliseconds for a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", [[12, 12], [5, 0, 19], [1, 9, 3, 11]], ids=["even", "empty", "uneven"])
def test_simulated_group_matches_single_process(dtype, sizes, one_thread):
    V = sum(sizes)
    for k, spec in enumerate(OPTIONS):
        for j, ii in enumerate((-100, 0, V - 1, sizes[0] + 1)):
            x, W, b, t, gen = _inputs(11, 16, V, dtype, seed=100 * k + j, bias=(k + j) % 2 == 0)
            t[1] = ii if ii >= 0 else t[1]
            t[4] = ii
            opts = {**_opts(spec, V, gen, dtype), "ignore_index": ii}
            g = _grad_out(opts, 11, gen, dtype)
            loss, gx, _, gW, gb = simulate(x, W, b, t, sizes, g, opts, chunk=(0, 4, 3, 11)[j])
            check_case(loss, gx, gW, gb, x, W, b, t, g, opts, dtype)


def _chunk_rows(N, chunk):
    """csrc lce_chunk_rows for a given chunk size: evened out over the chunks."""
    chunks = -(-N // min(chunk, N))
    return -(-N // chunks)


def test_simulated_chunks_give_the_logits_ops_bits():
    """The chunked local pass writes, row for row, the bits of the logits op
    on the same chunks' logits (the GEMM's bits depend on its shape, so the
    reference computes them chunk by chunk too); the results do not depend on
    the thread count."""
    x, W, b, t, gen = _inputs(13, 24, 40, torch.float32, seed=5)
    t[3] = -100
    w = torch.rand(40, generator=gen) + 0.5
    threads = torch.get_num_threads()
    for chunk in (1, 5, 13):
        rows = _chunk_rows(13, chunk)
        torch.set_num_threads(1)  # as each GEMM tile runs (csrc/cpu/linear_cross_entropy.cpp)
        try:
            logits = torch.cat([torch.addmm(b[10:30], xc, W[10:30].T) for xc in torch.split(x, rows)])
        finally:
            torch.set_num_threads(threads)
        for eps in (0.0, 0.1):
            ref = ops.vocab_parallel_ce_local(logits, t, w, 10, -100, eps, 4.0)
            got = ops.vocab_parallel_linear_ce_local(x, W[10:30], t, b[10:30], w, 10, -100, eps, 4.0, chunk)
            for r, a in zip(ref, got, strict=True):
                assert torch.equal(r, a), (eps, chunk)
    opts = {"label_smoothing": 0.1, "weight": w, "reduction": "none"}
    g = torch.randn(13, generator=gen)
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(simulate(x, W, b, t, [15, 25], g, opts, chunk=4))
    finally:
        torch.set_num_threads(threads)
    for i in (0, 1, 3, 4):
        assert torch.equal(runs[0][i], runs[1][i]), i


def test_simulated_all_ignored_and_empty():
    x, W, b, t, _ = _inputs(4, 8, 10, torch.float32, seed=2)
    t[:] = 3
    for red in REDS:
        g = torch.ones(4) if red == "none" else torch.tensor(1.0)
        loss, gx, parts, gW, gb = simulate(x, W, b, t, [6, 4], g, {"ignore_index": 3, "reduction": red}, chunk=3)
        ref = torch.nn.functional.cross_entropy(x @ W.T + b, t, ignore_index=3, reduction=red)
        torch.testing.assert_close(loss, ref, equal_nan=True)  # mean: NaN, as torch
        assert gx.eq(0).all() and gW.eq(0).all() and gb.eq(0).all()
    x = torch.empty(0, 8)
    loss, gx, _, gW, gb = simulate(
        x, W, b, torch.empty(0, dtype=torch.long), [6, 4], torch.tensor(1.0), {"reduction": "sum"}
    )
    assert loss.item() == 0 and gx.shape == (0, 8) and gW.eq(0).all() and gb.eq(0).all()


def test_simulated_bf16_accumulates_the_weight_gradient_in_fp32(one_thread):
    """16 chunks of bf16: the weight and bias gradients are summed over the
    chunks in fp32 and rounded once, so they are within 1 bf16 ulp of one
    GEMM over the whole batch (one chunk), where a running bf16 sum of the
    chunks' gradients is not."""
    x, W, b, t, gen = _inputs(64, 16, 30, torch.bfloat16, seed=9)
    g = torch.tensor(1.0, dtype=torch.bfloat16)
    opts = {"reduction": "sum"}
    loss, gx, _, gW, gb = simulate(x, W, b, t, [14, 16], g, opts, chunk=4)
    check_case(loss, gx, gW, gb, x, W, b, t, g, opts, torch.bfloat16)
    _, _, _, whole_W, whole_b = simulate(x, W, b, t, [14, 16], g, opts)
    for got, whole in ((gW, whole_W), (gb, whole_b)):
        assert ((got.double() - whole.double()).abs() <= ulp(whole, torch.bfloat16)).all()
    running = torch.zeros_like(gW)
    for r0 in range(0, 64, 4):  # with 'sum', each row's gradient is its own
        running += simulate(x[r0 : r0 + 4], W, b, t[r0 : r0 + 4], [14, 16], g, opts)[3]
    assert not ((running.double() - whole_W.double()).abs() <= ulp(whole_W, torch.bfloat16)).all()


def test_mutation_is_caught():
    """The rule catches a target term applied twice in the weight gradient,
    and an input gradient missing a rank's part (not summed over the group)."""
    x, W, b, t, gen = _inputs(8, 12, 24, torch.float32, seed=7)
    g = torch.tensor(1.0)
    loss, gx, parts, gW, gb = simulate(x, W, b, t, [10, 14], g, {}, chunk=3)
    check_case(loss, gx, gW, gb, x, W, b, t, g, {}, torch.float32)
    twice = gW.clone()
    twice.index_add_(0, t, -x / 8)  # (1 - eps) w_t g / N times x, once more
    with pytest.raises(AssertionError):
        check_case(loss, gx, twice, gb, x, W, b, t, g, {}, torch.float32)
    with pytest.raises(AssertionError):
        check_case(loss, parts[1].double(), gW, gb, x, W, b, t, g, {}, torch.float32)


# ---------------------------------------------------------------------------
# Spawned gloo groups


def _cases(world):
    for sizes in SPLITS[world]:
        V, starts = sum(sizes), _starts(sizes)
        ignores = [-100] + [s + sz // 2 for s, sz in zip(starts, sizes, strict=True) if sz]
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            for k, spec in enumerate(OPTIONS[:8] if dtype == torch.float32 else OPTIONS[::3]):
                yield sizes, V, dtype, spec, ignores[k % len(ignores)], 1000 * k + len(sizes), k % 2 == 0


def _vpl_worker(rank, world):
    import fusedloss.distributed as FD

    out = {"losses": [], "failures": [], "cases": 0, "calls": set()}
    for sizes, V, dtype, spec, ii, seed, bias in _cases(world):
        x, W, b, t, gen = _inputs(10, 12, V, dtype, seed, bias=bias)
        t[2] = ii
        opts = {**_opts(spec, V, gen, dtype), "ignore_index": ii}
        g = _grad_out(opts, 10, gen, dtype)
        start, size = _starts(sizes)[rank], sizes[rank]
        xl = x.clone().requires_grad_()
        Wl = W[start : start + size].clone().requires_grad_()
        bl = None if b is None else b[start : start + size].clone().requires_grad_()
        with Collectives() as fwd:
            loss = FD.vocab_parallel_linear_cross_entropy(
                xl, Wl, t, vocab_start_index=start, linear_bias=bl, chunk_size=4, **opts
            )
        with Collectives() as bwd:
            loss.backward(g)
        fields = 3 if opts.get("label_smoothing", 0) > 0 else 2
        acc = 8 if dtype == torch.float64 else 4
        out["calls"].add(
            (tuple(fwd.calls) == (("all_reduce", acc * 10), ("all_reduce", acc * (fields * 10 + 1))))
            and fwd.backend == 2
            and bwd.calls == []
            and bwd.backend == 0
        )
        # The column-parallel layer's all_reduce, here: the parts' sum.
        gx = xl.grad.double()
        dist.all_reduce(gx)
        try:
            single = _single(x, W, b, t, g, opts)
            oracle, scales = _oracle(x, W, b, t, g, opts)
            check_loss(loss.detach(), single[0], oracle[0], dtype)
            check_grad("grad input (sum over ranks)", gx, single[1], oracle[1], scales[0], dtype)
            rows = slice(start, start + size)
            check_grad("grad weight", Wl.grad, single[2][rows], oracle[2][rows], scales[1][rows], dtype)
            if b is not None:
                check_grad("grad bias", bl.grad, single[3][rows], oracle[3][rows], scales[2][rows], dtype)
        except AssertionError as e:
            out["failures"].append(f"{sizes} {dtype} {spec} bias={bias} ignore_index={ii}: {e}")
        out["losses"].append(loss.detach().double().reshape(-1).tolist())
        out["cases"] += 1
    out.update(_default_offsets_and_ignored(rank, world))
    if world == 2:
        out.update(_training_and_errors(rank, world))
    if world == 4:
        out.update(_subgroups(rank))
    return out


def _subgroups(rank):
    """Two groups of two ranks ([0, 1] and [2, 3]), each with its own head
    split unevenly: the default offsets are gathered per group, and each
    forward runs its two collectives on its group only."""
    import fusedloss.distributed as FD

    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group, pair, member = groups[rank // 2], rank // 2, rank % 2
    sizes = [(7, 10), (12, 3)][pair]
    x, W, b, t, _ = _inputs(6, 8, sum(sizes), torch.float64, seed=40 + pair)
    start = _starts(list(sizes))[member]
    rows = slice(start, start + sizes[member])
    xl, Wl, bl = x.clone().requires_grad_(), W[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
    FD.vocab_parallel_linear_cross_entropy(xl, Wl, t, group=group, linear_bias=bl)  # gathers the offsets
    with Collectives(group) as c:
        loss = FD.vocab_parallel_linear_cross_entropy(xl, Wl, t, group=group, linear_bias=bl, label_smoothing=0.1)
    loss.backward()
    gx = xl.grad.clone()
    dist.all_reduce(gx, group=group)
    ref = _single(x, W, b, t, torch.tensor(1.0, dtype=torch.float64), {"label_smoothing": 0.1})

    def close(a, e):
        return bool(torch.allclose(a, e, rtol=1e-12, atol=1e-15))

    return {
        "subgroup": (
            [n for n, _ in c.calls],
            c.backend,
            FD.vocab_offsets(sizes[member], group),
            close(loss, ref[0]) and close(gx, ref[1]) and close(Wl.grad, ref[2][rows]) and close(bl.grad, ref[3][rows]),
        )
    }


def _default_offsets_and_ignored(rank, world):
    """The default vocab_start_index (one all_gather on the first call per
    group, then two all_reduces per forward) and all-ignored batches."""
    import fusedloss.distributed as FD

    FD.clear_vocab_offsets()
    sizes = SPLITS[world][1]
    x, W, b, t, _ = _inputs(5, 6, sum(sizes), torch.float32, seed=11)
    start = _starts(sizes)[rank]
    Wl = W[start : start + sizes[rank]]
    counts = []
    for _ in range(3):
        with Collectives() as c:
            loss = FD.vocab_parallel_linear_cross_entropy(x, Wl, t)
        counts.append(([n for n, _ in c.calls], c.backend))
    ignored = []
    for red in REDS:
        xi, Wi = x.clone().requires_grad_(), Wl.clone().requires_grad_()
        li = FD.vocab_parallel_linear_cross_entropy(xi, Wi, torch.full((5,), 2), ignore_index=2, reduction=red)
        li.sum().backward()
        total = li.detach().sum()
        ignored.append((bool(total.isnan()), float(total) if red != "mean" else 0.0,
                        bool(xi.grad.eq(0).all() and Wi.grad.eq(0).all())))  # fmt: skip
    return {
        "default_counts": counts,
        "default_loss_ok": bool(torch.allclose(loss, FF.linear_cross_entropy(x, W, t), rtol=1e-6, atol=0)),
        "all_ignored": ignored,
    }


def _training(head_sizes, rank, steps=6):
    """A replicated trunk and a column-parallel head with bias (rank `rank`
    holds its rows [start, start + size)), or the whole head in one process
    (rank None), trained by SGD."""
    import fusedloss.distributed as FD

    torch.manual_seed(0)
    D, H, V, N = 10, 16, sum(head_sizes), 32
    trunk = torch.nn.Linear(D, H)
    head = torch.nn.Parameter(torch.randn(V, H) * 0.3)
    bias = torch.nn.Parameter(torch.randn(V) * 0.1)
    if rank is not None:
        rows = slice(_starts(head_sizes)[rank], _starts(head_sizes)[rank] + head_sizes[rank])
        head = torch.nn.Parameter(head.detach()[rows].clone())
        bias = torch.nn.Parameter(bias.detach()[rows].clone())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=gen)
    t = torch.randint(0, V, (N,), generator=gen)
    t[:3] = -100
    opt = torch.optim.SGD([*trunk.parameters(), head, bias], lr=0.5)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        h = torch.tanh(trunk(x))
        if rank is None:
            loss = FF.linear_cross_entropy(h, head, t, linear_bias=bias, label_smoothing=0.1)
        else:
            h = _CopyToTensorParallel.apply(h)  # the column-parallel layer: all_reduce of grad_input
            loss = FD.vocab_parallel_linear_cross_entropy(h, head, t, linear_bias=bias, label_smoothing=0.1,
                                                          chunk_size=8)  # fmt: skip
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _training_and_errors(rank, world):
    import fusedloss.distributed as FD

    FD.clear_vocab_offsets()  # the training's head is sharded [23, 27]
    seen = {"tp": _training([23, 27], rank), "single": _training([23, 27], None)}
    x, W = torch.randn(4, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True)
    t = torch.tensor([0, 3, 9, 1])
    start = 5 * rank

    def catch(name, fn):
        try:
            fn()
            seen[name] = "no error"
        except Exception as e:  # noqa: BLE001 - recorded and compared by the parent
            seen[name] = f"{type(e).__name__}: {e}"

    vpl = FD.vocab_parallel_linear_cross_entropy
    catch("reduction", lambda: vpl(x, W, t, vocab_start_index=start, reduction="avg"))
    catch("smoothing", lambda: vpl(x, W, t, vocab_start_index=start, label_smoothing=1.5))
    catch("int_target", lambda: vpl(x, W, t.int(), vocab_start_index=start))
    catch("batch", lambda: vpl(x, W, t[:3], vocab_start_index=start))
    catch("prob_target", lambda: vpl(x, W, torch.rand(4, 10), vocab_start_index=start))
    catch("input_dim", lambda: vpl(x.unsqueeze(0), W, t, vocab_start_index=start))
    catch("features", lambda: vpl(x, W[:, :5], t, vocab_start_index=start))
    catch("bias_shape", lambda: vpl(x, W, t, vocab_start_index=start, linear_bias=torch.zeros(6)))
    catch("weight_dtype", lambda: vpl(x, W.double(), t, vocab_start_index=start))
    catch("chunk_size", lambda: vpl(x, W, t, vocab_start_index=start, chunk_size=0))
    catch("weight_short", lambda: vpl(x, W, t, vocab_start_index=start, weight=torch.ones(7)))
    catch("out_of_range", lambda: vpl(x, W, torch.tensor([0, 3, 10, 1]), vocab_start_index=start))
    # Second derivatives (create_graph=True) of every operand, against one process.
    gen = torch.Generator().manual_seed(3)
    xf = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    Wf, bf = torch.randn(10, 6, generator=gen, dtype=torch.float64), torch.randn(10, generator=gen, dtype=torch.float64)
    kw = {"weight": torch.rand(10, generator=gen).double() + 0.5, "ignore_index": 3, "label_smoothing": 0.1}
    mine = slice(start, start + 5)
    xl, Wl, bl = xf.clone().requires_grad_(), Wf[mine].clone().requires_grad_(), bf[mine].clone().requires_grad_()
    grads = torch.autograd.grad(vpl(xl, Wl, t, vocab_start_index=start, linear_bias=bl, **kw), (xl, Wl, bl),
                                create_graph=True)  # fmt: skip
    xs, Ws, bs = xf.clone().requires_grad_(), Wf.clone().requires_grad_(), bf.clone().requires_grad_()
    ref = torch.autograd.grad(FF.linear_cross_entropy(xs, Ws, t, linear_bias=bs, **kw), (xs, Ws, bs), create_graph=True)
    gx = grads[0].detach().clone()
    dist.all_reduce(gx)
    seen["create_graph"] = (
        bool(torch.allclose(gx, ref[0], rtol=1e-12, atol=1e-15)),
        bool(torch.allclose(grads[1], ref[1][mine], rtol=1e-12, atol=1e-15)),
        bool(torch.allclose(grads[2], ref[2][mine], rtol=1e-12, atol=1e-15)),
    )
    # A Hessian-vector product through the weight gradient: the sum over ranks
    # of each rank's (grad_W_local . v_local) is the global one.
    v = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    (hv,) = torch.autograd.grad((grads[1] * v[mine]).sum(), Wl)
    (hvs,) = torch.autograd.grad((ref[1] * v).sum(), Ws)
    seen["hvp"] = bool(torch.allclose(hv, hvs[mine], rtol=1e-10, atol=1e-13))
    # torch.compile(fullgraph=True) traces it and gives eager's results.
    f = lambda a, w: vpl(a, w, t, vocab_start_index=start, label_smoothing=0.1, chunk_size=3)
    xc, Wc = x.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    xe, We = x.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    lc, le = torch.compile(f, backend="aot_eager", fullgraph=True)(xc, Wc), f(xe, We)
    lc.backward()
    le.backward()
    seen["compiled"] = (
        bool(torch.equal(lc, le)),
        bool(torch.equal(xc.grad, xe.grad)),
        bool(torch.equal(Wc.grad, We.grad)),
    )
    # Unbatched (D,) input with a 0-d target equals a batch of one.
    un = vpl(x[1], W, t[1], vocab_start_index=start, reduction="none")
    one = vpl(x[1:2], W, t[1:2], vocab_start_index=start, reduction="none")
    seen["unbatched"] = (un.shape == (), bool(torch.equal(un, one[0])))
    # Autocast: the operands in bf16, as torch's linear; an fp32 loss.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        la = vpl(x, W, t, vocab_start_index=start)
    lb = vpl(x.bfloat16(), W.bfloat16(), t, vocab_start_index=start, out_dtype=torch.float32)
    seen["autocast"] = (str(la.dtype), bool(torch.equal(la, lb)))
    seen["memory_mb"] = _peak_memory_mb(rank)
    return seen


def _peak_memory_mb(rank):
    """Growth of this rank's peak resident set over a forward and backward of
    2048 x 16000 local logits (131 MB in fp32, never allocated)."""
    import fusedloss.distributed as FD
    from fusedloss.benchmark import reset_peak_rss, rss_mb

    N, D, V_local = 2048, 64, 16000
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(N, D, generator=gen, requires_grad=True)
    W = (torch.randn(V_local, D, generator=gen) / 8).requires_grad_()
    t = torch.randint(0, 2 * V_local, (N,), generator=gen)
    reset_peak_rss()
    base = rss_mb()
    FD.vocab_parallel_linear_cross_entropy(x, W, t, vocab_start_index=rank * V_local).backward()
    return rss_mb("VmHWM") - base


@pytest.mark.parametrize("world", [2, 3, 4])
def test_vocab_parallel_linear_over_gloo(world):
    res = spawn(_vpl_worker, world)
    for r in res:
        assert not r["failures"], "\n".join(r["failures"][:5])
        assert r["cases"] == res[0]["cases"] > 0
        assert r["calls"] == {True}  # 2 all_reduces of 12N + 4 (16N + 4) bytes forward, none backward
        assert r["losses"] == res[0]["losses"]  # the same loss bits on every rank
        gather = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
        assert (
            r["default_counts"] == [([gather, "all_reduce", "all_reduce"], 3)] + [(["all_reduce", "all_reduce"], 2)] * 2
        )
        assert r["default_loss_ok"]
        assert r["all_ignored"] == [(False, 0.0, True), (True, 0.0, True), (False, 0.0, True)]
    if world == 4:
        for rank, r in enumerate(res):
            sizes = [(7, 10), (12, 3)][rank // 2]
            start = sizes[0] if rank % 2 else 0
            assert r["subgroup"] == (["all_reduce", "all_reduce"], 2, (start, sum(sizes)), True), (rank, r["subgroup"])
    if world != 2:
        return
    e0, e1 = res
    # Training: the same loss bits on both ranks, single-process's curve.
    assert e0["tp"] == e1["tp"]
    torch.testing.assert_close(torch.tensor(e0["tp"]), torch.tensor(e0["single"]), rtol=2e-6, atol=0)
    assert e0["tp"][-1] < e0["tp"][0]
    assert e1["weight_short"].startswith("RuntimeError: weight tensor should be defined either for all classes")
    assert e0["weight_short"].startswith("RuntimeError: vocab_parallel_cross_entropy: another rank of the group")
    for e in res:
        assert e["reduction"] == "ValueError: avg is not a valid value for reduction"
        assert e["smoothing"] == "RuntimeError: label_smoothing must be between 0.0 and 1.0. Got: 1.5"
        assert e["int_target"] == "RuntimeError: expected target dtype to be Long or Byte, but got Int"
        assert e["batch"] == "ValueError: Expected input batch_size (4) to match target batch_size (3)."
        assert e["prob_target"].startswith("NotImplementedError: vocab_parallel_linear_cross_entropy: class-prob")
        assert e["input_dim"] == "RuntimeError: expected input with dimensionality 1 or 2, got 3"
        assert e["features"] == (
            "RuntimeError: expected equal input and linear_weight last dimensions (in_features), got 6 and 5, "
            "respectively"
        )
        assert e["bias_shape"] == "RuntimeError: expected linear_bias shape (5,), got (6,)"
        assert e["weight_dtype"].startswith("RuntimeError: vocab_parallel_linear_cross_entropy: local_linear_weight")
        assert e["chunk_size"] == "ValueError: chunk_size must be a positive int or None, got 0"
        assert e["out_of_range"].startswith("IndexError: Target 10 is out of bounds.")
        assert e["create_graph"] == (True, True, True) and e["hvp"]
        assert e["compiled"] == (True, True, True)
        assert e["unbatched"] == (True, True)
        assert e["autocast"] == ("torch.float32", True)
        # The chunk (32 MiB) and the gradients (4 MB + 0.5 MB), not the 131 MB
        # of local logits.
        assert e["memory_mb"] < 80, e["memory_mb"]
