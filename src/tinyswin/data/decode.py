"""Decoding a planned source into the memory-mapped uint8 arrays of a partial cache, by a pool of processes.

Each process opens its own handle on the source (a zip is read in place) and decodes chunks of files straight
into `<split>_images.npy`; unreadable files are collected, never fatal here (`prepare` decides).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tinyswin.data.imagefolder import SourceReader, SourceTree, decode_image

# Per-process state of a decoding worker, set once by `_init_worker` in each pool process (never in the
# parent): the worker's own zip handle and memory maps, reused across the chunks it is given.
_worker_decoder: _ChunkDecoder | None = None


def channel_histogram(images: np.ndarray, rows: int = 1024) -> np.ndarray:
    """Per-channel histogram of uint8 RGB images (exact integer counts).

    Args:
        images: uint8 (N, H, W, 3).
        rows: images per step (bounds the temporary memory).

    Returns:
        int64 (3, 256): counts of each value in each channel.
    """
    hist = np.zeros((3, 256), dtype=np.int64)
    for start in range(0, len(images), rows):
        block = np.asarray(images[start : start + rows]).reshape(-1, 3)  # (n*H*W, 3)
        for channel in range(3):
            hist[channel] += np.bincount(block[:, channel], minlength=256)
    return hist


class _ChunkDecoder:
    """Decodes chunks of files straight into the memory-mapped image arrays of a partial cache."""

    def __init__(self, tree: SourceTree, folder: Path, size: int) -> None:
        self.reader: SourceReader = tree.open_reader()
        self.folder = folder
        self.size = size
        self.arrays: dict[str, np.ndarray] = {}

    def __call__(
        self, task: tuple[str, int, list[str]]
    ) -> tuple[int, list[tuple[str, int, str]], np.ndarray | None]:
        """Decode ``names`` into rows ``start..`` of split ``split``.

        Returns:
            (number of files, [(split, row, "file: error")] for each unreadable file,
             (3, 256) histogram of the good rows for split 'train', else None)
        """
        split, start, names = task
        if split not in self.arrays:
            self.arrays[split] = np.load(self.folder / f"{split}_images.npy", mmap_mode="r+")
        images = self.arrays[split]
        bad: list[tuple[str, int, str]] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for j, name in enumerate(names):
                try:
                    images[start + j] = decode_image(self.reader.read(name), self.size)
                except Exception as exc:  # any failure to read or decode marks the file as bad
                    bad.append((split, start + j, f"{name} ({type(exc).__name__}: {exc})"))
        hist = None
        if split == "train":
            good = np.ones(len(names), dtype=bool)
            good[[row - start for _, row, _ in bad]] = False
            hist = channel_histogram(images[start : start + len(names)][good])
        return len(names), bad, hist

    def close(self) -> None:
        """Release the zip handle and the memory maps."""
        self.reader.close()
        for array in self.arrays.values():
            if isinstance(array, np.memmap):
                array.flush()
        self.arrays.clear()


def _init_worker(tree: SourceTree, folder: Path, size: int) -> None:
    global _worker_decoder
    _worker_decoder = _ChunkDecoder(tree, folder, size)


def _decode_in_worker(
    task: tuple[str, int, list[str]],
) -> tuple[int, list[tuple[str, int, str]], np.ndarray | None]:
    assert _worker_decoder is not None, "decoding worker used before its initializer ran"
    return _worker_decoder(task)


def available_cpus() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _run_tasks(
    tree: SourceTree, folder: Path, size: int, tasks: list[tuple[str, int, list[str]]], workers: int
) -> Iterator[tuple[int, list[tuple[str, int, str]], np.ndarray | None]]:
    if workers <= 1:
        decoder = _ChunkDecoder(tree, folder, size)
        try:
            yield from map(decoder, tasks)
        finally:
            decoder.close()
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else None)  # fork: no re-import in the workers
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tree, folder, size)) as pool:
        yield from pool.imap_unordered(_decode_in_worker, tasks)


def drop_rows(folder: Path, split: str, bad_rows: list[int], chunk: int = 4096) -> None:
    """Rewrite ``<split>_images.npy`` without the given rows."""
    path = folder / f"{split}_images.npy"
    old = np.load(path, mmap_mode="r")
    keep = np.ones(len(old), dtype=bool)
    keep[bad_rows] = False
    new_path = folder / f"{split}_images.compact.npy"
    new = np.lib.format.open_memmap(
        new_path, mode="w+", dtype=np.uint8, shape=(int(keep.sum()), *old.shape[1:])
    )
    pos = 0
    for start in range(0, len(old), chunk):
        block = old[start : start + chunk][keep[start : start + chunk]]
        new[pos : pos + len(block)] = block
        pos += len(block)
    new.flush()
    del new, old
    os.replace(new_path, path)


def decode_splits(
    tree: SourceTree,
    splits: dict[str, tuple[list[str], np.ndarray]],
    folder: Path,
    size: int,
    workers: int,
    progress: bool,
) -> tuple[list[tuple[str, int, str]], np.ndarray]:
    """Decode every split into ``folder``; returns the bad files and the train histogram.

    With ``progress``, a progress bar shows on a terminal; elsewhere (a log file, a pipe) one line says what
    is decoded instead of a bar's every update.
    """
    total = sum(len(files) for files, _ in splits.values())
    chunk = int(min(256, max(8, math.ceil(total / (workers * 16)))))
    tasks = [
        (split, start, files[start : start + chunk])
        for split, (files, _) in splits.items()
        for start in range(0, len(files), chunk)
    ]
    for split, (files, _) in splits.items():
        array = np.lib.format.open_memmap(
            folder / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3)
        )
        del array
    bad: list[tuple[str, int, str]] = []
    hist = np.zeros((3, 256), dtype=np.int64)
    workers = min(workers, len(tasks))
    on_terminal = sys.stderr is not None and sys.stderr.isatty()
    if progress and not on_terminal:
        print(f"decoding {total:,} images of {tree.path.name} ({workers} processes)", file=sys.stderr)
    bar = tqdm(
        total=total,
        unit="img",
        desc=f"decoding {tree.path.name}",
        disable=not (progress and on_terminal),
        smoothing=0.05,
    )
    with bar:
        for n, chunk_bad, chunk_hist in _run_tasks(tree, folder, size, tasks, workers):
            bad += chunk_bad
            if chunk_hist is not None:
                hist += chunk_hist
            bar.update(n)
    return bad, hist
