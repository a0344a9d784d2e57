"""Module parity: fusedloss.nn.X is a torch.nn.X with torch's constructor,
buffers, repr, state_dict, pickling and .to(), computing with fusedloss."""

import inspect
import pickle

import pytest
import torch

import fusedloss
from conftest import DEVICES, make
from fusedloss.testing import assert_matches_torch

PAIRS = [
    (fusedloss.nn.BCEWithLogitsLoss, torch.nn.BCEWithLogitsLoss),
    (fusedloss.nn.MSELoss, torch.nn.MSELoss),
    (fusedloss.nn.CrossEntropyLoss, torch.nn.CrossEntropyLoss),
    (fusedloss.nn.HingeEmbeddingLoss, torch.nn.HingeEmbeddingLoss),
    (fusedloss.nn.SoftMarginLoss, torch.nn.SoftMarginLoss),
    (fusedloss.nn.MultiMarginLoss, torch.nn.MultiMarginLoss),
]


@pytest.mark.parametrize("device", DEVICES)
def test_margin_modules(device):
    x = make((6, 5), torch.float32, device, requires_grad=True)
    y = torch.sign(make((6, 5), torch.float32, device))
    t = torch.tensor([0, 4, 2, 2, 1, 3], device=device)
    w = make((5,), torch.float32, device, 0.5, 2)
    pairs = [
        (fusedloss.nn.HingeEmbeddingLoss(margin=0.3), torch.nn.HingeEmbeddingLoss(margin=0.3), y),
        (fusedloss.nn.SoftMarginLoss(reduction="sum"), torch.nn.SoftMarginLoss(reduction="sum"), y),
        (fusedloss.nn.MultiMarginLoss(p=2, weight=w), torch.nn.MultiMarginLoss(p=2, weight=w), t),
    ]
    for ours, theirs, target in pairs:
        assert repr(ours) == repr(theirs)
        assert_matches_torch("module", x, target, fused=ours, native=theirs)
    mm = fusedloss.nn.MultiMarginLoss(weight=w)
    assert dict(mm.named_buffers()).keys() == {"weight"}


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_subclass_and_signature(ours, theirs):
    assert issubclass(ours, theirs)
    mine = inspect.signature(ours.__init__).parameters
    native = inspect.signature(theirs.__init__).parameters
    # torch's parameters first, in order, with torch's defaults; extras keyword-only
    assert list(mine)[: len(native)] == list(native)
    for name, param in native.items():
        assert mine[name].default == param.default
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for n, p in mine.items() if n not in native)
    assert ours.__name__ == theirs.__name__


def test_cross_entropy_module_buffers_and_state_dict():
    w = torch.rand(5)
    ours = fusedloss.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    assert dict(ours.named_buffers()).keys() == {"weight"}
    assert ours.ignore_index == 2 and ours.label_smoothing == 0.1 and ours.reduction == "mean"
    assert repr(ours) == repr(theirs)
    fresh = torch.nn.CrossEntropyLoss(weight=torch.zeros(5))
    fresh.load_state_dict(ours.state_dict())
    assert torch.equal(fresh.weight, w)
    clone = pickle.loads(pickle.dumps(ours))
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.tensor([0, 2, 4, 1])
    assert_matches_torch("cross_entropy_module", x, t, fused=clone, native=theirs)


def test_bce_buffers_state_dict_and_repr():
    w, pw = torch.rand(5), torch.rand(5)
    ours = fusedloss.nn.BCEWithLogitsLoss(weight=w, pos_weight=pw, reduction="sum")
    theirs = torch.nn.BCEWithLogitsLoss(weight=w, pos_weight=pw, reduction="sum")
    assert dict(ours.named_buffers()).keys() == {"weight", "pos_weight"}
    assert repr(ours) == repr(theirs)
    fresh = torch.nn.BCEWithLogitsLoss(weight=torch.zeros(5), pos_weight=torch.zeros(5))
    fresh.load_state_dict(ours.state_dict())
    back = fusedloss.nn.BCEWithLogitsLoss(weight=torch.zeros(5), pos_weight=torch.zeros(5))
    back.load_state_dict(theirs.state_dict())
    assert torch.equal(fresh.pos_weight, pw) and torch.equal(back.weight, w)
    clone = pickle.loads(pickle.dumps(ours))
    assert type(clone) is fusedloss.nn.BCEWithLogitsLoss and torch.equal(clone.pos_weight, pw)


@pytest.mark.parametrize("device", DEVICES)
def test_to_moves_buffers_and_forward_matches(device):
    m = fusedloss.nn.BCEWithLogitsLoss(weight=torch.rand(6), pos_weight=torch.rand(6) * 3).to(device, torch.float64)
    assert m.weight.device.type == device and m.pos_weight.dtype == torch.float64
    n = torch.nn.BCEWithLogitsLoss(weight=m.weight, pos_weight=m.pos_weight)
    x = make((4, 6), torch.float64, device, requires_grad=True)
    y = make((4, 6), torch.float64, device, 0, 1, requires_grad=True)
    assert_matches_torch("bce_module", x, y, fused=m, native=n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_mse_module(device, reduction):
    x = make((4, 6), torch.float32, device, requires_grad=True)
    y = make((4, 6), torch.float32, device, requires_grad=True)
    assert_matches_torch(
        "mse_module",
        x,
        y,
        fused=fusedloss.nn.MSELoss(reduction=reduction),
        native=torch.nn.MSELoss(reduction=reduction),
    )


def test_legacy_constructor_args():
    ours = fusedloss.nn.MSELoss(size_average=False)
    theirs = torch.nn.MSELoss(size_average=False)
    assert ours.reduction == theirs.reduction == "sum"


def test_no_batch_dim_equals_batch_of_one():
    x = torch.randn(7)
    y = torch.rand(7)
    for m in (fusedloss.nn.BCEWithLogitsLoss(reduction="none"), fusedloss.nn.MSELoss(reduction="none")):
        torch.testing.assert_close(m(x, y), m(x[None], y[None])[0], rtol=0, atol=0)
    ce = fusedloss.nn.CrossEntropyLoss(reduction="none")
    t = torch.tensor(3)
    torch.testing.assert_close(ce(x, t), ce(x[None], t[None])[0], rtol=0, atol=0)
    p = y.softmax(0)
    torch.testing.assert_close(ce(x, p), ce(x[None], p[None])[0], rtol=0, atol=0)
