"""Images/s of the 'seed' augmentation recipe: batched (tinyswin) against the notebook's per-image pipeline.

Prints, all measured in this run on one CPU thread (``torch.set_num_threads(1)``):
- tinyswin ``Augment`` on uint8 batches (default batch 256),
- the notebook's torchvision pipeline image by image on PIL images, with JPEG decode and without
  (images decoded beforehand, since the uint8 cache spares us the decoding),
- the ratios; and, when CUDA is available, tinyswin's images/s on the GPU (default batch 1024).

Images: JPEGs from the Tiny ImageNet subset zip when it exists (``--zip``), otherwise smooth synthetic
images (and a synthetic JPEG encoding of them for the decode baseline).

Usage: python benchmarks/augment_speed.py [--images 2000] [--batch 256] [--gpu-batch 1024]
"""

from __future__ import annotations

import argparse
import io
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tinyswin.data.augment import augment_preset, build_augment

MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2296, 0.2263, 0.2255)
DEFAULT_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200-sub.zip"


def load_jpegs(zip_path: Path, count: int) -> list[bytes]:
    """The first ``count`` training JPEGs of the zip, as encoded bytes."""
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
        img = np.zeros((size, size, 3))
        for _ in range(4):
            f = rng.uniform(0.5, 4.0, size=2)
            ph = rng.uniform(0, 2 * np.pi, size=3)
            amp = rng.uniform(20, 60, size=3)
            img += amp * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy))[..., None] + amp * np.cos(ph)
        img = np.clip(img + 128, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def notebook_transform():
    """The notebook's training transform, image by image (torchvision v1 transforms on PIL images)."""
    import torchvision.transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(64, scale=(0.9, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandAugment(num_ops=2, magnitude=5),
            T.ColorJitter(0.2, 0.2, 0.2, 0.05),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
            T.RandomErasing(p=0.1, scale=(0.02, 0.2), value="random"),
        ]
    )


def per_image_rate(jpegs: list[bytes], decode: bool) -> float:
    """Images/s of the notebook transform (plus batch Mixup/CutMix cost is negligible and left out)."""
    tf = notebook_transform()
    images = None if decode else [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]
    start = time.perf_counter()
    if decode:
        for b in jpegs:
            tf(Image.open(io.BytesIO(b)).convert("RGB"))
    else:
        for im in images:
            tf(im)
    return len(jpegs) / (time.perf_counter() - start)


def batched_rate(
    batch: torch.Tensor, labels: torch.Tensor, batch_size: int, repeats: int, device: str
) -> float:
    """Images/s of tinyswin's 'seed' Augment on batches of ``batch_size`` (after one warm-up batch)."""
    aug = build_augment(augment_preset("seed"), MEAN, STD, num_classes=200)
    gen = torch.Generator().manual_seed(0)
    n = batch.shape[0]
    reps = -(-batch_size // n)
    data = batch.repeat(reps, 1, 1, 1)[:batch_size].to(device)  # (batch_size, H, W, 3)
    lab = labels.repeat(reps)[:batch_size].to(device)
    aug(data, lab, gen)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        aug(data, lab, gen)
    if device == "cuda":
        torch.cuda.synchronize()
    return repeats * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=DEFAULT_ZIP)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
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
    batch = torch.from_numpy(decoded)  # (N, 64, 64, 3) uint8
    labels = torch.arange(batch.shape[0]) % 200
    print(f"images: {source}; torch {torch.__version__}; 1 CPU thread")

    ours = batched_rate(batch, labels, args.batch, args.repeats, "cpu")
    ref_nodecode = per_image_rate(jpegs, decode=False)
    ref_decode = per_image_rate(jpegs, decode=True)
    print(f"tinyswin Augment('seed'), batch {args.batch}, CPU 1 thread: {ours:10.0f} images/s")
    print(f"torchvision per-image, PIL pre-decoded, 1 thread:       {ref_nodecode:10.0f} images/s")
    print(f"torchvision per-image, with JPEG decode, 1 thread:       {ref_decode:10.0f} images/s")
    print(f"ratio vs per-image without decode: {ours / ref_nodecode:6.1f}x")
    print(f"ratio vs per-image with decode:    {ours / ref_decode:6.1f}x")
    if torch.cuda.is_available():
        gpu = batched_rate(batch, labels, args.gpu_batch, max(args.repeats, 20), "cuda")
        name = torch.cuda.get_device_name()
        print(f"tinyswin Augment('seed'), batch {args.gpu_batch}, {name}: {gpu:10.0f} images/s")
        print(f"ratio GPU vs per-image without decode (1 thread): {gpu / ref_nodecode:8.1f}x")
    else:
        print("CUDA: not available here (no GPU number)")


if __name__ == "__main__":
    main()
