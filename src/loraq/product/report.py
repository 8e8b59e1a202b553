"""What a finished run leaves to look at: loss.png (training and validation loss against steps) and
summary.json (best validation loss, wall time, tokens seen, peak memory), also printed."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from ..atomic import atomic_write_text


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summarize(
    metrics: list[dict], seconds: float, host: dict[str, int | None] | None = None, load_seconds: float | None = None
) -> dict:
    val = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    best_step, best = min(val, key=lambda sv: sv[1]) if val else (None, None)
    train = [r for r in metrics if "loss" in r]
    summary = {
        "steps": train[-1]["step"] if train else 0,
        "final_train_loss": train[-1]["loss"] if train else None,
        "val_loss_before": val[0][1] if val else None,
        "best_val_loss": best,
        "best_val_step": best_step,
        "tokens_seen": sum(r.get("tokens", 0) for r in train),
        "wall_seconds": round(seconds, 1),
        "load_seconds": None if load_seconds is None else round(load_seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    for kind, value in (host or {}).items():  # the process's own memory apart from mapped files (host_memory.py)
        if value is not None:
            summary[f"peak_{kind}_mb"] = round(value / 2**20, 1)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        summary["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return summary


def plot_losses(metrics: list[dict], path: Path, title: str = "") -> Path:
    """Training loss (per step) and validation loss (where measured) against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    train = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="training loss", color="#4c72b0", linewidth=1)
    if val:
        ax.plot(*zip(*val), label="validation loss", color="#dd8452", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as a PNG under a temporary name, rename it into place, close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(
    out: Path, seconds: float, host: dict[str, int | None] | None = None, load_seconds: float | None = None
) -> dict:
    """Write loss.png and summary.json for the run folder `out`, print the summary, return it. `host`: peak
    resident bytes by kind ("anonymous": the process's own; "files": mapped files), where measured;
    `load_seconds`: how long the model took to load (quantizing included)."""
    metrics = read_metrics(out / "metrics.jsonl")
    summary = summarize(metrics, seconds, host, load_seconds)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot_losses(metrics, out / "loss.png", title=out.name)
    best = summary["best_val_loss"]
    best_text = "n/a" if best is None else f"{best:.4f} (step {summary['best_val_step']})"
    own = ""
    if "peak_anonymous_mb" in summary:
        own = f" (the process's own {summary['peak_anonymous_mb']:,.0f} MB"
        if "peak_anonymous_load_mb" in summary:
            own += f", {summary['peak_anonymous_load_mb']:,.0f} MB while loading"
        own += f", mapped files up to {summary['peak_files_mb']:,.0f} MB)" if "peak_files_mb" in summary else ")"
    print(
        f"loraq: {summary['steps']} steps, {summary['tokens_seen']:,} tokens, {seconds / 60:.1f} min, peak RSS "
        f"{summary['peak_rss_mb']:.0f} MB{own}; best validation loss {best_text}; {out / 'loss.png'}",
        file=sys.stderr,
    )
    return summary
