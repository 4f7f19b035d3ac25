"""A training run, wired: `setup_run` builds what a run holds, `train` runs its epochs.

    cache (uint8) -> BatchLoader -> Augment -> model -> loss -> AdamW + WarmupCosine  (engine.train_one_epoch)
    -> evaluate every split (evaluate.evaluate) -> metrics, checkpoints, plots (rundir.RunDir)

The time budget, when set, is one object (`budget.TimeBudget`) that the loop asks after each step and after
each epoch. Every epoch's randomness derives from (seed, epoch, rank), so a run resumed from `last.pt`
computes exactly what the uninterrupted run would. With several processes the global batch is split evenly
over processes and accumulation steps; only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tinyswin.budget import TimeBudget, time_evaluation
from tinyswin.checkpoint import (
    check_compatible,
    is_resumable,
    load_checkpoint,
    make_checkpoint,
    rng_state,
    set_rng_state,
    unwrap,
)
from tinyswin.config import (
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    build_augment_config,
    build_model_config,
    check_ranges,
    eval_size,
    expand,
    from_dict,
    load_config,
    plain_model_config,
    to_dict,
)
from tinyswin.data import BatchLoader, Cache, build_augment, load_cache
from tinyswin.data.sources import eval_splits, resolve_data
from tinyswin.engine import EpochStats, TrainingError, train_one_epoch
from tinyswin.errors import Interrupted, RunDirError
from tinyswin.evaluate import EvalResult, evaluate
from tinyswin.model import SwinTransformer
from tinyswin.optim import WarmupCosine, build_adamw
from tinyswin.pretrained import describe_init, init_config, load_init, read_init
from tinyswin.rundir import RunDir, checkpoint_due, format_epoch, summarize
from tinyswin.runstate import LoopState, RunState
from tinyswin.runtime import (
    DistContext,
    StopSignals,
    barrier,
    resolve_device,
    resolve_precision,
    weights_of,
    wrap_model,
)

__all__ = [
    "DistContext",
    "LoopState",
    "Run",
    "RunState",
    "TrainingError",
    "build_augment_config",
    "build_model_config",
    "resume_config",
    "setup_run",
    "train",
    "train_one_epoch",
]

LogFn = Callable[[str], None]


@dataclass(kw_only=True)
class Run(RunState):
    """What a training run holds between its epochs: the state the step loop works on (`RunState`: `cfg` as
    given, which the checkpoint keeps and config.yaml shows expanded; `train_model`, the model DDP- and/or
    compile-wrapped; loader, augment, optimizer, scheduler, scaler, ema, loop state, device, precision,
    processes), and what evaluation, checkpoints and the time budget need besides."""

    schedule: ScheduleConfig  # the schedule followed now (a time budget's plan changes it)
    cache: Cache
    splits: list[str]  # evaluated every epoch; the first picks best.pt
    eval_loaders: dict[str, BatchLoader]
    iters_per_epoch: int
    normalize: Callable[[torch.Tensor], torch.Tensor]  # the eval transform: uint8 batch -> model input
    model_config: dict[str, Any]  # plain SwinConfig, as checkpoints store it
    model: SwinTransformer  # the plain module inside train_model
    eval_model: nn.Module
    clock_start: float  # perf_counter() at the start of the run, resumes included
    warmup_seconds: float | None = None  # this start's warm-up, until the next epoch's record holds it
    written_epoch: int = 0  # the epoch of the last last.pt written ...
    written_at: float = 0.0  # ... and when (perf_counter())

    def config(self) -> TrainConfig:
        """The config as it stands (the planned schedule)."""
        return dataclasses.replace(self.cfg, schedule=self.schedule)

    def evaluate(self, split: str, ema: bool = False) -> EvalResult:
        """The model (or, with `ema`, the EMA's weights swapped into it: the same compiled graph) on one
        split."""
        with weights_of(self.model, self.ema.module if ema and self.ema is not None else None):
            return evaluate(
                self.eval_model,
                iter(self.eval_loaders[split]),
                self.normalize,
                num_classes=self.cache.num_classes,
                label_smoothing=self.cfg.label_smoothing,
                amp_dtype=self.amp_dtype,
                dist=self.dist,
                tta=self.cfg.tta,
            )

    def evaluation_due(self) -> bool:
        """After an epoch (`state.epoch` counted): whether `cfg.evaluation`'s interval has passed since the
        previous evaluation (the run's start when there was none)."""
        every, key = self.cfg.evaluation, f"{self.splits[0]}_top1"
        previous = next((r for r in reversed(self.state.history) if key in r), {"epoch": 0, "elapsed": 0.0})
        seconds = time.perf_counter() - self.clock_start - previous["elapsed"]
        epochs = self.state.epoch - previous["epoch"]
        return checkpoint_due(every.every_epochs, every.every_seconds, epochs, seconds)

    def measure_eval(self) -> float:
        """Seconds one evaluation (all splits, raw and EMA weights) takes, from warm batches."""

        def run_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> None:  # the EMA's pass: the same graph
            num_classes = self.cache.num_classes
            evaluate(
                self.eval_model,
                iter([batch]),
                self.normalize,
                num_classes=num_classes,
                amp_dtype=self.amp_dtype,
                tta=self.cfg.tta,
            )

        batches = [(next(iter(loader)), loader.num_total) for loader in self.eval_loaders.values()]
        seconds = time_evaluation(run_batch, batches, 2 if self.ema is not None else 1, self.dist.world_size)
        self.train_model.train()
        return seconds

    def mix_on(self) -> bool:
        """Whether Mixup/CutMix may be applied in the coming epoch (off in the first and last ones asked)."""
        schedule, epoch = self.schedule, self.state.epoch
        return schedule.mix_off_first_epochs <= epoch < schedule.epochs - schedule.mix_off_last_epochs

    def warm_up(self) -> float:
        """Compile and warm up before the clock starts; returns the seconds it took.

        `cfg.warmup_steps` optimizer steps on the next epoch's real batches, then the first evaluation batch
        of each split (evaluation pads its last batch to that shape, so that is every shape it meets). Every
        state a step changes is put back afterwards (`RunState.snapshot`), so the run computes what it would
        have without the warm-up.
        """
        start = time.perf_counter()
        restore = self.snapshot()
        try:
            train_one_epoch(
                self, mix=self.mix_on(), max_steps=min(self.cfg.warmup_steps, self.iters_per_epoch)
            )
            for loader in self.eval_loaders.values():  # evaluation pads its last batch: one shape a split
                evaluate(self.eval_model, iter([next(iter(loader))]), self.normalize,
                         num_classes=self.cache.num_classes, amp_dtype=self.amp_dtype,
                         tta=self.cfg.tta)  # fmt: skip
        finally:
            restore()
            self.train_model.train()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint of the run as it stands (weights of the unwrapped, uncompiled module)."""
        state = self.state
        return make_checkpoint(
            model=unwrap(self.model).state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            ema=self.ema.state_dict() if self.ema is not None else None,
            epoch=state.epoch,
            step=state.step,
            best={"top1": state.best_top1, "epoch": state.best_epoch, "split": self.splits[0]},
            model_config=self.model_config,
            train_config=to_dict(self.config()),
            class_names=self.cache.class_names,
            class_ids=self.cache.class_ids,
            normalization={"mean": list(self.augment.mean), "std": list(self.augment.std)},
            image_size=self.cache.image_size,
            rng_state=rng_state(),
            loop=dataclasses.asdict(state),
        )


def _loaders(
    cfg: TrainConfig, cache: Cache, splits: list[str], dist: DistContext, device: torch.device
) -> tuple[BatchLoader, dict[str, BatchLoader], int]:
    """The train loader (per-rank micro-batches), the eval loaders, and optimizer steps per epoch."""
    micro = cfg.batch_size // dist.world_size // cfg.accumulation
    if micro * cfg.accumulation * dist.world_size != cfg.batch_size or micro < 1:
        raise ValueError(
            f"batch_size={cfg.batch_size} does not split into {dist.world_size} process(es) x "
            f"accumulation={cfg.accumulation} equal micro-batches"
        )
    images, labels = cache.split("train")
    shard = {"rank": dist.rank, "world_size": dist.world_size, "device": device}
    loader = BatchLoader(
        images, labels, micro, shuffle=True, drop_last=True, seed=cfg.seed, repeats=cfg.data.repeats, **shard
    )
    iters_per_epoch = len(loader) // cfg.accumulation
    if iters_per_epoch < 1:
        raise ValueError(f"the train split ({len(labels)} images) is smaller than one global batch")
    eval_loaders = {
        split: BatchLoader(*cache.split(split), cfg.eval_batch_size, shuffle=False, drop_last=False, **shard)
        for split in splits
    }
    return loader, eval_loaders, iters_per_epoch


def _restore(run: Run, ckpt: dict[str, Any], source: Path) -> None:
    """Weights, optimizer, scheduler, scaler, EMA, loop state and random state from a checkpoint."""
    if not is_resumable(ckpt):
        raise ValueError(f"{source}: holds no optimizer state (a best.pt?): resume from the run's last.pt")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if run.ema is not None:
        if ckpt.get("ema") is None:
            raise ValueError(f"{source}: has no EMA weights but ema.enabled is true")
        run.ema.load_state_dict(ckpt["ema"])
    known = {f.name for f in dataclasses.fields(LoopState)}
    run.state = LoopState(**{k: v for k, v in ckpt["loop"].items() if k in known})
    set_rng_state(ckpt["rng_state"])


def setup_run(
    cfg: TrainConfig,
    dist: DistContext,
    *,
    ckpt: dict[str, Any] | None = None,
    source: Path = Path("last.pt"),
    wall_start: float | None = None,
    say: LogFn = print,
    progress: bool = False,
) -> Run:
    """Build what a run holds: data, augmentation, model, EMA, optimizer, scheduler, scaler, loop state.

    Args:
        cfg: the training config.
        dist: this process's place among the processes.
        ckpt: a checkpoint to continue from (its model must match), or None.
        source: the checkpoint's path, for messages.
        wall_start: perf_counter() when the run started (default: now).
        say: where notes go.
        progress: show a progress bar if a source must be prepared first.
    """
    device = resolve_device(cfg.device, dist)
    amp_dtype, use_scaler, note = resolve_precision(cfg.precision, device)
    if note:
        say(note)
    data = cfg.data
    path = resolve_data(
        data.source,
        size=data.size,
        holdout=data.holdout,
        holdout_seed=data.holdout_seed,
        log=say,
        progress=progress,
    )
    cache = load_cache(path)
    splits = eval_splits(cache.splits, data.val_split)
    loader, eval_loaders, iters_per_epoch = _loaders(cfg, cache, splits, dist, device)
    mean = tuple(data.mean) if data.mean is not None else cache.mean
    std = tuple(data.std) if data.std is not None else cache.std
    augment = build_augment(build_augment_config(cfg), mean, std, cache.num_classes)
    init = None
    if cfg.init is not None and ckpt is None:  # a resumed run's weights are in its checkpoint
        init = read_init(cfg.init)
        cfg = init_config(cfg, init, cache.image_size)  # the model takes the weights' geometry
    model_config = build_model_config(cfg, cache.num_classes, cache.image_size)
    size = eval_size(model_config, cache.image_size)
    plain_config = plain_model_config(model_config)
    if ckpt is not None:
        check_compatible(ckpt, model_config=plain_config, class_names=cache.class_names, source=str(source))
    torch.manual_seed(cfg.seed)
    model = SwinTransformer(model_config)
    if init is not None:
        load_init(model, init)
        say(describe_init(init, model_config))
    model = model.to(device)
    optim = cfg.optim
    optimizer = build_adamw(
        model, cfg.peak_lr(), weight_decay=optim.weight_decay, betas=optim.betas, eps=optim.eps,
        decay_rel_pos_bias=optim.decay_rel_pos_bias, layer_decay=optim.layer_decay, fused=optim.fused,
        device=device,
    )  # fmt: skip
    ema = None
    if cfg.ema.enabled:
        average = torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema.decay)
        ema = torch.optim.swa_utils.AveragedModel(model, device, multi_avg_fn=average)  # counter on device
    sched = cfg.schedule
    scheduler = WarmupCosine(
        optimizer, cfg.peak_lr(), iters_per_epoch=iters_per_epoch, epochs=sched.epochs,
        warmup_epochs=sched.warmup_epochs, warmup_start=sched.warmup_start, min_lr=sched.min_lr,
        per_iteration=sched.step == "iteration", shape=sched.shape,
    )  # fmt: skip
    train_model, eval_model = wrap_model(model, cfg.compile, dist, device, cfg.compile_mode)
    run = Run(
        cfg=cfg, schedule=cfg.schedule, dist=dist, device=device, amp_dtype=amp_dtype, cache=cache,
        splits=splits, loader=loader, eval_loaders=eval_loaders, iters_per_epoch=iters_per_epoch,
        augment=augment, normalize=lambda images: augment.normalize(images, size), model_config=plain_config,
        model=model, train_model=train_model, eval_model=eval_model, ema=ema, optimizer=optimizer,
        scheduler=scheduler, scaler=torch.amp.GradScaler(device.type, enabled=use_scaler), state=LoopState(),
        clock_start=0.0,
    )  # fmt: skip
    if ckpt is not None:
        _restore(run, ckpt, source)
    start = time.perf_counter() if wall_start is None else wall_start
    run.clock_start = start - run.state.train_seconds  # the run's wall time counts across resumes
    return run


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr) if enabled else None


def _epoch_record(run: Run, epoch: int, mix: bool, stats: EpochStats) -> dict[str, Any]:
    """The epoch's line of metrics.jsonl, before evaluation."""
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": run.state.step,
        "lr": stats.lr,
        "train_loss": stats.loss,
        "mix": mix,
    }
    if stats.steps < run.iters_per_epoch:
        record["partial"] = stats.steps  # the time budget ended the epoch after this many steps
    if run.warmup_seconds is not None:  # the first epoch after a start with a warm-up (outside the clock)
        record["compile_seconds"], run.warmup_seconds = run.warmup_seconds, None
    schedule = run.scheduler.describe()
    recorded = [r["lr_schedule"] for r in run.state.history if "lr_schedule" in r]
    if not recorded or recorded[-1] != schedule:  # the first epoch, and whenever the schedule changed
        record["lr_schedule"] = schedule
    return record


def _evaluate_splits(run: Run, record: dict[str, Any]) -> dict[str, EvalResult]:
    """Evaluate every split (and the EMA weights on it) into `record`; returns the raw weights' results."""
    results = {}
    for split in run.splits:
        for prefix in ("", "ema_") if run.ema is not None else ("",):
            result = run.evaluate(split, ema=prefix == "ema_")
            results.setdefault(split, result)
            record |= {
                f"{prefix}{split}_loss": result.loss,
                f"{prefix}{split}_top1": result.top1,
                f"{prefix}{split}_top5": result.top5,
            }
            if result.plain is not None:  # test-time augmentation: the numbers without it too
                record |= {
                    f"{prefix}{split}_loss_no_tta": result.plain.loss,
                    f"{prefix}{split}_top1_no_tta": result.plain.top1,
                    f"{prefix}{split}_top5_no_tta": result.plain.top5,
                }
    return results


def _check_interrupt(signals: StopSignals, state: LoopState) -> None:
    """Raise Interrupted if SIGINT or SIGTERM came (between two steps: nothing is half-written)."""
    if signals.received is not None:
        raise Interrupted(
            f"interrupted at epoch {state.epoch + 1} step {state.step}; resume with --resume",
            signals.received,
        )


def run_epoch(
    run: Run, rundir: RunDir, budget: TimeBudget | None, signals: StopSignals, progress: bool, say: LogFn
) -> dict[str, EvalResult] | None:
    """Train one epoch, evaluate (when `cfg.evaluation` says, and always after the last epoch), follow the
    time budget, write the epoch's files; returns the evaluation's results (None: not evaluated).

    Raises:
        Interrupted: a signal came during the epoch's steps; the epoch is abandoned, nothing is written.
    """
    state, schedule = run.state, run.schedule
    epoch = state.epoch
    mix = run.mix_on()
    start = time.perf_counter()
    bar = _progress_bar(run.iters_per_epoch, f"epoch {epoch + 1}/{schedule.epochs}", progress)
    if budget is not None:
        budget.start_epoch()
    try:
        stats = train_one_epoch(
            run, mix=mix, progress=bar, step_hook=budget.on_step if budget else None,
            should_stop=lambda: signals.received is not None or (budget is not None and budget.should_stop()),
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    _check_interrupt(signals, state)
    record = _epoch_record(run, epoch, mix, stats)
    record |= {"images_per_s": stats.images_per_s, "train_seconds": stats.seconds}
    record["nonfinite"] = stats.nonfinite
    state.epoch += 1
    last = state.epoch >= schedule.epochs or stats.steps < run.iters_per_epoch  # the run's last epoch
    results = _evaluate_splits(run, record) if last or run.evaluation_due() else None
    _clock_epoch(run, record, start)
    state.history.append(record)
    if budget is not None:
        run.schedule = budget.after_epoch(run.schedule, stats.steps, record["seconds"]) or run.schedule
        if results is None and state.epoch >= run.schedule.epochs:  # the budget's replan ends the run here
            results = _evaluate_splits(run, record)
            _clock_epoch(run, record, start)
        rundir.write_config(expand(run.config(), run.cache.num_classes, run.cache.image_size))
    improved = results is not None and record[f"{run.splits[0]}_top1"] > state.best_top1
    if improved:
        state.best_top1, state.best_epoch = record[f"{run.splits[0]}_top1"], state.epoch
    now = time.perf_counter()
    every = run.cfg.checkpoint
    due = state.epoch >= run.schedule.epochs or checkpoint_due(
        every.every_epochs, every.every_seconds, state.epoch - run.written_epoch, now - run.written_at
    )
    rundir.end_epoch(record, improved, run.checkpoint, due, plot=run.cfg.plots == "epoch")
    if due:
        run.written_epoch, run.written_at = state.epoch, now
    say(format_epoch(record, run.splits, run.schedule.epochs))
    barrier(run.dist)
    return results


def _clock_epoch(run: Run, record: dict[str, Any], start: float) -> None:
    """The epoch's wall seconds (steps and evaluation) and the run's clock, into `record` and the state."""
    run.state.train_seconds = time.perf_counter() - run.clock_start
    record |= {"seconds": time.perf_counter() - start, "elapsed": run.state.train_seconds}


def train(
    cfg: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    dist: DistContext | None = None,
    progress: bool | None = None,
    log: LogFn | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train a model as `cfg` says, writing everything to `run_dir`; returns the summary.

    Args:
        cfg: the training config (with `--resume`, the run's own config, possibly with keys changed).
        run_dir: the run directory (created).
        resume: continue from `run_dir/last.pt`.
        dist: the process context (None: one process).
        progress: tqdm bars per epoch (None: when stderr is a terminal).
        log: where progress lines go (default: print, rank 0 only).
        on_epoch: called with each epoch's record (a line of metrics.jsonl) once its files are written, on
            rank 0; what it raises stops the training there (`tinyswin.tune` prunes trials with it).

    Returns:
        The summary (also written to `run_dir/summary.json`).

    Raises:
        ConfigError / ValueError / FileNotFoundError: bad config, data or checkpoint.
        RunDirError: `run_dir` is held by another training, is not a run, holds a run already (without
            `resume`), or holds nothing to resume.
        DiskFullError: a file of the run could not be written for lack of space; `last.pt` stays valid.
        Interrupted: SIGINT or SIGTERM; nothing half-written, `resume=True` continues.
        TrainingError: the loss stayed non-finite.
    """
    check_ranges(cfg)  # a config built in code has not been through load_config's checks
    if cfg.threads:  # one thread is often faster for small models, and on a machine shared with other work
        torch.set_num_threads(cfg.threads)
    wall_start = time.perf_counter()
    dist = dist or DistContext()
    say: LogFn = (log or print) if dist.is_main else (lambda _msg: None)
    progress = (sys.stderr.isatty() if progress is None else progress) and dist.is_main
    with RunDir(
        run_dir, main=dist.is_main, say=say, on_epoch=on_epoch
    ) as rundir:  # owned by this training until the end
        ckpt = rundir.open(resume)
        run = setup_run(
            cfg, dist, ckpt=ckpt, source=rundir.last, wall_start=wall_start, say=say, progress=progress
        )
        return _train_epochs(run, rundir, ckpt is not None, wall_start, progress, say)


def _train_epochs(
    run: Run, rundir: RunDir, resumed: bool, wall_start: float, progress: bool, say: LogFn
) -> dict[str, Any]:
    """The epochs of a run that is set up, then its summary; SIGINT/SIGTERM stop it between two steps."""
    cfg, dist = run.cfg, run.dist
    if cfg.warmup_steps and run.state.epoch < run.schedule.epochs:
        seconds = _warm_up(run)
        run.warmup_seconds = seconds
        run.state.compile_seconds += seconds
        run.clock_start += seconds  # the clock leaves the warm-up out
        wall_start += seconds
        say(f"warm-up: {cfg.warmup_steps} steps and one eval batch a split, {seconds:.1f} s (off the clock)")
    run.written_epoch, run.written_at = run.state.epoch, time.perf_counter()
    budget = None
    if cfg.time_budget is not None:
        budget = TimeBudget(
            cfg,
            run.state,
            run.scheduler,
            run.iters_per_epoch,
            wall_start,
            run.measure_eval,
            dist,
            run.device,
            say,
        )
    resumed_at = run.state.epoch
    if resumed:
        say(f"resuming after epoch {run.state.epoch} (step {run.state.step})")
    if resumed and run.state.epoch >= run.schedule.epochs:
        say(f"the run in {rundir.path} is finished ({run.state.epoch} epochs): nothing to train or write")
        results = {split: run.evaluate(split) for split in run.splits}
        names = run.cache.class_names
        return summarize(run.schedule.epochs, run.state, run.splits, results, names, rundir.path, resumed_at)
    rundir.start(expand(run.config(), run.cache.num_classes, run.cache.image_size), run.state.history)
    _announce(run, rundir, say)
    results: dict[str, EvalResult] = {}
    with StopSignals(enabled=dist.world_size == 1) as signals:
        try:
            while run.state.epoch < run.schedule.epochs:
                _check_interrupt(signals, run.state)
                results = run_epoch(run, rundir, budget, signals, progress, say) or results
        except (Interrupted, TrainingError):
            rundir.flush()  # the finished epochs not written yet (checkpoint.every_*) go to last.pt
            if cfg.plots == "end" and run.state.history:
                rundir.plot()
            raise
    state, cache = run.state, run.cache
    summary = summarize(
        run.schedule.epochs, state, run.splits, results, cache.class_names, rundir.path, resumed_at
    )
    rundir.finish(
        expand(run.config(), cache.num_classes, cache.image_size), summary, plot=bool(state.history)
    )
    return summary


def _warm_up(run: Run) -> float:
    """`run.warm_up()`, which a signal stops at once: it compiles and writes nothing (the inductor cache
    writes each entry whole), so a run stopped while compiling leaves its directory as it was.

    Raises:
        Interrupted: SIGINT or SIGTERM came; the message says what to do.
    """
    signum = None
    signals = StopSignals(enabled=run.dist.world_size == 1, immediate=True)
    with warnings.catch_warnings(record=True) as caught, signals:
        try:
            seconds = run.warm_up()
        except KeyboardInterrupt:
            signum = signals.received or signal.SIGINT
    if signum is None:
        for w in caught:  # held back: a stopped compilation's are dropped (autograd's trace of the stop)
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        return seconds
    raise Interrupted(
        f"stopped while compiling and warming up, before epoch {run.state.epoch + 1}: nothing was written "
        "(the run directory is as it was); run it again with --resume (kernels already compiled are read "
        "back from the inductor cache, TORCHINDUCTOR_CACHE_DIR)",
        signum,
    )


def _announce(run: Run, rundir: RunDir, say: LogFn) -> None:
    """The run's opening lines: where its files go, what it trains on what."""
    cfg, cache = run.cfg, run.cache
    n_params = sum(p.numel() for p in run.model.parameters())
    world = f" x{run.dist.world_size}" if run.dist.world_size > 1 else ""
    say(f"run directory: {rundir.path}  (config.yaml, metrics.jsonl, last.pt, best.pt, plots/, summary.json)")
    say(
        f"data {cache.path} ({cache.split('train')[1].shape[0]} train images, {cache.num_classes} classes); "
        f"model {cfg.model.preset} {n_params / 1e6:.2f}M params at {run.model.config.img_size}px; device "
        f"{run.device}{world}; global batch {cfg.batch_size}, peak lr {cfg.peak_lr():.3g}"
    )


def resume_config(
    run_dir: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """The config of the run in `run_dir` with `key=value` overrides applied: from its last.pt, or from its
    config.yaml when it was stopped before its first checkpoint.

    Raises:
        RunDirError: `run_dir` holds neither.
    """
    path, yaml_path = Path(run_dir) / "last.pt", Path(run_dir) / "config.yaml"
    if path.exists():
        return apply_overrides(from_dict(load_checkpoint(path)["train_config"], str(path)), overrides)
    if yaml_path.is_file():
        return load_config(None, yaml_path, overrides)
    raise RunDirError(f"nothing to resume in {run_dir}: it holds no last.pt and no config.yaml")
