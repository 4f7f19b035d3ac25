"""Checkpoints at an interval (`checkpoint.every_epochs` / `every_seconds`), best.pt without optimizer
state, and the warm-up before the clock (`warmup_steps`): what is written when, and that neither changes
what a run computes or how it resumes."""

import signal
import time
from pathlib import Path

import pytest
import torch
import torch._dynamo  # the first AdamW would import it: seconds that would count in the budget test

import tinyswin.rundir as rundir_module
import tinyswin.train as train_module
from test_train import TIMING_KEYS, make_tiny_cache, tiny_run_overrides
from tinyswin.checkpoint import RESUME_ONLY, load_checkpoint
from tinyswin.config import load_config
from tinyswin.errors import Interrupted
from tinyswin.evaluate import evaluate_checkpoint
from tinyswin.plots import read_metrics
from tinyswin.rundir import checkpoint_due
from tinyswin.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
EPOCHS = 4
INTERVAL = ["checkpoint.every_epochs=2", "sync_every=3"]  # the loss read every 3 of 4 steps


def _quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 classes x 16 train images: 4 steps an epoch at batch 16; 4 x 4 val images
    return make_tiny_cache(tmp_path_factory.mktemp("data") / "tiny", train_per_class=16, val_per_class=4)


def _config(cache: Path, *extra: str, epochs: int = EPOCHS):
    return load_config(None, None, [*tiny_run_overrides(cache, epochs), *extra])


def _spy_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(file name, epoch) of every checkpoint the run directory writes, in order."""
    writes: list[tuple[str, int]] = []
    original = rundir_module.atomic_save

    def spy(obj, path):
        writes.append((Path(path).name, obj["epoch"]))
        return original(obj, path)

    monkeypatch.setattr(rundir_module, "atomic_save", spy)
    return writes


@pytest.fixture(scope="module")
def interval_run(tmp_path_factory: pytest.TempPathFactory, cache: Path):
    """The uninterrupted run with last.pt every 2 epochs: its directory, summary and checkpoint writes."""
    run_dir = tmp_path_factory.mktemp("runs") / "interval"
    with pytest.MonkeyPatch.context() as patch:
        writes = _spy_writes(patch)
        summary = train(_config(cache, *INTERVAL), run_dir, progress=False, log=_quiet)
    return run_dir, summary, writes


def _assert_same_run(a: Path, b: Path) -> None:
    """Same weights, EMA, optimizer state and metrics (timings and compile times aside)."""
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert ca["epoch"] == cb["epoch"] and ca["step"] == cb["step"]
    for part in ("model", "ema"):
        for name, tensor in ca[part].items():
            assert torch.equal(tensor, cb[part][name]), (part, name)
    for index, entries in ca["optimizer"]["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, cb["optimizer"]["state"][index][key]), (index, key)
    skip = TIMING_KEYS | {"compile_seconds"}
    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [{k: v for k, v in r.items() if k not in skip} for r in ra] == [
        {k: v for k, v in r.items() if k not in skip} for r in rb
    ]


def test_checkpoint_due_by_epochs_or_seconds_whichever_first() -> None:
    assert checkpoint_due(1, None, 1, 0.0)
    assert not checkpoint_due(3, None, 2, 1e9)
    assert checkpoint_due(3, None, 3, 0.0)
    assert not checkpoint_due(None, 60.0, 10, 59.9)
    assert checkpoint_due(None, 60.0, 1, 60.0)
    assert checkpoint_due(5, 100.0, 1, 150.0) and checkpoint_due(5, 100.0, 5, 1.0)
    assert not checkpoint_due(None, None, 100, 1e9)


def test_last_pt_is_written_when_due_and_after_the_last_epoch(interval_run) -> None:
    run_dir, summary, writes = interval_run
    assert [epoch for name, epoch in writes if name == "last.pt"] == [2, 4]
    assert len(read_metrics(run_dir / "metrics.jsonl")) == EPOCHS  # metrics every epoch
    # best.pt goes out with the next last.pt, holding the best epoch up to then
    history = read_metrics(run_dir / "metrics.jsonl")
    best_at = {2: max(range(2), key=lambda i: (history[i]["val_top1"], -i)) + 1}
    best_writes = [(epoch, i) for i, (name, epoch) in enumerate(writes) if name == "best.pt"]
    assert writes[0][0] == "best.pt" and writes[0][1] == best_at[2]
    assert all(writes[i + 1][0] == "last.pt" for _, i in best_writes)  # each best.pt just before a last.pt
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == summary["best_epoch"]


def test_every_seconds_alone_writes_only_the_last_epoch(cache: Path, tmp_path: Path, monkeypatch) -> None:
    writes = _spy_writes(monkeypatch)
    cfg = _config(cache, "checkpoint.every_epochs=null", "checkpoint.every_seconds=1e6", epochs=2)
    train(cfg, tmp_path / "seconds", progress=False, log=_quiet)
    assert [epoch for name, epoch in writes if name == "last.pt"] == [2]
    assert len(read_metrics(tmp_path / "seconds" / "metrics.jsonl")) == 2


def test_best_pt_has_no_optimizer_state_and_evaluates_to_the_recorded_top1(
    interval_run, cache: Path, tmp_path: Path
) -> None:
    run_dir, summary, _ = interval_run
    best, last = load_checkpoint(run_dir / "best.pt"), load_checkpoint(run_dir / "last.pt")
    assert all(key not in best for key in RESUME_ONLY) and all(key in last for key in RESUME_ONLY)
    assert best["ema"] is not None and best["class_names"] == last["class_names"]
    assert (run_dir / "best.pt").stat().st_size < 0.6 * (run_dir / "last.pt").stat().st_size
    record = read_metrics(run_dir / "metrics.jsonl")[summary["best_epoch"] - 1]
    result = evaluate_checkpoint(run_dir / "best.pt", log=_quiet)
    assert result["top1"] == record["val_top1"] == summary["best_top1"]
    assert evaluate_checkpoint(run_dir / "best.pt", ema=True, log=_quiet)["top1"] == record["ema_val_top1"]
    copy = tmp_path / "from_best"
    copy.mkdir()
    (copy / "last.pt").write_bytes((run_dir / "best.pt").read_bytes())
    with pytest.raises(ValueError, match="holds no optimizer state"):
        train(_config(cache, *INTERVAL), copy, resume=True, progress=False, log=_quiet)


def test_resume_from_a_last_pt_written_at_an_interval_is_bit_exact(interval_run, cache, tmp_path) -> None:
    reference, _, _ = interval_run

    class Stop(Exception):
        pass

    def stop_after_epoch_3(line: str) -> None:
        if line.startswith("epoch 3/"):
            raise Stop

    run_dir = tmp_path / "stopped"
    with pytest.raises(Stop):
        train(_config(cache, *INTERVAL), run_dir, progress=False, log=stop_after_epoch_3)
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 2  # epoch 3 was not due
    assert len(read_metrics(run_dir / "metrics.jsonl")) == 3
    train(_config(cache, *INTERVAL), run_dir, resume=True, progress=False, log=_quiet)
    _assert_same_run(reference, run_dir)


def test_a_signal_writes_the_last_finished_epoch_and_the_run_resumes_exactly(
    interval_run, cache, tmp_path
) -> None:
    reference, _, _ = interval_run

    def interrupt_after_epoch_3(line: str) -> None:
        if line.startswith("epoch 3/"):
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C: the run stops before the next step

    run_dir = tmp_path / "interrupted"
    with pytest.raises(Interrupted):
        train(_config(cache, *INTERVAL), run_dir, progress=False, log=interrupt_after_epoch_3)
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 3  # not due, but written on the stop
    train(_config(cache, *INTERVAL), run_dir, resume=True, progress=False, log=_quiet)
    _assert_same_run(reference, run_dir)


def test_a_warm_up_leaves_the_run_unchanged_and_is_reported_apart(cache, tmp_path, monkeypatch) -> None:
    warm_steps: list[int | None] = []
    original = train_module.train_one_epoch

    def spy(*args, **kwargs):
        warm_steps.append(kwargs.get("max_steps"))
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", spy)
    cold = train(_config(cache, epochs=2), tmp_path / "cold", progress=False, log=_quiet)
    assert warm_steps == [None, None] and cold["compile_seconds"] == 0.0
    said: list[str] = []
    warm = train(
        _config(cache, "warmup_steps=3", epochs=2), tmp_path / "warm", progress=False, log=said.append
    )
    assert warm_steps[2:] == [3, None, None]  # 3 steps, then the 2 epochs
    _assert_same_run(tmp_path / "cold", tmp_path / "warm")
    records = read_metrics(tmp_path / "warm" / "metrics.jsonl")
    assert records[0]["compile_seconds"] == warm["compile_seconds"] > 0
    assert "compile_seconds" not in records[1]  # the first epoch after a start holds it
    assert any(line.startswith("warm-up: 3 steps") for line in said)
    assert "compile_seconds" not in read_metrics(tmp_path / "cold" / "metrics.jsonl")[0]


def test_the_budget_clock_starts_after_the_warm_up(cache, tmp_path, monkeypatch) -> None:
    original = train_module.Run.warm_up

    def slow_warm_up(run) -> float:  # a compilation that takes longer than the whole budget
        start = time.perf_counter()
        original(run)
        time.sleep(2.5)
        return time.perf_counter() - start

    monkeypatch.setattr(train_module.Run, "warm_up", slow_warm_up)
    cfg = _config(cache, "warmup_steps=1", "time_budget=2", "schedule.epochs=1000", epochs=1000)
    summary = train(cfg, tmp_path / "budget", progress=False, log=_quiet)
    records = read_metrics(tmp_path / "budget" / "metrics.jsonl")
    assert "partial" not in records[0]  # counted in the budget, the warm-up would have ended epoch 1 at once
    assert summary["compile_seconds"] >= 2.5 and records[0]["compile_seconds"] == summary["compile_seconds"]
    assert summary["time_budget"]["planned_at_s"] < 2.0
    assert summary["train_seconds"] < summary["compile_seconds"]
