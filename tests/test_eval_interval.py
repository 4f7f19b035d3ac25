"""Evaluation at an interval (`evaluation.every_epochs` / `every_seconds`, always after the last epoch), plots
drawn only at the end (`plots: end`), a time budget that holds every evaluation, and a run stopped while it
compiles: what happens when, and that none of it changes what the run computes."""

import signal
import time
from pathlib import Path

import pytest
import torch

import tinyswin.rundir as rundir_module
import tinyswin.train as train_module
from test_train import make_tiny_cache, tiny_run_overrides
from tinyswin.budget import BudgetClock, evaluated_fraction, plan_budget
from tinyswin.checkpoint import load_checkpoint
from tinyswin.config import EvaluationConfig, apply_overrides, load_config
from tinyswin.errors import Interrupted
from tinyswin.plots import read_metrics
from tinyswin.rundir import format_epoch
from tinyswin.runtime import DistContext
from tinyswin.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
EPOCHS = 5


def _quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 classes x 8 train images: 2 steps an epoch at batch 16; 4 x 4 val images
    return make_tiny_cache(tmp_path_factory.mktemp("data") / "tiny", train_per_class=8, val_per_class=4)


def _config(cache: Path, *extra: str, epochs: int = EPOCHS):
    return load_config(None, None, [*tiny_run_overrides(cache, epochs), *extra])


def _evaluated(run_dir: Path) -> list[int]:
    return [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl") if "val_top1" in r]


@pytest.fixture(scope="module")
def every_epoch(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "every"
    train(_config(cache), run_dir, progress=False, log=_quiet)
    return run_dir


def test_every_k_epochs_evaluates_those_and_the_last_and_trains_the_same(
    every_epoch: Path, cache: Path, tmp_path: Path
) -> None:
    lines: list[str] = []
    summary = train(
        _config(cache, "evaluation.every_epochs=2"), tmp_path / "k", progress=False, log=lines.append
    )
    assert _evaluated(every_epoch) == [1, 2, 3, 4, 5]
    assert _evaluated(tmp_path / "k") == [2, 4, 5]
    records = read_metrics(tmp_path / "k" / "metrics.jsonl")
    assert "ema_val_top1" in records[1] and "ema_val_top1" not in records[0]
    # evaluating less often changes nothing in training: the same weights, EMA and losses
    a, b = load_checkpoint(every_epoch / "last.pt"), load_checkpoint(tmp_path / "k" / "last.pt")
    for part in ("model", "ema"):
        assert all(torch.equal(t, b[part][name]) for name, t in a[part].items()), part
    every = read_metrics(every_epoch / "metrics.jsonl")
    assert [r["train_loss"] for r in records] == [r["train_loss"] for r in every]
    for epoch in (2, 4, 5):  # and the evaluations it makes are those of the run that evaluates every epoch
        assert records[epoch - 1]["val_top1"] == every[epoch - 1]["val_top1"]
    # best.pt: the best of the evaluated epochs; the summary: the last epoch's evaluation
    best = max((2, 4, 5), key=lambda e: (every[e - 1]["val_top1"], -e))
    assert summary["best_epoch"] == best == load_checkpoint(tmp_path / "k" / "best.pt")["epoch"]
    assert summary["val_top1"] == every[-1]["val_top1"]
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert ["val loss" in line for line in epoch_lines] == [False, True, False, True, True]


def test_every_seconds_alone_evaluates_when_the_time_has_passed_and_at_the_end(
    cache: Path, tmp_path: Path
) -> None:
    never = _config(cache, "evaluation.every_epochs=null", "evaluation.every_seconds=1e6")
    train(never, tmp_path / "end", progress=False, log=_quiet)
    assert _evaluated(tmp_path / "end") == [EPOCHS]  # only the last epoch
    often = _config(cache, "evaluation.every_epochs=null", "evaluation.every_seconds=1e-9")
    train(often, tmp_path / "often", progress=False, log=_quiet)
    assert _evaluated(tmp_path / "often") == list(range(1, EPOCHS + 1))


def test_plots_at_the_end_are_drawn_once_and_on_a_stop(cache: Path, tmp_path: Path, monkeypatch) -> None:
    drawn: list[int] = []
    original = rundir_module.plot_run

    def spy(run_dir):
        drawn.append(len(read_metrics(Path(run_dir) / "metrics.jsonl")))
        return original(run_dir)

    monkeypatch.setattr(rundir_module, "plot_run", spy)
    train(_config(cache, "plots=end"), tmp_path / "end", progress=False, log=_quiet)
    assert drawn == [EPOCHS]  # once, with every epoch
    assert {p.name for p in (tmp_path / "end" / "plots").glob("*.png")} == {
        "loss.png",
        "accuracy.png",
        "lr.png",
    }
    drawn.clear()

    def interrupt_after_epoch_2(line: str) -> None:
        if line.startswith("epoch 2/"):
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(Interrupted):
        train(_config(cache, "plots=end"), tmp_path / "stop", progress=False, log=interrupt_after_epoch_2)
    assert drawn == [2]
    drawn.clear()
    train(_config(cache, epochs=2), tmp_path / "epoch", progress=False, log=_quiet)
    assert drawn[-1] == 2 and drawn[0] == 1  # `plots: epoch` (the default) redraws as the run goes


def test_a_signal_while_compiling_stops_at_once_writing_nothing(
    cache: Path, tmp_path: Path, monkeypatch
) -> None:
    original = train_module.Run.warm_up

    def warm_up_signalled(run) -> float:
        signal.raise_signal(signal.SIGTERM)  # as `timeout` does during a long compilation
        raise AssertionError("the signal did not stop the warm-up")

    monkeypatch.setattr(train_module.Run, "warm_up", warm_up_signalled)
    run_dir = tmp_path / "run"
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stopped:
        train(_config(cache, "warmup_steps=1", epochs=2), run_dir, progress=False, log=_quiet)
    assert stopped.value.signum == signal.SIGTERM
    assert "stopped while compiling" in str(stopped.value) and "--resume" in str(stopped.value)
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == []
    assert signal.getsignal(signal.SIGTERM) == handler  # the handlers are gone again
    monkeypatch.setattr(train_module.Run, "warm_up", original)
    summary = train(
        _config(cache, "warmup_steps=1", epochs=2), run_dir, resume=True, progress=False, log=_quiet
    )
    assert summary["epochs"] == 2  # started from the beginning


def test_the_budget_plan_holds_every_evaluation_and_the_last_in_full() -> None:
    every = EvaluationConfig()
    assert evaluated_fraction(every, 10.0) == 1.0
    assert evaluated_fraction(EvaluationConfig(every_epochs=4), 10.0) == 0.25
    assert evaluated_fraction(EvaluationConfig(every_epochs=None, every_seconds=25.0), 10.0) == 1 / 3
    assert evaluated_fraction(EvaluationConfig(every_epochs=2, every_seconds=25.0), 10.0) == 0.5
    assert evaluated_fraction(EvaluationConfig(every_epochs=None, every_seconds=5.0), 10.0) == 1.0
    assert evaluated_fraction(EvaluationConfig(every_epochs=None, every_seconds=None), 10.0) == 0.0
    base = apply_overrides(load_config("seed"), ["time_budget=100"])
    kwargs = {
        "sec_per_step": 0.1,
        "eval_seconds": 4.0,
        "iters_per_epoch": 60,
        "steps_done": 60,
        "elapsed": 0.0,
    }
    plan = plan_budget(base, **kwargs)  # 6 s of steps + 4 s of evaluation an epoch, the first one done
    assert plan["epoch_seconds"] == pytest.approx(10.0) and plan["eval_fraction"] == 1.0
    assert plan["schedule"]["epochs"] == 1 + int((100 / 1.03 - 4) // 10) == 10
    rare = plan_budget(apply_overrides(base, ["evaluation.every_epochs=4"]), **kwargs)
    # 6 s + 1 s of evaluation an epoch, and 3 s more for the last epoch's, evaluated in full
    assert rare["epoch_seconds"] == pytest.approx(7.0) and rare["eval_fraction"] == 0.25
    assert rare["schedule"]["epochs"] == 1 + int((100 / 1.03 - 1 - 3) // 7) == 14


def test_the_budget_clock_keeps_the_last_evaluation_inside_the_budget() -> None:
    started = time.perf_counter() - 9.0  # 9 s of a 10 s budget gone
    assert not BudgetClock(10.0, started, DistContext(), torch.device("cpu"))()
    assert BudgetClock(10.0, started, DistContext(), torch.device("cpu"), reserve=1.5)()


def test_format_epoch_leaves_out_a_split_that_was_not_evaluated() -> None:
    record = {"epoch": 3, "train_loss": 1.0, "lr": 1e-3, "images_per_s": 10.0, "seconds": 2.0}
    line = format_epoch(record, ["val"], 9)
    assert line.startswith("epoch 3/9  train loss 1.0000  lr 0.001") and "val" not in line
