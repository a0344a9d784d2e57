"""fusedloss.integrations.transformers on tiny Llama- and GPT-2-style causal
LMs built from configs: the loss function against transformers' own, the fused
head + loss against the stock model (loss curves over 20 training steps,
gradients of tied and untied heads), and the memory a training step saves.

Skipped when transformers is not installed (it is an optional dependency)."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

from conftest import OUTSIDE_SOURCE  # noqa: E402
from fusedloss.integrations.transformers import (  # noqa: E402
    causal_lm_loss,
    fuse_linear_cross_entropy,
    unfuse_linear_cross_entropy,
)

VOCAB = 251


def llama(tied=True, vocab=VOCAB, hidden=32):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(cfg)


def gpt2(vocab=VOCAB, hidden=32):
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=2,
        n_head=4,
        n_positions=512,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


MODELS = {"llama_tied": lambda: llama(True), "llama_untied": lambda: llama(False), "gpt2": gpt2}


def _batch(step, B=4, T=24, vocab=VOCAB):
    """Sequences that follow a rule (next = 7 * token + 3 mod V) from random
    starts, so that a tiny model learns within a few steps."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.empty(B, T, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (B,), generator=g)
    for j in range(1, T):
        ids[:, j] = (7 * ids[:, j - 1] + 3) % vocab
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that is not trained on
    labels[0, -5:] = -100  # padding
    return ids, labels


# ---------------------------------------------------------------------------
# The loss function
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "num_items", "shift_labels", "ignore_index"])
def test_causal_lm_loss_matches_transformers(dtype, variant):
    logits = torch.randn(3, 10, VOCAB).to(dtype)
    labels = torch.randint(0, VOCAB, (3, 10))
    labels[1, :4] = -100
    kw = {}
    if variant == "num_items":
        kw["num_items_in_batch"] = torch.tensor(17)
    elif variant == "shift_labels":
        kw["shift_labels"] = torch.roll(labels, -1, 1)
    elif variant == "ignore_index":
        labels[labels == -100] = 7
        labels[0, :2] = 7
        kw["ignore_index"] = 7
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ours = causal_lm_loss(a, labels, VOCAB, **kw)
    theirs = ForCausalLMLoss(b, labels, VOCAB, **kw)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    (ga,) = torch.autograd.grad(ours, a)
    (gb,) = torch.autograd.grad(theirs, b)
    assert ga.dtype == gb.dtype == dtype
    # transformers' gradient comes from its fp32 copy, rounded back once; ours
    # is computed in fp32 registers and rounded once: the same to an ulp
    torch.testing.assert_close(ga, gb, **({} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-7}))


def test_causal_lm_loss_as_the_models_loss_function():
    torch.manual_seed(0)
    m = llama()
    ids, labels = _batch(0)
    stock = m(input_ids=ids, labels=labels).loss
    m.loss_function = causal_lm_loss
    ours = m(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours, stock, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# The fused head + loss
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_forward_and_gradients_match_stock(name):
    torch.manual_seed(0)
    stock = MODELS[name]()
    fused = fuse_linear_cross_entropy(copy.deepcopy(stock), chunk_size=16)
    ids, labels = _batch(0)
    s = stock(input_ids=ids, labels=labels)
    f = fused(input_ids=ids, labels=labels)
    assert f.logits is None and s.logits is not None
    assert f.loss.dtype == torch.float32
    torch.testing.assert_close(f.loss, s.loss, rtol=1e-6, atol=1e-6)
    s.loss.backward()
    f.loss.backward()
    for (n, p), (_, q) in zip(stock.named_parameters(), fused.named_parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    head = fused.get_output_embeddings().weight
    assert (head is fused.get_input_embeddings().weight) == (name != "llama_untied")
    # num_items_in_batch (gradient accumulation) and shift_labels, as transformers has them
    n_items = (labels[:, 1:] != -100).sum() * 2
    s2 = stock(input_ids=ids, labels=labels, num_items_in_batch=n_items).loss
    f2 = fused(input_ids=ids, labels=labels, num_items_in_batch=n_items).loss
    torch.testing.assert_close(f2, s2, rtol=1e-6, atol=1e-6)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    f3 = fused(input_ids=ids, shift_labels=shifted, labels=labels).loss
    torch.testing.assert_close(f3, s.loss.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_without_labels_the_model_is_unchanged(name):
    torch.manual_seed(0)
    stock = MODELS[name]()
    fused = fuse_linear_cross_entropy(copy.deepcopy(stock))
    ids, _ = _batch(1)
    torch.testing.assert_close(fused(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=0, atol=0)
    out = fused(ids, labels=ids, return_dict=False)  # positional ids, tuple output
    assert out[1] is None and out[0].dim() == 0
    unfuse_linear_cross_entropy(fused)
    assert fused(input_ids=ids, labels=ids).logits is not None


def _train(model, steps=20, lr=5e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        ids, labels = _batch(step)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(MODELS))
def test_twenty_training_steps_match_the_stock_loss_curve(name):
    """fp32, AdamW, 20 steps, the stock model against the fused one and against
    the stock model with causal_lm_loss. Both compute the same loss and
    gradients up to fp32 rounding (the chunked GEMMs and the fused softmax sum
    in another order: ~1e-7 relative); AdamW's normalised updates carry such
    differences forward without amplifying them much over 20 steps, so the
    curves must agree to 1e-5 relative (measured: 2e-7, all three models)."""
    torch.manual_seed(0)
    stock = MODELS[name]()
    fused = fuse_linear_cross_entropy(copy.deepcopy(stock), chunk_size=32)
    loss_only = copy.deepcopy(stock)
    loss_only.loss_function = causal_lm_loss
    ref = _train(stock)
    for curve in (_train(fused), _train(loss_only)):
        assert curve[-1] < ref[0] - 0.5  # it learns
        worst = max(abs(a - r) / abs(r) for a, r in zip(curve, ref, strict=True))
        assert worst <= 1e-5, (curve, ref)


def test_bf16_training_matches_the_stock_loss_curve():
    """A bf16 Llama (bf16 weights and activations, fp32 loss), 20 AdamW steps.
    transformers upcasts the bf16 logits to fp32; fusedloss computes from the
    same bf16 logits in fp32 registers: the losses differ by fp32 rounding, and
    a gradient element rounded to the other bf16 neighbour moves one parameter
    by one bf16 ulp. Such flips are rare and their effect on the loss is far
    below the tolerance, 1e-3 relative (measured: 2e-7)."""
    torch.manual_seed(0)
    stock = llama(True).to(torch.bfloat16)
    fused = fuse_linear_cross_entropy(copy.deepcopy(stock), chunk_size=32)
    ref, curve = _train(stock), _train(fused)
    assert curve[-1] < ref[0] - 0.5
    assert max(abs(a - r) / abs(r) for a, r in zip(curve, ref, strict=True)) <= 1e-3, (curve, ref)


def test_models_that_transform_logits_are_refused():
    cfg = transformers.Gemma2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=30.0,
    )
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        fuse_linear_cross_entropy(transformers.Gemma2ForCausalLM(cfg))


PEAK_SCRIPT = textwrap.dedent(
    """
    import sys, torch, transformers
    from fusedloss.benchmark import reset_peak_rss, rss_mb
    from fusedloss.integrations.transformers import fuse_linear_cross_entropy
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = transformers.LlamaForCausalLM(cfg)
    if sys.argv[1] == "fused":
        fuse_linear_cross_entropy(model)
    ids = torch.randint(0, 32000, (2, 512))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    reset_peak_rss()
    base = rss_mb()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    print(rss_mb("VmHWM") - base)
    """
)


def _step_peak_mb(kind):
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, kind],
        capture_output=True,
        text=True,
        cwd=OUTSIDE_SOURCE,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


def test_a_training_steps_peak_memory_drops():
    """One training step of a Llama with a 32000-token vocabulary over 1024
    tokens: the stock model holds the logits (131 MB fp32), transformers' fp32
    copy and their gradient; the fused model a 32 MiB chunk. (Measured on the
    development machine: 397 MB stock, 71 MB fused, peak RSS growth.)"""
    stock, fused = _step_peak_mb("stock"), _step_peak_mb("fused")
    logits_mb = 1024 * 32000 * 4 / 2**20
    assert fused < stock - logits_mb, (stock, fused)
