"""The uint8 cache: decode a source once (``prepare``), write arrays (``write_cache``), read (``load_cache``).

On-disk layout of a cache folder::

    meta.json               format_version, tinyswin_version, source, source_kind, source_digest,
                            image_size, holdout {fraction, seed}, class_ids, class_names, splits,
                            counts {split: N}, class_counts {split: [N per class]}, mean, std (over
                            every pixel of train, per channel, 0..1 scale), skipped (files left out by
                            --skip-bad); class_words for Tiny ImageNet (the full words.txt line)
    <split>_images.npy      uint8 (N, H, W, 3), memory-mappable
    <split>_labels.npy      int64 (N,)
    <split>_files.txt       the source file of each row, one relative path a line (``prepare`` only)

Rows follow the sorted relative paths of their split (train: class after class). The source digest is a
sha256 of the sorted listing of the source's files (relative names and sizes), so the official zip and the
folder it unpacks to give the same digest and the same cache.

A cache is written into a hidden temporary folder beside its target (``.NAME.partial-PID-XXXX``), with
``meta.json`` last, and renamed into place at the end: an interrupted run never leaves a folder that looks
like a cache (its leftover is removed by the next run onto the same target). Preparing onto an existing cache
made from the same source listing with the same options returns at once; an existing folder that differs is
an error naming the difference, never overwritten.

The split ``holdout`` (``holdout > 0``) is carved from train: in every class, ``round(fraction * n)`` images
(at least one, and never the whole class), drawn with ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinyswin.data.decode import available_cpus, channel_histogram, decode_splits, drop_rows
from tinyswin.data.imagefolder import DatasetPlan, SourceTree, list_source, plan_imagefolder
from tinyswin.data.tinyimagenet import is_tinyimagenet, plan_tinyimagenet
from tinyswin.version import __version__

FORMAT_VERSION = 1
META_NAME = "meta.json"
PARTIAL_TAG = ".partial-"


# ----------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Cache:
    """A cache folder on disk, opened by :func:`load_cache`.

    Attributes:
        path: the cache folder.
        meta: the parsed ``meta.json``.
    """

    path: Path
    meta: dict[str, Any]

    @property
    def splits(self) -> tuple[str, ...]:
        """The split names, e.g. ("train", "val")."""
        return tuple(self.meta["splits"])

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The images and labels of one split.

        Returns:
            images: uint8 memory map (N, H, W, 3); labels: int64 array (N,).
        """
        if name not in self.splits:
            raise ValueError(f"cache {self.path} has no split '{name}' (it has: {', '.join(self.splits)})")
        images = np.load(self.path / f"{name}_images.npy", mmap_mode="r")
        labels = np.load(self.path / f"{name}_labels.npy")
        return images, labels

    def files(self, name: str) -> list[str] | None:
        """The source file of each row of a split (relative paths), or None for caches made from arrays."""
        listing = self.path / f"{name}_files.txt"
        return listing.read_text(encoding="utf-8").splitlines() if listing.is_file() else None

    @property
    def class_ids(self) -> list[str]:
        """Class ids in label order (sorted folder names / wnids)."""
        return list(self.meta["class_ids"])

    @property
    def class_names(self) -> list[str]:
        """Human-readable class names in label order."""
        return list(self.meta["class_names"])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.meta["class_ids"])

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel mean of the train split, 0..1 scale."""
        return tuple(self.meta["mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        """Per-channel standard deviation of the train split, 0..1 scale."""
        return tuple(self.meta["std"])

    @property
    def image_size(self) -> int:
        """Side of the (square) images in pixels."""
        return int(self.meta["image_size"])


def load_cache(path: str | os.PathLike[str]) -> Cache:
    """Open a cache folder, checking its meta and the shapes of its arrays.

    Raises:
        FileNotFoundError: no cache at ``path`` (no meta.json) or an array file is missing.
        ValueError: unreadable meta.json, another format version, or arrays that disagree with the meta.
    """
    path = Path(path).expanduser()
    meta_path = path / META_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"not a tinyswin cache: {meta_path} not found (make one with `tinyswin prepare`)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable cache metadata {meta_path}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"{meta_path}: cache format version {found}, this tinyswin reads {FORMAT_VERSION}")
    size = int(meta["image_size"])
    for split in meta["splits"]:
        n = int(meta["counts"][split])
        for suffix, shape in (("images", (n, size, size, 3)), ("labels", (n,))):
            file = path / f"{split}_{suffix}.npy"
            if not file.is_file():
                raise FileNotFoundError(f"cache array missing: {file}")
            found_shape = np.load(file, mmap_mode="r").shape
            if found_shape != shape:
                raise ValueError(f"{file}: shape {found_shape}, meta.json says {shape}")
    return Cache(path=path, meta=meta)


def is_cache(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a complete, readable cache."""
    try:
        load_cache(path)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


# ----------------------------------------------------------------------------------------------- helpers


def stats_from_histogram(hist: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) standard deviation, 0..1 scale, from a (3, 256) histogram."""
    values = np.arange(256, dtype=np.float64) / 255.0
    counts = hist.astype(np.float64)
    n = counts.sum(axis=1)
    if not np.all(n > 0):
        raise ValueError("cannot compute mean and std of an empty train split")
    mean = (counts * values).sum(axis=1) / n
    var = (counts * (values[None, :] - mean[:, None]) ** 2).sum(axis=1) / n
    return [float(m) for m in mean], [float(s) for s in np.sqrt(var)]


def _class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return [int(c) for c in np.bincount(labels, minlength=num_classes)]


def _differences(meta: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    return [
        f"{key}: cache has {meta.get(key)!r}, asked for {value!r}"
        for key, value in expected.items()
        if meta.get(key) != value
    ]


def _existing_matches(out: Path, expected: dict[str, Any], allow_skipped: bool = True) -> bool:
    """True if ``out`` is a cache matching ``expected``; False if ``out`` is absent or an empty folder.

    A cache that left out bad images matches only if ``allow_skipped``.

    Raises:
        ValueError: ``out`` exists and is not a matching cache (the message names what differs).
    """
    if not out.exists():
        return False
    if out.is_dir() and not any(out.iterdir()):
        return False
    if not is_cache(out):
        raise ValueError(
            f"{out} exists and is not a complete tinyswin cache; remove it or choose another --out"
        )
    meta = json.loads((out / META_NAME).read_text(encoding="utf-8"))
    diffs = _differences(meta, expected)
    if meta.get("skipped") and not allow_skipped:
        diffs.append(f"the cache left out {len(meta['skipped'])} bad image(s), asked without --skip-bad")
    if diffs:
        raise ValueError(
            f"{out} holds a different cache ({'; '.join(diffs)}); remove it or choose another --out"
        )
    return True


def _remove_stale_partials(out: Path) -> None:
    """Remove temporary folders of earlier runs onto ``out`` whose process is gone."""
    if not out.parent.is_dir():
        return
    for partial in out.parent.glob(f".{out.name}{PARTIAL_TAG}*"):
        pid_text = partial.name[len(f".{out.name}{PARTIAL_TAG}") :].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            continue


def _new_partial(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{PARTIAL_TAG}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, meta: dict[str, Any], out: Path) -> None:
    """Write meta.json last, then move the folder into place (atomic on one file system)."""
    (tmp / META_NAME).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.rename(tmp, out)
    except OSError as exc:
        same = ("format_version", "source_digest", "image_size", "holdout")
        if is_cache(out) and not _differences(load_cache(out).meta, {k: meta[k] for k in same}):
            shutil.rmtree(tmp, ignore_errors=True)  # another process made the same cache meanwhile
            return
        raise ValueError(f"could not move the new cache into place at {out}: {exc}") from exc


def _base_meta(
    *,
    source: str,
    source_kind: str,
    source_digest: str,
    image_size: int,
    holdout: dict[str, Any],
    class_ids: list[str],
    class_names: list[str],
    labels: dict[str, np.ndarray],
    train_hist: np.ndarray,
) -> dict[str, Any]:
    mean, std = stats_from_histogram(train_hist)
    return {
        "format_version": FORMAT_VERSION,
        "tinyswin_version": __version__,
        "source": source,
        "source_kind": source_kind,
        "source_digest": source_digest,
        "image_size": image_size,
        "holdout": holdout,
        "class_ids": list(class_ids),
        "class_names": list(class_names),
        "splits": list(labels),
        "counts": {split: len(lab) for split, lab in labels.items()},
        "class_counts": {split: _class_counts(lab, len(class_ids)) for split, lab in labels.items()},
        "mean": mean,
        "std": std,
    }


# ----------------------------------------------------------------------------------------------- write_cache


def _arrays_digest(splits: dict[str, tuple[np.ndarray, np.ndarray]], class_ids: list[str]) -> str:
    h = hashlib.sha256(json.dumps(list(class_ids)).encode())
    for name, (images, labels) in splits.items():
        h.update(f"{name}{images.shape}".encode())
        for start in range(0, len(images), 4096):
            h.update(np.ascontiguousarray(images[start : start + 4096]).data)
        h.update(np.ascontiguousarray(labels).data)
    return "sha256:" + h.hexdigest()


def write_cache(
    out: str | os.PathLike[str],
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    class_ids: list[str],
    class_names: list[str],
    source: str,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write arrays as a cache (same format as :func:`prepare`), atomically.

    The source digest is a sha256 of the class ids and the arrays: writing the same arrays onto an existing
    cache returns at once; different ones are an error (the existing cache is never overwritten).

    Args:
        out: the cache folder to create.
        splits: split name -> (images uint8 (N, S, S, 3), labels int64 (N,)); must include 'train', whose
            per-channel mean and std are stored.
        class_ids: one id per class (label i is class_ids[i]).
        class_names: one readable name per class.
        source: a description of where the arrays come from (stored as meta 'source').
        extra_meta: more keys for meta.json (must not replace the standard ones).

    Returns:
        The cache folder.

    Raises:
        ValueError: bad shapes, dtypes or labels, no 'train' split, a clash of extra_meta keys, or an existing
            different cache at ``out``.
    """
    out = Path(out).expanduser()
    if "train" not in splits:
        raise ValueError(f"write_cache needs a 'train' split (got: {', '.join(splits) or 'none'})")
    if len(class_ids) != len(class_names) or not class_ids:
        raise ValueError(
            f"class_ids ({len(class_ids)}) and class_names ({len(class_names)}) must match, non-empty"
        )
    size = None
    for name, (images, labels) in splits.items():
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"split '{name}': images must be a uint8 array (N, S, S, 3)")
        if images.shape[3] != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(f"split '{name}': images shape {images.shape} is not (N, S, S, 3)")
        if size is not None and images.shape[1] != size:
            raise ValueError(f"split '{name}': image size {images.shape[1]} differs from {size}")
        size = images.shape[1]
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
            raise ValueError(f"split '{name}': labels must be integers of shape ({len(images)},)")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_ids)):
            raise ValueError(f"split '{name}': labels outside 0..{len(class_ids) - 1}")
    if len(splits["train"][0]) == 0:
        raise ValueError("write_cache: the 'train' split is empty")
    digest = _arrays_digest(splits, class_ids)
    expected = {"format_version": FORMAT_VERSION, "source_digest": digest, "image_size": size}
    if _existing_matches(out, expected):
        return out
    _remove_stale_partials(out)
    tmp = _new_partial(out)
    try:
        labels_by_split = {}
        for name, (images, labels) in splits.items():
            np.save(tmp / f"{name}_images.npy", np.ascontiguousarray(images))
            labels_by_split[name] = np.asarray(labels, dtype=np.int64)
            np.save(tmp / f"{name}_labels.npy", labels_by_split[name])
        meta = _base_meta(
            source=source,
            source_kind="arrays",
            source_digest=digest,
            image_size=int(size),
            holdout={"fraction": 0.0, "seed": None},
            class_ids=list(class_ids),
            class_names=list(class_names),
            labels=labels_by_split,
            train_hist=channel_histogram(splits["train"][0]),
        )
        clash = sorted(set(extra_meta or {}) & set(meta))
        if clash:
            raise ValueError(f"extra_meta may not replace standard cache keys: {', '.join(clash)}")
        meta.update(extra_meta or {})
        meta["skipped"] = []
        _publish(tmp, meta, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------------------------- prepare


def _holdout_split(
    files: list[str], labels: np.ndarray, fraction: float, seed: int, num_classes: int
) -> dict[str, tuple[list[str], np.ndarray]]:
    """Stratified holdout: in each class, round(fraction * n) images (>= 1, < n), seeded; order is kept."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for cls in range(num_classes):
        rows = np.flatnonzero(labels == cls)
        k = min(max(1, round(fraction * len(rows))), len(rows) - 1)
        if k > 0:
            held[rng.permutation(rows)[:k]] = True
    keep = np.flatnonzero(~held)
    take = np.flatnonzero(held)
    return {
        "train": ([files[i] for i in keep], labels[keep]),
        "holdout": ([files[i] for i in take], labels[take]),
    }


def _check_options(size: int, holdout: float, workers: int | None) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size!r}")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers!r}")


def _bad_files_message(source: Path, bad: list[tuple[str, int, str]]) -> str:
    listing = "; ".join(text for _, _, text in sorted(bad))
    return (
        f"{len(bad)} unreadable or corrupt image(s) in {source} (pass --skip-bad / skip_bad=True to leave "
        f"them out): {listing}"
    )


def _plan_source(tree: SourceTree) -> DatasetPlan:
    return plan_tinyimagenet(tree) if is_tinyimagenet(tree) else plan_imagefolder(tree)


def _write_labels(
    tmp: Path, splits: dict[str, tuple[list[str], np.ndarray]], bad: list[tuple[str, int, str]], source: Path
) -> dict[str, np.ndarray]:
    """Write each split's labels and file list into `tmp`, leaving out the `bad` rows (also dropped from
    its decoded images); returns the labels kept per split.

    Raises:
        ValueError: a split has no readable image.
    """
    labels_by_split: dict[str, np.ndarray] = {}
    for split, (files, labels) in splits.items():
        bad_rows = sorted(row for s, row, _ in bad if s == split)
        if bad_rows:
            drop_rows(tmp, split, bad_rows)
            keep = np.ones(len(files), dtype=bool)
            keep[bad_rows] = False
            files = [f for f, k in zip(files, keep, strict=True) if k]
            labels = labels[keep]
        if len(files) == 0:
            raise ValueError(f"split '{split}' of {source} has no readable images")
        labels_by_split[split] = labels
        np.save(tmp / f"{split}_labels.npy", labels.astype(np.int64))
        (tmp / f"{split}_files.txt").write_text("".join(f + "\n" for f in files), encoding="utf-8")
    return labels_by_split


def prepare(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    size: int = 64,
    holdout: float = 0.0,
    skip_bad: bool = False,
    workers: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Decode a dataset once into a uint8 cache at ``out``.

    ``source`` is a Tiny ImageNet zip or folder (see :mod:`tinyswin.data.tinyimagenet`) or an image-folder
    root, as a folder or a zip (see :mod:`tinyswin.data.imagefolder`). The layout is checked and every error
    found before anything is written; images are decoded by a pool of processes, each with its own zip
    handle, straight into the memory-mapped arrays of a temporary folder renamed into place at the end.

    Args:
        source: the zip file or folder.
        out: the cache folder to create.
        size: image side in pixels; images already size x size are kept pixel for pixel, others are resized
            (short side, antialiased bicubic) and centre-cropped.
        holdout: fraction of every train class kept aside as split 'holdout' (0: none).
        skip_bad: leave unreadable images out (and report how many) instead of failing.
        workers: decoding processes (default: the CPUs available).
        seed: seed of the holdout draw.
        progress: show a progress bar and print the counts.

    Returns:
        The cache folder.

    Raises:
        FileNotFoundError: missing source or index file (``wnids.txt``, ``val/val_annotations.txt``).
        ValueError: a bad layout, bad images (all listed), or an existing different cache at ``out``.
    """
    _check_options(size, holdout, workers)
    out = Path(out).expanduser()
    tree = list_source(source)
    source_root = tree.path.resolve()
    if not tree.is_zip and (out.resolve() == source_root or source_root in out.resolve().parents):
        raise ValueError(f"--out {out} must not be inside the source folder {tree.path}")
    holdout_meta = {"fraction": float(holdout), "seed": int(seed) if holdout > 0 else None}
    expected = {
        "format_version": FORMAT_VERSION,
        "source_digest": tree.digest(),
        "image_size": size,
        "holdout": holdout_meta,
    }
    if _existing_matches(out, expected, allow_skipped=skip_bad):
        if progress:
            print(f"{out}: cache already made from this source with these options")
        return out
    plan = _plan_source(tree)
    splits = dict(plan.splits)
    if holdout > 0:
        train_files, train_labels = splits.pop("train")
        splits = {**_holdout_split(train_files, train_labels, holdout, seed, len(plan.class_ids)), **splits}
    source_kind = f"{plan.kind}-{'zip' if tree.is_zip else 'folder'}"
    _remove_stale_partials(out)
    n_workers = workers or available_cpus()
    tmp = _new_partial(out)
    try:
        bad, hist = decode_splits(tree, splits, tmp, size, n_workers, progress)
        if bad and not skip_bad:
            raise ValueError(_bad_files_message(tree.path, bad))
        labels_by_split = _write_labels(tmp, splits, bad, tree.path)
        meta = _base_meta(
            source=str(source_root),
            source_kind=source_kind,
            source_digest=expected["source_digest"],
            image_size=size,
            holdout=holdout_meta,
            class_ids=plan.class_ids,
            class_names=plan.class_names,
            labels=labels_by_split,
            train_hist=hist,
        )
        if plan.class_words is not None:
            meta["class_words"] = plan.class_words
        meta["skipped"] = sorted(text for _, _, text in bad)
        _publish(tmp, meta, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if bad:
        print(
            f"tinyswin prepare: skipped {len(bad)} unreadable image(s) (listed in {out / META_NAME})",
            file=sys.stderr,
        )
    if progress:
        _print_summary(out, meta)
    return out


def _print_summary(out: Path, meta: dict[str, Any]) -> None:
    counts = ", ".join(f"{split} {n:,}" for split, n in meta["counts"].items())
    print(f"{out}: {len(meta['class_ids'])} classes, {meta['image_size']}px; images: {counts}")
