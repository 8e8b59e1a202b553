"""The CUDA path, checked in one short run on a GPU machine (nothing here runs without CUDA):

    .venv/bin/python bench/device_check.py

For LoRA, QLoRA (NF4+DQ) and QA-LoRA (the GGUF's INT4 codes) on the default model: logits on CUDA in bf16
autocast vs the CPU in fp32 (relative max error, and greedy-token agreement), NF4 dequantization on CUDA vs
CPU (must be bit-identical in fp32), and the median time of a training step (batch 4 x 256) on CUDA.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    import loraq
    from loraq.product.base import build_base
    from loraq.quant.frozen import NF4Linear

    tokenizer = loraq.product.models.load_tokenizer("smollm2-135m")
    text = " ".join(ex.response for ex in loraq.product.data.load_examples("e2e"))
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][: 4 * 256]).view(4, 256)
    for method in ("lora", "qlora", "qalora"):
        config = loraq.LoraConfig(r=16, alpha=32, method=method)
        model, _, _ = build_base("smollm2-135m", config)
        loraq.apply(model, config)
        for layer in loraq.core.inject.lora_layers(model).values():
            torch.nn.init.normal_(layer.adapters["default"].B, std=0.01)
        with torch.no_grad():
            cpu = model(ids[:1]).logits.float()
            model.cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                gpu = model(ids[:1].cuda()).logits.float().cpu()
        rel = float((gpu - cpu).abs().max() / cpu.abs().max())
        agree = float((gpu.argmax(-1) == cpu.argmax(-1)).float().mean())
        if method == "qlora":
            layer = next(m for m in model.modules() if isinstance(m, NF4Linear))
            on_gpu = layer.dequantize(torch.float32).cpu()
            layer.cpu()
            exact = torch.equal(on_gpu, layer.dequantize(torch.float32))
            layer.cuda()
            print(f"  NF4 dequantize CUDA == CPU (fp32): {exact}")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        times = []
        for i in range(7):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids.cuda(), labels=ids.cuda()).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        grads = all(p.grad is None for p in params)  # zeroed: set_to_none
        print(
            f"{method:7s} bf16 CUDA vs fp32 CPU: max rel error {rel:.2e}, greedy agreement {agree:.3f}; "
            f"step {statistics.median(times) * 1000:.0f} ms; peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB; "
            f"grads cleared {grads}"
        )
        del model, optimizer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return 0


if __name__ == "__main__":
    sys.exit(main())
