"""The benchmark harness behind ``python -m fusedloss bench`` and bench/.

Each case times forward, backward and forward+backward ("full") of fusedloss,
torch eager and torch.compile (of the torch function) on the same inputs in one
process: warm-up first (which also compiles), then medians with p20/p80 over
repetitions, gradients reset before each one, all CPU cores (CUDA events on a
GPU). Achieved bandwidth comes from a per-loss bytes formula (`bytes_moved`
below: what the fused algorithm must read and write), and a device copy is
timed in the same run for reference. Results are rows with the CSV columns in
CSV_COLUMNS.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

CSV_COLUMNS = [
    "loss",
    "case",
    "provider",
    "mode",
    "dtype",
    "shape",
    "device",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "gbps",
    "peak_mem_mb",
    "torch",
    "git_sha",
]
PROVIDERS = ("fusedloss", "torch", "torch.compile")
OPTIONAL_PROVIDERS = ("liger",)  # Liger-Kernel's cross entropy, on CUDA, when it is installed
MODES = ("fwd", "bwd", "full")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclasses.dataclass
class Problem:
    """Inputs and the implementations of one benchmark case."""

    fused: Callable[[], torch.Tensor]
    native: Callable[..., torch.Tensor]  # same inputs, torch's implementation
    native_args: tuple
    leaves: list  # tensors whose .grad the backward fills
    bytes: dict  # mode -> bytes the fused algorithm must move
    others: dict = dataclasses.field(default_factory=dict)  # optional provider -> callable
    # Per-case overrides (a GEMM-bound case times fwd+bwd only, with fewer repetitions).
    skip: tuple = ()  # providers not run
    modes: tuple | None = None
    reps: int | None = None
    warmup: int | None = None


def liger_cross_entropy():
    """Liger-Kernel's fused cross entropy, or None where it is not installed."""
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception:
        return None
    return liger_cross_entropy


@dataclasses.dataclass
class Case:
    loss: str
    case: str
    shape: tuple
    dtype: str
    build: Callable[[tuple, torch.dtype, str], Problem]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# ---------------------------------------------------------------------------
# Cases. Bytes: forward reads every input once; backward reads them again and
# writes the gradient of the input.
# ---------------------------------------------------------------------------


def _elementwise_bytes(n: int, s: int, extra: int = 0) -> dict:
    fwd = 2 * n * s + extra
    bwd = 3 * n * s + extra
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}


def _bce(shape, dtype, device, pos_weight=False):
    import fusedloss.functional as FF

    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    y = torch.rand(shape, dtype=dtype, device=device)
    pw = (torch.rand(shape[-1], dtype=dtype, device=device) * 2) if pos_weight else None
    extra = pw.numel() * pw.element_size() if pw is not None else 0
    return Problem(
        fused=lambda: FF.binary_cross_entropy_with_logits(x, y, pos_weight=pw),
        native=lambda a, b, p: F.binary_cross_entropy_with_logits(a, b, pos_weight=p),
        native_args=(x, y, pw),
        leaves=[x],
        bytes=_elementwise_bytes(x.numel(), x.element_size(), extra),
    )


def _mse(shape, dtype, device):
    import fusedloss.functional as FF

    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    y = torch.randn(shape, dtype=dtype, device=device)
    return Problem(
        fused=lambda: FF.mse_loss(x, y),
        native=lambda a, b: F.mse_loss(a, b),
        native_args=(x, y),
        leaves=[x],
        bytes=_elementwise_bytes(x.numel(), x.element_size()),
    )


def _ce(shape, dtype, device, label_smoothing=0.0):
    import fusedloss.functional as FF

    n, c = shape
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    t = torch.randint(0, c, (n,), device=device)
    s = x.element_size()
    extra = t.numel() * t.element_size()
    others = {}
    liger = liger_cross_entropy() if device == "cuda" else None
    if liger is not None:
        others["liger"] = lambda: liger(x, t, label_smoothing=label_smoothing)
    return Problem(
        fused=lambda: FF.cross_entropy(x, t, label_smoothing=label_smoothing),
        native=lambda a, b: F.cross_entropy(a, b, label_smoothing=label_smoothing),
        native_args=(x, t),
        leaves=[x],
        # forward reads the logits; backward reads them again and writes the gradient
        bytes={"fwd": n * c * s + extra, "bwd": 2 * n * c * s + extra, "full": 3 * n * c * s + 2 * extra},
        others=others,
    )


def _pair(name, shape, dtype, device):
    """An elementwise margin loss on (input, +-1 target)."""
    import fusedloss.functional as FF
    from fusedloss import _composite

    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    y = torch.randint(0, 2, shape, device=device).to(dtype) * 2 - 1
    fused = {
        "hinge_embedding": lambda: FF.hinge_embedding_loss(x, y),
        "soft_margin": lambda: FF.soft_margin_loss(x, y),
        "hinge": lambda: FF.hinge_loss(x, y),
    }[name]
    native = {
        "hinge_embedding": lambda a, b: F.hinge_embedding_loss(a, b),
        "soft_margin": lambda a, b: F.soft_margin_loss(a, b),
        # torch has no binary hinge: the composite users write instead
        "hinge": lambda a, b: _composite.hinge_loss(a, b),
    }[name]
    return Problem(
        fused=fused,
        native=native,
        native_args=(x, y),
        leaves=[x],
        bytes=_elementwise_bytes(x.numel(), x.element_size()),
    )


def _multi_margin(shape, dtype, device):
    import fusedloss.functional as FF

    n, c = shape
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    t = torch.randint(0, c, (n,), device=device)
    s = x.element_size()
    return Problem(
        fused=lambda: FF.multi_margin_loss(x, t),
        native=lambda a, b: F.multi_margin_loss(a, b),
        native_args=(x, t),
        leaves=[x],
        bytes={"fwd": n * c * s, "bwd": 2 * n * c * s, "full": 3 * n * c * s},
    )


def liger_fused_linear_cross_entropy():
    """Liger-Kernel's fused linear cross entropy, or None where it is not installed."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as fn
    except Exception:
        return None
    return fn


def _lce(shape, dtype, device):
    """A language-model head: (N, D) hidden states, a (V, D) weight, N class
    indices; gradients for both. torch's reference path (linear, then
    cross_entropy), torch >= 2.14's chunked path, and Liger's on CUDA."""
    import fusedloss.functional as FF

    n, d, v = shape
    # Made in place, so that no temporary raises the peak RSS before the call.
    x = torch.empty(n, d, dtype=dtype, device=device).normal_().requires_grad_()
    w = torch.empty(v, d, dtype=dtype, device=device).normal_(std=d**-0.5).requires_grad_()
    t = torch.randint(0, v, (n,), device=device)
    s = x.element_size()
    others = {}
    if hasattr(F, "linear_cross_entropy"):
        opts = torch.nn.LinearCrossEntropyOptions()
        others["torch.chunked"] = lambda: F.linear_cross_entropy(x, w, t, options=opts)
        native = lambda a, b, c: F.linear_cross_entropy(a, b, c)  # noqa: E731
    else:
        native = lambda a, b, c: F.cross_entropy(F.linear(a, b), c)  # noqa: E731
    liger = liger_fused_linear_cross_entropy() if device == "cuda" else None
    if liger is not None:
        others["liger"] = lambda: liger(x, w, t)
    # The floor: the three GEMMs any implementation runs (logits, grad_input,
    # grad_weight), at full size, in the inputs' dtype.
    xd, wd = x.detach(), w.detach()
    logits = torch.empty(n, v, dtype=dtype, device=device)
    gx, gw = torch.empty_like(xd), torch.empty_like(wd)
    done = torch.zeros((), device=device, requires_grad=True)

    def gemms():
        torch.mm(xd, wd.t(), out=logits)
        torch.mm(logits, wd, out=gx)
        torch.mm(logits.t(), xd, out=gw)
        return done * 1

    others["gemms"] = gemms
    # Bytes the fused design must move at least: the operands read (twice with
    # the backward) and the gradients written. It is GEMM-bound: 3 GEMMs of
    # 2 N D V flops each (see tflops in the summary).
    io = (n * d + v * d) * s
    return Problem(
        fused=lambda: FF.linear_cross_entropy(x, w, t),
        native=native,
        native_args=(x, w, t),
        leaves=[x, w],
        bytes={"fwd": io, "bwd": 2 * io, "full": 2 * io},
        others=others,
        skip=("torch.compile",),
        modes=("full",),
        reps=3,
        warmup=1,
    )


def lce_tflops(shape: str, ms: float) -> float:
    """fwd+bwd TFLOP/s of a linear_cross_entropy case (three N x D x V GEMMs)."""
    n, d, v = (int(a) for a in shape.split("x"))
    return 6 * n * d * v / (ms * 1e-3) / 1e12


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set (VmRSS) or its peak (VmHWM), in MB, from
    /proc (Linux). The peak is per address space, so unlike ru_maxrss it does
    not start from the parent's size in a child process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Lower VmHWM to the current RSS (Linux >= 4.0), so that a later peak
    counts from now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# sigmoid_focal_loss against torchvision's own function, multilabel soft
# margin, and distillation on logits against the torch composite
# kl_div(log_softmax(s / T), log_softmax(t / T), log_target=True) * T^2.

DISTILL_TEMPERATURE = 2.0


def _focal(shape, dtype, device):
    import fusedloss.functional as FF
    from fusedloss.testing import reference

    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    # dense detection: a few positives among many negatives
    y = (torch.rand(shape, device=device) < 0.05).to(dtype)
    tv = reference("sigmoid_focal_loss")
    return Problem(
        fused=lambda: FF.sigmoid_focal_loss(x, y, reduction="mean"),
        native=lambda a, b: tv(a, b, reduction="mean"),
        native_args=(x, y),
        leaves=[x],
        bytes=_elementwise_bytes(x.numel(), x.element_size()),
    )


def _multilabel_soft_margin(shape, dtype, device):
    import fusedloss.functional as FF

    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    y = (torch.rand(shape, device=device) < 0.1).to(dtype)
    return Problem(
        fused=lambda: FF.multilabel_soft_margin_loss(x, y),
        native=lambda a, b: F.multilabel_soft_margin_loss(a, b),
        native_args=(x, y),
        leaves=[x],
        bytes=_elementwise_bytes(x.numel(), x.element_size()),
    )


def _distill_composite(s, t, beta):
    T = DISTILL_TEMPERATURE
    ls, lt = F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)
    if beta == 0.0:
        return F.kl_div(ls, lt, log_target=True, reduction="batchmean") * (T * T)
    m = torch.log(beta * lt.exp() + (1 - beta) * ls.exp())
    kl_t = F.kl_div(m, lt, log_target=True, reduction="batchmean")
    kl_s = F.kl_div(m, ls, log_target=True, reduction="batchmean")
    return (beta * kl_t + (1 - beta) * kl_s) * (T * T)


def _distill(shape, dtype, device, beta=0.0):
    import fusedloss.functional as FF

    n, c = shape
    s = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    t = torch.randn(shape, dtype=dtype, device=device)  # the teacher is frozen
    size = s.element_size()
    if beta == 0.0:
        fused = lambda: FF.kl_div_with_logits(s, t, temperature=DISTILL_TEMPERATURE)  # noqa: E731
    else:
        fused = lambda: FF.jsd_with_logits(s, t, beta=beta, temperature=DISTILL_TEMPERATURE)  # noqa: E731
    return Problem(
        fused=fused,
        native=lambda a, b: _distill_composite(a, b, beta),
        native_args=(s, t),
        leaves=[s],
        # forward reads both rows; backward reads them again and writes the student's gradient
        bytes={"fwd": 2 * n * c * size, "bwd": 3 * n * c * size, "full": 5 * n * c * size},
    )


def _sizes(device: str, quick: bool, cpu: list, cpu_quick: list, gpu: list, gpu_quick: list) -> list:
    if device == "cuda":
        return gpu_quick if quick else gpu
    return cpu_quick if quick else cpu


# Elementwise losses: CPU sizes, CPU --quick, GPU sizes, GPU --quick.
ELEMENTWISE_SIZES = (
    [(4096, 4096), (1024, 1024), (8192, 8192)],
    [(4096, 4096), (1024, 1024)],
    [(16384, 8192), (4096, 4096), (32768, 16384)],
    [(32768, 16384)],
)


def cases_for(loss: str, device: str, quick: bool) -> list[Case]:
    """The benchmark cases of one loss on one device. The first CPU case of each
    loss is the size the project's speed targets are stated for."""
    out = []
    # On a GPU, --quick keeps one size per loss (the one its target is stated
    # for) so that the GPU check script fits its time.
    gpu_dtypes = ["fp32"] if quick else ["fp32", "bf16"]
    if loss == "bce_with_logits":
        shapes = _sizes(device, quick, *ELEMENTWISE_SIZES)
        for shape in shapes:
            for dt in ["fp32"] if device == "cpu" else gpu_dtypes:
                out.append(Case(loss, "plain", shape, dt, lambda s, d, dev: _bce(s, d, dev)))
                out.append(Case(loss, "pos_weight", shape, dt, lambda s, d, dev: _bce(s, d, dev, pos_weight=True)))
    elif loss == "mse":
        shapes = _sizes(device, quick, *ELEMENTWISE_SIZES)
        for shape in shapes:
            for dt in ["fp32"] if device == "cpu" else gpu_dtypes:
                out.append(Case(loss, "plain", shape, dt, _mse))
    elif loss == "cross_entropy":
        if device == "cuda":
            shapes = [(16384, 128256), (4096, 32000), (8192, 65536)] if not quick else [(16384, 128256)]
            for shape in shapes:
                out.append(Case(loss, "plain", shape, "bf16", _ce))
            if not quick:
                out.append(Case(loss, "plain", (8192, 32000), "fp32", _ce))
            out.append(
                Case(
                    loss, "smoothing0.1", (16384, 128256), "bf16", lambda s, d, dev: _ce(s, d, dev, label_smoothing=0.1)
                )
            )
        else:
            shapes = [(2048, 32000), (512, 32000), (4096, 32000)] if not quick else [(2048, 32000), (512, 32000)]
            for shape in shapes:
                out.append(Case(loss, "plain", shape, "fp32", _ce))
            out.append(
                Case(loss, "smoothing0.1", (2048, 32000), "fp32", lambda s, d, dev: _ce(s, d, dev, label_smoothing=0.1))
            )
            out.append(Case(loss, "plain", (2048, 32000), "bf16", _ce))
    elif loss in ("hinge_embedding", "soft_margin", "hinge"):
        shapes = _sizes(device, quick, *ELEMENTWISE_SIZES)
        for shape in shapes:
            for dt in ["fp32"] if device == "cpu" else gpu_dtypes:
                out.append(Case(loss, "plain", shape, dt, lambda s, d, dev, name=loss: _pair(name, s, d, dev)))
    elif loss == "multi_margin":
        shapes = _sizes(
            device,
            quick,
            [(16384, 1000), (4096, 1000), (32768, 1000)],
            [(16384, 1000), (4096, 1000)],
            [(65536, 1000), (16384, 1000), (131072, 1000)],
            [(131072, 1000)],
        )
        for shape in shapes:
            out.append(Case(loss, "plain", shape, "fp32", _multi_margin))
    elif loss == "linear_cross_entropy":
        # (N tokens, D hidden, V vocabulary): the CPU shape; on a GPU a
        # Llama-3-8B head over 4096 tokens.
        if device == "cuda":
            out.append(Case(loss, "plain", (4096, 4096, 128256), "bf16", _lce))
        else:
            for dt in ["fp32"] if quick else ["fp32", "bf16"]:
                out.append(Case(loss, "plain", (2048, 512, 32000), dt, _lce))
    elif loss == "sigmoid_focal":
        # (N, C) classification heads and RetinaNet's dense (N, A*K, H, W) layout
        shapes = _sizes(
            device,
            quick,
            [(4096, 4096), (16, 80, 100, 100), (1024, 1024)],
            [(4096, 4096), (16, 80, 100, 100)],
            [(32768, 16384), (64, 720, 100, 100)],
            [(32768, 16384)],
        )
        for shape in shapes:
            for dt in ["fp32"] if device == "cpu" else gpu_dtypes:
                out.append(Case(loss, "dense" if len(shape) == 4 else "plain", shape, dt, _focal))
    elif loss == "multilabel_soft_margin":
        for shape in _sizes(device, quick, *ELEMENTWISE_SIZES):
            for dt in ["fp32"] if device == "cpu" else gpu_dtypes:
                out.append(Case(loss, "plain", shape, dt, _multilabel_soft_margin))
    elif loss in ("kl_div_with_logits", "jsd_with_logits"):
        beta = 0.0 if loss == "kl_div_with_logits" else 0.5
        case = f"T={DISTILL_TEMPERATURE:g}" + ("" if beta == 0.0 else f" beta={beta:g}")
        build = lambda s, d, dev, b=beta: _distill(s, d, dev, beta=b)  # noqa: E731
        if device == "cuda":
            shapes = [(16384, 128256), (4096, 32000)] if not quick else [(16384, 128256)]
            dtypes = ["bf16"] if quick else ["bf16", "fp32"]
        else:
            shapes = [(2048, 32000), (512, 32000)]
            dtypes = ["fp32", "bf16"] if beta == 0.0 else ["fp32"]
        for shape in shapes[:1] if (quick and beta != 0.0) else shapes:
            for dt in dtypes:
                out.append(Case(loss, case, shape, dt, build))
    else:
        raise ValueError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
    return out


LOSSES = (
    "bce_with_logits",
    "mse",
    "cross_entropy",
    "hinge_embedding",
    "soft_margin",
    "hinge",
    "multi_margin",
    "linear_cross_entropy",
    "sigmoid_focal",
    "multilabel_soft_margin",
    "kl_div_with_logits",
    "jsd_with_logits",
)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


class _Timer:
    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def start(self):
        if self.cuda:
            self.a = torch.cuda.Event(enable_timing=True)
            self.b = torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            return self.a.elapsed_time(self.b)
        return (time.perf_counter() - self.t) * 1e3


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)

    def q(p):
        if len(xs) == 1:
            return xs[0]
        k = (len(xs) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return q(0.5), q(0.2), q(0.8)


def time_mode(run: Callable[[], torch.Tensor], leaves: list, mode: str, device: str, warmup: int, reps: int):
    """Times one provider in one mode; returns (median, p20, p80) in ms."""
    timer = _Timer(device)
    samples = []
    for i in range(warmup + reps):
        for t in leaves:
            t.grad = None
        if mode == "fwd":
            timer.start()
            run()
            ms = timer.stop()
        elif mode == "bwd":
            loss = run()
            if device == "cuda":
                torch.cuda.synchronize()
            timer.start()
            loss.backward()
            ms = timer.stop()
        else:
            timer.start()
            run().backward()
            ms = timer.stop()
        if i >= warmup:
            samples.append(ms)
    return _quantiles(samples)


def cpu_peak_mb(call: Callable[[], object]) -> float:
    """Peak resident memory `call` adds beyond what is resident before it, in MB
    (Linux: the high-water mark is reset through /proc/self/clear_refs; NaN
    elsewhere). Freed memory, fusedloss's cached output buffers included, is
    returned to the system first, so the baseline is what the inputs hold."""
    import ctypes
    import gc

    import fusedloss

    gc.collect()
    fusedloss.empty_cpu_cache()  # cached output buffers would hide what the call needs
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = rss_mb("VmRSS")
        call()
        peak = rss_mb("VmHWM")
    except OSError:
        return float("nan")
    return max(peak - base, 0.0)


def cpu_call_peak_mb(run: Callable[[], torch.Tensor], leaves: list, mode: str) -> float:
    """cpu_peak_mb of one call of `run` (and its backward unless mode is fwd)
    from the inputs alone: gradients left by earlier calls are dropped before
    the baseline is taken, or the call would reuse their memory unseen."""
    for t in leaves:
        t.grad = None
    return cpu_peak_mb(lambda: _one_call(run, leaves, mode))


def _one_call(run: Callable[[], torch.Tensor], leaves: list, mode: str) -> None:
    for t in leaves:
        t.grad = None
    loss = run()
    if mode != "fwd":
        loss.backward()
    del loss
    for t in leaves:
        t.grad = None


def measure_copy_gbps(device: str, nbytes: int | None = None, reps: int = 10) -> float:
    """Bandwidth of a large tensor copy, counting bytes read plus written
    (2 GiB on a GPU, far beyond its L2; 512 MiB on the CPU)."""
    if nbytes is None:
        nbytes = 1 << 31 if device == "cuda" else 1 << 29
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    timer = _Timer(device)
    samples = []
    for i in range(3 + reps):
        timer.start()
        dst.copy_(src)
        ms = timer.stop()
        if i >= 3:
            samples.append(ms)
    med = _quantiles(samples)[0]
    return 2 * nbytes / (med * 1e-3) / 1e9


def git_sha() -> str:
    if os.environ.get("FUSEDLOSS_GIT_SHA"):  # a copy of the tree without .git (e.g. a GPU machine)
        return os.environ["FUSEDLOSS_GIT_SHA"]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def run(
    cases: list[Case],
    device: str,
    providers=PROVIDERS,
    modes=MODES,
    warmup: int = 3,
    reps: int = 10,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[dict]:
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    sha = git_sha()
    dev_name = device_name(device)
    rows = []
    total = len(cases) * len(providers)
    step = 0
    for case in cases:
        dtype = _DTYPES[case.dtype]
        problem = case.build(case.shape, dtype, device)
        compiled = None
        for provider in list(providers) + [p for p in problem.others if p not in providers]:
            if provider in problem.skip:
                continue
            step += 1
            if progress:
                progress(
                    step, total, f"{case.loss} {case.case} {'x'.join(map(str, case.shape))} {case.dtype} {provider}"
                )
            if provider == "fusedloss":
                fn = problem.fused
            elif provider in problem.others:
                fn = problem.others[provider]
            elif provider == "torch":
                fn = lambda p=problem: p.native(*p.native_args)
            else:
                torch._dynamo.reset()
                compiled = torch.compile(problem.native)
                fn = lambda c=compiled, p=problem: c(*p.native_args)
            for mode in problem.modes or modes:
                if device == "cuda":
                    # The baseline holds the inputs only: no gradient left over
                    # from the previous mode.
                    for t in problem.leaves:
                        t.grad = None
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                med, p20, p80 = time_mode(
                    fn, problem.leaves, mode, device, problem.warmup or warmup, problem.reps or reps
                )
                if device == "cuda":
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                elif provider == "gemms":
                    peak = float("nan")  # the GEMMs alone, a time floor: no loss to hold
                else:
                    # One more call, after warm-up (and compilation), from the
                    # inputs alone: what the call itself holds at its peak.
                    peak = cpu_call_peak_mb(fn, problem.leaves, mode)
                rows.append(
                    {
                        "loss": case.loss,
                        "case": case.case,
                        "provider": provider,
                        "mode": mode,
                        "dtype": case.dtype,
                        "shape": "x".join(map(str, case.shape)),
                        "device": dev_name,
                        "median_ms": med,
                        "p20_ms": p20,
                        "p80_ms": p80,
                        "gbps": problem.bytes[mode] / (med * 1e-3) / 1e9,
                        "peak_mem_mb": peak,
                        "torch": torch.__version__,
                        "git_sha": sha,
                    }
                )
        problem = compiled = fn = None  # free this case's tensors before the next
    return rows


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------


def _key(r):
    return (r["loss"], r["case"], r["dtype"], r["shape"])


def summary(rows: list[dict], copy_gbps: float | None = None) -> list[dict]:
    """One line per case and mode: fusedloss time and its ratio to each other provider."""
    by = {}
    for r in rows:
        by.setdefault((_key(r), r["mode"]), {})[r["provider"]] = r
    out = []
    for (key, mode), prov in by.items():
        f = prov.get("fusedloss")
        if f is None:
            continue
        line = {
            "loss": key[0],
            "case": key[1],
            "dtype": key[2],
            "shape": key[3],
            "mode": mode,
            "fusedloss_ms": f["median_ms"],
            "gbps": f["gbps"],
        }
        for other in ("torch", "torch.compile", "torch.chunked", "gemms", "liger"):
            if other in prov:
                line[f"{other}_ms"] = prov[other]["median_ms"]
                line[f"ratio_vs_{other}"] = f["median_ms"] / prov[other]["median_ms"]
        if key[0] == "linear_cross_entropy":
            line["tflops"] = lce_tflops(key[3], f["median_ms"])
            for p, r in prov.items():
                if r.get("peak_mem_mb") == r.get("peak_mem_mb"):  # not NaN
                    line[f"{p}_peak_mb"] = r["peak_mem_mb"]
        if copy_gbps:
            line["copy_fraction"] = f["gbps"] / copy_gbps
        out.append(line)
    return out


def format_table(rows: list[dict], copy_gbps: float | None = None, modes=("full",)) -> str:
    """The summary as text: one line per case, fusedloss's time, the others'
    times and the ratios (fusedloss / other), achieved GB/s and share of copy."""
    lines = [ln for ln in summary(rows, copy_gbps) if ln["mode"] in modes]
    others = [
        o for o in ("torch", "torch.compile", "torch.chunked", "gemms", "liger") if any(f"{o}_ms" in ln for ln in lines)
    ]
    label = {
        "torch": "eager",
        "torch.compile": "compile",
        "torch.chunked": "chunked",
        "gemms": "3 gemms",
        "liger": "liger",
    }
    nan = float("nan")
    cols = [("loss", 16), ("case", 14), ("dtype", 6), ("shape", 14), ("mode", 5)]
    head = "".join(f"{name:<{w}}" for name, w in cols) + f"{'fused ms':>10}"
    head += "".join(f"{label[o] + ' ms':>12}" for o in others)
    head += (
        "".join(f"{'vs ' + label[o]:>11}" for o in others) + f"{'GB/s':>8}" + (f"{'of copy':>8}" if copy_gbps else "")
    )
    out = [head, "-" * len(head)]
    for ln in lines:
        s = "".join(f"{ln[name]:<{w}}" for name, w in cols) + f"{ln['fusedloss_ms']:>10.3f}"
        s += "".join(f"{ln.get(f'{o}_ms', nan):>12.3f}" for o in others)
        s += "".join(f"{ln.get(f'ratio_vs_{o}', nan):>11.3f}" for o in others) + f"{ln['gbps']:>8.1f}"
        if copy_gbps:
            s += f"{ln.get('copy_fraction', nan):>8.0%}"
        out.append(s)
    peaks = [ln for ln in lines if any(k.endswith("_peak_mb") for k in ln)]
    if peaks:  # cases that measure memory (linear_cross_entropy): peak beyond the inputs, and TFLOP/s
        out.append("")
        out.append("peak memory beyond the inputs (MB), fwd+bwd:")
        for ln in peaks:
            mems = ", ".join(
                f"{label.get(k[: -len('_peak_mb')], k[: -len('_peak_mb')])} {v:.0f}"
                for k, v in ln.items()
                if k.endswith("_peak_mb")
            )
            out.append(f"  {ln['loss']} {ln['dtype']} {ln['shape']}: {mems}; fusedloss {ln['tflops']:.2f} TFLOP/s")
    return "\n".join(out)


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in CSV_COLUMNS})


def write_json(rows: list[dict], path: str, copy_gbps: float | None, device: str) -> None:
    with open(path, "w") as f:
        json.dump(
            {
                "device": device_name(device),
                "torch": torch.__version__,
                "copy_gbps": copy_gbps,
                "rows": rows,
                "summary": summary(rows, copy_gbps),
            },
            f,
            indent=1,
        )


def plot(rows: list[dict], path: str, copy_gbps: float | None = None) -> None:
    """Speedup over torch eager and torch.compile, and fusedloss's bandwidth,
    against problem size (fwd+bwd), one column of panels per loss."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from e
    lines = [ln for ln in summary(rows, copy_gbps) if ln["mode"] == "full"]
    losses = sorted({ln["loss"] for ln in lines})
    cols = min(4, len(losses))
    grid_rows = (len(losses) + cols - 1) // cols
    fig, grid = plt.subplots(2 * grid_rows, cols, figsize=(4.5 * cols, 6.5 * grid_rows), squeeze=False)
    for spare in range(len(losses), grid_rows * cols):
        grid[2 * (spare // cols)][spare % cols].axis("off")
        grid[2 * (spare // cols) + 1][spare % cols].axis("off")
    for n, loss in enumerate(losses):
        j = n % cols
        axes = grid[2 * (n // cols) : 2 * (n // cols) + 2]
        series = {}
        for ln in lines:
            if ln["loss"] == loss:
                n = math.prod(int(v) for v in ln["shape"].split("x"))
                series.setdefault(f"{ln['case']} {ln['dtype']}", []).append((n, ln))
        for label, pts in sorted(series.items()):
            pts.sort(key=lambda p: p[0])
            xs = [p[0] for p in pts]
            for other, style in (("torch", "-o"), ("torch.compile", "--s")):
                ys = [1 / p[1][f"ratio_vs_{other}"] for p in pts if f"ratio_vs_{other}" in p[1]]
                if ys:
                    axes[0][j].plot(xs[: len(ys)], ys, style, label=f"{label} vs {other}")
            axes[1][j].plot(xs, [p[1]["gbps"] for p in pts], "-o", label=label)
        axes[0][j].set_title(loss)
        axes[0][j].axhline(1.0, color="gray", lw=0.8)
        axes[0][j].set_xscale("log")
        axes[0][j].set_ylabel("speedup (x), fwd+bwd")
        axes[0][j].legend(fontsize=7)
        axes[1][j].set_xscale("log")
        axes[1][j].set_xlabel("elements")
        axes[1][j].set_ylabel("fusedloss GB/s (bytes formula)")
        if copy_gbps:
            axes[1][j].axhline(copy_gbps, color="gray", ls=":", label=f"copy {copy_gbps:.0f} GB/s")
        axes[1][j].legend(fontsize=7)
    dev = rows[0]["device"] if rows else ""
    version = rows[0]["torch"] if rows else torch.__version__
    fig.suptitle(f"fusedloss vs torch {version} on {dev} (fwd+bwd)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress_bar(step: int, total: int, label: str, stream=sys.stderr) -> None:
    width = 28
    done = int(width * step / max(total, 1))
    stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} {label[:60]:<60}")
    if step == total:
        stream.write("\n")
    stream.flush()
