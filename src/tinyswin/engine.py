"""One training epoch: the step loop over explicit state, its loss and its statistics.

Every epoch's randomness (data order, augmentation draws, drop path) is derived from (seed, epoch, rank)
alone, so a run resumed after an epoch computes exactly what the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinyswin.checkpoint import unwrap
from tinyswin.config import TrainConfig
from tinyswin.optim import WarmupCosine
from tinyswin.runtime import DistContext, all_reduce_, autocast
from tinyswin.seeding import AUGMENT_STREAM, TORCH_STREAM, derive_seed


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the message says why and what to do."""


@dataclass
class EpochStats:
    """What one training epoch did."""

    loss: float  # mean over the optimizer steps with a finite loss
    steps: int
    images: int  # global images seen
    seconds: float
    nonfinite: int  # steps skipped because the loss was not finite
    lr: float  # the learning rate of the last step

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


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
    history: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, Any] | None = None  # the time budget's plan, see tinyswin.budget


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Integer targets: cross-entropy with label smoothing; soft (mixed) targets: soft cross-entropy."""
    logits = logits.float()
    if targets.dtype.is_floating_point:
        return F.cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def _skip_nonfinite(state: LoopState, cfg: TrainConfig, epoch: int, lr: float) -> None:
    """Count a step whose loss was not finite; raise once `cfg.max_nonfinite` came in a row."""
    state.nonfinite_total += 1
    state.nonfinite_run += 1
    if state.nonfinite_run >= cfg.max_nonfinite:
        raise TrainingError(
            f"the loss was not finite for {state.nonfinite_run} optimizer steps in a row (epoch "
            f"{epoch + 1}, step {state.step + 1}, lr {lr:.3g}): lower optim.lr, set optim.grad_clip, "
            "or use precision=fp32; the last good checkpoint is last.pt"
        )


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    augment: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: WarmupCosine,
    scaler: torch.amp.GradScaler,
    state: LoopState,
    *,
    cfg: TrainConfig,
    epoch: int,
    mix: bool,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    dist: DistContext | None = None,
    progress: Any = None,
    step_hook: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EpochStats:
    """One pass over the training split.

    Randomness comes only from (cfg.seed, epoch, rank): the loader's epoch permutation, a CPU generator for
    the augmentation and the global torch seed (drop path). `state.step` and the non-finite counters advance.

    Args:
        model: the model to train (possibly DDP- and/or compile-wrapped).
        loader: BatchLoader of the train split (per-rank micro-batches).
        augment: Augment: (uint8 batch, labels, generator, mix) -> (float batch, targets).
        optimizer, scheduler, scaler: stepped once per `cfg.accumulation` micro-batches.
        state: the loop state (step, non-finite counters).
        cfg: the run's config.
        epoch: 0-based epoch index.
        mix: whether Mixup/CutMix may be applied this epoch.
        device, amp_dtype: where and in which autocast dtype to compute.
        ema: the weight average to update after each step, if any.
        dist: process context (None: one process).
        progress: a tqdm bar to update, or None.
        step_hook: called with the number of steps done in this epoch after each optimizer step.
        should_stop: asked after each optimizer step; True ends the epoch there (a time budget ran out).

    Raises:
        TrainingError: `cfg.max_nonfinite` non-finite losses in a row.
    """
    dist = dist or DistContext()
    model.train()
    loader.set_epoch(epoch)
    generator = torch.Generator()
    generator.manual_seed(derive_seed(cfg.seed, AUGMENT_STREAM, epoch, dist.rank))
    torch.manual_seed(derive_seed(cfg.seed, TORCH_STREAM, epoch, dist.rank))
    accum = cfg.accumulation
    batches = iter(loader)
    first_step = state.step
    loss_total, finite_steps, nonfinite, images = 0.0, 0, 0, 0
    start = time.perf_counter()
    lr = scheduler.get_last_lr()
    for _ in range(len(loader) // accum):
        lr = scheduler.get_last_lr()
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            x_u8, labels = next(batches)
            x, targets = augment(x_u8, labels, generator=generator, mix=mix)
            sync = micro == accum - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync(), autocast(device, amp_dtype):
                logits = model(x)
            loss = loss_fn(logits, targets, cfg.label_smoothing)
            scaler.scale(loss / accum).backward()
            step_loss += loss.detach() / accum
            images += labels.shape[0] * dist.world_size
        value = float(all_reduce_(step_loss.reshape(1).double(), dist)) / dist.world_size
        if math.isfinite(value):
            state.nonfinite_run = 0
            _optimizer_step(model, optimizer, scaler, cfg.optim.grad_clip, ema)
            loss_total += value
            finite_steps += 1
        else:
            nonfinite += 1
            optimizer.zero_grad(set_to_none=True)
            _skip_nonfinite(state, cfg, epoch, lr)
        scheduler.step()
        state.step += 1
        if step_hook is not None:
            step_hook(state.step - first_step)
        progress_update(progress, value, lr, images, start)
        if should_stop is not None and should_stop():
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return EpochStats(
        loss=loss_total / finite_steps if finite_steps else float("nan"),
        steps=state.step - first_step,
        images=images,
        seconds=time.perf_counter() - start,
        nonfinite=nonfinite,
        lr=lr,
    )


def _optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    grad_clip: float | None,
    ema: torch.optim.swa_utils.AveragedModel | None,
) -> None:
    """Unscale and clip the global grad norm (if `grad_clip`), step, update the scaler and the EMA."""
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if ema is not None:
        ema.update_parameters(unwrap(model))


def progress_update(progress: Any, loss: float, lr: float, images: int, start: float) -> None:
    """Advance a tqdm bar by one step with the loss, learning rate and images/s (no-op for None)."""
    if progress is None:
        return
    progress.update(1)
    progress.set_postfix(
        loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{images / (time.perf_counter() - start):.0f}"
    )
