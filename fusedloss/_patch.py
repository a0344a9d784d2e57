"""Routing a library's losses through fusedloss: ``fusedloss.patch_torch()``.

Code that calls ``torch.nn.functional.cross_entropy`` or builds
``torch.nn.CrossEntropyLoss()`` inside a library (a trainer, a model zoo) can
be switched to fusedloss without editing it::

    fusedloss.patch_torch()            # until fusedloss.unpatch_torch()
    with fusedloss.patch_torch():      # or for a block
        trainer.train()

Patched: the torch.nn.functional losses fusedloss provides and their torch.nn
modules (also under torch.nn.modules.loss). Code that bound a name before the
patch (``from torch.nn.functional import cross_entropy`` at its import) keeps
torch's; patch before importing it. fusedloss itself never calls a patched
name: its fallbacks call ATen, so nothing can recurse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as _F
import torch.nn.modules.loss as _loss_modules

from . import functional as _FF
from . import nn as _NN

# torch's own objects, captured when fusedloss is imported (a later patch by
# anyone cannot change what these are).
FUNCTIONAL_NAMES = tuple(name for name in _FF.__all__ if hasattr(_F, name))
MODULE_NAMES = tuple(name for name in _NN.__all__ if hasattr(torch.nn, name))
ORIGINAL_FUNCTIONAL = {name: getattr(_F, name) for name in FUNCTIONAL_NAMES}
ORIGINAL_MODULES = {name: getattr(torch.nn, name) for name in MODULE_NAMES}

_patched = False


class _Patch:
    """Returned by patch_torch(); as a context manager it undoes the patch on exit."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        unpatch_torch()
        return False


def patch_torch(functional: bool = True, modules: bool = True) -> _Patch:
    """Point torch.nn.functional's losses (``functional``) and torch.nn's loss
    modules (``modules``) at fusedloss's. Idempotent; undone by unpatch_torch()
    or by leaving the ``with`` block it is used in."""
    global _patched
    if functional:
        for name in FUNCTIONAL_NAMES:
            setattr(_F, name, getattr(_FF, name))
    if modules:
        for name in MODULE_NAMES:
            cls = getattr(_NN, name)
            setattr(torch.nn, name, cls)
            if hasattr(_loss_modules, name):
                setattr(_loss_modules, name, cls)
    _patched = True
    return _Patch()


def unpatch_torch() -> None:
    """Restore torch's own functions and modules."""
    global _patched
    for name, fn in ORIGINAL_FUNCTIONAL.items():
        setattr(_F, name, fn)
    for name, cls in ORIGINAL_MODULES.items():
        setattr(torch.nn, name, cls)
        if hasattr(_loss_modules, name):
            setattr(_loss_modules, name, cls)
    _patched = False


def is_patched() -> bool:
    return _patched
