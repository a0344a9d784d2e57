"""Fused linear + cross entropy: a language model's head and loss without its logits.

``linear_cross_entropy(input, linear_weight, target)`` is
``cross_entropy(linear(input, linear_weight), target)`` computed in chunks of
rows: per chunk, the logits are produced by ATen's GEMM (cuBLAS, oneDNN/MKL)
into one reused buffer, fusedloss's cross-entropy row kernels turn them in
place into the loss and the logits' gradient, and the chunk's gradient GEMMs
write grad_input's rows and add the chunk's share of grad_weight (and
grad_bias) in chunk order. The full (N, V) logits never exist.

Re-exported as ``fusedloss.functional.linear_cross_entropy`` and
``fusedloss.nn.LinearCrossEntropyLoss``.
"""

from __future__ import annotations

import torch
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _validation
from ._ops import eager, ops
from .functional import _REFUSALS, _autocast, _compiling, _decomposed, _on_refusal, _reduction_enum, _transformed

__all__ = ["LinearCrossEntropyLoss", "linear_cross_entropy", "CPU_CHUNK_BUDGET_BYTES", "CUDA_CHUNK_BUDGET_BYTES"]

# The default chunk: as many rows as fit this many bytes of logits (in the
# input's dtype), then evened out over the chunks (csrc: kChunkBudgetBytes).
CPU_CHUNK_BUDGET_BYTES = 32 << 20
CUDA_CHUNK_BUDGET_BYTES = 1 << 30


def _chunk_rows(chunk_size, options) -> int:
    """The chunk size the op gets: 0 (the device's budget) unless the caller
    gives one; a ``batch_chunk_size`` in ``options`` bounds it."""
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    rows = chunk_size or 0
    bound = getattr(options, "batch_chunk_size", None) if options is not None else None
    if bound is not None:
        rows = min(rows, bound) if rows else bound
    return int(rows)


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options=None,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Cross entropy of ``linear(input, linear_weight, linear_bias)`` without
    the logits: :func:`torch.nn.functional.linear_cross_entropy` (torch >= 2.14),
    always on a fused, chunked path.

    Same results as torch's reference path (``options=None``: ``linear`` then
    ``cross_entropy``) for everything it accepts: input ``(in_features)`` or
    ``(N, in_features)``, ``linear_weight`` ``(C, in_features)``, class-index
    targets (int64/uint8) and class-probability targets, ``linear_bias``,
    ``weight``, ``ignore_index`` (``None`` means -100 for class indices; any
    value with probability targets raises torch's error), ``label_smoothing``,
    every reduction, fp64/fp32/fp16/bf16, and torch's errors. The loss has
    torch's dtype (the input's for class indices), each gradient its
    parameter's dtype.

    How: rows in chunks (``chunk_size`` rows, default: as many as fit
    ``CPU_CHUNK_BUDGET_BYTES`` = 32 MiB / ``CUDA_CHUNK_BUDGET_BYTES`` = 1 GiB
    of logits in the input's dtype, evened out over the chunks); per chunk one
    GEMM writes the logits into a reused buffer, rounded to the input's dtype
    as torch's ``linear`` rounds them; the softmax, loss and logits' gradient
    are computed from them in fp32 (fp64) registers and the gradient is
    written over them; one GEMM gives the chunk's rows of grad_input and one
    adds its share of grad_weight. grad_weight and grad_bias of fp16/bf16
    weights are accumulated in fp32 over the chunks and rounded once (a
    single chunk computes them in one GEMM). Extra memory: the chunk buffer,
    the gradients, the fp32 accumulators for fp16/bf16, and O(N).

    For 'mean'/'sum' the forward computes the gradients (for grad_output = 1)
    and the backward scales them by grad_output on the device: no host sync;
    in place on the last backward, out of place when the graph is retained.
    For 'none' (and for fp16, whose gradients at grad_output = 1 could
    underflow where a loss scaler's would not) the backward recomputes the
    chunks' logits. Deterministic: the same bits on every run, on the CPU for
    any thread count (fixed GEMM tiles, see csrc/cpu/linear_cross_entropy.cpp),
    on CUDA without atomics. ``torch.compile(fullgraph=True)`` traces it.

    Extras, keyword-only: ``lse_square_scale`` and ``softcap`` as in
    :func:`fusedloss.functional.cross_entropy`; ``chunk_size`` (rows per
    chunk); ``out_dtype`` (the loss's dtype, e.g. ``torch.float32`` for bf16
    weights).

    Deviations from torch:

    * ``options`` (a :class:`torch.nn.LinearCrossEntropyOptions`) is accepted
      but does not select a path: fusedloss always takes its fused one. Its
      ``batch_chunk_size``, if set, bounds the chunk; its other fields
      (``acc_policy``, ``acc_dtype``, ``allow_retain_graph``,
      ``chunking_method``) do not apply (fusedloss accumulates fp16/bf16
      weight gradients in fp32 and supports retain_graph always).
    * A K-dimensional ``linear_weight`` ``(C, d1, ..., dK, in_features)``
      runs the reference path (linear, then fusedloss's cross entropy
      composite): its logits exist in full.
    * A probability target or class weight that requires grad, forward-mode
      AD, create_graph=True, and torch.func transforms run the reference path.
    * With bf16 weights, a grad_output that is not a power of two rounds the
      scaled gradients a second time (at most one more unit in the last
      place); 1 and loss-scaler powers of two are exact.
    * An out-of-range class index on CUDA gives NaN loss and gradients for
      its row instead of a device-side assert (see
      :func:`fusedloss.functional.cross_entropy`).
    """
    if has_torch_function_variadic(input, linear_weight, target, linear_bias, weight):
        return handle_torch_function(
            linear_cross_entropy,
            (input, linear_weight, target, linear_bias, weight),
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=weight,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            options=options,
            lse_square_scale=lse_square_scale,
            softcap=softcap,
            chunk_size=chunk_size,
            out_dtype=out_dtype,
        )
    # torch's checks, in torch's order and words.
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    in_features = input.shape[-1]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively"
        )
    num_classes = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes, *out_features):
        raise RuntimeError(f"expected linear_bias shape {(num_classes, *out_features)}, got {tuple(linear_bias.shape)}")
    if out_features and input.dim() == 1:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
            f" batched input, (N, {in_features}), got unbatched"
            f" input with shape {tuple(input.shape)}"
        )
    logits_shape = (*input.shape[:-1], num_classes, *out_features)
    if target.shape == logits_shape and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ignore_index = ignore_index if ignore_index is not None else -100
    red = _reduction_enum(None, None, reduction)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")
    rows = _chunk_rows(chunk_size, options)
    args = (
        input, linear_weight, target, linear_bias, weight, ignore_index, red, float(label_smoothing),
        float(lse_square_scale), softcap, rows, out_dtype,
    )  # fmt: skip
    compiling = _compiling()
    if _transformed(compiling):
        return _decomposed(ops.linear_cross_entropy_composite, *args)
    # torch refuses a class weight of another dtype for class indices (under
    # autocast, or with an out_dtype, the computation is fp32 for both): the
    # composite raises torch's error. K-dimensional weights take the composite.
    if not out_features and (
        weight is None
        or weight.dtype == input.dtype
        or target.is_floating_point()
        or out_dtype is not None
        or _autocast(input)
    ):
        if _validation._enabled and input.device.type != "cpu" and not target.is_floating_point():
            _validation.check_class_indices(target, num_classes, ignore_index)
        try:
            return (ops.linear_cross_entropy.default if compiling else eager.linear_cross_entropy)(*args)
        except _REFUSALS as e:
            _on_refusal(e, input, "linear_cross_entropy")
    return ops.linear_cross_entropy_composite.default(*args)


_TorchModule = getattr(torch.nn, "LinearCrossEntropyLoss", None)
if _TorchModule is None:  # torch < 2.14: the same constructor, on a plain loss base
    _TorchModule = torch.nn.modules.loss._WeightedLoss
    _HAS_TORCH_MODULE = False
else:
    _HAS_TORCH_MODULE = True


class LinearCrossEntropyLoss(_TorchModule):
    """:class:`torch.nn.LinearCrossEntropyLoss` (torch >= 2.14; the same module
    on older torch), computed by
    :func:`fusedloss.functional.linear_cross_entropy`. The extras
    ``lse_square_scale``, ``softcap``, ``chunk_size`` and ``out_dtype`` are
    keyword-only constructor arguments; with their defaults the module is
    torch's, ``repr`` and ``state_dict`` included."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: torch.Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options=None,
        lse_square_scale: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> None:
        if _HAS_TORCH_MODULE:
            super().__init__(
                in_features,
                num_classes,
                out_features=out_features,
                bias=bias,
                device=device,
                dtype=dtype,
                reduction=reduction,
                weight=weight,
                ignore_index=ignore_index,
                label_smoothing=label_smoothing,
                options=options,
            )
        else:
            self._init_like_torch(
                in_features, num_classes, out_features, bias, device, dtype, reduction, weight, ignore_index,
                label_smoothing, options,
            )  # fmt: skip
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.out_dtype = out_dtype

    def _init_like_torch(
        self, in_features, num_classes, out_features, bias, device, dtype, reduction, weight, ignore_index,
        label_smoothing, options,
    ):  # fmt: skip
        import math

        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = out_features
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.linear = torch.nn.Linear(
            in_features, math.prod(out_features, start=num_classes), bias=bias, device=device, dtype=dtype
        )
        self.options = options

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "fusedloss.nn.LinearCrossEntropyLoss cannot be compiled by torch.jit.script, whose TorchScript "
            "subset does not cover fusedloss's Python API. Use torch.compile (or torch.jit.trace), or torch's "
            "own module in code that must be scripted."
        )

    def extra_repr(self) -> str:
        base = (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes},"
            f" out_features={self.out_features}, bias={self.linear.bias is not None},"
            f" reduction={self.reduction}, ignore_index={self.ignore_index},"
            f" label_smoothing={self.label_smoothing}, options={self.options}"
        )
        if _HAS_TORCH_MODULE:
            base = super().extra_repr()
        extras = []
        if self.lse_square_scale:
            extras.append(f"lse_square_scale={self.lse_square_scale}")
        if self.softcap is not None:
            extras.append(f"softcap={self.softcap}")
        if self.chunk_size is not None:
            extras.append(f"chunk_size={self.chunk_size}")
        if self.out_dtype is not None:
            extras.append(f"out_dtype={self.out_dtype}")
        return ", ".join([base, *extras])

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        linear_weight = self.linear.weight
        linear_bias = self.linear.bias
        if self.out_features:
            linear_weight = linear_weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
            if linear_bias is not None:
                linear_bias = linear_bias.reshape((self.num_classes, *self.out_features))
        return linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
            lse_square_scale=self.lse_square_scale,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
            out_dtype=self.out_dtype,
        )
