"""Plots of a run (loss, accuracy, learning rate) from `RUN_DIR/metrics.jsonl`, as PNG files.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend state).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tinyswin.optim import lr_at_step


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` file, one dict per line (a torn last line is ignored)."""
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike[str],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logy: bool = False,
) -> Path:
    """One PNG with a line per entry of `series` (label -> (x values, y values)); empty series are skipped."""
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o" if len(pts) < 30 else None,
                markersize=3,
                label=label,
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.91)  # fixed: tight_layout costs more
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _column(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float | None]]:
    return [r["epoch"] for r in records], [r.get(key) for r in records]


def plot_run(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Draw `plots/loss.png`, `plots/accuracy.png` and `plots/lr.png` of a run directory.

    Raises:
        FileNotFoundError: the run directory has no metrics.jsonl.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in run directory {run_dir}")
    records = read_metrics(metrics)
    out = run_dir / "plots"
    keys = set().union(*records) if records else set()

    def cols(names: dict[str, str]) -> dict[str, tuple[list[float], list[float | None]]]:
        return {label: _column(records, key) for key, label in names.items() if key in keys}

    loss = cols(
        {"train_loss": "train", "val_loss": "val", "holdout_loss": "holdout", "ema_val_loss": "val (EMA)"}
    )
    acc = cols(
        {
            "val_top1": "val top-1",
            "val_top5": "val top-5",
            "holdout_top1": "holdout top-1",
            "ema_val_top1": "val top-1 (EMA)",
        }
    )
    acc = {k: (x, [None if v is None else 100.0 * v for v in y]) for k, (x, y) in acc.items()}
    return [
        plot_curves(loss, out / "loss.png", xlabel="epoch", ylabel="loss", title="Loss"),
        plot_curves(acc, out / "accuracy.png", xlabel="epoch", ylabel="accuracy (%)", title="Accuracy"),
        plot_curves(
            {**schedule_curve(records), **cols({"lr": "at the end of each epoch"})},
            out / "lr.png",
            xlabel="epoch",
            ylabel="learning rate",
            title="Learning rate",
        ),
    ]


def schedule_curve(records: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """The learning rate of every step (at most ~500 points), as the scheduler set it: each schedule the run
    followed over the steps it held, then the last one to its planned end (empty without a recorded schedule).

    Returns:
        {"schedule (per step)": (epochs, learning rates)}.
    """
    recorded = [r["lr_schedule"] for r in records if "lr_schedule" in r]
    if not recorded:
        return {}
    schedule = recorded[-1]
    iters = schedule["iters_per_epoch"]
    planned = int(schedule["segments"][-1]["epochs"] * iters)
    total = max(planned, int(records[-1]["step"]))
    stride = max(1, total // 500)
    steps = list(range(0, total + 1, stride))
    rates = [
        lr_at_step(
            step,
            schedule["segments"],
            peak_lr=schedule["peak_lr"],
            iters_per_epoch=iters,
            warmup_start=schedule["warmup_start"],
            min_lr=schedule["min_lr"],
        )
        for step in steps
    ]
    return {"schedule (per step)": ([step / iters for step in steps], rates)}
