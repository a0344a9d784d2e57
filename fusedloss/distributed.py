"""Vocabulary-parallel (tensor-parallel) cross entropy over torch.distributed.

When the language-model head is sharded over the ranks of a process group,
each rank holds the logits of a slice of the vocabulary::

    import fusedloss.distributed as FD
    local_logits = hidden @ head_weight_shard.T          # (N, V_local) on this rank
    loss = FD.vocab_parallel_cross_entropy(local_logits, target, group=tp_group)
    loss.backward()                                      # local_logits.grad: this slice's gradient

The loss (identical on every rank) equals fusedloss's and torch's
``cross_entropy`` of the logits concatenated over the group in rank order, and
the gradient of ``local_logits`` is that slice of the full gradient.

Per forward, two collectives of O(N), through ``torch.distributed`` alone (any
backend: gloo on CPU tensors, NCCL on CUDA tensors), and none in the backward:

1. one read of the local logits (fp16/bf16 read as they are, widened in
   registers: no fp32 copy of the shard) gives, per row, the local max and,
   measured from it, the sum of the exponentials of every class but the
   target, the target's logit (on the rank that holds it; 0 elsewhere) and,
   with label smoothing, the weighted sum of the logits;
2. ``all_reduce(MAX)`` of the N row maxes;
3. every rank moves its sums to the global max (O(N), no second read of the
   logits) and ``all_reduce(SUM)`` adds one packed buffer
   ``[S_other (N) | x_t (N) | rel (N), with smoothing | C_local (1)]``, so every
   rank also learns the vocabulary size V without another collective;
4. the loss per row from the global state with cross entropy's own formulas
   (numerics.h); the backward writes the local gradient from the saved
   (max, log-sum-exp) per row.

Bytes on the wire per forward (payload of the all_reduces; the accumulation
dtype is fp32 for fp16/bf16/fp32 logits, fp64 for fp64): ``4 N + 4 (2 N + 1)``
= ``12 N + 4`` bytes, ``16 N + 4`` with label smoothing (twice that for fp64);
a ring all_reduce moves ``2 (W - 1) / W`` times its payload through each
rank's link. Backward: 0. The README has the comparison with Megatron-LM and
DTensor's ``loss_parallel`` at scale.

No host synchronization: no ``.item()``, no control flow on tensor values. The
one exception is the default ``vocab_start_index`` (see
:func:`vocab_parallel_cross_entropy`).

:func:`vocab_parallel_linear_cross_entropy` takes the hidden states and this
rank's rows of the head's weight (and bias) instead of the logits, which then
exist one chunk of rows at a time (as in
:func:`fusedloss.functional.linear_cross_entropy`): the same two collectives
and bytes per forward, none in the backward, and no ``(N, V_local)`` buffer.
Its input gradient is this rank's part, which the column-parallel layer's
backward sums over the group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn import _reduction as _Reduction

from . import _validation
from ._ops import ops

__all__ = [
    "clear_vocab_offsets",
    "vocab_offsets",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
# c10's dtype names, as torch's messages print them.
_C10_NAMES = {
    torch.float64: "Double",
    torch.float32: "Float",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
}

# Slice sizes of every rank, per group, gathered once (see vocab_offsets).
_slice_sizes: dict = {}


def _group_key(group):
    return dist.group.WORLD if group is None else group


def vocab_offsets(local_size: int, group=None, device=None) -> tuple[int, int]:
    """``(vocab_start, vocab_size)`` of this rank's slice of ``local_size`` classes:
    the exclusive prefix sum of the slice sizes over the group in rank order,
    and their total.

    The first call for a group is a collective (an all_gather of one int64 per
    rank, on ``device``: the logits' device, which NCCL needs) followed by one
    host synchronization to read the sizes; they are then cached for the group,
    so later calls cost nothing. Slice sizes are fixed by a model's sharding;
    if they change, call :func:`clear_vocab_offsets` on every rank (a rank whose
    own size changed raises instead of reading stale offsets).
    """
    key = _group_key(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("vocab_parallel_cross_entropy: this process is not a member of the given group")
    sizes = _slice_sizes.get(key)
    if sizes is None:
        world = dist.get_world_size(group)
        mine = torch.tensor([int(local_size)], dtype=torch.int64, device=device)
        every = torch.empty(world, dtype=torch.int64, device=device)
        # all_gather_single is all_gather_into_tensor's name from torch 2.14 on.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(every, mine, group=group)
        sizes = tuple(int(s) for s in every.tolist())  # the one host sync, on the first call only
        _slice_sizes[key] = sizes
    elif sizes[rank] != local_size:
        raise RuntimeError(
            f"vocab_parallel_cross_entropy: this rank's vocabulary slice has {local_size} classes, but "
            f"{sizes[rank]} when the group's offsets were gathered and cached. Call "
            "fusedloss.distributed.clear_vocab_offsets() on every rank after changing the sharding, or pass "
            "vocab_start_index."
        )
    return sum(sizes[:rank]), sum(sizes)


def clear_vocab_offsets(group=None) -> None:
    """Forget the cached slice sizes of ``group`` (every group when None); call it
    on every rank of the group, since the next call gathers them again."""
    if group is None:
        _slice_sizes.clear()
    else:
        _slice_sizes.pop(group, None)


def _autocast(t: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(t.device.type)
    except RuntimeError:
        return False


def _weight_usable(weight, vocab_start: int, local_size: int) -> bool:
    return weight is None or (weight.dim() == 1 and weight.numel() >= vocab_start + local_size)


def _over_group(
    local_max, packed, mass, usable, target, weight, group, vocab_start, local_size, ignore_index, reduction,
    label_smoothing, lse_square_scale, loss_dtype,
):  # fmt: skip
    """The two collectives and the loss from a local pass's outputs: returns
    finalize's (loss, state, stats).

    A weight that does not cover this rank's slice (``usable`` False) is known
    here only: rather than raise before the collectives (leaving the other
    ranks waiting in them), the local pass ran without it and the class count
    is poisoned, so that every rank learns of it from the SUM; this rank
    raises after."""
    if not usable:
        packed[-1:].fill_(float("nan"))
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    packed = ops.vocab_parallel_ce_rebase(packed, local_max, global_max, mass)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    if not usable:
        raise RuntimeError(
            "weight tensor should be defined either for all classes or no classes but got weight tensor of "
            f"shape: {list(weight.shape)}, short of this rank's classes [{vocab_start}, {vocab_start + local_size})"
        )
    return ops.vocab_parallel_ce_finalize(
        packed, global_max, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, loss_dtype
    )


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, local_logits, target, weight, group, vocab_start, ignore_index, reduction, label_smoothing,
        lse_square_scale, softcap, loss_dtype, out,
    ):  # fmt: skip
        local_size = local_logits.shape[1]
        usable = _weight_usable(weight, vocab_start, local_size)
        local = ops.vocab_parallel_ce_local(
            local_logits, target, weight if usable else None, vocab_start, ignore_index, label_smoothing, softcap
        )
        loss, state, stats = _over_group(
            *local, usable, target, weight, group, vocab_start, local_size, ignore_index, reduction, label_smoothing,
            lse_square_scale, loss_dtype,
        )  # fmt: skip
        ctx.save_for_backward(local_logits, target, weight, state, stats)
        ctx.options = (vocab_start, ignore_index, reduction, label_smoothing, lse_square_scale, softcap)
        ctx.group, ctx.loss_dtype = group, loss_dtype
        out["stats"] = stats  # for strict validation (fusedloss.set_validation)
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, target, weight, state, stats = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 12
        if torch.is_grad_enabled():
            # create_graph=True: the gradient as a graph of torch ops, for
            # higher derivatives (see _composite_loss).
            # (see _composite_loss). Every rank holds the whole loss: as a
            # share of a sum over ranks it counts 1 / world, so that the
            # all_reduces' summing backward gives each rank d loss / d slice.
            loss = _composite_loss(logits, target, weight, ctx.group, stats, ctx.loss_dtype, *ctx.options)
            loss = loss / dist.get_world_size(ctx.group)
            (grad_logits,) = torch.autograd.grad(loss, logits, grad, create_graph=True)
        else:
            grad_logits = ops.vocab_parallel_ce_backward(grad, logits, target, weight, state, stats, *ctx.options)
        return (grad_logits,) + (None,) * 11


class _SumOverGroup(torch.autograd.Function):
    """all_reduce(SUM) as a differentiable function, for objectives that are
    sums over ranks of each rank's own term: the gradient of every rank's input
    is then the sum of every rank's output gradient (its exact adjoint, also
    for higher derivatives)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    @staticmethod
    def backward(ctx, g):
        return _SumOverGroup.apply(g, ctx.group), None


def _composite_loss(x, target, weight, group, stats, loss_dtype, start, ignore_index, reduction, eps, z, softcap):
    """The loss as torch ops with differentiable all_reduces (_SumOverGroup),
    whose gradient is a graph: the create_graph=True
    path. It costs three collectives more (four with label smoothing), run in
    that backward, and its second derivatives run more all_reduces (theirs).
    An all-ignored mean divides by 1 here: its gradient is 0, as the fused one."""
    summed = _SumOverGroup.apply
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(acc)
    if softcap is not None:
        xc = softcap * torch.tanh(xc / softcap)
    n, c = xc.shape
    m = torch.full((n,), -torch.inf, dtype=acc, device=x.device)
    if c:
        m = torch.maximum(m, xc.detach().amax(1))
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)  # a constant: the loss does not depend on it
    lse = m + torch.log(summed(torch.exp(xc - m.unsqueeze(1)).sum(1), group))
    keep = target != ignore_index
    local = target - start
    own = keep & (local >= 0) & (local < c)
    x_t = xc.gather(1, local.clamp(0, max(c - 1, 0)).unsqueeze(1)).squeeze(1) if c else torch.zeros_like(m)
    x_t = summed(torch.where(own, x_t, 0), group)
    safe = torch.where(keep, target, 0).long()
    w = None if weight is None else weight.to(acc)
    w_t = torch.where(keep, 1.0 if w is None else w[safe], 0.0).to(acc)
    loss = w_t * (lse - x_t)
    if eps > 0:
        vocab = stats[2]
        w_local = torch.ones(c, dtype=acc, device=x.device) if w is None else w[start : start + c]
        rel = summed((xc * w_local).sum(1), group)
        smooth = (vocab if w is None else w.sum()) * lse - rel
        loss = (1 - eps) * loss + eps / vocab * torch.where(keep, smooth, 0)
    if z:
        loss = loss + z * w_t * lse * lse
    loss = torch.where(keep, loss, 0)
    if reduction == 1:
        denom = w_t.sum()
        loss = loss.sum() / torch.where(denom == 0, 1, denom)
    elif reduction == 2:
        loss = loss.sum()
    return loss.to(loss_dtype)


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    vocab_start_index: int | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Cross entropy of logits whose classes are sharded over a process group.

    ``local_logits``: this rank's ``(N, V_local)`` slice (any strides, fp16,
    bf16, fp32 or fp64; slices may be uneven, and empty), or ``(V_local,)``
    with a 0-d target (unbatched). ``target``: ``(N,)`` global class indices
    (int64 or uint8), the same on every rank. The result, on every rank (the
    same bits on every rank), is ``cross_entropy(cat(local_logits of every
    rank, dim=1), target, ...)`` with fusedloss's (= torch's) semantics, and
    the gradient of ``local_logits`` is this rank's slice of its gradient.

    * ``group``: the process group (default: the default group); any size,
      any torch.distributed backend that has all_reduce MAX and SUM on the
      logits' device (gloo for CPU tensors, NCCL for CUDA tensors).
    * ``vocab_start_index``: the global class index of ``local_logits[:, 0]``.
      The slices of the group must tile ``[0, V)`` (not checked: that would
      take a collective). Default: the exclusive prefix sum of the slice sizes
      in rank order, gathered by one all_gather and one host sync on the
      first call per group, then cached (:func:`vocab_offsets`). Pass it for
      exactly two collectives per call from the first call on.
    * ``weight``: the full ``(V,)`` class weight, the same on every rank (as
      DTensor's ``loss_parallel``); each rank reads its slice and the target
      weights. With a default ``vocab_start_index`` its size is checked on the
      host (torch's message); otherwise a size other than V is found after the
      collectives: torch's error on the CPU, NaN losses on CUDA.
    * ``ignore_index`` (inside or outside any slice), ``reduction``
      (``"none"``, ``"mean"`` -- over the target weights of the rows not
      ignored; all ignored gives NaN and zero gradient, as torch --,
      ``"sum"``), ``label_smoothing``: as torch.
    * ``lse_square_scale`` (z-loss), ``softcap``, ``out_dtype``: as
      :func:`fusedloss.functional.cross_entropy`. Under ``torch.autocast`` an
      fp16/bf16 call returns an fp32 loss, as torch's cross entropy does.

    The arguments must agree across the group (the same N, targets and
    options): a rank refused before the collectives leaves the others waiting
    in them until the backend's timeout, as with any collective. The one
    rank-specific check, a ``weight`` too short for this rank's slice, is made
    without that risk: the rank takes part in the collectives, every rank
    learns of it from the SUM (the CPU raises, CUDA gives NaN losses), and
    that rank raises torch's weight error.

    Deviations and limits: class-probability targets, K-dimensional logits
    ``(N, C, d1, ...)`` (flatten them to ``(N * d1 * ..., C)``) and
    ``size_average``/``reduce`` are not supported. Out-of-range targets: torch's
    ``IndexError`` on the CPU (raised on every rank, after the collectives, so
    that none is left waiting), a NaN loss and NaN gradients for the row on
    CUDA (``fusedloss.set_validation(True)`` raises instead, at the cost of a
    device sync). Higher-order gradients: a backward with
    ``create_graph=True`` differentiates the loss written as torch ops with
    differentiable all_reduces instead of running
    the fused kernel, which costs 3 more collectives (4 with label smoothing)
    in that backward. Second derivatives are those of the sum over ranks of
    each rank's objective (each rank's gradient slice being its own part, as
    in ``(grad * v_slice).sum()``), and run more all_reduces (every rank must
    take them). ``V`` must stay below 2^24 classes for fp16/bf16/fp32
    logits (the class counts travel in the fp32 SUM).

    Accuracy: the row sums are added in another order than in one process
    (per slice, then over ranks), so the log-sum-exp may differ from the
    single-process one in its last bit. The tests bound every element's
    distance to a float64 computation: fp32 losses within 4 ulp more than
    single-process fusedloss's own distance; fp32 gradient elements within
    ``4 + |x_c - lse|`` ulp more (an ulp of the fp32 argument of
    ``exp(x_c - lse)`` is ``|x_c - lse|`` ulp of the result; one process
    rounds the same way, at other elements); bf16 within 2 bf16 ulp; fp64
    within 1e-12 relative. The target's own gradient is computed, as in one
    process, without the cancellation of ``1 - softmax(x)_t``: the other
    classes' probability mass is summed over every rank in the forward (the
    reason the SUM carries ``x_t`` apart from the sum of exponentials) and
    saved, one value per row.

    Determinism: the same bits on every run for a fixed group size and
    backend: the local sums are fixed-order, MAX is exact, and gloo's and
    NCCL's all_reduce give every rank the same bits in the same order on
    every run (NCCL given the same topology and ``NCCL_ALGO``/``NCCL_PROTO``).
    """
    red = _REDUCTIONS.get(reduction) if isinstance(reduction, str) else None
    if red is None:
        red = _Reduction.get_enum(reduction)  # torch's ValueError (or its legacy names)
    if not isinstance(local_logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("vocab_parallel_cross_entropy: local_logits and target must be tensors")
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing:g}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")
    if target.is_floating_point() and target.shape == local_logits.shape:
        raise NotImplementedError(
            "vocab_parallel_cross_entropy: class-probability targets are not supported; pass class indices"
        )
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_C10_NAMES.get(target.dtype)}")
    if not local_logits.is_floating_point():
        raise NotImplementedError(
            f"\"vocab_parallel_cross_entropy\" not implemented for '{_C10_NAMES.get(local_logits.dtype)}'"
        )
    unbatched = local_logits.dim() == 1
    if unbatched:
        if target.dim() != 0:
            raise ValueError(f"Expected target to be 0-d for unbatched (C,) logits, got shape {tuple(target.shape)}")
        local_logits, target = local_logits.unsqueeze(0), target.unsqueeze(0)
    elif local_logits.dim() != 2:
        raise ValueError(
            "vocab_parallel_cross_entropy takes (N, V_local) or (V_local,) logits, got shape "
            f"{tuple(local_logits.shape)}; flatten K-dimensional logits to (N * d1 * ..., V_local)"
        )
    if target.dim() != 1 or target.shape[0] != local_logits.shape[0]:
        raise ValueError(
            f"Expected input batch_size ({local_logits.shape[0]}) to match target batch_size "
            f"({target.shape[0] if target.dim() else 1})."
        )
    half = local_logits.dtype in (torch.float16, torch.bfloat16)
    autocast = half and _autocast(local_logits)
    if weight is not None and weight.dtype != local_logits.dtype and not autocast:
        raise RuntimeError(
            f"expected scalar type {_C10_NAMES[local_logits.dtype]} but found {_C10_NAMES.get(weight.dtype)}"
        )
    if out_dtype is None:
        out_dtype = torch.float32 if autocast else local_logits.dtype
    local_size = local_logits.shape[1]
    if vocab_start_index is None:
        vocab_start_index, vocab_size = vocab_offsets(local_size, group, local_logits.device)
        if weight is not None and (weight.dim() != 1 or weight.numel() != vocab_size):
            raise RuntimeError(
                f"weight tensor should be defined either for all {vocab_size} classes or no classes but got "
                f"weight tensor of shape: {list(weight.shape)}"
            )
    out = {}
    loss = _VocabParallelCrossEntropy.apply(
        local_logits, target, weight, group, int(vocab_start_index), int(ignore_index), red,
        float(label_smoothing), float(lse_square_scale), None if softcap is None else float(softcap), out_dtype, out,
    )  # fmt: skip
    if _validation.wanted(local_logits):
        # Strict mode off the CPU: torch's errors, at the cost of a device sync
        # (every rank raises alike: all hold the same targets and V).
        vocab_size = int(out["stats"][2])
        if weight is not None and weight.numel() != vocab_size:
            raise RuntimeError(
                f"weight tensor should be defined either for all {vocab_size} classes or no classes but got "
                f"weight tensor of shape: {list(weight.shape)}"
            )
        _validation.check_class_indices(target, vocab_size, ignore_index)
    return loss.squeeze(0) if unbatched and red == 0 else loss


# ---------------------------------------------------------------------------
# The linear variant: the hidden states and this rank's rows of the head's
# weight in place of the logits, which exist one chunk of rows at a time.


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, input, local_weight, bias, target, weight, group, vocab_start, ignore_index, reduction, label_smoothing,
        lse_square_scale, softcap, chunk_size, loss_dtype, out,
    ):  # fmt: skip
        local_size = local_weight.shape[0]
        usable = _weight_usable(weight, vocab_start, local_size)
        local = ops.vocab_parallel_linear_ce_local(
            input, local_weight, target, bias, weight if usable else None, vocab_start, ignore_index,
            label_smoothing, softcap, chunk_size,
        )  # fmt: skip
        loss, state, stats = _over_group(
            *local, usable, target, weight, group, vocab_start, local_size, ignore_index, reduction, label_smoothing,
            lse_square_scale, loss_dtype,
        )  # fmt: skip
        ctx.save_for_backward(input, local_weight, bias, target, weight, state, stats)
        ctx.options = (vocab_start, ignore_index, reduction, label_smoothing, lse_square_scale, softcap)
        ctx.group, ctx.loss_dtype, ctx.chunk_size = group, loss_dtype, chunk_size
        out["stats"] = stats
        return loss

    @staticmethod
    def backward(ctx, grad):
        input, local_weight, bias, target, weight, state, stats = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        none = (None,) * 12
        if not any(needs):
            return (None, None, None) + none
        if torch.is_grad_enabled():
            # create_graph=True: the loss as torch ops over this rank's whole
            # (N, V_local) logits, with differentiable all_reduces; each rank's
            # share of the sum over ranks is 1 / world (see _composite_loss).
            logits = input.matmul(local_weight.t())
            if bias is not None:
                logits = logits + bias
            loss = _composite_loss(logits, target, weight, ctx.group, stats, ctx.loss_dtype, *ctx.options)
            loss = loss / dist.get_world_size(ctx.group)
            wrt = [t for t, n in zip((input, local_weight, bias), needs, strict=True) if n]
            got = iter(torch.autograd.grad(loss, wrt, grad, create_graph=True))
            return tuple(next(got) if n else None for n in needs) + none
        with torch.autocast(input.device.type, enabled=False):
            gi, gw, gb = ops.vocab_parallel_linear_ce_backward(
                grad, input, local_weight, target, bias, weight, state, stats, *ctx.options, ctx.chunk_size,
                list(needs),
            )  # fmt: skip
        return (gi if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None) + none


def vocab_parallel_linear_cross_entropy(
    input: torch.Tensor,
    local_linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    vocab_start_index: int | None = None,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Cross entropy of ``linear(input, W, b)`` when the head ``W`` (V, D) is
    sharded by rows (classes) over a process group: a column-parallel LM head
    and its loss, without any rank holding its ``(N, V_local)`` logits.

    ``input``: the hidden states ``(N, D)`` (or ``(D,)`` with a 0-d target),
    the same on every rank of the group. ``local_linear_weight``: this rank's
    rows ``(V_local, D)`` of ``W`` (slices may be uneven, and empty);
    ``linear_bias``: this rank's ``(V_local,)`` slice of ``b``. ``target``:
    ``(N,)`` global class indices (int64 or uint8), the same on every rank.
    The loss, on every rank (the same bits on every rank), is that of
    :func:`fusedloss.functional.linear_cross_entropy` with the weight (and
    bias) concatenated over the group in rank order, which equals
    ``cross_entropy(linear(input, W, b), target, ...)``; ``group``,
    ``vocab_start_index``, ``weight`` (the full ``(V,)`` class weight),
    ``ignore_index``, ``reduction``, ``label_smoothing``,
    ``lse_square_scale``, ``softcap`` and ``out_dtype`` are those of
    :func:`vocab_parallel_cross_entropy`, whose notes on argument agreement,
    errors, out-of-range targets, accuracy of the row sums and determinism
    apply here too (``vocab_start_index`` defaults to the prefix sum of the
    ``local_linear_weight`` row counts).

    Gradients: ``local_linear_weight`` and ``linear_bias`` get this rank's
    rows of the gradients of ``W`` and ``b``. ``input`` gets this rank's
    **part** of its gradient, the sum over this slice's classes
    ``dlogits_local @ W_local``: the full gradient is the sum of the parts
    over the group. That all_reduce belongs to the column-parallel layer's
    backward (the identity-forward, all_reduce-backward function in front of
    the head, as in Megatron-style tensor parallelism), not to the loss: when
    the hidden states come from replicated layers, put one there.

    How: rows in chunks of ``chunk_size`` (default: as
    :func:`fusedloss.functional.linear_cross_entropy`, a budget of logits
    bytes per chunk: 32 MiB on the CPU, 1 GiB on CUDA, evened out). Forward:
    per chunk, one GEMM (ATen: oneDNN/MKL, cuBLAS, the same tiled CPU GEMMs as
    linear_cross_entropy) writes the chunk's local logits into one reused
    buffer, rounded to the input's dtype as torch's ``linear`` rounds them, and
    the local pass of :func:`vocab_parallel_cross_entropy` reads them into the
    batch's per-row (max, sum of exponentials but the target's, target logit,
    smoothing sum); then the same two collectives (``all_reduce`` MAX of N
    values, one packed ``all_reduce`` SUM of 2N + 1, 3N + 1 with smoothing:
    12N + 4 bytes on the wire, 16N + 4 with smoothing, twice that for fp64)
    and the loss. Backward, with no collective: per chunk the logits GEMM
    again, their gradient written over them from the saved per-row global
    state, then ``grad_input`` rows ``+= dlogits @ W_local`` and
    ``grad_W_local += dlogits^T @ x_chunk`` (fp32 accumulators for fp16/bf16
    over several chunks, rounded once): four GEMMs per chunk in all, as the
    single-device op. The gradient runs in the backward, not the forward, so
    that every reduction takes one path, grad_output enters the row
    coefficients (one rounding of each gradient, also for fp16/bf16), and
    nothing but O(N) state is held between forward and backward. Extra memory
    per rank: the chunk buffer, the gradients (and fp32 accumulators for
    fp16/bf16), O(N); never the (N, V_local) logits nor an fp32 copy of the
    shard. No host synchronization (the default ``vocab_start_index``'s
    first call aside).

    Deviations and limits: as :func:`vocab_parallel_cross_entropy` (class
    indices only; no K-dimensional weights). Under ``torch.autocast``, the
    input, weight and bias are cast to the autocast dtype (fp64 stays fp64) as
    torch's ``linear`` would be, and the loss is fp32. A backward with
    ``create_graph=True`` differentiates the loss written as torch ops
    (``input @ W_local^T`` in full, then the composite of
    :func:`vocab_parallel_cross_entropy`, with its extra collectives).
    ``torch.compile`` traces it as it does :func:`vocab_parallel_cross_entropy`.
    """
    red = _REDUCTIONS.get(reduction) if isinstance(reduction, str) else None
    if red is None:
        red = _Reduction.get_enum(reduction)  # torch's ValueError (or its legacy names)
    name = "vocab_parallel_linear_cross_entropy"
    if not all(isinstance(t, torch.Tensor) for t in (input, local_linear_weight, target)):
        raise TypeError(f"{name}: input, local_linear_weight and target must be tensors")
    # torch's linear_cross_entropy checks, in its words.
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if local_linear_weight.dim() != 2:
        raise RuntimeError(
            f"{name}: local_linear_weight must be 2-D (V_local, in_features), got shape "
            f"{tuple(local_linear_weight.shape)}"
        )
    if input.shape[-1] != local_linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {local_linear_weight.shape[-1]}, respectively"
        )
    local_size = local_linear_weight.shape[0]
    if linear_bias is not None and tuple(linear_bias.shape) != (local_size,):
        raise RuntimeError(f"expected linear_bias shape {(local_size,)}, got {tuple(linear_bias.shape)}")
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing:g}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if target.is_floating_point() and target.dim() == input.dim():
        raise NotImplementedError(f"{name}: class-probability targets are not supported; pass class indices")
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_C10_NAMES.get(target.dtype)}")
    if not input.is_floating_point():
        raise NotImplementedError(f"\"{name}\" not implemented for '{_C10_NAMES.get(input.dtype)}'")
    unbatched = input.dim() == 1
    if unbatched:
        if target.dim() != 0:
            raise ValueError(f"Expected target to be 0-d for unbatched (D,) input, got shape {tuple(target.shape)}")
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    if target.dim() != 1 or target.shape[0] != input.shape[0]:
        raise ValueError(
            f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
            f"({target.shape[0] if target.dim() else 1})."
        )
    autocast = input.dtype != torch.float64 and _autocast(input)
    if autocast:
        # torch's linear under autocast: its operands in the autocast dtype
        # (through differentiable casts), cross entropy in fp32.
        low = torch.get_autocast_dtype(input.device.type)
        input = input.to(low)
        if local_linear_weight.is_floating_point() and local_linear_weight.dtype != torch.float64:
            local_linear_weight = local_linear_weight.to(low)
        if linear_bias is not None and linear_bias.is_floating_point() and linear_bias.dtype != torch.float64:
            linear_bias = linear_bias.to(low)
    for other, what in ((local_linear_weight, "local_linear_weight"), (linear_bias, "linear_bias")):
        if other is not None and other.dtype != input.dtype:
            raise RuntimeError(
                f"{name}: {what} has dtype {other.dtype} but the input has {input.dtype}; torch's linear takes "
                "operands of one dtype"
            )
    if weight is not None and weight.dtype != input.dtype and not autocast:
        raise RuntimeError(f"expected scalar type {_C10_NAMES[input.dtype]} but found {_C10_NAMES.get(weight.dtype)}")
    if out_dtype is None:
        out_dtype = torch.float32 if autocast else input.dtype
    if vocab_start_index is None:
        vocab_start_index, vocab_size = vocab_offsets(local_size, group, input.device)
        if weight is not None and (weight.dim() != 1 or weight.numel() != vocab_size):
            raise RuntimeError(
                f"weight tensor should be defined either for all {vocab_size} classes or no classes but got "
                f"weight tensor of shape: {list(weight.shape)}"
            )
    out = {}
    with torch.autocast(input.device.type, enabled=False):
        loss = _VocabParallelLinearCrossEntropy.apply(
            input, local_linear_weight, linear_bias, target, weight, group, int(vocab_start_index), int(ignore_index),
            red, float(label_smoothing), float(lse_square_scale), None if softcap is None else float(softcap),
            chunk_size or 0, out_dtype, out,
        )  # fmt: skip
    if _validation.wanted(input):
        vocab_size = int(out["stats"][2])
        if weight is not None and weight.numel() != vocab_size:
            raise RuntimeError(
                f"weight tensor should be defined either for all {vocab_size} classes or no classes but got "
                f"weight tensor of shape: {list(weight.shape)}"
            )
        _validation.check_class_indices(target, vocab_size, ignore_index)
    return loss.squeeze(0) if unbatched and red == 0 else loss


# ---------------------------------------------------------------------------
# DTensor: fusedloss.functional.cross_entropy of logits sharded on the class
# dimension runs here (the same result as torch's loss_parallel()).


def is_dtensor(t) -> bool:
    if not dist.is_available():
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def dtensor_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale,
                          softcap, out_dtype):  # fmt: skip
    """Cross entropy of a DTensor ``input`` of shape (N, C) sharded on the class
    dimension on exactly one mesh dimension and replicated on the others, with a
    replicated (DTensor or plain) target and weight: the vocabulary-parallel
    kernels on the local shards, two collectives over that mesh dimension's
    group, and a replicated DTensor loss, as ``loss_parallel`` returns. Returns
    None for any other layout (the caller then runs its usual path)."""
    from torch.distributed.tensor import DTensor, Replicate

    if input.dim() != 2 or reduction not in (0, 1, 2):
        return None
    placements = input.placements
    tp = [i for i, p in enumerate(placements) if p.is_shard() and p.dim in (1, -1)]
    if len(tp) != 1 or any(not p.is_replicate() for i, p in enumerate(placements) if i != tp[0]):
        return None

    def local(t):
        if isinstance(t, DTensor):
            if t.device_mesh != input.device_mesh or not all(p.is_replicate() for p in t.placements):
                return NotImplemented
            return t.to_local()
        return t

    target, weight = local(target), None if weight is None else local(weight)
    if target is NotImplemented or weight is NotImplemented:
        return None
    mesh = input.device_mesh
    start = _shard_offset(input, tp[0])
    loss = vocab_parallel_cross_entropy(
        input.to_local(), target, group=mesh.get_group(tp[0]), vocab_start_index=start, weight=weight,
        ignore_index=ignore_index, reduction=("none", "mean", "sum")[reduction], label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale, softcap=softcap, out_dtype=out_dtype,
    )  # fmt: skip
    return DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _shard_offset(input, mesh_dim: int) -> int:
    """The global index of this rank's first class: from the DTensor's layout
    (torch.chunk's split, as DTensor shards), with no communication."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(input.shape, input.device_mesh, input.placements)
        return int(offset[1])
    except ImportError:  # torch.chunk's split, as DTensor shards: ceil-sized chunks, the last shorter or empty
        size = input.shape[1]
        chunk = -(-size // input.device_mesh.size(mesh_dim))
        return min(input.device_mesh.get_local_rank(mesh_dim) * chunk, size)
