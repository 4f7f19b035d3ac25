"""How a source of images becomes a cache: list and check it, plan its splits, decode, publish (``prepare``).

``prepare`` checks the layout and finds every error before anything is written, then decodes the images with
a pool of processes straight into the arrays of a temporary cache folder (see :mod:`tinyswin.data.cache` for
the format and the atomic writing). Preparing onto an existing cache made from the same source listing with
the same options returns at once; an existing folder that differs is an error naming the difference, never
overwritten.

A source with no val split (``root/<class>/*``, or ``root/train/<class>`` alone) gets one carved from train:
``VAL_FRACTION`` of every class, drawn with ``VAL_SEED`` (recorded as meta ``val_from_train``; None where the
source has its own val). The split ``holdout`` (``holdout > 0``) is then carved from what is left of train.
Both take, in every class, ``round(fraction * n)`` images (at least one, and never the whole class: a class of
one image stays in train), drawn with ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinyswin.data.cache import (
    FORMAT_VERSION,
    META_NAME,
    base_meta,
    check_free_space,
    disk_full,
    existing_matches,
    load_cache,
    looks_like_cache,
    new_partial,
    publish,
    remove_stale_partials,
)
from tinyswin.data.cifar import (
    CifarArchive,
    cifar_layout,
    file_digest,
    is_tar,
    read_cifar,
    write_cifar_splits,
)
from tinyswin.data.decode import available_cpus, decode_splits, drop_rows
from tinyswin.data.imagefolder import DatasetPlan, list_source, plan_imagefolder
from tinyswin.data.tinyimagenet import is_tinyimagenet, plan_tinyimagenet

VAL_FRACTION = 0.1
VAL_SEED = 0

# decode(splits, folder, size, workers, progress) -> (bad files, train histogram)
Decoder = Callable[[dict[str, tuple[list[str], np.ndarray]], Path, int, int, bool], tuple[list, np.ndarray]]


@dataclass(frozen=True)
class PlannedSource:
    """A source, listed, with the way to plan it and to decode its files.

    Attributes:
        path: the source as given (folder, zip or tarball).
        kind: the meta ``source_kind``, e.g. "tinyimagenet-zip", "imagefolder-folder", "cifar10-tar".
        digest: sha256 of its listing (relative names and sizes), or of a tarball's bytes.
        load_plan: its classes and splits (a tarball is read on the first call, once).
        decode: writes the planned splits' images into a partial cache folder.
        own_val: True where the source is known to have its own val split before it is planned (a CIFAR
            tarball: an existing cache is then checked without reading it); None: see the plan.
    """

    path: Path
    kind: str
    digest: str
    load_plan: Callable[[], DatasetPlan]
    decode: Decoder
    own_val: bool | None = None


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


def plan_source(source: str | os.PathLike[str]) -> PlannedSource:
    """List and plan a source: an official CIFAR tarball, a Tiny ImageNet zip or folder, or an image folder.

    Raises:
        FileNotFoundError, ValueError: see :func:`prepare`.
    """
    layout = cifar_layout(source)
    if layout is not None:
        path = Path(source).expanduser()
        archive = functools.lru_cache(maxsize=1)(functools.partial(read_cifar, path))
        plan = functools.partial(_cifar_plan, archive)
        decode = functools.partial(_decode_cifar, archive)
        return PlannedSource(path, f"{layout.kind}-tar", file_digest(path), plan, decode, own_val=True)
    if is_tar(source):
        raise ValueError(
            f"{source} is a tar archive but not an official CIFAR-10 or CIFAR-100 python-version tarball "
            "(cifar-10-batches-py/ or cifar-100-python/ at its top); tinyswin reads other datasets from a "
            "folder or a zip"
        )
    tree = list_source(source)
    plan = plan_tinyimagenet(tree) if is_tinyimagenet(tree) else plan_imagefolder(tree)
    kind = f"{plan.kind}-{'zip' if tree.is_zip else 'folder'}"
    return PlannedSource(tree.path, kind, tree.digest(), lambda: plan, functools.partial(decode_splits, tree))


def _cifar_plan(archive: Callable[[], CifarArchive]) -> DatasetPlan:
    return archive().plan


def _decode_cifar(
    archive: Callable[[], CifarArchive],
    splits: dict[str, tuple[list[str], np.ndarray]],
    folder: Path,
    size: int,
    workers: int,
    progress: bool,
) -> tuple[list, np.ndarray]:
    """Write a CIFAR archive's planned rows (threads of this process: its pixels are in memory already)."""
    return write_cifar_splits(archive(), splits, folder, size, workers, progress)


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


def _decode_into_cache(
    source: PlannedSource,
    splits: dict[str, tuple[list[str], np.ndarray]],
    out: Path,
    expected: dict[str, Any],
    *,
    source_root: Path,
    skip_bad: bool,
    workers: int | None,
    progress: bool,
) -> tuple[dict[str, Any], list[tuple[str, int, str]]]:
    """Decode ``splits`` of ``source`` into a new temporary folder and publish it as the cache ``out``.

    ``expected`` holds the meta keys checked against an existing cache (source digest, image size, holdout,
    val_from_train). The temporary folder is removed on any error.

    Returns:
        The meta written, and the bad files left out (split, row, message), empty unless ``skip_bad``.

    Raises:
        DiskFullError: not enough space for the cache.
        ValueError: bad images (all listed) without ``skip_bad``, or a split with no readable image.
    """
    size = expected["image_size"]
    plan = source.load_plan()
    remove_stale_partials(out)
    n_workers = workers or available_cpus()
    tmp = new_partial(out)
    try:
        check_free_space(tmp, out, sum(len(files) for files, _ in splits.values()), size)
        bad, hist = source.decode(splits, tmp, size, n_workers, progress)
        if bad and not skip_bad:
            raise ValueError(_bad_files_message(source.path, bad))
        labels_by_split = _write_labels(tmp, splits, bad, source.path)
        meta = base_meta(
            source=str(source_root),
            source_kind=source.kind,
            source_digest=expected["source_digest"],
            image_size=size,
            holdout=expected["holdout"],
            class_ids=plan.class_ids,
            class_names=plan.class_names,
            labels=labels_by_split,
            train_hist=hist,
        )
        meta["val_from_train"] = expected["val_from_train"]
        if plan.class_words is not None:
            meta["class_words"] = plan.class_words
        meta["skipped"] = sorted(text for _, _, text in bad)
        publish(tmp, meta, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full(exc, out)
        if full is not None:
            raise full from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta, bad


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

    ``source`` is a Tiny ImageNet zip or folder (see :mod:`tinyswin.data.tinyimagenet`), an image-folder
    root, as a folder or a zip (see :mod:`tinyswin.data.imagefolder`), or an official CIFAR-10 / CIFAR-100
    python-version tarball (see :mod:`tinyswin.data.cifar`). The layout is checked and every error found
    before anything is written; images are decoded by a pool of processes, each with its own zip handle,
    straight into the memory-mapped arrays of a temporary folder renamed into place at the end (a tarball's
    pixels are read once, in place, and written by threads of this process). A source with no val split gets
    one carved from train (``VAL_FRACTION`` of each class; a note says so).

    Args:
        source: the zip file, folder or CIFAR tarball.
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
    planned = plan_source(source)
    source_root = planned.path.resolve()
    if planned.path.is_dir() and (out.resolve() == source_root or source_root in out.resolve().parents):
        raise ValueError(f"--out {out} must not be inside the source folder {planned.path}")
    splits = text = val_from_train = None
    if not planned.own_val:  # a source with its own val split is planned after the check of `out`
        splits, val_from_train, text = _plan_splits(planned.load_plan(), holdout, seed, planned.path)
    holdout_meta = {"fraction": float(holdout), "seed": int(seed) if holdout > 0 else None}
    expected = {
        "format_version": FORMAT_VERSION,
        "source_digest": planned.digest,
        "image_size": size,
        "holdout": holdout_meta,
        "val_from_train": val_from_train,
    }
    if existing_matches(out, expected, allow_skipped=skip_bad):
        if progress:
            say(f"{out}: cache already made from this source with these options")
        return out
    if splits is None:
        splits, val_from_train, text = _plan_splits(planned.load_plan(), holdout, seed, planned.path)
    if text is not None and (progress or log is not None):
        say(text)
    meta, bad = _decode_into_cache(
        planned,
        splits,
        out,
        expected,
        source_root=source_root,
        skip_bad=skip_bad,
        workers=workers,
        progress=progress,
    )
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
