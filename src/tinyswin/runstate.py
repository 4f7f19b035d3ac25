"""A run's state as one object: what the step loop works on (`RunState`) and the counters it carries between
steps and epochs (`LoopState`), which checkpoints save and `--resume` restores.

`engine.train_one_epoch` takes a `RunState`; `train.Run` is one, with what evaluation, checkpoints and the
time budget need besides. The time budget (`budget.TimeBudget`) keeps its plan in the loop state, and the
run's summary (`rundir.summarize`) is read from it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tinyswin.checkpoint import clone_tree, rng_state, set_rng_state, unwrap
from tinyswin.config import TrainConfig
from tinyswin.optim import WarmupCosine
from tinyswin.runtime import DistContext


@dataclass
class LoopState:
    """The state the training loop carries between steps and epochs (all saved in checkpoints)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken (skipped steps included)
    best_top1: float = -1.0
    best_epoch: int = 0
    nonfinite_total: int = 0
    nonfinite_run: int = 0  # in a row, up to now
    train_seconds: float = 0.0
    compile_seconds: float = 0.0  # compiling and warming up before the clock (all starts of the run)
    history: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, Any] | None = None  # the time budget's plan, see tinyswin.budget


@dataclass(kw_only=True)
class RunState:
    """What the step loop works on: the model in training, its batches and their augmentation, the optimizer,
    the learning-rate schedule, the loss scaler, the weight average and the loop state, with the config and
    where to compute."""

    cfg: TrainConfig
    train_model: nn.Module  # the model to train (possibly DDP- and/or compile-wrapped)
    loader: Any  # BatchLoader of the train split (per-rank micro-batches)
    augment: Any  # (uint8 batch, labels, generator=, mix=) -> (float batch, targets)
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosine
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None = None  # autocast's dtype (None: float32)
    ema: torch.optim.swa_utils.AveragedModel | None = None  # updated after each step (decay cfg.ema.decay)
    dist: DistContext = field(default_factory=DistContext)
    state: LoopState = field(default_factory=LoopState)

    def snapshot(self) -> Callable[[], None]:
        """Copy everything training changes (weights, optimizer, scheduler, scaler, EMA, loop state, global
        random states); returns the function that puts it all back (a warm-up's steps are then undone).

        Tensors are cloned on their devices; the restore copies into the live weights, so compiled graphs and
        CUDA graphs keep pointing at the same parameters.
        """
        model, state = unwrap(self.train_model), self.state  # as they are now: restore puts back into these
        optimizer, scheduler, scaler, ema = self.optimizer, self.scheduler, self.scaler, self.ema
        saved_model = clone_tree(model.state_dict())
        saved_optimizer = clone_tree(optimizer.state_dict())
        saved_scheduler = copy.deepcopy({k: v for k, v in vars(scheduler).items() if k != "optimizer"})
        saved_scaler = scaler.state_dict() if scaler.is_enabled() else None
        saved_ema = clone_tree(ema.state_dict()) if ema is not None else None
        saved_state = copy.deepcopy(vars(state))
        saved_rng = clone_tree(rng_state())

        def restore() -> None:
            model.load_state_dict(saved_model)
            optimizer.load_state_dict(saved_optimizer)
            optimizer.zero_grad(set_to_none=True)
            vars(scheduler).update(copy.deepcopy(saved_scheduler))
            if saved_scaler is not None:
                scaler.load_state_dict(saved_scaler)
            if ema is not None and saved_ema is not None:
                ema.load_state_dict(saved_ema)
            vars(state).update(copy.deepcopy(saved_state))
            set_rng_state(saved_rng)

        return restore
