"""Training under torchrun on the CPU (gloo): 2 processes equal 1, eval agrees, resume across N, failures.

The tiny runs use augmentation preset 'none' without flips and drop path 0: their only randomness is the data
order, which depends on (seed, epoch) alone, so 1 and 2 processes see the same global batches. (Augmentation
draws and drop path are seeded per rank, so with them on the two runs are equally valid but not equal.)

Tolerance of the equivalence: with 2 processes each rank averages the loss over its half batch and DDP
averages the two gradients, which is the same mean as one process's, summed in another order. fp32 rounding
of a reordered sum is ~1e-7 relative per step; AdamW divides by sqrt(v), which can magnify it for
coordinates whose gradient is near zero, up to one step's size (~lr). Over 10 steps at lr 3.75e-4 the
weights may differ by at most ~1e-5 in a few coordinates, we allow 2e-5 absolute, while training moves the
weights by more than 50x that. Per-epoch losses agree to 1e-5 relative.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tinyswin.distributed import (
    DEFAULT_TIMEOUT_S,
    LaunchEnv,
    _ranks_in,
    backend_for,
    dist_timeout,
    distributed,
    launch_env,
)
from tinyswin.train import DistContext

TINY = [
    "model.embed_dim=16",
    "model.depths=[1, 1]",
    "model.num_heads=[1, 2]",
    "model.window_size=4",
    "model.drop_path_rate=0",
    "augment.preset=none",
    "augment.hflip=0",
    "tensorboard=false",
    "precision=fp32",  # the comparison is of the arithmetic: bf16 rounding (precision=auto on a CPU with bf16
    # instructions) would amplify the different summation orders of one and two processes
    "batch_size=16",
    "eval_batch_size=4",
]
WEIGHT_ATOL = 2e-5
LOSS_RTOL = 1e-5


# ---------------------------------------------------------------------------------------------------------
# the launch environment


def test_launch_env_reads_torchrun_variables() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert launch_env(env) == LaunchEnv(rank=3, world_size=8, local_rank=1)
    assert launch_env({}) is None  # not under torchrun


@pytest.mark.parametrize(
    "env, word",
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2, WORLD_SIZE=2"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ],
)
def test_launch_env_refuses_bad_variables(env: dict[str, str], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        launch_env(env)


def test_timeout_comes_from_the_environment() -> None:
    assert dist_timeout({}) == DEFAULT_TIMEOUT_S == 300.0
    assert dist_timeout({"TINYSWIN_DIST_TIMEOUT": "12.5"}) == 12.5
    for bad in ("0", "-3", "soon"):
        with pytest.raises(ValueError, match=f"TINYSWIN_DIST_TIMEOUT={bad!r}"):
            dist_timeout({"TINYSWIN_DIST_TIMEOUT": bad})


def test_backend_follows_the_device() -> None:
    assert backend_for(torch.device("cuda", 1)) == "nccl"
    assert backend_for(torch.device("cpu")) == "gloo"


def test_one_process_makes_no_group() -> None:
    with distributed("cpu", environ={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) as ctx:
        assert ctx == DistContext(rank=0, world_size=1, local_rank=0)
        assert not torch.distributed.is_initialized()
    with distributed("cpu", environ={}) as ctx:
        assert ctx == DistContext()


def test_silent_ranks_are_read_from_the_barrier_error() -> None:
    text = "[Rank 0]: Ranks 1, 3 failed to pass monitoredBarrier in 10000 ms"
    assert _ranks_in(text) == [1, 3]
    assert _ranks_in("Rank 2 failed to pass monitoredBarrier in 5 ms") == [2]
    assert _ranks_in("connection reset") == []


# ---------------------------------------------------------------------------------------------------------
# runs


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _train_cmd(nproc: int, *args: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "tinyswin", "train", *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "tinyswin", "train", *args]


def _train(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        _train_cmd(nproc, *args), env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _train_here(*args: str) -> str:
    """`tinyswin train` in this process on one thread; returns what it printed."""
    from tinyswin.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main(["train", *args])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, out.getvalue()
    return out.getvalue()


def _write_cache(path: Path) -> Path:
    from tinyswin.data import write_cache
    from tinyswin.data.synthetic import CLASS_NAMES, synthetic_splits

    splits = synthetic_splits(size=16, train_per_class=8, val_per_class=3, seed=1)
    train_x, train_y = splits["train"]
    val_x, val_y = splits["val"]
    # 29 val images: an odd count, so the two ranks' eval shards differ in size (15 + 14)
    splits = {"train": (train_x, train_y), "val": (val_x[:-1], val_y[:-1])}
    return write_cache(path, splits, [f"c{i}" for i in range(len(CLASS_NAMES))], list(CLASS_NAMES), "test")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 2-epoch training (global batch 16) as 1 process and as 2 processes x 2 accumulation steps."""
    base = tmp_path_factory.mktemp("ddp")
    cache = _write_cache(base / "cache")
    common = ["--data", str(cache), "--epochs", "2", "--quiet", *TINY]
    one = _train_here("--out", str(base / "one"), *common)  # in this process: no second torch start-up
    two = _train(2, "--out", str(base / "two"), *common, "accumulation=2")
    assert "device cpu x2" in two.stdout  # really two processes
    assert "device cpu;" in one
    return {"cache": cache, "one": base / "one", "two": base / "two", "base": base}


def test_two_processes_train_exactly_like_one(runs: dict[str, Path]) -> None:
    one, two = _metrics(runs["one"]), _metrics(runs["two"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == [5, 10]  # 80 images / 16 per step
    for a, b in zip(one, two, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=LOSS_RTOL)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=LOSS_RTOL)
        assert b["val_top1"] == a["val_top1"]
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)  # the lr rule does not depend on N
    w1, w2 = _weights(runs["one"] / "last.pt"), _weights(runs["two"] / "last.pt")
    assert _max_diff(w1, w2) <= WEIGHT_ATOL
    # the comparison has teeth: training moved the weights far more than the tolerance
    torch.manual_seed(0)
    from tinyswin.model import SwinTransformer
    from tinyswin.model_presets import preset_config

    cfg = torch.load(runs["one"] / "last.pt", map_location="cpu", weights_only=True)["model_config"]
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    init = SwinTransformer(preset_config("nano", **cfg)).state_dict()
    assert _max_diff(w1, init) > 50 * WEIGHT_ATOL


def test_only_rank_zero_writes_and_the_checkpoint_holds_the_plain_module(runs: dict[str, Path]) -> None:
    two = runs["two"]
    assert len(_metrics(two)) == 2  # one line per epoch, not one per rank
    keys = _weights(two / "last.pt").keys()
    assert not any(k.startswith("module.") for k in keys)
    assert keys == _weights(runs["one"] / "last.pt").keys()
    hidden = sorted(p.name for p in two.iterdir() if p.name.startswith("."))
    assert hidden == [".lock"]  # no temp files left; the run directory's lock file stays (see rundir.py)


def test_validation_metrics_equal_a_single_process_eval(runs: dict[str, Path], capsys) -> None:
    from tinyswin.cli import main

    capsys.readouterr()
    assert main(["eval", str(runs["two"] / "last.pt"), "--data", str(runs["cache"]), "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    logged = _metrics(runs["two"])[-1]
    assert single["n"] == 29  # every val image exactly once
    assert logged["val_top1"] == single["top1"]  # counts: exact
    assert logged["val_top5"] == single["top5"]
    assert logged["val_loss"] == pytest.approx(single["loss"], rel=1e-6)  # a sum in another order


@pytest.mark.slow
def test_resume_after_changing_the_number_of_processes(runs: dict[str, Path]) -> None:
    """A finished 2-epoch run continued to 3 epochs: from a 2-process checkpoint with 1 process, and from a
    1-process checkpoint with 2 processes, both equal the 1-process continuation of the 1-process run."""
    base = runs["base"]
    for name, source in (("ref", "one"), ("from2", "two"), ("to2", "one")):
        shutil.copytree(runs[source], base / name)
    more = ["--resume", "--quiet", "schedule.epochs=3"]
    _train(1, "--out", str(base / "ref"), *more)
    _train(1, "--out", str(base / "from2"), *more)
    _train(2, "--out", str(base / "to2"), *more)
    ref = _weights(base / "ref" / "last.pt")
    assert [r["epoch"] for r in _metrics(base / "ref")] == [1, 2, 3]
    for name in ("from2", "to2"):
        assert [r["epoch"] for r in _metrics(base / name)] == [1, 2, 3]
        assert _metrics(base / name)[-1]["train_loss"] == pytest.approx(
            _metrics(base / "ref")[-1]["train_loss"], rel=LOSS_RTOL
        )
        assert _max_diff(_weights(base / name / "last.pt"), ref) <= 1.5 * WEIGHT_ATOL  # 15 steps, not 10
    assert _max_diff(ref, _weights(runs["one"] / "last.pt")) > 10 * WEIGHT_ATOL  # epoch 3 (low lr) did train


# ---------------------------------------------------------------------------------------------------------
# failures


def _workers(launcher: subprocess.Popen[str], count: int, deadline: float) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes (children of torchrun), read from /proc."""
    found: dict[int, int] = {}
    while time.monotonic() < deadline and len(found) < count:
        for task in Path(f"/proc/{launcher.pid}/task").iterdir():
            children = (task / "children").read_text().split()
            for pid in children:
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                for item in environ:
                    if item.startswith(b"RANK="):
                        found[int(item[5:])] = int(pid)
        time.sleep(0.2)
    return found


def _start_long_run(tmp_path: Path, timeout_s: str) -> tuple[subprocess.Popen[str], dict[int, int]]:
    cache = _write_cache(tmp_path / "cache")
    run_dir = tmp_path / "run"
    cmd = _train_cmd(2, "--data", str(cache), "--out", str(run_dir), "--epochs", "500", "--quiet", *TINY)
    launcher = subprocess.Popen(
        cmd,
        env=_env(TINYSWIN_DIST_TIMEOUT=timeout_s),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    workers = _workers(launcher, 2, deadline)
    assert sorted(workers) == [0, 1]
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and launcher.poll() is None, "the run did not start training"
        time.sleep(0.2)
    return launcher, workers


def _finish(launcher: subprocess.Popen[str], within: float) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        out, _ = launcher.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        pytest.fail(f"the job did not stop within {within} s")
    return launcher.returncode, out, time.monotonic() - start


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_with_an_error_naming_it(tmp_path: Path) -> None:
    launcher, workers = _start_long_run(tmp_path, "20")
    os.kill(workers[1], signal.SIGKILL)
    code, out, seconds = _finish(launcher, within=60)
    assert code != 0, out
    assert "rank      : 1" in out or "rank: 1" in out, out  # torchrun's failure summary names the rank
    assert "Signal 9" in out or "SIGKILL" in out, out
    assert seconds < 60


@pytest.mark.slow
def test_a_hung_rank_times_out_with_an_error_naming_it(tmp_path: Path) -> None:
    launcher, workers = _start_long_run(tmp_path, "5")
    os.kill(workers[1], signal.SIGSTOP)  # alive but stuck
    try:
        code, out, seconds = _finish(launcher, within=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(workers[1], signal.SIGKILL)
    assert code != 0, out
    assert "rank 0 of 2: a collective failed or timed out after 5 s" in out, out
    assert "rank(s) 1 did not answer" in out, out
    assert seconds < 90


def test_only_communication_errors_count_as_collective_failures() -> None:
    from tinyswin.distributed import _is_collective_failure
    from tinyswin.train import TrainingError

    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/buffer.cc:78] Timed out waiting 5000ms for recv"
    assert _is_collective_failure(RuntimeError(gloo))
    assert _is_collective_failure(torch.distributed.DistBackendError("NCCL watchdog"))
    assert not _is_collective_failure(TrainingError("the loss was not finite; Timed out waiting"))
    assert not _is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
