"""Train-step throughput: the data resident on the device with batched augmentation, against the notebook's
DataLoader pipeline (per-image torchvision transforms in worker processes), on the same model and card.

Arms, all running the identical training step (autocast bf16 on CUDA / fp32 on CPU, cross-entropy with
label smoothing 0.05, backward, grad clip 3.0, AdamW fused on CUDA) on the same model preset and batch size:

- ``notebook``: a ``torch.utils.data.DataLoader`` over PIL images with the notebook's transforms, in order
  (RandomResizedCrop(64, scale 0.9-1), flip, RandAugment(2, 5), ColorJitter(0.2, 0.2, 0.2, 0.05), ToTensor,
  Normalize, RandomErasing(p 0.1, scale 0.02-0.2, random values)), ``--workers`` processes (4, as the
  notebook), shuffled, pinned memory, batches copied to the device. The images come from the uint8 cache as
  PIL images, so JPEG decoding (which the notebook paid for on every read) is not counted: a kind baseline.
- ``resident``: tinyswin's path: the whole split on the device (``BatchLoader``), a device-side gather per
  batch, and the same transforms applied to the whole batch on the device (augment preset ``seed`` with
  Mixup/CutMix off, since the notebook arm has none here either).
- ``model``: one fixed batch already on the device, no data pipeline: the ceiling of the training step.

Prints images per second of each arm and the ratio resident / notebook; ``--json FILE`` writes them too.

    python benchmarks/gpu_throughput.py --data runs/speedrun/cache                  # seed model, batch 64
    python benchmarks/gpu_throughput.py --data CACHE --batch-size 512 --model tiny64 --compile
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

from notebook import notebook_normalization, notebook_transform
from tinyswin.data import BatchLoader, build_augment, is_cache, load_cache, prepare
from tinyswin.data.augment import augment_preset
from tinyswin.model import SwinTransformer, preset_config
from tinyswin.optim import build_adamw
from tinyswin.paths import cache_root

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_MEAN, NOTEBOOK_STD = notebook_normalization()


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
    mean: tuple[float, ...] = NOTEBOOK_MEAN,
    std: tuple[float, ...] = NOTEBOOK_STD,
    num_classes: int = 200,
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x float (B, 3, 64, 64), y int64 (B,)): the split on the device, batched seed augmentation."""
    loader = BatchLoader(images, labels, batch_size, shuffle=True, drop_last=True, seed=seed, device=device)
    augment = build_augment(augment_preset("seed", mixup_p=0.0, cutmix_p=0.0), mean, std, num_classes)
    generator = torch.Generator()
    generator.manual_seed(seed)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for images_u8, y in loader:
            yield augment(images_u8, y, generator=generator, mix=False)
        epoch += 1


def fixed_batch(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first batch of `batches`, forever (no data pipeline in the timed loop)."""
    x, y = next(batches)
    while True:
        yield x, y


def make_step(
    model: nn.Module, device: torch.device, compile_model: bool = False
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One optimizer step on a batch (the same for every arm); returns the loss (not synchronized)."""
    optimizer = build_adamw(model, 1e-4, weight_decay=0.05, device=device)
    forward = torch.compile(model) if compile_model else model
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


def time_arm(
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    warmup: int,
    steps: int,
    device: torch.device,
) -> dict[str, float]:
    """Images per second of `steps` training steps on `batches`, after `warmup` untimed ones."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    loss = None
    for _ in range(warmup):
        loss = step(*next(batches))
    sync()
    images = 0
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        loss = step(x, y)
        images += y.shape[0]
    sync()
    seconds = time.perf_counter() - start
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "last_loss": float(loss) if loss is not None else float("nan"),
    }


def load_split(data: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(uint8 train images (N, H, W, 3), labels (N,), classes) of a cache, or of a zip prepared once."""
    path = Path(data)
    if not is_cache(path):
        if not path.exists():
            raise FileNotFoundError(f"--data not found: {data}")
        path = prepare(path, cache_root() / f"{path.name.removesuffix('.zip')}-throughput-64px")
    cache = load_cache(path)
    images, labels = cache.split("train")
    return images, labels, cache.num_classes


def describe_device(device: torch.device) -> str:
    """The card's name (or 'cpu')."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every arm on the same model preset, batch size and card; returns the results."""
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    images, labels, num_classes = load_split(args.data)
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    images = np.ascontiguousarray(images)  # in memory for both arms
    results: dict[str, Any] = {
        "device": describe_device(device),
        "torch": torch.__version__,
        "commit": _git_head(),
        "model": args.model,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "warmup": args.warmup,
        "steps": args.steps,
        "compile": args.compile,
        "train_images": len(labels),
        "arms": {},
    }
    factories = {
        "notebook": lambda: notebook_batches(
            images, labels, args.batch_size, args.workers, device, args.seed
        ),
        "resident": lambda: resident_batches(
            images, labels, args.batch_size, device, num_classes=num_classes, seed=args.seed
        ),
        "model": lambda: fixed_batch(
            resident_batches(images, labels, args.batch_size, device, num_classes=num_classes, seed=args.seed)
        ),
    }
    for arm in args.arms:
        torch.manual_seed(args.seed)
        model = SwinTransformer(preset_config(args.model, num_classes=num_classes, img_size=images.shape[1]))
        model = model.to(device).train()
        step = make_step(model, device, args.compile)
        batches = factories[arm]()
        results["arms"][arm] = time_arm(step, batches, args.warmup, args.steps, device)
        del batches, model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{arm:<9} {results['arms'][arm]['images_per_s']:10.1f} img/s", flush=True)
    arms = results["arms"]
    if "notebook" in arms and "resident" in arms:
        results["ratio_resident_vs_notebook"] = (
            arms["resident"]["images_per_s"] / arms["notebook"]["images_per_s"]
        )
        print(f"resident / notebook: {results['ratio_resident_vs_notebook']:.2f}x")
    if "model" in arms and "resident" in arms:
        results["resident_share_of_model_ceiling"] = (
            arms["resident"]["images_per_s"] / arms["model"]["images_per_s"]
        )
    return results


def _git_head() -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="a tinyswin cache, or a Tiny ImageNet zip to prepare")
    parser.add_argument("--model", default="seed", help="model preset (default: seed, the notebook's)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers of the notebook arm")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per arm")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per arm")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=["notebook", "resident", "model"],
        choices=["notebook", "resident", "model"],
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (every arm)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cpu")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N train images (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print and optionally write the results."""
    args = build_parser().parse_args(argv)
    results = run(args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
