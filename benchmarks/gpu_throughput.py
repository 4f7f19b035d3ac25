"""Train-step and augmentation throughput: the data resident on the device with batched augmentation, against
the notebook's DataLoader pipeline (per-image torchvision transforms in worker processes), on the same model,
batch sizes and card.

The model and augmentation are a training preset's (default ``speedrun``: the tiny64 Swin and the ``light``
augmentation with Mixup/CutMix, parameters drawn on the device when the preset sets
``augment.device_params``). Arms, for each batch size (``--batches``, default 512 and 1024), all running the
identical training step (autocast bf16 on CUDA / fp32 on CPU, cross-entropy with label smoothing 0.05,
backward, grad clip 3.0, AdamW fused on CUDA) on one model, compiled with ``torch.compile`` on CUDA
(``--compile``). Each batch size gets a model of its own (the same seed, so the same weights), compiled with
static shapes after ``torch._dynamo.reset()``: one graph per size, never a recompile of another size's graph
(compiling several sizes into one dynamo cache turned on dynamic shapes once, and inductor's dynamic-shape
code crashed on an H100: ``NameError: name 's27' is not defined``):

- ``notebook``: a ``torch.utils.data.DataLoader`` over PIL images with the notebook's transforms, in order
  (RandomResizedCrop(64, scale 0.9-1), flip, RandAugment(2, 5), ColorJitter(0.2, 0.2, 0.2, 0.05), ToTensor,
  Normalize, RandomErasing(p 0.1, scale 0.02-0.2, random values)), ``--workers`` processes (4, as the
  notebook), shuffled, pinned memory, batches copied to the device. The images come from the uint8 cache as
  PIL images, so JPEG decoding (which the notebook paid for on every read) is not counted: a kind baseline.
- ``resident``: tinyswin's path: the whole split on the device (``BatchLoader``), a device-side gather per
  batch, and the preset's augmentation on the whole batch on the device.
- ``model``: one fixed batch already on the device, no data pipeline: the ceiling of the training step.
- ``augment``: the ``resident`` arm's data path alone (gather + augmentation, no step): it must outrun the
  step several times over (the aim: 5x), or it eats the step's time. On CUDA, one batch also runs under
  ``torch.cuda.set_sync_debug_mode("error")``, which says whether the augmentation waits for the device.

Prints images per second of each arm and the ratios resident / notebook, augment / resident and resident /
model; ``--json FILE`` writes them too, with the seconds of the first (compiling) steps of each batch size.
``--quick`` is a short CPU check of the whole script (a small model on the built-in dataset).

    python benchmarks/gpu_throughput.py --data runs/speedrun/cache                # speedrun preset, 512, 1024
    python benchmarks/gpu_throughput.py --data runs/speedrun/cache --batches 512  # one size: one compile
    python benchmarks/gpu_throughput.py --data CACHE --batches 256 --preset seed --no-compile
    python benchmarks/gpu_throughput.py --quick                                   # on the CPU, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from notebook import notebook_transform
from tinyswin.config import TrainConfig, build_augment_config, build_model_config, load_config
from tinyswin.data import Augment, BatchLoader, build_augment, is_cache, load_cache, prepare
from tinyswin.data.synthetic import ensure_synthetic
from tinyswin.model import SwinTransformer
from tinyswin.optim import build_adamw
from tinyswin.paths import cache_root
from tinyswin.runtime import compile_static

ROOT = Path(__file__).resolve().parents[1]


class PilImages(torch.utils.data.Dataset):
    """A uint8 split served one PIL image at a time, as an ImageFolder serves decoded files.

    Args:
        images: uint8 (N, H, W, 3).
        labels: int64 (N,).
        transform: PIL image -> float tensor (3, H', W').
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, transform: Callable[[Image.Image], Any]
    ) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(np.asarray(self.images[index]))
        return self.transform(image), int(self.labels[index])


def notebook_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, workers: int, device: torch.device, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x float (B, 3, 64, 64), y int64 (B,)) on `device` from the notebook's DataLoader pipeline."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        PilImages(images, labels, notebook_transform(images.shape[1])),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
        generator=generator,
    )
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def resident_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    device: torch.device,
    augment: Augment,
    mix: bool = True,
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x float (B, 3, H', W'), targets): the split on the device, `augment` on whole batches."""
    loader = BatchLoader(images, labels, batch_size, shuffle=True, drop_last=True, seed=seed, device=device)
    generator = torch.Generator()
    generator.manual_seed(seed)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for images_u8, y in loader:
            yield augment(images_u8, y, generator=generator, mix=mix)
        epoch += 1


def fixed_batch(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first batch of `batches`, forever (no data pipeline in the timed loop)."""
    x, y = next(batches)
    while True:
        yield x, y


def make_step(
    model: nn.Module, device: torch.device, compile_model: bool = False, compile_mode: str = "default"
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One optimizer step on a batch (the same for every arm); returns the loss (not synchronized). Compiled
    as training compiles it (`tinyswin.runtime.compile_static`: static shapes)."""
    optimizer = build_adamw(model, 1e-4, weight_decay=0.05, device=device)
    forward = compile_static(model, compile_mode) if compile_model else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with amp:
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.05)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        return loss.detach()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_arm(
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    warmup: int,
    steps: int,
    device: torch.device,
) -> dict[str, float]:
    """Images per second of `steps` training steps on `batches` after `warmup` untimed ones (`step` None:
    the batches alone, i.e. the data path); also the seconds of the warm-up (compiling, when it is first)."""
    loss = None
    start = time.perf_counter()
    for _ in range(warmup):
        x, y = next(batches)
        loss = step(x, y) if step is not None else None
    _sync(device)
    warmup_seconds = time.perf_counter() - start
    images = 0
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        if step is not None:
            loss = step(x, y)
        images += x.shape[0]
    _sync(device)
    seconds = time.perf_counter() - start
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "warmup_seconds": warmup_seconds,
        "last_loss": float(loss) if loss is not None else None,
    }


def augment_waits_for_the_device(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> str:
    """Whether a batch of the data path (the gather and the augmentation) synchronizes with the device ('no',
    or the error CUDA's sync debug mode raised; 'not checked' off CUDA)."""
    if device.type != "cuda":
        return "not checked (CUDA only)"
    next(batches)  # the epoch's first batch copies the loader's permutation to the device: not the check's
    torch.cuda.set_sync_debug_mode("error")
    try:
        next(batches)
        return "no"
    except RuntimeError as exc:
        return f"yes: {' '.join(str(exc).split())[:200]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def load_split(data: str | None) -> tuple[np.ndarray, np.ndarray, Any]:
    """(uint8 train images (N, H, W, 3), labels (N,), the cache) of a cache, of a zip or folder prepared once,
    or of the built-in synthetic set (None)."""
    if data is None:
        path = ensure_synthetic()
    else:
        path = Path(data)
        if not is_cache(path):
            if not path.exists():
                raise FileNotFoundError(f"--data not found: {data}")
            path = prepare(path, cache_root() / f"{path.name.removesuffix('.zip')}-throughput-64px")
    cache = load_cache(path)
    images, labels = cache.split("train")
    return images, labels, cache


def describe_device(device: torch.device) -> str:
    """The card's name (or 'cpu')."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def build_run(args: argparse.Namespace, cache: Any) -> tuple[nn.Module, Augment, TrainConfig]:
    """The preset's model (or `--model`) and augmentation (or `--augment`) for the cache's data."""
    overrides = [f"model.preset={args.model}"] if args.model else []
    if args.augment:
        overrides.append(f"augment.preset={args.augment}")
    cfg = load_config(args.preset, None, overrides)
    torch.manual_seed(args.seed)
    model = SwinTransformer(build_model_config(cfg, cache.num_classes, cache.image_size))
    augment = build_augment(build_augment_config(cfg), cache.mean, cache.std, cache.num_classes)
    return model, augment, cfg


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every arm at every batch size on the same model and card; returns the results."""
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    compile_model = device.type == "cuda" if args.compile is None else args.compile
    images, labels, cache = load_split(args.data)
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    images = np.ascontiguousarray(images)  # in memory for every arm
    model, augment, cfg = build_run(args, cache)
    results: dict[str, Any] = {
        "device": describe_device(device),
        "torch": torch.__version__,
        "commit": _git_head(),
        "preset": args.preset,
        "model": cfg.model.preset,
        "params": sum(p.numel() for p in model.parameters()),
        "augment": {"preset": cfg.augment.preset, **cfg.augment.overrides},
        "image_size": int(images.shape[1]),
        "workers": args.workers,
        "warmup": args.warmup,
        "steps": args.steps,
        "compile": compile_model,
        "compile_mode": args.compile_mode if compile_model else None,
        "train_images": len(labels),
        "batch_sizes": {},
    }
    del model
    for batch_size in args.batches:
        torch._dynamo.reset()  # a compiled model of its own: no other size's graph, no recompile
        model, augment, _ = build_run(args, cache)  # the same seed: the same weights for every size
        model = model.to(device).train()
        step = make_step(model, device, compile_model, args.compile_mode)
        results["batch_sizes"][str(batch_size)] = run_batch_size(
            args, batch_size, images, labels, step, augment, device
        )
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def run_batch_size(
    args: argparse.Namespace,
    batch_size: int,
    images: np.ndarray,
    labels: np.ndarray,
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    augment: Augment,
    device: torch.device,
) -> dict[str, Any]:
    """Every arm at one batch size, then the ratios; prints a line per arm."""

    def resident() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return resident_batches(images, labels, batch_size, device, augment, seed=args.seed)

    factories: dict[str, Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]] = {
        "model": lambda: fixed_batch(resident()),  # first: its warm-up holds the compilation
        "resident": resident,
        "notebook": lambda: notebook_batches(images, labels, batch_size, args.workers, device, args.seed),
        "augment": resident,
    }
    out: dict[str, Any] = {"arms": {}}
    for arm in [a for a in factories if a in args.arms]:
        batches = factories[arm]()
        if arm == "augment":
            out["augment_waits_for_the_device"] = augment_waits_for_the_device(batches, device)
        # the augment arm is fast: 4x the steps; the notebook's is slow and steady: a fifth (GPU time)
        steps = {"augment": 4 * args.steps, "notebook": max(2, args.steps // 5)}.get(arm, args.steps)
        warmup = max(1, args.warmup // 5) if arm == "notebook" else args.warmup
        out["arms"][arm] = time_arm(None if arm == "augment" else step, batches, warmup, steps, device)
        del batches
        print(f"batch {batch_size:5d}  {arm:<9} {out['arms'][arm]['images_per_s']:10.1f} img/s", flush=True)
    arms = {name: arm["images_per_s"] for name, arm in out["arms"].items()}
    for name, (a, b) in {
        "resident_vs_notebook": ("resident", "notebook"),
        "augment_vs_step": ("augment", "resident"),
        "resident_vs_model": ("resident", "model"),
    }.items():
        if a in arms and b in arms:
            out[name] = arms[a] / arms[b]
            print(f"batch {batch_size:5d}  {a} / {b}: {out[name]:.2f}x", flush=True)
    if "model" in out["arms"]:
        out["first_steps_seconds"] = out["arms"]["model"]["warmup_seconds"]  # compiling this size's graph
    return out


def _git_head() -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


ARMS = ("model", "resident", "notebook", "augment")


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=None, help="a tinyswin cache, or a Tiny ImageNet zip or folder to prepare "
        "(default: the built-in synthetic set)",
    )  # fmt: skip
    parser.add_argument("--preset", default="speedrun", help="training preset: model and augmentation")
    parser.add_argument("--model", default=None, help="model preset instead of the training preset's")
    parser.add_argument("--augment", default=None, help="augment preset instead of the training preset's")
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[512, 1024], metavar="SIZE",
        help="batch sizes (images per step) to time, each with its own compiled model (default: 512 1024; "
        "one size, e.g. --batches 512, compiles once)",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers of the notebook arm")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per arm")
    parser.add_argument(
        "--steps",
        type=int,
        default=100,
        help="timed steps per arm (the augment arm: 4x; the notebook's: 1/5)",
    )
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the model (default: on CUDA)",
    )  # fmt: skip
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. reduce-overhead")
    parser.add_argument("--device", default="auto", help="auto, cuda, cpu")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N train images (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true",
        help="a short check on the CPU: the built-in data unless --data, a small model, batch 16, 2 steps",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the results to this file")
    return parser


def quick(args: argparse.Namespace) -> argparse.Namespace:
    """`--quick`: the same script at a size a CPU runs in seconds."""
    args.device = "cpu" if args.device == "auto" else args.device
    args.model = args.model or "nano"
    args.batches = [16]
    args.warmup, args.steps, args.workers = 1, 2, 0
    args.limit = args.limit or 256
    args.compile = False if args.compile is None else args.compile
    torch.set_num_threads(1)  # a small model on a shared CPU: one thread is the steadiest
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print and optionally write the results."""
    args = build_parser().parse_args(argv)
    if args.quick:
        args = quick(args)
    results = run(args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
