"""`loraq plan`: estimate the memory a fine-tune needs before anything is loaded — from the model's
config.json only — split into weights, adapter (+ its gradients and AdamW state), activations and runtime.

Activations are counted per token and layer as the bytes autograd keeps for a Llama-style block (measured:
SAVED_PER_TOKEN), plus the chunked loss's one chunk of logits and the labelled positions' hidden states. With
gradient checkpointing only each block's input is kept, plus one block recomputed at a time. The constants are
measured on the default model (docs/usage.md gives how far the estimate is from measured peaks).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import METHODS, LoraConfig
from ..core.layers import VOCAB_CHUNK
from ..errors import LoraqError
from ..quant.schemes import scheme_for
from .loss import CHUNK_TOKENS

RUNTIME_BYTES = 420 * 2**20  # Python, torch and transformers loaded, before any tensor of the model
CUDA_CONTEXT_BYTES = 500 * 2**20  # a CUDA context and cuBLAS workspaces, on the GPU
ALLOCATOR_SLACK = 1.10  # freed-but-not-returned memory of the C allocator
# Bytes a decoder block keeps for backward per token, as (hidden, key/value width, MLP width, adapter rank)
# multipliers, measured on a Llama block with adapters on all 7 projections (DESIGN.md §11: 4,732 MiB predicted
# vs 4,738 measured on the default model at 8x512): fp32 compute on a CPU, 16-bit autocast on a GPU.
SAVED_PER_TOKEN = {4: (24, 8, 16, 28), 2: (24, 4, 8, 14)}
# The chunked loss (loss.py) holds one chunk's fp32 logits and what its softmax and logsumexp need beside them:
# 1.3 chunks, from bench/memory.py (681 MiB step peak with checkpointing = block inputs + one block + the loss)
LOSS_CHUNKS_HELD = 1.3
GATHERED_BLOCKS = 2  # FSDP2 gathers the next block while the current one computes

# Shapes of models people plan for before downloading them (plan reads these offline; any other model needs its
# config.json: a folder, a .gguf file, or a hub id with network).
KNOWN_SHAPES = {
    "meta-llama/Llama-2-7b-hf": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "meta-llama/Llama-2-13b-hf": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "meta-llama/Llama-2-70b-hf": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                      num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "meta-llama/Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "meta-llama/Llama-3.1-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                     num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
    "meta-llama/Llama-3.1-405B": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                                      num_attention_heads=128, num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip


@dataclass
class MemoryPlan:
    """Estimated bytes per process. On one process everything is on the device; on N processes (FSDP2) the base
    and the adapter state are 1/N each, plus the blocks gathered while they compute; with `cpu_offload` the
    shards live in host memory and the device holds only what is gathered and computed."""

    weights: int  # the frozen base this process holds (its shard)
    adapter: int  # adapter parameters, their gradients and AdamW's two moments (its shard)
    activations: int  # saved for backward, for this process's rows of the batch
    runtime: int
    trainable_params: int
    gathered: int = 0  # blocks all-gathered while they compute (N > 1)
    workspace: int = 0  # the largest layer dequantized (4-bit bases)
    world_size: int = 1
    cpu_offload: bool = False
    load_host: int = 0  # host memory of one process while it loads the model
    device: str = "cpu"

    @property
    def on_device(self) -> int:
        """The peak on the computing device (the GPU, or the CPU's memory on a CPU run)."""
        held = 0 if self.cpu_offload else self.weights + self.adapter
        return int((held + self.gathered + self.activations + self.workspace) * ALLOCATOR_SLACK) + self.runtime

    @property
    def peak(self) -> int:
        return self.on_device

    @property
    def host(self) -> int:
        """Host memory of one process while it trains (the shards, with CPU offload)."""
        if self.device == "cpu":
            return self.on_device
        return RUNTIME_BYTES + (self.weights + self.adapter if self.cpu_offload else 0)

    def fits(self, device_bytes: int) -> bool:
        return self.on_device <= device_bytes

    def __str__(self) -> str:
        mb = 2**20
        where = f"per process of {self.world_size}" if self.world_size > 1 else "one process"
        lines = [
            f"{where}: weights {self.weights / mb:,.0f} MB + adapter and optimizer {self.adapter / mb:,.0f} MB "
            f"({self.trainable_params:,} trainable in all)"
            + (" [in host memory: --cpu-offload]" if self.cpu_offload else ""),
            f"  + gathered blocks {self.gathered / mb:,.0f} MB + activations {self.activations / mb:,.0f} MB "
            f"+ workspace {self.workspace / mb:,.0f} MB + runtime {self.runtime / mb:,.0f} MB",
            f"  -> estimated peak {self.on_device / mb:,.0f} MB on {self.device}"
            + (f"; host {self.host / mb:,.0f} MB" if self.device != "cpu" else " (resident: own + mapped base)"),
            f"  loading: host memory {self.load_host / mb:,.0f} MB per process",
        ]
        if self.device == "cpu":  # DESIGN.md §11, bench/big_model.py: 6,229 vs 10,623 MiB on a 7B QLoRA step
            lines.append(
                "  (on glibc with `loraq train --mmap-threshold-mb 4`; its default keeps freed memory: up to 1.7x this)"
            )
        return "\n".join(lines)


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
    world_size: int = 1,
    cpu_offload: bool = False,
    device: str = "cpu",
) -> MemoryPlan:
    """Estimate peak memory of training `model` with every linear layer adapted, per process.

    Args:
        train_constants: QA-LoRA's trained group constants ("scale", "offset", "both"): out × in/group each.
        loss_fraction: the share of positions that carry a loss (loraq computes logits only there; 1.0 for
            pre-training-style loss on every token).
        compute_bytes: 4 for fp32 compute, 2 for bf16 (on CUDA the frozen full-precision weights are 16-bit too).
        world_size: processes under torchrun: the base and adapter state are sharded (FSDP2), each process takes
            batch_size / world_size rows.
        cpu_offload: the shards in host memory (FSDP2 CPUOffloadPolicy), the device holding only what computes.
        device: "cpu" or "cuda" (a CUDA context; the dequantization workspace of the Triton kernels).

    Raises:
        LoraqError: an unknown method, an impossible option (named), or a model whose config cannot be read.
    """
    problems = []
    if world_size < 1:
        problems.append(f"--world-size must be >= 1, got {world_size}")
    elif batch_size % world_size:
        problems.append(f"--batch-size {batch_size} does not split over {world_size} processes")
    if cpu_offload and world_size == 1:
        problems.append("--cpu-offload offloads the shards of several processes: give --world-size >= 2")
    if device not in ("cpu", "cuda"):
        problems.append(f"--device must be cpu or cuda, got {device!r}")
    if problems:
        raise LoraqError("; ".join(problems))
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
    frozen_bytes = 2 if device == "cuda" and compute_bytes == 2 else 4  # train casts the frozen base on a GPU
    block = int(sum(i * o * scheme.bits_per_param(i) / 8 for i, o in shapes))  # one decoder block's base
    if not scheme.quantized:
        block = block * frozen_bytes // 4
    # a quantized load keeps the embedding and head in the 16 bits their file stores them in (checkpoint.py)
    embedding_bytes = 2 if scheme.quantized and _stored_16bit(config) else frozen_bytes
    weights = layers * block + embedding_bytes * embedding
    constants = {"none": 0, "scale": 1, "offset": 1, "both": 2}[train_constants]
    block_trainable = sum(rank * (i // lora.pool + o) + constants * o * (i // lora.pool) for i, o in shapes)
    trainable = layers * block_trainable
    tokens = batch_size // world_size * seq_len
    a, b, c, d = SAVED_PER_TOKEN[2 if compute_bytes == 2 else 4]
    per_block = tokens * (a * h + b * kv + c * f + d * rank)
    # with checkpointing: each block's input, plus one block's activations while it is recomputed
    activations = layers * tokens * h * compute_bytes + per_block if grad_checkpoint else layers * per_block
    labelled = int(tokens * loss_fraction)  # the loss's rows: one chunk of fp32 logits at a time
    activations += int(LOSS_CHUNKS_HELD * min(labelled, CHUNK_TOKENS) * vocab * 4) + labelled * h * compute_bytes
    if embedding_bytes < compute_bytes:  # a 16-bit head under fp32 compute is cast a slice of rows at a time
        activations += VOCAB_CHUNK * h * compute_bytes
    largest = max(i * o for i, o in shapes)
    # a 4-bit layer dequantizes into a buffer in the compute dtype (the largest layer's); under checkpointing in
    # 16 bits each layer of a block into its own, kept for the backward (train._checkpointed_blocks). On a CPU an
    # fp32 output is decoded at once through a 4-byte index per two packed bytes; a 16-bit one piece by piece.
    outputs = largest + (sum(i * o for i, o in shapes) if grad_checkpoint and compute_bytes == 2 else 0)
    index = largest if device == "cpu" and compute_bytes == 4 else 0
    workspace = outputs * compute_bytes + index if scheme.quantized else 0
    gathered = 0
    if world_size > 1:  # blocks whole while they compute (weights, adapter and its gradient), the root's embedding
        gathered = GATHERED_BLOCKS * (block + 8 * block_trainable) + frozen_bytes * vocab * h
    # loading: one layer's rows in fp32 and their quantized copy pass through host memory, and the shard stays
    # there unless it goes to a GPU
    load_host = RUNTIME_BYTES + 2 * largest * 4 // world_size
    if device == "cpu" or cpu_offload:
        load_host += weights // world_size
    runtime = RUNTIME_BYTES if device == "cpu" else CUDA_CONTEXT_BYTES
    return MemoryPlan(
        weights // world_size, 16 * trainable // world_size, activations, runtime, trainable, gathered, workspace,
        world_size, cpu_offload, load_host, device,
    )  # fmt: skip


def offload_advice(plan_args: dict, device_bytes: int) -> str:
    """Whether the run fits in `device_bytes` per device, and if not, whether CPU offload (or more processes)
    makes it fit: the line `loraq plan --device-memory` prints."""
    gib = 2**30
    plan = plan_memory(**plan_args)
    if plan.fits(device_bytes):
        tight = "; tight (over 90%)" if plan.on_device > 0.9 * device_bytes else ""
        if tight and plan_args.get("world_size", 1) > 1 and not plan_args.get("cpu_offload"):
            tight += ": --cpu-offload leaves room"
        return f"fits in {device_bytes / gib:.0f} GiB per device ({plan.on_device / gib:.1f} GiB{tight})"
    text = f"does not fit in {device_bytes / gib:.0f} GiB per device ({plan.on_device / gib:.1f} GiB)"
    if plan_args.get("world_size", 1) > 1 and not plan_args.get("cpu_offload"):
        offloaded = plan_memory(**{**plan_args, "cpu_offload": True})
        if offloaded.fits(device_bytes):
            return (
                f"{text}; with --cpu-offload it fits ({offloaded.on_device / gib:.1f} GiB on each device, "
                f"{offloaded.host / gib:.1f} GiB of host memory per process)"
            )
        return (
            f"{text}, nor with --cpu-offload ({offloaded.on_device / gib:.1f} GiB): more processes or a smaller batch"
        )
    return f"{text}: more processes (torchrun), a smaller batch, or --grad-checkpoint"


def _stored_16bit(config) -> bool:
    """Whether the model's files store its weights in 16 bits (config.json's dtype, torch_dtype before it)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") in ("bfloat16", "float16")


def _config(model: str):
    from pathlib import Path

    from transformers import AutoConfig, LlamaConfig

    from .models import default_model_dir, is_default_model

    if model in KNOWN_SHAPES:
        return LlamaConfig(**KNOWN_SHAPES[model], tie_word_embeddings=False, dtype="bfloat16")
    path = Path(model).expanduser()
    try:
        if is_default_model(model):
            return AutoConfig.from_pretrained(default_model_dir(), local_files_only=True)
        if path.is_file() and path.suffix == ".gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return AutoConfig.from_pretrained(model, local_files_only=path.is_dir())
    except Exception as e:
        raise LoraqError(f"plan: cannot read the config of {model!r} ({type(e).__name__}: {e})") from None
