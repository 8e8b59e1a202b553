"""`loraq plan`: estimate the memory a fine-tune needs before anything is loaded — from the model's
config.json only — split into weights, adapter (+ its gradients and AdamW state), activations and runtime.

Activations are counted per token and layer as the tensors autograd keeps for a Llama-style block (norm
inputs, q/k/v, attention output, the MLP's gate/up/product, and each adapted layer's input), in the compute
dtype, plus the logits and their gradient at the positions that carry a loss. With gradient checkpointing only
each block's input is kept, plus one block recomputed at a time. The constants are calibrated on the default
model (docs/usage.md gives how far the estimate is from measured peaks).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import METHODS, LoraConfig
from ..errors import LoraqError
from ..quant.schemes import scheme_for

RUNTIME_BYTES = 420 * 2**20  # Python, torch and transformers loaded, before any tensor of the model
ALLOCATOR_SLACK = 1.10  # freed-but-not-returned memory of the C allocator
BLOCK_FLOATS_PER_HIDDEN = 14  # saved activations per token per block, in units of the hidden size ...
BLOCK_FLOATS_PER_FFN = 5  # ... and of the MLP size


@dataclass
class MemoryPlan:
    weights: int
    adapter: int  # adapter parameters, their gradients and AdamW's two moments
    activations: int
    runtime: int
    trainable_params: int

    @property
    def peak(self) -> int:
        return int((self.weights + self.adapter + self.activations) * ALLOCATOR_SLACK) + self.runtime

    def __str__(self) -> str:
        mb = 2**20
        return (
            f"weights {self.weights / mb:,.0f} MB + adapter and optimizer {self.adapter / mb:,.0f} MB "
            f"({self.trainable_params:,} trainable) + activations {self.activations / mb:,.0f} MB + runtime "
            f"{self.runtime / mb:,.0f} MB -> estimated peak {self.peak / mb:,.0f} MB"
        )


def plan_memory(
    model: str = "smollm2-135m",
    method: str = "lora",
    batch_size: int = 4,
    seq_len: int = 256,
    rank: int = 16,
    bits: int = 4,
    group_size: int = 32,
    grad_checkpoint: bool = False,
    loss_fraction: float = 1.0,
    compute_bytes: int = 4,
    train_constants: str = "none",
) -> MemoryPlan:
    """Estimate peak memory of training `model` with every linear layer adapted.

    Args:
        train_constants: QA-LoRA's trained group constants ("scale", "offset", "both"): out × in/group each.
        loss_fraction: the share of positions that carry a loss (loraq computes logits only there; 1.0 for
            pre-training-style loss on every token).
        compute_bytes: 4 for fp32 compute, 2 for bf16.
    """
    config = _config(model)
    h, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) * (getattr(config, "head_dim", None) or h // heads)
    vocab = config.vocab_size
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]  # (in, out) of the 7 projections
    embedding = vocab * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    if method not in METHODS:
        raise LoraqError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    try:
        lora = LoraConfig(r=rank, method=method, bits=bits, group_size=group_size, train_constants=train_constants)
    except LoraqError as e:
        raise LoraqError(str(e).removeprefix("invalid LoRA config: ")) from None
    scheme = scheme_for(lora)
    weights = layers * int(sum(i * o * scheme.bits_per_param(i) / 8 for i, o in shapes)) + 4 * embedding
    constants = {"none": 0, "scale": 1, "offset": 1, "both": 2}[train_constants]
    trainable = layers * sum(rank * (i // lora.pool + o) + constants * o * (i // lora.pool) for i, o in shapes)
    tokens = batch_size * seq_len
    per_block = tokens * (BLOCK_FLOATS_PER_HIDDEN * h + BLOCK_FLOATS_PER_FFN * f) * compute_bytes
    # with checkpointing: each block's input, plus one block's activations while it is recomputed
    activations = layers * tokens * h * compute_bytes + per_block if grad_checkpoint else layers * per_block
    activations += int(3 * tokens * loss_fraction * vocab * 4)  # logits, log-softmax, their gradient (fp32)
    return MemoryPlan(weights, 16 * trainable, activations, RUNTIME_BYTES, trainable)


def _config(model: str):
    from pathlib import Path

    from transformers import AutoConfig

    from .models import default_model_dir, is_default_model

    path = Path(model).expanduser()
    try:
        if is_default_model(model):
            return AutoConfig.from_pretrained(default_model_dir(), local_files_only=True)
        if path.is_file() and path.suffix == ".gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return AutoConfig.from_pretrained(model, local_files_only=path.is_dir())
    except Exception as e:
        raise LoraqError(f"plan: cannot read the config of {model!r} ({type(e).__name__}: {e})") from None
