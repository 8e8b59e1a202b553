"""Greedy generation from a prompt, formatted with the model's chat template."""

from __future__ import annotations

import torch
from torch import nn

from .data import format_prompt


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = True) -> str:
    """Return the model's greedy continuation of `prompt` (as a chat user turn unless chat=False)."""
    text = format_prompt(tokenizer, prompt) if chat else prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)
    was_training = model.training
    model.eval()
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.train(was_training)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
