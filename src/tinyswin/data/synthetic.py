"""The built-in dataset: 10 classes of shapes and textures, generated deterministically.

Each image is one shape (disc, ring, square, triangle, cross) or one texture (horizontal, vertical or diagonal
stripes, checkerboard, dots) in a random colour on a random background, at a random place and scale, with a
brightness gradient and pixel noise. The same seed gives the same bytes on every machine (numpy's PCG64).
It lets `tinyswin train` run with no download; `ensure_synthetic` writes it once as a cache and reuses it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tinyswin.data.cache import is_cache, write_cache
from tinyswin.paths import cache_root

CLASS_NAMES = (
    "disc",
    "ring",
    "square",
    "triangle",
    "cross",
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "checkerboard",
    "dots",
)
VERSION = 1


def render(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """One image of class `label`.

    Args:
        label: class index into CLASS_NAMES.
        rng: the random source (consumed).
        size: image side in pixels.

    Returns:
        uint8 (size, size, 3).
    """
    coords = (np.arange(size) + 0.5) / size  # (S,) pixel centres in [0, 1)
    y, x = np.meshgrid(coords, coords, indexing="ij")  # (S, S) each
    background = rng.uniform(0.0, 1.0, 3)
    foreground = rng.uniform(0.0, 1.0, 3)
    while np.abs(foreground - background).sum() < 0.9:  # enough contrast to see the pattern
        foreground = rng.uniform(0.0, 1.0, 3)
    cx, cy = rng.uniform(0.38, 0.62, 2)
    r = rng.uniform(0.22, 0.36)
    dx, dy = x - cx, y - cy
    period = rng.uniform(0.16, 0.3)
    phase = rng.uniform(0.0, 1.0, 2)
    if label == 0:  # disc
        mask = dx**2 + dy**2 < r**2
    elif label == 1:  # ring
        d2 = dx**2 + dy**2
        mask = (d2 < r**2) & (d2 > (0.55 * r) ** 2)
    elif label == 2:  # square
        mask = np.maximum(np.abs(dx), np.abs(dy)) < 0.85 * r
    elif label == 3:  # triangle, apex up
        top, bottom = cy - r, cy + 0.8 * r
        mask = (y >= top) & (y <= bottom) & (np.abs(dx) <= (y - top) / (bottom - top) * r)
    elif label == 4:  # cross
        w = 0.35 * r
        mask = ((np.abs(dx) < w) & (np.abs(dy) < r)) | ((np.abs(dy) < w) & (np.abs(dx) < r))
    elif label == 5:  # horizontal stripes
        mask = (y / period + phase[0]) % 1.0 < 0.5
    elif label == 6:  # vertical stripes
        mask = (x / period + phase[0]) % 1.0 < 0.5
    elif label == 7:  # diagonal stripes, either direction
        sign = 1.0 if rng.uniform() < 0.5 else -1.0
        mask = ((x + sign * y) / (period * np.sqrt(2.0)) + phase[0]) % 1.0 < 0.5
    elif label == 8:  # checkerboard
        mask = ((x / period + phase[0]) % 1.0 < 0.5) ^ ((y / period + phase[1]) % 1.0 < 0.5)
    elif label == 9:  # dots on a grid
        u = (x / period + phase[0]) % 1.0 - 0.5
        v = (y / period + phase[1]) % 1.0 - 0.5
        mask = u**2 + v**2 < 0.3**2
    else:
        raise ValueError(f"label {label} out of range 0..{len(CLASS_NAMES) - 1}")
    m = mask[..., None].astype(np.float64)  # (S, S, 1)
    img = background * (1.0 - m) + foreground * m  # (S, S, 3)
    gradient = rng.uniform(-0.2, 0.2, 2)
    img = img * (1.0 + gradient[0] * (x - 0.5) + gradient[1] * (y - 0.5))[..., None]
    img = img + rng.normal(0.0, 0.05, img.shape)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def make_split(n_per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n_per_class` images of every class, classes interleaved (0, 1, ..., 9, 0, 1, ...).

    Returns:
        images uint8 (N, size, size, 3) and labels int64 (N,), N = 10 * n_per_class.
    """
    rng = np.random.default_rng(seed)
    k = len(CLASS_NAMES)
    labels = np.tile(np.arange(k, dtype=np.int64), n_per_class)  # (N,)
    images = np.stack([render(int(label), rng, size) for label in labels])  # (N, S, S, 3)
    return images, labels


def synthetic_splits(
    size: int = 32, train_per_class: int = 300, val_per_class: int = 50, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The 'train' and 'val' splits of the built-in dataset (val drawn from another random stream)."""
    return {
        "train": make_split(train_per_class, size, seed * 2),
        "val": make_split(val_per_class, size, seed * 2 + 1),
    }


def carve_holdout(
    images: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split 'holdout' carved from train as `prepare` carves it: in each class, round(fraction * n) images
    (>= 1, < n), drawn with `seed`; rows keep their order.

    Returns:
        {"train": (images, labels), "holdout": (images, labels)}.
    """
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        k = min(max(1, round(fraction * len(rows))), len(rows) - 1)
        held[rng.permutation(rows)[:k]] = True
    return {"train": (images[~held], labels[~held]), "holdout": (images[held], labels[held])}


def ensure_synthetic(
    root: str | os.PathLike[str] | None = None,
    size: int = 32,
    train_per_class: int = 300,
    val_per_class: int = 50,
    seed: int = 0,
    holdout: float = 0.0,
    holdout_seed: int = 0,
) -> Path:
    """The built-in dataset as a cache under `root` (default: `tinyswin.paths.cache_root()`), written once.

    With `holdout` > 0 the cache also holds split 'holdout', that fraction of every train class (drawn with
    `holdout_seed`), left out of train.

    Returns:
        The cache folder (reused when it already exists).
    """
    root = Path(root) if root is not None else cache_root()
    name = f"synthetic-v{VERSION}-{size}px-{train_per_class}x{val_per_class}-seed{seed}"
    if holdout > 0:
        name += f"-holdout{holdout:g}-seed{holdout_seed}"
    path = root / name
    if is_cache(path):
        return path
    splits = synthetic_splits(size, train_per_class, val_per_class, seed)
    if holdout > 0:
        splits = {**carve_holdout(*splits["train"], holdout, holdout_seed), "val": splits["val"]}
    root.mkdir(parents=True, exist_ok=True)
    try:
        return write_cache(
            path,
            splits,
            class_ids=[f"shape{i}" for i in range(len(CLASS_NAMES))],
            class_names=list(CLASS_NAMES),
            source=f"tinyswin synthetic shapes and textures v{VERSION} (seed {seed})",
            extra_meta={
                "synthetic": {
                    "version": VERSION,
                    "seed": seed,
                    "holdout": holdout,
                    "holdout_seed": holdout_seed,
                }
            },
        )
    except (OSError, FileExistsError):
        if is_cache(path):  # another process wrote it first
            return path
        raise
