"""Tiny ImageNet, from the official zip or its extracted folder: layout checks and labels.

The layout (the official ``tiny-imagenet-200.zip``, or the folder it unpacks to)::

    tiny-imagenet-200/
      wnids.txt                       the class ids (WordNet ids), one a line
      words.txt                       WordNet id <tab> names (optional here; gives the class names)
      train/<wnid>/images/*.JPEG      train images, labelled by their folder
      val/images/*.JPEG               val images, labelled only by ...
      val/val_annotations.txt         file <tab> wnid <tab> box
      test/images/*.JPEG              unlabelled: ignored

Classes are the sorted wnids (torchvision ImageFolder's order, not the order of ``wnids.txt``). A class name
is the first name of its ``words.txt`` line (the text before the first comma, e.g. "Egyptian cat"); the full
line is kept as the class description.
"""

from __future__ import annotations

import numpy as np

from tinyswin.data.imagefolder import DatasetPlan, SourceReader, SourceTree, image_extensions

MARKERS = ("wnids.txt", "words.txt", "val/val_annotations.txt")


def is_tinyimagenet(tree: SourceTree) -> bool:
    """Whether the tree is laid out as Tiny ImageNet (it holds one of its index files at the root)."""
    return any(name in tree.files for name in MARKERS)


def _read_wnids(tree: SourceTree, reader: SourceReader) -> list[str]:
    if "wnids.txt" not in tree.files:
        raise FileNotFoundError(f"Tiny ImageNet class list not found: {tree.where('wnids.txt')}")
    wnids = [line.strip() for line in reader.read_text("wnids.txt").splitlines() if line.strip()]
    if not wnids:
        raise ValueError(f"{tree.where('wnids.txt')} lists no classes")
    seen: set[str] = set()
    for wnid in wnids:
        if wnid in seen:
            raise ValueError(f"{tree.where('wnids.txt')}: class '{wnid}' is listed twice")
        seen.add(wnid)
    return sorted(wnids)


def _read_words(tree: SourceTree, reader: SourceReader, wnids: list[str]) -> list[str]:
    """The words.txt description of each wnid (the wnid itself where words.txt is absent or silent)."""
    words: dict[str, str] = {}
    if "words.txt" in tree.files:
        for line in reader.read_text("words.txt").splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.strip()
    return [words.get(wnid) or wnid for wnid in wnids]


def _val_split(
    tree: SourceTree, reader: SourceReader, index: dict[str, int], exts: frozenset[str]
) -> tuple[list[str], np.ndarray]:
    """Val files (sorted) and their labels from val/val_annotations.txt."""
    ann = "val/val_annotations.txt"
    if ann not in tree.files:
        raise FileNotFoundError(f"Tiny ImageNet val labels not found: {tree.where(ann)}")
    images = {rel.rsplit("/", 1)[-1]: rel for rel in tree.images_by_subdir("val", exts).get("images", [])}
    label_of: dict[str, int] = {}
    for lineno, line in enumerate(reader.read_text(ann).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2:
            raise ValueError(f"{tree.where(ann)}: line {lineno} is not 'file<tab>wnid...': {line!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise ValueError(f"{tree.where(ann)}: line {lineno}: class '{wnid}' is not in wnids.txt")
        if name not in images:
            raise ValueError(f"{tree.where(ann)}: line {lineno}: image '{name}' not found in val/images")
        if name in label_of:
            raise ValueError(f"{tree.where(ann)}: line {lineno}: image '{name}' is annotated twice")
        label_of[name] = index[wnid]
    unlabelled = sorted(set(images) - set(label_of))
    if unlabelled:
        raise ValueError(
            f"{len(unlabelled)} val images have no line in {tree.where(ann)}: {', '.join(unlabelled[:10])}"
            + (" ..." if len(unlabelled) > 10 else "")
        )
    files = sorted(images[name] for name in label_of)
    labels = np.asarray([label_of[rel.rsplit("/", 1)[-1]] for rel in files], dtype=np.int64)
    return files, labels


def plan_tinyimagenet(tree: SourceTree) -> DatasetPlan:
    """The train and val splits of a Tiny ImageNet tree, checked.

    Raises:
        FileNotFoundError: ``wnids.txt`` or ``val/val_annotations.txt`` is missing.
        ValueError: a class with no train images, a train folder not in wnids.txt, a val line naming an
            unknown class or a missing image, a val image without a label.
    """
    with tree.open_reader() as reader:
        return _plan(tree, reader)


def _plan(tree: SourceTree, reader: SourceReader) -> DatasetPlan:
    exts = image_extensions()
    wnids = _read_wnids(tree, reader)
    index = {wnid: i for i, wnid in enumerate(wnids)}
    by_class = tree.images_by_subdir("train", exts)
    for folder in by_class:
        if folder not in index:
            raise ValueError(f"train folder {tree.where('train/' + folder)} is not a class of wnids.txt")
    train_files: list[str] = []
    train_labels: list[int] = []
    for wnid in wnids:
        found = by_class.get(wnid, [])
        if not found:
            raise ValueError(f"class folder {tree.where(f'train/{wnid}/images')} has no images")
        train_files += found
        train_labels += [index[wnid]] * len(found)
    splits = {"train": (train_files, np.asarray(train_labels, dtype=np.int64))}
    splits["val"] = _val_split(tree, reader, index, exts)
    words = _read_words(tree, reader, wnids)
    names = [text.split(",", 1)[0].strip() or wnid for text, wnid in zip(words, wnids, strict=True)]
    return DatasetPlan("tinyimagenet", wnids, names, splits, class_words=words)
