"""CPU dequantization of one 4-bit layer, loraq vs bitsandbytes' own CPU kernel, side by side in one run.

    .venv/bin/python bench/dequantize.py                  # 4096x4096 and 11008x4096, fp32 and bf16 outputs
    .venv/bin/python bench/dequantize.py --shapes 4096x4096 --repeats 50
    .venv/bin/python bench/dequantize.py --gemv           # a few rows: multiply by the codes vs dequantize + matmul

What the frozen matmul does on every use of a weight: NF4 with double-quantized block constants (blocksize 64)
into a workspace buffer in the compute dtype, and INT4 group 32 (QA-LoRA's base: the GGUF Q4_1 layout) the same
way. bitsandbytes gets the same weight (`bitsandbytes.functional.dequantize_4bit`, NF4, compress_statistics),
quantized from the weight in the output dtype, as its Linear4bit holds it. loraq's C path (quant/native.c, the
default wherever a C compiler is) and its PyTorch path (LORAQ_NATIVE=0) both. Median of --repeats calls after two
warm-ups, the setups interleaved round by round; ratio = loraq's C path / bitsandbytes (lower is faster).

`--gemv`: what a frozen layer does when it decodes a token at a time (no gradient, 1-16 rows): its C loop that
multiplies by the codes (`few_rows`) against dequantizing a fresh weight and multiplying (the path without it),
for NF4 and INT4 g32, inputs in fp32 and bf16; ratio = fused / dequantize + matmul.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

import torch


def timed(fn, repeats: int) -> list[float]:
    fn()
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def pytorch_path(fn):
    """fn with loraq's C dequantization turned off (LORAQ_NATIVE=0) while it runs."""

    def call():
        os.environ["LORAQ_NATIVE"] = "0"
        try:
            return fn()
        finally:
            del os.environ["LORAQ_NATIVE"]

    return call


def gemv_table(shapes: str, repeats: int, rounds: int) -> None:
    import torch.nn.functional as F

    from loraq.quant.frozen import NF4Linear
    from loraq.quant.nf4 import quantize_4bit
    from loraq.quant.schemes.intk import IntRTN

    print("| shape | base | rows | input | fused ms | dequantize + matmul ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes.split(","):
        out, cols = (int(v) for v in shape.split("x"))
        weight = torch.randn(out, cols, generator=torch.Generator().manual_seed(0)) * 0.02
        layers = {"NF4": NF4Linear(*quantize_4bit(weight)), "INT4 g32": IntRTN(4, 32).quantize_layer("w", weight, None)}
        for name, layer in layers.items():
            for rows in (1, 4, 16):
                for dtype in (torch.float32, torch.bfloat16):
                    x = torch.randn(rows, cols).to(dtype)
                    # (fused: asked as for fp32, where it always runs; the input stays in its dtype)
                    setups = {"fused": partial(layer.few_rows, x, torch.float32),
                              "plain": lambda x=x, w=layer, d=dtype: F.linear(x, w.dequantize(d))}  # fmt: skip
                    times: dict[str, list[float]] = {k: [] for k in setups}
                    with torch.no_grad():
                        for _ in range(rounds):
                            for key, fn in setups.items():
                                times[key] += timed(fn, repeats)
                    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                    print(f"| {shape} | {name} | {rows} | {str(dtype).removeprefix('torch.')} | {ms['fused']:.2f} | "
                          f"{ms['plain']:.2f} | {ms['fused'] / ms['plain']:.2f} |", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,11008x4096", help="out x in, comma-separated")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gemv", action="store_true", help="a few rows: the fused C loop vs dequantize + matmul")
    args = ap.parse_args()
    if args.gemv:
        gemv_table(args.shapes + ",1536x576", args.repeats, args.rounds)
        return

    import bitsandbytes.functional as bnb

    from loraq.quant.intk import dequantize_packed, pack_rows, quantize_rtn
    from loraq.quant.nf4 import dequantize_4bit, quantize_4bit
    from loraq.quant.workspace import Workspace

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| shape | output | loraq NF4 ms (C / PyTorch) | loraq INT4 g32 ms (C / PyTorch) | bitsandbytes NF4 ms "
          "| NF4 ratio | INT4 ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        rows, cols = (int(x) for x in shape.split("x"))
        weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02
        packed, state = quantize_4bit(weight, 64, "nf4", double_quant=True)
        codes, scale, offset = quantize_rtn(weight, 4, 32)
        int_packed = pack_rows(codes, 4)
        for dtype in (torch.float32, torch.bfloat16):
            workspace = Workspace()
            theirs_q, theirs_state = bnb.quantize_4bit(weight.to(dtype), blocksize=64, quant_type="nf4",
                                                       compress_statistics=True)  # fmt: skip
            setups = {
                "nf4": partial(dequantize_4bit, packed, state, dtype, workspace),
                "int4": partial(dequantize_packed, int_packed, 4, scale, offset, dtype, workspace),
                "bnb": partial(bnb.dequantize_4bit, theirs_q, theirs_state),
            }
            setups |= {f"{k}-pytorch": pytorch_path(setups[k]) for k in ("nf4", "int4")}
            times: dict[str, list[float]] = {k: [] for k in setups}
            for _ in range(args.rounds):
                for name, fn in setups.items():
                    times[name] += timed(fn, args.repeats)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            label = str(dtype).removeprefix("torch.")
            print(f"| {shape} | {label} | {ms['nf4']:.1f} / {ms['nf4-pytorch']:.1f} | "
                  f"{ms['int4']:.1f} / {ms['int4-pytorch']:.1f} | {ms['bnb']:.1f} | "
                  f"{ms['nf4'] / ms['bnb']:.2f} | {ms['int4'] / ms['bnb']:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
