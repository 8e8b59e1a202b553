"""`loraq compare`: one table across run folders (from their config.json and summary.json) and a bar chart
of their best validation losses."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LoraqError

COLUMNS = ("run", "method", "steps", "best val loss", "minutes", "tokens/s", "peak RSS MB")


def compare_runs(runs: list[str | os.PathLike], chart: str | os.PathLike | None = None) -> list[dict]:
    """Rows describing each finished run; with `chart`, a PNG bar chart of best validation loss.

    Raises:
        LoraqError: a folder is not a finished run (no summary.json).
    """
    from ..quant.schemes import scheme_for
    from .run_folder import RunFolder

    rows = []
    for path in runs:
        run = RunFolder(path)
        if not (run.started and run.summary_path.is_file()):
            raise LoraqError(f"{run.path}: not a finished run folder (needs config.json and summary.json)")
        config, summary = run.read_config(), run.read_summary()
        seconds = summary.get("wall_seconds") or 0
        scheme = scheme_for(config.lora)
        rows.append(
            {
                "run": str(run.path),
                "method": config.method + (f" {scheme.storage}" if scheme.quantized else ""),
                "steps": summary.get("steps"),
                "best val loss": summary.get("best_val_loss"),
                "minutes": round(seconds / 60, 2),
                "tokens/s": round(summary.get("tokens_seen", 0) / seconds) if seconds else None,
                "peak RSS MB": summary.get("peak_rss_mb"),
            }
        )
    if chart:
        _bar_chart(rows, Path(chart))
    return rows


def format_table(rows: list[dict]) -> str:
    cells = [[str(r[c]) if not isinstance(r[c], float) else f"{r[c]:.4f}" for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _bar_chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows) + 2), 4), dpi=110)
    labels = [Path(r["run"]).name + f"\n{r['method']}" for r in rows]
    values = [r["best val loss"] or 0 for r in rows]
    ax.bar(labels, values, color="#4c72b0")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom")
    ax.set_ylabel("best validation loss")
    save_figure(fig, path)
