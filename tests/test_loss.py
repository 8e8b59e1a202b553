"""The chunked head-and-loss (product/loss.py) against the plain loss on the full logits: the same value (1e-6
relative) and the same gradients (1e-5 of the largest entry), for every method, response-only labels,
packing, tied and untied heads, and no (tokens x vocab) tensor larger than a chunk."""

import pytest
import torch
import torch.nn.functional as F
from conftest import E2E_TINY, build_tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import loraq
from loraq.product.data import collate, encode_all, load_examples, pack
from loraq.product.device import cpu_supports_bf16
from loraq.product.loss import chunked_head_loss
from loraq.product.train import _plain_head, loss_sum


@pytest.mark.parametrize("n, chunk", [(37, 8), (16, 16), (5, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_chunks_compute_the_cross_entropy_of_the_whole(n, chunk, bias):
    torch.manual_seed(0)
    hidden = torch.randn(n, 24, requires_grad=True)
    weight, b = torch.randn(100, 24) * 0.3, (torch.randn(100) if bias else None)
    targets = torch.randint(0, 100, (n,))
    ours = chunked_head_loss(hidden, weight, b, targets, chunk)
    (grad,) = torch.autograd.grad(ours * 0.7, hidden)
    plain = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum")
    (expected,) = torch.autograd.grad(plain * 0.7, hidden)
    assert abs(float(ours) - float(plain)) <= 1e-6 * abs(float(plain))
    assert float((grad - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def batch_of(tok, packed: bool, train_on_prompt: bool = False):
    items, _ = encode_all(tok, load_examples(E2E_TINY)[:8], 128, train_on_prompt=train_on_prompt)
    if packed:
        items = pack(items, 128, seed=0)[:3]
    return collate(items, tok.pad_token_id)


def adapter_grads(model, batch, chunked: bool):
    model.zero_grad(set_to_none=True)
    loss, n = loss_sum(model, batch, chunked=chunked)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return float(loss), n, grads


@pytest.mark.parametrize("method", ["lora", "qlora", "qalora"])
@pytest.mark.parametrize("packed", [False, True])
def test_the_training_loss_and_its_gradients_are_the_plain_ones(tiny, method, packed):
    model, tok = tiny
    loraq.apply(model, loraq.LoraConfig(r=4, method=method))
    for p in model.parameters():  # B away from 0, so that every adapter gradient is non-trivial
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    batch = batch_of(tok, packed)
    assert _plain_head(model) is not None
    chunked = adapter_grads(model, batch, True)
    plain = adapter_grads(model, batch, False)
    assert chunked[1] == plain[1] > 0
    assert abs(chunked[0] - plain[0]) <= 1e-6 * abs(plain[0])
    for name, g in plain[2].items():
        assert float((chunked[2][name] - g).abs().max()) <= 1e-5 * float(g.abs().max()), name


def test_an_untied_head_and_the_loss_on_the_prompt_too(tiny):
    _, tok = tiny
    model = build_tiny_model(len(tok), tie_word_embeddings=False)
    loraq.apply(model, loraq.LoraConfig(r=4))
    batch = batch_of(tok, False, train_on_prompt=True)
    for chunked in (True, False):
        assert loss_sum(model, batch, chunked=chunked)[1] > 0
    a, b = adapter_grads(model, batch, True), adapter_grads(model, batch, False)
    assert abs(a[0] - b[0]) <= 1e-6 * abs(b[0])


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")
def test_bf16_autocast_keeps_the_logsumexp_in_fp32(tiny):
    model, tok = tiny
    loraq.apply(model, loraq.LoraConfig(r=4))
    batch = batch_of(tok, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, n = loss_sum(model, batch, chunked=True)
        plain, _ = loss_sum(model, batch, chunked=False)
    assert chunked.dtype == torch.float32
    assert abs(float(chunked) - float(plain)) <= 1e-2 * abs(float(plain))  # bf16 products, rounded apart


class _LargestLogits(TorchDispatchMode):
    """The most rows of any tensor made (not a view of an input, as the head's transposed weight is) whose last
    dimension is the vocabulary."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)]
        shared = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor) or not t.dim() or t.shape[-1] != self.vocab:
                continue
            if t.untyped_storage().data_ptr() not in shared:  # made here, not a view of an input
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def test_no_logits_larger_than_a_chunk_exist(tiny, monkeypatch):
    from loraq.product import loss

    model, tok = tiny
    loraq.apply(model, loraq.LoraConfig(r=4))
    batch = batch_of(tok, False, train_on_prompt=True)
    monkeypatch.setattr(loss.chunked_head_loss, "__defaults__", (16,))
    tracker = _LargestLogits(len(tok))
    with tracker:
        total, n = loss_sum(model, batch)
        total.backward()
    assert n > 100 and 0 < tracker.rows <= 16
    with _LargestLogits(len(tok)) as plain:
        loss_sum(model, batch, chunked=False)[0].backward()
    assert plain.rows >= n  # the plain loss holds them all
