"""`tinyswin prepare` and the uint8 cache: layouts, labels, pixels, atomicity, bad input, shared subset."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torchvision.transforms.functional as TF
from PIL import Image

from tinyswin.cli import main
from tinyswin.data.cache import (
    CacheFileMissingError,
    CacheMismatchError,
    DamagedCacheError,
    is_cache,
    load_cache,
    looks_like_cache,
    write_cache,
)
from tinyswin.data.prepare_source import prepare
from tinyswin.data.sources import eval_splits, resolve_data
from tinyswin.errors import DiskFullError, TinyswinError

# wnids.txt order on purpose differs from the sorted order the cache uses.
WNIDS = ["n03000003", "n01000001", "n02000002"]
WORDS = {
    "n01000001": "goldfish, Carassius auratus",
    "n02000002": "tabby, tabby cat",
    "n03000003": "school bus",
    "n09999999": "unrelated, not a class",
}
PER_CLASS = 4


def _noise(rng: np.random.Generator, h: int, w: int, channels: int = 3) -> np.ndarray:
    """Smooth-ish random image (JPEG keeps it recognisable), uint8 (h, w, channels)."""
    small = rng.integers(0, 256, size=(max(1, h // 8), max(1, w // 8), channels), dtype=np.uint8)
    big = np.kron(small, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]
    return np.clip(big.astype(np.int16) + rng.integers(-20, 21, size=big.shape), 0, 255).astype(np.uint8)


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.squeeze()).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_tinyimagenet(root: Path, seed: int = 0, per_class: int = PER_CLASS) -> dict[str, str]:
    """Write an official-layout Tiny ImageNet in ``root`` (a grayscale JPEG among the train images).

    Returns:
        val file name -> wnid (the ground truth written to val_annotations.txt).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(w + "\n" for w in WNIDS))
    (root / "words.txt").write_text("".join(f"{k}\t{v}\n" for k, v in WORDS.items()))
    for c, wnid in enumerate(WNIDS):
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("box lines are ignored\n")
        for i in range(per_class):
            grey = c == 0 and i == 1
            pixels = _noise(rng, 64, 64, 1 if grey else 3)
            (images / f"{wnid}_{i}.JPEG").write_bytes(_jpeg(pixels))
    val_images = root / "val" / "images"
    val_images.mkdir(parents=True)
    truth = {}
    for k in range(7):
        name = f"val_{k}.JPEG"
        (val_images / name).write_bytes(_jpeg(_noise(rng, 64, 64)))
        truth[name] = WNIDS[(k * 2 + 1) % 3]
    order = list(truth)
    random.Random(seed).shuffle(order)  # annotation lines not in file order
    assert order != sorted(order)
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"{name}\t{truth[name]}\t0\t0\t63\t63\n" for name in order)
    )
    test_images = root / "test" / "images"
    test_images.mkdir(parents=True)
    (test_images / "test_0.JPEG").write_bytes(_jpeg(_noise(rng, 64, 64)))
    return truth


def zip_folder(folder: Path, zip_path: Path, top: str = "tiny-imagenet-200") -> Path:
    """Zip ``folder`` with every member under ``top/`` (folder entries included, as the official zip)."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{top}/", b"")
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if path.is_dir():
                zf.writestr(f"{top}/{rel}/", b"")
            else:
                zf.write(path, f"{top}/{rel}")
    return zip_path


@pytest.fixture
def ti_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "tiny-imagenet-200"
    truth = make_tinyimagenet(root)
    return root, truth


def _leftovers(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f"{name}*")) + sorted(parent.glob(f".{name}*"))


# -------------------- Tiny ImageNet


def test_folder_and_zip_give_identical_caches(ti_folder, tmp_path):
    root, _ = ti_folder
    zip_path = zip_folder(root, tmp_path / "ti.zip")
    a = load_cache(prepare(root, tmp_path / "from_folder", workers=1, progress=False))
    b = load_cache(prepare(zip_path, tmp_path / "from_zip", workers=2, progress=False))
    assert a.splits == b.splits == ("train", "val")
    for split in a.splits:
        (ia, la), (ib, lb) = a.split(split), b.split(split)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
        assert a.files(split) == b.files(split)
    meta_a = {k: v for k, v in a.meta.items() if k not in ("source", "source_kind")}
    meta_b = {k: v for k, v in b.meta.items() if k not in ("source", "source_kind")}
    assert meta_a == meta_b
    assert (a.meta["source_kind"], b.meta["source_kind"]) == ("tinyimagenet-folder", "tinyimagenet-zip")
    assert a.class_ids == sorted(WNIDS)
    assert a.class_names == ["goldfish", "tabby", "school bus"]
    assert a.meta["counts"] == {"train": 3 * PER_CLASS, "val": 7}
    assert a.meta["class_counts"]["train"] == [PER_CLASS] * 3


def test_train_pixels_equal_pil_decode_and_grayscale_becomes_rgb(ti_folder, tmp_path):
    root, _ = ti_folder
    cache = load_cache(prepare(root, tmp_path / "c", workers=1, progress=False))
    images, labels = cache.split("train")
    files = cache.files("train")
    assert images.dtype == np.uint8 and images.shape == (3 * PER_CLASS, 64, 64, 3)
    assert labels.dtype == np.int64
    grey_rows = 0
    for row, rel in enumerate(files):
        with Image.open(root / rel) as im:
            mode = im.mode
            expected = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(images[row], expected)
        assert cache.class_ids[labels[row]] == rel.split("/")[1]
        if mode == "L":
            grey_rows += 1
            assert np.array_equal(images[row, ..., 0], images[row, ..., 2])
    assert grey_rows == 1


def test_val_labels_come_from_annotations_not_file_order(ti_folder, tmp_path):
    root, truth = ti_folder
    cache = load_cache(prepare(root, tmp_path / "c", workers=1, progress=False))
    images, labels = cache.split("val")
    files = cache.files("val")
    assert sorted(Path(f).name for f in files) == sorted(truth)
    got = {Path(f).name: cache.class_ids[label] for f, label in zip(files, labels, strict=True)}
    assert got == truth
    for row, rel in enumerate(files):
        with Image.open(root / rel) as im:
            np.testing.assert_array_equal(images[row], np.asarray(im.convert("RGB")))


def test_mean_and_std_are_those_of_train(ti_folder, tmp_path):
    root, _ = ti_folder
    cache = load_cache(prepare(root, tmp_path / "c", holdout=0.25, workers=2, progress=False))
    train = np.asarray(cache.split("train")[0], dtype=np.float64) / 255.0
    np.testing.assert_allclose(cache.mean, train.mean(axis=(0, 1, 2)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(cache.std, train.std(axis=(0, 1, 2)), rtol=0, atol=1e-12)
    everything = np.concatenate([train, np.asarray(cache.split("holdout")[0]) / 255.0])
    assert not np.allclose(cache.mean, everything.mean(axis=(0, 1, 2)), rtol=0, atol=1e-9)


def test_holdout_is_stratified_seeded_and_carved_from_train(tmp_path):
    root = tmp_path / "ti"
    make_tinyimagenet(root, per_class=8)
    plain = load_cache(prepare(root, tmp_path / "plain", workers=1, progress=False))
    a = load_cache(prepare(root, tmp_path / "a", holdout=0.25, seed=1, workers=1, progress=False))
    again = load_cache(prepare(root, tmp_path / "again", holdout=0.25, seed=1, workers=1, progress=False))
    other = load_cache(prepare(root, tmp_path / "other", holdout=0.25, seed=2, workers=1, progress=False))
    assert a.splits == ("train", "holdout", "val")
    assert a.meta["class_counts"]["holdout"] == [2, 2, 2]
    assert a.meta["class_counts"]["train"] == [6, 6, 6]
    assert a.meta["holdout"] == {"fraction": 0.25, "seed": 1}
    assert sorted(a.files("train") + a.files("holdout")) == sorted(plain.files("train"))
    assert not set(a.files("train")) & set(a.files("holdout"))
    assert a.files("holdout") == again.files("holdout")
    assert a.files("holdout") != other.files("holdout")
    plain_images, plain_labels = plain.split("train")
    row_of = {f: i for i, f in enumerate(plain.files("train"))}
    images, labels = a.split("holdout")
    for row, rel in enumerate(a.files("holdout")):
        np.testing.assert_array_equal(images[row], plain_images[row_of[rel]])
        assert labels[row] == plain_labels[row_of[rel]]
    np.testing.assert_array_equal(a.split("val")[0], plain.split("val")[0])


def test_existing_cache_is_reused_or_refused_never_overwritten(ti_folder, tmp_path, capsys):
    root, _ = ti_folder
    out = prepare(root, tmp_path / "c", workers=1, progress=False)
    stamp = (out / "meta.json").stat().st_mtime_ns
    again = prepare(zip_folder(root, tmp_path / "same.zip"), out, workers=1, progress=True)
    assert again == out
    assert "already" in capsys.readouterr().out
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="image_size: cache has 64, asked for 32"):
        prepare(root, out, size=32, workers=1, progress=False)
    with pytest.raises(ValueError, match="holdout"):
        prepare(root, out, holdout=0.5, workers=1, progress=False)
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a complete tinyswin cache"):
        prepare(root, tmp_path / "busy", workers=1, progress=False)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert is_cache(prepare(root, tmp_path / "empty", workers=1, progress=False))


def _remove(path: Path) -> None:
    path.unlink()


def _corrupt_two(root: Path) -> list[str]:
    a = root / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_2.JPEG"
    a.write_bytes(a.read_bytes()[:300])  # truncated JPEG
    b = root / "val" / "images" / "val_3.JPEG"
    b.write_bytes(b"this is not an image at all")
    return [a.name, b.name]


BAD_INPUTS = {
    "missing wnids.txt": (lambda r: _remove(r / "wnids.txt"), FileNotFoundError, r"wnids\.txt"),
    "missing val_annotations.txt": (
        lambda r: _remove(r / "val" / "val_annotations.txt"),
        FileNotFoundError,
        r"val_annotations\.txt",
    ),
    "val line with unknown class": (
        lambda r: (r / "val" / "val_annotations.txt").write_text(
            (r / "val" / "val_annotations.txt").read_text().replace(WNIDS[0], "n09999999", 1)
        ),
        ValueError,
        r"line \d+: class 'n09999999' is not in wnids\.txt",
    ),
    "class folder with no images": (
        lambda r: [p.unlink() for p in (r / "train" / WNIDS[2] / "images").iterdir()],
        ValueError,
        rf"train/{WNIDS[2]}/images has no images",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_layout_is_refused_before_anything_is_written(tmp_path, case):
    root = tmp_path / "ti"
    make_tinyimagenet(root)
    damage, error, pattern = BAD_INPUTS[case]
    damage(root)
    for source in (root, zip_folder(root, tmp_path / "ti.zip")):
        with pytest.raises(error, match=pattern):
            prepare(source, tmp_path / "out" / "cache", workers=1, progress=False)
        assert not (tmp_path / "out").exists()


def test_not_a_zip_truncated_zip_and_empty_sources(ti_folder, tmp_path):
    root, _ = ti_folder
    out = tmp_path / "out" / "cache"
    text = tmp_path / "data.zip"
    text.write_text("hello, I am not a zip")
    with pytest.raises(ValueError, match=r"data\.zip is not a readable zip"):
        prepare(text, out, progress=False)
    good = zip_folder(root, tmp_path / "good.zip").read_bytes()
    cut = tmp_path / "cut.zip"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"cut\.zip is not a readable zip"):
        prepare(cut, out, progress=False)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="empty"):
        prepare(tmp_path / "nothing", out, progress=False)
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    (tmp_path / "no_images" / "cat" / "readme.txt").write_text("no pictures here")
    with pytest.raises(ValueError, match="empty: no images"):
        prepare(tmp_path / "no_images", out, progress=False)
    with zipfile.ZipFile(tmp_path / "empty.zip", "w"):
        pass
    with pytest.raises(ValueError, match="empty"):
        prepare(tmp_path / "empty.zip", out, progress=False)
    with pytest.raises(FileNotFoundError, match=r"missing\.zip"):
        prepare(tmp_path / "missing.zip", out, progress=False)
    assert not (tmp_path / "out").exists()


def test_corrupt_images_are_all_listed_and_nothing_is_left(ti_folder, tmp_path):
    root, _ = ti_folder
    names = _corrupt_two(root)
    for source, workers in ((root, 1), (zip_folder(root, tmp_path / "ti.zip"), 2)):
        with pytest.raises(ValueError, match="2 unreadable") as info:
            prepare(source, tmp_path / "out", workers=workers, progress=False)
        for name in names:
            assert name in str(info.value)
        assert _leftovers(tmp_path, "out") == []


def test_skip_bad_leaves_them_out_and_says_how_many(ti_folder, tmp_path, capsys):
    root, truth = ti_folder
    names = _corrupt_two(root)
    cache = load_cache(prepare(root, tmp_path / "c", skip_bad=True, workers=2, progress=False))
    assert "skipped 2" in capsys.readouterr().err
    assert cache.meta["counts"] == {"train": 3 * PER_CLASS - 1, "val": 6}
    assert len(cache.meta["skipped"]) == 2
    for split in cache.splits:
        images = cache.split(split)[0]
        files = cache.files(split)
        assert not {Path(f).name for f in files} & set(names)
        for row, rel in enumerate(files):
            with Image.open(root / rel) as im:
                np.testing.assert_array_equal(images[row], np.asarray(im.convert("RGB")))
    val_files, val_labels = cache.files("val"), cache.split("val")[1]
    got = {Path(f).name: cache.class_ids[c] for f, c in zip(val_files, val_labels, strict=True)}
    assert got == {k: v for k, v in truth.items() if k != "val_3.JPEG"}
    with pytest.raises(ValueError, match="left out 2 bad image"):
        prepare(root, tmp_path / "c", workers=1, progress=False)


# -------------------- image folders


def _save(path: Path, image: Image.Image, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)


def test_image_folder_any_mode_any_size(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "pets"
    rgba = Image.fromarray(_noise(rng, 40, 40, 4), "RGBA")
    palette = Image.fromarray(_noise(rng, 32, 32)).convert("P")
    cmyk = Image.fromarray(_noise(rng, 32, 32, 4), "CMYK")
    wide = Image.fromarray(_noise(rng, 50, 120))
    tall_grey = Image.fromarray(_noise(rng, 90, 45, 1).squeeze(), "L")
    _save(root / "cat" / "a.png", rgba, "PNG")
    _save(root / "cat" / "b.png", palette, "PNG")
    _save(root / "dog" / "c.jpg", cmyk, "JPEG")
    _save(root / "dog" / "deeper" / "d.png", wide, "PNG")
    _save(root / "emu" / "e.bmp", tall_grey, "BMP")
    (root / "emu" / "notes.txt").write_text("not an image, ignored")
    cache = load_cache(prepare(root, tmp_path / "c", size=32, workers=1, progress=False))
    assert cache.class_ids == ["cat", "dog", "emu"] and cache.class_names == cache.class_ids
    assert cache.splits == ("train", "val")  # no val in the source: one image of each class but emu's
    assert cache.meta["class_counts"] == {"train": [1, 1, 1], "val": [1, 1, 0]}
    every = {rel: (split, row) for split in cache.splits for row, rel in enumerate(cache.files(split))}
    assert sorted(every) == ["cat/a.png", "cat/b.png", "dog/c.jpg", "dog/deeper/d.png", "emu/e.bmp"]
    for rel, (split, row) in sorted(every.items()):
        images, labels = cache.split(split)
        assert cache.class_ids[labels[row]] == rel.split("/")[0]
        with Image.open(root / rel) as im:
            rgb = im.convert("RGB")
        reference = TF.center_crop(TF.resize(rgb, 32, interpolation=TF.InterpolationMode.BICUBIC), 32)
        np.testing.assert_array_equal(images[row], np.asarray(reference), err_msg=rel)
    grey = cache.split("train")[0][every["emu/e.bmp"][1]]
    assert np.array_equal(grey[..., 0], grey[..., 1])


def test_image_folder_with_val_sibling(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "flowers"
    for split, count in (("train", 3), ("val", 2)):
        for cls in ("rose", "tulip"):
            for i in range(count):
                _save(root / split / cls / f"{i}.png", Image.fromarray(_noise(rng, 16, 16)), "PNG")
    cache = load_cache(
        prepare(zip_folder(root, tmp_path / "f.zip", "flowers"), tmp_path / "c", size=16, progress=False)
    )
    assert cache.splits == ("train", "val")
    assert cache.meta["class_counts"] == {"train": [3, 3], "val": [2, 2]}
    assert cache.files("val")[:1] == ["val/rose/0.png"]
    _save(root / "val" / "violet" / "0.png", Image.fromarray(_noise(rng, 16, 16)), "PNG")
    with pytest.raises(ValueError, match=r"val/violet is not a class of train"):
        prepare(root, tmp_path / "c2", size=16, progress=False)
    assert not (tmp_path / "c2").exists()


def test_a_wrapped_dataset_is_not_read_as_one_class(ti_folder, tmp_path):
    root, _ = ti_folder
    wrapped = zip_folder(root, tmp_path / "wrapped.zip")
    with zipfile.ZipFile(wrapped, "a") as zf:
        zf.writestr("README.txt", "a file beside the dataset folder")
    with pytest.raises(ValueError, match="only one class folder \\('tiny-imagenet-200'\\)"):
        prepare(wrapped, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


# -------------------- write_cache


def test_write_cache_round_trip_and_refuses_different_arrays(tmp_path):
    rng = np.random.default_rng(5)
    train = rng.integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
    val = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    splits = {"train": (train, np.arange(10) % 2), "val": (val, np.array([1, 0, 1, 1]))}
    out = write_cache(tmp_path / "syn", splits, ["a", "b"], ["A", "B"], "synthetic", {"generator": "test"})
    cache = load_cache(out)
    np.testing.assert_array_equal(cache.split("train")[0], train)
    assert cache.split("val")[1].tolist() == [1, 0, 1, 1] and cache.split("val")[1].dtype == np.int64
    assert cache.meta["generator"] == "test" and cache.image_size == 8 and cache.num_classes == 2
    assert cache.meta["class_counts"]["train"] == [5, 5]
    np.testing.assert_allclose(cache.mean, (train / 255.0).mean(axis=(0, 1, 2)), atol=1e-12, rtol=0)
    np.testing.assert_allclose(cache.std, (train / 255.0).std(axis=(0, 1, 2)), atol=1e-12, rtol=0)
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert write_cache(tmp_path / "syn", splits, ["a", "b"], ["A", "B"], "synthetic") == out
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    changed = {"train": (255 - train, np.arange(10) % 2)}
    with pytest.raises(ValueError, match="source_digest"):
        write_cache(tmp_path / "syn", changed, ["a", "b"], ["A", "B"], "synthetic")
    with pytest.raises(ValueError, match="uint8"):
        write_cache(tmp_path / "bad", {"train": (train.astype(np.float32), np.zeros(10))}, ["a"], ["A"], "x")
    with pytest.raises(ValueError, match="labels outside"):
        write_cache(tmp_path / "bad", {"train": (train, np.full(10, 2))}, ["a", "b"], ["A", "B"], "x")
    with pytest.raises(ValueError, match="'train' split"):
        write_cache(tmp_path / "bad", {"val": splits["val"]}, ["a", "b"], ["A", "B"], "x")
    assert _leftovers(tmp_path, "bad") == []
    assert not is_cache(tmp_path / "bad") and not is_cache(tmp_path)


def test_load_cache_rejects_incomplete_folders(tmp_path):
    rng = np.random.default_rng(6)
    train = rng.integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    out = write_cache(tmp_path / "c", {"train": (train, np.zeros(3, dtype=np.int64))}, ["a"], ["A"], "x")
    with pytest.raises(ValueError, match="no split 'val'"):
        load_cache(out).split("val")
    meta = json.loads((out / "meta.json").read_text())
    meta["counts"]["train"] = 4
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shape"):
        load_cache(out)
    (out / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"meta\.json"):
        load_cache(out)
    assert not is_cache(out)


# -------------------- damaged caches


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path below ``root`` with its size and modification time (to show nothing was touched)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _small_cache(path: Path) -> Path:
    rng = np.random.default_rng(8)
    splits = {
        "train": (rng.integers(0, 256, size=(6, 4, 4, 3), dtype=np.uint8), np.arange(6) % 2),
        "val": (rng.integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8), np.array([0, 1])),
    }
    return write_cache(path, splits, ["a", "b"], ["A", "B"], "test")


def _tiny_folder(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    """``root/<class>/<i>.png``: ``counts[class]`` small images of each class."""
    rng = np.random.default_rng(9)
    for cls, count in counts.items():
        for i in range(count):
            _save(root / cls / f"{i}.png", Image.fromarray(_noise(rng, size, size)), "PNG")
    return root


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _drop_meta_key(path: Path, key: str) -> None:
    meta = json.loads((path / "meta.json").read_text())
    del meta[key]
    (path / "meta.json").write_text(json.dumps(meta))


DAMAGES = {
    "meta.json missing": (
        lambda c: (c / "meta.json").unlink(),
        CacheFileMissingError,
        "meta.json is missing",
    ),
    "meta.json truncated": (
        lambda c: _truncate(c / "meta.json", 40),
        DamagedCacheError,
        "meta.json is unreadable",
    ),
    "meta.json empty": (
        lambda c: _truncate(c / "meta.json", 0),
        DamagedCacheError,
        "meta.json is unreadable",
    ),
    "meta.json without counts": (
        lambda c: _drop_meta_key(c, "counts"),
        DamagedCacheError,
        "meta.json lacks or garbles counts",
    ),
    "images missing": (
        lambda c: (c / "val_images.npy").unlink(),
        CacheFileMissingError,
        "val_images.npy is missing",
    ),
    "images short": (
        lambda c: _truncate(c / "train_images.npy", 200),
        DamagedCacheError,
        "train_images.npy is truncated or unreadable",
    ),
    "labels empty": (
        lambda c: _truncate(c / "train_labels.npy", 0),
        DamagedCacheError,
        "train_labels.npy is truncated or unreadable",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_a_damaged_cache_is_named_as_such_and_left_alone(tmp_path, monkeypatch, capsys, case):
    monkeypatch.setenv("TINYSWIN_CACHE", str(tmp_path / "caches"))
    cache = _small_cache(tmp_path / "c")
    source = _tiny_folder(tmp_path / "pics", {"ant": 3, "bee": 3})
    damage, error, what = DAMAGES[case]
    damage(cache)
    before = _snapshot(tmp_path)
    assert looks_like_cache(cache) and not is_cache(cache)
    expected = rf"^damaged tinyswin cache {cache}: {what}.*; delete the folder and prepare it again$"
    for attempt in (load_cache, lambda c: resolve_data(str(c), log=print)):
        with pytest.raises(error, match=expected) as info:
            attempt(cache)
        assert isinstance(info.value, TinyswinError) and "\n" not in str(info.value)
    with pytest.raises(DamagedCacheError, match=expected):
        prepare(source, cache, size=8, workers=1, progress=False)
    assert main(["prepare", str(cache), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"damaged tinyswin cache {cache}: {what}" in err
    assert _snapshot(tmp_path) == before


def test_a_partial_leftover_is_a_damaged_cache_and_a_dataset_meta_json_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYSWIN_CACHE", str(tmp_path / "caches"))
    cache = _small_cache(tmp_path / "c")
    leftover = tmp_path / ".c.partial-4242-abcd1234"
    leftover.mkdir()
    (leftover / "train_images.npy").write_bytes((cache / "train_images.npy").read_bytes()[:100])
    before = _snapshot(tmp_path)
    with pytest.raises(
        CacheFileMissingError, match=r"damaged tinyswin cache .*\.c\.partial-4242-abcd1234: meta"
    ):
        resolve_data(str(leftover), log=print)
    assert _snapshot(tmp_path) == before
    with pytest.raises(ValueError, match=r"is a tinyswin cache already, not a dataset to prepare"):
        prepare(cache, tmp_path / "again", progress=False)
    assert resolve_data(str(cache)) == cache
    data = _tiny_folder(tmp_path / "pics", {"ant": 2, "bee": 2})
    (data / "meta.json").write_text('{"license": "CC0"}')
    assert not looks_like_cache(data)
    assert load_cache(resolve_data(str(data), log=lambda _m: None)).meta["counts"] == {"train": 2, "val": 2}


# -------------------- a val split held out where the source has none


def test_a_source_without_val_gets_one_carved_from_train(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TINYSWIN_CACHE", str(tmp_path / "caches"))
    root = _tiny_folder(tmp_path / "bugs", {"ant": 10, "bee": 5, "cicada": 1})
    notes: list[str] = []
    cache = load_cache(resolve_data(str(root), size=8, log=notes.append))
    assert capsys.readouterr().err.startswith("decoding 16 images of bugs")
    assert notes[1] == f"{root} has no val split: holding out 10% of each class as 'val'"
    assert notes[2].endswith("3 classes, 8px; images: train 14, val 2") and len(notes) == 3
    assert cache.splits == ("train", "val")
    assert eval_splits(cache.splits, "val") == ["val"]
    assert cache.meta["val_from_train"] == {"fraction": 0.1, "seed": 0}
    assert cache.meta["class_counts"] == {"train": [9, 4, 1], "val": [1, 1, 0]}  # one image: stays in train
    everything = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    assert sorted(cache.files("train") + cache.files("val")) == everything
    again = load_cache(prepare(root, tmp_path / "again", size=8, workers=2, progress=False))
    assert again.files("val") == cache.files("val")
    held = load_cache(prepare(root, tmp_path / "held", size=8, holdout=0.25, seed=3, progress=False))
    assert held.splits == ("train", "holdout", "val")
    assert held.files("val") == cache.files("val")  # val first, then holdout from what is left of train
    assert held.meta["class_counts"] == {"train": [7, 3, 1], "holdout": [2, 1, 0], "val": [1, 1, 0]}
    assert not set(held.files("holdout")) & set(cache.files("val"))
    assert capsys.readouterr() == ("", "")
    flat = load_cache(prepare(root / ".." / "bugs", tmp_path / "loud", size=8, workers=1))
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{root / '..' / 'bugs'} has no val split: holding out 10% of each class as 'val'"
    assert flat.files("val") == cache.files("val")


def test_train_only_layouts_get_val_and_sources_with_val_keep_theirs(ti_folder, tmp_path):
    rng = np.random.default_rng(10)
    for split, count in (("train", 4), ("test", 1)):
        for cls in ("rose", "tulip"):
            for i in range(count):
                _save(tmp_path / "f" / split / cls / f"{i}.png", Image.fromarray(_noise(rng, 8, 8)), "PNG")
    cache = load_cache(prepare(tmp_path / "f", tmp_path / "c", size=8, progress=False))
    assert cache.splits == ("train", "val", "test")
    assert cache.meta["class_counts"] == {"train": [3, 3], "val": [1, 1], "test": [1, 1]}
    assert all(f.startswith("train/") for f in cache.files("val"))
    root, _ = ti_folder
    ti = load_cache(prepare(root, tmp_path / "ti", workers=1, progress=False))
    assert ti.meta["val_from_train"] is None and ti.meta["counts"] == {"train": 3 * PER_CLASS, "val": 7}
    single = _tiny_folder(tmp_path / "single", {"ant": 1, "bee": 1})
    notes: list[str] = []
    lone = load_cache(prepare(single, tmp_path / "lone", size=8, progress=False, log=notes.append))
    assert lone.splits == ("train",) and lone.meta["val_from_train"] is None
    assert notes == [f"{single} has no val split, and no class has two images to hold one out as 'val'"]


def test_a_cache_prepared_before_val_was_carved_asks_to_be_deleted(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYSWIN_CACHE", str(tmp_path / "caches"))
    root = _tiny_folder(tmp_path / "bugs", {"ant": 3, "bee": 3})
    out = resolve_data(str(root), size=8, log=lambda _m: None)
    meta = json.loads((out / "meta.json").read_text())
    del meta["val_from_train"]
    (out / "meta.json").write_text(json.dumps(meta))
    before = _snapshot(tmp_path)
    message = (
        rf"^the cache {out} prepared earlier from {root} no longer matches it \(val_from_train: .*\); delete"
    )
    with pytest.raises(CacheMismatchError, match=message):
        resolve_data(str(root), size=8, log=lambda _m: None)
    assert _snapshot(tmp_path) == before


# -------------------- progress


def _many(root: Path) -> Path:
    return _tiny_folder(root, {f"c{k}": 40 for k in range(5)})


def test_quiet_prepare_prints_nothing(tmp_path, capfd):
    prepare(_many(tmp_path / "many"), tmp_path / "c", size=8, workers=2, progress=False)
    assert capfd.readouterr() == ("", "")


def test_progress_off_a_terminal_is_a_line_not_a_bar(tmp_path, capfd, monkeypatch):
    root = _many(tmp_path / "many")
    prepare(root, tmp_path / "c", size=8, workers=2, progress=True)
    out, err = capfd.readouterr()
    assert "\r" not in err and len(err.splitlines()) <= 2
    assert err.splitlines() == ["decoding 200 images of many (2 processes)"]
    assert out.splitlines()[-1] == f"{tmp_path / 'c'}: 5 classes, 8px; images: train 180, val 20"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    prepare(root, tmp_path / "d", size=8, workers=1, progress=True)
    assert "decoding many" in terminal.getvalue() and "200/200" in terminal.getvalue()


# -------------------- bad input on the data side: one line each


def test_out_that_is_a_file_or_under_one_is_refused(tmp_path, capsys):
    root = _tiny_folder(tmp_path / "pics", {"ant": 2, "bee": 2})
    (tmp_path / "taken").write_text("mine")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"--out .*taken is a file, not a folder; choose another --out"):
        prepare(root, tmp_path / "taken", size=8, progress=False)
    with pytest.raises(
        ValueError, match=r"cannot create the cache folder .*taken/c: .*taken is a file; choose another --out"
    ):
        prepare(root, tmp_path / "taken" / "c", size=8, progress=False)
    assert main(["prepare", str(root), "--out", str(tmp_path / "taken"), "--quiet"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert _snapshot(tmp_path) == before


def test_unreadable_sources_and_a_damaged_zip_member_are_one_line(ti_folder, tmp_path, monkeypatch):
    root, _ = ti_folder
    stored = tmp_path / "stored.zip"
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                zf.write(path, f"tiny-imagenet-200/{path.relative_to(root).as_posix()}")
    data = stored.read_bytes()
    assert data.count(b"n03000003\nn01000001") == 1
    stored.write_bytes(data.replace(b"n03000003\nn01000001", b"n03000004\nn01000001"))
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"cannot read .*stored\.zip:tiny-imagenet-200/wnids\.txt \(Bad CRC"):
        prepare(stored, tmp_path / "out", progress=False)

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "listdir", denied)
    with pytest.raises(ValueError, match=rf"cannot read the source {root} \(Permission denied\)"):
        prepare(root, tmp_path / "out", progress=False)
    assert _snapshot(tmp_path) == before


def test_too_little_disk_space_is_refused_before_decoding(tmp_path, monkeypatch):
    root = _tiny_folder(tmp_path / "pics", {"ant": 2, "bee": 2})
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: types.SimpleNamespace(free=100))
    before = _snapshot(tmp_path)
    with pytest.raises(DiskFullError, match=r"not enough space for the cache .*out: 4 images of 8px need"):
        prepare(root, tmp_path / "out", size=8, progress=False)
    assert _snapshot(tmp_path) == before


# -------------------- CLI, interruption


def test_cli_prepare_and_its_errors(ti_folder, tmp_path, capsys):
    root, _ = ti_folder
    assert main(["prepare", str(root), "--out", str(tmp_path / "c"), "--quiet", "--workers", "1"]) == 0
    assert "cache ready at" in capsys.readouterr().out
    assert load_cache(tmp_path / "c").meta["counts"] == {"train": 3 * PER_CLASS, "val": 7}
    (root / "wnids.txt").unlink()
    assert main(["prepare", str(root), "--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert "wnids.txt" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_interrupted_prepare_leaves_no_cache_and_a_rerun_works(tmp_path):
    rng = np.random.default_rng(7)
    root = tmp_path / "many"
    tile = _noise(rng, 96, 96)
    for i in range(3000):
        folder = root / f"class{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(_jpeg(np.roll(tile, i, axis=1)))
    out = tmp_path / "caches" / "many"
    command = [sys.executable, "-m", "tinyswin", "prepare", str(root), "--out", str(out), "--size", "48"]
    proc = subprocess.Popen(
        [*command, "--workers", "2", "--quiet"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(out.parent.glob(".many.partial-*")) and proc.poll() is None:
            assert time.monotonic() < deadline, "prepare did not start decoding within 60 s"
            time.sleep(0.01)
        time.sleep(0.1)
        assert proc.poll() is None, "prepare finished before it could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = list(out.parent.iterdir())
    assert leftovers and all(not is_cache(p) for p in leftovers)
    cache = load_cache(prepare(root, out, size=48, workers=2, progress=False))
    assert cache.meta["counts"] == {"train": 2700, "val": 300}
    assert list(out.parent.iterdir()) == [out]


# -------------------- shared subset


@pytest.mark.slow
def test_shared_subset_counts_and_exact_pixels(shared_zip, tmp_path):
    cache = load_cache(prepare(shared_zip, tmp_path / "ti", progress=False))
    assert cache.meta["counts"] == {"train": 50_000, "val": 2_000}
    assert cache.num_classes == 200 and cache.image_size == 64
    assert cache.class_ids == sorted(cache.class_ids)
    assert cache.meta["class_counts"]["train"] == [250] * 200
    assert cache.meta["class_counts"]["val"] == [10] * 200
    rng = random.Random(0)
    with zipfile.ZipFile(shared_zip) as zf:
        annotations = zf.read("tiny-imagenet-200/val/val_annotations.txt").decode().splitlines()
        val_truth = {line.split("\t")[0]: line.split("\t")[1] for line in annotations}
        for split, count in (("train", 14), ("val", 6)):
            images, labels = cache.split(split)
            files = cache.files(split)
            for row in rng.sample(range(len(files)), count):
                with Image.open(io.BytesIO(zf.read("tiny-imagenet-200/" + files[row]))) as im:
                    np.testing.assert_array_equal(images[row], np.asarray(im.convert("RGB")))
                name = Path(files[row]).name
                wnid = val_truth[name] if split == "val" else name.split("_")[0]
                assert cache.class_ids[labels[row]] == wnid
