"""fusedloss for Hugging Face transformers causal language models.

Two ways in, both for models such as ``LlamaForCausalLM`` and
``GPT2LMHeadModel`` (anything whose forward computes ``logits =
self.lm_head(hidden_states)`` and then calls ``self.loss_function(logits,
labels, vocab_size=..., **kwargs)``):

1. The loss only::

       from fusedloss.integrations.transformers import causal_lm_loss
       model.loss_function = causal_lm_loss

   transformers' ``ForCausalLMLoss`` semantics (labels shifted by one with
   ``ignore_index`` padding, or ``shift_labels`` as given; ``num_items_in_batch``
   turns the mean into ``sum / num_items_in_batch``) with fusedloss's cross
   entropy, which reads bf16/fp16 logits as they are and returns an fp32 loss,
   instead of transformers' ``logits.float()`` copy of the (N, V) logits.

2. The head and the loss as one :func:`fusedloss.functional.linear_cross_entropy`::

       from fusedloss.integrations.transformers import fuse_linear_cross_entropy
       fuse_linear_cross_entropy(model)

   When ``labels`` are given, the model's last hidden states go through
   ``linear_cross_entropy`` with the ``lm_head`` weight (tied to the input
   embedding or not) and bias: the logits are never computed, and the output's
   ``logits`` is ``None``. Without labels (generation, evaluation of logits)
   the model runs as before. ``unfuse_linear_cross_entropy(model)`` undoes it.

transformers is an optional dependency of fusedloss: importing this module
without it raises ImportError.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
import transformers  # noqa: F401  (the dependency: fail early and clearly without it)

import fusedloss.functional as FF

__all__ = ["causal_lm_loss", "fuse_linear_cross_entropy", "unfuse_linear_cross_entropy"]


def _shifted(labels: torch.Tensor | None, shift_labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """transformers' shifting: position i predicts label i + 1, the last position
    predicts nothing (padded with ignore_index)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _reduced(loss_fn, num_items_in_batch):
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = loss_fn(reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` computed by fusedloss's cross entropy:
    the same shifting, ``ignore_index`` and ``num_items_in_batch`` rules and an
    fp32 loss, without the fp32 copy of the logits (bf16/fp16 logits are read
    as they are and computed on in fp32 registers). Set it as
    ``model.loss_function``."""
    logits = logits.reshape(-1, vocab_size)
    target = _shifted(labels, shift_labels, ignore_index).to(logits.device)
    return _reduced(
        lambda reduction: FF.cross_entropy(
            logits, target, ignore_index=ignore_index, reduction=reduction, out_dtype=torch.float32
        ),
        num_items_in_batch,
    )


# Config attributes of models that transform the logits after lm_head (Gemma's
# softcapping, Cohere's and Granite's scaling): the fused head would skip that.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class _FusedHead:
    """The state of one fused model: while a forward with labels runs, lm_head
    hands its input to the loss and returns a stand-in for the logits."""

    def __init__(self, model, head, chunk_size):
        self.model = model
        self.head = head
        self.chunk_size = chunk_size
        self.active = False
        self.hidden = None
        self.stand_in = None
        self.used = False
        self.head_forward = head.forward  # the instance attribute we replace (a bound method)
        self.model_forward = model.forward
        self.loss_function = getattr(model, "_loss_function", None)
        self.forward_signature = inspect.signature(model.forward)

    @contextlib.contextmanager
    def capturing(self):
        self.active, self.hidden, self.stand_in, self.used = True, None, None, False
        try:
            yield
        finally:
            self.active, self.hidden, self.stand_in = False, None, None

    def lm_head(self, hidden_states, *args, **kwargs):
        if not self.active:
            return self.head_forward(hidden_states, *args, **kwargs)
        self.hidden = hidden_states
        # Zero bytes of (..., V) "logits": one element, expanded. The model only
        # passes it on to its loss function (and into its output, where it is
        # replaced by None).
        self.stand_in = hidden_states.new_zeros(()).expand(*hidden_states.shape[:-1], self.head.out_features)
        return self.stand_in

    def loss(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kw):
        if not self.active:
            fn = self.loss_function or causal_lm_loss
            return fn(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kw)
        if logits is not self.stand_in or self.hidden is None:
            raise RuntimeError(
                "fuse_linear_cross_entropy: this model changes its logits between lm_head and its loss, "
                "which the fused head cannot reproduce; use model.loss_function = causal_lm_loss instead"
            )
        self.used = True
        hidden = self.hidden.reshape(-1, self.hidden.shape[-1])
        target = _shifted(labels, shift_labels, ignore_index).to(hidden.device)
        return _reduced(
            lambda reduction: FF.linear_cross_entropy(
                hidden,
                self.head.weight,
                target,
                linear_bias=self.head.bias,
                reduction=reduction,
                ignore_index=ignore_index,
                chunk_size=self.chunk_size,
                out_dtype=torch.float32,
            ),
            num_items_in_batch,
        )

    def forward(self, *args, **kwargs):
        bound = self.forward_signature.bind_partial(*args, **kwargs).arguments
        if bound.get("labels") is None:
            return self.model_forward(*args, **kwargs)
        with self.capturing():
            out = self.model_forward(*args, **kwargs)
            if not self.used:
                raise RuntimeError(
                    "fuse_linear_cross_entropy: the model did not compute its loss from lm_head's output"
                )
            stand_in = self.stand_in
        return _without_logits(out, stand_in)


def _without_logits(out, stand_in):
    """The model's output with ``logits`` None (the stand-in is not the logits)."""
    if isinstance(out, tuple):
        return tuple(None if v is stand_in else v for v in out)
    if getattr(out, "logits", None) is stand_in:
        fields = {k: v for k, v in out.items() if k != "logits"}
        return type(out)(**fields)
    return out


def fuse_linear_cross_entropy(model: torch.nn.Module, *, chunk_size: int | None = None) -> torch.nn.Module:
    """Run ``model``'s lm_head and loss as one
    :func:`fusedloss.functional.linear_cross_entropy` whenever ``labels`` are
    passed: the (N, V) logits are never computed, so neither they, their fp32
    copy nor their gradient take memory. Returns the model (changed in place).

    Semantics: transformers' ``ForCausalLMLoss`` (see :func:`causal_lm_loss`),
    fp32 loss. With labels, the output's ``logits`` is ``None``; without
    labels the model computes its logits as usual. ``chunk_size``: rows per
    chunk (default: fusedloss's memory budget). Works with the head's weight
    tied to the input embedding (the gradient reaches the shared parameter) or
    not, and with a bias.

    Raises ``NotImplementedError`` for models that transform the logits after
    lm_head (softcapping or scaling in the config), and ``RuntimeError`` if a
    model's forward turns out to change them anyway.
    """
    if getattr(model, "_fusedloss_fused_head", None) is not None:
        return model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(
            f"fuse_linear_cross_entropy: expected a model whose output embedding is nn.Linear, got {head!r}"
        )
    config = getattr(model, "config", None)
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value is not None and value != 1:
            raise NotImplementedError(
                f"fuse_linear_cross_entropy: {type(model).__name__} transforms its logits after lm_head "
                f"({attr}={value}); use model.loss_function = causal_lm_loss instead"
            )
    state = _FusedHead(model, head, chunk_size)
    head.forward = state.lm_head
    model.loss_function = state.loss
    model.forward = state.forward
    model._fusedloss_fused_head = state
    return model


def unfuse_linear_cross_entropy(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`fuse_linear_cross_entropy`."""
    state = getattr(model, "_fusedloss_fused_head", None)
    if state is None:
        return model
    del state.head.forward
    del model.forward
    if state.loss_function is None:
        del model._loss_function
    else:
        model.loss_function = state.loss_function
    del model._fusedloss_fused_head
    return model
