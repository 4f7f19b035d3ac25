"""What a user types never loses a run or prints a traceback: interrupts, pipes, run directories given to
eval, a finished run resumed, overrides anywhere on the line."""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tinyswin.cli import main
from tinyswin.config import known_keys
from tinyswin.data import load_cache, write_cache
from tinyswin.data.synthetic import CLASS_NAMES, synthetic_splits
from tinyswin.plots import read_metrics

TINY = ["model.embed_dim=16", "model.depths=[1, 1]", "model.num_heads=[1, 2]", "model.window_size=4",
        "batch_size=16", "eval_batch_size=64", "threads=1"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def _cache(root: Path, size: int = 32) -> Path:
    splits = synthetic_splits(size=size, train_per_class=16, val_per_class=4, seed=2)
    keep = [0, 5, 6, 8]
    out = {}
    for name, (images, labels) in splits.items():
        mask = np.isin(labels, keep)
        out[name] = (images[mask], np.searchsorted(keep, labels[mask]).astype(np.int64))
    return write_cache(root, out, [f"c{k}" for k in keep], [CLASS_NAMES[k] for k in keep], "test shapes")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cache(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "done"
    assert (
        main(["train", "--data", str(cache), "--out", str(run_dir), "--epochs", "2", "--quiet", *TINY]) == 0
    )
    return run_dir


def _train_process(cache: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tinyswin", "train", "--data", str(cache), "--out", str(run_dir), "--quiet",
           *TINY, *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_training_between_steps_and_resume_continues(
    cache: Path, tmp_path: Path, signum: int, code: int
) -> None:
    run_dir = tmp_path / "run"
    proc = _train_process(cache, run_dir, "--epochs", "200")
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("epoch 1/200"):
            break
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert (
        len(lines) == 1 and "interrupted at epoch" in lines[0] and lines[0].endswith("resume with --resume")
    )
    done = len(read_metrics(run_dir / "metrics.jsonl"))
    assert done >= 1 and json.loads(json.dumps(yaml.safe_load((run_dir / "config.yaml").read_text())))
    assert main(["train", "--out", str(run_dir), "--resume", "--quiet", f"schedule.epochs={done + 1}"]) == 0
    epochs = [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert epochs == list(range(1, done + 2))  # every epoch once: nothing of the interrupted one was written


def test_a_closed_pipe_is_quiet() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinyswin", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader goes away before anything is read (as `| head -0`)
    err = proc.stderr.read() if proc.stderr else ""
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert proc.returncode in (0, 128 + signal.SIGPIPE)


def test_eval_and_predict_take_a_run_directory(
    finished_run: Path, cache: Path, capsys, tmp_path: Path
) -> None:
    capsys.readouterr()
    assert main(["eval", str(finished_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"] == str(finished_run / "best.pt") and result["n"] == 16
    image = tmp_path / "x.png"
    Image.fromarray(np.asarray(load_cache(cache).split("val")[0][0])).save(image)
    assert main(["predict", str(finished_run), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"][0]["class"] in [
        CLASS_NAMES[k] for k in (0, 5, 6, 8)
    ]
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no best.pt or last.pt" in err and len(err.strip().splitlines()) == 1


def test_eval_on_images_of_another_size_resizes_them_and_says_so(
    finished_run: Path, tmp_path: Path, capsys
) -> None:
    small = _cache(tmp_path / "small", size=16)
    capsys.readouterr()
    assert main(["eval", str(finished_run / "last.pt"), "--data", str(small)]) == 0
    out = capsys.readouterr().out
    assert "holds 16px images, the model was trained on 32px: resizing them to its input 32" in out
    assert "top-1" in out


def test_resuming_a_finished_run_changes_no_file(finished_run: Path, capsys) -> None:
    def files() -> dict[str, bytes]:  # the run's files (the lock of whoever holds the directory aside)
        return {
            p.name: p.read_bytes() for p in finished_run.iterdir() if p.is_file() and ".lock" not in p.name
        }

    before = files()
    capsys.readouterr()
    assert main(["train", "--out", str(finished_run), "--resume", "--quiet", "label_smoothing=0.2"]) == 0
    assert "is finished (2 epochs): nothing to train or write" in capsys.readouterr().out
    assert files() == before


def test_overrides_may_follow_options(cache: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "mixed"
    argv = ["train", "schedule.epochs=1", "--data", str(cache), *TINY[:2], "--out", str(run_dir), *TINY[2:],
            "--quiet", "seed=3"]  # fmt: skip
    assert main(argv) == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["schedule"]["epochs"] == 1 and saved["seed"] == 3 and saved["model"]["embed_dim"] == 16
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "x"), "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info", "seed=1"])


def test_train_help_lists_every_key(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    missing = [key for key in known_keys() if key not in text]
    assert missing == [] and len(known_keys()) > 60


def test_a_config_file_without_preset_applies_over_the_default_preset(tmp_path: Path, capsys) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("schedule:\n  epochs: 1\n")
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--quiet", *TINY[:4]]) == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    default = yaml.safe_load((Path(__file__).parents[1] / "src/tinyswin/configs/default.yaml").read_text())
    assert saved["schedule"]["epochs"] == 1 and saved["batch_size"] == default["batch_size"] == 32
    assert saved["optim"]["lr"] == default["optim"]["lr"]
    assert main(["train", "--config", str(tmp_path), "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "is a directory, not a YAML config file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n"])
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path: Path, content: bytes, capsys) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    capsys.readouterr()
    assert main(["eval", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not a tinyswin checkpoint" in err and len(err.strip().splitlines()) == 1
    assert path.read_bytes() == content


def test_tensorboard_without_its_package_is_said(
    cache: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as where it is not installed
    run_dir = tmp_path / "tb"
    argv = ["train", "--data", str(cache), "--out", str(run_dir), "--epochs", "1", "--quiet", *TINY]
    assert main([*argv, "tensorboard=true"]) == 0
    assert "the tensorboard package is not installed: pip install tensorboard" in capsys.readouterr().out
    assert not (run_dir / "tensorboard").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--epochs", "0"], "schedule.epochs=0: expected an integer >= 1"),
        (["optim.grad_clip=-1"], "optim.grad_clip=-1"),
        (["--time-budget", "-5"], "time_budget=-5"),
        (["--time-budget", "0"], "time_budget=0"),
        (["--time-budget", "nan"], "time_budget=nan"),
        (["accumulation=0"], "accumulation=0"),
        (["label_smoothing=2"], "label_smoothing=2"),
        (["device=foo"], "device='foo'"),
    ],
)
def test_values_out_of_range_are_one_line_and_write_nothing(
    cache: Path, tmp_path: Path, capsys, args: list[str], words: str
) -> None:
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--data", str(cache), "--out", str(run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not run_dir.exists()


def test_run_directories_are_refused_in_one_line_and_left_unchanged(
    cache: Path, finished_run: Path, tmp_path: Path, capsys
) -> None:
    from filelock import FileLock

    def contents(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("results\n")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x\n")
    cases = [
        (foreign, "is not a tinyswin run directory"),
        (a_file, "is a file, not a directory"),
        (finished_run, "already holds a run: resume it with --resume"),
    ]
    for out, words in cases:
        before = contents(out) if out.is_dir() else out.read_bytes()
        capsys.readouterr()
        assert main(["train", "--data", str(cache), "--out", str(out), "--epochs", "1", *TINY]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
        assert (contents(out) if out.is_dir() else out.read_bytes()) == before
    held = tmp_path / "held"
    held.mkdir()
    with FileLock(str(held / ".lock"), timeout=0):
        (held / ".lock.pid").write_text(f"4242 {socket.gethostname()}\n")  # as a holder writes it
        assert main(["train", "--data", str(cache), "--out", str(held), "--epochs", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert "in use by another training (pid 4242)" in err and len(err.strip().splitlines()) == 1


def test_a_full_disk_is_one_line_and_resume_starts_again(cache: Path, tmp_path: Path) -> None:
    """A file size limit (EFBIG, as ENOSPC) below a checkpoint's size: the first checkpoint write fails."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))

    run_dir = tmp_path / "full"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TINYSWIN_NATIVE": "0"}
    cmd = [sys.executable, "-m", "tinyswin", "train", "--data", str(cache), "--out", str(run_dir), "--quiet",
           "--epochs", "2", *TINY]  # fmt: skip
    full = subprocess.run(
        cmd, capture_output=True, text=True, env=env, preexec_fn=limit_file_size, timeout=300
    )
    assert full.returncode == 2, full.stderr
    lines = full.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and f"disk full while writing {run_dir}/" in lines[0]
        and "Traceback" not in full.stderr
    )
    assert not (run_dir / "last.pt").exists() and not list(run_dir.glob(".*.tmp-*"))
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "starting from the beginning" in again.stdout
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]


def test_quiet_prepares_a_source_without_a_progress_bar(tmp_path: Path, capfd, monkeypatch) -> None:
    monkeypatch.setenv("TINYSWIN_CACHE", str(tmp_path / "caches"))
    folder = tmp_path / "shapes"
    images, labels = synthetic_splits(size=16, train_per_class=6, val_per_class=2, seed=1)["train"]
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        if label < 3:
            (folder / CLASS_NAMES[label].replace(" ", "_")).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / CLASS_NAMES[label].replace(" ", "_") / f"{i}.png")
    capfd.readouterr()
    argv = ["train", "--data", str(folder), "--out", str(tmp_path / "run"), "--epochs", "1", "--quiet"]
    assert main([*argv, "data.size=16", "batch_size=4", *TINY[:4]]) == 0
    captured = capfd.readouterr()
    assert "decoding" not in captured.err and "%|" not in captured.err  # no bar, no per-update lines
    assert "has no val split: holding out 10% of each class as 'val'" in captured.out
