"""The uint8 cache: its format, reading and checking it (``load_cache``), writing one (``write_cache``).

A source of images becomes a cache through :func:`tinyswin.data.prepare_source.prepare`.

On-disk layout of a cache folder::

    meta.json               format_version, tinyswin_version, source, source_kind, source_digest,
                            image_size, holdout {fraction, seed}, val_from_train ({fraction, seed}
                            of a val split carved from train, or None), class_ids, class_names, splits,
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
``meta.json`` last, and renamed into place at the end: an interrupted run never leaves a folder that loads as
a cache (its leftover, a damaged cache if read, is removed by the next run onto the same target).

A folder that looks like a cache (a ``.partial-`` name, ``<split>_images.npy`` / ``<split>_labels.npy`` files,
or a meta.json that is not JSON or has a format_version) but does not load is a damaged cache: reading it
raises :class:`DamagedCacheError` naming what is wrong, never treats it as a source of images.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinyswin.data.decode import channel_histogram
from tinyswin.errors import (
    DiskFullError,
    TinyswinError,
    disk_full_cause,
    disk_full_error,
    disk_full_reason,
    one_line,
)
from tinyswin.version import __version__

FORMAT_VERSION = 1
META_NAME = "meta.json"
PARTIAL_TAG = ".partial-"
_META_TYPES = {
    "image_size": int,
    "splits": list,
    "counts": dict,
    "class_ids": list,
    "class_names": list,
    "mean": list,
    "std": list,
}


class DamagedCacheError(TinyswinError, ValueError):
    """A folder that looks like a tinyswin cache but is incomplete or corrupt (the message says what is wrong
    and to delete the folder and prepare it again)."""


class CacheFileMissingError(DamagedCacheError, FileNotFoundError):
    """A damaged cache whose meta.json or one of its arrays is missing."""


class CacheMismatchError(TinyswinError, ValueError):
    """An existing cache made from another source listing or with other options than asked.

    Attributes:
        path: the existing cache folder.
        differences: what differs, one phrase each.
    """

    def __init__(self, message: str, path: Path, differences: list[str]) -> None:
        super().__init__(message)
        self.path = path
        self.differences = differences


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


def _damaged(path: Path, what: str) -> str:
    return f"damaged tinyswin cache {path}: {what}; delete the folder and prepare it again"


def looks_like_cache(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder a cache would leave, complete or not.

    That is a folder named like the temporary folder of ``prepare`` (``.partial-``), or holding
    ``<split>_images.npy`` / ``<split>_labels.npy`` files, or a meta.json that is not JSON or has a
    ``format_version`` (a dataset's own meta.json is not taken for a cache's).
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        return False
    if PARTIAL_TAG in path.name:
        return True
    if any(path.glob("*_images.npy")) or any(path.glob("*_labels.npy")):
        return True
    meta_path = path / META_NAME
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return isinstance(meta, dict) and "format_version" in meta


def _read_meta(path: Path) -> dict[str, Any]:
    """The checked meta.json of the cache at ``path``."""
    meta_path = path / META_NAME
    if not meta_path.is_file():
        if looks_like_cache(path):
            what = "meta.json is missing (left by an interrupted or failed `tinyswin prepare`?)"
            raise CacheFileMissingError(_damaged(path, what))
        raise FileNotFoundError(
            f"not a tinyswin cache: {meta_path} not found (make one with `tinyswin prepare`)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DamagedCacheError(
            _damaged(path, f"meta.json is unreadable or truncated ({one_line(exc)})")
        ) from exc
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise DamagedCacheError(_damaged(path, "meta.json is not a cache's metadata (no format_version)"))
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: cache format version {meta['format_version']!r}, this tinyswin reads "
            f"{FORMAT_VERSION}; prepare the source again into a new folder"
        )
    garbled = [key for key, kind in _META_TYPES.items() if not isinstance(meta.get(key), kind)]
    if not garbled:
        garbled = [
            f"counts of {split!r}"
            for split in meta["splits"]
            if not isinstance(meta["counts"].get(split), int)
        ]
    if garbled:
        raise DamagedCacheError(_damaged(path, f"meta.json lacks or garbles {', '.join(garbled)}"))
    return meta


def _check_array(path: Path, file_name: str, shape: tuple[int, ...], dtype: type) -> None:
    file = path / file_name
    if not file.is_file():
        raise CacheFileMissingError(_damaged(path, f"{file_name} is missing"))
    try:
        array = np.load(file, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise DamagedCacheError(
            _damaged(path, f"{file_name} is truncated or unreadable ({one_line(exc)})")
        ) from exc
    if array.shape != shape:
        raise DamagedCacheError(
            _damaged(path, f"{file_name} has shape {array.shape}, meta.json says {shape}")
        )
    if array.dtype != dtype:
        raise DamagedCacheError(_damaged(path, f"{file_name} holds {array.dtype}, not {np.dtype(dtype)}"))


def load_cache(path: str | os.PathLike[str]) -> Cache:
    """Open a cache folder, checking its meta and the shapes of its arrays.

    Raises:
        FileNotFoundError: no cache at ``path`` (no meta.json, and nothing of a cache either).
        CacheFileMissingError: a damaged cache: meta.json or an array file is missing (a FileNotFoundError).
        DamagedCacheError: a damaged cache: meta.json unreadable or garbled, or an array truncated or not as
            meta.json says (a ValueError).
        ValueError: a cache of another format version.
    """
    path = Path(path).expanduser()
    meta = _read_meta(path)
    size = meta["image_size"]
    for split in meta["splits"]:
        n = meta["counts"][split]
        _check_array(path, f"{split}_images.npy", (n, size, size, 3), np.uint8)
        _check_array(path, f"{split}_labels.npy", (n,), np.int64)
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


def existing_matches(out: Path, expected: dict[str, Any], allow_skipped: bool = True) -> bool:
    """True if ``out`` is a cache matching ``expected``; False if ``out`` is absent or an empty folder.

    A cache that left out bad images matches only if ``allow_skipped``.

    Raises:
        DamagedCacheError: ``out`` is a damaged cache (the message says what is wrong).
        CacheMismatchError: ``out`` is a cache made otherwise (the message names what differs).
        ValueError: ``out`` is a file, or a folder of other files.
    """
    if not out.exists():
        return False
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose another --out")
    if not any(out.iterdir()):
        return False
    if not looks_like_cache(out):
        raise ValueError(
            f"{out} exists and is not a complete tinyswin cache; remove it or choose another --out"
        )
    meta = load_cache(out).meta
    diffs = _differences(meta, expected)
    if meta.get("skipped") and not allow_skipped:
        diffs.append(f"the cache left out {len(meta['skipped'])} bad image(s), asked without --skip-bad")
    if diffs:
        message = f"{out} holds a different cache ({'; '.join(diffs)}); remove it or choose another --out"
        raise CacheMismatchError(message, out, diffs)
    return True


def remove_stale_partials(out: Path) -> None:
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


def disk_full(exc: OSError, out: Path) -> DiskFullError | None:
    """The one-line error for a write that failed for lack of space, quota or file size limit, else None."""
    cause = disk_full_cause(exc)
    if cause is None:
        return None
    return disk_full_error(
        f"no space left for the cache {out} ({disk_full_reason(cause)}); free some space or choose another "
        "--out",
        cause,
    )


def new_partial(out: Path) -> Path:
    """A new temporary folder beside ``out``.

    Raises:
        DiskFullError: no space left to create it.
        ValueError: it cannot be created (a parent is a file, no permission, ...).
    """
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"cannot create the cache folder {out}: {blocking} is a file; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}{PARTIAL_TAG}{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as exc:
        full = disk_full(exc, out)
        if full is not None:
            raise full from exc
        raise ValueError(
            f"cannot create the cache folder {out} ({exc.strerror or one_line(exc)}); choose another --out"
        ) from exc
    return tmp


def check_free_space(tmp: Path, out: Path, n_images: int, size: int) -> None:
    """Fail before decoding when the images cannot fit (a full disk under a memory map is a crash)."""
    need = n_images * size * size * 3
    free = shutil.disk_usage(tmp).free
    if need > free:
        raise DiskFullError(
            f"not enough space for the cache {out}: {n_images:,} images of {size}px need "
            f"{need / 1e9:.2f} GB, {free / 1e9:.2f} GB free; free some space or choose another --out"
        )


def publish(tmp: Path, meta: dict[str, Any], out: Path) -> None:
    """Write meta.json last, then move the folder into place (atomic on one file system)."""
    (tmp / META_NAME).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.rename(tmp, out)
    except OSError as exc:
        same = ("format_version", "source_digest", "image_size", "holdout", "val_from_train")
        if is_cache(out) and not _differences(load_cache(out).meta, {k: meta.get(k) for k in same}):
            shutil.rmtree(tmp, ignore_errors=True)  # another process made the same cache meanwhile
            return
        raise ValueError(f"could not move the new cache into place at {out}: {exc}") from exc


def base_meta(
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
    """The meta.json keys every cache has, with counts, class counts and train mean/std from the arrays."""
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
    """Write arrays as a cache (same format as :func:`tinyswin.data.prepare_source.prepare`), atomically.

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
    if existing_matches(out, expected):
        return out
    remove_stale_partials(out)
    tmp = new_partial(out)
    try:
        labels_by_split = {}
        for name, (images, labels) in splits.items():
            np.save(tmp / f"{name}_images.npy", np.ascontiguousarray(images))
            labels_by_split[name] = np.asarray(labels, dtype=np.int64)
            np.save(tmp / f"{name}_labels.npy", labels_by_split[name])
        meta = base_meta(
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
        publish(tmp, meta, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
