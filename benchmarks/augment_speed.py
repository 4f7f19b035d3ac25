"""Images/s of the 'seed' augmentation recipe: batched (tinyswin) against the notebook's per-image pipeline.

Prints, all measured in this run on one CPU thread (``torch.set_num_threads(1)``):
- tinyswin ``Augment`` on uint8 batches (default batch 256), with the native CPU kernels (the default)
  and with the eager PyTorch ops (``native=False``),
- the notebook's torchvision pipeline image by image on PIL images, with JPEG decode and without
  (images decoded beforehand, since the uint8 cache spares us the decoding),
- the speedrun's augmentation (preset ``light``: RandomResizedCrop 0.35-1, flip, RandAugment(2, 7),
  Mixup/CutMix at 0.15 each) on the exact path (native kernels, parameters drawn on the CPU) and on the
  sync-free device path (``device_params``: parameters drawn on the batch's device, every op on the whole
  batch, as on a GPU),
- the ratios; and, when CUDA is available, tinyswin's images/s on the GPU (default batch 1024): ``seed``
  on the exact path and the speedrun's augmentation on the device path.

Each rate is given twice: by wall clock and by the thread's CPU time. The pipelines take turns for
``--rounds`` rounds and each reports its best round, so that a burst of other work on a shared machine
does not land on one side of a ratio only.

Images: JPEGs from the Tiny ImageNet subset zip when it exists (``--zip``), otherwise smooth synthetic
images (JPEG-encoded, for the decode baseline).

Usage: python benchmarks/augment_speed.py [--images 2000] [--batch 256] [--rounds 3] [--gpu-batch 1024]
"""

from __future__ import annotations

import argparse
import io
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from notebook import notebook_normalization, notebook_transform
from tinyswin.data import augment_native
from tinyswin.data.augment import AugmentConfig, augment_preset, build_augment

MEAN, STD = notebook_normalization()
DEFAULT_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200-sub.zip"


def load_jpegs(zip_path: Path, count: int) -> list[bytes]:
    """``count`` training JPEGs spread over the zip's classes, as encoded bytes."""
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(n for n in zf.namelist() if "/train/" in n and n.endswith(".JPEG"))
        step = max(1, len(names) // count)
        return [zf.read(n) for n in names[::step][:count]]


def synthetic_jpegs(count: int, size: int = 64, seed: int = 0) -> list[bytes]:
    """Smooth random colour images (sums of low-frequency waves), JPEG-encoded."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(count):
        img = np.zeros((size, size, 3)) + rng.uniform(60, 190, size=3)
        for _ in range(4):
            f = rng.uniform(0.5, 4.0, size=2)
            amp = rng.uniform(10, 40, size=3)
            img += amp * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy) + rng.uniform(0, 6.3))[..., None]
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def timed(fn: Callable[[], int], sync: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """(images/s by wall clock, images/s by thread CPU time) of ``fn``, which returns an image count."""
    sync()
    wall, cpu = time.perf_counter(), time.thread_time()
    count = fn()
    sync()
    return count / (time.perf_counter() - wall), count / (time.thread_time() - cpu)


def per_image(jpegs: list[bytes], decode: bool) -> Callable[[], int]:
    """The notebook transform per image (Mixup/CutMix, once per batch, is left out), as a timed function."""
    tf = notebook_transform()
    if decode:
        return lambda: sum(1 for b in jpegs if tf(Image.open(io.BytesIO(b)).convert("RGB")) is not None)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]
    return lambda: sum(1 for im in images if tf(im) is not None)


def speedrun_config(device_params: bool) -> AugmentConfig:
    """The speedrun preset's augmentation ('light'), on the device path or the exact one."""
    return augment_preset("light", device_params=device_params)


def batched(
    images: torch.Tensor,
    batch_size: int,
    repeats: int,
    device: str,
    native: bool = True,
    config: AugmentConfig | None = None,
) -> Callable[[], int]:
    """tinyswin's Augment (default: 'seed', mixing included) on batches of ``batch_size``, warmed up, to be
    timed."""
    config = config if config is not None else augment_preset("seed")
    aug = build_augment(config, MEAN, STD, num_classes=200, native=native)
    gen = torch.Generator().manual_seed(0)
    reps = -(-batch_size // images.shape[0])
    data = images.repeat(reps, 1, 1, 1)[:batch_size].to(device)  # (batch_size, H, W, 3) uint8
    labels = (torch.arange(batch_size) % 200).to(device)
    aug(data, labels, gen)

    def run() -> int:
        for _ in range(repeats):
            aug(data, labels, gen)
        return repeats * batch_size

    return run


def best_of(
    fns: dict[str, Callable[[], int]], rounds: int, sync=lambda: None
) -> dict[str, tuple[float, float]]:
    """Run the functions in turn for ``rounds`` rounds; each one's best (wall, CPU-time) images/s."""
    best = {name: (0.0, 0.0) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            wall, cpu = timed(fn, sync)
            best[name] = (max(best[name][0], wall), max(best[name][1], cpu))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=DEFAULT_ZIP)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10, help="batches per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds in turn; each pipeline's best counts")
    parser.add_argument("--gpu-batch", type=int, default=1024)
    args = parser.parse_args()

    torch.set_num_threads(1)
    if args.zip.is_file():
        jpegs = load_jpegs(args.zip, args.images)
        source = f"{len(jpegs)} JPEGs from {args.zip.name}"
    else:
        jpegs = synthetic_jpegs(args.images)
        source = f"{len(jpegs)} synthetic JPEGs (no zip at {args.zip})"
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs])
    images = torch.from_numpy(decoded)  # (N, 64, 64, 3) uint8
    print(f"images: {source}; torch {torch.__version__}; 1 CPU thread; rates as wall / CPU-time images/s")

    kernels = augment_native.load()
    print(f"native kernels: {kernels.path if kernels is not None else 'unavailable (eager ops only)'}")
    ours, eager = (
        f"tinyswin Augment('seed'), batch {args.batch}",
        "  the same with the eager ops (native=False)",
    )
    plain, decode = "torchvision per image, PIL pre-decoded", "torchvision per image, with JPEG decode"
    light, light_dev = "speedrun aug ('light'), exact path", "  the same on the device path (device_params)"
    fns = {
        ours: batched(images, args.batch, args.repeats, "cpu"),
        eager: batched(images, args.batch, 2, "cpu", native=False),
        light: batched(images, args.batch, args.repeats, "cpu", config=speedrun_config(False)),
        light_dev: batched(images, args.batch, args.repeats, "cpu", config=speedrun_config(True)),
        plain: per_image(jpegs, decode=False),
        decode: per_image(jpegs, decode=True),
    }
    rates = best_of(fns, args.rounds)
    for name, (wall, cpu) in rates.items():
        print(f"{name:45s} {wall:9.0f} / {cpu:9.0f}")
    ours, plain, decode = rates[ours], rates[plain], rates[decode]
    print(
        f"{'ratio vs per image without decode':45s} {ours[0] / plain[0]:8.1f}x / {ours[1] / plain[1]:8.1f}x"
    )
    print(f"{'ratio vs per image with decode':45s} {ours[0] / decode[0]:8.1f}x / {ours[1] / decode[1]:8.1f}x")
    if torch.cuda.is_available():
        run = batched(images, args.gpu_batch, max(args.repeats, 20), "cuda")
        wall, _ = best_of({"gpu": run}, args.rounds, torch.cuda.synchronize)["gpu"]
        name = f"tinyswin Augment('seed'), batch {args.gpu_batch}, {torch.cuda.get_device_name()}"
        print(f"{name}: {wall:.0f} images/s (wall)")
        print(f"{'ratio GPU vs per image without decode (wall)':45s} {wall / plain[0]:8.1f}x")
        run = batched(images, args.gpu_batch, max(args.repeats, 20), "cuda", config=speedrun_config(True))
        wall, _ = best_of({"gpu": run}, args.rounds, torch.cuda.synchronize)["gpu"]
        print(f"speedrun aug ('light', device path), batch {args.gpu_batch}: {wall:.0f} images/s (wall)")
    else:
        print("CUDA: not available here (no GPU number)")


if __name__ == "__main__":
    main()
