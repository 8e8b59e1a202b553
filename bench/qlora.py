"""QLoRA figures that take seconds: weight memory of the default model (fp32 vs NF4+DQ), and NF4 quantize /
dequantize time of a 4096 x 4096 fp32 matrix, loraq vs bitsandbytes, side by side (median of 7 runs).

    .venv/bin/python bench/qlora.py

Still to add here (see issue 3): step time and peak RSS of loraq LoRA / QLoRA vs PEFT (+ bitsandbytes),
perplexity on held-out text, and LoRA vs QLoRA validation loss.
"""

from __future__ import annotations

import statistics
import time

import torch


def model_bytes() -> None:
    import loraq
    from loraq.quant.frozen import NF4Linear
    from loraq.quant.schemes.nf4 import NF4

    model, _ = loraq.load_model("smollm2-135m")
    fp32 = sum(t.numel() * t.element_size() for t in {id(p): p for p in model.parameters()}.values())
    NF4().quantize_model(model)
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    q_bits = 8 * sum(m.storage_bytes() for m in layers) / sum(m.in_features * m.out_features for m in layers)
    print(
        f"default model weights: fp32 {fp32 / 2**20:.1f} MiB, NF4+DQ {total / 2**20:.1f} MiB "
        f"(ratio {total / fp32:.3f}); quantized layers at {q_bits:.3f} bits/param; "
        f"the tied 49152x576 embedding stays fp32"
    )


def timing() -> None:
    import bitsandbytes.functional as bnb

    from loraq.quant.nf4 import dequantize_4bit, quantize_4bit

    w = torch.randn(4096, 4096)

    def median(fn) -> float:
        fn()
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    packed, state = quantize_4bit(w, 64, "nf4", True)
    ref_packed, ref_state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q_ours = median(lambda: quantize_4bit(w, 64, "nf4", True))
    q_bnb = median(lambda: bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True))
    d_ours = median(lambda: dequantize_4bit(packed, state))
    d_bnb = median(lambda: bnb.dequantize_4bit(ref_packed, ref_state))
    print(f"4096x4096 NF4+DQ quantize: loraq {q_ours:.0f} ms, bitsandbytes {q_bnb:.0f} ms (ratio {q_ours / q_bnb:.2f})")
    print(
        f"4096x4096 NF4+DQ dequantize: loraq {d_ours:.0f} ms, bitsandbytes {d_bnb:.0f} ms (ratio {d_ours / d_bnb:.2f})"
    )


if __name__ == "__main__":
    model_bytes()
    timing()
