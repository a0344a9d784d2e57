"""Benchmark suites beyond the per-loss throughput cases of benchmark.py, for
``python -m fusedloss bench --suite ...``:

* ``small``: per-call time of small losses (the classifier and regression
  heads most models train with), where per-call overhead, not the math,
  decides: fwd+bwd, and forward only under no_grad (evaluation loops).
* ``autocast``: each loss on bf16 inputs inside ``torch.autocast`` against the
  same call outside it: time and peak memory (no fp32 copies means the same
  memory), for fusedloss and torch.
* ``step``: a whole training step of a small Llama-style model (2 layers,
  8 x 256 tokens, V=32000), eager and under torch.compile, with torch's loss
  and with fusedloss's, next to the loss alone.

Every suite returns rows with benchmark.CSV_COLUMNS; all times in one process.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from . import benchmark as B

# ---------------------------------------------------------------------------
# small
# ---------------------------------------------------------------------------

# (loss, builder, shape): the sizes the speed target for small calls names.
SMALL_CASES = [
    ("cross_entropy", B._ce, (32, 10)),
    ("cross_entropy", B._ce, (256, 10)),
    ("cross_entropy", B._ce, (256, 1000)),
    # between them: classifier heads of 100-1000 classes over few rows
    ("cross_entropy", B._ce, (128, 100)),
    ("cross_entropy", B._ce, (32, 1000)),
    ("bce_with_logits", B._bce, (256,)),
    ("bce_with_logits", B._bce, (256, 64)),
    ("mse", B._mse, (256,)),
    ("mse", B._mse, (256, 64)),
    ("multi_margin", B._multi_margin, (64, 10)),
    ("hinge_embedding", lambda s, d, dev: B._pair("hinge_embedding", s, d, dev), (256,)),
    ("soft_margin", lambda s, d, dev: B._pair("soft_margin", s, d, dev), (256,)),
    ("hinge", lambda s, d, dev: B._pair("hinge", s, d, dev), (256,)),
    # and the other losses at the sizes of small heads
    ("sigmoid_focal", B._focal, (256, 80)),
    ("multilabel_soft_margin", B._multilabel_soft_margin, (64, 10)),
    ("kl_div_with_logits", B._distill, (32, 1000)),
    ("linear_cross_entropy", B._lce, (32, 64, 1000)),
]


def _per_call_us(call: Callable[[], None], target_ms: float = 3.0) -> Callable[[], float]:
    """A sampler: each sample runs `call` enough times to take ~target_ms and
    returns microseconds per call (a single call is too short to time)."""
    call()
    t = time.perf_counter()
    n = 0
    while time.perf_counter() - t < target_ms * 1e-3:
        call()
        n += 1
    n = max(n, 1)

    def sample() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        return (time.perf_counter() - t0) / n * 1e6

    return sample


def run_small(device: str, reps: int = 15, progress=None, cases=None) -> list[dict]:
    """Providers are sampled in turn, round after round, so that drifts in the
    machine's load hit all of them alike. `cases`: a subset of SMALL_CASES."""
    sha, dev_name = B.git_sha(), B.device_name(device)
    rows = []
    cases = SMALL_CASES if cases is None else cases
    for i, (loss, build, shape) in enumerate(cases):
        if progress:
            progress(i + 1, len(cases), f"small {loss} {'x'.join(map(str, shape))}")
        p = build(shape, torch.float32, device)
        torch._dynamo.reset()
        compiled = torch.compile(p.native)
        fns = {
            "fusedloss": p.fused,
            "torch": lambda p=p: p.native(*p.native_args),
            "torch.compile": lambda c=compiled, p=p: c(*p.native_args),
        }
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for mode in ("full", "fwd_nograd"):
            samplers = {}
            for name, fn in fns.items():

                def call(fn=fn, mode=mode, leaves=p.leaves, sync=sync):
                    if mode == "full":
                        for t in leaves:
                            t.grad = None
                        fn().backward()
                    else:
                        with torch.no_grad():
                            fn()
                    sync()

                samplers[name] = _per_call_us(call)
            samples = {name: [] for name in fns}
            for _ in range(reps):
                for name, sampler in samplers.items():
                    samples[name].append(sampler())
            for name, xs in samples.items():
                med, p20, p80 = B._quantiles(xs)
                rows.append(_row(loss, "small", name, mode, "fp32", shape, dev_name, med / 1e3, p20 / 1e3, p80 / 1e3,
                                 sha=sha))  # fmt: skip
    return rows


def _row(loss, case, provider, mode, dtype, shape, device, med_ms, p20_ms, p80_ms, peak=float("nan"), sha=""):
    return {
        "loss": loss,
        "case": case,
        "provider": provider,
        "mode": mode,
        "dtype": dtype,
        "shape": "x".join(map(str, shape)),
        "device": device,
        "median_ms": med_ms,
        "p20_ms": p20_ms,
        "p80_ms": p80_ms,
        "gbps": float("nan"),
        "peak_mem_mb": peak,
        "torch": torch.__version__,
        "git_sha": sha,
    }


def format_small(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        if r["case"] == "small":
            by.setdefault((r["loss"], r["shape"], r["mode"]), {})[r["provider"]] = r["median_ms"] * 1e3
    head = f"{'loss':<24}{'shape':<12}{'mode':<12}{'fused us':>10}{'eager us':>10}{'compile us':>12}"
    head += f"{'vs eager':>10}{'vs compile':>12}"
    out = [head, "-" * len(head)]
    for (loss, shape, mode), t in by.items():
        f, e, c = t.get("fusedloss", math.nan), t.get("torch", math.nan), t.get("torch.compile", math.nan)
        out.append(f"{loss:<24}{shape:<12}{mode:<12}{f:>10.1f}{e:>10.1f}{c:>12.1f}{f / e:>10.2f}{f / c:>12.2f}")
    return "\n".join(out)


# ---------------------------------------------------------------------------
# autocast
# ---------------------------------------------------------------------------


def _autocast_problems(device: str, quick: bool):
    """(loss, shape, builder) on bf16 inputs; builders return (fused, torch, leaves)."""
    import fusedloss.functional as FF

    def ce(shape):
        x = torch.randn(shape, dtype=torch.bfloat16, device=device, requires_grad=True)
        t = torch.randint(0, shape[1], (shape[0],), device=device)
        return (lambda: FF.cross_entropy(x, t)), (lambda: F.cross_entropy(x, t)), [x]

    def pair(name, fused, native, target):
        def build(shape):
            x = torch.randn(shape, dtype=torch.bfloat16, device=device, requires_grad=True)
            y = target(shape)
            return (lambda: fused(x, y)), (lambda: native(x, y)), [x]

        return build

    rand = lambda s: torch.rand(s, dtype=torch.bfloat16, device=device)  # noqa: E731
    sign = lambda s: (torch.randint(0, 2, s, device=device) * 2 - 1).to(torch.bfloat16)  # noqa: E731

    def mm(shape):
        x = torch.randn(shape, dtype=torch.bfloat16, device=device, requires_grad=True)
        t = torch.randint(0, shape[1], (shape[0],), device=device)
        return (lambda: FF.multi_margin_loss(x, t)), (lambda: F.multi_margin_loss(x, t)), [x]

    def focal(shape):
        x = torch.randn(shape, dtype=torch.bfloat16, device=device, requires_grad=True)
        y = rand(shape).round()
        try:
            from torchvision.ops import sigmoid_focal_loss as native
        except ImportError:
            native = None
        torch_fn = (lambda: native(x, y, reduction="mean")) if native else None
        return (lambda: FF.sigmoid_focal_loss(x, y, reduction="mean")), torch_fn, [x]

    def kl(shape):
        s = torch.randn(shape, dtype=torch.bfloat16, device=device, requires_grad=True)
        t = torch.randn(shape, dtype=torch.bfloat16, device=device)

        def native():
            ls, lt = F.log_softmax(s / 2.0, -1), F.log_softmax(t / 2.0, -1)
            return F.kl_div(ls, lt, reduction="batchmean", log_target=True) * 4.0

        return (lambda: FF.kl_div_with_logits(s, t, temperature=2.0)), native, [s]

    def lce(shape):
        n, d, v = shape
        x = torch.randn((n, d), dtype=torch.bfloat16, device=device, requires_grad=True)
        w = (torch.randn((v, d), dtype=torch.bfloat16, device=device) / d**0.5).requires_grad_()
        t = torch.randint(0, v, (n,), device=device)
        native = getattr(F, "linear_cross_entropy", None)
        torch_fn = (lambda: native(x, w, t)) if native else (lambda: F.cross_entropy(F.linear(x, w), t))
        return (lambda: FF.linear_cross_entropy(x, w, t)), torch_fn, [x, w]

    big = (4096, 4096) if not quick else (2048, 2048)
    out = [("cross_entropy", (2048, 32000), ce)]
    if not quick:
        out.append(("cross_entropy", (4096, 32000), ce))
    out += [
        (
            "bce_with_logits",
            big,
            pair("bce", FF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, rand),
        ),
        ("mse", big, pair("mse", FF.mse_loss, F.mse_loss, rand)),
        ("hinge_embedding", big, pair("he", FF.hinge_embedding_loss, F.hinge_embedding_loss, sign)),
        ("soft_margin", big, pair("sm", FF.soft_margin_loss, F.soft_margin_loss, sign)),
        ("multi_margin", (16384, 1000) if not quick else (4096, 1000), mm),
        ("sigmoid_focal", big, focal),
        (
            "multilabel_soft_margin",
            big,
            pair("mlsm", FF.multilabel_soft_margin_loss, F.multilabel_soft_margin_loss, lambda s: rand(s).round()),
        ),
        ("kl_div_with_logits", (1024, 32000) if not quick else (512, 32000), kl),
        ("linear_cross_entropy", (2048, 512, 32000) if not quick else (1024, 256, 32000), lce),
    ]
    return out


def run_autocast(device: str, quick: bool, reps: int = 5, warmup: int = 2, progress=None, losses=None) -> list[dict]:
    """fwd+bwd of each loss on bf16 inputs, outside autocast ("no_autocast") and inside
    torch.autocast(bf16) ("autocast"): median time, and peak memory beyond the
    inputs (CUDA: max_memory_allocated; CPU: peak resident memory)."""
    sha, dev_name = B.git_sha(), B.device_name(device)
    rows = []
    problems = [p for p in _autocast_problems(device, quick) if losses is None or p[0] in losses]
    for i, (loss, shape, build) in enumerate(problems):
        if progress:
            progress(i + 1, len(problems), f"autocast {loss} {'x'.join(map(str, shape))}")
        fused, native, leaves = build(shape)
        for provider, fn in (("fusedloss", fused), ("torch", native)):
            if fn is None:  # the reference is not installed
                continue
            for case in ("no_autocast", "autocast"):

                def call(fn=fn, case=case):
                    if case == "autocast":
                        with torch.autocast(device, dtype=torch.bfloat16):
                            return fn()
                    return fn()

                try:
                    med, p20, p80 = B.time_mode(call, leaves, "full", device, warmup, reps)
                except (NotImplementedError, RuntimeError) as e:
                    # torch has no kernel for this dtype here (e.g. CPU
                    # multi_margin_loss on bf16 outside autocast): a row
                    # without figures, and the table says so.
                    if provider == "fusedloss":
                        raise
                    nan = math.nan
                    rows.append(_row(loss, case, provider, "full", "bf16", shape, dev_name, nan, nan, nan, nan, sha))
                    rows[-1]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                    continue
                if device == "cuda":
                    for t in leaves:
                        t.grad = None
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    B._one_call(call, leaves, "full")
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                else:
                    peak = B.cpu_call_peak_mb(call, leaves, "full")
                rows.append(_row(loss, case, provider, "full", "bf16", shape, dev_name, med, p20, p80, peak, sha))
        fused = native = leaves = None
    return rows


def format_autocast(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        if r["case"] in ("no_autocast", "autocast") and r["dtype"] == "bf16" and r["mode"] == "full":
            by.setdefault((r["loss"], r["shape"]), {})[(r["provider"], r["case"])] = r
    head = (
        f"{'loss':<24}{'shape':<16}{'fused ms':>10}{'in autocast':>12}{'time x':>8}{'fused MB':>10}"
        f"{'in autocast':>12}{'mem x':>7}{'torch ac ms':>12}{'torch ac MB':>12}"
    )
    out = [head, "-" * len(head)]
    for (loss, shape), r in by.items():
        fp, fa = r[("fusedloss", "no_autocast")], r[("fusedloss", "autocast")]
        ta = r.get(("torch", "autocast"))
        out.append(
            f"{loss:<24}{shape:<16}{fp['median_ms']:>10.2f}{fa['median_ms']:>12.2f}"
            f"{fa['median_ms'] / fp['median_ms']:>8.2f}{fp['peak_mem_mb']:>10.1f}{fa['peak_mem_mb']:>12.1f}"
            f"{fa['peak_mem_mb'] / fp['peak_mem_mb'] if fp['peak_mem_mb'] else math.nan:>7.2f}"
            f"{ta['median_ms'] if ta else math.nan:>12.2f}{ta['peak_mem_mb'] if ta else math.nan:>12.1f}"
        )
    return "\n".join(out)


# ---------------------------------------------------------------------------
# step: a compiled training step
# ---------------------------------------------------------------------------


class _RMSNorm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class _Block(torch.nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = _RMSNorm(d), _RMSNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.out = torch.nn.Linear(d, d, bias=False)
        self.up = torch.nn.Linear(d, 2 * ffn, bias=False)
        self.down = torch.nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.out(a)
        gate, up = self.up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class TinyLlama(torch.nn.Module):
    """A 2-layer Llama-style decoder (RMSNorm, causal attention, SwiGLU) whose
    language-model head dominates at V=32000, as in small LM training runs."""

    def __init__(self, vocab=32000, d=256, heads=4, ffn=688, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList([_Block(d, heads, ffn) for _ in range(layers)])
        self.norm = _RMSNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def run_step(device: str, quick: bool, reps: int = 5, warmup: int = 2, progress=None, sizes=None) -> list[dict]:
    """A training step (forward, loss, backward, SGD update) of TinyLlama on 8 x
    256 tokens, eager and compiled (torch.compile of the whole step), with
    torch's cross_entropy and fusedloss's; and the loss alone on the same
    logits (torch eager, torch.compile, fusedloss) for the standalone saving."""
    import fusedloss.functional as FF

    sha, dev_name = B.git_sha(), B.device_name(device)
    batch, seq, vocab = sizes or ((8, 256, 32000) if not quick else (4, 128, 32000))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    labels = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    shape = (batch * seq, vocab)
    rows = []
    variants = [(m, lf) for m in ("eager", "compiled") for lf in ("torch", "fusedloss")]
    steps = {}
    torch._dynamo.reset()
    for i, (mode, loss_name) in enumerate(variants):
        if progress:
            progress(i + 1, len(variants) + 1, f"step {mode} {loss_name}: warm-up")
        torch.manual_seed(0)
        model = TinyLlama(vocab).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        loss_fn = F.cross_entropy if loss_name == "torch" else FF.cross_entropy

        def step(model=model, opt=opt, loss_fn=loss_fn):
            logits = model(ids)
            loss = loss_fn(logits.view(-1, vocab), labels.view(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        fn = torch.compile(step) if mode == "compiled" else step
        for _ in range(warmup):
            fn()
        steps[(mode, loss_name)] = fn
    # Round after round, each variant once: drifts in the machine's load hit
    # all of them alike.
    samples = {k: [] for k in steps}
    for _ in range(reps):
        for k, fn in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            samples[k].append((time.perf_counter() - t) * 1e3)
    for (mode, loss_name), xs in samples.items():
        med, p20, p80 = B._quantiles(xs)
        rows.append(_row("training_step", f"step-{mode}", loss_name, "full", "fp32", shape, dev_name, med, p20, p80,
                         sha=sha))  # fmt: skip
    steps = None
    if progress:
        progress(len(variants) + 1, len(variants) + 1, "step: the loss alone")
    logits = torch.randn(shape, device=device, requires_grad=True)
    flat = labels.view(-1)
    torch._dynamo.reset()
    compiled_ce = torch.compile(F.cross_entropy)
    for provider, fn in (
        ("torch", lambda: F.cross_entropy(logits, flat)),
        ("torch.compile", lambda: compiled_ce(logits, flat)),
        ("fusedloss", lambda: FF.cross_entropy(logits, flat)),
    ):
        med, p20, p80 = B.time_mode(fn, [logits], "full", device, warmup, reps)
        rows.append(_row("training_step", "loss-alone", provider, "full", "fp32", shape, dev_name, med, p20, p80,
                         sha=sha))  # fmt: skip
    return rows


def format_step(rows: list[dict]) -> str:
    t = {(r["case"], r["provider"]): r["median_ms"] for r in rows if r["loss"] == "training_step"}
    if not t:
        return ""
    lines = [f"{'':<28}{'torch loss ms':>14}{'fusedloss ms':>14}{'saving ms':>11}"]
    for mode in ("eager", "compiled"):
        a, b = t.get((f"step-{mode}", "torch"), math.nan), t.get((f"step-{mode}", "fusedloss"), math.nan)
        lines.append(f"{'training step, ' + mode:<28}{a:>14.1f}{b:>14.1f}{a - b:>11.1f}")
    f = t.get(("loss-alone", "fusedloss"), math.nan)
    for prov, label in (("torch", "eager"), ("torch.compile", "compiled")):
        a = t.get(("loss-alone", prov), math.nan)
        lines.append(f"{'the loss alone, vs ' + label:<28}{a:>14.1f}{f:>14.1f}{a - f:>11.1f}")
    return "\n".join(lines)
