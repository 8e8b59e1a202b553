"""One training run of the tiny model, started by tests/test_distributed.py as a plain process or under
`torchrun --nproc-per-node 2` (gloo): the same code either way, so the two can be compared.

    python tests/fsdp_worker.py train OUT METHOD [JSON options]     loraq.train on the tiny model (METHOD: lora,
        qlora, qalora, constants, gguf, gptq, qlora-untied, saved-nf4, saved-int4, and with DoRA dora, qdora,
        qadora), then per-rank storage (OUT/storage-rankN.json) and the whole quantized base gathered from the
        shards (OUT/base.safetensors)
    python tests/fsdp_worker.py cli FAULT STEP [loraq args...]      the `loraq` command, with rank 1 killed
        (FAULT kill) or raising a LoraqError (FAULT raise) after optimizer step STEP
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def _tiny(method: str, folder: Path):
    """(model name, model or None, tokenizer): the tiny model saved as a folder that train loads (into shards
    under torchrun): full precision, or for "saved-nf4" / "saved-int4" already quantized (save_quantized); or
    for "gguf" loaded on the codes of a tiny GGUF (Q4_1 becomes INT4, the others keep their blocks) and handed
    to train, which shards it after loading."""
    from conftest import build_tiny_model, build_tokenizer

    import loraq
    from loraq.quant.schemes.gguf import GgufCodes

    tokenizer = build_tokenizer()
    # "qlora-untied": an MLP of 96 (NF4 blocks of 64 then straddle rows: the whole-layer path) and an untied head
    odd = dict(intermediate_size=96, tie_word_embeddings=False) if method == "qlora-untied" else {}
    model = build_tiny_model(len(tokenizer), **odd)
    source = folder / "tiny.gguf"
    if int(os.environ.get("RANK", "0")) == 0:  # one writer, then everyone reads
        model.save_pretrained(folder / "hf")
        tokenizer.save_pretrained(folder / "hf")
        if method == "gguf":
            from test_gguf_blocks import write_tiny_gguf

            write_tiny_gguf(model, "llama", source, ["Q4_1", "Q4_0", "Q8_0", "Q5_1"])
        if method.startswith("saved-"):
            loraq.quantize(model, loraq.LoraConfig(method="qlora" if method == "saved-nf4" else "qalora"))
            loraq.save_quantized(model, tokenizer, folder / "saved")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        dist.barrier()
    if method != "gguf":
        return str(folder / ("saved" if method.startswith("saved-") else "hf")), None, tokenizer
    model, _ = loraq.load_model(folder / "hf", quantize_layer=GgufCodes(source).quantize_layer)
    return str(folder / "hf"), model, tokenizer


def train_and_report(out: Path, method: str, flags: str) -> None:
    from conftest import E2E_TINY
    from safetensors.torch import save_file

    from loraq import TrainConfig, train
    from loraq.product.distributed import barrier, full_tensor, local_bytes, shutdown
    from loraq.quant.frozen import FrozenQuantized

    out.mkdir(parents=True, exist_ok=True)
    name, model, tokenizer = _tiny(method, out)
    options = dict(model=name, data=str(E2E_TINY), out=str(out / "run"), device="cpu", rank=4, warmup_steps=1)
    named = {"qlora-untied": "qlora", "saved-nf4": "qlora", "saved-int4": "qalora", "dora": "lora", "qdora": "qlora"}
    options |= {"method": named.get(method, method if "lora" in method else "qalora")}
    if method == "constants":
        options["train_constants"] = "both"
    if method == "gptq":  # calibrated on the whole model: every process quantizes it, then it is sharded
        options["quantizer"] = "gptq"
    options |= json.loads(flags)
    model = train(TrainConfig(**options), model, tokenizer, progress=False).model

    rank = int(os.environ.get("RANK", "0"))
    storage, base = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, FrozenQuantized):
            for key, t in module.quantized_tensors().items():
                rows = t.shape[0]
                row_bytes = t.numel() // max(rows, 1) * t.element_size()
                storage[f"{name}.{key}"] = [local_bytes(t), t.numel() * t.element_size(), row_bytes]
                base[f"{name}.{key}"] = full_tensor(t.detach()).contiguous()  # every rank gathers
    (out / f"storage-rank{rank}.json").write_text(json.dumps(storage))
    if rank == 0:
        save_file(base, str(out / "base.safetensors"))
    # leave together: a process that exits while its peer still reads the last gather's bytes resets the socket
    barrier()
    shutdown()


def cli_with_fault(fault: str, step: int, args: list[str]) -> int:
    from loraq.errors import LoraqError
    from loraq.product import cli, train

    original = train._optimizer_step

    def faulty(state, index, *rest):
        record = original(state, index, *rest)
        if state.rank == 1 and index + 1 == step:
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise LoraqError(f"injected fault after step {step}")
        return record

    train._optimizer_step = faulty
    return cli.main(args)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "train":
        train_and_report(Path(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "{}")
    else:
        sys.exit(cli_with_fault(sys.argv[2], int(sys.argv[3]), sys.argv[4:]))
