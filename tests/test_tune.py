"""`tinyswin tune`: real Optuna studies on the built-in dataset with tiny budgets (pruning, failed trials,
resuming, the best preset re-run; slow: two worker processes on one SQLite file, Ctrl-C and a kill)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tinyswin.cli import main

optuna = pytest.importorskip("optuna", reason="the [tune] extra is not installed")

# a model that learns enough in one epoch (~30% holdout top-1 of 10 classes) that an idle one is clearly worse
TINY = [
    "model.embed_dim=32", "model.depths=[1, 1]", "model.num_heads=[2, 4]", "schedule.warmup_epochs=0",
    "threads=1", "max_nonfinite=2",
]  # fmt: skip


def _space(path: Path, enqueue: list[dict[str, Any]], **extra: Any) -> Path:
    data = {
        "epochs": 2,
        "overrides": TINY,
        "pruner": {"type": "median", "startup_trials": 1},
        "params": {"optim.lr": {"float": [1.0e-6, 1.0e3], "log": True}},
        "enqueue": enqueue,
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


GOOD, IDLE, DIVERGING = {"optim.lr": 1.0e-2}, {"optim.lr": 1.0e-6}, {"optim.lr": 1.0e3}


def _study(db: Path, name: str) -> Any:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The built-in dataset's caches (with and without the holdout) in this test's folder."""
    monkeypatch.setenv("TINYSWIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_study_prunes_records_a_failure_resumes_and_its_preset_repeats_the_best_trial(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = _space(tmp_path / "lr.yaml", [GOOD, IDLE, DIVERGING])
    db, out = tmp_path / "tune.db", tmp_path / "study"
    command = ["tune", str(space), "--storage", f"sqlite:///{db}", "--out", str(out)]
    assert main([*command, "--trials", "3"]) == 0
    study = _study(db, "lr")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL"]
    good, idle, _diverging = study.trials
    assert list(idle.intermediate_values) == [1]  # stopped after its first epoch ...
    assert idle.intermediate_values[1] < good.intermediate_values[1]  # ... for scoring below the median
    assert not (out / "trial-0001" / "summary.json").exists() and (out / "trial-0001" / "last.pt").is_file()
    said = capsys.readouterr().out
    assert "trial 2 failed: the loss was not finite" in said  # the diverging trial's reason, in one line
    # trials score on the holdout, never on val: the score is the run's final holdout top-1
    first = _summary(out / "trial-0000")
    assert first["best_split"] == "holdout" and good.value == first["holdout_top1"]

    # the same command with more trials resumes the study (the first three are kept, one is added)
    assert main([*command, "--trials", "4"]) == 0
    study = _study(db, "lr")
    assert [t.state.name for t in study.trials][:3] == states and len(study.trials) == 4
    assert len({t.params["optim.lr"] for t in study.trials}) == 4  # the fourth was drawn, not enqueued again

    # best.yaml: the best trial's whole config, with its val score measured once (and kept in the study)
    best = study.best_trial
    preset = out / "best.yaml"
    header = [line for line in preset.read_text().splitlines() if line.startswith("#")]
    val = study.user_attrs["best_val"]
    assert val["trial"] == best.number and f"{100 * val['top1']:.2f}%" in header[1]
    assert val["top1"] == _summary(out / f"trial-{best.number:04d}")["val_top1"]
    rerun = tmp_path / "rerun"
    assert main(["train", "--config", str(preset), "--out", str(rerun), "--quiet"]) == 0
    again = _summary(rerun)
    assert again["holdout_top1"] == best.value and again["val_top1"] == val["top1"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("epochs: 2\n", "params: expected a mapping"),
        ("params: {optim.lr: {float: [1, 2]}}\nepoch: 3\n", "unknown key 'epoch'"),
        ("params: {optim.lr: {float: [0.1, 0.01]}}\n", "params.optim.lr: expected low < high"),
        ("params: {optim.lr: {float: [0.0, 0.1], log: true}}\n", "low > 0 with log"),
        ("params: {optim.lrr: {float: [0.1, 0.2]}}\n", "params.optim.lrr: unknown key 'optim.lrr'"),
        ("params: {optim.lr: {float: [-1.0, 0.1]}}\n", "params.optim.lr: optim.lr=-1.0: expected"),
        ("params: {optim.lr: {uniform: [0.1, 0.2]}}\n", "expected exactly one of float, int, categorical"),
        ("params: {batch_size: {categorical: []}}\n", "categorical takes a non-empty list"),
        ("params: {optim.lr: {float: [0.1, 0.2]}}\npruner: {type: asha}\n", "pruner: expected"),
        ("params: {optim.lr: {float: [0.1, 0.2]}}\npruner: {type: median, patience: 2}\n", "pruner.patience"),
        ("params: {optim.lr: {float: [0.1, 0.2]}}\nenqueue: [{batch_size: 3}]\n", "'batch_size' is not one"),
        ("params: [optim.lr]\n", "params: expected a mapping"),
        ("[1, 2\n", "not valid YAML"),
    ],
)
def test_a_bad_space_file_is_one_line_naming_file_and_key(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str], text: str, words: str
) -> None:
    space = tmp_path / "bad.yaml"
    space.write_text(text)
    db = tmp_path / "tune.db"
    assert main(["tune", str(space), "--storage", f"sqlite:///{db}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tinyswin tune: error: {space}: ") and words in err[0], err
    assert not db.exists() and not (tmp_path / "o").exists()  # refused before anything was written


def test_the_holdout_is_carved_from_train_of_the_built_in_dataset(cache_dir: Path) -> None:
    from tinyswin.data import load_cache
    from tinyswin.data.sources import resolve_data

    plain = load_cache(resolve_data(None, log=lambda _m: None))
    carved = load_cache(resolve_data(None, holdout=0.1, holdout_seed=0, log=lambda _m: None))
    train, held = carved.split("train")[1], carved.split("holdout")[1]
    assert len(held) == 300 and len(train) == 2700 and plain.split("train")[1].shape == (3000,)
    assert sorted(set(held.tolist())) == list(range(10)) and (held == 0).sum() == 30  # stratified
    assert (carved.split("val")[0] == plain.split("val")[0]).all()


def _tune(space: Path, db: Path, out: Path, trials: int, env: dict[str, str]) -> subprocess.Popen:
    argv = [sys.executable, "-m", "tinyswin", "tune", str(space), "--trials", str(trials),
            "--storage", f"sqlite:///{db}", "--out", str(out)]  # fmt: skip
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_running(db: Path, name: str, after: int, timeout: float = 240.0) -> None:
    """Until a trial numbered >= `after` is running and has begun its first epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            trials = _study(db, name).get_trials(deepcopy=False)
        except Exception:  # the study is not there yet
            continue
        if any(t.number >= after and t.state.name == "RUNNING" for t in trials):
            time.sleep(1.0)
            return
    raise AssertionError(f"no trial >= {after} started within {timeout} s")


@pytest.mark.slow
def test_two_processes_share_a_study_that_survives_ctrl_c_and_a_kill(tmp_path: Path) -> None:
    space = _space(tmp_path / "shared.yaml", [GOOD, IDLE], heartbeat=1)
    db, out = tmp_path / "tune.db", tmp_path / "study"
    env = {**os.environ, "TINYSWIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    first = _tune(space, db, out, 8, env)  # Ctrl-C during its third trial
    _wait_for_running(db, "shared", after=2)
    first.send_signal(signal.SIGINT)
    text = first.communicate(timeout=120)[0]
    assert first.returncode == 130, text
    assert "Run the same command again to continue study 'shared'" in text
    interrupted = [t for t in _study(db, "shared").trials if t.number >= 2]
    assert [t.state.name for t in interrupted] == ["FAIL"]  # recorded at once, nothing left running

    second = _tune(space, db, out, 8, env)  # killed during a trial: its heartbeat stops
    _wait_for_running(db, "shared", after=3)
    second.kill()
    second.communicate(timeout=60)
    killed = max(t.number for t in _study(db, "shared").trials if t.state.name == "RUNNING")

    workers = [_tune(space, db, out, 8, env) for _ in range(2)]  # two processes resume it together
    texts = [w.communicate(timeout=540)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], texts
    study = _study(db, "shared")
    states = {t.number: t.state.name for t in study.trials}
    finished = [n for n, s in states.items() if s in ("COMPLETE", "PRUNED", "FAIL")]
    assert len(finished) >= 8
    assert states[0] == "COMPLETE" and states[1] == "PRUNED" and states[killed] == "FAIL"
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1 and retried[0].params == study.trials[killed].params  # tried once more
    pids = {t.user_attrs["pid"] for t in study.trials if t.number > killed and "pid" in t.user_attrs}
    assert pids == {w.pid for w in workers}  # both workers ran trials of the one study
    best = study.best_trial
    rerun = tmp_path / "rerun"
    argv = [sys.executable, "-m", "tinyswin", "train", "--config", str(out / "best.yaml"),
            "--out", str(rerun), "--quiet"]  # fmt: skip
    subprocess.run(argv, env=env, check=True, capture_output=True)
    assert _summary(rerun)["holdout_top1"] == best.value


@pytest.mark.parametrize(("warmup", "pruned_at"), [(0, 1), (1, 2), (2, None)])
def test_the_median_pruner_spares_the_first_warmup_epochs(
    tmp_path: Path, warmup: int, pruned_at: int | None
) -> None:
    from tinyswin.tune import _pruner
    from tinyswin.tune_space import read_space

    space = _space(
        tmp_path / "s.yaml", [], pruner={"type": "median", "startup_trials": 1, "warmup_epochs": warmup}
    )
    study = optuna.create_study(direction="maximize", pruner=_pruner(optuna, read_space(space), 2))
    done = study.ask()
    for epoch in (1, 2):
        done.report(0.5, epoch)
    study.tell(done, 0.5)
    trial = study.ask()
    pruned = None
    for epoch in (1, 2):  # epochs are the steps: 1, 2, ...
        trial.report(0.1, epoch)
        if pruned is None and trial.should_prune():
            pruned = epoch
    assert pruned == pruned_at
