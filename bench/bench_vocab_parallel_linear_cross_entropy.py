"""vocab_parallel_linear_cross_entropy over a gloo group on the CPU against the
unsharded fusedloss.functional.linear_cross_entropy: time of a forward +
backward and peak memory beyond the inputs, per rank.

    python bench/bench_vocab_parallel_linear_cross_entropy.py [--N 2048 --D 512 --V 32000 --world 2]

Each rank is a process with --threads-per-rank threads (default: the
machine's cores split over the ranks); the unsharded op runs in its own
process with --threads threads (default: all cores). Peak memory is the growth
of the process's peak resident set (VmHWM) over the first forward + backward,
counted from after the inputs exist: chunk buffers, gradients, accumulators,
the allocator's own overhead. Times are medians of --repeat calls after one
warm-up; on a machine shared with other jobs they vary from run to run.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _inputs(args, rank_slice=None):
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.N, args.D, generator=gen).to(dtype)
    w = (torch.randn(args.V, args.D, generator=gen) / args.D**0.5).to(dtype)
    t = torch.randint(0, args.V, (args.N,), generator=gen)
    if rank_slice is not None:
        w = w[rank_slice].clone()
    return x.requires_grad_(), w.requires_grad_(), t


def _measure(step, x, w, repeat):
    """(peak MB over the first call, median seconds of the next `repeat`)."""
    from fusedloss.benchmark import reset_peak_rss, rss_mb

    reset_peak_rss()
    base = rss_mb()
    step()
    peak = rss_mb("VmHWM") - base
    times = []
    for i in range(repeat + 1):
        x.grad = w.grad = None
        t0 = time.perf_counter()
        step()
        if i:
            times.append(time.perf_counter() - t0)
    return peak, statistics.median(times)


def _rank(rank, world, port, args, results):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(args.threads_per_rank)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import fusedloss.distributed as FD

        sizes = [args.V // world + (r < args.V % world) for r in range(world)]
        start = sum(sizes[:rank])
        x, w, t = _inputs(args, slice(start, start + sizes[rank]))

        def step():
            FD.vocab_parallel_linear_cross_entropy(x, w, t, vocab_start_index=start).backward()
            dist.barrier()  # every rank's call is done: the step's time is the slowest rank's

        results[rank] = _measure(step, x, w, args.repeat)
    finally:
        dist.destroy_process_group()


def _unsharded(args, results):
    import fusedloss.functional as FF

    torch.set_num_threads(args.threads)
    x, w, t = _inputs(args)
    results["unsharded"] = _measure(lambda: FF.linear_cross_entropy(x, w, t).backward(), x, w, args.repeat)


def main():
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", type=int, default=2048)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=cores)
    p.add_argument("--threads-per-rank", type=int, default=0)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    args.threads_per_rank = args.threads_per_rank or max(1, cores // args.world)
    with mp.Manager() as manager:
        results = manager.dict()
        ctx = mp.get_context("spawn")
        proc = ctx.Process(target=_unsharded, args=(args, results))
        proc.start()
        proc.join()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_rank, args=(args.world, port, args, results), nprocs=args.world, start_method="spawn")
        results = dict(results)
    N, D, V, W = args.N, args.D, args.V, args.world
    logits_mb = N * V * torch.empty((), dtype=getattr(torch, args.dtype)).element_size() / 1e6
    print(
        f"N={N} D={D} V={V} {args.dtype}, {W} gloo ranks x {args.threads_per_rank} threads, unsharded: "
        f"{args.threads} threads; logits {logits_mb:.0f} MB, per rank {logits_mb / W:.0f} MB"
    )
    peak, sec = results["unsharded"]
    print(f"{'unsharded linear_cross_entropy':34s} {sec * 1e3:9.1f} ms  peak +{peak:7.1f} MB")
    for r in range(W):
        peak, sec = results[r]
        print(f"{f'vocab-parallel, rank {r}':34s} {sec * 1e3:9.1f} ms  peak +{peak:7.1f} MB")


if __name__ == "__main__":
    main()
