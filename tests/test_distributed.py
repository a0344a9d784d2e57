"""Vocabulary-parallel cross entropy (fusedloss.distributed) over torch.distributed.

Spawned gloo groups of 2, 3 and 4 CPU processes, each bounded in time: every
rank computes the loss of its slice of the same full logits, and the loss and
its slice of the gradient must equal single-process cross entropy of the full
logits (even and uneven splits, an empty slice, a slice holding no target,
every option, ignore_index inside every slice and outside all, all-ignored
batches, fp64/fp32/bf16), with exactly two collectives per forward (counted by
wrapping torch.distributed's functions) and none in the backward. Also: a
column-parallel training loop against single-process training, DTensor against
torch's loss_parallel(), torch's errors, and a mutation check showing that the
comparison catches a wrong gradient.

Accuracy rules (per element, against a float64 computation on the same
rounded inputs, "the oracle"):
  fp64: within 1e-12 relative.
  fp32: no farther from the oracle than single-process fusedloss is, plus
    4 ulp of the loss; for the gradient, plus (4 + |x_c - lse|) ulp of its
    softmax term g q_c a and 4 ulp of its smoothing term g eps/C w_c. The
    row sums are added in another order (per slice, then over ranks), so the
    log-sum-exp may differ in its last bit, and exp(x - lse) turns an ulp of
    the fp32 argument x - lse into |x - lse| ulp of q (single-process
    fusedloss and torch round the same way, at other elements).
  bf16: fusedloss.testing's element-wise rule (2 bf16 ulp beyond the error of
    single-process fusedloss, which rounds fp32 math once).

The same checks run in-process on simulated groups (the ops of every "rank"
called in one process, the collectives replaced by torch.amax / sum), which
cover the kernels quickly without processes.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedloss.functional as FF
from conftest import DEVICES, cuda_only
from fusedloss.testing import assert_as_accurate_as_torch, ulp

ops = torch.ops.fusedloss
REDS = ("none", "mean", "sum")

pytestmark = pytest.mark.skipif(
    not dist.is_available() or sys.platform != "linux", reason="needs torch.distributed with gloo"
)


# ---------------------------------------------------------------------------
# References and the accuracy rule


def _starts(sizes):
    return [sum(sizes[:i]) for i in range(len(sizes))]


def _single(x, t, g, opts, dtype=None):
    """Single-process fusedloss cross entropy of the full logits: (loss, grad)."""
    xr = x.detach().to(dtype or x.dtype).requires_grad_()
    loss = FF.cross_entropy(xr, t, **opts)
    loss.backward(g.to(loss.dtype))
    return loss.detach(), xr.grad


def _oracle(x, t, g, opts):
    """torch's own ops (fusedloss's composite: at::cross_entropy_loss plus
    softcap and z-loss) in float64 on the same rounded inputs."""
    o = dict(opts)
    red = {"none": 0, "mean": 1, "sum": 2}[o.pop("reduction", "mean")]
    w = o.pop("weight", None)
    xr = x.detach().double().requires_grad_()
    loss = ops.cross_entropy_composite(
        xr, t, None if w is None else w.double(), o.pop("ignore_index", -100), red, o.pop("label_smoothing", 0.0),
        o.pop("lse_square_scale", 0.0), o.pop("softcap", None),
    )  # fmt: skip
    assert not o, o
    loss.backward(g.double())
    return loss.detach(), xr.grad


def _grad_slack(x, t, g, opts):
    """Per element of an fp32 gradient: the rounding allowance of the rule in
    the module docstring, in float64."""
    xd = x.detach().double()
    cap = opts.get("softcap")
    slope = torch.ones_like(xd)
    if cap is not None:
        xd = cap * torch.tanh(xd / cap)
        slope = 1 - (xd / cap) ** 2
    V = xd.shape[1]
    lse = torch.logsumexp(xd, 1, keepdim=True)
    # CUDA's exp is the hardware's (numerics.h: 2 + 1.2 |y| ulp), in both
    # the single-process and the vocabulary-parallel kernels.
    per_y = 1.0 if x.device.type == "cpu" else 3.5
    base = 4.0 if x.device.type == "cpu" else 8.0
    y = xd - lse
    q = y.exp()
    ii = opts.get("ignore_index", -100)
    keep = t != ii
    w = opts.get("weight")
    w = torch.ones(V, dtype=torch.float64, device=x.device) if w is None else w.double()
    w_t = torch.where(keep, w[torch.where(keep, t, 0)], 0).unsqueeze(1)
    eps = max(opts.get("label_smoothing", 0.0), 0.0)
    z = opts.get("lse_square_scale", 0.0)
    a = (1 - eps) * w_t + eps / V * w.sum() + 2 * z * lse * w_t
    red = opts.get("reduction", "mean")
    gd = g.double().reshape(-1, 1) if red == "none" else g.double().expand(x.shape[0], 1)
    if red == "mean":
        gd = gd / w_t.sum()
    t1 = (gd * q * a * slope).abs()
    t2 = (gd * eps / V * w * slope).abs()
    return (base + per_y * y.abs()) * ulp(t1, torch.float32) + 4 * ulp(t2, torch.float32)


def check(name, actual, single, oracle, dtype, slack=None):
    """The accuracy rule of the module docstring for one tensor (raises
    AssertionError)."""
    assert actual.shape == oracle.shape, (name, actual.shape, oracle.shape)
    if dtype == torch.bfloat16 or dtype == torch.float16:
        assert_as_accurate_as_torch(actual, single, oracle, name)
        return
    a, o, s = actual.double(), oracle.double(), single.double()
    assert torch.equal(torch.isnan(a), torch.isnan(o)), (name, a, o)
    assert torch.equal(torch.isinf(a), torch.isinf(o)) and torch.equal(a[a.isinf()], o[o.isinf()]), (name, a, o)
    fin = torch.isfinite(o)
    err = torch.where(fin, (a - o).abs(), 0)
    if dtype == torch.float64:
        bound = (s - o).abs() + 1e-12 * o.abs() + 1e-15
    else:
        bound = (s - o).abs() + 4 * ulp(o, torch.float32) + (0 if slack is None else slack)
    bad = fin & ~(err <= bound)
    if bad.any():
        i = int(torch.where(bad.reshape(-1), err.reshape(-1) - bound.reshape(-1), -1).argmax())
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())} of {bad.numel()} elements out of bound; worst at {i}: "
            f"{a.reshape(-1)[i].item():.9g} vs float64 {o.reshape(-1)[i].item():.9g} "
            f"(single-process {s.reshape(-1)[i].item():.9g}), bound {bound.reshape(-1)[i].item():.3g}"
        )


def check_case(loss, grad, x, t, g, opts, dtype, sizes=None):
    """loss (full) and grad (the concatenated slices) against single-process
    fusedloss and the float64 oracle."""
    s_loss, s_grad = _single(x, t, g, opts)
    o_loss, o_grad = _oracle(x, t, g, opts)
    check("loss", loss, s_loss, o_loss, dtype)
    slack = _grad_slack(x, t, g, opts) if dtype == torch.float32 else None
    check("grad", grad, s_grad, o_grad, dtype, slack)
    ii = opts.get("ignore_index", -100)
    if (t == ii).any():  # ignored rows: exactly 0
        assert grad[t == ii].eq(0).all()


# ---------------------------------------------------------------------------
# Simulated groups: the ops of every rank in one process.


def simulate(x, t, sizes, g, opts):
    """vocab-parallel loss and gradient of the full logits x split as sizes,
    with torch.amax / sum in place of the two collectives."""
    o = dict(opts)
    red = {"none": 0, "mean": 1, "sum": 2}[o.get("reduction", "mean")]
    w, ii = o.get("weight"), o.get("ignore_index", -100)
    eps, z, cap = o.get("label_smoothing", 0.0), o.get("lse_square_scale", 0.0), o.get("softcap")
    xs = torch.split(x, sizes, 1)
    loc = [ops.vocab_parallel_ce_local(xi, t, w, s, ii, eps, cap) for xi, s in zip(xs, _starts(sizes), strict=True)]
    gmax = torch.stack([m for m, _, _ in loc]).amax(0)
    packed = torch.stack([ops.vocab_parallel_ce_rebase(p, m, gmax, mass) for m, p, mass in loc]).sum(0)
    loss, state, stats = ops.vocab_parallel_ce_finalize(packed, gmax, t, w, ii, red, eps, z, x.dtype)
    grads = [
        ops.vocab_parallel_ce_backward(g.to(loss.dtype), xi, t, w, state, stats, s, ii, red, eps, z, cap)
        for xi, s in zip(xs, _starts(sizes), strict=True)
    ]
    return loss, torch.cat(grads, 1)


def _inputs(N, V, dtype, seed, scale=3.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, V, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    t = torch.randint(0, V, (N,), generator=gen).to(device)
    return x, t, gen


OPTIONS = [
    {},
    {"reduction": "none"},
    {"reduction": "sum", "weighted": True},
    {"label_smoothing": 0.1},
    {"label_smoothing": 0.2, "weighted": True, "reduction": "none"},
    {"label_smoothing": 1.0, "reduction": "sum"},
    {"label_smoothing": -0.5},  # torch treats negative smoothing as none
    {"lse_square_scale": 1e-3, "weighted": True},
    {"softcap": 5.0},
    {"weighted": True, "label_smoothing": 0.1, "lse_square_scale": 1e-2, "softcap": 4.0, "reduction": "mean"},
]


def _opts(spec, V, gen, dtype, device="cpu"):
    o = dict(spec)
    if o.pop("weighted", False):
        o["weight"] = (torch.rand(V, generator=gen, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
    return o


def _grad_out(opts, N, gen, dtype, device="cpu"):
    if opts.get("reduction", "mean") == "none":
        return torch.randn(N, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return torch.tensor(0.75, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", [[12, 12], [5, 0, 19], [1, 9, 3, 11]], ids=["even", "empty", "uneven"])
def test_simulated_group_matches_single_process(device, dtype, sizes):
    V = sum(sizes)
    for k, spec in enumerate(OPTIONS):
        for ii in (-100, 0, V - 1, sizes[0] + 1):
            x, t, gen = _inputs(9, V, dtype, seed=100 * k + ii, device=device)
            t[1] = ii if ii >= 0 else t[1]
            t[4] = ii
            opts = {**_opts(spec, V, gen, dtype, device), "ignore_index": ii}
            g = _grad_out(opts, 9, gen, dtype, device)
            loss, grad = simulate(x, t, sizes, g, opts)
            check_case(loss, grad, x, t, g, opts, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_simulated_large_slices_and_confident_rows(device):
    """Slices longer than the CPU kernels' 2048-logit blocks and than a CUDA
    warp's; rows where the target takes nearly all the probability (its
    gradient is the small difference the forward's s_other keeps exact)."""
    for dtype in (torch.float32, torch.bfloat16):
        x, t, gen = _inputs(6, 40001, dtype, seed=3, device=device)
        boost = torch.tensor([0.0, 5, 10, 20, 40, 80], device=device)
        x[torch.arange(6, device=device), t] = (x.float().amax(1) + boost).to(dtype)
        for spec in ({}, {"label_smoothing": 0.1, "weighted": True}, {"reduction": "none", "lse_square_scale": 1e-3}):
            opts = _opts(spec, 40001, gen, dtype, device)
            g = _grad_out(opts, 6, gen, dtype, device)
            loss, grad = simulate(x, t, [2500, 37501], g, opts)
            check_case(loss, grad, x, t, g, opts, dtype)


def test_simulated_special_values():
    inf = float("inf")
    x, t, _ = _inputs(5, 10, torch.float32, seed=1)
    t = torch.tensor([1, 2, 8, 3, 6])
    x[0, 7] = -inf  # a non-target -inf on the second rank: finite loss
    x[1, 2] = -inf  # the target -inf: inf loss
    x[2] = -inf  # every logit -inf: NaN
    x[3, 0] = float("nan")  # NaN on the rank without the target: NaN
    x[4, 6] = inf  # +inf target: NaN (as torch)
    for spec in ({"reduction": "none"}, {"reduction": "none", "label_smoothing": 0.1}):
        g = torch.ones(5)
        loss, grad = simulate(x, t, [4, 6], g, spec)
        s_loss, s_grad = _single(x, t, g, spec)
        assert torch.equal(loss.isnan(), s_loss.isnan()) and torch.equal(loss.isinf(), s_loss.isinf()), (loss, s_loss)
        fin = s_loss.isfinite()
        torch.testing.assert_close(loss[fin], s_loss[fin])
        torch.testing.assert_close(grad[fin], s_grad[fin], equal_nan=True)


def test_simulated_all_ignored_and_empty():
    x, t, _ = _inputs(4, 10, torch.float32, seed=2)
    t[:] = 3
    for red in REDS:
        g = torch.ones(4) if red == "none" else torch.tensor(1.0)
        loss, grad = simulate(x, t, [6, 4], g, {"ignore_index": 3, "reduction": red})
        ref = torch.nn.functional.cross_entropy(x, t, ignore_index=3, reduction=red)
        torch.testing.assert_close(loss, ref, equal_nan=True)  # mean: NaN, as torch
        assert grad.eq(0).all()
    x = torch.empty(0, 10)
    loss, grad = simulate(x, torch.empty(0, dtype=torch.long), [6, 4], torch.tensor(1.0), {"reduction": "sum"})
    assert loss.item() == 0 and grad.shape == (0, 10)


def test_simulated_strided_logits_and_uint8_target():
    x, t, _ = _inputs(6, 20, torch.float32, seed=4)
    xt = x.t().contiguous().t()  # column-major: class stride 6
    g = torch.tensor(1.0)
    for y in (xt, x[:, ::1]):
        loss, grad = simulate(y, t.to(torch.uint8), [7, 13], g, {"label_smoothing": 0.1})
        check_case(loss, grad, x, t, g, {"label_smoothing": 0.1}, torch.float32)


def test_simulated_bits_do_not_depend_on_threads_and_logits_stay_unchanged():
    x, t, gen = _inputs(64, 3000, torch.bfloat16, seed=8)
    before = x.clone()
    opts = {"label_smoothing": 0.1, "weight": torch.rand(3000, generator=gen).bfloat16() + 0.5, "softcap": 20.0}
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            runs.append(simulate(x, t, [1234, 1766], torch.tensor(1.0, dtype=torch.bfloat16), opts))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])
    assert torch.equal(x, before)


@cuda_only()
def test_simulated_out_of_range_target_is_a_nan_row_on_cuda():
    x, t, _ = _inputs(3, 10, torch.float32, seed=5, device="cuda")
    t[2] = 10
    loss, grad = simulate(x, t, [4, 6], torch.ones(3, device="cuda"), {"reduction": "none"})
    assert loss[:2].isfinite().all() and loss[2].isnan() and grad[2].isnan().all() and grad[:2].isfinite().all()


def test_target_out_of_range_raises_on_cpu():
    x, t, _ = _inputs(3, 10, torch.float32, seed=5)
    t[2] = 10
    with pytest.raises(IndexError, match="Target 10 is out of bounds."):
        simulate(x, t, [4, 6], torch.tensor(1.0), {})
    t[2] = -3
    with pytest.raises(IndexError, match="Target -3 is out of bounds."):
        simulate(x, t, [4, 6], torch.tensor(1.0), {})


def test_weight_of_the_wrong_size_raises_on_cpu():
    x, t, _ = _inputs(3, 10, torch.float32, seed=6)
    with pytest.raises(RuntimeError, match=r"defined either for all 10 classes .* shape: \[12\]"):
        simulate(x, t, [4, 6], torch.tensor(1.0), {"weight": torch.ones(12)})


def test_mutation_target_term_twice_is_caught():
    """The rule catches a gradient whose target term is applied twice (by the
    rank holding the target), and one computed with the wrong ownership."""
    x, t, gen = _inputs(8, 24, torch.float32, seed=7)
    g = torch.tensor(1.0)
    loss, grad = simulate(x, t, [10, 14], g, {})
    check_case(loss, grad, x, t, g, {}, torch.float32)
    twice = grad.clone()
    twice[torch.arange(8), t] -= 1.0 / 8  # (1 - eps) w_t g / N, once more
    with pytest.raises(AssertionError):
        check_case(loss, twice, x, t, g, {}, torch.float32)
    # The second rank told it starts one class later: it misses its targets.
    xs = torch.split(x, [10, 14], 1)
    _, state, stats = ops.vocab_parallel_ce_finalize(
        *_packed_and_max(xs, t, [10, 14]), t, None, -100, 1, 0.0, 0.0, torch.float32
    )
    wrong = torch.cat([ops.vocab_parallel_ce_backward(g, xs[0], t, None, state, stats, 0, -100, 1, 0.0, 0.0, None),
                       ops.vocab_parallel_ce_backward(g, xs[1], t, None, state, stats, 11, -100, 1, 0.0, 0.0, None)],
                      1)  # fmt: skip
    with pytest.raises(AssertionError):
        check_case(loss, wrong, x, t, g, {}, torch.float32)


def _packed_and_max(xs, t, sizes):
    loc = [
        ops.vocab_parallel_ce_local(xi, t, None, s, -100, 0.0, None) for xi, s in zip(xs, _starts(sizes), strict=True)
    ]
    gmax = torch.stack([m for m, _, _ in loc]).amax(0)
    packed = torch.stack([ops.vocab_parallel_ce_rebase(p, m, gmax, mass) for m, p, mass in loc]).sum(0)
    return packed, gmax


# ---------------------------------------------------------------------------
# Spawned gloo groups


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, results, module, fn_name, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # world processes share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = getattr(importlib.import_module(module), fn_name)(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world, *args, limit_s=150):
    """Runs fn(rank, world, *args) (a module-level function of a test module)
    on `world` gloo processes; returns their results by rank. Fails (and kills
    the processes) after about limit_s."""
    with mp.Manager() as manager:
        results = manager.dict()
        ctx = mp.start_processes(
            _entry, args=(world, _free_port(), results, fn.__module__, fn.__name__, args), nprocs=world, join=False,
            start_method="spawn",
        )  # fmt: skip
        for _ in range(limit_s):
            if ctx.join(timeout=1):
                break
        else:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{fn.__name__} on {world} ranks did not finish within ~{limit_s} s")
        return [results[r] for r in range(world)]


_COMMUNICATING = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_gather_single", "all_to_all",
    "all_to_all_single", "barrier", "batch_isend_irecv", "broadcast", "broadcast_object_list", "gather",
    "gather_object", "irecv", "isend", "monitored_barrier", "recv", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "scatter", "scatter_object_list", "send",
)  # fmt: skip


class Collectives:
    """Counts the collectives run on `group` while active, twice over: every
    call of a communicating torch.distributed function (looked up at call time,
    as fusedloss calls them), with the payload bytes of all_reduce; and the
    group's own sequence number, which every collective of the backend
    advances, whatever Python path issued it (functional collectives, DTensor)."""

    def __init__(self, group=None):
        self.group = group
        self.calls = []
        self.backend = 0

    def _seq(self):
        return (self.group or dist.group.WORLD)._get_sequence_number_for_group()

    def __enter__(self):
        self.saved = {n: getattr(dist, n) for n in _COMMUNICATING if hasattr(dist, n)}

        def wrap(name, fn):
            def counted(*a, **k):
                t = a[0] if a and isinstance(a[0], torch.Tensor) else None
                self.calls.append((name, None if t is None else t.numel() * t.element_size()))
                return fn(*a, **k)

            return counted

        for n, fn in self.saved.items():
            setattr(dist, n, wrap(n, fn))
        self.seq0 = self._seq()
        return self

    def __exit__(self, *exc):
        self.backend = self._seq() - self.seq0
        for n, fn in self.saved.items():
            setattr(dist, n, fn)


SPLITS = {2: ([12, 12], [5, 19]), 3: ([8, 8, 8], [10, 0, 17]), 4: ([6, 6, 6, 6], [1, 13, 7, 6])}


def _cases(world):
    """(sizes, dtype, option spec, ignore_index, seed) of a world's battery."""
    for sizes in SPLITS[world]:
        V, starts = sum(sizes), _starts(sizes)
        # ignore_index outside every slice, and inside each non-empty one
        ignores = [-100] + [s + sz // 2 for s, sz in zip(starts, sizes, strict=True) if sz]
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            for k, spec in enumerate(OPTIONS):
                ii = ignores[k % len(ignores)] if dtype != torch.float32 else None
                for i in ignores if ii is None else [ii]:
                    yield sizes, V, dtype, spec, i, 1000 * k + i


def _vp_worker(rank, world):
    import fusedloss.distributed as FD

    out = {"losses": [], "failures": [], "cases": 0}
    for sizes, V, dtype, spec, ii, seed in _cases(world):
        x, t, gen = _inputs(8, V, dtype, seed)
        # The last rank's slice holds no target in this batch; row 2 is ignored.
        last = sum(sizes[:-1])
        t = torch.where(t >= last, t % max(last, 1), t)
        t[2] = ii
        opts = {**_opts(spec, V, gen, dtype), "ignore_index": ii}
        g = _grad_out(opts, 8, gen, dtype)
        start = _starts(sizes)[rank]
        xl = x[:, start : start + sizes[rank]].clone().requires_grad_()
        with Collectives() as fwd:
            loss = FD.vocab_parallel_cross_entropy(xl, t, vocab_start_index=start, **opts)
        with Collectives() as bwd:
            loss.backward(g)
        assert [n for n, _ in fwd.calls] == ["all_reduce", "all_reduce"], fwd.calls
        assert fwd.backend == 2, fwd.backend
        fields = 3 if opts.get("label_smoothing", 0) > 0 else 2
        acc = 8 if dtype == torch.float64 else 4
        assert [b for _, b in fwd.calls] == [acc * 8, acc * (fields * 8 + 1)], fwd.calls
        assert bwd.calls == [] and bwd.backend == 0, (bwd.calls, bwd.backend)
        # Every rank checks its own slice against its slice of the reference
        # gradient (the others' slices are zero-padded alike).
        full = torch.zeros(x.shape, dtype=dtype)
        full[:, start : start + sizes[rank]] = xl.grad
        s_loss, s_grad = _single(x, t, g, opts)
        o_loss, o_grad = _oracle(x, t, g, opts)
        mask = torch.zeros(x.shape, dtype=torch.bool)
        mask[:, start : start + sizes[rank]] = True
        try:
            check("loss", loss.detach(), s_loss, o_loss, dtype)
            slack = _grad_slack(x, t, g, opts) if dtype == torch.float32 else None
            check(
                "grad",
                full[mask],
                s_grad[mask],
                o_grad[mask],
                dtype,
                None if slack is None else slack[mask],
            )
            assert xl.grad[t == ii].eq(0).all()
        except AssertionError as e:
            out["failures"].append(f"{sizes} {dtype} {spec} ignore_index={ii}: {e}")
        out["losses"].append(loss.detach().double().reshape(-1).tolist())
        out["cases"] += 1
    out.update(_default_offsets_and_counts(rank, world))
    return out


def _default_offsets_and_counts(rank, world):
    """The default vocab_start_index: one all_gather on the first call per
    group, then exactly two all_reduces per forward."""
    import fusedloss.distributed as FD

    FD.clear_vocab_offsets()
    sizes = SPLITS[world][1]
    x, t, _ = _inputs(5, sum(sizes), torch.float32, seed=11)
    start = _starts(sizes)[rank]
    xl = x[:, start : start + sizes[rank]]
    counts = []
    for _ in range(3):
        with Collectives() as c:
            loss = FD.vocab_parallel_cross_entropy(xl, t)
        counts.append(([n for n, _ in c.calls], c.backend))
    ref = FF.cross_entropy(x, t)
    # All targets ignored: torch's NaN mean (0 for sum), a zero gradient.
    ignored = []
    for red in REDS:
        xi = xl.clone().requires_grad_()
        li = FD.vocab_parallel_cross_entropy(xi, torch.full((5,), 2), ignore_index=2, reduction=red)
        li.sum().backward()
        ignored.append((li.sum().isnan().item(), li.sum().item() if red != "mean" else 0.0, xi.grad.eq(0).all().item()))
    return {
        "all_ignored": ignored,
        "default_counts": counts,
        "default_loss_ok": bool(torch.allclose(loss, ref, rtol=1e-6, atol=0)),
        "offsets": FD.vocab_offsets(sizes[rank]),
    }


@pytest.mark.parametrize("world", [2, 3, 4])
def test_vocab_parallel_over_gloo(world):
    res = spawn(_vp_worker, world)
    for r in res:
        assert not r["failures"], "\n".join(r["failures"][:5])
        assert r["cases"] == res[0]["cases"] > 0
        # The same loss bits on every rank.
        assert r["losses"] == res[0]["losses"]
        gather = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
        assert (
            r["default_counts"] == [([gather, "all_reduce", "all_reduce"], 3)] + [(["all_reduce", "all_reduce"], 2)] * 2
        )
        assert r["default_loss_ok"]
        assert r["all_ignored"] == [(False, 0.0, True), (True, 0.0, True), (False, 0.0, True)]
    sizes = SPLITS[world][1]
    assert [tuple(r["offsets"]) for r in res] == [(s, sum(sizes)) for s in _starts(sizes)]


def _errors_worker(rank, world):
    """torch's errors, raised alike on every rank (none is left waiting)."""
    import fusedloss.distributed as FD

    x = torch.randn(4, 5, requires_grad=True)
    t = torch.tensor([0, 3, 9, 1])
    start = 5 * rank
    seen = {}

    def catch(name, fn):
        try:
            fn()
            seen[name] = "no error"
        except Exception as e:  # noqa: BLE001 - recorded and compared by the parent
            seen[name] = f"{type(e).__name__}: {e}"

    vp = FD.vocab_parallel_cross_entropy
    catch("reduction", lambda: vp(x, t, vocab_start_index=start, reduction="avg"))
    catch("smoothing", lambda: vp(x, t, vocab_start_index=start, label_smoothing=1.5))
    catch("float_target", lambda: vp(x, t.float(), vocab_start_index=start))
    catch("int_target", lambda: vp(x, t.int(), vocab_start_index=start))
    catch("batch", lambda: vp(x, t[:3], vocab_start_index=start))
    catch("prob_target", lambda: vp(x, torch.rand(4, 5), vocab_start_index=start))
    catch("kdim", lambda: vp(x.detach().unsqueeze(-1), t.unsqueeze(-1), vocab_start_index=start))
    catch("weight_dtype", lambda: vp(x.bfloat16(), t, vocab_start_index=start, weight=torch.ones(10)))
    catch("weight_size", lambda: vp(x, t, weight=torch.ones(9)))  # default start: checked on the host
    catch("weight_size_explicit", lambda: vp(x, t, vocab_start_index=start, weight=torch.ones(12)))
    # Too short for rank 1's slice only: rank 1 raises torch's weight error,
    # rank 0 learns of it from the SUM (and raises too); neither waits forever.
    catch("weight_short", lambda: vp(x, t, vocab_start_index=start, weight=torch.ones(7)))
    catch("out_of_range", lambda: vp(x, torch.tensor([0, 3, 10, 1]), vocab_start_index=start))
    catch("integer_logits", lambda: vp(x.long(), t, vocab_start_index=start))

    # Second derivatives (create_graph=True): the gradient, and a
    # Hessian-vector product, equal the single-process ones slice by slice.
    gen = torch.Generator().manual_seed(3)
    xf, v = torch.randn(4, 10, generator=gen, dtype=torch.float64), torch.randn(4, 10, generator=gen).double()
    kw = {"weight": torch.rand(10, generator=gen).double() + 0.5, "ignore_index": 3, "label_smoothing": 0.1}
    kw.update(lse_square_scale=1e-2, softcap=3.0)
    tt, mine = torch.tensor([0, 3, 9, 6]), slice(start, start + 5)
    xl = xf[:, mine].clone().requires_grad_()
    (g,) = torch.autograd.grad(vp(xl, tt, vocab_start_index=start, **kw), xl, create_graph=True)
    (hv,) = torch.autograd.grad((g * v[:, mine]).sum(), xl)  # this rank's share of the global g . v
    xs = xf.clone().requires_grad_()
    (gs,) = torch.autograd.grad(FF.cross_entropy(xs, tt, **kw), xs, create_graph=True)
    (hvs,) = torch.autograd.grad((gs * v).sum(), xs)
    seen["create_graph"] = (
        bool(torch.allclose(g, gs[:, mine], rtol=1e-12, atol=1e-15)),
        bool(torch.allclose(hv, hvs[:, mine], rtol=1e-10, atol=1e-13)),
    )
    # torch.compile(fullgraph=True) traces it (dynamo turns the collectives
    # into functional ones) and gives eager's loss and gradient.
    xc, xe = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    f = lambda a: vp(a, t, vocab_start_index=start, label_smoothing=0.1, weight=torch.linspace(0.5, 2, 10))
    lc, le = torch.compile(f, backend="aot_eager", fullgraph=True)(xc), f(xe)
    lc.backward()
    le.backward()
    seen["compiled"] = (bool(torch.equal(lc, le)), bool(torch.equal(xc.grad, xe.grad)))
    # unbatched (C_local,) logits with a 0-d target equal a batch of one
    un = vp(x[1], t[1], vocab_start_index=start, reduction="none")
    one = vp(x[1:2], t[1:2], vocab_start_index=start, reduction="none")
    seen["unbatched"] = (un.shape == (), bool(torch.equal(un, one[0])))
    # autocast: an fp32 loss of bf16 logits, as torch's cross entropy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen["autocast_dtype"] = str(vp(x.bfloat16(), t, vocab_start_index=start).dtype)
    return seen


def test_errors_match_torch():
    res = spawn(_errors_worker, 2)
    short = [r.pop("weight_short") for r in res]
    assert short[0].startswith("RuntimeError: vocab_parallel_cross_entropy: another rank of the group"), short[0]
    assert short[1].startswith(
        "RuntimeError: weight tensor should be defined either for all classes or no classes but got weight tensor "
        "of shape: [7], short of this rank's classes [5, 10)"
    ), short[1]
    assert res[0] == res[1]
    e = res[0]
    assert e["reduction"] == "ValueError: avg is not a valid value for reduction"
    assert e["smoothing"] == "RuntimeError: label_smoothing must be between 0.0 and 1.0. Got: 1.5"
    assert e["float_target"] == "RuntimeError: expected target dtype to be Long or Byte, but got Float"
    assert e["int_target"] == "RuntimeError: expected target dtype to be Long or Byte, but got Int"
    assert e["batch"] == "ValueError: Expected input batch_size (4) to match target batch_size (3)."
    assert e["prob_target"].startswith("NotImplementedError: vocab_parallel_cross_entropy: class-probability")
    assert e["kdim"].startswith("ValueError: vocab_parallel_cross_entropy takes (N, V_local)")
    assert e["weight_dtype"] == "RuntimeError: expected scalar type BFloat16 but found Float"
    msg = "weight tensor should be defined either for all 10 classes or no classes but got weight tensor of shape: "
    assert e["weight_size"] == f"RuntimeError: {msg}[9]"
    assert e["weight_size_explicit"].startswith(f"RuntimeError: {msg}[12]")
    assert e["out_of_range"].startswith("IndexError: Target 10 is out of bounds.")
    assert e["integer_logits"].startswith("NotImplementedError")
    assert e["create_graph"] == (True, True)
    assert e["compiled"] == (True, True)
    assert e["unbatched"] == (True, True)
    assert e["autocast_dtype"] == "torch.float32"


class _CopyToTensorParallel(torch.autograd.Function):
    """Megatron's "f": identity forward; the input's gradient summed over the
    tensor-parallel ranks backward (each rank's head slice contributes)."""

    @staticmethod
    def forward(ctx, h):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


def _training(head_sizes, rank, vp, steps=6):
    """A small LM-style classifier: a replicated trunk and a column-parallel
    head (rank `rank` holds rows [start, start + size) of the head weight), or
    the whole head in one process when rank is None."""
    import fusedloss.distributed as FD

    torch.manual_seed(0)
    D, H, V, N = 10, 16, sum(head_sizes), 32
    trunk = torch.nn.Linear(D, H)
    head = torch.nn.Parameter(torch.randn(V, H) * 0.3)
    if rank is not None:
        start = _starts(head_sizes)[rank]
        head = torch.nn.Parameter(head.detach()[start : start + head_sizes[rank]].clone())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=gen)
    t = torch.randint(0, V, (N,), generator=gen)
    t[:3] = -100
    opt = torch.optim.SGD([*trunk.parameters(), head], lr=0.5)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        h = torch.tanh(trunk(x))
        if rank is None:
            loss = FF.cross_entropy(h @ head.T, t, label_smoothing=0.1)
        else:
            logits = _CopyToTensorParallel.apply(h) @ head.T
            loss = FD.vocab_parallel_cross_entropy(logits, t, label_smoothing=0.1)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _train_worker(rank, world):
    sizes = [23, 27]
    return {"tp": _training(sizes, rank, True), "single": _training(sizes, None, False)}


def test_column_parallel_training_matches_single_process():
    res = spawn(_train_worker, 2)
    assert res[0]["tp"] == res[1]["tp"]  # every rank sees the same loss bits
    torch.testing.assert_close(torch.tensor(res[0]["tp"]), torch.tensor(res[0]["single"]), rtol=2e-6, atol=0)
    assert res[0]["tp"][-1] < res[0]["tp"][0]  # it trains


def _dtensor_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    import fusedloss.nn

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for V in (24, 25):  # even, and uneven as DTensor shards it (torch.chunk)
        for red in REDS:
            x, t, gen = _inputs(6, V, torch.float32, seed=V)
            t[1] = 5
            w = torch.rand(V, generator=gen) + 0.5
            kw = {"weight": w, "ignore_index": 5, "reduction": red}
            g = torch.randn(6, generator=gen) if red == "none" else torch.tensor(1.0)
            dx = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
            with Collectives(mesh.get_group(0)) as c:
                loss = FF.cross_entropy(dx, t, **kw)
            calls = ([n for n, _ in c.calls], c.backend)
            loss.backward(distribute_tensor(g, mesh, [*loss.placements]) if red == "none" else None)
            dref = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
            with Collectives(mesh.get_group(0)) as c, loss_parallel():
                ref = torch.nn.functional.cross_entropy(dref, t, **kw)
                ref.backward(distribute_tensor(g, mesh, [*ref.placements]) if red == "none" else None)
            torch_calls = c.backend
            ok_loss = torch.allclose(loss.full_tensor(), ref.full_tensor(), rtol=1e-5, atol=1e-6)
            ok_grad = torch.allclose(dx.grad.full_tensor(), dref.grad.full_tensor(), rtol=1e-5, atol=1e-7)
            out[(V, red)] = (calls, type(loss).__name__, str(loss.placements), ok_loss, ok_grad, torch_calls)
    # The module routes too (fusedloss.nn.CrossEntropyLoss calls the functional).
    x, t, _ = _inputs(6, 24, torch.float32, seed=9)
    dx = distribute_tensor(x, mesh, [Shard(1)])
    m = fusedloss.nn.CrossEntropyLoss(label_smoothing=0.1)
    out["module"] = bool(torch.allclose(m(dx, t).full_tensor(), FF.cross_entropy(x, t, label_smoothing=0.1)))
    return out


def test_dtensor_matches_loss_parallel():
    res = spawn(_dtensor_worker, 2)
    cases = {k: v for k, v in res[0].items() if k != "module"}
    for key, (calls, kind, placements, ok_loss, ok_grad, torch_calls) in cases.items():
        assert calls == (["all_reduce", "all_reduce"], 2), (key, calls)
        assert torch_calls >= 3, (key, torch_calls)  # loss_parallel: 3 all_reduces forward
        assert kind == "DTensor" and placements == "(Replicate(),)", (key, kind, placements)
        assert ok_loss and ok_grad, key
    assert res[0]["module"] and res[1]["module"]
