"""Opt-in host-side validation of class indices on accelerators.

The CUDA kernels never read outside the logits: an out-of-range class index
yields NaN for its row. Strict mode instead checks every target on the host
before the kernel runs, and raises torch's CPU error, which costs a device
synchronization per call. Turn it on with fusedloss.set_validation(True) or the
environment variable FUSEDLOSS_VALIDATE=1.
"""

from __future__ import annotations

import os

import torch

_enabled = os.environ.get("FUSEDLOSS_VALIDATE", "").strip().lower() in ("1", "true", "yes", "on")


def set_validation(enabled: bool) -> None:
    """Check class indices on the host (and raise torch's IndexError) on CUDA too."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    return _enabled


def wanted(input: torch.Tensor) -> bool:
    """Strict mode is on and the call runs off the CPU (the CPU always checks)."""
    return _enabled and input.device.type != "cpu"


def check_multi_margin_targets(target: torch.Tensor, num_classes: int) -> None:
    if bool(((target < 0) | (target >= num_classes)).any()):  # the device sync strict mode pays for
        raise RuntimeError("target out of range")


def check_class_indices(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    t = target.long()
    bad = (t != ignore_index) & ((t < 0) | (t >= num_classes))
    if bool(bad.any()):  # the device sync strict mode pays for
        first = int(t[bad][0])
        raise IndexError(f"Target {first} is out of bounds.")
