"""Speed of `tinyswin prepare` against a plain single-process PIL loop, and of shuffled batch reads.

Run: python benchmarks/data_speed.py [--zip tiny-imagenet-200-sub.zip] [--workers N] [--batch 256]

Prints images/s of:
  - prepare (end to end: listing, checks, decoding in a process pool, writing the cache),
  - a plain single-process loop over the same zip (ZipFile.read -> PIL decode -> RGB -> numpy), the reference,
    and the ratio of the two, both measured in this run;
  - shuffled batches from the cache: BatchLoader on the CPU (split loaded into memory once, then gathered),
    and fancy-indexed reads straight from the memory map.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from tinyswin.data.cache import load_cache
from tinyswin.data.decode import available_cpus
from tinyswin.data.loader import BatchLoader
from tinyswin.data.prepare_source import prepare

DEFAULT_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200-sub.zip"


def plain_pil_loop(zip_path: Path, limit: int | None) -> tuple[int, float]:
    """Decode every JPEG of the zip in one process into one array; returns (images, seconds)."""
    start = time.perf_counter()
    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if n.lower().endswith((".jpeg", ".jpg"))][:limit]
        out = np.empty((len(names), 64, 64, 3), dtype=np.uint8)
        for i, name in enumerate(names):
            with Image.open(io.BytesIO(zf.read(name))) as im:
                out[i] = np.asarray(im.convert("RGB"))
    return len(names), time.perf_counter() - start


def batch_reads(cache_dir: Path, batch: int, epochs: int) -> None:
    cache = load_cache(cache_dir)
    images, labels = cache.split("train")
    start = time.perf_counter()
    loader = BatchLoader(images, labels, batch, seed=0)
    setup = time.perf_counter() - start
    seen = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, _ in loader:
            seen += len(x)
    elapsed = time.perf_counter() - start
    print(
        f"BatchLoader (cpu, batch {batch}): load split once {setup:.2f} s, then {seen / elapsed:,.0f} img/s"
    )
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    seen = 0
    start = time.perf_counter()
    for i in range(0, len(order) - batch + 1, batch):
        seen += len(np.asarray(images[np.sort(order[i : i + batch])]))
    elapsed = time.perf_counter() - start
    print(f"memmap fancy-index reads (batch {batch}, page cache warm): {seen / elapsed:,.0f} img/s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zip", type=Path, default=DEFAULT_ZIP)
    parser.add_argument("--workers", type=int, default=None, help="prepare's processes (default: all CPUs)")
    parser.add_argument("--limit", type=int, default=None, help="images of the reference loop (default: all)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if not args.zip.is_file():
        raise SystemExit(f"zip not found: {args.zip}")
    workers = args.workers or available_cpus()
    with tempfile.TemporaryDirectory(prefix="tinyswin-bench-") as tmp:
        out = Path(tmp) / "cache"
        start = time.perf_counter()
        prepare(args.zip, out, workers=workers, progress=False)
        prep_time = time.perf_counter() - start
        n_cache = sum(load_cache(out).meta["counts"].values())
        prep_rate = n_cache / prep_time
        print(
            f"prepare ({workers} workers): {n_cache:,} images in {prep_time:.1f} s = {prep_rate:,.0f} img/s"
        )
        n_ref, ref_time = plain_pil_loop(args.zip, args.limit)
        ref_rate = n_ref / ref_time
        print(f"plain single-process PIL loop: {n_ref:,} images in {ref_time:.1f} s = {ref_rate:,.0f} img/s")
        print(f"prepare / plain loop: {prep_rate / ref_rate:.2f}x")
        print(f"projected full Tiny ImageNet (110,000 images) at this rate: {110_000 / prep_rate:.0f} s")
        batch_reads(out, args.batch, args.epochs)


if __name__ == "__main__":
    main()
