"""Which cache a run reads: the built-in dataset, an existing cache, or a source prepared into one once."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from tinyswin.data.cache import is_cache, prepare
from tinyswin.data.synthetic import ensure_synthetic
from tinyswin.paths import cache_root


def source_cache_path(source: str | Path, size: int, holdout: float, holdout_seed: int) -> Path:
    """Where a source is prepared: `cache_root()/<name>-<hash of its path>-<size>px[-holdout<f>-seed<s>]`."""
    resolved = Path(source).expanduser().resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    stem = resolved.name.removesuffix(".zip")
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
) -> Path:
    """The cache to read: the built-in dataset (`source` None), an existing cache, or a source prepared once
    into `source_cache_path(...)` and reused afterwards.

    Args:
        source: a cache folder, a dataset (zip or folder), or None.
        size: image side when a source is prepared.
        holdout: fraction of every train class kept aside as split 'holdout' when preparing.
        holdout_seed: seed of that draw.
        log: where the note about preparing goes.
        progress: show the progress bar of preparing.

    Raises:
        FileNotFoundError: `source` does not exist.
    """
    if source is None:
        return ensure_synthetic()
    path = Path(source).expanduser()
    if is_cache(path):
        return path
    if not path.exists():
        raise FileNotFoundError(f"data source not found: {source}")
    out = source_cache_path(path, size, holdout, holdout_seed)
    options = {"size": size, "holdout": holdout, "seed": holdout_seed}
    if is_cache(out):  # prepare checks that it still matches the source, and returns at once
        return prepare(path, out, **options, progress=False)
    log(f"preparing {source} into the cache {out} (once; reused next time)")
    return prepare(path, out, **options, progress=progress)


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
