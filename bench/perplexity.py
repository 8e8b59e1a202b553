"""Perplexity of the default model on held-out text (64K tokens of Shakespeare, windows of 512) with every
linear layer but the head quantized: fp32, loraq NF4 / NF4+DQ / FP4 (blocksize 64), bitsandbytes NF4+DQ, and
INT-k RTN (e.g. int4-g32, which reproduces the default model's own Q4_1 codes: the same perplexity as fp32).

    .venv/bin/python bench/perplexity.py [--max-tokens 65536] [--setups fp32,nf4-dq,bnb-nf4-dq,nf4,fp4,int4-g32]
"""

from __future__ import annotations

import argparse
import time

import torch


def load(setup: str):
    import loraq
    from loraq.quant.schemes import scheme_named
    from loraq.quant.schemes.nf4 import NF4

    if setup.startswith("bnb"):
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        from loraq.product.models import default_model_dir

        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        folder = default_model_dir()
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, quantization_config=config, device_map="cpu"
        )
        return model, AutoTokenizer.from_pretrained(folder)
    if setup.startswith("int"):  # e.g. int4-g32: RTN, llama.cpp's Q4_1 rule
        bits, _, group = setup[3:].partition("-g")
        scheme = scheme_named(f"int{bits}", int(group))
        return loraq.load_model("smollm2-135m", quantize_layer=scheme.quantize_layer)
    model, tokenizer = loraq.load_model("smollm2-135m")
    if setup != "fp32":
        quant_type, _, dq = setup.partition("-")
        NF4(quant_type, 64, double_quant=dq == "dq").quantize_model(model)
    return model, tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default="fp32,nf4-dq,bnb-nf4-dq,nf4,fp4")
    ap.add_argument("--max-tokens", type=int, default=65536)
    args = ap.parse_args()
    from loraq.product.evaluate import held_out_text, perplexity

    text = held_out_text()
    torch.set_grad_enabled(False)
    for setup in args.setups.split(","):
        model, tokenizer = load(setup)
        start = time.perf_counter()
        ppl = perplexity(model, tokenizer, text, max_tokens=args.max_tokens)
        print(f"{setup:12s} perplexity {ppl:.4f}  ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
