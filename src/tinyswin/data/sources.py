"""Which cache a run reads: the built-in dataset, an existing cache, or a source prepared into one once.

A source may be a dataset name tinyswin downloads ("tiny-imagenet", "cifar10", "cifar100"; see
:mod:`tinyswin.data.download`): it stands for the archive in the default download folder, fetched only when
asked (``download=True``, ``train --download``), never by surprise. A file or folder of that name wins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from tinyswin.data.cache import CacheMismatchError, is_cache, load_cache, looks_like_cache
from tinyswin.data.download import resolve_known
from tinyswin.data.prepare_source import prepare
from tinyswin.data.synthetic import ensure_synthetic
from tinyswin.paths import cache_root


def source_cache_path(source: str | Path, size: int, holdout: float, holdout_seed: int) -> Path:
    """Where a source is prepared: `cache_root()/<name>-<hash of its path>-<size>px[-holdout<f>-seed<s>]`."""
    resolved = Path(source).expanduser().resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    stem = resolved.name
    for suffix in (".zip", ".tar.gz", ".tgz", ".tar"):
        stem = stem.removesuffix(suffix)
    suffix = f"-holdout{holdout:g}-seed{holdout_seed}" if holdout > 0 else ""
    return cache_root() / f"{stem}-{digest}-{size}px{suffix}"


def resolve_data(
    source: str | None,
    *,
    size: int = 64,
    holdout: float = 0.0,
    holdout_seed: int = 0,
    log: Callable[[str], None] = print,
    progress: bool = True,
    download: bool = False,
) -> Path:
    """The cache to read: the built-in dataset (`source` None), an existing cache, or a source prepared once
    into `source_cache_path(...)` and reused afterwards.

    Args:
        source: a cache folder, a dataset (zip, folder or CIFAR tarball), a dataset name tinyswin downloads
            (its archive in the default download folder), or None.
        size: image side when a source is prepared.
        holdout: fraction of every train class kept aside as split 'holdout' (when preparing; the built-in
            set carves it too).
        holdout_seed: seed of that draw.
        log: where the notes about preparing go (and the one about a val split carved from train).
        progress: show the progress bar of preparing (and of downloading).
        download: download a named dataset that is not downloaded yet (otherwise that is an error).

    Raises:
        FileNotFoundError: `source` does not exist.
        DownloadError: `source` names a dataset not downloaded yet (without `download`: the message says how
            to get it), or its download failed.
        DamagedCacheError: `source` is a damaged cache (the message says what is wrong and what to do).
        CacheMismatchError: the cache prepared earlier from `source` no longer matches it (its files changed).
        ValueError: the source cannot be prepared (its layout, bad images; the message says which).
    """
    if source is None:
        return ensure_synthetic(holdout=holdout, holdout_seed=holdout_seed)
    archive = resolve_known(source, download=download, progress=progress, log=log)
    path = archive if archive is not None else Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source not found: {source}")
    if looks_like_cache(path):
        return load_cache(path).path
    out = source_cache_path(path, size, holdout, holdout_seed)
    options = {"size": size, "holdout": holdout, "seed": holdout_seed}
    try:
        if is_cache(out):  # prepare checks that it still matches the source, and returns at once
            return prepare(path, out, **options, progress=False)
        log(f"preparing {path} into the cache {out} (once; reused next time)")
        return prepare(path, out, **options, progress=progress, log=log)
    except CacheMismatchError as exc:
        raise CacheMismatchError(
            f"the cache {out} prepared earlier from {source} no longer matches it "
            f"({'; '.join(exc.differences)}); delete {out} to prepare it again",
            exc.path,
            exc.differences,
        ) from exc


def eval_splits(cache_splits: tuple[str, ...], selection: str) -> list[str]:
    """The splits evaluated every epoch: 'val' and 'holdout' where the cache has them, selection first."""
    if selection not in cache_splits:
        hint = " (prepare the source with data.holdout=0.1)" if selection == "holdout" else ""
        raise ValueError(
            f"data.val_split={selection!r}: the cache has no split {selection!r} "
            f"(it has {', '.join(cache_splits)}){hint}"
        )
    others = [s for s in ("val", "holdout") if s in cache_splits and s != selection]
    return [selection, *others]
