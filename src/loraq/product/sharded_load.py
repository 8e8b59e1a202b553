"""Loading straight into FSDP2 shards: under torchrun each process builds the model on the meta device, attaches
the adapter, shards it, and only then reads its own rows of each tensor from the safetensors files and quantizes
them (or, from a quantized folder, reads each layer and keeps its part). No process ever holds the whole model,
each weight is quantized once in all, and host memory at load is the process's shard plus one layer.

Rows are where FSDP2 puts them (dim 0, cut as torch.chunk). The quantized formats are laid out rows first
(quant/frozen.py), so a layer's rows quantize alone; where they cannot (NF4's double quantization spans every
block of the weight; a flat layout of an odd-sized layer) the scheme gathers what it needs or the whole layer
is quantized on every process (`Scheme.quantize_rows`). Either way the base is bit for bit one process's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..core.layers import is_conv1d, layer_shape, quantizable_linear_names, replace_module
from ..core.lora import LoraLinear
from ..errors import LoraqError
from ..formats.checkpoint import (
    LazyTensors,
    checkpoint_scheme,
    compute_unsaved_buffers,
    is_quantized_folder,
    read_tensors,
    skeleton,
    taker,
)
from ..quant.schemes import CorruptTensor, RowShard, Scheme, chunk_bounds
from .distributed import is_dtensor, local_tensor, shard_like, shard_model

COPY_BYTES = 16 * 2**20  # rows of an unquantized tensor read and copied at a time


def sharded_source(folder: Path | None, scheme: Scheme) -> bool:
    """Whether a model can load into shards: a safetensors folder, quantized (loraq's or bitsandbytes' 4-bit
    layout) or full precision with a scheme that needs no calibration on the whole model (GPTQ does)."""
    if folder is None or not folder.is_dir() or not any(folder.glob("*.safetensors")):
        return False
    return is_quantized_folder(folder) or not scheme.needs_calibration


def load_sharded(
    folder: Path,
    scheme: Scheme,
    device: torch.device,
    prepare: Callable[[nn.Module], None],
    cpu_offload: bool = False,
) -> tuple[nn.Module, dict[str, float]]:
    """The model of `folder` with its base in `scheme`'s format, sharded over the processes.

    `prepare(model)` runs on the meta-device model before it is sharded (attach the adapter, turn on gradient
    checkpointing, cast the frozen base): the adapter's initial values are made on the CPU there, from the same
    random stream as in one process. A collective: every rank calls it.

    A quantized folder (`save_quantized`, or transformers + bitsandbytes 4-bit) is read in its own scheme, one
    layer at a time (each process reads the layer and keeps its part), with no quantization.

    Returns:
        (model, relative weight error of each layer quantized here over all processes' rows; {} for LoRA or a
        quantized folder)

    Raises:
        LoraqError: a tensor is missing, has the wrong shape, or the file holds one the model lacks.
    """
    tensors, where = read_tensors(folder, lazy=True)
    stored = checkpoint_scheme(folder)
    scheme = stored or scheme
    model = skeleton(folder, trust_remote_code=False)
    compute_unsaved_buffers(model, where)  # rotary tables: on the CPU, before anything is sharded
    layers = quantizable_linear_names(model) if scheme.quantized else []
    if stored is not None:  # layers the checkpoint keeps in full precision stay plain
        layers = [n for n in layers if not tensors.is_float(f"{n}.weight")]
    for name in layers:
        module = model.get_submodule(name)
        shape = layer_shape(module)
        scheme.check(name, shape)
        if stored is None:
            _check_shape(tensors, f"{name}.weight", shape[::-1] if is_conv1d(module) else shape, where)
        weight = torch.empty(shape, device="meta")
        bias = None if module.bias is None else torch.empty(shape[0], device="meta")
        replace_module(model, name, scheme.quantize_layer(name, weight, bias))
    for p in model.parameters():
        p.requires_grad_(False)
    prepare(model)
    shard_model(model, device, cpu_offload)
    _materialize(model, device, cpu_offload)
    errors = _fill(model, tensors, scheme, layers, where, device, stored is not None)
    _start_dora(model)
    model.eval()
    return model, errors


def _materialize(model: nn.Module, device: torch.device, cpu_offload: bool) -> None:
    """Give every meta tensor memory (its shard only) on `device`, or the shards in host memory with CPU offload
    (FSDP2 copies them to the device as it gathers them; the buffers still go to the device), keeping the
    values of the tensors that have them (the adapter, computed buffers): to_empty reallocates them all."""
    kept = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        local = local_tensor(t)
        if not local.is_meta:
            kept[name] = local.detach().clone()
    model.to_empty(device=torch.device("cpu") if cpu_offload else device)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name in kept:
                local_tensor(t).copy_(kept.pop(name))
    if cpu_offload:
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(device)


def _fill(
    model: nn.Module,
    tensors: LazyTensors,
    scheme: Scheme,
    layers: list[str],
    where: Path,
    device: torch.device,
    quantized: bool,
) -> dict[str, float]:
    """Read (and quantize) this process's rows of every tensor of the file into its shard."""
    rank, world = dist.get_rank(), dist.get_world_size()
    filled: set[int] = set()
    squares: list[list[float]] = []  # per layer: ||W - Ŵ||² and ||W||² over this process's rows
    with torch.no_grad():
        for name in layers:
            layer = _base(model.get_submodule(name))
            key = f"{name}.weight"
            start, stop = chunk_bounds(layer.out_features, rank, world)
            shard = RowShard(start, stop, layer.out_features, rank, world, _gather)
            if quantized:
                _fill_stored(layer, name, scheme, tensors, shard, where)
                filled |= {id(t) for t in [*layer.quantized_tensors().values(), layer.bias] if t is not None}
                continue
            weight = _weight_rows(tensors, key, start, stop, layer).to(device)
            made = scheme.quantize_rows(name, weight, shard, layer)
            if made is None:  # a layout whose rows are not their own: the whole layer, on every process
                whole_weight = _weight_rows(tensors, key, 0, layer.out_features, layer).to(device)
                whole = scheme.quantize_layer(name, whole_weight, None)
                values = {k: shard.chunk(t) for k, t in whole.quantized_tensors().items()}
                # its error counted once, by rank 0
                weight, approx = (whole_weight, whole.dequantize()) if rank == 0 else (weight[:0], weight[:0])
            else:
                values, approx = made
            params = layer.quantized_tensors()
            for suffix, value in values.items():  # (a process with no rows of a rows-first layer gets none)
                local_tensor(params[suffix]).copy_(value)
            filled |= {id(t) for t in params.values()}
            squares.append([float((weight - approx).float().square().sum()), float(weight.float().square().sum())])
            if layer.bias is not None:
                local_tensor(layer.bias).copy_(tensors.rows(f"{name}.bias", start, stop))
                filled.add(id(layer.bias))
            tensors.pop(key, None)
            tensors.pop(f"{name}.bias", None)
        owned = {_file_key(model, n): t for n, t in model.named_parameters(remove_duplicate=False)}
        owned.update(model.named_buffers())
        for key in list(tensors):
            if key not in owned:
                raise LoraqError(f"{where}: tensor {key} is not one of {type(model).__name__}'s")
            t = owned[key]
            _check_shape(tensors, key, tuple(t.shape), where)
            if is_dtensor(t) and t.dim():
                start, stop = chunk_bounds(t.shape[0], rank, world)
                local = local_tensor(t)
                step = max(1, COPY_BYTES // max(1, local[:1].numel() * 4))
                for first in range(start, stop, step):  # a few MiB at a time: no second copy of an embedding
                    local[first - start : min(first + step, stop) - start].copy_(
                        tensors.rows(key, first, min(first + step, stop))
                    )
            else:
                t.copy_(tensors[key])
            filled.add(id(t))
            tensors.pop(key)
    missing = [n for n, p in model.named_parameters() if id(p) not in filled and not p.requires_grad]
    if missing:
        raise LoraqError(f"{where}: no tensor for {missing[:5]}")
    if not layers or quantized:
        return {}
    totals = torch.tensor(squares, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return {name: float(n.sqrt() / d.sqrt().clamp(min=1e-30)) for name, (n, d) in zip(layers, totals.cpu())}


def _start_dora(model: nn.Module) -> None:
    """DoRA's magnitudes start at the row norms of the loaded base (the meta-device model had none): each sharded
    unit is gathered whole once, as its forward would gather it, its layers' norms computed there, and each
    process keeps its part of the magnitudes. A collective: every rank walks the same units in the same order."""
    for unit, layers in _layers_by_unit(model):
        adapters = [(layer, a) for layer in layers for a in layer.adapters.values() if a.dora]
        if not adapters:
            continue
        unit.unshard()
        for layer, adapter in adapters:
            layer.start_dora(adapter)  # base_norm_sq (a buffer, whole on every process) kept as it is
        whole = [adapter.magnitude.detach().clone() for _, adapter in adapters]
        unit.reshard()  # the sharded parameters are back: keep this process's part of the magnitudes
        with torch.no_grad():
            for (_, adapter), magnitude in zip(adapters, whole):
                local_tensor(adapter.magnitude).copy_(local_tensor(shard_like(magnitude, adapter.magnitude)))


def _layers_by_unit(model: nn.Module) -> list[tuple[nn.Module, list[LoraLinear]]]:
    """Each sharded unit (FSDP2 module) with the adapted layers whose parameters it gathers (its own, not a
    nested unit's), in the model's order."""
    from torch.distributed.fsdp import FSDPModule

    owned: dict[int, tuple[nn.Module, list[LoraLinear]]] = {}

    def walk(module: nn.Module, unit: nn.Module) -> None:
        unit = module if isinstance(module, FSDPModule) else unit
        if isinstance(module, LoraLinear):
            owned.setdefault(id(unit), (unit, []))[1].append(module)
        for child in module.children():
            walk(child, unit)

    walk(model, model)
    return list(owned.values())


def _fill_stored(layer: nn.Module, name: str, scheme: Scheme, tensors: LazyTensors, shard: RowShard, where) -> None:
    """A quantized checkpoint's layer: read whole (one layer), checked by its scheme, this process's part kept."""
    suffixes = [k[len(name) + 1 :] for k in tensors if k.startswith(name + ".") and k != f"{name}.bias"]
    bias = tensors.pop(f"{name}.bias", None)
    try:
        whole = scheme.layer_from_checkpoint(taker(tensors, name, where), suffixes, layer_shape(layer), bias)
    except CorruptTensor as e:
        raise LoraqError(f"{where}: tensor {name}.{e.suffix} {e.why}; the quantized checkpoint is corrupt") from None
    for suffix in suffixes:  # what the scheme did not need (bitsandbytes' quant maps)
        tensors.pop(f"{name}.{suffix}", None)
    ours = layer.quantized_tensors()
    for suffix, t in whole.quantized_tensors().items():
        if ours[suffix].shape != t.shape:
            raise LoraqError(
                f"{where}: layer {name} is stored as {suffix} {tuple(t.shape)}, but this run's "
                f"{scheme.describe()} layer holds {tuple(ours[suffix].shape)}"
            )
        local_tensor(ours[suffix]).copy_(shard.chunk(t))
    if layer.bias is not None:
        local_tensor(layer.bias).copy_(shard.chunk(whole.bias.detach()))


def _base(module: nn.Module) -> nn.Module:
    """The frozen layer of a layer the adapter wraps (prepare attached it before loading)."""
    return module.base if isinstance(module, LoraLinear) else module


def _file_key(model: nn.Module, name: str) -> str:
    """The file's key of a parameter: the adapter's wrapper puts the layer under `.base`, the file does not."""
    prefix, _, leaf = name.rpartition(".")
    if prefix.endswith(".base") and isinstance(model.get_submodule(prefix[: -len(".base")]), LoraLinear):
        return f"{prefix[: -len('.base')]}.{leaf}"
    return name


def _weight_rows(tensors: LazyTensors, key: str, start: int, stop: int, layer: nn.Module) -> torch.Tensor:
    """Rows start:stop of a linear layer's (out, in) weight in fp32, read alone (GPT-2's Conv1D stores (in, out))."""
    if key not in tensors:
        raise LoraqError(f"tensor {key} is missing")
    conv1d = tensors.shape(key) == (layer.in_features, layer.out_features) != (layer.out_features, layer.in_features)
    part = tensors.rows(key, start, stop, dim=1 if conv1d else 0).float()
    return part.T.contiguous() if conv1d else part


def _check_shape(tensors: LazyTensors, key: str, shape: tuple[int, ...], where: Path) -> None:
    if key not in tensors:
        raise LoraqError(f"{where}: tensor {key} is missing")
    found = tensors.shape(key)
    if found != tuple(shape):
        raise LoraqError(f"{where}: tensor {key} has shape {found}, the model expects {tuple(shape)}")


def _gather(rows: torch.Tensor) -> torch.Tensor:
    """Every process's rows of a tensor, concatenated in rank order (they may hold one row fewer at the end)."""
    world = dist.get_world_size()
    counts = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    every = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(every, counts)
    most = int(max(every))
    padded = torch.zeros((most, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, every)])


def note_load(errors: dict[str, float], world: int) -> None:
    if errors:
        worst = max(errors, key=errors.get)
        print(
            f"loraq: base loaded into {world} shards; relative weight error of the {len(errors)} layers: mean "
            f"{sum(errors.values()) / len(errors):.4f}, max {errors[worst]:.4f} ({worst})",
            file=sys.stderr,
        )
