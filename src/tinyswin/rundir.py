"""The files of a run: config, metrics, checkpoints, plots, TensorBoard events and the summary.

    RUN_DIR/config.yaml     every key of the run's config (the model and augmentation spelled out)
    RUN_DIR/metrics.jsonl   one JSON record per epoch (the evaluation's numbers on the epochs evaluated)
    RUN_DIR/last.pt         the checkpoint of the last epoch written (what --resume continues from): every
                            `checkpoint.every_epochs` epochs / `checkpoint.every_seconds` seconds, after the
                            last epoch and when a run stops
    RUN_DIR/best.pt         the best epoch on the selection split, without optimizer state (eval, predict)
    RUN_DIR/plots/          loss, accuracy and learning rate, redrawn as the run goes (`plots: epoch`) or
                            drawn when it ends or stops (`plots: end`)
    RUN_DIR/tensorboard/    event files, when TensorBoard is installed and `tensorboard` is on
    RUN_DIR/summary.json    the final numbers
    RUN_DIR/trackers.json   the runs of the experiment trackers (`log.wandb`, `log.mlflow`), for a resume
    RUN_DIR/.lock           the OS file lock of the training that owns the directory (.lock.pid: its pid)

One training owns a run directory at a time: `RunDir.open` takes its lock (`runlock.RunLock`) and refuses a
directory that another training holds, a directory that is not a run, a new run over an old one, and a resume
with nothing to resume, before it writes anything.
Every file goes through an atomic write (temporary file, fsync, rename), so a kill or a full disk leaves each
file whole: the old version or the new one. Only rank 0 locks and writes: a `RunDir` with `main=False`
writes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from tinyswin.checkpoint import (
    atomic_save,
    clone_tree,
    inference_checkpoint,
    load_checkpoint,
    write_text_atomic,
)
from tinyswin.config import TrainConfig, to_dict, to_yaml
from tinyswin.errors import disk_full_cause, disk_full_error, disk_full_reason
from tinyswin.evaluate import EvalResult
from tinyswin.plots import plot_run
from tinyswin.runlock import RunLock, check_usable, inspect_dir
from tinyswin.runstate import LoopState
from tinyswin.trackers import Trackers

LogFn = Callable[[str], None]

CHECKPOINT_MARGIN = 1.1  # free space wanted before a checkpoint write, in sizes of the previous checkpoint


def _tensorboard(run_dir: Path, enabled: bool, say: LogFn) -> Any:
    """A TensorBoard writer into `run_dir/tensorboard` when `enabled` (None, said in a line, without the
    optional tensorboard package)."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        say("tensorboard=true, but the tensorboard package is not installed: pip install tensorboard")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _add_scalars(writer: Any, record: dict[str, Any]) -> None:
    """An epoch's numbers as TensorBoard scalars at step `epoch`, flushed."""
    for key, value in record.items():
        if isinstance(value, (int, float)) and key != "epoch":
            writer.add_scalar(key, value, record["epoch"])
    writer.flush()


def _size(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class CheckpointFiles:
    """last.pt and best.pt of a run: an epoch's checkpoints are written when due (best.pt first), else kept in
    memory until the next write; a write is refused early when the disk clearly lacks the room.

    Args:
        folder: the run directory.
        guard: `guard(path)` turns running out of space while writing `path` into the run's one line.
    """

    def __init__(self, folder: Path, guard: Callable[[Path], AbstractContextManager[None]]) -> None:
        self.folder = folder
        self.last = folder / "last.pt"
        self.best = folder / "best.pt"
        self.epoch: int | None = None  # the epoch of the last.pt on disk, if any
        self._guard = guard
        self._pending: dict[str, dict[str, Any]] = {}  # best.pt / last.pt of epochs not written yet

    def advice(self) -> str:
        """What to do after the disk ran out, given what last.pt holds."""
        if self.epoch is None:
            return "free some space, then start it again with --resume (no epoch was checkpointed yet)"
        return f"free some space, then resume with --resume (last.pt of epoch {self.epoch} is intact)"

    def load(self) -> dict[str, Any] | None:
        """last.pt as it is on disk (its epoch noted), or None when there is none yet.

        Raises:
            ValueError: last.pt is not a readable tinyswin checkpoint.
        """
        if not self.last.exists():
            return None
        ckpt = load_checkpoint(self.last)
        self.epoch = ckpt.get("epoch")
        return ckpt

    def keep(self, ckpt: dict[str, Any], improved: bool) -> None:
        """An epoch's checkpoint as the next last.pt, and (if `improved`) its inference part as best.pt."""
        if improved:
            self._pending["best"] = inference_checkpoint(ckpt)
        self._pending["last"] = ckpt

    def flush(self) -> None:
        """Write the checkpoints kept since the last write: best.pt, then last.pt."""
        pending, self._pending = self._pending, {}  # a failed write is not tried again by a later one
        if "best" in pending:
            self._save(pending["best"], self.best)
        if "last" in pending:
            self._save(pending["last"], self.last)
            self.epoch = pending["last"].get("epoch")

    def _check_space(self, path: Path) -> None:
        """Refuse a checkpoint write early when the free space is clearly less than a checkpoint's size."""
        sizes = [p.stat().st_size for p in (self.last, self.best) if p.exists()]
        if not sizes:
            return
        needed = CHECKPOINT_MARGIN * max(sizes)
        free = shutil.disk_usage(self.folder).free
        if free < needed:
            raise disk_full_error(
                f"disk full while writing {path} (about {_size(needed)} needed, {_size(free)} free): "
                f"{self.advice()}"
            )

    def _save(self, ckpt: dict[str, Any], path: Path) -> None:
        self._check_space(path)
        with self._guard(path):
            atomic_save(ckpt, path)


class RunDir:
    """The run directory of one training run; also a context manager that `close`s it on exit.

    Args:
        path: the folder (created by `open` for a new run).
        main: this process locks and writes (rank 0); other ranks only read.
        say: where messages go.
        on_epoch: called with each epoch's record once its files are written (rank 0); what it raises
            stops the training (e.g. a study pruning a trial).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        main: bool,
        say: LogFn,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.path, self.main, self.say, self.on_epoch = Path(path), main, say, on_epoch
        self.checkpoints = CheckpointFiles(self.path, self._guard)
        self.last, self.best = self.checkpoints.last, self.checkpoints.best
        self.metrics = self.path / "metrics.jsonl"
        self.writer: Any = None
        self.trackers: Trackers | None = None  # W&B / MLflow, when the config turns them on
        self._lock = RunLock(self.path, self._guard)  # taken by `open` (rank 0), released by `close`
        self._metric_lines: list[str] = []
        self._plotted_at, self._plot_seconds = 0.0, 0.0  # when the plots were last drawn, how long it took

    def __enter__(self) -> RunDir:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def locked(self) -> bool:
        """This process holds the directory's lock."""
        return self._lock.locked

    def open(self, resume: bool) -> dict[str, Any] | None:
        """Check the directory, take its lock (rank 0), and return the checkpoint to resume from.

        Nothing is written in a directory that is refused. Rank 0 creates the folder (new run), takes the
        lock, records its pid in .lock.pid, and removes temporary files left by killed writes.

        Args:
            resume: continue the run in the directory (from its last.pt) instead of starting a new one.

        Returns:
            The last.pt checkpoint when `resume` and the run has one; None for a new run, and for a resumed
            run that was stopped before its first checkpoint (which then starts from the beginning, and says
            so).

        Raises:
            RunDirError: another training holds the directory (naming its pid); `--out` is a file; the
                directory is not empty and not a run; a new run over an existing run; `resume` with nothing
                to resume (no such directory, an empty one, or not a run).
            DiskFullError: no space to create the lock's files.
            ValueError: last.pt is not a readable tinyswin checkpoint.
        """
        check_usable(self.path, inspect_dir(self.path), resume)
        if self.main:
            self._lock.acquire(resume)
        try:
            ckpt = self.checkpoints.load() if resume else None
        except BaseException:
            self._lock.release(undo=True)
            raise
        if resume and ckpt is None and self.main:
            self.say(f"no checkpoint in {self.path} yet: starting from the beginning (nothing was lost)")
        return ckpt

    def close(self) -> None:
        """Close the TensorBoard writer and release the directory's lock; calling it again does nothing."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()
        if self.trackers is not None:
            trackers, self.trackers = self.trackers, None
            trackers.close(finished=False)
        self._lock.release(undo=False)

    @contextmanager
    def _guard(self, path: Path) -> Iterator[None]:
        """Turn running out of space while writing `path` into one DiskFullError line that says what to do."""
        try:
            yield
        except Exception as exc:
            cause = disk_full_cause(exc)
            if cause is None:
                raise
            message = (
                f"disk full while writing {path} ({disk_full_reason(cause)}): {self.checkpoints.advice()}"
            )
            raise disk_full_error(message, cause) from exc

    def _write_metrics(self, lines: list[str]) -> None:
        with self._guard(self.metrics):
            write_text_atomic(self.metrics, "".join(lines))
        self._metric_lines = lines

    def start(self, cfg: TrainConfig, history: list[dict[str, Any]]) -> None:
        """Write config.yaml and the metrics so far (those of the checkpoint resumed from); open the
        TensorBoard writer."""
        if not self.main:
            return
        self.write_config(cfg)
        self._write_metrics([json.dumps(r) + "\n" for r in history])
        self.writer = _tensorboard(self.path, cfg.tensorboard, self.say)
        self.trackers = Trackers.from_config(self.path, cfg.log, self.say)
        self.trackers.start(to_dict(cfg), history, write_text_atomic)

    def write_config(self, cfg: TrainConfig) -> None:
        """config.yaml: the config as it stands (a time budget's plan changes its schedule)."""
        if self.main:
            path = self.path / "config.yaml"
            with self._guard(path):
                write_text_atomic(path, to_yaml(cfg))

    def end_epoch(
        self,
        record: dict[str, Any],
        improved: bool,
        checkpoint: Callable[[], dict[str, Any]],
        due: bool = True,
        plot: bool = True,
    ) -> None:
        """Write the epoch's files, in an order that keeps `--resume` right if any write fails: best.pt (if
        `improved`, or a best epoch kept since the last write), last.pt (if `due`), metrics.jsonl (rewritten
        whole, atomically), then the plots (if `plot`, when redrawing costs at most ~10% of the time) and
        TensorBoard.

        best.pt goes before last.pt: if last.pt then fails, the resumed run redoes this epoch and writes
        best.pt again; the other way round, a failed best.pt would stay older than the best epoch last.pt
        records. best.pt leaves out the optimizer state (`checkpoint.inference_checkpoint`). An epoch that is
        not `due` writes only metrics.jsonl and keeps its checkpoints in memory (tensors cloned) until the
        next write or `flush`; a resumed run rewrites metrics.jsonl from last.pt and redoes the later epochs.

        Raises:
            DiskFullError: the disk ran out; the files written before are whole and `--resume` continues.
        """
        if not self.main:
            return
        self.checkpoints.keep(checkpoint() if due else clone_tree(checkpoint()), improved)
        if due:
            self.flush()
        self._write_metrics([*self._metric_lines, json.dumps(record) + "\n"])
        if plot and time.perf_counter() - self._plotted_at >= 10 * self._plot_seconds:
            self.plot()
        if self.writer is not None:
            _add_scalars(self.writer, record)
        if self.trackers is not None:
            self.trackers.log_epoch(record)
        if self.on_epoch is not None:
            self.on_epoch(record)

    def plot(self) -> None:
        """Draw the plots from metrics.jsonl now (rank 0)."""
        if not self.main:
            return
        start = time.perf_counter()
        with self._guard(self.path / "plots"):
            plot_run(self.path)
        self._plotted_at = time.perf_counter()
        self._plot_seconds = self._plotted_at - start

    def flush(self) -> None:
        """Write the checkpoints kept in memory since the last write: best.pt, then last.pt (a run that stops
        early calls it so that no finished epoch is lost)."""
        if self.main:
            self.checkpoints.flush()

    def finish(self, cfg: TrainConfig, summary: dict[str, Any], plot: bool) -> None:
        """Close TensorBoard, draw the plots (if any epoch ran), write config.yaml and summary.json, say
        where everything is, and release the directory (`close`)."""
        if not self.main:
            return
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()
        if plot:
            self.plot()
        self.write_config(cfg)
        path = self.path / "summary.json"
        with self._guard(path):
            write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
        if self.trackers is not None:
            files = [*sorted((self.path / "plots").glob("*.png")), self.path / "config.yaml", path]
            trackers, self.trackers = self.trackers, None
            trackers.finish(summary, files)
        for line in done_lines(summary, self.path):
            self.say(line)
        self.close()


def done_lines(summary: dict[str, Any], run_dir: Path) -> list[str]:
    """The lines said when a run is done: its numbers, and where its files are."""
    best = summary["best_split"]
    return [
        f"done: {best} top-1 {100 * summary[f'{best}_top1']:.2f}% (best "
        f"{100 * summary['best_top1']:.2f}% at epoch {summary['best_epoch']}), "
        f"{summary['images_per_s']:.0f} img/s, {summary['train_seconds']:.0f} s",
        f"run directory: {run_dir}",
        f"checkpoints:   {run_dir / 'last.pt'}  {run_dir / 'best.pt'}",
        f"plots:         {run_dir / 'plots'}",
        f"summary:       {run_dir / 'summary.json'}",
    ]


def checkpoint_due(
    every_epochs: int | None, every_seconds: float | None, epochs_since: int, seconds_since: float
) -> bool:
    """Whether last.pt (or an evaluation) is due after an epoch: `every_epochs` epochs or `every_seconds`
    seconds have passed since the previous one (whichever comes first; None turns a rule off)."""
    by_epochs = every_epochs is not None and epochs_since >= every_epochs
    return by_epochs or (every_seconds is not None and seconds_since >= every_seconds)


def format_epoch(record: dict[str, Any], splits: list[str], epochs: int) -> str:
    """The one line printed after an epoch."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"train loss {record['train_loss']:.4f}"]
    for split in splits:
        if f"{split}_top1" not in record:  # not evaluated after this epoch (`evaluation.every_*`)
            continue
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
        "compile_seconds": state.compile_seconds,
        "nonfinite_steps": state.nonfinite_total,
        "resumed_at_epoch": resumed_at or None,
        "time_budget": state.plan,
    }
    for split in splits:
        r = results[split]
        summary |= {f"{split}_top1": r.top1, f"{split}_top5": r.top5, f"{split}_loss": r.loss}
        if r.plain is not None:  # test-time augmentation: the final model's numbers without it too
            summary |= {f"{split}_top1_no_tta": r.plain.top1, f"{split}_top5_no_tta": r.plain.top5}
    summary["tta"] = results[splits[0]].tta
    if history:
        for key, value in history[-1].items():
            if key.startswith("ema_"):
                summary[key] = value
    detail = "val" if "val" in results else splits[0]
    summary[f"{detail}_details"] = results[detail].summary(class_names)
    summary["ece"] = summary[f"{detail}_details"]["ece"]
    return summary
