"""What a quantization scheme is: one object per kind of frozen base, answering every question the rest of
loraq has about that kind (how to make a layer, what it costs, how it is saved, what holds it exactly, what
merges into it exactly). A new scheme subclasses `Scheme` in one file and gets one entry in the registry
(schemes/__init__.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ...core.layers import layer_shape, linear_weight, quantizable_linear_names, replace_module
from ...errors import LoraqError
from ..intk import relative_error

# take(suffix, dtype, numel) -> the flat tensor `<layer>.<suffix>` of a checkpoint, its dtype and element count
# checked (numel -1: any); raises CorruptTensor. See formats/checkpoint.py.
TakeTensor = Callable[[str, torch.dtype, int], torch.Tensor]


class CorruptTensor(LoraqError):
    """A bad checkpoint tensor of one layer; the checkpoint reader names the file and the full key."""

    def __init__(self, suffix: str, why: str):
        super().__init__(f"tensor {suffix} {why}")
        self.suffix, self.why = suffix, why


def chunk_bounds(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows [start, stop) of `rows` that FSDP2 gives process `rank` of `world` (torch.chunk's cut of dim 0:
    ceil(rows / world) each, the last ones shorter or empty)."""
    size = -(-rows // world)
    return min(rank * size, rows), min((rank + 1) * size, rows)


@dataclass
class RowShard:
    """The output rows of a layer that one process quantizes when it loads straight into FSDP2 shards
    (product/sharded_load.py): rows [start, stop) of `out_features`, cut as FSDP2 cuts dim 0 (torch.chunk)."""

    start: int
    stop: int
    out_features: int
    rank: int
    world: int
    # every process's rows of a rows-first tensor, concatenated in rank order: a collective (all ranks call it)
    gather: Callable[[torch.Tensor], torch.Tensor]

    def chunk(self, whole: torch.Tensor) -> torch.Tensor:
        """This process's part of a tensor every process computed whole, as FSDP2 shards it."""
        start, stop = chunk_bounds(whole.shape[0], self.rank, self.world)
        return whole[start:stop]


def rows_first(layer: nn.Module) -> bool:
    """Whether every quantized tensor of `layer` holds one row per output row (so rows quantize alone)."""
    tensors = layer.quantized_tensors().values()
    return all(t.dim() == 2 and t.shape[0] == layer.out_features for t in tensors)


class Scheme:
    """A kind of frozen base. Subclasses set `name` and `layer_type` and override what differs."""

    name: str = ""
    layer_type: type[nn.Module] = nn.Module
    needs_calibration: bool = False
    quantized: bool = True  # False only for the full-precision base
    # Export formats that store this base without loss (see product/export.py): "hf", "gguf", "checkpoint".
    exact_exports: tuple[str, ...] = ()
    # The QA-LoRA pooling window whose adapters merge into this base exactly, in its format (None: none do).
    pool_window: int | None = None
    # Whether its group constants can train (QA-LoRA's train_constants): a scale and offset per pool_window.
    trainable_constants: bool = False
    # Whether an in-format merge is exact (False: to the nearest value the format holds)
    exact_merge: bool = True

    # --- what it is --------------------------------------------------------------------------------------
    @classmethod
    def of_layer(cls, layer: nn.Module) -> Scheme | None:
        """The scheme `layer` is stored in, if it is one of this class's layers."""
        return cls() if isinstance(layer, cls.layer_type) else None

    def describe(self) -> str:
        return self.name

    def bits_per_param(self, in_features: int) -> float:
        """Storage per weight, constants included (the memory planner reads it)."""
        raise NotImplementedError

    @property
    def storage(self) -> str:
        """The layer format this scheme makes: schemes that quantize differently into the same format (RTN,
        GPTQ and a GGUF's own codes all make INT-k layers) share it."""
        return self.describe()

    # --- making layers -----------------------------------------------------------------------------------
    def check(self, name: str, shape: tuple[int, int]) -> None:
        """Raise a LoraqError naming the option if a layer of `shape` cannot take this scheme."""

    def quantize_layer(
        self, name: str, weight: torch.Tensor, bias: torch.Tensor | None, statistic: torch.Tensor | None = None
    ) -> nn.Module:
        """The frozen layer for `weight` (out, in), made on the weight's device (CPU or CUDA); `statistic` is
        the layer's entry of `calibrate` for a scheme that calibrates."""
        raise NotImplementedError

    def quantize_rows(
        self, name: str, weight: torch.Tensor, shard: RowShard, like: nn.Module
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """For a load into shards: this process's part of each of the layer's quantized tensors (by the names of
        `quantized_tensors()`), made from `weight`, the full-precision rows `shard.start:shard.stop`, and those
        rows as quantized (fp32, for the error). `like` is the layer as built on the meta device (its layout).
        None where the layout does not keep rows apart (then the loader quantizes the whole layer on every
        process). A rows-first format quantizes its rows alone (this default); a scheme with constants over the
        whole weight (NF4's double quantization) overrides it. Every process calls it for every layer."""
        if self.needs_calibration or not rows_first(like):
            return None
        if weight.shape[0] == 0:
            return {}, weight
        layer = self.quantize_layer(name, weight, None)
        return layer.quantized_tensors(), layer.dequantize()

    def calibrate(self, model: nn.Module, names: list[str], calibration: Iterable[dict] | None) -> dict:
        """Per-layer statistics the scheme quantizes with (GPTQ: each layer's Σxᵀx); {} for one that needs none."""
        return {}

    def quantize_model(self, model: nn.Module, calibration: Iterable[dict] | None = None) -> dict[str, float]:
        """Replace every linear layer but the output head by this scheme's frozen layer, one layer at a time
        (each full-precision weight is released as its layer is replaced); freeze all parameters.

        Every layer is checked before any is replaced. Returns ||W - Ŵ||/||W|| of each layer, by name.
        """
        names = quantizable_linear_names(model)
        if not names:
            raise LoraqError("quantize: the model has no linear layers besides the output head")
        for name in names:
            self.check(name, layer_shape(model.get_submodule(name)))
        statistics = self.calibrate(model, names, calibration)
        errors: dict[str, float] = {}
        for name in names:
            layer = model.get_submodule(name)
            weight = linear_weight(layer).detach()
            bias = None if layer.bias is None else layer.bias.detach()
            new = self.quantize_layer(name, weight, bias, statistics.pop(name, None))
            errors[name] = relative_error(weight, new.dequantize())
            replace_module(model, name, new)
        for p in model.parameters():
            p.requires_grad_(False)
        return errors

    # --- merging adapters --------------------------------------------------------------------------------
    def merges_in_format(self, pool: int) -> bool:
        """Whether an adapter pooling `pool` input columns merges into this base in its own format: exactly
        (up to the rounding of stored constants) where `exact_merge`, else to the nearest the format holds
        (merge_run measures the error)."""
        return False

    def merge(self, layer: nn.Module, adapter: nn.Module, sign: float = 1.0) -> None:
        """Add (sign=-1: subtract) `adapter`'s update into `layer` in place; only where `merges_in_format`."""
        raise LoraqError(f"an adapter cannot be merged exactly into a {self.describe()} base; use loraq.merge(model)")

    def merge_rounds(self, adapter: nn.Module) -> bool:
        """Whether merging `adapter` in format rounds its update (so training should compute with
        `written_weight`): False where the merge is exact or absent."""
        return False

    def written_weight(self, layer: nn.Module, adapter: nn.Module) -> torch.Tensor | None:
        """Where `merge_rounds`: the weight, (out, in) fp32, that merging `adapter` would write, so that
        training can compute with it (core/lora.py). None elsewhere."""
        return None

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """The layer's weight, (out, in), fp32."""
        return layer.dequantize(torch.float32)

    # --- checkpoints -------------------------------------------------------------------------------------
    def checkpoint_config(self) -> dict:
        """config.json's `quantization_config` for a checkpoint of this scheme."""
        raise LoraqError(f"a {self.describe()} base has no 4-bit checkpoint format")

    @classmethod
    def from_checkpoint_config(cls, config: dict) -> Scheme | None:
        """The scheme a checkpoint's `quantization_config` names, if it is this class's."""
        return None

    def checkpoint_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """The layer's tensors by key suffix (`weight`, `weight.absmax`, ...), as written to the checkpoint."""
        raise NotImplementedError

    def layer_from_checkpoint(
        self, take: TakeTensor, keys: list[str], shape: tuple[int, int], bias: torch.Tensor | None
    ) -> nn.Module:
        """Build a layer of `shape` from its checkpoint tensors: `keys` are the suffixes present, `take`
        returns one checked tensor (and raises naming it if missing or wrong)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<scheme {self.describe()}>"
