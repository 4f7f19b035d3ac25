"""CIFAR-10 and CIFAR-100, read in place from the official python-version tarballs (never extracted).

The layouts (``cifar-10-python.tar.gz`` and ``cifar-100-python.tar.gz`` from www.cs.toronto.edu/~kriz)::

    cifar-10-batches-py/
      data_batch_1 .. data_batch_5    train: pickled dicts, b"data" uint8 (10000, 3072), b"labels"
      test_batch                      the official test set: split 'val' here
      batches.meta                    b"label_names"
    cifar-100-python/
      train                           b"data" uint8 (50000, 3072), b"fine_labels" (and b"coarse_labels")
      test                            split 'val'
      meta                            b"fine_label_names"

A row of ``data`` is one 32x32 image, channel after channel (1024 red, 1024 green, 1024 blue values), rows
top to bottom. Classes are the label names in their official order (label i is name i); CIFAR-100 uses the
100 fine labels. Row ``r`` of member ``m`` is listed in the cache's file list as ``m#r``.

A cache made from a tarball records the sha256 of the tarball's bytes as its source digest (listing a
compressed tarball would mean decompressing all of it), so an existing cache is checked without reading the
batches. The pickles are read with an unpickler that builds nothing but plain containers and numpy arrays,
so a tarball from an untrusted mirror cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import tarfile
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from tinyswin.data.decode import channel_histogram
from tinyswin.data.imagefolder import DatasetPlan

CIFAR_SIDE = 32


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its batches, labels and class names.

    Attributes:
        kind: "cifar10" or "cifar100".
        folder: the top folder of the tarball.
        train: the members of the train split, in order.
        val: the members of the official test set (split 'val').
        meta: the member holding the class names.
        labels_key: the labels' key in a batch.
        names_key: the class names' key in ``meta``.
    """

    kind: str
    folder: str
    train: tuple[str, ...]
    val: tuple[str, ...]
    meta: str
    labels_key: str
    names_key: str


LAYOUTS = (
    CifarLayout(
        kind="cifar10",
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        val=("test_batch",),
        meta="batches.meta",
        labels_key="labels",
        names_key="label_names",
    ),
    CifarLayout(
        kind="cifar100",
        folder="cifar-100-python",
        train=("train",),
        val=("test",),
        meta="meta",
        labels_key="fine_labels",
        names_key="fine_label_names",
    ),
)

# the only globals a CIFAR pickle needs: numpy's array and dtype rebuilders (numpy 1 and 2 names), copyreg's,
# and the bytes rebuilder of Python 3's protocol 2
_PICKLE_GLOBALS = frozenset(
    {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("copyreg", "_reconstructor"),
        ("builtins", "object"),
    }
)


@dataclass
class CifarArchive:
    """A CIFAR tarball, read: its plan, its listing digest, and the pixels of every row.

    Attributes:
        path: the tarball.
        layout: which CIFAR it is.
        plan: classes and splits ('train', 'val'); files are ``member#row`` names.
        images: member -> uint8 (N, 32, 32, 3).
    """

    path: Path
    layout: CifarLayout
    plan: DatasetPlan
    images: dict[str, np.ndarray]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (anything else is refused, never constructed)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"a CIFAR batch holds no {module}.{name}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 warns on numpy.core
            return super().find_class(module, name)


def _text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value


def _unpickle(data: bytes, where: str) -> dict[str, Any]:
    """A batch's dict with str keys (written by Python 2: str keys; by Python 3: bytes keys).

    Raises:
        ValueError: not a pickled dict of arrays.
    """
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as exc:  # any unpickling failure: a damaged or foreign member
        raise ValueError(f"{where} is not a CIFAR batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is not a CIFAR batch (a pickled {type(obj).__name__}, not a dict)")
    return {_text(key): value for key, value in obj.items()}


def _tar_layout(path: Path) -> CifarLayout | None:
    """The CIFAR layout of a tarball, from the top folder of its first member; None for any other tar."""
    try:
        with tarfile.open(path, "r:*") as tf:
            first = tf.next()
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        return None
    top = first.name.lstrip("./").split("/", 1)[0] if first is not None else ""
    return next((layout for layout in LAYOUTS if layout.folder == top), None)


def is_tar(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` is a tar archive (plain or compressed)."""
    path = Path(source).expanduser()
    try:
        return path.is_file() and tarfile.is_tarfile(path)
    except OSError:
        return False


def cifar_layout(source: str | os.PathLike[str]) -> CifarLayout | None:
    """The layout of an official CIFAR python-version tarball, or None for anything else."""
    path = Path(source).expanduser()
    return _tar_layout(path) if is_tar(path) else None


def _read_members(path: Path, layout: CifarLayout) -> dict[str, bytes]:
    """The bytes of the members a layout needs.

    Raises:
        ValueError: a damaged or truncated tarball, or a member missing.
    """
    wanted = {*layout.train, *layout.val, layout.meta}
    found: dict[str, bytes] = {}
    prefix = f"{layout.folder}/"
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                name = member.name.lstrip("./")
                if not member.isfile() or not name.startswith(prefix):
                    continue
                rel = name[len(prefix) :]
                if rel in wanted:
                    handle = tf.extractfile(member)
                    found[rel] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ValueError(
            f"cannot read the tarball {path} ({' '.join(str(exc).split())}); it may be damaged or "
            "truncated: download it again"
        ) from exc
    missing = sorted(wanted - set(found))
    if missing:
        listed = ", ".join(prefix + m for m in missing)
        raise ValueError(f"{path} is not a complete {layout.kind} tarball: {listed} missing")
    return found


def _batch(data: bytes, where: str, labels_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The images uint8 (N, 32, 32, 3) and labels int64 (N,) of one pickled batch.

    Raises:
        ValueError: keys missing, pixels not uint8 (N, 3072), labels not N integers within the classes.
    """
    batch = _unpickle(data, where)
    for key in ("data", labels_key):
        if key not in batch:
            raise ValueError(f"{where} has no {key!r} (keys: {', '.join(map(str, batch))})")
    pixels = batch["data"]
    row = 3 * CIFAR_SIDE * CIFAR_SIDE
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.shape[1:] != (row,):
        shape = getattr(pixels, "shape", type(pixels).__name__)
        raise ValueError(f"{where}: 'data' must be uint8 (N, {row}), got {shape}")
    try:
        labels = np.asarray(batch[labels_key], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {labels_key!r} are not integers") from exc
    if labels.shape != (len(pixels),):
        raise ValueError(f"{where}: {labels.size} {labels_key!r} for {len(pixels)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where}: {labels_key!r} outside 0..{num_classes - 1}")
    side = CIFAR_SIDE
    images = pixels.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)  # (N, 3, 32, 32) -> (N, 32, 32, 3)
    return np.ascontiguousarray(images), labels


def _class_names(data: bytes, where: str, names_key: str) -> list[str]:
    meta = _unpickle(data, where)
    names = meta.get(names_key)
    if not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"{where} has no class names under {names_key!r}")
    names = [str(_text(name)) for name in names]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: the class names under {names_key!r} repeat a name")
    return names


def read_cifar(source: str | os.PathLike[str]) -> CifarArchive:
    """Read an official CIFAR-10 or CIFAR-100 python-version tarball in place.

    Returns:
        The archive's plan (train = the train batches, val = the official test set) and pixels.

    Raises:
        ValueError: not a CIFAR tarball, a damaged one, or a batch not in the official format.
    """
    path = Path(source).expanduser()
    layout = cifar_layout(path)
    if layout is None:
        raise ValueError(f"{path} is not an official CIFAR-10 or CIFAR-100 python-version tarball")
    members = _read_members(path, layout)
    where = f"{path}:{layout.folder}/"
    class_names = _class_names(members[layout.meta], where + layout.meta, layout.names_key)
    images: dict[str, np.ndarray] = {}
    splits: dict[str, tuple[list[str], np.ndarray]] = {}
    for split, names in (("train", layout.train), ("val", layout.val)):
        files: list[str] = []
        labels: list[np.ndarray] = []
        for member in names:
            batch = members.pop(member)
            pixels, member_labels = _batch(batch, where + member, layout.labels_key, len(class_names))
            images[member] = pixels
            files += [f"{member}#{row}" for row in range(len(pixels))]
            labels.append(member_labels)
        splits[split] = (files, np.concatenate(labels))
    plan = DatasetPlan(layout.kind, class_names, list(class_names), splits)
    return CifarArchive(path, layout, plan, images)


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes: a tarball's cache digest (reading it costs a fraction of listing a
    compressed tarball, which means decompressing all of it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """A square uint8 (S, S, 3) image at ``size`` x ``size``: itself when S == size, else Pillow's
    antialiased bicubic resize (what :func:`tinyswin.data.imagefolder.decode_image` does to a square one)."""
    if image.shape[0] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def _write_rows(archive: CifarArchive, names: list[str], out: np.ndarray, start: int, size: int) -> int:
    """Write the images ``names`` (``member#row``) at ``size`` into rows ``start..`` of ``out``."""
    for i, name in enumerate(names):
        member, _, row = name.rpartition("#")
        out[start + i] = resize_square(archive.images[member][int(row)], size)
    return len(names)


def write_cifar_splits(
    archive: CifarArchive,
    splits: dict[str, tuple[list[str], np.ndarray]],
    folder: Path,
    size: int,
    workers: int,
    progress: bool,
) -> tuple[list[tuple[str, int, str]], np.ndarray]:
    """Write the rows named in ``splits`` (``member#row``) into ``<split>_images.npy`` files of ``folder``.

    Images are resized by ``workers`` threads (Pillow resizes without the GIL), chunk by chunk.

    Returns:
        The bad files (none: every row of a checked batch is an image) and the train split's (3, 256)
        histogram.
    """
    total = sum(len(files) for files, _ in splits.values())
    hist = np.zeros((3, 256), dtype=np.int64)
    on_terminal = sys.stderr is not None and sys.stderr.isatty()
    if progress and not on_terminal:
        print(f"writing {total:,} images of {archive.path.name}", file=sys.stderr)
    desc = f"writing {archive.path.name}"
    bar = tqdm(total=total, unit="img", desc=desc, disable=not (progress and on_terminal))
    chunk = 1024
    with bar, ThreadPoolExecutor(max(1, workers)) as pool:
        for split, (files, _) in splits.items():
            out = np.lib.format.open_memmap(
                folder / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3)
            )
            jobs = [
                pool.submit(_write_rows, archive, files[start : start + chunk], out, start, size)
                for start in range(0, len(files), chunk)
            ]
            for job in as_completed(jobs):
                bar.update(job.result())
            if split == "train":
                hist += channel_histogram(out)
            out.flush()
            del out
    return [], hist
