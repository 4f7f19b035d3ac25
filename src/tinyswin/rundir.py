"""The files of a run: config, metrics, checkpoints, plots, TensorBoard events and the summary.

    RUN_DIR/config.yaml     every key of the run's config (the model and augmentation spelled out)
    RUN_DIR/metrics.jsonl   one JSON record per epoch
    RUN_DIR/last.pt         the checkpoint after the last epoch (what --resume continues from)
    RUN_DIR/best.pt         the checkpoint of the best epoch on the selection split
    RUN_DIR/plots/          loss, accuracy and learning rate, redrawn as the run goes
    RUN_DIR/tensorboard/    event files, when TensorBoard is installed and `tensorboard` is on
    RUN_DIR/summary.json    the final numbers

Only rank 0 writes: a `RunDir` with `main=False` writes nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinyswin.checkpoint import atomic_save, load_checkpoint, remove_stale_temps
from tinyswin.config import TrainConfig, to_yaml
from tinyswin.engine import LoopState
from tinyswin.evaluate import EvalResult
from tinyswin.plots import plot_run

LogFn = Callable[[str], None]


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tensorboard(run_dir: Path, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


class RunDir:
    """The run directory of one training run.

    Args:
        path: the folder (created).
        main: this process writes (rank 0); other ranks only read.
        say: where messages go.
    """

    def __init__(self, path: str | os.PathLike[str], *, main: bool, say: LogFn) -> None:
        self.path = Path(path)
        self.main = main
        self.say = say
        self.last = self.path / "last.pt"
        self.best = self.path / "best.pt"
        self.metrics = self.path / "metrics.jsonl"
        self.writer: Any = None
        self._plotted_at = 0.0  # when the plots were last drawn ...
        self._plot_seconds = 0.0  # ... and how long that took

    def open(self, resume: bool) -> dict[str, Any] | None:
        """Create the folder (rank 0) and return the checkpoint to resume from, if `resume`.

        Raises:
            ValueError: a run is there already and `resume` is False.
            FileNotFoundError: `resume` and there is no last.pt.
        """
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.path)
        if not resume and self.last.exists():
            raise ValueError(
                f"{self.path} already holds a run (last.pt): resume it with --resume or pick another --out"
            )
        if resume and not self.last.exists():
            raise FileNotFoundError(f"nothing to resume: {self.last} does not exist")
        return load_checkpoint(self.last) if resume else None

    def start(self, cfg: TrainConfig, history: list[dict[str, Any]]) -> None:
        """Write config.yaml and the metrics so far; open the TensorBoard writer."""
        if not self.main:
            return
        self.write_config(cfg)
        self.metrics.write_text("".join(json.dumps(r) + "\n" for r in history))
        self.writer = _tensorboard(self.path, cfg.tensorboard)

    def write_config(self, cfg: TrainConfig) -> None:
        """config.yaml: the config as it stands (a time budget's plan changes its schedule)."""
        if self.main:
            write_text_atomic(self.path / "config.yaml", to_yaml(cfg))

    def end_epoch(
        self, record: dict[str, Any], improved: bool, checkpoint: Callable[[], dict[str, Any]]
    ) -> None:
        """Append the epoch's record, write last.pt (and best.pt if `improved`), redraw the plots when that
        costs at most ~10% of the time, and log to TensorBoard."""
        if not self.main:
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        ckpt = checkpoint()
        if improved:
            atomic_save(ckpt, self.best)
        atomic_save(ckpt, self.last)
        if time.perf_counter() - self._plotted_at >= 10 * self._plot_seconds:
            start = time.perf_counter()
            plot_run(self.path)
            self._plotted_at = time.perf_counter()
            self._plot_seconds = self._plotted_at - start
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def finish(self, cfg: TrainConfig, summary: dict[str, Any], plot: bool) -> None:
        """Close TensorBoard, draw the plots (if any epoch ran), write config.yaml and summary.json, and say
        where everything is."""
        if not self.main:
            return
        if self.writer is not None:
            self.writer.close()
        if plot:
            plot_run(self.path)
        self.write_config(cfg)
        write_text_atomic(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")
        best = summary["best_split"]
        self.say(
            f"done: {best} top-1 {100 * summary[f'{best}_top1']:.2f}% (best "
            f"{100 * summary['best_top1']:.2f}% at epoch {summary['best_epoch']}), "
            f"{summary['images_per_s']:.0f} img/s, {summary['train_seconds']:.0f} s"
        )
        self.say(f"run directory: {self.path}")
        self.say(f"checkpoints:   {self.last}  {self.best}")
        self.say(f"plots:         {self.path / 'plots'}")
        self.say(f"summary:       {self.path / 'summary.json'}")


def format_epoch(record: dict[str, Any], splits: list[str], epochs: int) -> str:
    """The one line printed after an epoch."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"train loss {record['train_loss']:.4f}"]
    for split in splits:
        parts.append(
            f"{split} loss {record[f'{split}_loss']:.4f} top-1 {100 * record[f'{split}_top1']:.2f}% "
            f"top-5 {100 * record[f'{split}_top5']:.2f}%"
        )
        if f"ema_{split}_top1" in record:
            parts.append(f"EMA {split} top-1 {100 * record[f'ema_{split}_top1']:.2f}%")
    parts += [f"lr {record['lr']:.3g}", f"{record['images_per_s']:.0f} img/s", f"{record['seconds']:.1f} s"]
    if record.get("nonfinite"):
        parts.append(f"{record['nonfinite']} non-finite steps skipped")
    return "  ".join(parts)


def summarize(
    planned_epochs: int,
    state: LoopState,
    splits: list[str],
    results: dict[str, EvalResult],
    class_names: list[str],
    run_dir: Path,
    resumed_at: int,
) -> dict[str, Any]:
    """summary.json: the last evaluation of every split, the best epoch, speed, time and the budget's plan."""
    history = state.history
    speeds = [r["images_per_s"] for r in history if r.get("images_per_s")]
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "epochs": state.epoch,
        "planned_epochs": planned_epochs,
        "steps": state.step,
        "best_epoch": state.best_epoch,
        "best_top1": state.best_top1,
        "best_split": splits[0],
        "images_per_s": sum(speeds) / len(speeds) if speeds else 0.0,
        "train_seconds": state.train_seconds,
        "nonfinite_steps": state.nonfinite_total,
        "resumed_at_epoch": resumed_at or None,
        "time_budget": state.plan,
    }
    for split in splits:
        r = results[split]
        summary |= {f"{split}_top1": r.top1, f"{split}_top5": r.top5, f"{split}_loss": r.loss}
    if history:
        for key, value in history[-1].items():
            if key.startswith("ema_"):
                summary[key] = value
    detail = "val" if "val" in results else splits[0]
    summary[f"{detail}_details"] = results[detail].summary(class_names)
    summary["ece"] = summary[f"{detail}_details"]["ece"]
    return summary
