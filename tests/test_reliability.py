"""Every loss, every device: bitwise-repeatable results (no float atomics),
thread-count invariance on the CPU, and torch.use_deterministic_algorithms."""

import pytest
import torch

import fusedloss.functional as FF
from conftest import DEVICES, make


def _all_losses(device, dtype=torch.float32):
    """(name, closure computing loss and input gradient) for every loss."""
    x = make((257, 1031), dtype, device, -4, 4, requires_grad=True)
    y01 = make((257, 1031), dtype, device, 0, 1)
    pm1 = torch.sign(make((257, 1031), dtype, device))
    t = torch.randint(0, 1031, (257,), device=device)
    t[::7] = -100
    w = make((1031,), dtype, device, 0.5, 2)
    k = make((3, 5, 40, 33), dtype, device, requires_grad=True)
    kt = torch.randint(0, 5, (3, 40, 33), device=device)
    cases = {
        "bce_with_logits": lambda: FF.binary_cross_entropy_with_logits(x, y01, pos_weight=w),
        "mse": lambda: FF.mse_loss(x, y01),
        "cross_entropy": lambda: FF.cross_entropy(x, t, weight=w, label_smoothing=0.1),
        "cross_entropy_kdim": lambda: FF.cross_entropy(k, kt),
        "cross_entropy_prob": lambda: FF.cross_entropy(x, y01, lse_square_scale=1e-3),
        "hinge_embedding": lambda: FF.hinge_embedding_loss(x, pm1),
        "soft_margin": lambda: FF.soft_margin_loss(x, pm1),
        "hinge": lambda: FF.hinge_loss(x, pm1, squared=True),
        "multi_margin": lambda: FF.multi_margin_loss(x, t.clamp(min=0), p=2, weight=w),
    }

    def run(name):
        leaf = k if name == "cross_entropy_kdim" else x
        out = cases[name]()
        (g,) = torch.autograd.grad(out, leaf)
        return out.detach(), g

    return list(cases), run


@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_repeatable(device):
    names, run = _all_losses(device)
    for name in names:
        ref = run(name)
        for _ in range(100):
            got = run(name)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), name


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_algorithms_mode(device):
    names, run = _all_losses(device)
    torch.use_deterministic_algorithms(True)
    try:
        for name in names:
            a, b = run(name), run(name)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), name
    finally:
        torch.use_deterministic_algorithms(False)


def test_cpu_thread_count_invariance():
    names, run = _all_losses("cpu")
    n = torch.get_num_threads()
    try:
        for name in names:
            torch.set_num_threads(1)
            one = run(name)
            torch.set_num_threads(max(n, 2))
            many = run(name)
            assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1]), name
    finally:
        torch.set_num_threads(n)
