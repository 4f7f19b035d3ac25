"""The training loop on a tiny generated dataset: it learns, records everything, resumes exactly."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tinyswin.budget import TimeBudget, compress_schedule, plan_budget, replan, time_evaluation
from tinyswin.checkpoint import load_checkpoint
from tinyswin.config import (
    TrainConfig,
    apply_overrides,
    build_augment_config,
    eval_size,
    expand,
    from_dict,
    load_config,
    to_dict,
)
from tinyswin.data import load_cache, write_cache
from tinyswin.data.augment import AugmentConfig
from tinyswin.data.synthetic import CLASS_NAMES, synthetic_splits
from tinyswin.evaluate import LoadedModel, evaluate_checkpoint
from tinyswin.model import SwinConfig
from tinyswin.model_presets import preset_config
from tinyswin.optim import WarmupCosine, schedule_lr
from tinyswin.plots import read_metrics, schedule_curve
from tinyswin.predict import load_images, predict
from tinyswin.train import (
    DistContext,
    LoopState,
    RunState,
    TrainingError,
    build_model_config,
    train,
    train_one_epoch,
)

KEEP = [0, 5, 6, 8]  # disc, horizontal stripes, vertical stripes, checkerboard: chance is 25%
TIMING_KEYS = {"seconds", "images_per_s", "train_seconds", "elapsed"}


def make_tiny_cache(root: Path, size: int = 32, train_per_class: int = 50, val_per_class: int = 10) -> Path:
    splits = synthetic_splits(size=size, train_per_class=train_per_class, val_per_class=val_per_class, seed=3)
    out = {}
    for name, (images, labels) in splits.items():
        keep = np.isin(labels, KEEP)
        out[name] = (images[keep], np.searchsorted(KEEP, labels[keep]))
    return write_cache(
        root,
        out,
        class_ids=[f"c{k}" for k in KEEP],
        class_names=[CLASS_NAMES[k] for k in KEEP],
        source="tiny test set",
    )


def tiny_overrides(cache: Path, epochs: int = 12) -> list[str]:
    return [
        f"data.source={cache}",
        "model.preset=nano",
        "model.embed_dim=16",
        "model.depths=[1, 1]",
        "model.num_heads=[1, 2]",
        "model.window_size=4",
        "model.drop_path_rate=0.1",  # so that the per-epoch torch seed matters for exact resumes
        "augment.preset=none",
        "augment.hflip=0.5",
        "batch_size=16",
        "eval_batch_size=64",
        f"schedule.epochs={epochs}",
        "schedule.warmup_epochs=0.5",
        "schedule.mix_off_first_epochs=0",
        "optim.lr=3e-3",
        "optim.lr_base_batch=16",
        "tensorboard=false",
        "seed=0",
        "precision=fp32",  # the same arithmetic on every CPU (auto: bf16 where the CPU has bf16 instructions)
    ]


def tiny_run_overrides(cache: Path, epochs: int = 12) -> list[str]:
    """The reference run of this module: the tiny config with an EMA of the weights."""
    return [*tiny_overrides(cache, epochs), "ema.enabled=true", "ema.decay=0.9"]


def tiny_config(cache: Path, *extra: str, epochs: int = 12) -> TrainConfig:
    return load_config(None, None, [*tiny_overrides(cache, epochs), *extra])


# the tiny model is overhead-bound: one thread is faster and steadier on a busy machine
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_cache(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> tuple[Path, dict, TrainConfig]:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = load_config(None, None, tiny_run_overrides(tiny_cache))
    lines: list[str] = []
    summary = train(cfg, run_dir, progress=False, log=lines.append)
    return run_dir, summary, cfg


def test_loss_falls_and_accuracy_beats_chance(tiny_run) -> None:
    run_dir, summary, _ = tiny_run
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == list(range(1, 13))
    assert records[-1]["train_loss"] < 0.8 * records[0]["train_loss"]
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    # 4 classes: chance is 25%; the stated margin is 25 points
    assert summary["val_top1"] >= 0.50
    assert summary["best_top1"] == max(r["val_top1"] for r in records)


def test_run_directory_holds_config_metrics_checkpoints_plots_summary(tiny_run) -> None:
    run_dir, summary, cfg = tiny_run
    saved = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert saved == expand(cfg, 4, 32)  # every key, the model and augmentation spelled out
    assert build_model_config(saved, 4, 32) == build_model_config(cfg, 4, 32)
    assert build_augment_config(saved) == build_augment_config(cfg)
    records = read_metrics(run_dir / "metrics.jsonl")
    for key in [
        "epoch",
        "step",
        "lr",
        "train_loss",
        "val_loss",
        "val_top1",
        "val_top5",
        "images_per_s",
        "seconds",
    ]:
        assert all(key in r for r in records), key
    assert records[-1]["step"] == 12 * (200 // 16)
    assert records[0]["lr"] > records[-1]["lr"]
    ckpt = load_checkpoint(run_dir / "last.pt")
    for key in ["model", "optimizer", "scheduler", "scaler", "ema", "epoch", "step", "best", "model_config",
                "train_config", "class_names", "rng_state"]:  # fmt: skip
        assert key in ckpt, key
    assert ckpt["epoch"] == 12 and ckpt["step"] == records[-1]["step"]
    assert ckpt["class_names"] == [CLASS_NAMES[k] for k in KEEP]
    assert ckpt["model_config"]["embed_dim"] == 16 and ckpt["model_config"]["num_classes"] == 4
    assert from_dict(ckpt["train_config"]) == cfg
    assert not any(k.startswith("_orig_mod") or k.startswith("module.") for k in ckpt["model"])
    best = load_checkpoint(run_dir / "best.pt")
    assert best["epoch"] == summary["best_epoch"]
    for name in ["loss.png", "accuracy.png", "lr.png"]:
        with Image.open(run_dir / "plots" / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ["val_top1", "val_top5", "best_epoch", "epochs", "images_per_s", "train_seconds"]:
        assert key in on_disk, key
    assert on_disk["epochs"] == 12 and on_disk["val_top1"] == records[-1]["val_top1"]
    details = on_disk["val_details"]
    cm = np.array(details["confusion_matrix"])
    assert cm.shape == (4, 4) and cm.sum() == 40
    assert np.trace(cm) / cm.sum() == pytest.approx(on_disk["val_top1"])
    assert list(details["per_class_accuracy"].values()) == pytest.approx(list(np.diag(cm) / cm.sum(1)))
    assert 0.0 <= details["ece"] <= 1.0


def test_eval_of_best_reproduces_the_logged_best_top1_exactly(tiny_run) -> None:
    run_dir, summary, _ = tiny_run
    records = read_metrics(run_dir / "metrics.jsonl")
    best = records[summary["best_epoch"] - 1]
    result = evaluate_checkpoint(run_dir / "best.pt", log=lambda _m: None)
    assert result["n"] == 40
    assert result["top1"] == best["val_top1"] == summary["best_top1"]
    assert result["top5"] == best["val_top5"]
    assert result["loss"] == pytest.approx(best["val_loss"], rel=1e-6)
    last = evaluate_checkpoint(run_dir / "last.pt", split="train", log=lambda _m: None)
    assert last["n"] == 200 and last["split"] == "train"
    ema = evaluate_checkpoint(run_dir / "last.pt", ema=True, log=lambda _m: None)
    assert ema["top1"] == records[-1]["ema_val_top1"]
    assert ema["loss"] == pytest.approx(records[-1]["ema_val_loss"], rel=1e-6)
    assert ema["loss"] != pytest.approx(records[-1]["val_loss"], rel=1e-6)  # other weights than the raw ones


def test_interrupted_then_resumed_equals_uninterrupted(tiny_run, tiny_cache: Path, tmp_path: Path) -> None:
    reference_dir, _, cfg = tiny_run

    class Stop(Exception):
        pass

    def stop_after_epoch_3(line: str) -> None:
        if line.startswith("epoch 3/"):
            raise Stop

    run_dir = tmp_path / "resumed"
    with pytest.raises(Stop):
        train(cfg, run_dir, progress=False, log=stop_after_epoch_3)
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 3
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg, run_dir, progress=False, log=lambda _m: None)
    train(cfg, run_dir, resume=True, progress=False, log=lambda _m: None)
    _assert_same_run(reference_dir, run_dir)


def _assert_same_run(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert ca["step"] == cb["step"]
    for name, tensor in ca["model"].items():
        assert torch.equal(tensor, cb["model"][name]), name
    assert (ca["ema"] is None) == (cb["ema"] is None)
    for name, tensor in (ca["ema"] or {}).items():
        assert torch.equal(tensor, cb["ema"][name]), f"ema {name}"
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    for index, state in sa.items():
        for key, value in state.items():
            assert torch.equal(value, sb[index][key]), (index, key)
    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    strip = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in ra]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rb]


def test_resume_refuses_another_model_or_class_list(tiny_run, tiny_cache: Path, tmp_path: Path) -> None:
    run_dir, _, cfg = tiny_run
    other = apply_overrides(cfg, ["model.embed_dim=8"])
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    (copy_dir / "last.pt").write_bytes((run_dir / "last.pt").read_bytes())
    with pytest.raises(ValueError, match=r"embed_dim: 16 \(checkpoint\) != 8 \(this run\)"):
        train(other, copy_dir, resume=True, progress=False, log=lambda _m: None)
    cache = load_cache(tiny_cache)
    images, labels = cache.split("train")
    renamed = write_cache(
        tmp_path / "renamed",
        {"train": (np.asarray(images), labels), "val": tuple(np.asarray(a) for a in cache.split("val"))},
        class_ids=cache.class_ids,
        class_names=["disc", "stripes", "vertical stripes", "checkerboard"],
        source="renamed",
    )
    with pytest.raises(ValueError, match=r"class 1 is 'horizontal stripes' \(checkpoint\) != 'stripes'"):
        train(apply_overrides(cfg, [f"data.source={renamed}"]), copy_dir, resume=True, progress=False,
              log=lambda _m: None)  # fmt: skip
    with pytest.raises(ValueError, match=r"class 1 is 'horizontal stripes'"):
        evaluate_checkpoint(run_dir / "last.pt", data=str(renamed), log=lambda _m: None)


def test_predict_names_the_right_class_of_training_images(tmp_path: Path) -> None:
    cache = make_tiny_cache(tmp_path / "small", train_per_class=4, val_per_class=2)
    cfg = tiny_config(cache, "augment.hflip=0", "model.drop_path_rate=0", "schedule.epochs=40", epochs=40)
    run_dir = tmp_path / "fit"
    train(cfg, run_dir, progress=False, log=lambda _m: None)
    fitted = evaluate_checkpoint(run_dir / "last.pt", split="train", log=lambda _m: None)
    assert fitted["top1"] == 1.0, "the run should fit its 16 training images"
    images, labels = load_cache(cache).split("train")
    files = []
    for i, image in enumerate(images):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.asarray(image)).save(path)
        files.append(path)
    results = predict(run_dir / "last.pt", files, topk=4)
    names = [CLASS_NAMES[k] for k in KEEP]
    assert [r["predictions"][0]["class"] for r in results] == [names[y] for y in labels]
    for r in results:
        probs = [p["probability"] for p in r["predictions"]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5) and probs == sorted(probs, reverse=True)


def test_images_of_any_size_and_mode_are_prepared_as_the_cache_was(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "wide.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.jpg")
    Image.fromarray(rgb).save(tmp_path / "plain.png")
    out = load_images([tmp_path / "wide.png", tmp_path / "grey.jpg", tmp_path / "plain.png"], 16)
    assert out.shape == (3, 16, 16, 3) and out.dtype == np.uint8
    assert np.array_equal(out[0], out[2])  # alpha dropped, same pixels
    assert np.array_equal(out[1][..., 0], out[1][..., 2])  # grey -> RGB with equal channels
    with pytest.raises(FileNotFoundError, match=r"nothere\.png"):
        load_images([tmp_path / "nothere.png"], 16)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"bad\.png"):
        load_images([tmp_path / "bad.png"], 16)


# ---------------------------------------------------------------------------------------------- non-finite


class _Flat(torch.nn.Module):
    """A linear classifier whose output turns NaN while `poison` > 0 (one step per call when counting)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 32 * 32, 4)
        self.poison = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.flatten(1))  # (B, 4)
        if self.poison > 0:
            self.poison -= 1
            return out * float("nan")
        return out


def _one_epoch(tiny_cache: Path, model: _Flat, cfg: TrainConfig, state: LoopState):
    from tinyswin.data import BatchLoader
    from tinyswin.data.augment import build_augment

    cache = load_cache(tiny_cache)
    loader = BatchLoader(*cache.split("train"), 16, seed=0)
    augment = build_augment("none", cache.mean, cache.std, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = WarmupCosine(opt, 1e-2, iters_per_epoch=len(loader), epochs=1, warmup_epochs=0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    run = RunState(cfg=cfg, train_model=model, loader=loader, augment=augment, optimizer=opt, scheduler=sched,
                   scaler=scaler, device=torch.device("cpu"), state=state)  # fmt: skip
    return train_one_epoch(run, mix=False)


def test_nonfinite_losses_are_skipped_and_counted(tiny_cache: Path) -> None:
    model = _Flat()
    before = model.fc.weight.detach().clone()
    model.poison = 3  # the first three steps
    cfg = dataclasses.replace(TrainConfig(), max_nonfinite=4)
    state = LoopState()
    stats = _one_epoch(tiny_cache, model, cfg, state)
    assert stats.nonfinite == 3 and state.nonfinite_total == 3 and state.nonfinite_run == 0
    assert stats.steps == 12 and state.step == 12
    assert math.isfinite(stats.loss)
    assert not torch.equal(model.fc.weight, before)
    assert torch.isfinite(model.fc.weight).all()


def test_too_many_nonfinite_losses_in_a_row_stop_with_a_clear_error(tiny_cache: Path) -> None:
    model = _Flat()
    before = model.fc.weight.detach().clone()
    model.poison = 100
    cfg = dataclasses.replace(TrainConfig(), max_nonfinite=5)
    state = LoopState()
    with pytest.raises(TrainingError, match="not finite for 5 optimizer steps in a row"):
        _one_epoch(tiny_cache, model, cfg, state)
    assert state.step == 4 and state.nonfinite_run == 5  # raised on the fifth
    assert torch.equal(model.fc.weight, before)  # no step was taken


def test_accumulation_matches_one_big_batch(tiny_cache: Path) -> None:
    from tinyswin.data import BatchLoader
    from tinyswin.data.augment import build_augment
    from tinyswin.model import SwinTransformer

    cache = load_cache(tiny_cache)
    augment = build_augment("none", cache.mean, cache.std, 4)
    finals = []
    for accumulation in (1, 4):
        cfg = tiny_config(
            tiny_cache, "model.drop_path_rate=0", "augment.hflip=0", f"accumulation={accumulation}"
        )
        torch.manual_seed(0)
        model = SwinTransformer(build_model_config(cfg, 4, 32))
        loader = BatchLoader(*cache.split("train"), 16 // accumulation, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = WarmupCosine(
            opt, 1e-3, iters_per_epoch=len(loader) // accumulation, epochs=1, warmup_epochs=0
        )
        state = LoopState()
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        cpu = torch.device("cpu")
        run = RunState(cfg=cfg, train_model=model, loader=loader, augment=augment, optimizer=opt,
                       scheduler=sched, scaler=scaler, device=cpu, state=state)  # fmt: skip
        stats = train_one_epoch(run, mix=False)
        assert stats.steps == state.step == 12 and stats.images == 192
        finals.append((model.state_dict(), stats.loss))
    (a, loss_a), (b, loss_b) = finals
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- time budget


def test_compress_schedule_scales_warmup_and_mixing_windows() -> None:
    seed = to_dict(load_config("seed"))["schedule"]
    short = compress_schedule(seed, 20)
    assert short["epochs"] == 20
    assert short["warmup_epochs"] == pytest.approx(1.0)  # 10 of 200 -> 1 of 20
    assert short["mix_off_last_epochs"] == 1 and short["mix_off_first_epochs"] == 1
    assert short["min_lr"] == seed["min_lr"] and short["step"] == "iteration"  # keeps the shape in 20 epochs
    long = compress_schedule(seed, 400)
    assert long["warmup_epochs"] == pytest.approx(20.0) and long["mix_off_last_epochs"] == 20
    assert long["step"] == "epoch"


def test_plan_fits_the_first_epoch_and_whole_epochs_after_it() -> None:
    cfg = apply_overrides(load_config("seed"), ["time_budget=600"])
    # 2 s a step, 50 steps an epoch, 10 s of evaluation: 110 s an epoch; 20 s gone, 5 steps done
    plan = plan_budget(
        cfg, sec_per_step=2.0, eval_seconds=10.0, iters_per_epoch=50, steps_done=5, elapsed=20.0
    )
    left = (600 - 20) / 1.03 - (45 * 2.0 + 10.0)  # after the rest of the first epoch
    assert plan["schedule"]["epochs"] == 1 + int(left // 110) == 5
    assert plan["schedule"]["warmup_epochs"] == pytest.approx(10 * 5 / 200)
    assert plan["original_schedule"]["epochs"] == 200 and plan["budget_s"] == 600
    # slower than the budget allows: one epoch, never zero
    slow = plan_budget(
        cfg, sec_per_step=60.0, eval_seconds=10.0, iters_per_epoch=50, steps_done=2, elapsed=90.0
    )
    assert slow["schedule"]["epochs"] == 1


def test_replan_fits_the_remaining_epochs_into_the_budget() -> None:
    cfg = apply_overrides(load_config("seed"), ["time_budget=100", "schedule.epochs=10"])
    plan = {"budget_s": 100.0, "original_schedule": to_dict(load_config("seed"))["schedule"], "replanned": []}
    say: list[str] = []
    # after the first epoch (12 s): 88 s left fit 7 more epochs -> 8 in all (either direction the first time)
    state = LoopState(epoch=1, train_seconds=12.0, plan=plan)
    cfg = dataclasses.replace(cfg, schedule=replan(cfg.schedule, 100.0, state, [12.0], say.append))
    assert cfg.schedule.epochs == 8 and cfg.schedule.warmup_epochs == pytest.approx(0.4)
    # later, only fewer: 3 epochs done at 60 s, 20 s per epoch -> 2 more fit -> 5
    state = LoopState(epoch=3, train_seconds=60.0, plan=plan)
    cfg = dataclasses.replace(
        cfg, schedule=replan(cfg.schedule, 100.0, state, [12.0, 24.0, 24.0], say.append)
    )
    assert cfg.schedule.epochs == 3 + 40 // 20 == 5
    # no time left: the run stops where it is
    state = LoopState(epoch=4, train_seconds=99.0, plan=plan)
    cfg = dataclasses.replace(
        cfg, schedule=replan(cfg.schedule, 100.0, state, [20.0, 20.0, 20.0], say.append)
    )
    assert cfg.schedule.epochs == 4
    assert "stopping" in say[-1]


def test_time_budget_records_its_plan_and_compresses_the_schedule(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_cache, "time_budget=15", "schedule.epochs=1000", "schedule.warmup_epochs=100",
                      epochs=1000)  # fmt: skip
    summary = train(cfg, tmp_path / "budget", progress=False, log=lambda _m: None)
    plan = summary["time_budget"]
    assert plan["budget_s"] == 15 and plan["original_schedule"]["epochs"] == 1000
    planned = plan["schedule"]["epochs"]
    assert 1 <= planned < 1000 and summary["epochs"] == planned == summary["planned_epochs"]
    assert plan["schedule"]["warmup_epochs"] == pytest.approx(100 * planned / 1000)
    saved = yaml.safe_load((tmp_path / "budget" / "config.yaml").read_text())
    assert saved["schedule"]["epochs"] == planned
    ckpt = load_checkpoint(tmp_path / "budget" / "last.pt")
    assert ckpt["epoch"] == planned
    # the optimizer followed the final plan to its end
    assert ckpt["scheduler"]["epochs"] == planned
    assert ckpt["scheduler"]["warmup_epochs"] == pytest.approx(plan["schedule"]["warmup_epochs"])
    last = read_metrics(tmp_path / "budget" / "metrics.jsonl")[-1]
    iters = 200 // 16
    final = plan["schedule"]
    expected = schedule_lr(
        (last["step"] - 1) / iters,
        cfg.peak_lr(),
        epochs=final["epochs"],
        warmup_epochs=final["warmup_epochs"],
        warmup_start=final["warmup_start"],
        min_lr=final["min_lr"],
    )
    assert last["lr"] == pytest.approx(expected, rel=1e-9)


def test_a_budget_shorter_than_an_epoch_stops_inside_it_at_a_checkpoint(
    tiny_cache: Path, tmp_path: Path
) -> None:
    # the setup alone takes longer than 0.01 s: the first epoch ends after its first step
    cfg = tiny_config(tiny_cache, "time_budget=0.01")
    summary = train(cfg, tmp_path / "cut", progress=False, log=lambda _m: None)
    records = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert len(records) == 1 and records[0]["partial"] == 1 and records[0]["step"] == 1
    assert summary["epochs"] == summary["planned_epochs"] == 1
    assert summary["time_budget"]["stopped"] == {"epoch": 1, "steps": 1}
    ckpt = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["step"] == 1
    assert (
        evaluate_checkpoint(tmp_path / "cut" / "last.pt", log=lambda _m: None)["top1"]
        == records[0]["val_top1"]
    )


# ---------------------------------------------------------------------------------------------- kills


def _cli_train(run_dir: Path, overrides: list[str], *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tinyswin", "train", "--out", str(run_dir), "--quiet", *extra, *overrides]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stdout.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> tuple[Path, list[str]]:
    overrides = tiny_run_overrides(tiny_cache, epochs=5)
    run_dir = tmp_path_factory.mktemp("cli") / "reference"
    proc = _cli_train(run_dir, overrides)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return run_dir, overrides


@pytest.mark.slow
def test_sigkill_during_an_epoch_then_resume_equals_uninterrupted(cli_reference, tmp_path: Path) -> None:
    reference, overrides = cli_reference
    run_dir = tmp_path / "killed"
    proc = _cli_train(run_dir, overrides)
    _wait(proc, lambda: _lines(run_dir) >= 2, "epoch 2")
    time.sleep(0.15)  # into epoch 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _lines(run_dir) < 5
    resumed = _cli_train(run_dir, overrides, "--resume")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resuming after epoch" in out
    _assert_same_run(reference, run_dir)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_resume_equals_uninterrupted(
    cli_reference, tmp_path: Path
) -> None:
    reference, overrides = cli_reference
    run_dir = tmp_path / "killed"
    proc = _cli_train(run_dir, overrides, env={"TINYSWIN_CHECKPOINT_WRITE_DELAY": "0.3"})
    # an epoch's line reaches metrics.jsonl after its last.pt: with 2 lines, the 3rd last.pt is being written
    _wait(
        proc, lambda: _lines(run_dir) >= 2 and bool(list(run_dir.glob(".last.pt.tmp-*"))), "the 3rd last.pt"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 2  # the write of epoch 3 never landed
    resumed = _cli_train(run_dir, overrides, "--resume")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert not list(run_dir.glob(".*.tmp-*"))
    _assert_same_run(reference, run_dir)


def test_threads_key_sets_torch_threads_and_a_negative_count_is_refused(
    tiny_cache: Path, tmp_path: Path
) -> None:
    before = torch.get_num_threads()
    try:
        cfg = tiny_config(tiny_cache, "threads=2", epochs=1)
        train(cfg, tmp_path / "two", progress=False, log=lambda _msg: None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads=-1"):
        train(tiny_config(tiny_cache, "threads=-1", epochs=1), tmp_path / "neg", progress=False)
    assert not (tmp_path / "neg").exists()  # refused before anything is written


def test_budget_clock_asks_rank_0_every_few_steps_with_several_processes(monkeypatch) -> None:
    import tinyswin.budget as budget_module

    asked = []

    def broadcast(flag, dist, device):  # stands in for the collective: rank 0 says "over"
        asked.append(len(asked))
        return torch.ones_like(flag)

    monkeypatch.setattr(budget_module, "broadcast_from_rank0", broadcast)
    past = time.perf_counter() - 10.0
    alone = budget_module.BudgetClock(5.0, past, DistContext(), torch.device("cpu"))
    assert [alone() for _ in range(3)] == [True, True, True] and asked == []  # one process: its own clock
    fresh = budget_module.BudgetClock(5.0, time.perf_counter(), DistContext(), torch.device("cpu"))
    assert fresh() is False
    many = budget_module.BudgetClock(5.0, past, DistContext(0, 2, 0), torch.device("cpu"), every=4)
    assert [many() for _ in range(8)] == [False, False, False, True] * 2 and len(asked) == 2


# ------------------------------------------------------------------------------- reproduction, defects


def test_a_run_is_reproduced_from_its_config_yaml_alone(tiny_run, tmp_path: Path) -> None:
    reference_dir, _, _ = tiny_run
    text = (reference_dir / "config.yaml").read_text()
    saved = yaml.safe_load(text)
    assert {k for k in saved["model"] if k != "preset"} == {
        f.name for f in dataclasses.fields(SwinConfig)
    } - {"num_classes"}
    assert {k for k in saved["augment"] if k != "preset"} == {
        f.name for f in dataclasses.fields(AugmentConfig)
    }
    (tmp_path / "config.yaml").write_text(text)
    again = tmp_path / "again"
    train(load_config(None, tmp_path / "config.yaml"), again, progress=False, log=lambda _m: None)
    _assert_same_run(reference_dir, again)
    assert (again / "config.yaml").read_text() == text


def test_holdout_split_has_its_own_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_data import make_tinyimagenet

    monkeypatch.setenv("TINYSWIN_CACHE", str(tmp_path / "caches"))
    root = tmp_path / "tiny-imagenet-200"
    make_tinyimagenet(root, per_class=8)
    common = [f"data.source={root}", "data.size=16", "data.holdout=0.25", "data.val_split=holdout",
              "model.preset=nano", "model.embed_dim=8", "model.depths=[1]", "model.num_heads=[1]",
              "model.window_size=4", "batch_size=6", "schedule.epochs=1", "tensorboard=false"]  # fmt: skip
    runs = {}
    for seed in (0, 1):
        cfg = load_config(None, None, [*common, f"seed={seed}"])
        runs[seed] = train(cfg, tmp_path / f"seed{seed}", progress=False, log=lambda _m: None)
    caches = [p for p in (tmp_path / "caches").iterdir() if (p / "meta.json").is_file()]
    assert len(caches) == 1  # both seeds read one cache: the same holdout images
    assert load_cache(caches[0]).meta["holdout"] == {"fraction": 0.25, "seed": 0}
    assert load_cache(caches[0]).meta["class_counts"]["holdout"] == [2, 2, 2]
    assert runs[0]["best_split"] == runs[1]["best_split"] == "holdout"
    cfg = load_config(None, None, [*common, "data.holdout_seed=5"])
    train(cfg, tmp_path / "other", progress=False, log=lambda _m: None)
    other = [p for p in (tmp_path / "caches").iterdir() if (p / "meta.json").is_file() and p not in caches]
    assert len(other) == 1 and load_cache(other[0]).meta["holdout"]["seed"] == 5
    assert load_cache(other[0]).files("holdout") != load_cache(caches[0]).files("holdout")


def test_eval_size_follows_a_non_square_model(tiny_cache: Path, tmp_path: Path) -> None:
    two_stages = {"depths": (1, 1), "num_heads": (1, 2)}  # sides: multiples of 8
    assert eval_size(preset_config("nano", img_size=32, **two_stages), 32) is None
    assert eval_size(preset_config("nano", img_size=(24, 24), **two_stages), 32) == (24, 24)
    assert eval_size(preset_config("nano", img_size=(24, 32), **two_stages), 32) == (24, 32)
    cfg = tiny_config(tiny_cache, "model.img_size=[24, 32]", epochs=1)
    summary = train(cfg, tmp_path / "wide", progress=False, log=lambda _m: None)
    loaded = LoadedModel(tmp_path / "wide" / "last.pt")
    images = torch.from_numpy(np.array(load_cache(tiny_cache).split("val")[0][:5]))  # (5, 32, 32, 3)
    assert loaded.normalize(images).shape == (5, 3, 24, 32)
    result = evaluate_checkpoint(tmp_path / "wide" / "last.pt", log=lambda _m: None)
    assert result["top1"] == summary["val_top1"]


def test_evaluation_is_timed_on_warm_batches() -> None:
    calls: list[int] = []

    def run_batch(batch) -> None:  # the first call of each batch compiles: slow
        calls.append(batch[0])
        if calls.count(batch[0]) == 1:
            time.sleep(0.5)

    batches = [((0, torch.zeros(10)), 100), ((1, torch.zeros(10)), 50)]
    seconds = time_evaluation(run_batch, batches, passes=2, world_size=1)
    assert calls == [0, 0, 1, 1]
    assert seconds < 0.5  # the cold calls (0.5 s each, 15 s scaled) are left out


def test_lr_plot_draws_each_schedule_over_the_steps_it_held() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosine(opt, 1.0, iters_per_epoch=4, epochs=10, warmup_epochs=1, min_lr=0.0)
    taken = []
    for step in range(24):
        if step == 6:
            sched.reschedule(epochs=5, warmup_epochs=0.5)  # a time budget's plan, in the first epochs
        if step == 16:
            sched.reschedule(epochs=6, warmup_epochs=0.5)
        taken.append(sched.get_last_lr())
        sched.step()
    schedule = {"iters_per_epoch": 4, "peak_lr": 1.0, "warmup_start": 0.01, "min_lr": 0.0,
                "segments": sched.segments}  # fmt: skip
    records = [{"epoch": 1, "step": 4, "lr_schedule": schedule}, {"epoch": 6, "step": 24}]
    xs, ys = schedule_curve(records)["schedule (per step)"]
    assert xs[:24] == [step / 4 for step in range(24)]
    assert ys[:24] == taken
    assert len(xs) == 6 * 4 + 1  # the last plan to its end
    last_plan_only = WarmupCosine(opt, 1.0, iters_per_epoch=4, epochs=6, warmup_epochs=0.5, min_lr=0.0)
    assert ys[:6] != [last_plan_only.lr_at(step) for step in range(6)]


def test_replans_count_the_time_between_epochs_not_only_the_steps() -> None:
    cfg = apply_overrides(load_config("seed"), ["time_budget=100", "schedule.epochs=50"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosine(opt, 1.0, iters_per_epoch=10, epochs=50, warmup_epochs=1)
    original = dataclasses.asdict(cfg.schedule)
    state = LoopState(
        plan={"budget_s": 100.0, "original_schedule": original, "schedule": original, "replanned": []}
    )
    said: list[str] = []
    cpu = torch.device("cpu")
    budget = TimeBudget(
        cfg, state, sched, 10, time.perf_counter(), lambda: 0.0, DistContext(), cpu, said.append
    )
    state.epoch, state.train_seconds = 1, 2.0
    first = budget.after_epoch(cfg.schedule, steps=10, epoch_seconds=1.0)
    assert first is not None and first.epochs == 1 + int(98 // 1.0)  # the first replan may stretch
    state.epoch, state.train_seconds = 2, 6.0  # 4 s since the first epoch ended, 1 s of them steps
    second = budget.after_epoch(first, steps=10, epoch_seconds=1.0)
    assert budget.epoch_times == [1.0, 4.0]
    assert second is not None and second.epochs == 2 + int(94 // 2.5) == 39
    assert sched.epochs == 39
