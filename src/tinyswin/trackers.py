"""Experiment trackers: Weights & Biases and MLflow, fed by the run directory (`tinyswin.rundir.RunDir`).

    log.wandb=true   the extra [wandb]; honours WANDB_MODE=offline (and WANDB_DIR, WANDB_PROJECT ...)
    log.mlflow=true  the extra [mlflow]; MLFLOW_TRACKING_URI, or MLflow's own default store

Each tracker's run is named after the run directory and logs the expanded config, every epoch's metrics (the
epoch as the step), the summary and the plots. The id of the tracker's run is kept in `RUN_DIR/trackers.json`,
so a resumed training continues the same tracker run. A tracker that fails (not installed, no network, bad
credentials, a full disk) is one warning, and the training goes on without it: nothing here ever stops a run.
Only the process that writes the run directory (rank 0) makes a `Trackers`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from tinyswin.errors import one_line
from tinyswin.extras import require

LogFn = Callable[[str], None]
STATE_FILE = "trackers.json"
MLFLOW_BATCH = 100  # MLflow's limit of params (and of metrics) in one log_batch call
MLFLOW_VALUE_CHARS = 6000  # MLflow's limit on a param's value


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {dotted key: value} (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def numbers(record: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, float]:
    """The numeric entries of a flat record (no bools, no nested values), as floats."""
    left_out = set(skip)
    return {
        key: float(value)
        for key, value in record.items()
        if key not in left_out and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class Tracker(Protocol):
    """One tracker's run, as `Trackers` calls it (a call may raise: `Trackers` turns that into a warning)."""

    name: str

    def start(self, run_name: str, config: dict[str, Any], state: dict[str, Any] | None) -> dict[str, Any]:
        """Open a new run, or continue the one `state` (returned by an earlier start) names; returns the
        state to keep for a resume."""
        ...

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """One epoch's numeric metrics, at step `epoch`."""
        ...

    def log_summary(self, summary: dict[str, float], files: list[Path]) -> None:
        """The final numbers and the files to keep (plots, config.yaml, summary.json)."""
        ...

    def end(self, finished: bool) -> None:
        """Close the run: finished, or stopped (a resume may continue it)."""
        ...


class WandbTracker:
    """Weights & Biases through `wandb.init(id=..., resume="allow")`; the epoch is every metric's x axis."""

    name = "wandb"

    def __init__(self, project: str, run_dir: Path) -> None:
        self.wandb = require("wandb", "wandb", "log.wandb=true")
        self.project = project
        self.run_dir = run_dir
        self.run: Any = None

    def start(self, run_name: str, config: dict[str, Any], state: dict[str, Any] | None) -> dict[str, Any]:
        run_id = state.get("id") if state else None
        self.run = self.wandb.init(
            project=os.environ.get("WANDB_PROJECT", self.project),
            name=run_name,
            id=run_id,
            resume="allow",
            config=config,
        )
        if run_id is not None:
            self.run.config.update(config, allow_val_change=True)  # keys changed on resume
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")
        return {"id": self.run.id, "project": self.run.project}

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.run.log({"epoch": epoch, **metrics})

    def log_summary(self, summary: dict[str, float], files: list[Path]) -> None:
        for key, value in summary.items():
            self.run.summary[key] = value
        images = {f"plots/{p.stem}": self.wandb.Image(str(p)) for p in files if p.suffix == ".png"}
        if images:
            self.run.log(images)

    def end(self, finished: bool) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.finish(exit_code=0 if finished else 1)


class MlflowTracker:
    """MLflow through `MlflowClient` (no global active run): params once, metrics per epoch, files as
    artifacts."""

    name = "mlflow"

    def __init__(self, project: str, run_dir: Path) -> None:
        tracking = require("mlflow.tracking", "mlflow", "log.mlflow=true")
        self.entities = require("mlflow.entities", "mlflow", "log.mlflow=true")
        self.client = tracking.MlflowClient()  # MLFLOW_TRACKING_URI, or MLflow's default store
        self.project = project
        self.run_dir = run_dir
        self.run_id: str | None = None

    def start(self, run_name: str, config: dict[str, Any], state: dict[str, Any] | None) -> dict[str, Any]:
        if state and state.get("run_id"):
            self.run_id = str(state["run_id"])
            self.client.update_run(self.run_id, status="RUNNING")  # params were logged when it began
        else:
            experiment = self.client.get_experiment_by_name(self.project)
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(self.project)
            )
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            params = [
                self.entities.Param(key, json.dumps(value)[:MLFLOW_VALUE_CHARS])
                for key, value in flatten(config).items()
            ]
            for i in range(0, len(params), MLFLOW_BATCH):
                self.client.log_batch(self.run_id, params=params[i : i + MLFLOW_BATCH])
        return {"run_id": self.run_id, "tracking_uri": self.client.tracking_uri}

    def _metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self.entities.Metric(key, value, now, step) for key, value in values.items()]
        for i in range(0, len(metrics), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + MLFLOW_BATCH])

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._metrics(metrics, epoch)

    def log_summary(self, summary: dict[str, float], files: list[Path]) -> None:
        self._metrics({f"summary.{key}": value for key, value in summary.items()}, 0)
        for path in files:
            self.client.log_artifact(self.run_id, str(path), "plots" if path.suffix == ".png" else None)

    def end(self, finished: bool) -> None:
        run_id, self.run_id = self.run_id, None
        if run_id is not None:
            self.client.set_terminated(run_id, "FINISHED" if finished else "KILLED")


TRACKERS: dict[str, Callable[[str, Path], Tracker]] = {"wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The trackers a run's config turns on, each guarded: the first error of a tracker is one warning and
    that tracker is dropped for the rest of the run.

    Args:
        run_dir: the run directory (its name names the tracker runs; trackers.json keeps their ids).
        names: the trackers to open ('wandb', 'mlflow').
        project: the W&B project and the MLflow experiment.
        say: where the warnings go.
    """

    def __init__(self, run_dir: Path, names: Iterable[str], project: str, say: LogFn) -> None:
        self.run_dir = run_dir
        self.say = say
        self.active: dict[str, Tracker] = {}
        for name in names:
            self._guard(
                name, lambda name=name: self.active.__setitem__(name, TRACKERS[name](project, run_dir))
            )

    @classmethod
    def from_config(cls, run_dir: Path, log: Any, say: LogFn) -> Trackers:
        """The trackers that a config's `log` section (`config.LogConfig`) turns on."""
        return cls(run_dir, [name for name in TRACKERS if getattr(log, name)], log.project, say)

    def _guard(self, name: str, call: Callable[[], Any]) -> None:
        """Run `call`; on an error, warn once and drop tracker `name`."""
        try:
            call()
        except Exception as exc:  # a tracker must never stop the training
            self.active.pop(name, None)
            self.say(f"warning: {name} logging failed ({one_line(exc)}); the training goes on without it")

    def _state(self) -> dict[str, Any]:
        path = self.run_dir / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def start(
        self, config: dict[str, Any], history: list[dict[str, Any]], write: Callable[..., None]
    ) -> None:
        """Open (or continue) every tracker's run; a new tracker run of a resumed training gets the epochs
        logged so far. `write(path, text)` writes trackers.json atomically."""
        if not self.active:
            return
        state = self._state()
        for name, tracker in list(self.active.items()):
            before = state.get(name)

            def begin(tracker: Tracker = tracker, name: str = name, before: Any = before) -> None:
                state[name] = tracker.start(self.run_dir.name, config, before)
                if before is None:
                    for record in history:
                        tracker.log_epoch(int(record["epoch"]), numbers(record, skip=("epoch",)))

            self._guard(name, begin)
        write(self.run_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """One line of metrics.jsonl."""
        metrics = numbers(record, skip=("epoch",))
        for name, tracker in list(self.active.items()):
            self._guard(name, lambda t=tracker: t.log_epoch(int(record["epoch"]), metrics))

    def finish(self, summary: Mapping[str, Any], files: list[Path]) -> None:
        """The summary's top-level numbers and the files, then close every run as finished."""
        values = numbers(summary)
        for name, tracker in list(self.active.items()):
            self._guard(name, lambda t=tracker: t.log_summary(values, files))
        self.close(finished=True)

    def close(self, finished: bool = False) -> None:
        """Close every run (not `finished`: stopped, to be continued by a resume); calling it again does
        nothing."""
        for name, tracker in list(self.active.items()):
            self._guard(name, lambda t=tracker: t.end(finished))
        self.active = {}
