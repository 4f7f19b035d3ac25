"""CIFAR-10 and CIFAR-100 read in place from tarballs in the official python-version format."""

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinyswin.cli import main
from tinyswin.data import load_cache, prepare, prepare_source

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _rows(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 32, 32, 3) -> the official rows (N, 3072): the red plane, then green, then blue."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def _add(tar: tarfile.TarFile, name: str, obj: object) -> None:
    data = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_cifar_tarball(
    path: Path,
    kind: str = "cifar10",
    per_batch: int = 4,
    n_test: int = 6,
    seed: int = 0,
    str_keys: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Write a small tarball in the official format; returns per split (images HWC, labels, class names).

    cifar10: five data batches and a test batch of dicts with b"data", b"labels"; batches.meta with
    b"label_names". cifar100: train and test with b"fine_labels" and b"coarse_labels"; meta with
    b"fine_label_names". ``str_keys`` writes str keys and names (as Python 2's pickles read back).
    """
    rng = np.random.default_rng(seed)
    names = CIFAR10_NAMES if kind == "cifar10" else [f"class_{i:03d}" for i in range(100)]
    key = (lambda k: k) if str_keys else (lambda k: k.encode())
    folder = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    train_members = [f"data_batch_{i}" for i in range(1, 6)] if kind == "cifar10" else ["train"]
    test_member = "test_batch" if kind == "cifar10" else "test"
    labels_key = "labels" if kind == "cifar10" else "fine_labels"
    expected: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {"train": ([], []), "val": ([], [])}
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(folder)
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        members = [(m, "train", per_batch * (5 if kind == "cifar100" else 1)) for m in train_members]
        for member, split, n in [*members, (test_member, "val", n_test)]:
            images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
            labels = rng.integers(0, len(names), size=n).tolist()
            batch = {key("data"): _rows(images), key(labels_key): labels, key("batch_label"): key(member)}
            if kind == "cifar100":
                batch[key("coarse_labels")] = [label // 5 for label in labels]
            _add(tar, f"{folder}/{member}", batch)
            expected[split][0].append(images)
            expected[split][1].append(np.asarray(labels, dtype=np.int64))
        meta_name = "batches.meta" if kind == "cifar10" else "meta"
        names_key = "label_names" if kind == "cifar10" else "fine_label_names"
        _add(tar, f"{folder}/{meta_name}", {key(names_key): [key(n) for n in names]})
    return {s: (np.concatenate(ims), np.concatenate(labs), names) for s, (ims, labs) in expected.items()}


def test_cifar10_tarball_round_trips_pixels_and_labels_into_the_cache(tmp_path: Path) -> None:
    tarball = tmp_path / "cifar-10-python.tar.gz"
    expected = make_cifar_tarball(tarball, "cifar10", per_batch=4, n_test=6)
    cache = load_cache(prepare(tarball, tmp_path / "cache", size=32, progress=False))
    assert cache.splits == ("train", "val")
    assert cache.class_ids == CIFAR10_NAMES and cache.class_names == CIFAR10_NAMES
    for split in ("train", "val"):
        images, labels = cache.split(split)
        assert np.array_equal(images, expected[split][0])  # pixel for pixel, HWC, batch after batch
        assert np.array_equal(labels, expected[split][1])
    assert cache.files("train")[:5] == [f"data_batch_1#{i}" for i in range(4)] + ["data_batch_2#0"]
    assert cache.files("val") == [f"test_batch#{i}" for i in range(6)]
    assert cache.meta["source_kind"] == "cifar10-tar" and cache.meta["val_from_train"] is None
    mean = expected["train"][0].reshape(-1, 3).mean(axis=0) / 255.0
    assert np.allclose(cache.mean, mean, atol=1e-12)


def test_cifar100_fine_labels_str_keys_and_resizing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = tmp_path / "cifar-100-python.tar.gz"
    expected = make_cifar_tarball(tarball, "cifar100", per_batch=3, n_test=4, seed=1, str_keys=True)
    out = tmp_path / "cache"
    cache = load_cache(prepare(tarball, out, size=48, progress=False))
    assert cache.class_ids == expected["train"][2] and cache.num_classes == 100
    images, labels = cache.split("train")
    assert images.shape == (15, 48, 48, 3) and np.array_equal(labels, expected["train"][1])
    resized = [
        np.asarray(Image.fromarray(im).resize((48, 48), Image.Resampling.BICUBIC))
        for im in expected["train"][0]
    ]
    assert np.array_equal(images, np.stack(resized))
    assert np.array_equal(cache.split("val")[1], expected["val"][1])
    stamp = (out / "meta.json").stat().st_mtime_ns
    notes: list[str] = []

    def unread(path: Path) -> None:
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(prepare_source, "read_cifar", unread)  # the check reads the tarball's bytes only
    assert prepare(tarball, out, size=48, log=notes.append) == out  # the same tarball: nothing rewritten
    assert (out / "meta.json").stat().st_mtime_ns == stamp and "already made" in notes[0]
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    assert load_cache(out).meta["source_digest"] == f"sha256:{digest}"


def test_holdout_is_carved_from_cifar_train(tmp_path: Path) -> None:
    tarball = tmp_path / "cifar-10-python.tar.gz"
    expected = make_cifar_tarball(tarball, "cifar10", per_batch=20, n_test=2, seed=2)
    cache = load_cache(prepare(tarball, tmp_path / "cache", size=32, holdout=0.2, seed=3, progress=False))
    counts = cache.meta["counts"]
    assert counts["train"] + counts["holdout"] == 100 and counts["val"] == 2
    index = {f"data_batch_{b}#{r}": (b - 1) * 20 + r for b in range(1, 6) for r in range(20)}
    for split in ("train", "holdout"):
        rows = [index[name] for name in cache.files(split)]
        images, labels = cache.split(split)
        assert np.array_equal(images, expected["train"][0][rows])
        assert np.array_equal(labels, expected["train"][1][rows])


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    tarball = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_tarball(tarball, "cifar10", per_batch=2, n_test=2)
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(tarball) as src, tarfile.open(evil, "w:gz") as dst:
        for member in src:
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("data_batch_3"):
                data = pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2)
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    with pytest.raises(ValueError, match=r"data_batch_3 is not a CIFAR batch .*holds no \w+\.system"):
        prepare(evil, tmp_path / "cache", size=32, progress=False)
    assert not marker.exists() and not (tmp_path / "cache").exists()


def test_bad_tarballs_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tarball = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_tarball(tarball, "cifar10", per_batch=30, n_test=2)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
    other = tmp_path / "other.tar"
    with tarfile.open(other, "w") as tar:
        tar.add(truncated, arcname="photos/a.bin")
    for source, words in (
        (truncated, "cannot read the tarball"),
        (other, "not an official CIFAR-10 or CIFAR-100"),
    ):
        assert main(["prepare", str(source), "--out", str(tmp_path / "cache"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and str(source) in err
    assert not (tmp_path / "cache").exists()
