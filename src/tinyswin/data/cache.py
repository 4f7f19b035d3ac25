"""The uint8 cache: decode a source once (``prepare``), write arrays (``write_cache``), read (``load_cache``).

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
a cache (its leftover, a damaged cache if read, is removed by the next run onto the same target). Preparing
onto an existing cache made from the same source listing with the same options returns at once; an existing
folder that differs is an error naming the difference, never overwritten.

A source with no val split (``root/<class>/*``, or ``root/train/<class>`` alone) gets one carved from train:
``VAL_FRACTION`` of every class, drawn with ``VAL_SEED`` (recorded as meta ``val_from_train``; None where the
source has its own val). The split ``holdout`` (``holdout > 0``) is then carved from what is left of train.
Both take, in every class, ``round(fraction * n)`` images (at least one, and never the whole class: a class of
one image stays in train), drawn with ``numpy.random.default_rng(seed)``.

A folder that looks like a cache (a ``.partial-`` name, ``<split>_images.npy`` / ``<split>_labels.npy`` files,
or a meta.json that is not JSON or has a format_version) but does not load is a damaged cache: reading it
raises :class:`DamagedCacheError` naming what is wrong, never treats it as a source of images.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinyswin.data.decode import available_cpus, channel_histogram, decode_splits, drop_rows
from tinyswin.data.imagefolder import DatasetPlan, SourceTree, list_source, plan_imagefolder
from tinyswin.data.tinyimagenet import is_tinyimagenet, plan_tinyimagenet
from tinyswin.errors import DiskFullError, TinyswinError
from tinyswin.version import __version__

FORMAT_VERSION = 1
META_NAME = "meta.json"
PARTIAL_TAG = ".partial-"
VAL_FRACTION = 0.1
VAL_SEED = 0
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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


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
            _damaged(path, f"meta.json is unreadable or truncated ({_one_line(exc)})")
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
            _damaged(path, f"{file_name} is truncated or unreadable ({_one_line(exc)})")
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


def _existing_matches(out: Path, expected: dict[str, Any], allow_skipped: bool = True) -> bool:
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


def _disk_full(exc: OSError, out: Path) -> DiskFullError | None:
    """The one-line error for a write that failed for lack of space or quota, else None."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return DiskFullError(
        f"no space left for the cache {out} ({exc.strerror}); free some space or choose another --out"
    )


def _new_partial(out: Path) -> Path:
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
        full = _disk_full(exc, out)
        if full is not None:
            raise full from exc
        raise ValueError(
            f"cannot create the cache folder {out} ({exc.strerror or _one_line(exc)}); choose another --out"
        ) from exc
    return tmp


def _check_free_space(tmp: Path, out: Path, n_images: int, size: int) -> None:
    """Fail before decoding when the images cannot fit (a full disk under a memory map is a crash)."""
    need = n_images * size * size * 3
    free = shutil.disk_usage(tmp).free
    if need > free:
        raise DiskFullError(
            f"not enough space for the cache {out}: {n_images:,} images of {size}px need "
            f"{need / 1e9:.2f} GB, {free / 1e9:.2f} GB free; free some space or choose another --out"
        )


def _publish(tmp: Path, meta: dict[str, Any], out: Path) -> None:
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


def _stratified_split(
    files: list[str], labels: np.ndarray, fraction: float, seed: int, num_classes: int, name: str
) -> dict[str, tuple[list[str], np.ndarray]]:
    """Carve split ``name`` from train: in each class, round(fraction * n) images (>= 1, < n), seeded.

    A class of one image stays whole in train. Rows keep their order.

    Returns:
        {"train": (files, labels), name: (files, labels)}; ``name`` is left out when no class could give any.
    """
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for cls in range(num_classes):
        rows = np.flatnonzero(labels == cls)
        k = min(max(1, round(fraction * len(rows))), len(rows) - 1)
        if k > 0:
            held[rng.permutation(rows)[:k]] = True
    keep = np.flatnonzero(~held)
    take = np.flatnonzero(held)
    carved = {"train": ([files[i] for i in keep], labels[keep])}
    if len(take):
        carved[name] = ([files[i] for i in take], labels[take])
    return carved


def _plan_splits(
    plan: DatasetPlan, holdout: float, seed: int, source: Path
) -> tuple[dict[str, tuple[list[str], np.ndarray]], dict[str, Any] | None, str | None]:
    """The splits to decode: the source's, plus 'val' carved from train where the source has none, plus
    'holdout' carved from what is left of train.

    Returns:
        the splits (train, holdout, val, then the others), the meta ``val_from_train`` (None where the
        source has its own val), and a note for the user about the carved val (None where there is none).

    Raises:
        ValueError: a holdout is asked for and no class has an image to spare.
    """
    splits = dict(plan.splits)
    num_classes = len(plan.class_ids)
    val_from_train = None
    text = None
    if "val" not in splits:
        carved = _stratified_split(*splits.pop("train"), VAL_FRACTION, VAL_SEED, num_classes, "val")
        splits = {**carved, **splits}
        if "val" in carved:
            val_from_train = {"fraction": VAL_FRACTION, "seed": VAL_SEED}
            text = f"{source} has no val split: holding out {VAL_FRACTION:.0%} of each class as 'val'"
        else:
            text = f"{source} has no val split, and no class has two images to hold one out as 'val'"
    if holdout > 0:
        carved = _stratified_split(*splits.pop("train"), holdout, seed, num_classes, "holdout")
        if "holdout" not in carved:
            raise ValueError(
                f"holdout={holdout:g}: no class of {source} has a train image to spare; prepare it without "
                "a holdout"
            )
        splits = {**carved, **splits}
    return splits, val_from_train, text


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


def _refuse_cache_as_source(source: str | os.PathLike[str]) -> None:
    """A cache given where a dataset is expected: say so in one line (and what is wrong if it is damaged)."""
    if looks_like_cache(source):
        load_cache(source)
        raise ValueError(
            f"{source} is a tinyswin cache already, not a dataset to prepare: train on it directly (--data)"
        )


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
    log: Callable[[str], None] | None = None,
) -> Path:
    """Decode a dataset once into a uint8 cache at ``out``.

    ``source`` is a Tiny ImageNet zip or folder (see :mod:`tinyswin.data.tinyimagenet`) or an image-folder
    root, as a folder or a zip (see :mod:`tinyswin.data.imagefolder`). The layout is checked and every error
    found before anything is written; images are decoded by a pool of processes, each with its own zip
    handle, straight into the memory-mapped arrays of a temporary folder renamed into place at the end. A
    source with no val split gets one carved from train (``VAL_FRACTION`` of each class; a note says so).

    Args:
        source: the zip file or folder.
        out: the cache folder to create.
        size: image side in pixels; images already size x size are kept pixel for pixel, others are resized
            (short side, antialiased bicubic) and centre-cropped.
        holdout: fraction of every train class kept aside as split 'holdout' (0: none).
        skip_bad: leave unreadable images out (and report how many) instead of failing.
        workers: decoding processes (default: the CPUs available).
        seed: seed of the holdout draw.
        progress: show a progress bar (on a terminal only) and the counts; off, nothing is printed but the
            warning about images left out by ``skip_bad`` (and the notes, where ``log`` is given).
        log: where the notes (a val split carved from train) and, with ``progress``, the counts go
            (default: print, and notes only with ``progress``).

    Returns:
        The cache folder.

    Raises:
        FileNotFoundError: missing source or index file (``wnids.txt``, ``val/val_annotations.txt``).
        DamagedCacheError: ``out`` is a damaged cache.
        CacheMismatchError: ``out`` is a cache made from another source or with other options.
        DiskFullError: not enough space for the cache.
        ValueError: a bad layout, bad images (all listed), or an ``out`` that is a file or another folder.
    """
    _check_options(size, holdout, workers)
    say = log if log is not None else print
    out = Path(out).expanduser()
    _refuse_cache_as_source(source)
    tree = list_source(source)
    source_root = tree.path.resolve()
    if not tree.is_zip and (out.resolve() == source_root or source_root in out.resolve().parents):
        raise ValueError(f"--out {out} must not be inside the source folder {tree.path}")
    plan = _plan_source(tree)
    splits, val_from_train, text = _plan_splits(plan, holdout, seed, tree.path)
    holdout_meta = {"fraction": float(holdout), "seed": int(seed) if holdout > 0 else None}
    expected = {
        "format_version": FORMAT_VERSION,
        "source_digest": tree.digest(),
        "image_size": size,
        "holdout": holdout_meta,
        "val_from_train": val_from_train,
    }
    if _existing_matches(out, expected, allow_skipped=skip_bad):
        if progress:
            say(f"{out}: cache already made from this source with these options")
        return out
    if text is not None and (progress or log is not None):
        say(text)
    source_kind = f"{plan.kind}-{'zip' if tree.is_zip else 'folder'}"
    _remove_stale_partials(out)
    n_workers = workers or available_cpus()
    tmp = _new_partial(out)
    try:
        _check_free_space(tmp, out, sum(len(files) for files, _ in splits.values()), size)
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
        meta["val_from_train"] = val_from_train
        if plan.class_words is not None:
            meta["class_words"] = plan.class_words
        meta["skipped"] = sorted(text for _, _, text in bad)
        _publish(tmp, meta, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _disk_full(exc, out)
        if full is not None:
            raise full from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if bad:
        print(
            f"tinyswin prepare: skipped {len(bad)} unreadable image(s) (listed in {out / META_NAME})",
            file=sys.stderr,
        )
    if progress:
        say(_summary(out, meta))
    return out


def _summary(out: Path, meta: dict[str, Any]) -> str:
    counts = ", ".join(f"{split} {n:,}" for split, n in meta["counts"].items())
    return f"{out}: {len(meta['class_ids'])} classes, {meta['image_size']}px; images: {counts}"
