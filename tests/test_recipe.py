"""The recipes (`fast`, `speedrun`), `benchmarks/gpu_speedrun.sh` and `benchmarks/gpu_throughput.py`."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from tinyswin.config import load_config
from tinyswin.data import build_augment, write_cache
from tinyswin.model import SwinTransformer
from tinyswin.train import build_augment_config, build_model_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_speedrun.sh"
PYTHON = sys.executable


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine two OpenMP threads can run many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# the presets


@pytest.mark.parametrize(("preset", "classes"), [("fast", 10), ("speedrun", 200), ("laptop", 200)])
def test_windows_tile_every_stage_grid_without_padding(preset: str, classes: int) -> None:
    """The recipes' windows are matched to the stage resolutions: each tiles its token grid exactly."""
    model_config = build_model_config(load_config(preset), classes, 64)
    side = model_config.img_size if isinstance(model_config.img_size, int) else model_config.img_size[0]
    grid = side // model_config.patch_size
    for stage, window in enumerate(model_config.stage_windows):
        assert window <= grid, f"{preset}: stage {stage} window {window} exceeds its {grid}x{grid} grid"
        assert grid % window == 0, f"{preset}: stage {stage} window {window} pads its {grid}x{grid} grid"
        grid //= 2


def test_fast_trains_and_tests_at_32px_from_a_64px_cache(one_thread: None) -> None:
    """`fast` sets the training resolution to 32: the model is built for 32px and the eval path resizes."""
    cfg = load_config("fast")
    model_config = build_model_config(cfg, 10, 64)
    assert model_config.img_size == 32
    assert model_config.drop_path_rate == 0.0
    augment = build_augment(build_augment_config(cfg), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 10)
    images = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    x_train, y = augment(images, torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(0))
    assert x_train.shape == (3, 3, 32, 32)
    assert y.dtype == torch.int64  # no Mixup/CutMix in this recipe
    x_eval = augment.normalize(images, 32)
    assert x_eval.shape == (3, 3, 32, 32)
    model = SwinTransformer(model_config).eval()
    with torch.no_grad():
        assert model(x_eval).shape == (3, 10)


def test_laptop_has_its_budget_and_attends_over_whole_maps_at_32px() -> None:
    """`laptop`: the 30-minute budget built in, 32px from a 64px cache, windows equal to every stage's grid
    (global attention: no shifted block, no mask, no token reordering), LSA, the test-time flip."""
    cfg = load_config("laptop")
    assert cfg.time_budget == 1800 and cfg.tta == "flip" and cfg.precision == "auto"
    assert cfg.batch_size == 128 and cfg.peak_lr() == pytest.approx(2e-3)
    assert not cfg.ema.enabled and not cfg.compile
    model_config = build_model_config(cfg, 200, 64)
    assert (model_config.img_size, model_config.patch_size, model_config.lsa) == (32, 4, True)
    model = SwinTransformer(model_config)
    grids = []
    for stage in model.stages:
        for block in stage.blocks:
            plan = block.plan((32 // 4 // 2 ** len(grids), 32 // 4 // 2 ** len(grids)), torch.device("cpu"))
            assert plan.mask is None and plan.order is None, "a shifted window on a map its window covers"
            assert block.attn.table_window == plan.geometry.window
        grids.append(block.attn.table_window)
    assert grids == [(8, 8), (4, 4), (2, 2)]
    aug = build_augment_config(cfg)
    assert (aug.crop, aug.randaug_ops, aug.mixup_p, aug.cutmix_p, aug.erase_p) == ("rrc", 0, 0.0, 0.0, 0.0)
    # the budget is the preset's unless the command line gives another
    assert load_config("laptop", overrides=["time_budget=600"]).time_budget == 600


def test_speedrun_learning_rate_rule_and_ema() -> None:
    """`speedrun` states lr 8e-4 at batch 512 (4e-4 at 256, the linear rule) and keeps an EMA."""
    cfg = load_config("speedrun")
    assert cfg.batch_size == 512
    assert cfg.peak_lr() == pytest.approx(8e-4)
    half = load_config("speedrun", overrides=["batch_size=256"])
    assert half.peak_lr() == pytest.approx(4e-4)
    assert cfg.ema.enabled
    aug = build_augment_config(cfg)
    assert (aug.mixup_p, aug.cutmix_p, aug.randaug_ops) == (0.15, 0.15, 2)
    assert cfg.schedule.mix_off_last_epochs == cfg.schedule.epochs // 10


# ----------------------------------------------------------------------------------------------------------
# gpu_speedrun.sh: parts, sha256, call limits


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OUT": "", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True, text=True, env=full_env
    )


def test_split_then_join_over_two_calls(tmp_path: Path) -> None:
    """Parts that arrive over two calls are collected into the work folder, joined and checked."""
    data = os.urandom(250_000)
    zip_path = tmp_path / "src" / "tiny.zip"
    zip_path.parent.mkdir()
    zip_path.write_bytes(data)
    split = _run("split", zip_path, tmp_path / "parts", "--part-size", "100K", cwd=tmp_path)
    assert split.returncode == 0, split.stderr
    assert (tmp_path / "parts" / "ZIPS").read_text() == "tiny.zip\n"
    parts = tmp_path / "parts" / "tiny"  # one folder per zip
    names = sorted(p.name for p in parts.glob("part-*"))
    assert names == ["part-000", "part-001", "part-002"]
    assert (parts / "SHA256SUMS").read_text().split() == [_sha(zip_path), "tiny.zip"]

    inbox = tmp_path / "inbox"  # what the first call carries: one part and the manifests
    inbox.mkdir()
    for name in ("part-001", "PARTS.sha256", "PARTS.name", "SHA256SUMS"):
        (inbox / name).write_bytes((parts / name).read_bytes())
    work = tmp_path / "work"
    first = _run("--parts", inbox, "--work", work, "--until", "data", cwd=tmp_path)
    assert first.returncode == 3, first.stdout + first.stderr
    assert "have 1 of 3, missing part-000 part-002" in first.stdout

    for name in ("part-001", "PARTS.sha256"):  # the second call's folder holds only the other parts
        (inbox / name).unlink()
    for name in ("part-000", "part-002"):
        (inbox / name).write_bytes((parts / name).read_bytes())
    second = _run("--parts", inbox, "--work", work, "--until", "data", cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert (work / "zips" / "tiny.zip").read_bytes() == data
    assert (work / "state" / "data.ok").read_text().split() == ["tiny.zip", _sha(zip_path)]
    assert (work / "out" / "speedrun.log").read_text().count("call started") == 2


def test_a_corrupt_part_or_checksum_is_refused(tmp_path: Path) -> None:
    zip_path = tmp_path / "tiny.zip"
    zip_path.write_bytes(os.urandom(150_000))
    assert _run("split", zip_path, tmp_path / "parts", "--part-size", "100K", cwd=tmp_path).returncode == 0
    parts = tmp_path / "parts" / "tiny"
    good = (parts / "part-001").read_bytes()
    (parts / "part-001").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    bad_part = _run("--parts", tmp_path / "parts", "--work", tmp_path / "w1", "--until", "data", cwd=tmp_path)
    assert bad_part.returncode == 2
    assert "part(s) part-001 do not match PARTS.sha256" in bad_part.stdout + bad_part.stderr
    assert not (tmp_path / "w1" / "parts" / "tiny" / "part-001").exists()  # dropped: a resent part is taken

    (parts / "part-001").write_bytes(good)
    (parts / "SHA256SUMS").write_text("0" * 64 + "  tiny.zip\n")
    bad_sum = _run("--parts", tmp_path / "parts", "--work", tmp_path / "w2", "--until", "data", cwd=tmp_path)
    assert bad_sum.returncode == 2
    assert f"sha256 of tiny.zip is {_sha(zip_path)}" in bad_sum.stdout + bad_sum.stderr
    assert not (tmp_path / "w2" / "zips" / "tiny.zip").exists()


def test_split_checks_the_published_checksum_beside_the_zip(tmp_path: Path) -> None:
    zip_path = tmp_path / "tiny.zip"
    zip_path.write_bytes(os.urandom(1000))
    (tmp_path / "SHA256SUMS").write_text(f"{'1' * 64}  other.zip\n{'0' * 64}  tiny.zip\n")
    refused = _run("split", zip_path, tmp_path / "parts", cwd=tmp_path)
    assert refused.returncode == 2
    assert "does not match" in refused.stderr
    (tmp_path / "SHA256SUMS").write_text(f"{'1' * 64}  other.zip\n{_sha(zip_path)}  tiny.zip\n")
    assert _run("split", zip_path, tmp_path / "parts", cwd=tmp_path).returncode == 0
    assert (tmp_path / "parts" / "tiny" / "SHA256SUMS").read_text() == f"{_sha(zip_path)}  tiny.zip\n"


def _load_plan() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_plan", ROOT / "benchmarks" / "gpu_plan.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_plan"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_the_plan_packs_parts_into_calls_within_the_limit() -> None:
    plan = _load_plan()
    assert plan.plan_calls([60, 40, 60, 36], 2, 64) == [[0], [1], [2], [3]]  # one part of 60 a call
    assert plan.plan_calls([10, 10, 10, 50, 12], 2, 64) == [[0, 1, 2], [3, 4]]  # 2 + 50 + 12 = 64 fits
    assert plan.plan_calls([10, 10, 10, 50, 13], 2, 64) == [[0, 1, 2], [3], [4]]
    assert plan.plan_calls([30, 30, 3], 2, 64) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="do not fit"):
        plan.plan_calls([63], 2, 64)


def test_the_plans_calls_bring_the_zips_in_order_and_the_last_joins_them(tmp_path: Path) -> None:
    """gpu_plan.py lays the parts out one folder per call; gpu_speedrun.sh, given every call's folder, waits
    until the last call has come, then joins and checks both zips."""
    plan = _load_plan()
    zips = [tmp_path / "src" / "a-sub.zip", tmp_path / "src" / "b-rest.zip"]
    zips[0].parent.mkdir()
    for path, size in zip(zips, (300_000, 150_000), strict=True):
        path.write_bytes(os.urandom(size))
    tree = plan.tree_bytes(ROOT)
    limit_mib = (tree + 220_000) / plan.MIB  # room for one part of 0.2 MiB a call
    out = tmp_path / "gpu"
    args = ["--zips", *map(str, zips), "--out", str(out), "--part-mib", "0.2", "--limit-mib", str(limit_mib)]
    assert plan.main(args) == 0
    calls = sorted(out.glob("call-*"))
    assert [c.name for c in calls] == ["call-1", "call-2", "call-3"]  # 0.2 + 0.086 MiB of a, then b's 0.143
    for call in calls:
        carried = sum(f.stat().st_size for f in call.rglob("*") if f.is_file())
        assert tree + carried <= limit_mib * plan.MIB
        assert (call / "ZIPS").read_text() == "a-sub.zip\nb-rest.zip\n"
    work = tmp_path / "work"
    flags = [a for c in calls for a in ("--parts", c)]
    for call in calls[:2]:  # the calls arrive one by one (a folder not there yet is skipped)
        (tmp_path / "later").mkdir(exist_ok=True)
        for later in calls[calls.index(call) + 1 :]:
            later.rename(tmp_path / "later" / later.name)
        waiting = _run(*flags, "--work", work, "--until", "data", cwd=tmp_path)
        assert waiting.returncode == 3, waiting.stdout + waiting.stderr
        for later in (tmp_path / "later").iterdir():
            later.rename(out / later.name)
    done = _run(*flags, "--work", work, "--until", "data", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for path in zips:
        assert (work / "zips" / path.name).read_bytes() == path.read_bytes()
    assert [line.split()[0] for line in (work / "state" / "data.ok").read_text().splitlines()] == [
        "a-sub.zip",
        "b-rest.zip",
    ]


def _tiny_imagenet_zip(path: Path, classes: int = 4, per_class: int = 12, val_per_class: int = 4) -> None:
    """An official-layout Tiny ImageNet zip: class c tints channel c % 3 under noise; the first val image of
    every class shows the next class, so val top-1 stays below 100% (an exact-reproduction check then means
    something)."""
    rng = np.random.default_rng(0)
    wnids = [f"n0{c}000000" for c in range(classes)]

    def jpeg(c: int) -> bytes:
        base = np.full((64, 64, 3), 128, dtype=np.int16)
        base[..., c % 3] += 12 if c < 3 else -12
        pixels = np.clip(base + rng.integers(-80, 81, size=base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("tiny-imagenet-200/wnids.txt", "".join(w + "\n" for w in wnids))
        z.writestr("tiny-imagenet-200/words.txt", "".join(f"{w}\tclass {w}\n" for w in wnids))
        lines = []
        for c, wnid in enumerate(wnids):
            for i in range(per_class):
                z.writestr(f"tiny-imagenet-200/train/{wnid}/images/{wnid}_{i}.JPEG", jpeg(c))
            for i in range(val_per_class):
                name = f"val_{c * val_per_class + i}.JPEG"
                z.writestr(f"tiny-imagenet-200/val/images/{name}", jpeg((c + 1) % classes if i == 0 else c))
                lines.append(f"{name}\t{wnid}\t0\t0\t63\t63\n")
        z.writestr("tiny-imagenet-200/val/val_annotations.txt", "".join(lines))


@pytest.mark.slow
def test_speedrun_end_to_end_on_cpu_over_several_calls(tmp_path: Path) -> None:
    """Join, check, prepare; a call with too little time left asks to be called again; the next call trains
    within the budget, evaluates and summarizes; a further call changes nothing."""
    zip_path = tmp_path / "tiny-imagenet-200.zip"
    _tiny_imagenet_zip(zip_path)
    parts = tmp_path / "parts"
    assert _run("split", zip_path, parts, "--part-size", "20K", cwd=tmp_path).returncode == 0
    work, out = tmp_path / "work", tmp_path / "out"
    overrides = [
        "--",
        "device=cpu",
        "model.preset=nano",
        "model.embed_dim=16",
        "model.num_heads=[1,2,4]",
        "batch_size=16",
        "eval_batch_size=64",
        "schedule.epochs=3",
        "tensorboard=false",
    ]
    common = ["--parts", parts, "--work", work, "--out", out, "--preset", "fast", "--python", PYTHON]
    short = _run(*common, "--budget", "20", "--call-limit", "40", *overrides, cwd=tmp_path)
    assert short.returncode == 75, short.stdout + short.stderr
    assert "call again" in short.stdout
    assert not (work / "run").exists()

    full = _run(*common, "--budget", "20", *overrides, cwd=tmp_path)
    assert full.returncode == 0, full.stdout + full.stderr
    summary = json.loads((out / "speedrun.json").read_text())
    assert summary["data"]["zips"] == [{"zip": zip_path.name, "sha256": _sha(zip_path)}]
    assert summary["data"]["splits"] == {"train": 48, "val": 16}
    train = summary["train"]
    assert train["epochs"] >= 1  # the budget stretches or compresses the nominal 3 epochs
    assert len((out / "metrics.jsonl").read_text().splitlines()) == train["epochs"]
    assert train["best_top1"] <= 0.75  # a quarter of val is labelled against its image
    # eval of best.pt reproduces the best val top-1 the run logged (the run had no test-time flip; eval
    # reports top-1 with the flip and without it)
    assert train["tta"] == "none" and summary["eval"]["last"]["tta"] == "flip"
    assert summary["eval"]["best"]["top1_no_tta"] == pytest.approx(train["best_top1"], abs=1e-9)
    assert summary["eval"]["last"]["top1_no_tta"] == pytest.approx(train["val_top1"], abs=1e-9)
    assert summary["results"]["val_top1"] == train["val_top1"]
    produced = sorted(p.name for p in out.iterdir())
    assert len(produced) <= 8
    assert {"speedrun.json", "config.yaml", "metrics.jsonl", "speedrun.log"} <= set(produced)
    assert any(name.endswith(".png") for name in produced)

    stamp = (work / "run" / "metrics.jsonl").stat().st_mtime_ns
    again = _run(*common, "--budget", "20", *overrides, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "finished" in again.stdout
    assert (work / "run" / "metrics.jsonl").stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------------------------------------
# gpu_throughput.py


def _load_throughput() -> ModuleType:
    if str(ROOT / "benchmarks") not in sys.path:  # as when the script runs: its folder is on the path
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_throughput", ROOT / "benchmarks" / "gpu_throughput.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebook_arm_uses_the_notebook_transforms_in_order() -> None:
    gt = _load_throughput()
    steps = gt.notebook_transform().transforms
    assert [type(s) for s in steps] == [
        T.RandomResizedCrop,
        T.RandomHorizontalFlip,
        T.RandAugment,
        T.ColorJitter,
        T.ToTensor,
        T.Normalize,
        T.RandomErasing,
    ]
    assert steps[0].size == (64, 64) and steps[0].scale == (0.9, 1.0)
    assert (steps[2].num_ops, steps[2].magnitude) == (2, 5)
    assert steps[3].brightness == (0.8, 1.2) and steps[3].hue == (-0.05, 0.05)
    assert tuple(steps[5].mean) == (0.4802, 0.4481, 0.3975)
    assert (steps[6].p, steps[6].scale, steps[6].value) == (0.1, (0.02, 0.2), "random")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_throughput_arms_count_their_images(tmp_path: Path, device: str, one_thread: None) -> None:
    """Every arm runs the asked steps on full batches on the device; the ratio is resident / notebook."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 64, 64, 3), dtype=np.uint8)
    labels = np.arange(40, dtype=np.int64) % 4
    cache = write_cache(
        tmp_path / "cache",
        {"train": (images, labels)},
        [f"c{i}" for i in range(4)],
        ["a", "b", "c", "d"],
        "test",
    )
    gt = _load_throughput()
    augment = build_augment(build_augment_config(load_config("speedrun")), (0.5,) * 3, (0.25,) * 3, 4)
    batches = gt.resident_batches(images, labels, 8, torch.device(device), augment)
    x, y = next(batches)
    assert x.shape == (8, 3, 64, 64) and x.device.type == device and y.device.type == device
    out = tmp_path / "tp.json"
    args = ["--data", str(cache), "--model", "nano", "--batches", "8", "--warmup", "1", "--steps", "2"]
    assert gt.main([*args, "--workers", "0", "--device", device, "--no-compile", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["augment"]["device_params"] is True  # the speedrun preset's augmentation
    size = result["batch_sizes"]["8"]
    assert set(size["arms"]) == {"notebook", "resident", "model", "augment"}
    for name, arm in size["arms"].items():
        # the augment arm runs 4x the steps, the notebook arm a fifth (here its floor, 2)
        assert arm["images"] == (64 if name == "augment" else 16)
        assert arm["images_per_s"] == pytest.approx(arm["images"] / arm["seconds"])
        assert name == "augment" or np.isfinite(arm["last_loss"])
    rate = {name: arm["images_per_s"] for name, arm in size["arms"].items()}
    assert size["resident_vs_notebook"] == pytest.approx(rate["resident"] / rate["notebook"])
    assert size["augment_vs_step"] == pytest.approx(rate["augment"] / rate["resident"])
    assert size["resident_vs_model"] == pytest.approx(rate["resident"] / rate["model"])
    assert result["device"] == ("cpu" if device == "cpu" else torch.cuda.get_device_name(0))
    if device == "cuda":
        assert size["augment_waits_for_the_device"] == "no"
