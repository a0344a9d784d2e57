"""A small CUDA workload touching every kernel path, for compute-sanitizer
(memcheck: out-of-bounds and misaligned accesses; racecheck: shared-memory
hazards in the block reductions). bench/gpu_check.sh runs it; it also checks
its own results against torch so a silent wrong answer fails too."""

import sys

import torch
import torch.nn.functional as F

import fusedloss
import fusedloss.functional as FF


def check(name, a, b, rtol=1e-4, atol=1e-5):
    if not torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol, equal_nan=True):
        print(f"MISMATCH {name}: max |diff| {(a.float() - b.float()).abs().max().item()}")
        return False
    return True


def focal_multilabel_distill(rnd, g, dev) -> bool:
    """sigmoid_focal (elementwise engine), multilabel soft margin (both row
    group sizes, misaligned rows), distillation (every group size, both
    dtypes, odd C, strided rows, ignored rows, masked classes, JSD)."""
    from fusedloss import testing

    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        x = rnd(37, 129, dtype=dtype, offset=True)
        y = torch.rand(37, 129, generator=g).to(dev, dtype)
        a = FF.sigmoid_focal_loss(x, y, reduction="mean")
        ok &= check(f"sigmoid_focal {dtype}", a, testing.reference("sigmoid_focal_loss")(x, y, reduction="mean"), 2e-2)
        a.backward()
        for C in (129, 3001):
            x = rnd(9, C, dtype=dtype, offset=True)
            y = torch.rand(9, C, generator=g).to(dev, dtype)
            a = FF.multilabel_soft_margin_loss(x, y, reduction="none")
            ok &= check(
                f"multilabel C={C} {dtype}",
                a,
                F.multilabel_soft_margin_loss(x.float(), y.float(), reduction="none"),
                2e-2,
            )
            a.sum().backward()
        for C in (7, 1025, 5003, 20011):
            s = rnd(3, 5, C, dtype=dtype, offset=True)
            t = rnd(3, 5, C, dtype=dtype)
            target = torch.randint(0, C, (3, 5), generator=g).to(dev)
            target[0, 1] = -100
            t.detach()[1, 2, :3] = float("-inf")
            s.detach()[1, 2, :3] = float("-inf")
            for beta in (0.0, 0.5, 1.0):
                kw = {"beta": beta, "temperature": 2.0, "target": target, "reduction": "none"}
                a = FF.jsd_with_logits(s[:, :-1], t[:, :-1], **{**kw, "target": target[:, :-1]})
                b = testing.reference("jsd_with_logits")(
                    s[:, :-1].float(), t[:, :-1].float(), **{**kw, "target": target[:, :-1]}
                )
                ok &= check(f"distill C={C} {dtype} beta={beta}", a, b, 2e-2, 2e-2)
                a.sum().backward()
    return ok


def linear_ce_and_vocab_parallel(rnd, g, dev) -> bool:
    """linear_cross_entropy (chunks that do not divide N, bias, smoothing, the
    per-row recompute of 'none'), and the local ops of vocabulary-parallel
    cross entropy on two simulated ranks (uneven slices, one of 2 classes)."""
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        x, w = rnd(37, 64, dtype=dtype), rnd(1001, 64, dtype=dtype)
        b = rnd(1001, dtype=dtype)
        t = torch.randint(0, 1001, (37,), generator=g).to(dev)
        t[2] = -100
        for red in ("mean", "none"):
            a = FF.linear_cross_entropy(x, w, t, linear_bias=b, reduction=red, label_smoothing=0.1, chunk_size=8)
            ref = F.cross_entropy(F.linear(x.float(), w.float(), b.float()), t, reduction=red, label_smoothing=0.1)
            ok &= check(f"linear_cross_entropy {dtype} {red}", a, ref, 2e-2, 2e-2)
            a.sum().backward()
    ops = torch.ops.fusedloss
    for dtype in (torch.float32, torch.bfloat16):
        x = rnd(9, 2051, dtype=dtype).detach()
        t = torch.randint(0, 2051, (9,), generator=g).to(dev)
        t[3] = -100
        loc = [ops.vocab_parallel_ce_local(xi, t, None, s, -100, 0.1, None) for xi, s in ((x[:, :2], 0), (x[:, 2:], 2))]
        gmax = torch.stack([m for m, _, _ in loc]).amax(0)
        packed = torch.stack([ops.vocab_parallel_ce_rebase(p, m, gmax, mass) for m, p, mass in loc]).sum(0)
        loss, state, stats = ops.vocab_parallel_ce_finalize(packed, gmax, t, None, -100, 1, 0.1, 0.0, x.dtype)
        ref = F.cross_entropy(x.float(), t, label_smoothing=0.1)
        ok &= check(f"vocab_parallel {dtype}", loss, ref, 2e-2, 2e-2)
        one = torch.ones((), device=dev, dtype=loss.dtype)
        for xi, s in ((x[:, :2], 0), (x[:, 2:], 2)):
            ops.vocab_parallel_ce_backward(one, xi, t, None, state, stats, s, -100, 1, 0.1, 0.0, None)
    return ok


def main() -> int:
    dev = "cuda"
    ok = True
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype=torch.float32, offset=False):
        n = 1
        for s in shape:
            n *= s
        flat = torch.randn(n + 1, generator=g).to(dev, dtype)
        t = (flat[1:] if offset else flat[:n]).view(shape)
        return t.requires_grad_()

    # Elementwise losses: aligned, misaligned, broadcast operands, ragged tails.
    for dtype in (torch.float32, torch.bfloat16):
        for offset in (False, True):
            x = rnd(37, 129, dtype=dtype, offset=offset)
            y = torch.rand(37, 129, generator=g).to(dev, dtype)
            pw = torch.rand(129, generator=g).to(dev, dtype)
            for fused, native in (
                (FF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
                (FF.mse_loss, F.mse_loss),
            ):
                for red in ("none", "mean"):
                    kw = {"pos_weight": pw} if fused is FF.binary_cross_entropy_with_logits else {}
                    a = fused(x, y, reduction=red, **kw)
                    b = native(x, y, reduction=red, **kw)
                    ok &= check(f"{fused.__name__} {dtype} {red}", a, b, 2e-2, 2e-2)
                    a.sum().backward()
            s = torch.sign(y - 0.5)
            for fn in (FF.hinge_embedding_loss, FF.soft_margin_loss, FF.hinge_loss):
                fn(x, s, reduction="sum").backward()
    # Cross entropy: every row kernel (warp, 256, 1024 threads), strided rows,
    # odd C (unaligned rows), probabilities, extras, in-place backward, bad targets.
    for C in (7, 1025, 5003, 20011):
        for dtype in (torch.float32, torch.bfloat16):
            x = rnd(5, C, dtype=dtype, offset=True)
            t = torch.randint(0, C, (5,), generator=g).to(dev)
            t[1] = -100
            for ls in (0.0, 0.1):
                a = FF.cross_entropy(x, t, label_smoothing=ls)
                b = F.cross_entropy(x.float(), t, label_smoothing=ls)
                ok &= check(f"cross_entropy C={C} {dtype} ls={ls}", a, b, 2e-2, 2e-2)
                a.backward()
            p = torch.rand(5, C, generator=g).to(dev, dtype)
            FF.cross_entropy(x, p, lse_square_scale=1e-3, softcap=20.0).backward()
            h = rnd(5, C, dtype=dtype) * 1
            FF.cross_entropy(h, t, inplace_backward=True).backward()
            bad = t.clone()
            bad[0] = C + 3
            out = FF.cross_entropy(x, bad, reduction="none")
            ok &= bool(torch.isnan(out[0])) and bool(torch.isfinite(out[2]))
            out.nan_to_num().sum().backward()
    k = rnd(2, 5, 17, 9)
    kt = torch.randint(0, 5, (2, 17, 9), generator=g).to(dev)
    ok &= check("cross_entropy NCHW", FF.cross_entropy(k, kt), F.cross_entropy(k, kt))
    FF.cross_entropy(k, kt, reduction="none").sum().backward()
    cl = k.detach().to(memory_format=torch.channels_last).requires_grad_()
    FF.cross_entropy(cl, kt).backward()
    # multi_margin: both group sizes, a bad target.
    for C in (10, 5000):
        x = rnd(9, C)
        t = torch.randint(0, C, (9,), generator=g).to(dev)
        ok &= check(f"multi_margin C={C}", FF.multi_margin_loss(x, t, p=2), F.multi_margin_loss(x, t, p=2))
        FF.multi_margin_loss(x, t).backward()
        t[3] = C
        out = FF.multi_margin_loss(x, t, reduction="none")
        ok &= bool(torch.isnan(out[3]))
    ok &= focal_multilabel_distill(rnd, g, dev)
    ok &= linear_ce_and_vocab_parallel(rnd, g, dev)
    torch.cuda.synchronize()
    print("SANITIZER SUBSET", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    assert fusedloss.build_info()["cuda"]
    sys.exit(main())
