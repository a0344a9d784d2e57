"""The loss ops' eager entry points (csrc/python_calls.cpp, fusedloss._ops.eager):
the same dispatcher call as torch.ops.fusedloss.<op>.default, so the same
values, gradients, autograd node, errors and dispatch (modes, compile); an
argument they do not convert goes to the torch.ops overload unchanged."""

import threading

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import DEVICES, make
from fusedloss import _ops
from fusedloss._ops import eager

ops = torch.ops.fusedloss


def _args(name, device, dtype=torch.float32, reduction=1):
    """One call of op `name` with every argument given, positionally."""
    x = make((6, 9), dtype, device, requires_grad=True)
    y = make((6, 9), dtype, device, 0, 1, requires_grad=True)
    s = torch.sign(make((6, 9), dtype, device))
    t = torch.randint(0, 9, (6,), device=device)
    w = make((9,), dtype, device, 0.5, 2)
    if name == "bce_with_logits":
        return (x, y, w, make((9,), dtype, device, 0.5, 2), reduction, None)
    if name == "mse":
        return (x, y, None, reduction, None)
    if name == "cross_entropy":
        return (x, t, w, 2, reduction, 0.1, 1e-3, 20.0, False, None)
    if name == "hinge_embedding":
        return (x, s, 0.5, reduction, torch.float64)
    if name == "soft_margin":
        return (x, s, reduction, None)
    if name == "hinge":
        return (x, y, 1.0, True, reduction, None)
    if name == "multi_margin":
        return (x, t, 2, 0.7, w, reduction, None)
    if name == "sigmoid_focal":
        return (x, y, 0.25, 2.0, reduction, None)
    if name == "multilabel_soft_margin":
        return (x, (y > 0.5).to(dtype), w, reduction, None)
    if name == "distill":
        teacher = make((6, 9), dtype, device)
        return (x, teacher, t, 0.5, 2.0, 3, reduction, None)
    if name == "linear_cross_entropy":
        inp = make((6, 5), dtype, device, requires_grad=True)
        lw = make((9, 5), dtype, device, requires_grad=True)
        return (inp, lw, t, None, w, 3, reduction, 0.05, 0.0, None, 4, None)
    raise AssertionError(name)


def _run(call, args):
    loss = call(*args)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(loss.sum(), leaves) if leaves else ()
    return loss, grads


def test_every_loss_op_has_an_eager_call():
    """The C++ table names exactly the ops the Python layer calls eagerly, each
    bound to its own torch.ops overload."""
    import inspect
    import re

    import fusedloss.functional
    import fusedloss.linear_cross_entropy

    used = set()
    for module in (fusedloss.functional, fusedloss.linear_cross_entropy):
        used |= set(re.findall(r"\beager\.(\w+)", inspect.getsource(module)))
    assert used == set(_ops._EAGER_CALLS) and len(used) == 11
    # A call one argument short (out_dtype, last, has a default) is one the C++
    # side never converts: only the bound overload can take it, and it must be
    # the op's own.
    from torch.utils._python_dispatch import TorchDispatchMode

    class FusedOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "fusedloss":
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    for name in _ops._EAGER_CALLS:
        args = _args(name, "cpu")[:-1]
        with FusedOps() as mode:
            mode.seen = []
            short = getattr(eager, name)(*args)
        # (mse, cross_entropy and distill run their `_forward` op below autograd)
        assert len(mode.seen) == 1 and re.fullmatch(rf"fusedloss\.{name}(_forward)?\.default", mode.seen[0]), mode.seen
        torch.testing.assert_close(short, getattr(ops, name).default(*args), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("name", _ops._EAGER_CALLS)
def test_same_values_gradients_and_node_as_torch_ops(device, name, reduction):
    args = _args(name, device, reduction=reduction)
    fast_loss, fast_grads = _run(getattr(eager, name), args)
    plain_loss, plain_grads = _run(getattr(ops, name).default, args)
    assert fast_loss.dtype == plain_loss.dtype and fast_loss.shape == plain_loss.shape
    torch.testing.assert_close(fast_loss, plain_loss, rtol=0, atol=0)
    assert len(fast_grads) == len(plain_grads) > 0
    for a, b in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert type(getattr(eager, name)(*args).grad_fn) is type(getattr(ops, name).default(*args).grad_fn)
    with torch.no_grad():
        assert getattr(eager, name)(*args).grad_fn is None


def test_bfloat16_and_out_dtype_pass_through():
    x = make((4, 7), torch.bfloat16, "cpu", requires_grad=True)
    t = torch.randint(0, 7, (4,))
    loss = eager.cross_entropy(x, t, None, -100, 1, 0.0, 0.0, None, False, torch.float32)
    assert loss.dtype == torch.float32
    ref = ops.cross_entropy.default(x, t, None, -100, 1, 0.0, 0.0, None, False, torch.float32)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)


def _outcome(call, *args):
    try:
        return ("ok", call(*args))
    except Exception as e:  # the exception's type and message are compared
        return (type(e), str(e))


@pytest.mark.parametrize(
    "args",
    [
        # Types no rule converts: the torch.ops overload takes the call.
        (np.int64(-100), 1, 0.0),  # numpy int for an int
        (-100, np.float64(1.0), 0.0),  # numpy float for an int
        (-100, 1, np.float32(0.1)),  # numpy float for a float
        (-100, True, 0.0),  # bool for an int
        (-100, 1, "0.1"),  # str for a float
        (2**70, 1, 0.0),  # an int beyond int64
        (-100, 7, 0.0),  # not a reduction: the op's own error
    ],
)
def test_arguments_not_converted_behave_as_torch_ops(args):
    x = make((5, 4), torch.float32, "cpu", requires_grad=True)
    t = torch.randint(0, 4, (5,))
    ignore_index, reduction, smoothing = args
    full = (x, t, None, ignore_index, reduction, smoothing, 0.0, None, False, None)
    fast = _outcome(eager.cross_entropy, *full)
    plain = _outcome(ops.cross_entropy.default, *full)
    if plain[0] == "ok":
        assert fast[0] == "ok"
        torch.testing.assert_close(fast[1], plain[1], rtol=0, atol=0)
    else:
        assert fast == plain


def test_ints_for_float_parameters_convert_as_torch_ops():
    x = make((5, 4), torch.float32, "cpu", requires_grad=True)
    t = torch.randint(0, 4, (5,))
    fast = eager.multi_margin(x, t, 2, 3, None, 0, None)  # margin 3 (an int)
    torch.testing.assert_close(fast, ops.multi_margin.default(x, t, 2, 3.0, None, 0, None), rtol=0, atol=0)
    assert not torch.equal(fast, ops.multi_margin.default(x, t, 2, 1.0, None, 0, None))
    fast = eager.cross_entropy(x, t, None, -100, 0, 0.0, 2, None, False, None)  # z-loss scale 2 (an int)
    torch.testing.assert_close(fast, ops.cross_entropy.default(x, t, None, -100, 0, 0.0, 2.0, None, False, None))


def test_wrong_arity_is_torch_ops_error():
    x = make((5, 4), torch.float32, "cpu")
    t = torch.randint(0, 4, (5,))
    # Trailing defaults left out: the plain path fills them in.
    torch.testing.assert_close(eager.mse(x, x), ops.mse.default(x, x), rtol=0, atol=0)
    torch.testing.assert_close(eager.cross_entropy(x, t), ops.cross_entropy.default(x, t), rtol=0, atol=0)
    fast = _outcome(eager.mse, x, x, None, 1, None, 5)  # one too many
    assert fast[0] != "ok" and fast == _outcome(ops.mse.default, x, x, None, 1, None, 5)
    none = _outcome(eager.mse)  # no arguments at all
    assert none[0] != "ok" and none == _outcome(ops.mse.default)


@pytest.mark.parametrize(
    "target, error",
    [(torch.tensor([0, 1, 9, 2, 3]), IndexError), (torch.randn(5), RuntimeError), (torch.zeros(3).long(), Exception)],
)
def test_errors_are_torch_ops_errors(target, error):
    x = make((5, 4), torch.float32, "cpu", requires_grad=True)
    full = (x, target, None, -100, 1, 0.0, 0.0, None, False, None)
    fast = _outcome(eager.cross_entropy, *full)
    assert fast == _outcome(ops.cross_entropy.default, *full)
    assert isinstance(fast[0], type) and issubclass(fast[0], error)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_the_op():
    x = make((5, 4), torch.float32, "cpu")
    t = torch.randint(0, 4, (5,))
    with _Recorder() as rec:
        eager.cross_entropy(x, t, None, -100, 1, 0.0, 0.0, None, False, None)
        eager.mse(x, x, None, 1, None)
    assert rec.seen[0].startswith("fusedloss.cross_entropy")
    assert any(s.startswith("fusedloss.mse") for s in rec.seen)


def test_fake_tensors_take_the_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 4)
        t = torch.empty(5, dtype=torch.long)
        loss = eager.cross_entropy(x, t, None, -100, 0, 0.0, 0.0, None, False, None)
    assert loss.shape == (5,)


def test_calls_from_threads_at_once():
    """The GIL is let go during the op; calls from several threads all finish
    with the single-threaded result."""
    x = make((512, 1000), torch.float32, "cpu")
    t = torch.randint(0, 1000, (512,))
    ref = eager.cross_entropy(x, t, None, -100, 0, 0.0, 0.0, None, False, None)
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(eager.cross_entropy(x, t, None, -100, 0, 0.0, 0.0, None, False, None))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(results) == 20
    for r in results:
        torch.testing.assert_close(r, ref, rtol=0, atol=0)


def test_compile_traces_the_op_not_the_eager_call():
    import fusedloss

    x = make((6, 9), torch.float32, "cpu", requires_grad=True)
    t = torch.randint(0, 9, (6,))
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    fn = torch.compile(fusedloss.functional.cross_entropy, backend=backend, fullgraph=True)
    torch.testing.assert_close(fn(x, t), fusedloss.functional.cross_entropy(x, t))
    assert any(s.startswith("fusedloss.cross_entropy") for s in seen), seen
