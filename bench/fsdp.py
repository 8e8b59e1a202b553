"""FSDP2 on this machine: one process against two (torchrun, gloo), side by side, on the default model with QLoRA
and QA-LoRA. A benchmark, not a test.

    .venv/bin/python bench/fsdp.py                          # qlora and qalora, 6 steps of batch 8
    .venv/bin/python bench/fsdp.py --methods qlora --steps 4
    .venv/bin/python bench/fsdp.py --mmap-threshold 1048576   # glibc returns big blocks: RSS ~ tensors

Each setting is `loraq.train` in fresh processes (`torchrun --nproc-per-node 2` for two), twice: once timed
(tokens/s; RSS sampled every 20 ms by loraq's HostMemory, whole, anonymous and file-backed, at load and in
training; the base each process holds; the seconds of the final gather-and-save), once for 2 steps under
the profiler (the peak of
live tensors at load and in training, which glibc's RSS hides: DESIGN.md §11). Per process, the largest
over the processes; beside each, `loraq plan`'s estimate. Writes bench/results/fsdp.json.

The two processes share this machine's 2 cores (torchrun gives each one thread), so tokens/s compares the
engines' overhead, not a speed-up: FSDP2 is for memory here, and for speed across GPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from steps import memory_events  # noqa: E402

RESULTS = HERE.parent / "results" / "fsdp.json"
MB = 2**20


# --- inside each process ----------------------------------------------------------------------------------


def worker(method: str, out: Path, steps: int, batch_size: int, profiled: bool) -> None:
    import torch

    from loraq import TrainConfig
    from loraq.product import train as train_module
    from loraq.product.distributed import barrier, local_bytes, shutdown
    from loraq.product.host_memory import HostMemory, read_status

    rank = int(os.environ.get("RANK", "0"))
    sampler = HostMemory(interval=0.02)
    sampler.__enter__()
    facts: dict = {"rss_before_load": read_status()}
    build = train_module._build_model

    def timed_build(*args, **kwargs):
        sampler.phase("load")
        with torch.profiler.record_function("bench.load"):
            model = build(*args, **kwargs)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        facts["base_bytes"] = sum(local_bytes(p) for p in frozen)
        facts["base_bytes_whole"] = sum(p.numel() * p.element_size() for p in frozen)
        sampler.phase("train")
        return model

    gathered = train_module.gathered_trainables

    @contextlib.contextmanager
    def timed_save(model):
        start = time.perf_counter()
        with gathered(model):
            yield
        facts["save_seconds"] = time.perf_counter() - start

    train_module._build_model = timed_build
    train_module.gathered_trainables = timed_save
    config = TrainConfig(
        model="smollm2-135m", method=method, steps=steps, batch_size=batch_size, eval_every=0, save_every=0,
        out=str(out / "run"), device="cpu", overwrite=True,
    )  # fmt: skip
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with profiler if profiled else contextlib.nullcontext():
        train_module.train(config, progress=False)
    sampler.__exit__(None, None, None)
    facts["rss"] = sampler.peaks
    if profiled:
        facts["tensor_peak"] = tensor_peaks(profiler, out / f"trace-rank{rank}.json")
    (out / f"rank{rank}.json").write_text(json.dumps(facts))
    barrier()  # leave together, then close the process group
    shutdown()


def tensor_peaks(profiler, trace: Path) -> dict[str, int]:
    """The peak of live CPU tensor bytes while loading and while training, from the profiler's memory events."""
    events, timeline = memory_events(profiler, trace)
    load = next(e for e in events if e.get("name") == "bench.load")
    end_of_load = load["ts"] + load["dur"]
    peaks = {"load": 0, "train": 0}
    for ts, total in timeline:
        phase = "load" if ts <= end_of_load else "train"
        peaks[phase] = max(peaks[phase], total)
    return peaks


# --- the comparison ---------------------------------------------------------------------------------------


def launch(
    method: str, processes: int, out: Path, steps: int, batch_size: int, profiled: bool, mmap_threshold: int | None
) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // processes)}
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    head = [sys.executable] if processes == 1 else [str(Path(sys.executable).with_name("torchrun")),
                                                     "--standalone", "--nproc-per-node", str(processes)]  # fmt: skip
    args = [str(HERE), "--worker", method, str(out), str(steps), str(batch_size), "1" if profiled else "0"]
    done = subprocess.run([*head, *args], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{method} on {processes} process(es) failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    if not profiled:
        metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        for facts in ranks:
            facts["losses"] = [r["loss"] for r in metrics if "loss" in r]
            facts["tok_s"] = statistics.median(r["tok_s"] for r in metrics[2:] if "tok_s" in r)
    return ranks


def summarize(timed: list[dict], profiled: list[dict]) -> dict:
    """The largest over the processes of each figure (per process)."""

    def most(get):
        return max(get(f) for f in timed)

    return {
        "rss_load": most(lambda f: f["rss"]["load"]["rss"]),
        "anon_load": most(lambda f: f["rss"]["load"]["anonymous"]),
        "rss_train": most(lambda f: f["rss"]["train"]["rss"]),
        "anon_train": most(lambda f: f["rss"]["train"]["anonymous"]),
        "rss_before_load": most(lambda f: f["rss_before_load"]["rss"]),
        "anon_before_load": most(lambda f: f["rss_before_load"]["anonymous"]),
        "base_bytes": most(lambda f: f["base_bytes"]),
        "base_bytes_whole": timed[0]["base_bytes_whole"],
        "tensor_peak_load": max(f["tensor_peak"]["load"] for f in profiled),
        "tensor_peak_train": max(f["tensor_peak"]["train"] for f in profiled),
        "save_seconds": most(lambda f: f["save_seconds"]),
        "tok_s": timed[0]["tok_s"],
        "losses": timed[0]["losses"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="qlora,qalora")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="runs/bench-fsdp")
    parser.add_argument("--mmap-threshold", type=int, default=None, help="MALLOC_MMAP_THRESHOLD_ for every run")
    parser.add_argument("--worker", nargs=5, metavar=("METHOD", "OUT", "STEPS", "BATCH", "PROFILED"))
    args = parser.parse_args()
    if args.worker:
        method, out, steps, batch, profiled = args.worker
        worker(method, Path(out), int(steps), int(batch), profiled == "1")
        return

    from loraq.product.plan import plan_memory

    results = {}
    for method in args.methods.split(","):
        for processes in (1, 2):
            out = Path(args.out) / f"{method}-{processes}"
            timed = launch(method, processes, out / "timed", args.steps, args.batch_size, False, args.mmap_threshold)
            profiled = launch(method, processes, out / "profiled", 2, args.batch_size, True, args.mmap_threshold)
            plan = plan_memory("smollm2-135m", method, args.batch_size, 256, world_size=processes)
            results[f"{method}, {processes}"] = {
                **summarize(timed, profiled), "plan_peak": plan.on_device, "plan_load": plan.load_host,
                "plan_weights": plan.weights,
            }  # fmt: skip
            print(f"{method} on {processes}: {json.dumps(results[f'{method}, {processes}'])}", flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    target = RESULTS.with_name("fsdp-mmap.json") if args.mmap_threshold else RESULTS
    summary = {"steps": args.steps, "batch_size": args.batch_size, "mmap_threshold": args.mmap_threshold}
    target.write_text(json.dumps({**summary, "results": results}, indent=1))
    print(table(results, args.methods.split(",")))


def table(results: dict, methods: list[str]) -> str:
    rows = [
        ("base held per process (MiB)", "base_bytes"),
        ("RSS before loading (MiB)", "rss_before_load"),
        ("  of it anonymous (MiB)", "anon_before_load"),
        ("peak RSS at load (MiB)", "rss_load"),
        ("  of it anonymous (MiB)", "anon_load"),
        ("peak RSS in training (MiB)", "rss_train"),
        ("  of it anonymous (MiB)", "anon_train"),
        ("tensor peak at load (MiB, profiler)", "tensor_peak_load"),
        ("tensor peak in training (MiB, profiler)", "tensor_peak_train"),
        ("plan: estimated peak (MiB)", "plan_peak"),
        ("tokens/s (all processes)", "tok_s"),
        ("final gather and save (s)", "save_seconds"),
    ]
    lines = []
    for method in methods:
        one, two = results[f"{method}, 1"], results[f"{method}, 2"]
        diff = max(abs(a - b) / abs(a) for a, b in zip(one["losses"], two["losses"]))
        lines += [f"\n{method}: max per-step loss difference, relative: {diff:.1e}",
                  "| | 1 process | 2 processes, each | ratio |", "|---|---|---|---|"]  # fmt: skip
        for label, key in rows:
            scale = 1 if key in ("tok_s", "save_seconds") else MB
            a, b = one[key] / scale, two[key] / scale
            lines.append(f"| {label} | {a:,.1f} | {b:,.1f} | {b / a:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
