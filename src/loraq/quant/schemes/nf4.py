"""NF4 / FP4 with double-quantized block constants: QLoRA's base. Checkpoints use the layout transformers +
bitsandbytes write for a `load_in_4bit` model, so either side reads the other's folder: `<layer>.weight`
holds the packed codes (uint8, (n/2, 1)) beside `.weight.absmax`, `.weight.quant_map`, with double
quantization `.weight.nested_absmax` and `.weight.nested_quant_map`, and `.weight.quant_state.bitsandbytes__nf4`
(a JSON dict stored as uint8 bytes)."""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from ..frozen import NF4Linear
from ..nf4 import (
    BLOCKSIZES,
    NESTED_BLOCKSIZE,
    NF4State,
    code_4bit,
    dequantize_4bit,
    double_quantize,
    dynamic_code_8bit,
    quantize_4bit,
)
from .base import CorruptTensor, RowShard, Scheme, TakeTensor

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class NF4(Scheme):
    layer_type = NF4Linear
    exact_exports = ("checkpoint",)

    def __init__(self, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True):
        self.name = self.quant_type = quant_type
        self.blocksize, self.double_quant = blocksize, double_quant

    @classmethod
    def of_layer(cls, layer: nn.Module) -> Scheme | None:
        if not isinstance(layer, NF4Linear):
            return None
        return cls(layer.quant_type, layer.blocksize, layer.offset is not None)

    def describe(self) -> str:
        return f"{self.quant_type.upper()}{'+DQ' if self.double_quant else ''} blocksize {self.blocksize}"

    def bits_per_param(self, in_features: int) -> float:
        if self.double_quant:  # an 8-bit code per block, an fp32 scale per 256 blocks
            return 4 + 8 / self.blocksize + 32 / (self.blocksize * NESTED_BLOCKSIZE)
        return 4 + 32 / self.blocksize

    def quantize_layer(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None, statistic=None) -> nn.Module:
        packed, state = quantize_4bit(weight, self.blocksize, self.quant_type, self.double_quant)
        return NF4Linear(packed, state, bias)

    def quantize_rows(
        self, name: str, weight: torch.Tensor, shard: RowShard, like: nn.Module
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """Rows alone where a row holds whole blocks; the double quantization is of every block's absmax at
        once (their mean, blocks of 256 across rows), so those are gathered from every process (1/64 of the
        weight in fp32) and quantized alike everywhere: the result is one process's, bit for bit. The error is
        that of the rows before double quantization."""
        if like.packed.dim() != 2 or like.absmax.dim() != 2:  # (NF4Linear lays out rows first where it can)
            return None
        rows, in_features = weight.shape
        packed, state = quantize_4bit(weight, self.blocksize, self.quant_type, double_quant=False)
        absmax = state.absmax.view(rows, in_features // self.blocksize)
        approx = dequantize_4bit(packed, state, torch.float32) if rows else weight
        tensors = {"packed": packed.reshape(rows, in_features // 2), "absmax": absmax}
        if self.double_quant:
            codes, nested, offset = double_quantize(shard.gather(absmax).reshape(-1))
            tensors["absmax"] = codes.view(shard.out_features, -1)[shard.start : shard.stop]
            tensors["offset"] = shard.chunk(offset.reshape(1))
            tensors["nested_absmax"] = shard.chunk(nested)
        return tensors, approx

    def checkpoint_config(self) -> dict:
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": ["lm_head"],
        }

    @classmethod
    def from_checkpoint_config(cls, config: dict) -> Scheme | None:
        if config.get("quant_method") != "bitsandbytes" or not config.get("load_in_4bit"):
            return None
        return cls(config.get("bnb_4bit_quant_type", "nf4"), 64, bool(config.get("bnb_4bit_use_double_quant")))

    def checkpoint_tensors(self, layer: NF4Linear) -> dict[str, torch.Tensor]:
        meta = {
            "quant_type": layer.quant_type,
            "blocksize": layer.blocksize,
            "dtype": str(layer.weight_dtype).removeprefix("torch."),
            "shape": [layer.out_features, layer.in_features],
        }
        # bitsandbytes' layout: packed codes (n/2, 1), the constants flat
        out = {
            "weight": layer.packed.reshape(-1, 1),
            "weight.absmax": layer.absmax.reshape(-1),
            "weight.quant_map": code_4bit(layer.quant_type),
        }
        if layer.offset is not None:
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=float(layer.offset))
            out["weight.nested_absmax"] = layer.nested_absmax
            out["weight.nested_quant_map"] = dynamic_code_8bit().clone()
        out[f"weight.quant_state.bitsandbytes__{layer.quant_type}"] = torch.tensor(
            list(json.dumps(meta).encode()), dtype=torch.uint8
        )
        return out

    def layer_from_checkpoint(
        self, take: TakeTensor, keys: list[str], shape: tuple[int, int], bias: torch.Tensor | None
    ) -> nn.Module:
        meta_keys = [k for k in keys if k.startswith("weight.quant_state.bitsandbytes__")]
        if len(meta_keys) != 1:
            take("weight.quant_state.bitsandbytes__nf4", torch.uint8, -1)  # raises: missing
        meta_key = meta_keys[0]
        raw = take(meta_key, torch.uint8, -1)
        try:
            meta = json.loads(bytes(raw.tolist()).decode("utf-8"))
            quant_type, blocksize = meta["quant_type"], int(meta["blocksize"])
            dtype = _DTYPES[meta.get("dtype", "float32")]
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptTensor(meta_key, f"is not a valid quantization state ({e})") from None
        if quant_type not in ("nf4", "fp4") or blocksize not in BLOCKSIZES:
            raise CorruptTensor(
                meta_key, f"names quant_type {quant_type!r} / blocksize {blocksize}, which loraq cannot read"
            )
        if meta.get("shape") is not None and tuple(meta["shape"]) != shape:
            raise CorruptTensor(meta_key, f"says shape {tuple(meta['shape'])}, but the layer is {shape}")
        n = math.prod(shape)
        blocks = -(-n // blocksize)
        packed = take("weight", torch.uint8, (n + 1) // 2).reshape(-1, 1)
        if "weight.nested_absmax" in keys:
            absmax = take("weight.absmax", torch.uint8, blocks)
            nested = take("weight.nested_absmax", torch.float32, -(-blocks // NESTED_BLOCKSIZE))
            try:
                offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
            except (KeyError, TypeError, ValueError):
                raise CorruptTensor(meta_key, "lacks nested_offset") from None
            state = NF4State(shape, dtype, blocksize, quant_type, absmax, offset, nested)
        else:
            state = NF4State(shape, dtype, blocksize, quant_type, take("weight.absmax", torch.float32, blocks))
        for key, t in (("weight.nested_absmax", state.nested_absmax), ("weight.absmax", state.block_absmax())):
            if t is not None and not torch.isfinite(t).all():
                raise CorruptTensor(key, "holds NaN or infinite scales")
        return NF4Linear(packed, state, bias)
