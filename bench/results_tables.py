"""Markdown tables for the README from a `python -m fusedloss bench --csv` file.

    python bench/results_tables.py bench/results/cpu-epyc-2core-avx512.csv

One table per suite: losses at scale (fwd+bwd), small calls (fwd+bwd and
forward under no_grad), inside vs outside torch.autocast, and the training
step. Ratios are fusedloss's time over the other's (below 1 is faster).
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict


def _ms(x: float) -> str:
    return f"{x:.2f} ms" if x < 10 else f"{x:.1f} ms"


def _r(a: float, b: float) -> str:
    return "n/a" if not (a == a and b == b and b > 0) else f"{a / b:.2f}"


def tables(rows: list[dict]) -> str:
    for r in rows:
        for k in ("median_ms", "peak_mem_mb"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else float("nan")
    out = []
    by = defaultdict(dict)
    for r in rows:
        by[(r["loss"], r["case"], r["dtype"], r["shape"], r["mode"])][r["provider"]] = r
    # losses at scale
    out.append(
        "| loss | case | shape, dtype | fusedloss | torch eager | torch.compile | vs eager | vs compile | other |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|")
    for (loss, case, dtype, shape, mode), p in by.items():
        if case in ("small", "no_autocast", "autocast") or loss == "training_step" or mode != "full":
            continue
        f, e, c = (p.get(k, {}).get("median_ms", float("nan")) for k in ("fusedloss", "torch", "torch.compile"))
        other = ", ".join(
            f"{k} {_ms(v['median_ms'])} ({_r(f, v['median_ms'])})"
            for k, v in p.items()
            if k not in ("fusedloss", "torch", "torch.compile")
        )
        out.append(
            f"| {loss} | {case} | {shape.replace('x', ' x ')} {dtype} | {_ms(f)} | {_ms(e)} | {_ms(c)} | "
            f"{_r(f, e)} | {_r(f, c)} | {other} |"
        )
    # peak memory of the linear + cross entropy case
    lce = [(k, p) for k, p in by.items() if k[0] == "linear_cross_entropy" and k[1] == "plain" and k[4] == "full"]
    if lce:
        out.append("")
        out.append("| linear_cross_entropy, fwd+bwd | dtype | provider | time | vs fusedloss | peak MB beyond inputs |")
        out.append("|---|---|---|---|---|---|")
        for (_, _, dtype, shape, _), p in lce:
            f = p["fusedloss"]["median_ms"]
            for k, v in p.items():
                out.append(
                    f"| {shape.replace('x', ' x ')} | {dtype} | {k} | {_ms(v['median_ms'])} | "
                    f"{_r(v['median_ms'], f)} | {v['peak_mem_mb']:.0f} |"
                )
    # small calls
    out.append("")
    out.append(
        "| loss | shape | fwd+bwd us: fusedloss | torch eager | vs eager "
        "| no_grad fwd us: fusedloss | torch eager | vs eager |"
    )
    out.append("|---|---|---|---|---|---|---|---|")
    seen = []
    for loss, case, _, shape, _ in by:
        if case == "small" and (loss, shape) not in seen:
            seen.append((loss, shape))
    for loss, shape in seen:
        full = by[(loss, "small", "fp32", shape, "full")]
        nog = by[(loss, "small", "fp32", shape, "fwd_nograd")]
        a, b = full["fusedloss"]["median_ms"] * 1e3, full["torch"]["median_ms"] * 1e3
        c, d = nog["fusedloss"]["median_ms"] * 1e3, nog["torch"]["median_ms"] * 1e3
        out.append(
            f"| {loss} | {shape.replace('x', ' x ')} | {a:.1f} | {b:.1f} | {_r(a, b)} "
            f"| {c:.1f} | {d:.1f} | {_r(c, d)} |"
        )
    # autocast
    out.append("")
    out.append(
        "| loss | shape (bf16) | fusedloss | in autocast | time x | peak MB | in autocast | memory x | "
        "torch in autocast | its peak MB |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    keys = [(loss, shape) for loss, case, _, shape, _ in by if case == "autocast"]
    for loss, shape in keys:
        na, au = by[(loss, "no_autocast", "bf16", shape, "full")], by[(loss, "autocast", "bf16", shape, "full")]
        fp, fa = na["fusedloss"], au["fusedloss"]
        ta = au.get("torch", {"median_ms": float("nan"), "peak_mem_mb": float("nan")})
        out.append(
            f"| {loss} | {shape.replace('x', ' x ')} | {_ms(fp['median_ms'])} | {_ms(fa['median_ms'])} | "
            f"{_r(fa['median_ms'], fp['median_ms'])} | {fp['peak_mem_mb']:.0f} | {fa['peak_mem_mb']:.0f} | "
            f"{_r(fa['peak_mem_mb'], fp['peak_mem_mb'])} | {_ms(ta['median_ms'])} | {ta['peak_mem_mb']:.0f} |"
        )
    # training step
    step_rows = [r for r in rows if r["loss"] == "training_step"]
    step = {(r["case"], r["provider"]): r["median_ms"] for r in step_rows}
    if step:
        tokens, vocab = step_rows[0]["shape"].split("x")  # the loss's (tokens, V): --quick runs fewer tokens
        out.append("")
        out.append(f"| TinyLlama step ({tokens} tokens, V={vocab}) | torch's loss | fusedloss's | saving |")
        out.append("|---|---|---|---|")
        for mode in ("eager", "compiled"):
            a, b = step.get((f"step-{mode}", "torch")), step.get((f"step-{mode}", "fusedloss"))
            if a and b:
                out.append(f"| step, {mode} | {_ms(a)} | {_ms(b)} | {a - b:.1f} ms |")
        f = step.get(("loss-alone", "fusedloss"))
        for prov, label in (("torch", "eager"), ("torch.compile", "compiled")):
            a = step.get(("loss-alone", prov))
            if a and f:
                out.append(f"| the loss alone, vs {label} | {_ms(a)} | {_ms(f)} | {a - f:.1f} ms |")
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print(tables(list(csv.DictReader(fh))))
