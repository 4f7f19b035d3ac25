"""schedule.shape: the learning rate after the warm-up falls as a cosine (default) or a straight line."""

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch

from test_train import _assert_same_run, make_tiny_cache, tiny_overrides
from tinyswin.budget import compress_schedule
from tinyswin.checkpoint import load_checkpoint
from tinyswin.config import ScheduleConfig, config_preset_names, load_config
from tinyswin.errors import ConfigError
from tinyswin.optim import WarmupCosine, schedule_lr
from tinyswin.plots import read_metrics, schedule_curve
from tinyswin.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

PEAK, START, MIN_LR = 0.8, 0.1, 0.05
ITERS, EPOCHS, WARMUP = 10, 10, 2.0


def _by_hand(
    step: int, shape: str, *, per_iteration: bool = True, epochs: float = EPOCHS, warmup: float = WARMUP
) -> float:
    """The rate of `step`, written out: linear warm-up, then cosine or linear from PEAK to MIN_LR."""
    t = step / ITERS if per_iteration else float(step // ITERS)
    if t < warmup:
        return PEAK * (START + (1 - START) * t / warmup)
    p = min((t - warmup) / (epochs - warmup), 1.0)
    if shape == "cosine":
        return MIN_LR + (PEAK - MIN_LR) * (1 + math.cos(math.pi * p)) / 2
    return MIN_LR + (PEAK - MIN_LR) * (1 - p)


def _scheduler(shape: str, per_iteration: bool = True, min_lr: float = MIN_LR) -> WarmupCosine:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return WarmupCosine(
        opt, PEAK, iters_per_epoch=ITERS, epochs=EPOCHS, warmup_epochs=WARMUP, warmup_start=START,
        min_lr=min_lr, per_iteration=per_iteration, shape=shape,
    )  # fmt: skip


def _rates(sched: WarmupCosine, steps: int) -> list[float]:
    """The rate the optimizer holds before each of the first `steps` steps."""
    taken = []
    for _ in range(steps):
        taken.append(sched.optimizer.param_groups[0]["lr"])
        sched.step()
    return taken


@pytest.mark.parametrize("per_iteration", [True, False])
@pytest.mark.parametrize("shape", ["cosine", "linear"])
def test_rate_at_chosen_steps_is_the_formula_by_hand(shape: str, per_iteration: bool) -> None:
    taken = _rates(_scheduler(shape, per_iteration), EPOCHS * ITERS + 5)
    # warm-up (start, inside), its end, a quarter and three quarters of the decay, the end, after the end
    for step in (0, 5, 13, 20, 40, 45, 80, 99, 100, 104):
        expected = _by_hand(step, shape, per_iteration=per_iteration)
        assert taken[step] == pytest.approx(expected, rel=1e-12), step
    assert taken[20] == pytest.approx(PEAK, rel=1e-12)
    assert taken[100] == pytest.approx(MIN_LR, rel=1e-12)


def test_the_shapes_differ_inside_the_decay_and_agree_at_its_ends() -> None:
    cosine, linear = _rates(_scheduler("cosine"), 101), _rates(_scheduler("linear"), 101)
    assert cosine[:21] == linear[:21]  # the same warm-up
    assert cosine[40] > linear[40] and cosine[80] < linear[80]  # cosine above the line early, below late
    assert cosine[60] == pytest.approx(linear[60], rel=1e-12)  # half-way both are at the mean
    assert cosine[100] == linear[100] == pytest.approx(MIN_LR, rel=1e-12)
    steps = [b - a for a, b in itertools.pairwise(linear[20:101])]
    assert steps == pytest.approx([-(PEAK - MIN_LR) / 80] * 80, rel=1e-12)  # a straight line


def test_linear_to_zero_ends_at_zero() -> None:
    taken = _rates(_scheduler("linear", min_lr=0.0), 102)
    assert taken[100] == 0.0 and taken[101] == 0.0
    assert taken[90] == pytest.approx(PEAK * 10 / 80, rel=1e-12)


def test_an_unknown_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="'step'"):
        _scheduler("step")
    with pytest.raises(ValueError, match="'exp'"):
        schedule_lr(5.0, 1.0, epochs=10, warmup_epochs=1, warmup_start=0.1, min_lr=0.0, shape="exp")
    with pytest.raises(ConfigError) as info:
        load_config(None, None, ["schedule.shape=exp"])
    assert str(info.value) == "override: schedule.shape='exp': expected one of 'cosine', 'linear'"


def test_presets_keep_the_cosine() -> None:
    for name in config_preset_names():
        assert load_config(name).schedule.shape == "cosine", name
    assert load_config("default", None, ["schedule.shape=linear"]).schedule.shape == "linear"


def test_a_replanned_schedule_keeps_the_shape() -> None:
    schedule = dataclasses.asdict(ScheduleConfig(shape="linear", epochs=EPOCHS, warmup_epochs=WARMUP))
    compressed = compress_schedule(schedule, 4)
    assert compressed["shape"] == "linear" and compressed["epochs"] == 4
    assert dataclasses.replace(ScheduleConfig(), **compressed).shape == "linear"
    sched = _scheduler("linear")
    taken = _rates(sched, 6)
    sched.reschedule(epochs=4, warmup_epochs=compressed["warmup_epochs"])  # what TimeBudget does
    taken += _rates(sched, 40)
    assert all(seg["shape"] == "linear" for seg in sched.segments) and len(sched.segments) == 2
    for step in (6, 7, 10, 25, 39, 40, 45):  # from the plan on: linear over 4 epochs, a 0.8-epoch warm-up
        expected = _by_hand(step, "linear", epochs=4, warmup=compressed["warmup_epochs"])
        assert taken[step] == pytest.approx(expected, rel=1e-12), step
    assert taken[5] == pytest.approx(_by_hand(5, "linear"), rel=1e-12)  # before it: the first schedule


def _records(schedule: dict, last_step: int) -> list[dict]:
    """metrics.jsonl records: the first epoch's with the schedule, the last one's step."""
    return [{"epoch": 1, "step": ITERS, "lr_schedule": schedule}, {"epoch": 10, "step": last_step}]


def test_the_lr_plot_follows_the_shape() -> None:
    for shape in ("cosine", "linear"):
        sched = _scheduler(shape)
        taken = _rates(sched, 30)
        sched.reschedule(epochs=6, warmup_epochs=1.0)  # a plan part-way: the plot draws both pieces
        taken += _rates(sched, 31)
        xs, ys = schedule_curve(_records(sched.describe(), 60))["schedule (per step)"]
        assert xs == [step / ITERS for step in range(61)]
        assert ys == taken, shape
    linear = schedule_curve(_records(_scheduler("linear").describe(), 100))["schedule (per step)"][1]
    cosine = schedule_curve(_records(_scheduler("cosine").describe(), 100))["schedule (per step)"][1]
    assert linear[40] == pytest.approx(_by_hand(40, "linear"), rel=1e-12) != cosine[40]


def test_records_and_checkpoints_without_a_shape_are_cosine() -> None:
    sched = _scheduler("cosine")
    old = sched.describe()
    old["segments"] = [{k: v for k, v in seg.items() if k != "shape"} for seg in old["segments"]]
    ys = schedule_curve(_records(old, 100))["schedule (per step)"][1]
    assert ys == pytest.approx([_by_hand(step, "cosine") for step in range(101)], rel=1e-12)
    resumed = _scheduler("cosine")
    resumed.load_state_dict({"steps": 30, **old})
    assert resumed.segments == sched.segments  # the same schedule: no new segment
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(_by_hand(30, "cosine"), rel=1e-12)


def test_a_resumed_linear_run_is_bit_exact(tmp_path: Path) -> None:
    cache = make_tiny_cache(tmp_path / "data", train_per_class=20, val_per_class=5)  # 80 images: 5 steps
    cfg = load_config(None, None, [*tiny_overrides(cache, 3), "schedule.shape=linear", "schedule.min_lr=0"])
    train(cfg, tmp_path / "reference", progress=False, log=lambda _m: None)

    class Stop(Exception):
        pass

    def stop_after_epoch_2(line: str) -> None:
        if line.startswith("epoch 2/"):
            raise Stop

    with pytest.raises(Stop):
        train(cfg, tmp_path / "resumed", progress=False, log=stop_after_epoch_2)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 2
    train(cfg, tmp_path / "resumed", resume=True, progress=False, log=lambda _m: None)
    _assert_same_run(tmp_path / "reference", tmp_path / "resumed")
    segments = load_checkpoint(tmp_path / "resumed" / "last.pt")["scheduler"]["segments"]
    assert [seg["shape"] for seg in segments] == ["linear"]
    peak, warmup = cfg.peak_lr(), cfg.schedule.warmup_epochs
    for record in read_metrics(tmp_path / "resumed" / "metrics.jsonl"):  # the lr of each epoch's last step
        t = (record["step"] - 1) / 5
        assert record["lr"] == pytest.approx(peak * (1 - (t - warmup) / (3 - warmup)), rel=1e-12)
