"""fusedloss inside real training machinery: autocast, CUDA graphs and
reduce-overhead compilation, streams, many Python threads, checkpointing,
memory exhaustion, tensors beyond 2^31 and 2^32 elements."""

import concurrent.futures
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fusedloss.functional as FF
from conftest import DEVICES, HAS_CUDA, OUTSIDE_SOURCE, make
from fusedloss.testing import (
    assert_as_accurate_as_torch,
    assert_matches_torch,
    assert_rows_match_float64,
    sample_rows,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _loss_pairs(device, dtype=torch.float32, n=37, c=53):
    """(name, fused fn, native fn, args) for every loss torch has."""
    x = make((n, c), dtype, device, -3, 3, requires_grad=True)
    y01 = make((n, c), dtype, device, 0, 1)
    pm1 = torch.sign(make((n, c), dtype, device))
    t = torch.randint(0, c, (n,), device=device)
    return [
        ("bce", FF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, (x, y01)),
        ("mse", FF.mse_loss, F.mse_loss, (x, y01)),
        ("ce", FF.cross_entropy, F.cross_entropy, (x, t)),
        ("hinge_embedding", FF.hinge_embedding_loss, F.hinge_embedding_loss, (x, pm1)),
        ("soft_margin", FF.soft_margin_loss, F.soft_margin_loss, (x, pm1)),
        ("multi_margin", FF.multi_margin_loss, F.multi_margin_loss, (x, t)),
    ]


# ---------------------------------------------------------------------------
# Autocast: torch runs these losses in fp32; so does fusedloss
# ---------------------------------------------------------------------------


def _under_autocast(fn, device, dtype):
    def run(*args, **kwargs):
        with torch.autocast(device, dtype):
            return fn(*args, **kwargs)

    return run


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_dtype_policy_matches_torch(device, dtype):
    for name, fused, native, args in _loss_pairs(device):
        lowp = tuple(a.detach().to(dtype).requires_grad_(a.requires_grad) if a.is_floating_point() else a for a in args)
        with torch.autocast(device, dtype):
            assert fused(*lowp).dtype == torch.float32, name
        # Both compute in fp32 from the same low-precision inputs and return the
        # gradient in the input's dtype: the loss is held to torch's fp32
        # tolerance, the gradient element-wise to the float64 result.
        assert_matches_torch(
            name, *lowp, fused=_under_autocast(fused, device, dtype), native=_under_autocast(native, device, dtype)
        )


def test_autocast_under_compile_matches_eager():
    torch._dynamo.reset()
    x = make((8, 30), torch.bfloat16, "cpu", requires_grad=True)
    t = torch.randint(0, 30, (8,))

    def fn(a):
        with torch.autocast("cpu", torch.bfloat16):
            return FF.cross_entropy(a, t, label_smoothing=0.1)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    a, b = fn(x), compiled(x)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------
# Threads: concurrent calls equal serial ones, bit for bit
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_many_threads_match_serial(device):
    jobs = []
    for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float64, torch.float32] * 4):
        for name, fused, _, args in _loss_pairs(device, dtype, n=17 + i, c=33 + 7 * i):
            jobs.append((name, fused, args))

    def run(job):
        name, fused, args = job
        stream = torch.cuda.Stream() if device == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else _null():
            out = fused(*args)
            (g,) = torch.autograd.grad(out, args[0])
        if stream is not None:
            stream.synchronize()
        return out.detach().clone(), g.clone()

    serial = [run(j) for j in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        parallel = list(pool.map(run, jobs))
    for (name, _, _), s, p in zip(jobs, serial, parallel, strict=True):
        assert torch.equal(s[0], p[0]) and torch.equal(s[1], p[1]), name


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---------------------------------------------------------------------------
# Checkpointing and repeated backward
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_and_retain_graph(device):
    from torch.utils.checkpoint import checkpoint

    lin = torch.nn.Linear(53, 53).to(device)
    for name, fused, native, args in _loss_pairs(device):
        h = args[0].detach()
        ref = torch.autograd.grad(native(lin(h), *args[1:]), lin.weight)[0]
        got = torch.autograd.grad(
            checkpoint(lambda a, f=fused, rest=args[1:]: f(lin(a), *rest), h, use_reentrant=False), lin.weight
        )[0]
        torch.testing.assert_close(got, ref, msg=name)
        loss = fused(*args)
        g1 = torch.autograd.grad(loss, args[0], retain_graph=True)[0]
        g2 = torch.autograd.grad(loss, args[0])[0]
        assert torch.equal(g1, g2), name


# ---------------------------------------------------------------------------
# CUDA: streams, graphs, reduce-overhead, memory exhaustion, huge tensors
# ---------------------------------------------------------------------------


@needs_cuda
@pytest.mark.cuda
def test_non_default_stream():
    for name, fused, _, args in _loss_pairs("cuda"):
        ref = fused(*args)
        (gref,) = torch.autograd.grad(ref, args[0])
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            out = fused(*args)
            (g,) = torch.autograd.grad(out, args[0])
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        assert torch.equal(out, ref) and torch.equal(g, gref), name


@needs_cuda
@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    for name, fused, _, args in _loss_pairs("cuda"):
        static = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]

        def step(fused=fused, static=static):
            out = fused(*static)
            (g,) = torch.autograd.grad(out, static[0])
            return out, g

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up outside the graph
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, g = step()
        for trial in range(2):
            fresh = [
                make(a.shape, a.dtype, "cuda")
                if a.is_floating_point()
                else torch.randint(0, a.max().item() + 1, a.shape, device="cuda")
                for a in args
            ]
            with torch.no_grad():
                for st, fr in zip(static, fresh, strict=True):
                    st.copy_(fr)
            graph.replay()
            torch.cuda.synchronize()
            eager_x = fresh[0].clone().requires_grad_()
            ref = fused(eager_x, *fresh[1:])
            (gref,) = torch.autograd.grad(ref, eager_x)
            assert torch.equal(out, ref) and torch.equal(g, gref), (name, trial)


@needs_cuda
@pytest.mark.cuda
def test_compile_reduce_overhead_matches_eager():
    torch._dynamo.reset()
    x = make((64, 1000), torch.bfloat16, "cuda", requires_grad=True)
    t = torch.randint(0, 1000, (64,), device="cuda")
    fn = torch.compile(lambda a: FF.cross_entropy(a, t, label_smoothing=0.1), mode="reduce-overhead", fullgraph=True)
    ref = FF.cross_entropy(x, t, label_smoothing=0.1)
    (gref,) = torch.autograd.grad(ref, x)
    for _ in range(3):
        out = fn(x)
        (g,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, gref)


_OOM = r"""
import torch, fusedloss.functional as FF
torch.cuda.set_per_process_memory_fraction(0.02)
free = int(torch.cuda.get_device_properties(0).total_memory * 0.02)
base = torch.cuda.memory_allocated()
n = free // (2 * 32000) + 1024   # logits + gradient exceed the budget
ok = False
try:
    x = torch.randn(n, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    FF.cross_entropy(x, torch.zeros(n, dtype=torch.long, device="cuda")).backward()
except torch.OutOfMemoryError:
    ok = True
x = None
torch.cuda.synchronize()
ok = ok and torch.cuda.memory_allocated() == base
y = torch.randn(64, 1000, device="cuda", requires_grad=True)
FF.cross_entropy(y, torch.zeros(64, dtype=torch.long, device="cuda")).backward()
ok = ok and bool(torch.isfinite(y.grad).all())
print("OK" if ok else "FAIL")
"""


@needs_cuda
@pytest.mark.cuda
def test_out_of_memory_is_catchable_and_recoverable():
    r = subprocess.run([sys.executable, "-c", _OOM], capture_output=True, text=True, cwd=OUTSIDE_SOURCE, timeout=300)
    assert r.stdout.strip().endswith("OK"), r.stdout + r.stderr


def _float64_mean(x, t, chunk=2048):
    """torch's mean cross entropy in float64, a chunk of rows at a time."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], chunk):
        total += F.cross_entropy(x[i : i + chunk].double(), t[i : i + chunk], reduction="sum")
    return total / x.shape[0]


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("rows,classes", [(42731, 50257), (48 * 2047, 50000)])  # > 2^31 and > 2^32 elements
def test_cuda_beyond_2_31_and_2_32_elements(rows, classes):
    need = rows * classes * 2 * 2 + (1 << 30)
    if torch.cuda.get_device_properties(0).total_memory < need * 1.2:
        pytest.skip("not enough GPU memory")
    torch.cuda.empty_cache()
    x = torch.empty(rows, classes, device="cuda", dtype=torch.bfloat16).uniform_(-4, 4).requires_grad_()
    t = torch.randint(0, classes, (rows,), device="cuda")
    # Rows on both sides of elements 2^31 and 2^32, where a 32-bit offset wraps,
    # and the last rows, each against float64 element by element.
    sample = sample_rows(rows, classes)
    g = torch.randn(rows, device="cuda", dtype=torch.bfloat16)
    out = FF.cross_entropy(x, t, reduction="none")
    (gx,) = torch.autograd.grad(out, x, g)
    assert_rows_match_float64(gx, x, t, sample, grad_output=g, loss=out, reduction="none")
    del gx, out
    mean = FF.cross_entropy(x, t)
    (gx,) = torch.autograd.grad(mean, x)
    assert_rows_match_float64(gx, x, t, sample, reduction="mean")
    del gx
    assert_as_accurate_as_torch(mean, None, _float64_mean(x.detach(), t), "mean cross_entropy")
    # an elementwise loss past 2^31 elements, checked around the boundaries and at the end
    flat = x.detach().view(-1)
    y = torch.rand_like(flat)
    bce = FF.binary_cross_entropy_with_logits(flat, y, reduction="none")
    n = flat.numel()
    at = torch.cat([torch.arange(max(b - 500, 0), min(b + 500, n)) for b in (2**31, 2**32, n - 500) if b < n]).to(
        "cuda"
    )
    assert_as_accurate_as_torch(
        bce[at],
        F.binary_cross_entropy_with_logits(flat[at], y[at], reduction="none"),
        F.binary_cross_entropy_with_logits(flat[at].double(), y[at].double(), reduction="none"),
        "bce_with_logits around 2^31, 2^32 and at the end",
    )


def test_cpu_beyond_2_31_elements():
    # The largest CPU case that fits CI comfortably: bf16 logits of 2^31 + 65536
    # elements (4.3 GB), loss and gradient checked on rows on both sides of
    # element 2^31, the last rows and random ones.
    rows, classes = 2**31 // 65536 + 1, 65536
    x = torch.empty(rows, classes, dtype=torch.bfloat16).uniform_(-4, 4).requires_grad_()
    t = torch.randint(0, classes, (rows,))
    g = torch.randn(rows, dtype=torch.bfloat16)
    out = FF.cross_entropy(x, t, reduction="none")
    (gx,) = torch.autograd.grad(out, x, g)
    assert_rows_match_float64(gx, x, t, sample_rows(rows, classes), grad_output=g, loss=out, reduction="none")
