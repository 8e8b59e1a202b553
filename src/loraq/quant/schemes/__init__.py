"""The quantization-scheme registry: the one place a method (and its bits, group size and quantizer)
becomes a kind of frozen base, and the one place a layer is asked which kind it is.

    scheme_for(config)        LoraConfig -> the scheme its method trains on
    scheme_named("int4")      a scheme by name (merge --requantize)
    scheme_of(layer)          the scheme a layer is stored in (None: not a linear layer)
    scheme_from_checkpoint(quantization_config)

Adding a scheme: write quant/schemes/<name>.py with a `Scheme` subclass, add it to REGISTRY below (and, if a
training method should select it, to config.METHOD_QUANTIZERS). docs/architecture.md has a worked example.
"""

from __future__ import annotations

import os

from ...core.config import LoraConfig
from ...errors import LoraqError
from .base import CorruptTensor, RowShard, Scheme, chunk_bounds
from .full import FullPrecision
from .gguf import GgufBlocks, GgufCodes
from .gptq import IntGPTQ
from .intk import IntRTN
from .nf4 import NF4

# name -> a function of (bits, group_size) making the scheme. "gguf" is not a user's choice: it is what "rtn"
# INT4 g32 becomes when the model comes from a GGUF file (see scheme_for).
REGISTRY = {
    "none": lambda bits, group_size: FullPrecision(),
    "nf4": lambda bits, group_size: NF4("nf4"),
    "fp4": lambda bits, group_size: NF4("fp4"),
    "rtn": lambda bits, group_size: IntRTN(bits, group_size),
    "gptq": lambda bits, group_size: IntGPTQ(bits, group_size),
}
# The kinds of stored layer, asked in this order which one a layer is (subclasses share their parent's).
LAYER_KINDS: tuple[type[Scheme], ...] = (FullPrecision, NF4, IntRTN, GgufBlocks)

__all__ = [
    "REGISTRY",
    "CorruptTensor",
    "RowShard",
    "Scheme",
    "chunk_bounds",
    "scheme_for",
    "scheme_from_checkpoint",
    "scheme_named",
    "scheme_of",
]


def scheme_for(config: LoraConfig, gguf_source: str | os.PathLike | None = None) -> Scheme:
    """The frozen base `config.method` trains on. With `gguf_source` (the model was loaded from that GGUF),
    QA-LoRA INT4 g32 round-to-nearest takes the file's own Q4_1 codes instead of rounding again."""
    quantizer = config.resolved_quantizer
    if gguf_source is not None and quantizer == "rtn" and (config.bits, config.group_size) == (4, 32):
        return GgufCodes(gguf_source)
    return REGISTRY[quantizer](config.bits, config.group_size)


def scheme_named(name: str, group_size: int = 32) -> Scheme:
    """A scheme by name: "none", "nf4", "fp4", or "int2" / "int3" / "int4" / "int8" (RTN, `group_size`)."""
    if name.startswith("int") and name[3:].isdigit():
        scheme = IntRTN(int(name[3:]), group_size)
        scheme.check("", (1, group_size))
        return scheme
    if name in ("none", "nf4", "fp4"):
        return REGISTRY[name](4, group_size)
    raise LoraqError(f"unknown quantization scheme {name!r} (none, nf4, fp4, int2, int3, int4, int8)")


def scheme_of(layer) -> Scheme | None:
    """The scheme a (base) layer is stored in; None for a module that is not a linear layer."""
    for kind in LAYER_KINDS:
        scheme = kind.of_layer(layer)
        if scheme is not None:
            return scheme
    return None


def scheme_from_checkpoint(quantization_config: dict) -> Scheme | None:
    """The scheme a checkpoint's config.json `quantization_config` names (None: not a checkpoint loraq reads)."""
    for kind in LAYER_KINDS:
        scheme = kind.from_checkpoint_config(quantization_config)
        if scheme is not None:
            return scheme
    return None
