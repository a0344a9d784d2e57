"""DistributedDataParallel over gloo (CPU processes): fusedloss modules with
weight buffers train under DDP, and their gradients equal torch's under the
same sharding.

Mean semantics: each rank's loss is the mean over its own shard (with
ignore_index, over its own non-ignored targets), and DDP averages the
gradients over ranks. That is the mean of per-shard means, not the mean over
the whole batch, whenever shards hold different numbers of non-ignored
targets. A shard whose targets are all ignored has a NaN loss (torch's
semantics) and contributes zero gradient to the average.
"""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, results):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import torch.nn.functional as F

        import fusedloss

        torch.manual_seed(0)
        model = torch.nn.Linear(12, 7)
        weight = torch.rand(7) + 0.5
        loss_fn = fusedloss.nn.CrossEntropyLoss(weight=weight, ignore_index=3, label_smoothing=0.1)
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=True)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(world * 8, 12, generator=g)
        t = torch.randint(0, 7, (world * 8,), generator=g)
        t[8:16] = 3  # rank 1's shard: every target ignored
        xs, ts = x[rank * 8 : (rank + 1) * 8], t[rank * 8 : (rank + 1) * 8]
        loss = loss_fn(ddp(xs), ts)
        loss.backward()
        # The same, by hand: the mean over ranks of torch's per-shard gradients.
        ref = torch.zeros_like(model.weight)
        for r in range(world):
            m = torch.nn.Linear(12, 7)
            m.load_state_dict(model.state_dict())
            lr = F.cross_entropy(
                m(x[r * 8 : (r + 1) * 8]), t[r * 8 : (r + 1) * 8], weight=weight, ignore_index=3, label_smoothing=0.1
            )
            lr.backward()
            ref += m.weight.grad / world
        results[rank] = {
            "loss_is_nan": bool(torch.isnan(loss)),
            "grad_close": bool(torch.allclose(model.weight.grad, ref, rtol=1e-5, atol=1e-6)),
            "grad_finite": bool(torch.isfinite(model.weight.grad).all()),
            "buffer": loss_fn.weight.tolist() == weight.tolist(),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or sys.platform != "linux", reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("world", [2, 4])
def test_ddp_gradients_match_torch(world):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
    assert len(results) == world
    for rank in range(world):
        r = results[rank]
        assert r["grad_close"] and r["grad_finite"] and r["buffer"], (rank, r)
        assert r["loss_is_nan"] == (rank == 1), (rank, r)
