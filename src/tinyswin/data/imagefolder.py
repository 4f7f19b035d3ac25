"""Image sources: a folder or a zip of files, the image-folder layout, and decoding one image to uint8 RGB.

A source is read through :class:`SourceTree`, which lists the files of a folder or of a zip archive the same
way (relative POSIX paths and sizes), so that both give the same dataset and the same digest. Zip members are
read directly, never extracted.

Image-folder layout (any format Pillow reads, any size)::

    root/<class>/**/<image>                      one split, 'train' (``prepare`` holds out 'val' from it)
    root/train/<class>/**/<image>                with optional labelled siblings:
    root/val/<class>/**/<image>                  split 'val'
    root/test/<class>/**/<image>                 split 'test'

The second form is used when ``root`` holds a ``train/`` folder and nothing but ``train/``, ``val/`` and
``test/`` folders. Classes are the folder names of ``train``, sorted (torchvision ImageFolder's order); the
class folders of ``val`` and ``test`` must be among them. Files whose extension Pillow does not read are
ignored, as are hidden files and ``__MACOSX`` folders.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from tinyswin.errors import one_line

# Formats Pillow registers for reading that are not pictures one can train on (containers, stubs, vector).
_NOT_IMAGES = frozenset(
    {".bufr", ".eps", ".ps", ".emf", ".wmf", ".fit", ".fits", ".grib", ".h5", ".hdf", ".mpeg", ".mpg"}
)
SPLIT_FOLDERS = ("train", "val", "test")
_ORIENTATION = 0x0112  # EXIF tag


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) treated as images: those Pillow can open."""
    Image.init()
    exts = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return frozenset(exts - _NOT_IMAGES)


def is_image_name(name: str, extensions: frozenset[str]) -> bool:
    """Whether a file name has an image extension (case-insensitive)."""
    base = name.rpartition("/")[2]
    dot = base.rfind(".")
    return dot > 0 and base[dot:].lower() in extensions


def _ignored(rel: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


@dataclass(frozen=True)
class SourceTree:
    """The files of a folder or zip archive, below its dataset root.

    Attributes:
        path: the folder or the zip file.
        is_zip: whether ``path`` is a zip archive.
        prefix: the dataset root inside ``path`` as a POSIX prefix ("" or "tiny-imagenet-200/").
        files: relative POSIX path (below ``prefix``) -> size in bytes, sorted by path.
        dirs: relative POSIX paths of every folder below the root (empty ones included).
    """

    path: Path
    is_zip: bool
    prefix: str
    files: dict[str, int]
    dirs: frozenset[str]

    def where(self, rel: str = "") -> str:
        """A readable location of ``rel`` for messages, e.g. ``data.zip:tiny-imagenet-200/wnids.txt``."""
        if self.is_zip:
            return f"{self.path}:{self.prefix}{rel}"
        return str(self.path / self.prefix / rel) if rel else str(self.path / self.prefix)

    def digest(self) -> str:
        """sha256 of the sorted listing (relative names and sizes): the same for a folder and its zip."""
        h = hashlib.sha256()
        for rel, size in self.files.items():
            h.update(f"{rel}\t{size}\n".encode())
        return "sha256:" + h.hexdigest()

    def open_reader(self) -> SourceReader:
        """A reader of file bytes; for a zip it holds one open ZipFile (open one per process)."""
        return SourceReader(self)

    def subdirs(self, folder: str = "") -> list[str]:
        """Sorted names of the folders directly inside ``folder`` ("" = the root)."""
        return sorted(d.rsplit("/", 1)[-1] for d in self.dirs if _parent(d) == folder)

    def images_by_subdir(self, folder: str, extensions: frozenset[str]) -> dict[str, list[str]]:
        """The images anywhere below each folder directly inside ``folder``, in one pass over the files.

        Returns:
            subfolder name -> sorted relative paths of its images (every subfolder listed, maybe empty).
        """
        start = f"{folder}/" if folder else ""
        found: dict[str, list[str]] = {name: [] for name in self.subdirs(folder)}
        for rel in self.files:
            if rel.startswith(start) and is_image_name(rel, extensions):
                head, sep, _ = rel[len(start) :].partition("/")
                if sep:
                    found[head].append(rel)
        return found


def _parent(rel: str) -> str:
    return rel.rsplit("/", 1)[0] if "/" in rel else ""


def _all_dirs(paths: list[str]) -> frozenset[str]:
    """Every folder implied by the given relative paths (file paths or folder paths)."""
    dirs: set[str] = set()
    for rel in paths:
        parent = _parent(rel)
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = _parent(parent)
    return frozenset(dirs)


class SourceReader:
    """Reads file bytes from a :class:`SourceTree`; a context manager that closes its zip handle."""

    def __init__(self, tree: SourceTree) -> None:
        self.tree = tree
        self._zip = zipfile.ZipFile(tree.path) if tree.is_zip else None

    def read(self, rel: str) -> bytes:
        """The bytes of the file at relative path ``rel``."""
        if self._zip is not None:
            return self._zip.read(self.tree.prefix + rel)
        return (self.tree.path / self.tree.prefix / rel).read_bytes()

    def read_text(self, rel: str) -> str:
        """The text of the file at relative path ``rel`` (UTF-8).

        Raises:
            ValueError: the file cannot be read (a damaged zip member, no permission).
        """
        try:
            data = self.read(rel)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            hint = "the archive may be damaged: download it again" if self.tree.is_zip else "check the file"
            raise ValueError(f"cannot read {self.tree.where(rel)} ({one_line(exc)}); {hint}") from exc
        return data.decode("utf-8", errors="replace")

    def close(self) -> None:
        """Close the zip handle, if any."""
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _find_root(files: dict[str, int]) -> str:
    """The dataset root: descend through lone wrapper folders (a top level holding nothing but one folder,
    with no images directly inside it: ``tiny-imagenet-200/``, ``flowers/`` of ``flowers/train/...``)."""
    exts = image_extensions()
    prefix = ""
    while True:
        level = [rel[len(prefix) :] for rel in files]
        top = {rel.split("/", 1)[0] for rel in level}
        if len(top) != 1 or any("/" not in rel for rel in level):
            return prefix
        (only,) = top
        inner = [rel[len(only) + 1 :] for rel in level]
        if any("/" not in rel and is_image_name(rel, exts) for rel in inner):
            return prefix  # `only` is a class folder
        prefix = f"{prefix}{only}/"


def _list_folder(path: Path) -> tuple[dict[str, int], list[str]]:
    """Files (relative path -> size) and folders (relative, with a trailing slash) below ``path``.

    A subfolder that cannot be listed is kept as an empty folder (a class folder then reports no images).

    Raises:
        OSError: ``path`` itself cannot be listed.
    """
    os.listdir(path)
    files: dict[str, int] = {}
    folders: list[str] = []
    for dirpath, dirnames, filenames in os.walk(path):
        rel_dir = Path(dirpath).relative_to(path).as_posix()
        rel_dir = "" if rel_dir == "." else f"{rel_dir}/"
        folders += [f"{rel_dir}{name}/" for name in dirnames]
        for name in filenames:
            files[rel_dir + name] = os.stat(os.path.join(dirpath, name)).st_size
    return files, folders


def _list_zip(path: Path) -> tuple[dict[str, int], list[str]]:
    """Member files (name -> size) and folder entries of the zip archive ``path``.

    Raises:
        ValueError: not a zip archive, or a truncated one.
    """
    files: dict[str, int] = {}
    folders: list[str] = []
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    folders.append(info.filename)
                else:
                    files[info.filename] = info.file_size
    except zipfile.BadZipFile as exc:
        raise ValueError(
            f"{path} is not a readable zip archive ({exc}); is it truncated or another kind of file?"
        ) from exc
    return files, folders


def list_source(source: str | os.PathLike[str]) -> SourceTree:
    """List a folder or a zip archive as a :class:`SourceTree`.

    Raises:
        FileNotFoundError: the source does not exist.
        ValueError: a file that is not a zip archive (or a truncated one), a source with no files, or one
            that cannot be read (no permission).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"source not found: {path}")
    try:
        if path.is_dir():
            files, folders = _list_folder(path)
        else:
            files, folders = _list_zip(path)
    except OSError as exc:
        where = exc.filename or path
        raise ValueError(f"cannot read the source {where} ({exc.strerror or one_line(exc)})") from exc
    is_zip = not path.is_dir()
    files = {rel: size for rel, size in files.items() if not _ignored(rel)}
    if not files:
        raise ValueError(f"source is empty: {path} holds no files")
    prefix = _find_root(files)
    rel_files = {rel[len(prefix) :]: files[rel] for rel in sorted(files) if rel.startswith(prefix)}
    rel_folders = [d[len(prefix) :] for d in folders if d.startswith(prefix) and not _ignored(d)]
    dirs = _all_dirs(list(rel_files) + [d.rstrip("/") + "/x" for d in rel_folders if d])
    return SourceTree(path=path, is_zip=is_zip, prefix=prefix, files=rel_files, dirs=dirs)


@dataclass
class DatasetPlan:
    """What to decode: per split, the relative file paths and their labels, plus the classes.

    Attributes:
        kind: "tinyimagenet" or "imagefolder".
        class_ids: sorted class ids (folder names or WordNet ids); label i is class_ids[i].
        class_names: a human-readable name per class.
        splits: split name -> (relative file paths, labels int64 (N,)).
        class_words: the full description per class where the source has one (Tiny ImageNet words.txt).
    """

    kind: str
    class_ids: list[str]
    class_names: list[str]
    splits: dict[str, tuple[list[str], np.ndarray]]
    class_words: list[str] | None = None


def plan_imagefolder(tree: SourceTree) -> DatasetPlan:
    """The dataset of an image-folder tree (see the module docstring for the layout).

    Raises:
        ValueError: fewer than two class folders, a class folder with no images, a val/test class unknown
            to train.
    """
    exts = image_extensions()
    top = tree.subdirs()
    split_mode = "train" in top and set(top) <= set(SPLIT_FOLDERS)
    bases = {name: name for name in SPLIT_FOLDERS if name in top} if split_mode else {"train": ""}

    def class_dir(base: str, cls: str) -> str:
        return f"{base}/{cls}" if base else cls

    per_split = {split: tree.images_by_subdir(base, exts) for split, base in bases.items()}
    class_ids = sorted(per_split["train"])
    if not class_ids:
        if not any(is_image_name(rel, exts) for rel in tree.files):
            raise ValueError(f"source is empty: no images found in {tree.where()}")
        raise ValueError(f"no class folders in {tree.where(bases['train'])}: expected <class>/<images>")
    if len(class_ids) == 1:
        raise ValueError(
            f"only one class folder ('{class_ids[0]}') in {tree.where(bases['train'])}: point the source at "
            "the folder that holds the class folders"
        )
    index = {cls: i for i, cls in enumerate(class_ids)}
    splits: dict[str, tuple[list[str], np.ndarray]] = {}
    for split, by_class in per_split.items():
        names: list[str] = []
        labels: list[int] = []
        for cls, found in by_class.items():
            if cls not in index:
                raise ValueError(
                    f"class folder {tree.where(class_dir(bases[split], cls))} is not a class of train"
                )
            if not found:
                raise ValueError(f"class folder {tree.where(class_dir(bases[split], cls))} has no images")
            names += found
            labels += [index[cls]] * len(found)
        if names:
            splits[split] = (names, np.asarray(labels, dtype=np.int64))
    return DatasetPlan("imagefolder", class_ids, list(class_ids), splits)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB (alpha dropped, as torchvision's loader does; 16-bit grey scaled to 8 bits)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16"):
        grey = (np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def _format_hint(data: bytes) -> list[str] | None:
    """The formats to try first, from the magic bytes (Pillow otherwise probes many plugins in turn)."""
    if data[:3] == b"\xff\xd8\xff":
        return ["JPEG"]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ["PNG"]
    return None


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode one image file to a uint8 RGB array of ``size`` x ``size``.

    An image that is already ``size`` x ``size`` is kept pixel for pixel (decode, convert to RGB, nothing
    else). Any other is turned upright (EXIF orientation), its short side resized to ``size`` with Pillow's
    antialiased bicubic filter, then centre-cropped (torchvision ``Resize`` + ``CenterCrop`` geometry).

    Args:
        data: the file's bytes.
        size: the output side in pixels.

    Returns:
        uint8 array (size, size, 3).

    Raises:
        OSError, ValueError, and the like: the bytes are not a readable image.
    """
    im = Image.open(io.BytesIO(data), formats=_format_hint(data))
    if im.size != (size, size) and im.format == "JPEG":
        im.draft("RGB", (2 * size, 2 * size))  # decode big JPEGs at a reduced scale, still >= 2x the target
    im.load()
    if im.getexif().get(_ORIENTATION, 1) != 1:
        im = ImageOps.exif_transpose(im)
    im = _to_rgb(im)
    w, h = im.size
    if (w, h) != (size, size):
        short, long = min(w, h), max(w, h)
        new_long = max(size, int(size * long / short))  # torchvision Resize's rounding
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left = round((new_w - size) / 2.0)
        top = round((new_h - size) / 2.0)
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8)
