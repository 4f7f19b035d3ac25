"""`tinyswin eval --onnx`: an ONNX file and its int8 copy measured on a dataset through ONNX Runtime, with the
preprocessing of the run's evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exportkit import KEEP, Exports, build_exports
from tinyswin.cli import main
from tinyswin.data import write_cache
from tinyswin.data.synthetic import CLASS_NAMES, synthetic_splits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return build_exports(tmp_path_factory)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model's 4 classes, 28px images (the model's input is 32px: evaluation resizes them)."""
    splits = synthetic_splits(size=28, train_per_class=1, val_per_class=12, seed=4)
    kept = {}
    for name, (images, labels) in splits.items():
        mask = np.isin(labels, KEEP)
        kept[name] = (images[mask], np.searchsorted(KEEP, labels[mask]).astype(np.int64))
    return write_cache(
        tmp_path_factory.mktemp("onnx-eval") / "cache", kept, [f"c{k}" for k in KEEP],
        [CLASS_NAMES[k] for k in KEEP], "test",
    )  # fmt: skip


def _eval(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_onnx_and_int8_are_measured_on_the_dataset_like_the_checkpoint(
    exports: Exports, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytorch = _eval(capsys, str(exports.checkpoint), "--data", str(cache))
    onnx = _eval(capsys, "--onnx", str(exports.onnx), "--data", str(cache))
    int8 = _eval(capsys, "--onnx", str(exports.int8), "--data", str(cache))
    assert pytorch["n"] == onnx["n"] == int8["n"] == 48
    assert 0.0 < pytorch["top1"] < 1.0  # a real comparison: some images right, some wrong
    assert onnx["runtime"] == "onnxruntime"
    # float32 ONNX: the same logits within 1e-4, so the same predictions and the same loss to ~1e-5
    assert onnx["top1"] == pytorch["top1"] and onnx["top5"] == pytorch["top5"]
    assert onnx["loss"] == pytest.approx(pytorch["loss"], abs=1e-4)
    assert onnx["ece"] == pytest.approx(pytorch["ece"], abs=1e-4)
    # int8: its own logits (a loss of its own), its accuracy measured on the same 48 images
    assert int8["loss"] != onnx["loss"]
    assert abs(int8["top1"] - onnx["top1"]) <= 0.25


def test_onnx_with_the_test_time_flip_reports_both(
    exports: Exports, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytorch = _eval(capsys, str(exports.checkpoint), "--data", str(cache), "--tta", "flip")
    onnx = _eval(capsys, "--onnx", str(exports.onnx), "--data", str(cache), "--tta", "flip")
    assert onnx["tta"] == "flip" and onnx["top1"] == pytorch["top1"]
    assert onnx["top1_no_tta"] == pytorch["top1_no_tta"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--onnx", "{onnx}"], "--data"),
        (["{checkpoint}", "--onnx", "{onnx}", "--data", "{cache}"], "not both"),
        (["--onnx", "{onnx}", "--data", "{cache}", "--ema"], "--ema"),
        (["--onnx", "{missing}", "--data", "{cache}"], "not found"),
        ([], "no model given"),
    ],
)
def test_bad_onnx_eval_input_is_one_line(
    exports: Exports,
    cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    words: str,
) -> None:
    names = {
        "onnx": exports.onnx,
        "checkpoint": exports.checkpoint,
        "cache": cache,
        "missing": tmp_path / "x.onnx",
    }
    capsys.readouterr()
    assert main(["eval", *(a.format(**names) for a in args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tinyswin eval: error: ") and words in err[0], err


def test_a_dataset_of_other_classes_is_refused(
    exports: Exports, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, labels = synthetic_splits(size=28, train_per_class=1, val_per_class=2, seed=4)["val"]
    other = write_cache(
        tmp_path / "other", {"train": (images, labels), "val": (images, labels)},
        [f"c{k}" for k in range(10)], list(CLASS_NAMES), "test",
    )  # fmt: skip
    capsys.readouterr()
    assert main(["eval", "--onnx", str(exports.onnx), "--data", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "10 classes are not those of" in err and "\n" not in err
