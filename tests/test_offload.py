"""Offloading saved activations (offload.py), tested as a mechanism on the CPU: the hooks see exactly what
checkpointing keeps (each block's input), never a parameter, and backward gets the same values back."""

import torch

import loraq
from loraq.product.offload import offload_saved
from loraq.product.train import _grad_checkpointing, loss_sum
from loraq.product.train_config import TrainConfig


def _step(model, batch, **offload):
    model.zero_grad(set_to_none=True)
    if offload:
        with offload_saved(model, **offload) as stats:
            total, _ = loss_sum(model, batch)
    else:
        total, stats = loss_sum(model, batch)[0], None
    total.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return float(total.detach()), grads, stats


def test_offloaded_block_inputs_give_the_same_gradients(tiny, tokens, tmp_path):
    model, _ = tiny
    loraq.apply(model, loraq.LoraConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05, generator=g)
    config = TrainConfig(model="x", data="x", grad_checkpoint=True, out=str(tmp_path / "run"))
    _grad_checkpointing(model, config)
    model.train()
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}
    loss, grads, _ = _step(model, batch)
    loss_off, grads_off, stats = _step(model, batch, host="cpu", min_bytes=0)
    assert loss_off == loss and all(torch.equal(a, b) for a, b in zip(grads, grads_off, strict=True))
    hidden = (*tokens.shape, model.config.hidden_size)
    # every decoder block's input went to the host (the blocks' insides are recomputed, not saved)
    assert stats.shapes.count(hidden) >= model.config.num_hidden_layers
    params = {tuple(p.shape) for p in model.parameters() if p.dim() > 1}
    assert not params & set(stats.shapes), "a parameter (the head) was copied"
    _, _, none = _step(model, batch, host="cpu", min_bytes=2**40)
    assert none.shapes == [] and none.bytes == 0


def test_offload_options_are_checked():
    import pytest

    from loraq import LoraqError

    with pytest.raises(LoraqError, match="--offload-activations .* add --grad-checkpoint"):
        TrainConfig(offload_activations=True)
    with pytest.raises(LoraqError, match="--offload-activations .* a CPU run"):
        TrainConfig(offload_activations=True, grad_checkpoint=True, device="cpu")
