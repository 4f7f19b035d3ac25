"""`tinyswin tune SPACE.yaml`: a study of training configs with Optuna (the extra [tune]).

    base config (preset, config file, overrides, budget, data.val_split=holdout)
    -> trial: values drawn for the space's keys -> a normal run directory OUT/trial-NNNN (`train`)
       -> each epoch's holdout top-1 reported to the trial; the pruner may stop it there
    -> the best trial's config as a preset (OUT/best.yaml), its val top-1 measured once, at the end

Trials score on a holdout carved from the training split (`data.val_split=holdout`, `data.holdout=0.1` unless
set), never on val, so the val score of the chosen config stays honest. The study lives in Optuna's storage
(`sqlite:///tune.db` by default): the same command again resumes it, several processes (or machines, on a
database server) on one storage share it, each claiming trials until the study holds `trials` finished ones.
A trial that fails (a non-finite loss, out of memory, a config its values make invalid) is recorded as failed
and the study goes on; a process that is killed leaves a trial whose heartbeat stops, which the next process
marks failed and tries once more; Ctrl-C stops the trial between two steps, records it as failed and exits.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from tinyswin.config import TrainConfig, expand, load_config, merge, to_dict
from tinyswin.data import load_cache
from tinyswin.data.sources import eval_splits, resolve_data
from tinyswin.engine import TrainingError
from tinyswin.errors import ConfigError, RunDirError, TinyswinError, one_line
from tinyswin.evaluate import evaluate_checkpoint
from tinyswin.extras import require
from tinyswin.rundir import write_text_atomic
from tinyswin.train import train
from tinyswin.tune_space import Space, check_space, with_values

LogFn = Callable[[str], None]
DEFAULT_STORAGE = "sqlite:///tune.db"
DEFAULT_HOLDOUT = 0.1
BEST_FILE = "best.yaml"
VAL_ATTR = "best_val"  # study attribute: the val numbers of the best trial, measured once


class TrialFailed(TinyswinError):
    """A trial that could not finish (recorded as failed; the study goes on)."""


@dataclass(frozen=True)
class TuneOptions:
    """What `tinyswin tune` was asked.

    Attributes:
        space: the search space file, read.
        trials: finished trials (complete, pruned or failed) the study should hold.
        storage: Optuna's storage URL.
        study: the study's name (default: the space file's stem).
        out: where the trials' run directories and best.yaml go (default: runs/tune-<study>).
        overrides: key=value for every trial (over the space file's).
        epochs / time_budget: the budget of a trial (over the space file's).
    """

    space: Space
    trials: int = 20
    storage: str = DEFAULT_STORAGE
    study: str | None = None
    out: Path | None = None
    overrides: tuple[str, ...] = ()
    epochs: int | None = None
    time_budget: float | None = None

    @property
    def study_name(self) -> str:
        return self.study or self.space.path.stem

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else Path("runs") / f"tune-{self.study_name}"


@dataclass
class TuneResult:
    """The study as it stands after this process's trials.

    Attributes:
        rows: one dict per trial (number, state, score, epochs, values).
        best: the best complete trial's row, or None.
        val: the best trial's val numbers ({"top1", "top5", "loss", "n"}), or None where not measured.
        preset: the best config's preset file, or None.
        split: the split trials score on.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    val: dict[str, Any] | None = None
    preset: Path | None = None
    split: str = "holdout"


def base_config(options: TuneOptions) -> TrainConfig:
    """The config every trial starts from: the space's preset and file, `data.val_split=holdout`, the
    overrides, the budget; `data.holdout` 0.1 when nothing sets it."""
    space = options.space
    budget = []
    epochs = options.epochs or (space.epochs if options.time_budget is None else None)
    seconds = options.time_budget if options.time_budget is not None else space.time_budget
    if epochs is not None:
        budget.append(f"schedule.epochs={epochs}")
    if seconds is not None and options.epochs is None:
        budget.append(f"time_budget={seconds}")
    preset = space.preset or (None if space.config else "default")
    layers = ["data.val_split=holdout", *space.overrides, *options.overrides, *budget]
    cfg = load_config(preset, space.config, layers, default_preset="default")
    if cfg.data.val_split == "holdout" and cfg.data.holdout == 0:
        cfg = merge(cfg, {"data": {"holdout": DEFAULT_HOLDOUT}}, "tune")
    return cfg


def _pruner(optuna: Any, space: Space, epochs: int | None) -> Any:
    args = dict(space.pruner_args)
    if space.pruner == "median":
        # steps are epoch numbers (1, 2, ...) and Optuna prunes from step n_warmup_steps on
        return optuna.pruners.MedianPruner(
            n_startup_trials=args.get("startup_trials", 2), n_warmup_steps=args.get("warmup_epochs", 0) + 1
        )
    if space.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=args.get("min_epochs", 1),
            max_resource=epochs if epochs is not None else "auto",
            reduction_factor=args.get("reduction_factor", 3),
        )
    return optuna.pruners.NopPruner()


def open_study(optuna: Any, options: TuneOptions, epochs: int | None) -> Any:
    """The study in the storage (created on first use, with the space's enqueued points)."""
    space = options.space
    engine = {"connect_args": {"timeout": 60}} if options.storage.startswith("sqlite") else None
    storages = optuna.storages
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat, the retry
        if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 4.9
            retry = {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
        else:
            retry = {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=1)}
        storage = storages.RDBStorage(
            options.storage,
            engine_kwargs=engine,
            heartbeat_interval=space.heartbeat,
            grace_period=3 * space.heartbeat,
            **retry,
        )
    sampler_type = optuna.samplers.TPESampler if space.sampler == "tpe" else optuna.samplers.RandomSampler
    study = optuna.create_study(
        storage=storage,
        study_name=options.study_name,
        direction="maximize",
        sampler=sampler_type(seed=space.seed),
        pruner=_pruner(optuna, space, epochs),
        load_if_exists=True,
    )
    if not study.trials:
        by_key = {p.key: p for p in space.params}
        for point in space.enqueue:
            study.enqueue_trial({k: by_key[k].encode(v) for k, v in point.items()}, skip_if_exists=True)
    return study


class Objective:
    """One trial: draw the values, train a run directory, report each epoch's score, return the final one.

    Args:
        optuna: the optuna module.
        base: the config every trial starts from.
        space: the search space.
        out: the folder of the trials' run directories.
        data: (number of classes, image size) of the data, for the expanded config each trial records.
        say: where the lines of the trials go.
    """

    def __init__(
        self, optuna: Any, base: TrainConfig, space: Space, out: Path, data: tuple[int, int], say: LogFn
    ) -> None:
        self.optuna, self.base, self.space, self.out, self.data, self.say = (
            optuna,
            base,
            space,
            out,
            data,
            say,
        )
        self.split = base.data.val_split

    def __call__(self, trial: Any) -> float:
        n = trial.number
        values = {p.key: p.suggest(trial) for p in self.space.params}
        run_dir = self.out / f"trial-{n:04d}"
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        try:
            cfg = with_values(self.base, values, f"trial {n}")
        except ConfigError as exc:
            raise self._failed(n, exc) from None
        trial.set_user_attr("config", to_dict(expand(cfg, *self.data)))
        shown = "  ".join(f"{k}={v}" for k, v in values.items())
        self.say(f"trial {n}: {shown}  ({run_dir})")

        def report(record: dict[str, Any]) -> None:
            score, epoch = float(record[f"{self.split}_top1"]), int(record["epoch"])
            trial.report(score, epoch)
            if trial.should_prune():
                message = f"trial {n}: pruned after epoch {epoch} ({self.split} top-1 {100 * score:.2f}%)"
                self.say(message)
                raise self.optuna.TrialPruned(message)

        def log(line: str) -> None:
            self.say(f"trial {n}: {line}")

        try:
            summary = train(cfg, run_dir, progress=False, log=log, on_epoch=report)
        except (TrainingError, RunDirError, torch.OutOfMemoryError, MemoryError) as exc:
            raise self._failed(n, exc) from None
        score = float(summary[f"{self.split}_top1"])
        self.say(f"trial {n}: {self.split} top-1 {100 * score:.2f}% after {summary['epochs']} epochs")
        return score

    def _failed(self, n: int, exc: BaseException) -> TrialFailed:
        message = f"trial {n} failed: {one_line(exc)}"
        self.say(message)
        return TrialFailed(message)


def _rows(study: Any, space: Space) -> list[dict[str, Any]]:
    """The trials as rows: number, state, final score, epochs run, values."""
    params = {p.key: p for p in space.params}
    rows = []
    for t in sorted(study.trials, key=lambda t: t.number):
        values = {k: params[k].decode(v) if k in params else v for k, v in t.params.items()}
        epochs = max(t.intermediate_values, default=0)
        rows.append({"number": t.number, "state": t.state.name.lower(), "score": t.value, "epochs": epochs,
                     "values": values, "run_dir": t.user_attrs.get("run_dir")})  # fmt: skip
    return rows


def format_table(rows: list[dict[str, Any]], keys: list[str], split: str) -> str:
    """The trials as a Markdown table (what benchmarks/RESULTS.md holds)."""
    head = ["trial", "state", f"{split} top-1", "epochs", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        score = "" if row["score"] is None else f"{100 * row['score']:.2f}%"
        values = [_shown(row["values"].get(k)) for k in keys]
        lines.append("| " + " | ".join([str(row["number"]), row["state"], score, str(row["epochs"]), *values])
                     + " |")  # fmt: skip
    return "\n".join(lines)


def _shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return str(list(value))
    return str(value)


def _val_score(study: Any, best: Any, say: LogFn) -> dict[str, Any] | None:
    """The best trial's val numbers: measured once (its final weights, last.pt), then kept in the study."""
    kept = study.user_attrs.get(VAL_ATTR)
    if isinstance(kept, dict) and kept.get("trial") == best.number:
        return kept
    last = Path(best.user_attrs.get("run_dir", "")) / "last.pt"
    if not last.is_file():
        say(f"val top-1 of trial {best.number}: not measured here ({last} is not on this machine)")
        return None
    result = evaluate_checkpoint(last, split="val", log=say, progress=False)
    kept = {"trial": best.number, **{k: result[k] for k in ("top1", "top5", "loss", "n")}}
    study.set_user_attr(VAL_ATTR, kept)
    return kept


def write_preset(path: Path, best: Any, val: dict[str, Any] | None, study_name: str, split: str) -> Path:
    """The best trial's whole config (expanded, as a run's config.yaml) as a preset for `train --config`."""
    score = f"{split} top-1 {100 * best.value:.2f}%"
    measured = "not measured" if val is None else f"{100 * val['top1']:.2f}% ({val['n']} images)"
    tuned = ", ".join(f"{k}={_shown(v)}" for k, v in best.params.items())
    header = [
        f"# tinyswin tune: the best trial of study {study_name!r}: trial {best.number}, {score}",
        f"# val top-1 of its final weights, measured once at the end of the study: {measured}",
        f"# tuned: {tuned}",
        f"# run it: tinyswin train --config {path} --out runs/{study_name}-best",
        "# (trained on train minus the holdout, as the trial was; data.holdout=0 data.val_split=val: all of "
        "train)",
    ]
    text = "\n".join(header) + "\n" + yaml.safe_dump(best.user_attrs["config"], sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return path


def run_study(options: TuneOptions, say: LogFn = print) -> TuneResult:
    """Run (or resume, or join) the study until it holds `options.trials` finished trials, then write the
    best config as a preset and measure its val score once.

    Raises:
        MissingExtraError: optuna is not installed.
        ConfigError / ValueError / FileNotFoundError: a bad space file, config, data or storage.
        Interrupted: Ctrl-C or SIGTERM during a trial (recorded as failed; the same command resumes).
    """
    optuna = require("optuna", "tune", "tinyswin tune")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a trial's failure is said here, in one line
    space = options.space
    base = base_config(options)
    check_space(space, base)
    data = base.data
    cache = load_cache(resolve_data(data.source, size=data.size, holdout=data.holdout,
                                    holdout_seed=data.holdout_seed, log=say))  # fmt: skip
    eval_splits(cache.splits, data.val_split)  # the split trials score on exists: one line if not
    try:
        study = open_study(optuna, options, base.schedule.epochs if base.time_budget is None else None)
    except Exception as exc:  # SQLAlchemy's and Optuna's errors: a bad URL, an unreachable database
        if isinstance(exc, TinyswinError):
            raise
        raise ValueError(f"--storage {_redacted(options.storage)}: {one_line(exc)}") from None
    finished = (
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.FAIL,
    )
    done = len(study.get_trials(deepcopy=False, states=finished))
    say(f"study {options.study_name!r}: {done} of {options.trials} trials finished; {space.describe()}; "
        f"trials score on {data.val_split}; run directories in {options.out_dir}")  # fmt: skip
    if done < options.trials:
        objective = Objective(
            optuna, base, space, options.out_dir, (cache.num_classes, cache.image_size), say
        )
        study.optimize(
            objective,
            n_trials=options.trials - done,
            catch=(TrialFailed,),
            callbacks=[optuna.study.MaxTrialsCallback(options.trials, states=finished)],
            gc_after_trial=True,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a killed process's trial, when no trial ran after it
    return _finish(optuna, study, options, data.val_split, say)


def _finish(optuna: Any, study: Any, options: TuneOptions, split: str, say: LogFn) -> TuneResult:
    """The table of trials, the best trial's preset and its val score."""
    rows = _rows(study, options.space)
    result = TuneResult(rows=rows, split=split)
    say(format_table(rows, [p.key for p in options.space.params], split))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        say("no trial has completed yet: no best config")
        return result
    best = study.best_trial
    result.best = next(r for r in rows if r["number"] == best.number)
    result.val = _val_score(study, best, say)
    result.preset = write_preset(options.out_dir / BEST_FILE, best, result.val, options.study_name, split)
    val = "not measured" if result.val is None else f"{100 * result.val['top1']:.2f}%"
    say(f"best: trial {best.number}, {split} top-1 {100 * best.value:.2f}%, val top-1 {val}")
    say(f"preset: {result.preset}  (tinyswin train --config {result.preset})")
    return result


def _redacted(url: str) -> str:
    """A storage URL without its password."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        credentials, _, host = rest.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
