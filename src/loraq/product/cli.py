"""The `loraq` command: a thin layer over the Python API. Errors a user can fix print one line, exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..errors import LoraqError


def _parse_targets(value: str) -> str | list[str]:
    if value == "all-linear":
        return value
    if value.startswith("re:"):
        return value[3:]
    return [t.strip() for t in value.split(",") if t.strip()]


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    from .train_config import TrainConfig

    parser.add_argument(
        "--config", default=None, help="a YAML file of options (these flags' names); flags given here override it"
    )
    # Defaults are not set on the parser, so that only flags actually given override the config file.
    for f in dataclasses.fields(TrainConfig):
        if not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})".replace("%", "%%")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
        elif f.name == "targets":
            parser.add_argument(flag, type=_parse_targets, default=argparse.SUPPRESS, help=help_text)
        else:
            kind = {"int": int, "float": float, "float | None": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraq", description="Fine-tune language models cheaply with LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model and write a run folder", description="Fine-tune a model.")
    _add_train_options(p)

    p = sub.add_parser("generate", help="generate text from a prompt, optionally with an adapter")
    p.add_argument("--model", default="smollm2-135m", help="model name or folder (default: smollm2-135m)")
    p.add_argument("--adapter", default=None, help="PEFT adapter folder to apply (default: none)")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    p.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load a legacy pickle adapter (adapter_model.bin); pickle can run code: only for files you trust",
    )

    p = sub.add_parser(
        "merge",
        help="merge a run's adapter into its base and export it (hf, gguf, gptq, peft)",
        description="Merge an adapter into the base it was trained on (QLoRA: the dequantized NF4 base; "
        "QA-LoRA: exactly into the INT-k group offsets) and write it; the error each rounding adds is "
        "measured on validation prompts.",
    )
    p.add_argument("run", help="run folder written by `loraq train`, or a PEFT adapter folder")
    p.add_argument("--out", required=True, help="folder to write (a .gguf file for --format gguf)")
    p.add_argument(
        "--format",
        default="hf",
        help="hf (Hugging Face folder), gguf (Q4_1 file, exact for QA-LoRA INT4 g32 on a GGUF model), gptq "
        "(GPTQ folder; rounds zero points), or peft (the adapter alone, QA-LoRA expanded) (default: hf)",
    )
    p.add_argument("--model", default=None, help="base model (default: the run's, or the adapter's base)")
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32 for --format hf (default: bf16)")
    p.add_argument(
        "--requantize",
        default=None,
        help="nf4, fp4, or int2/int3/int4/int8 (RTN, group 32): re-quantize the merged weights (lossy; the "
        "error is reported) (default: off)",
    )
    p.add_argument("--data", default=None, help="validation data for the error report (default: the run's)")
    p.add_argument("--prompts", type=int, default=16, help="validation examples to measure on (default: 16)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load a legacy pickle adapter (adapter_model.bin); pickle can run code: only for files you trust",
    )

    p = sub.add_parser("eval", help="loss, perplexity and generation scores of a run or a model")
    p.add_argument("run", help="a run folder (its model, method and adapter), or a model")
    p.add_argument("--adapter", default=None, help="adapter folder to attach to a model (default: the run's)")
    p.add_argument("--data", default=None, help="dataset: loss on its validation split (default: the run's)")
    p.add_argument("--text", nargs="+", default=None, help="plain text files to measure perplexity on")
    p.add_argument("--held-out", action="store_true", help="perplexity on the default held-out text (Shakespeare)")
    p.add_argument("--generate", type=int, default=0, help="score greedy generations on N test prompts (BLEU, ROUGE-L)")
    p.add_argument("--max-tokens", type=int, default=65536, help="tokens of text for perplexity (default: 65536)")
    p.add_argument("--out", default=None, help="write the report (and the samples) to this JSON file")

    p = sub.add_parser("compare", help="one table across finished runs, and a bar chart")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--chart", default="compare.png", help="bar chart of best validation loss (default: compare.png)")

    p = sub.add_parser("plan", help="estimate the memory a fine-tune needs, before loading anything")
    p.add_argument("--model", default="smollm2-135m", help="model (default: smollm2-135m)")
    p.add_argument("--method", default="lora", help="lora, qlora or qalora (default: lora)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default: 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per example (default: 256)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--bits", type=int, default=4, help="qalora bits (default: 4)")
    p.add_argument("--group-size", type=int, default=32, help="qalora group size (default: 32)")
    p.add_argument("--grad-checkpoint", action="store_true", help="with gradient checkpointing")
    p.add_argument("--loss-fraction", type=float, default=1.0, help="share of positions with a loss (default: 1)")
    p.add_argument("--train-constants", default="none", help="qalora: also the groups' scale, offset or both")
    p.add_argument("--world-size", type=int, default=1, help="processes under torchrun (FSDP2 shards) (default: 1)")
    p.add_argument("--cpu-offload", action="store_true", help="with --world-size N: shards in host memory")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--compute-dtype", default="auto", help="auto (as train: bf16 on CUDA and on CPUs with native "
                   "bf16), fp32 or bf16")  # fmt: skip
    p.add_argument(
        "--device-memory", type=float, default=None, help="GiB per device: say whether the run fits, and how"
    )

    p = sub.add_parser("demo", help="fine-tune the default model on E2E NLG and show before/after")
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="override the demo's number of steps")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .distributed import rank_prefix, shutdown  # (after parsing: --help needs no torch)

    try:
        return _run(args)
    except LoraqError as e:
        print(f"loraq: error: {rank_prefix()}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loraq: {rank_prefix()}interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown()


def _run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.command == "train":
        from .train import train
        from .train_config import TrainConfig, read_config_file

        flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
        options = {**(read_config_file(args.config) if args.config else {}), **flags}
        result = train(TrainConfig(**options))
        if result.stopped_at is not None:
            print(f"stopped after step {result.stopped_at}; continue with the same command and --resume")
            return 130
        losses = f"{result.val_loss_before:.4f} -> {result.val_loss_after:.4f}"
        print(f"validation loss {losses}; adapter in {result.out / 'adapter'}")
    elif args.command == "generate":
        from ..formats.peft import load_adapter
        from .generate import generate
        from .models import load_model

        if args.max_new_tokens < 1:
            raise LoraqError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        model, tokenizer = load_model(args.model)
        if args.adapter:
            load_adapter(model, args.adapter, allow_pickle=args.allow_pickle)
        print(generate(model, tokenizer, args.prompt, args.max_new_tokens, chat=not args.no_chat))
    elif args.command == "merge":
        from .export import merge_run

        report = merge_run(
            args.run,
            args.out,
            format=args.format,
            model=args.model,
            dtype=args.dtype,
            requantize=args.requantize,
            data=args.data,
            prompts=args.prompts,
            allow_pickle=args.allow_pickle,
        )
        print(report)
    elif args.command == "eval":
        import json

        from ..atomic import atomic_write_text
        from .evaluate import evaluate_run

        report = evaluate_run(
            args.run, args.adapter, args.data, args.text, args.held_out, args.generate, args.max_tokens
        )
        print(report)
        if args.out:
            atomic_write_text(args.out, json.dumps(report.__dict__, indent=2) + "\n")
    elif args.command == "compare":
        from .compare import compare_runs, format_table

        print(format_table(compare_runs(args.runs, args.chart)))
        print(f"chart: {args.chart}")
    elif args.command == "plan":
        from .plan import offload_advice, plan_memory

        if min(args.batch_size, args.seq_len) < 1 or args.rank < 0 or not 0 < args.loss_fraction <= 1:
            raise LoraqError("--batch-size and --seq-len must be >= 1, --rank >= 0 and --loss-fraction in (0, 1]")
        if args.compute_dtype not in ("auto", "fp32", "bf16"):
            raise LoraqError(f"--compute-dtype must be auto, fp32 or bf16, got {args.compute_dtype!r}")
        if args.compute_dtype == "auto":  # (plan asks no GPU whether it has bf16: it assumes one that does)
            from .device import auto_compute_dtype

            args.compute_dtype = auto_compute_dtype(args.device)
        options = dict(
            model=args.model, method=args.method, batch_size=args.batch_size, seq_len=args.seq_len, rank=args.rank,
            bits=args.bits, group_size=args.group_size, grad_checkpoint=args.grad_checkpoint,
            loss_fraction=args.loss_fraction, compute_bytes=2 if args.compute_dtype == "bf16" else 4,
            train_constants=args.train_constants, world_size=args.world_size, cpu_offload=args.cpu_offload,
            device=args.device,
        )  # fmt: skip
        print(plan_memory(**options))
        if args.device_memory is not None:
            if args.device_memory <= 0:
                raise LoraqError(f"--device-memory must be > 0 GiB, got {args.device_memory}")
            print(offload_advice(options, int(args.device_memory * 2**30)))
    elif args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
