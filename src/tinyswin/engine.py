"""One training epoch: the step loop over a run's state (`runstate.RunState`), its loss and its statistics.

Every epoch's randomness (data order, augmentation draws, drop path) is derived from (seed, epoch, rank)
alone, so a run resumed after an epoch computes exactly what the uninterrupted run would.

The host reads the loss every `cfg.sync_every` steps. In between nothing waits for the device: the loss,
its non-finite check and the count of non-finite losses in a row stay there (`StepTally`), and a step with
a non-finite loss is skipped on the device (`masked_step`: the fused AdamW's `found_inf` input, or the
previous values put back by `torch.where`; the EMA update gets weight 0). Once `cfg.max_nonfinite`
non-finite losses came in a row, every later step is skipped too, and the next read raises TrainingError
(at most `sync_every - 1` steps late, with the weights of the step where the limit was reached). With
`sync_every: 1`, or fp16 with a GradScaler, the host reads the loss every step and skips there.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinyswin.checkpoint import unwrap
from tinyswin.config import TrainConfig
from tinyswin.runstate import LoopState, RunState
from tinyswin.runtime import all_reduce_, autocast
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


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Integer targets: cross-entropy with label smoothing; soft (mixed) targets: soft cross-entropy."""
    logits = logits.float()
    if targets.dtype.is_floating_point:
        return F.cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


class StepTally:
    """An epoch's loss and non-finite counts, kept on the device and read by the host every few steps.

    Args:
        device: where the step losses are.
        run: non-finite losses in a row before the epoch (carried over from the previous one).
        limit: `cfg.max_nonfinite`: this many in a row stop the run.
    """

    def __init__(self, device: torch.device, run: int, limit: int) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.dtype = dtype
        self.limit = limit
        self.loss_sum = torch.zeros((), dtype=dtype, device=device)
        self.finite = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.run = torch.full((), run, dtype=torch.int64, device=device)
        self.peak = self.run.clone()  # the longest run reached this epoch
        self.read_steps = -1  # the step of the last read
        self.last: list[float] = [0.0, 0, 0, run, run]

    def stopped(self) -> torch.Tensor:
        """Bool () on the device: `limit` non-finite losses came in a row (every later step is skipped)."""
        return self.peak >= self.limit

    def add(self, loss: torch.Tensor, nonfinite: torch.Tensor) -> None:
        """Count one step's loss (float ()) and whether it was not finite (bool ()), on the device."""
        self.loss_sum += torch.where(nonfinite, 0.0, loss.to(self.dtype))
        self.finite += (~nonfinite).long()
        self.nonfinite += nonfinite.long()
        self.run.add_(1).mul_(nonfinite.long())
        torch.maximum(self.peak, self.run, out=self.peak)

    def read(self, step: int) -> tuple[float, int, int, int, int]:
        """One host read (a device sync) after step `step`: (loss sum, finite steps, non-finite steps, run
        now, longest run)."""
        counts = [self.finite, self.nonfinite, self.run, self.peak]
        values = torch.stack([self.loss_sum, *(c.to(self.dtype) for c in counts)])  # (5,) one transfer
        loss_sum, finite, nonfinite, run, peak = values.tolist()
        self.read_steps = step
        self.last = [loss_sum, int(finite), int(nonfinite), int(run), int(peak)]
        return loss_sum, int(finite), int(nonfinite), int(run), int(peak)

    def stats(self, steps: int, images: int, seconds: float, lr: float) -> EpochStats:
        """The epoch's EpochStats from the last read."""
        loss_sum, finite, nonfinite, _, _ = self.last
        loss = loss_sum / finite if finite else float("nan")
        return EpochStats(loss=loss, steps=steps, images=images, seconds=seconds, nonfinite=nonfinite, lr=lr)


def _account(state: LoopState, tally: StepTally, step: int, cfg: TrainConfig, lr: float) -> None:
    """Read the tally after optimizer step number `step` (1-based, of the run) into the loop state; raise
    once `cfg.max_nonfinite` non-finite losses came in a row."""
    nonfinite_before = tally.last[2]
    _, _, nonfinite, run, peak = tally.read(step)
    state.nonfinite_total += nonfinite - nonfinite_before
    state.nonfinite_run = run
    if peak >= cfg.max_nonfinite:
        state.nonfinite_run = max(run, cfg.max_nonfinite)
        raise TrainingError(
            f"the loss was not finite for {cfg.max_nonfinite} optimizer steps in a row (epoch "
            f"{state.epoch + 1}, by step {step}, lr {lr:.3g}): lower optim.lr, set optim.grad_clip, "
            "or use precision=fp32; the last good checkpoint is last.pt"
        )


def train_one_epoch(
    run: RunState,
    *,
    mix: bool,
    progress: Any = None,
    step_hook: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_steps: int | None = None,
) -> EpochStats:
    """One pass over the training split (or its first `max_steps` optimizer steps): epoch `run.state.epoch`.

    Randomness comes only from (cfg.seed, epoch, rank): the loader's epoch permutation, a CPU generator for
    the augmentation and the global torch seed (drop path). `state.step` and the non-finite counters advance;
    the epoch count does not (the caller counts the epoch when it is done with it). The loss is read on the
    host every `cfg.sync_every` steps and after the last (see the module's notes).

    Args:
        run: what the loop works on: model, batches, augmentation, optimizer, schedule, scaler, EMA, loop
            state, config, device and precision, process context.
        mix: whether Mixup/CutMix may be applied this epoch.
        progress: a tqdm bar, advanced at every read of the loss, or None.
        step_hook: called with the number of steps done in this epoch after each optimizer step.
        should_stop: asked after each optimizer step; True ends the epoch there (a time budget ran out).
        max_steps: stop after this many optimizer steps (a warm-up).

    Raises:
        TrainingError: `cfg.max_nonfinite` non-finite losses in a row (read at most `sync_every - 1` steps
            after the step that reached it).
    """
    cfg, state, dist = run.cfg, run.state, run.dist
    generator = _start_epoch(run)
    batches = iter(run.loader)
    tally = StepTally(run.device, state.nonfinite_run, cfg.max_nonfinite)
    on_host = cfg.sync_every == 1 or run.scaler.is_enabled()  # fp16 loss scaling: the GradScaler skips there
    steps = len(run.loader) // cfg.accumulation if max_steps is None else max_steps
    first_step, images, start = state.step, 0, time.perf_counter()
    lr = run.scheduler.get_last_lr()
    for done in range(1, steps + 1):
        lr = run.scheduler.get_last_lr()
        run.optimizer.zero_grad(set_to_none=True)
        step_loss, n = _forward_backward(run, batches, generator, mix)
        images += n * dist.world_size
        step_loss = all_reduce_(step_loss.double(), dist) / dist.world_size
        nonfinite = ~torch.isfinite(step_loss)
        _apply_step(run, nonfinite | tally.stopped(), on_host)
        tally.add(step_loss, nonfinite)
        if done % cfg.sync_every == 0 or done == steps:
            _account(state, tally, first_step + done, cfg, lr)
            progress_update(progress, tally, lr, done, images, start)
        run.scheduler.step()
        state.step += 1
        if step_hook is not None:
            step_hook(done)
        if should_stop is not None and should_stop():
            if tally.read_steps != first_step + done:
                _account(state, tally, first_step + done, cfg, lr)
                progress_update(progress, tally, lr, done, images, start)
            break
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    return tally.stats(state.step - first_step, images, time.perf_counter() - start, lr)


def _start_epoch(run: RunState) -> torch.Generator:
    """Training mode, and the epoch's randomness from (seed, epoch, rank): the loader's permutation, the
    global torch seed (drop path); returns the augmentation's CPU generator."""
    cfg, epoch, rank = run.cfg, run.state.epoch, run.dist.rank
    run.train_model.train()
    run.loader.set_epoch(epoch)
    generator = torch.Generator()
    generator.manual_seed(derive_seed(cfg.seed, AUGMENT_STREAM, epoch, rank))
    torch.manual_seed(derive_seed(cfg.seed, TORCH_STREAM, epoch, rank))
    return generator


def _apply_step(run: RunState, skip: torch.Tensor, on_host: bool) -> None:
    """The optimizer step and the EMA update, skipped where `skip` (a 0-d bool on the device) is set: read on
    the host when `on_host`, else applied as a mask on the device with no host read."""
    model, optimizer, scaler, ema, cfg = run.train_model, run.optimizer, run.scaler, run.ema, run.cfg
    if on_host:
        if not bool(skip):
            _optimizer_step(model, optimizer, scaler, cfg.optim.grad_clip)
            if ema is not None:
                ema_update(ema, unwrap(model), cfg.ema.decay, skip)
        return
    _clip(model, optimizer, scaler, cfg.optim.grad_clip)
    masked_step(optimizer, skip)
    if ema is not None:
        ema_update(ema, unwrap(model), cfg.ema.decay, skip)


def _forward_backward(
    run: RunState, batches: Any, generator: torch.Generator, mix: bool
) -> tuple[torch.Tensor, int]:
    """The `cfg.accumulation` micro-batches of one optimizer step, forward and backward; returns their mean
    loss (float (), on the device) and the number of images (this process)."""
    model, cfg = run.train_model, run.cfg
    accum = cfg.accumulation
    mark_step = cfg.compile and cfg.compile_mode == "reduce-overhead"
    step_loss = torch.zeros((), device=run.device)
    images = 0
    for micro in range(accum):
        x_u8, labels = next(batches)
        x, targets = run.augment(x_u8, labels, generator=generator, mix=mix)
        sync = micro == accum - 1 or not hasattr(model, "no_sync")
        if mark_step:  # CUDA graphs: a new iteration begins (outputs of the previous replay may be reused)
            torch.compiler.cudagraph_mark_step_begin()
        with contextlib.nullcontext() if sync else model.no_sync(), autocast(run.device, run.amp_dtype):
            logits = model(x)
        loss = loss_fn(logits, targets, cfg.label_smoothing)
        run.scaler.scale(loss / accum).backward()
        step_loss += loss.detach() / accum
        images += labels.shape[0]
    return step_loss, images


def _clip(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float | None
) -> None:
    """Unscale and clip the global grad norm to `grad_clip` (no-op for None); no host sync."""
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), grad_clip)


def _optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float | None
) -> None:
    """Unscale and clip the global grad norm (if `grad_clip`), step, update the scaler."""
    _clip(model, optimizer, scaler, grad_clip)
    scaler.step(optimizer)
    scaler.update()


def _fused(optimizer: torch.optim.Optimizer) -> bool:
    return all(group.get("fused") for group in optimizer.param_groups)


def masked_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """`optimizer.step()`, or nothing at all where `skip` (bool (), on the device) is true, decided on the
    device: the weights and every optimizer state tensor stay bit for bit as they were.

    A fused Adam(W) takes `skip` as its `found_inf` input (as GradScaler passes it): its kernel leaves the
    weights and moments alone and the step count is taken back. Other optimizers step, and then their
    previous values are put back with `torch.where` (state that did not exist yet comes back as zeros, the
    initial state of AdamW). With a non-fused optimizer on CUDA the step counts live on the CPU, so putting
    them back waits for the device; use fused AdamW there.
    """
    if _fused(optimizer):
        optimizer.grad_scale = None  # type: ignore[attr-defined]
        optimizer.found_inf = skip.float()  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    before = [p.detach().clone() for p in params]
    state_before = [
        {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)} for p in params
    ]
    optimizer.step()
    with torch.no_grad():
        for p, old, old_state in zip(params, before, state_before, strict=True):
            p.copy_(torch.where(skip, old, p))
            for key, value in optimizer.state[p].items():
                if torch.is_tensor(value):
                    previous = old_state.get(key, torch.zeros_like(value))
                    value.copy_(torch.where(skip.to(value.device), previous, value))


def ema_update(
    ema: torch.optim.swa_utils.AveragedModel, model: nn.Module, decay: float, skip: torch.Tensor
) -> None:
    """The EMA of the weights after an optimizer step, on the device: `ema = ema * (1 - w) + p * w` with
    w = 1 for the first update (a copy), `1 - decay` after it, and 0 where `skip` (bool ()): unchanged.

    `ema.n_averaged` (on the device) counts the updates made.
    """
    averaged = list(ema.module.parameters())
    current = [p.detach() for p in model.parameters()]
    first = ema.n_averaged == 0
    weight = torch.where(skip, 0.0, torch.where(first, 1.0, 1.0 - decay)).to(averaged[0].dtype)
    weight = weight.to(averaged[0].device)
    with torch.no_grad():
        scaled = torch._foreach_mul(current, weight)
        torch._foreach_mul_(averaged, 1.0 - weight)
        torch._foreach_add_(averaged, scaled)
        ema.n_averaged += (~skip).long().to(ema.n_averaged.device)


def progress_update(progress: Any, tally: StepTally, lr: float, done: int, images: int, start: float) -> None:
    """Advance a tqdm bar to `done` steps with the epoch's mean loss at the last read, the learning rate and
    images/s (no-op for None)."""
    if progress is None:
        return
    progress.update(done - progress.n)
    loss = tally.last[0] / tally.last[1] if tally.last[1] else float("nan")
    seconds = time.perf_counter() - start
    progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{images / seconds:.0f}")
