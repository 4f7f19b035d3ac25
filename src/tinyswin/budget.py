"""The time budget of a run (`time_budget` seconds): plan the schedule to fit, replan, stop in time.

The budget counts wall time from the start of the run (setup included, the warm-up before the first epoch
left out: `warmup_steps`), across resumes. In the first epoch
a few steps are timed (the first, which warms up kernels and allocations, is not), evaluation is timed on
warm batches, and the schedule section is compressed (or stretched) to the epochs that fit (`plan_budget`);
the learning-rate scheduler follows the plan from the next step. After each epoch the remaining epochs are
fitted to the remaining time (`replan`): after the first epoch in either direction, later only fewer. When
the budget runs out inside an epoch, the epoch ends there and so does the run.

`TimeBudget` is the one object the training loop talks to: `on_step`, `should_stop`, `after_epoch`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from tinyswin.config import EvaluationConfig, ScheduleConfig, TrainConfig
from tinyswin.optim import WarmupCosine
from tinyswin.runstate import LoopState
from tinyswin.runtime import DistContext, broadcast_from_rank0

LogFn = Callable[[str], None]
_SPARE = 1.03  # 3% of the budget kept for checkpoints and plots


def compress_schedule(schedule: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The schedule section stretched or compressed to `epochs`: warm-up and mixing-off epochs scale with it.

    Warm-up scales exactly (it may become fractional); the mixing-off counts are rounded, and stay at least 1
    where they were at least 1. A compressed schedule is stepped every iteration, so that its shape survives
    a handful of epochs (stepped per epoch, a 10-of-200-epoch warm-up squeezed into a few epochs would hold
    the whole first epoch at the starting rate).
    """
    factor = epochs / schedule["epochs"]

    def count(value: int) -> int:
        return 0 if value <= 0 else max(1, round(value * factor))

    return {
        **schedule,
        "epochs": epochs,
        "warmup_epochs": schedule["warmup_epochs"] * factor,
        "mix_off_first_epochs": count(schedule["mix_off_first_epochs"]),
        "mix_off_last_epochs": count(schedule["mix_off_last_epochs"]),
        "step": "iteration" if factor < 1 else schedule["step"],
    }


def fitting_epochs(seconds_left: float, epoch_seconds: float) -> int:
    """How many whole epochs of `epoch_seconds` fit in `seconds_left` (at least 1)."""
    return max(1, int(seconds_left // max(epoch_seconds, 1e-9)))


def evaluated_fraction(evaluation: EvaluationConfig, epoch_seconds: float) -> float:
    """The share of epochs that `evaluation`'s interval evaluates, for epochs of `epoch_seconds` (1: every
    epoch; 0: only the last, which is always evaluated besides)."""
    fractions = [0.0]
    if evaluation.every_epochs is not None:
        fractions.append(1 / evaluation.every_epochs)
    if evaluation.every_seconds is not None:
        fractions.append(1 / max(1, math.ceil(evaluation.every_seconds / max(epoch_seconds, 1e-9))))
    return max(fractions)


def plan_budget(
    cfg: TrainConfig,
    *,
    sec_per_step: float,
    eval_seconds: float,
    iters_per_epoch: int,
    steps_done: int,
    elapsed: float,
) -> dict[str, Any]:
    """The plan of a time-budgeted run, made during its first epoch from the measured speed.

    With `elapsed` seconds gone (setup included) and `steps_done` steps of the first epoch taken, the rest of
    that epoch plus N - 1 more epochs (each `sec_per_step * iters_per_epoch`, plus the evaluation's
    `eval_seconds` in the share of epochs that `cfg.evaluation` evaluates), the last epoch's evaluation in
    full, and 3% spare for checkpoints and plots must fit in what is left of `cfg.time_budget`: the budget
    holds every evaluation. The schedule section is then compressed (or stretched) to N epochs, see
    `compress_schedule`.
    """
    assert cfg.time_budget is not None
    fraction = evaluated_fraction(cfg.evaluation, sec_per_step * iters_per_epoch)
    epoch_seconds = sec_per_step * iters_per_epoch + eval_seconds * fraction
    first_rest = sec_per_step * (iters_per_epoch - steps_done) + eval_seconds * fraction
    left = (cfg.time_budget - elapsed) / _SPARE - first_rest - eval_seconds * (1 - fraction)
    epochs = 1 + (fitting_epochs(left, epoch_seconds) if left >= epoch_seconds else 0)
    original = dataclasses.asdict(cfg.schedule)
    return {
        "budget_s": cfg.time_budget,
        "sec_per_step": sec_per_step,
        "eval_seconds": eval_seconds,
        "eval_fraction": fraction,
        "epoch_seconds": epoch_seconds,
        "planned_at_s": elapsed,
        "original_schedule": original,
        "schedule": compress_schedule(original, epochs),
        "replanned": [],
    }


def replan(
    schedule: ScheduleConfig, budget_s: float, state: LoopState, epoch_times: list[float], say: LogFn
) -> ScheduleConfig:
    """After an epoch: the remaining epochs fitted into the remaining budget (after the first epoch in either
    direction, later only fewer), the last epoch's evaluation included; the run stops at a checkpoint when no
    further epoch fits.

    The time per epoch is the mean of the last three; the decision is appended to `state.plan["replanned"]`.
    """
    assert state.plan is not None
    recent = epoch_times[-3:]
    epoch_seconds = sum(recent) / len(recent)
    plan = state.plan
    last_eval = plan.get("eval_seconds", 0.0) * (1 - plan.get("eval_fraction", 1.0))  # the end's, unless in
    left = budget_s - state.train_seconds - last_eval
    fit = state.epoch + (int(left // epoch_seconds) if left > 0 else 0)
    planned = schedule.epochs
    first = not state.plan["replanned"]
    new = max(fit, state.epoch) if first else min(planned, max(fit, state.epoch))
    state.plan["replanned"].append(
        {"after_epoch": state.epoch, "epochs": new, "epoch_seconds": epoch_seconds}
    )
    if new == planned:
        return schedule
    compressed = compress_schedule(state.plan["original_schedule"], new)
    state.plan["schedule"] = compressed
    if new == state.epoch:
        say(f"time budget: no further epoch fits in the {budget_s:.0f} s budget; stopping")
    else:
        say(f"time budget: {epoch_seconds:.1f} s per epoch -> {new} epochs in all")
    return dataclasses.replace(schedule, **compressed)


def time_evaluation(
    run_batch: Callable[[Any], None], batches: Iterable[tuple[Any, int]], passes: int, world_size: int
) -> float:
    """Seconds one evaluation takes, estimated from one batch of each split.

    Each batch is run once untimed (a compiled model builds its graph on a cold call, and allocations
    settle), then once timed; its time per image is scaled to the split.

    Args:
        run_batch: evaluates one batch (including any wait for the device).
        batches: (batch, images in the whole split) per split.
        passes: evaluations per epoch (2 with EMA weights beside the raw ones).
        world_size: processes sharing each split.
    """
    seconds = 0.0
    for batch, total in batches:
        run_batch(batch)  # warm-up: compilation, allocation
        start = time.perf_counter()
        run_batch(batch)
        per_image = (time.perf_counter() - start) / batch[1].shape[0]
        seconds += per_image * total / world_size * passes
    return seconds


class BudgetClock:
    """`should_stop` of a time-budgeted epoch: True once the run's wall time passes the budget less `reserve`
    (the evaluation that follows a stop, which the budget holds too).

    With several processes, rank 0's clock decides for all, by a broadcast on `device` every `every` steps
    (a broadcast waits for the device, so not every step; the run may overshoot by `every - 1` steps).
    """

    def __init__(
        self,
        budget: float,
        clock_start: float,
        dist: DistContext,
        device: torch.device,
        every: int = 8,
        reserve: float = 0.0,
    ) -> None:
        self.budget = budget
        self.clock_start = clock_start
        self.dist = dist
        self.device = device
        self.every = every
        self.reserve = reserve
        self.calls = 0

    def __call__(self) -> bool:
        over = time.perf_counter() - self.clock_start > self.budget - self.reserve
        if self.dist.world_size == 1:
            return over
        self.calls += 1
        if self.calls % self.every:
            return False  # every process skips the same steps
        flag = torch.tensor([over], dtype=torch.uint8)
        return bool(broadcast_from_rank0(flag, self.dist, self.device)[0])


class TimeBudget:
    """The time budget of one run, as the training loop sees it.

    Args:
        cfg: the run's config (`cfg.time_budget` seconds).
        state: the loop state; its `plan` is set in the first epoch and kept in checkpoints.
        scheduler: switched to each new plan from the next step.
        iters_per_epoch: optimizer steps per full epoch.
        wall_start: `time.perf_counter()` at the start of this process's run.
        measure_eval: seconds one evaluation of an epoch takes (timed when the plan is made).
        dist, device: rank 0's clock and measurements decide for every process.
        say: where the plan's messages go.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        state: LoopState,
        scheduler: WarmupCosine,
        iters_per_epoch: int,
        wall_start: float,
        measure_eval: Callable[[], float],
        dist: DistContext,
        device: torch.device,
        say: LogFn,
    ) -> None:
        assert cfg.time_budget is not None
        if state.plan is not None and state.plan["budget_s"] != cfg.time_budget:
            raise ValueError(
                f"time_budget={cfg.time_budget}: this run was planned for {state.plan['budget_s']} s"
            )
        if state.plan is None and state.step > 0:
            raise ValueError(
                "time_budget can only be set when a run starts (its plan is made in the first epoch)"
            )
        self.cfg = cfg
        self.seconds = cfg.time_budget
        self.state = state
        self.scheduler = scheduler
        self.iters_per_epoch = iters_per_epoch
        self.wall_start = wall_start
        self.clock_start = wall_start - state.train_seconds  # wall time counts across resumes
        self.measure_eval = measure_eval
        self.dist = dist
        self.device = device
        self.say = say
        self.epoch_times: list[float] = []
        self.clock = BudgetClock(self.seconds, self.clock_start, dist, device)
        self._first_timed: float | None = None  # end of the first (untimed) step of the first epoch
        self._new_plan = False
        self._previous_end: float | None = None  # state.train_seconds after the previous epoch

    def start_epoch(self) -> None:
        """Reset the per-epoch clock (every process counts its steps from here)."""
        reserve = self._reserve()
        self.clock = BudgetClock(self.seconds, self.clock_start, self.dist, self.device, reserve=reserve)

    def _reserve(self) -> float:
        """Seconds kept for the evaluation after a stop inside an epoch (the plan's measure; 0 before it)."""
        return float(self.state.plan.get("eval_seconds", 0.0)) if self.state.plan is not None else 0.0

    def should_stop(self) -> bool:
        """True once the budget has run out (asked after every optimizer step)."""
        return self.clock()

    def on_step(self, done: int) -> None:
        """After step `done` of an epoch: while no plan exists, time steps and make it.

        The first step is not timed; then up to 5 steps, or fewer if they take more than 3% of the budget.
        While timing, each step waits for the device (the loop itself does not, see `engine`), so that the
        time measured is the device's and not that of queueing its work.
        """
        if self.state.plan is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self._first_timed is None:
            self._first_timed = now
            if self.iters_per_epoch > 1:
                return
        timed = done - 1
        spent = now - self._first_timed
        if timed < 5 and spent < 0.03 * self.seconds and done < self.iters_per_epoch:
            return
        sec_per_step = spent / timed if timed > 0 else now - self.wall_start
        measured = torch.tensor([sec_per_step, self.measure_eval()], dtype=torch.float64)
        measured = broadcast_from_rank0(measured, self.dist, self.device)  # every rank follows rank 0
        plan = plan_budget(
            self.cfg,
            sec_per_step=float(measured[0]),
            eval_seconds=float(measured[1]),
            iters_per_epoch=self.iters_per_epoch,
            steps_done=done,
            elapsed=time.perf_counter() - self.wall_start,
        )
        self._reschedule(plan["schedule"])
        self.state.plan = plan
        self.clock.reserve = self._reserve()
        self._new_plan = True

    def _reschedule(self, schedule: dict[str, Any]) -> None:
        self.scheduler.reschedule(
            epochs=schedule["epochs"],
            warmup_epochs=schedule["warmup_epochs"],
            per_iteration=schedule["step"] == "iteration",
        )

    def after_epoch(
        self, schedule: ScheduleConfig, steps: int, epoch_seconds: float
    ) -> ScheduleConfig | None:
        """After an epoch (evaluated, `state.epoch` and `state.train_seconds` updated): the new schedule, if
        the plan changed it, else None.

        Args:
            schedule: the schedule the run follows now.
            steps: optimizer steps this epoch took (fewer than an epoch's: the budget ran out in it).
            epoch_seconds: wall time of the epoch's steps and evaluation.
        """
        state = self.state
        # an epoch costs its steps and evaluation plus what follows it (checkpoints, metrics, plots): from the
        # second epoch on, the wall time since the previous epoch's end
        cycle = epoch_seconds if self._previous_end is None else state.train_seconds - self._previous_end
        self._previous_end = state.train_seconds
        self.epoch_times.append(max(cycle, epoch_seconds))
        new = None
        if self._new_plan:
            self._new_plan = False
            new = dataclasses.replace(schedule, **state.plan["schedule"])
            plan = state.plan
            self.say(
                f"time budget {plan['budget_s']:.0f} s: {plan['sec_per_step'] * 1000:.0f} ms per step, "
                f"~{plan['epoch_seconds']:.1f} s per epoch -> {new.epochs} epochs "
                f"(warm-up {new.warmup_epochs:.2f})"
            )
        current = new or schedule
        first_replan = state.plan is not None and not state.plan["replanned"]
        if steps < self.iters_per_epoch:  # the budget ran out inside the epoch: the run ends here
            self.say(f"time budget: {self.seconds:.0f} s reached after {steps} steps of epoch {state.epoch}")
            if state.plan is None:
                state.plan = {"budget_s": self.seconds, "original_schedule": dataclasses.asdict(schedule)}
            state.plan["stopped"] = {"epoch": state.epoch, "steps": steps}
            return dataclasses.replace(current, epochs=state.epoch)
        if state.epoch < current.epochs or first_replan:
            replanned = replan(current, self.seconds, state, self.epoch_times, self.say)
            self._reschedule(dataclasses.asdict(replanned))
            return replanned if replanned != schedule else new
        return new
