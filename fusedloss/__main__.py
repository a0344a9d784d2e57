"""python -m fusedloss {info,verify,bench}: what was built, is it correct here,
and is it faster here."""

from __future__ import annotations

import argparse
import json
import sys


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _devices(arg: str) -> list[str]:
    import torch

    import fusedloss

    has_cuda = torch.cuda.is_available() and fusedloss.build_info()["cuda"]
    if arg in ("cuda", "all") and not has_cuda and arg == "cuda":
        if not fusedloss.build_info()["cuda"]:
            raise CliError(
                "--device cuda: this fusedloss was built without CUDA kernels (see `python -m fusedloss info`)"
            )
        raise CliError("--device cuda: no CUDA device is visible to torch")
    if arg == "all":
        return ["cpu"] + (["cuda"] if has_cuda else [])
    if arg == "auto":
        return ["cuda"] if has_cuda else ["cpu"]
    return [arg]


# ---------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------


def cmd_info(args) -> int:
    import torch

    import fusedloss

    b = fusedloss.build_info()
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    info = {
        "fusedloss": b["version"],
        "torch (built against)": b["torch_version"],
        "torch (running)": torch.__version__,
        "CUDA kernels": "yes" if b["cuda"] else f"no ({b.get('cuda_skipped_reason') or 'not built'})",
        "CUDA archs": ";".join(b["cuda_archs"]) or "-",
        "CUDA toolkit": b.get("cuda_home") or "-",
        "torch CUDA": torch.version.cuda or "-",
        "OpenMP": "on" if b["openmp"] else "off",
        "CPU kernels": b.get("cpu_capability", "DEFAULT"),
        "CPU threads": str(torch.get_num_threads()),
        "visible GPUs": ", ".join(gpus) or "none",
    }
    if args.json:
        print(json.dumps({"build": b, "torch_running": torch.__version__, "visible_gpus": gpus}, indent=1))
        return 0
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    return 0


# ---------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------


def verify_cases(device: str, quick: bool):
    """(label, loss name, args, kwargs) covering every loss and its main options."""
    import torch
    import torch.nn.functional as F

    dtypes = [torch.float32, torch.bfloat16] if quick else [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    shapes = [(16, 33)] if quick else [(16, 33), (4, 3, 8, 8), (5000,)]
    g = torch.Generator().manual_seed(0)

    def t(shape, dtype, lo=-4.0, hi=4.0, rg=False):
        x = torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo
        return x.to(device=device, dtype=dtype).requires_grad_(rg)

    def classes(shape, C, ignore=None):
        c = torch.randint(0, C, shape, generator=g)
        if ignore is not None and c.numel():
            c.view(-1)[::4] = ignore
        return c.to(device)

    def pm1(shape, dtype):
        return torch.sign(t(shape, dtype))

    for dtype in dtypes:
        dn = str(dtype).replace("torch.", "")
        for shape in shapes:
            sn = "x".join(map(str, shape))
            for red in ("none", "mean", "sum"):
                tag = f"{dn} {sn} {red}"
                yield (
                    f"bce_with_logits {tag}",
                    "binary_cross_entropy_with_logits",
                    (t(shape, dtype, rg=True), t(shape, dtype, 0, 1, rg=True)),
                    {"reduction": red},
                )
                yield (
                    f"bce_with_logits+pos_weight {tag}",
                    "binary_cross_entropy_with_logits",
                    (t(shape, dtype, rg=True), t(shape, dtype, 0, 1)),
                    {"reduction": red, "pos_weight": t(shape[-1:], dtype, 0, 3)},
                )
                yield f"mse {tag}", "mse_loss", (t(shape, dtype, rg=True), t(shape, dtype, rg=True)), {"reduction": red}
                yield (
                    f"hinge_embedding {tag}",
                    "hinge_embedding_loss",
                    (t(shape, dtype, rg=True), pm1(shape, dtype)),
                    {"reduction": red, "margin": 0.7},
                )
                yield (
                    f"soft_margin {tag}",
                    "soft_margin_loss",
                    (t(shape, dtype, rg=True), pm1(shape, dtype)),
                    {"reduction": red},
                )
                yield (
                    f"hinge {tag}",
                    "hinge_loss",
                    (t(shape, dtype, rg=True), pm1(shape, dtype).requires_grad_()),
                    {"reduction": red, "squared": True},
                )
                if len(shape) >= 2:
                    C = shape[1]
                    batch = (shape[0], *shape[2:])
                    yield (
                        f"cross_entropy {tag}",
                        "cross_entropy",
                        (t(shape, dtype, rg=True), classes(batch, C)),
                        {"reduction": red},
                    )
                    yield (
                        f"cross_entropy+weight,ignore,smoothing {tag}",
                        "cross_entropy",
                        (t(shape, dtype, rg=True), classes(batch, C, ignore=1)),
                        {"reduction": red, "weight": t((C,), dtype, 0.5, 2), "ignore_index": 1, "label_smoothing": 0.1},
                    )
                    yield (
                        f"cross_entropy probabilities {tag}",
                        "cross_entropy",
                        (t(shape, dtype, rg=True), t(shape, dtype, 0, 1, rg=True)),
                        {"reduction": red},
                    )
                # linear_cross_entropy against torch >= 2.14's reference path. fp32/fp64:
                # in fp16/bf16 its gradients are GEMMs over a rounded dlogits, which
                # tests/test_linear_cross_entropy.py judges with that rounding allowed for.
                if len(shape) == 2 and dtype in (torch.float32, torch.float64) and hasattr(F, "linear_cross_entropy"):
                    n, d = shape
                    yield (
                        f"linear_cross_entropy+bias,weight {tag}",
                        "linear_cross_entropy",
                        (
                            t(shape, dtype, -1, 1, rg=True),
                            t((97, d), dtype, -0.3, 0.3, rg=True),
                            classes((n,), 97, -100),
                        ),
                        {
                            "reduction": red,
                            "linear_bias": t((97,), dtype, rg=True),
                            "weight": t((97,), dtype, 0.5, 2),
                            "label_smoothing": 0.1,
                        },
                    )
                if len(shape) == 2 and dtype in (torch.float32, torch.float64):  # torch's CPU kernel: fp32/fp64
                    yield (
                        f"multi_margin {tag}",
                        "multi_margin_loss",
                        (t(shape, dtype, rg=True), classes(shape[:1], shape[1])),
                        {"reduction": red, "p": 2, "weight": t((shape[1],), dtype, 0.5, 2)},
                    )
    yield from new_loss_verify_cases(device, quick)


def cmd_verify(args) -> int:
    from fusedloss.testing import assert_matches_torch

    failures = 0
    total = 0
    print(f"{'device':<7}{'case':<60}{'result':<8}{'max |err| loss':>15}{'max |err| grad':>16}")
    for device in _devices(args.device):
        for label, name, a, kw in verify_cases(device, args.quick):
            total += 1
            try:
                rep = assert_matches_torch(name, *a, **kw)
                ok, err = True, ""
            except AssertionError as e:
                ok, rep, err = False, {}, str(e).splitlines()[0]
                failures += 1
            gerr = max((v for k, v in rep.items() if k.startswith("grad")), default=0.0)
            print(
                f"{device:<7}{label:<60}{'PASS' if ok else 'FAIL':<8}"
                f"{rep.get('loss', float('nan')):>15.3g}{gerr:>16.3g}"
            )
            if err:
                print(f"       {err}")
    print(
        f"{total - failures}/{total} passed (errors: against torch for fp32/fp64, against a float64 run for fp16/bf16)"
    )
    return 1 if failures else 0


# sigmoid_focal_loss (against torchvision's, where installed), multilabel soft
# margin, and distillation (against torch.nn.functional's log_softmax and
# kl_div: fusedloss.testing's references). Joined to verify_cases here, so
# that this block stands alone.


def new_loss_verify_cases(device: str, quick: bool):
    import torch

    dtypes = [torch.float32, torch.bfloat16] if quick else [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    g = torch.Generator().manual_seed(1)

    def t(shape, dtype, lo=-4.0, hi=4.0, rg=False):
        x = torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo
        return x.to(device=device, dtype=dtype).requires_grad_(rg)

    for dtype in dtypes:
        dn = str(dtype).replace("torch.", "")
        for shape in [(16, 33)] if quick else [(16, 33), (2, 80, 6, 6)]:
            sn = "x".join(map(str, shape))
            for red in ("none", "mean", "sum"):
                tag = f"{dn} {sn} {red}"
                yield (
                    f"sigmoid_focal {tag}",
                    "sigmoid_focal_loss",
                    (t(shape, dtype, rg=True), t(shape, dtype, 0, 1, rg=True)),
                    {"reduction": red},
                )
                yield (
                    f"sigmoid_focal alpha=-1,gamma=1.5 {tag}",
                    "sigmoid_focal_loss",
                    (t(shape, dtype, rg=True), t(shape, dtype, 0, 1)),
                    {"reduction": red, "alpha": -1, "gamma": 1.5},
                )
                yield (
                    f"multilabel_soft_margin+weight {tag}",
                    "multilabel_soft_margin_loss",
                    (t(shape, dtype, rg=True), t(shape, dtype, 0, 1, rg=True)),
                    {"reduction": red, "weight": t(shape[-1:], dtype, 0.5, 2)},
                )
        for red in ("batchmean", "none", "mean", "sum"):
            tag = f"{dn} 4x5x1000 {red}"
            target = torch.randint(0, 1000, (4, 5), generator=g)
            target[0, :2] = -100
            target = target.to(device)
            yield (
                f"kl_div_with_logits T=2,ignored rows {tag}",
                "kl_div_with_logits",
                (t((4, 5, 1000), dtype, rg=True), t((4, 5, 1000), dtype, rg=True)),
                {"reduction": red, "temperature": 2.0, "target": target},
            )
            yield (
                f"jsd_with_logits beta=0.3 {tag}",
                "jsd_with_logits",
                (t((4, 5, 1000), dtype, rg=True), t((4, 5, 1000), dtype, rg=True)),
                {"reduction": red, "beta": 0.3, "target": target},
            )


# ---------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------


SUITES = ("losses", "small", "autocast", "step")


def cmd_bench(args) -> int:
    from fusedloss import benchmark as B
    from fusedloss import benchmark_suites as S

    suites = args.suite or (["losses", "small", "autocast"] if args.quick else list(SUITES))
    losses = args.loss or list(B.LOSSES)
    unknown = [name for name in losses if name not in B.LOSSES]
    if unknown:
        raise CliError(f"unknown loss {unknown[0]!r}; choose from: {', '.join(B.LOSSES)}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--plot needs matplotlib (pip install matplotlib)") from None
    all_rows = []
    copies = {}
    tty = sys.stderr.isatty()
    progress = B.progress_bar if tty else None
    torch_version = __import__("torch").__version__
    for device in _devices(args.device):
        header = f"\n{B.device_name(device)}, torch {torch_version}"
        if "losses" in suites:
            cases = [c for loss in losses for c in B.cases_for(loss, device, args.quick)]
            copy = B.measure_copy_gbps(device)
            copies[device] = copy
            reps = args.reps or (5 if args.quick else 10)
            rows = B.run(cases, device, warmup=args.warmup, reps=reps, progress=progress)
            all_rows += rows
            print(
                f"{header}, copy {copy:.1f} GB/s (read+write); fwd+bwd medians; "
                "ratio = fusedloss time / other time; peak MB beyond the inputs"
            )
            print(B.format_table(rows, copy))
        if "small" in suites:
            rows = S.run_small(device, progress=progress, cases=[c for c in S.SMALL_CASES if c[0] in losses])
            all_rows += rows
            print(f"{header}: small calls, microseconds per call (fwd+bwd, and forward under no_grad)")
            print(S.format_small(rows))
        if "autocast" in suites:
            rows = S.run_autocast(device, args.quick, progress=progress, losses=losses)
            all_rows += rows
            print(f"{header}: bf16 inputs, fwd+bwd, outside and inside torch.autocast(bf16); peak MB beyond the inputs")
            print(S.format_autocast(rows))
        if "step" in suites:
            rows = S.run_step(device, args.quick, progress=progress)
            all_rows += rows
            print(f"{header}: a TinyLlama training step (2 layers, V=32000), eager and torch.compile'd")
            print(S.format_step(rows))
    if args.csv:
        B.write_csv(all_rows, args.csv)
    if args.json:
        dev = "cuda" if "cuda" in copies else "cpu"
        B.write_json(all_rows, args.json, copies.get(dev), dev)
    if args.plot:
        loss_rows = [r for r in all_rows if r["case"] not in ("small", "no_autocast", "autocast")]
        loss_rows = [r for r in loss_rows if r["loss"] != "training_step"]
        if loss_rows:
            B.plot(loss_rows, args.plot, copies.get("cuda") or copies.get("cpu"))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedloss", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="how fusedloss was built and what it runs on")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pv = sub.add_parser("verify", help="check every loss against the installed torch here")
    pv.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    pv.add_argument("--quick", action="store_true", help="fewer dtypes and shapes")
    pb = sub.add_parser("bench", help="time fusedloss against torch eager and torch.compile")
    pb.add_argument("--device", choices=["auto", "cpu", "cuda", "all"], default="auto")
    pb.add_argument("--loss", action="append", help="a loss to time (repeatable); default: all")
    pb.add_argument(
        "--suite",
        action="append",
        choices=SUITES,
        help="losses: each loss at scale; small: per-call time of small losses; autocast: inside "
        "torch.autocast vs outside; step: a compiled training step (repeatable; default: all, "
        "or losses, small and autocast with --quick)",
    )
    pb.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    pb.add_argument("--reps", type=int, default=0, help="timed repetitions per measurement")
    pb.add_argument("--warmup", type=int, default=3)
    pb.add_argument("--csv", metavar="F", help="write all rows as CSV")
    pb.add_argument("--json", metavar="F", help="write rows and summary as JSON")
    pb.add_argument("--plot", metavar="F.png", help="write a speedup/bandwidth plot (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        return {"info": cmd_info, "verify": cmd_verify, "bench": cmd_bench}[args.cmd](args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # a build/torch mismatch: fusedloss's message says what to do
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
