"""cross_entropy(inplace_backward=True): taken only where writing the gradient
over the logits is provably safe, refused with a ValueError that says why
everywhere else, and bit-identical to the out-of-place gradient on every dtype."""

import pytest
import torch

import fusedloss.functional as FF
from conftest import DEVICES, FLOAT_DTYPES, make

ops = torch.ops.fusedloss


def _targets(n, c, device):
    t = torch.randint(0, c, (n,), device=device)
    t[1] = -100
    return t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case",
    ["leaf", "view of a leaf", "column slice of a leaf", "reshape of a leaf", "view of a view of a leaf"],
)
def test_refuses_logits_sharing_a_leafs_data(device, case):
    """A view of a leaf that requires grad used to pass the leaf check: the leaf's
    data became its own gradient and x.grad aliased it."""
    leaf = make((6, 12), torch.float32, device, requires_grad=True)
    before = leaf.detach().clone()
    logits = {
        "leaf": lambda: leaf,
        "view of a leaf": lambda: leaf.view(6, 12),
        "column slice of a leaf": lambda: leaf[:, :10],
        "reshape of a leaf": lambda: leaf.reshape(6, 12),
        "view of a view of a leaf": lambda: leaf.view(12, 6).view(6, 12),
    }[case]()
    c = logits.shape[1]
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        FF.cross_entropy(logits, _targets(6, c, device), inplace_backward=True)
    assert torch.equal(leaf.detach(), before)
    assert leaf.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_refuses_overlapping_or_sparse_logits(device):
    h = make((1, 12), torch.float32, device, requires_grad=True)
    expanded = (h * 2).expand(6, 12)  # stride 0: rows share memory
    with pytest.raises(ValueError, match="overlap themselves in memory"):
        FF.cross_entropy(expanded, _targets(6, 12, device), inplace_backward=True)
    wide = make((6, 24), torch.float32, device, requires_grad=True) * 2
    with pytest.raises(ValueError, match="not dense"):
        FF.cross_entropy(wide[:, ::2], _targets(6, 12, device), inplace_backward=True)


@pytest.mark.parametrize("device", DEVICES)
def test_the_raw_inplace_op_checks_overlap_itself(device):
    """A direct torch.ops call cannot corrupt memory either: the op refuses
    logits whose elements alias before writing anything."""
    row = make((1, 12), torch.float32, device)
    x = row.expand(6, 12)
    t = _targets(6, 12, device)
    _, lse, stats, mass = ops.cross_entropy_forward(x, t, None, -100, 1, 0.0, 0.0, None, None)
    before = row.clone()
    with pytest.raises(ValueError, match="overlap themselves"):
        ops.cross_entropy_backward_inplace(
            torch.ones((), device=device), x, t, None, lse, stats, mass, -100, 1, 0.0, 0.0, None
        )
    assert torch.equal(row, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1, "reduction": "sum"},
        {"lse_square_scale": 1e-3, "softcap": 5.0, "reduction": "none"},
        {"weight": True},
    ],
    ids=["plain", "smoothing", "zloss-softcap", "weight"],
)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_bit_identical_to_out_of_place(device, dtype, options, layout):
    """The in-place gradient is computed in fp32 from the whole row and rounded
    once (never through an fp16/bf16 intermediate), so it equals the
    out-of-place gradient bit for bit, also for class-strided logits."""
    options = dict(options)
    n, c = 7, 301
    if options.pop("weight", False):
        options["weight"] = make((c,), dtype, device, 0.5, 2)
    t = _targets(n, c, device)
    base = make((n, c), dtype, device, layout=layout)
    g = None
    grads = []
    for inplace in (False, True):
        h = base.detach().clone().requires_grad_()
        logits = h * 1  # a non-leaf, as a model's output
        if layout == "transposed":
            logits = (h.t() * 1).t()  # dense, class stride != 1
        loss = FF.cross_entropy(logits, t, inplace_backward=inplace, **options)
        if g is None:
            g = torch.randn(loss.shape, device=device, dtype=torch.float64).to(loss.dtype)
        (gh,) = torch.autograd.grad(loss, h, g)
        grads.append(gh)
    assert torch.equal(grads[0], grads[1])
