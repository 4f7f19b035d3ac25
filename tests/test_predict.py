"""`tinyswin predict` through each format (checkpoint, safetensors folder, ONNX, timm folder), on files and
folders."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from exportkit import IMAGE_SIZE, Exports, build_exports, write_images
from tinyswin import extras
from tinyswin.cli import main
from tinyswin.evaluate import LoadedModel
from tinyswin.export import model_info
from tinyswin.predict import image_files, load_images, predict, preprocess

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return build_exports(tmp_path_factory)


def test_preprocess_is_the_runs_evaluation_transform(exports: Exports, tmp_path: Path) -> None:
    loaded = LoadedModel(exports.checkpoint, device="cpu")
    pixels = load_images(write_images(tmp_path, 3), IMAGE_SIZE)  # (3, 28, 28, 3): resized to the 32px input
    got = preprocess(pixels, model_info(loaded))
    assert got.shape == (3, 3, 32, 32)
    assert torch.equal(got, loaded.normalize(torch.from_numpy(pixels)))


def test_each_format_names_the_same_class_with_the_same_probability(
    exports: Exports, tmp_path: Path, capsys
) -> None:
    files = write_images(tmp_path / "images", 4)
    runs = {}
    for name, args in {
        "checkpoint": [str(exports.checkpoint)],
        "safetensors": [str(exports.safetensors)],
        "onnx": ["--onnx", str(exports.onnx)],
        "timm": [str(exports.timm)],  # through timm's own model
    }.items():
        capsys.readouterr()
        assert main(["predict", *args, *map(str, files), "--topk", "2", "--json"]) == 0
        runs[name] = json.loads(capsys.readouterr().out)
    reference = runs.pop("checkpoint")
    assert [r["image"] for r in reference] == list(map(str, files))
    top = [r["predictions"][0]["probability"] for r in reference]
    assert max(top) > 0.4 and len({r["predictions"][0]["class"] for r in reference}) > 1  # a real check
    for name, results in runs.items():
        for ours, theirs in zip(results, reference, strict=True):
            assert [p["class"] for p in ours["predictions"]] == [p["class"] for p in theirs["predictions"]], (
                name
            )
            for p, q in zip(ours["predictions"], theirs["predictions"], strict=True):
                assert abs(p["probability"] - q["probability"]) <= 1e-4, name
    # the Python API gives what the command prints
    assert predict(exports.safetensors, files, topk=2) == runs["safetensors"]


def test_a_folder_is_its_images_and_one_bad_file_is_one_line(
    exports: Exports, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "photos"
    files = write_images(folder, 3)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "readme.txt").write_text("not an image")  # not an image name: not even tried
    capsys.readouterr()
    assert (
        main(["predict", "--onnx", str(exports.onnx), str(folder), str(tmp_path / "gone.jpg"), "--json"]) == 1
    )
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("tinyswin predict: image not found: ") and lines[0].endswith("gone.jpg")
    assert lines[1].startswith(f"tinyswin predict: {folder / 'broken.png'}: not a readable image")
    results = json.loads(out)
    assert [r["image"] for r in results] == list(map(str, files))  # sorted, the bad one left out
    one_by_one = [predict(exports.onnx, [f], topk=5)[0] for f in files]
    for ours, alone in zip(results, one_by_one, strict=True):  # in a batch or alone: the same answer
        assert [p["class"] for p in ours["predictions"]] == [p["class"] for p in alone["predictions"]]
        pairs = zip(ours["predictions"], alone["predictions"], strict=True)
        assert max(abs(p["probability"] - q["probability"]) for p, q in pairs) <= 1e-5
    assert image_files([folder]) == sorted([*files, folder / "broken.png"])
    with pytest.raises(ValueError, match=r"broken\.png: not a readable image"):
        predict(exports.checkpoint, [folder])  # the Python API raises unless given on_error


def test_int8_onnx_agrees_with_float32_on_the_top_class(exports: Exports, tmp_path: Path) -> None:
    files = write_images(tmp_path, 6, seed=4)
    fp32 = predict(exports.onnx, files, topk=1)
    int8 = predict(exports.int8, files, topk=1)
    probs = np.array([r["predictions"][0]["probability"] for r in fp32])
    assert probs.max() - probs.min() > 0.05  # the images get different answers
    agree = [
        a["predictions"][0]["class"] == b["predictions"][0]["class"] for a, b in zip(fp32, int8, strict=True)
    ]
    assert sum(agree) >= 5


def test_predict_onnx_without_onnxruntime_is_one_line(exports: Exports, tmp_path: Path, monkeypatch, capsys):
    real = importlib.import_module

    def without_onnxruntime(name: str, *args: object) -> object:
        if name.split(".")[0] == "onnxruntime":
            raise ModuleNotFoundError(f"No module named {name!r}", name="onnxruntime")
        return real(name, *args)

    monkeypatch.setattr(extras.importlib, "import_module", without_onnxruntime)
    files = write_images(tmp_path, 1)
    capsys.readouterr()
    assert main(["predict", "--onnx", str(exports.onnx), str(files[0])]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "tinyswin predict: error: ONNX Runtime inference needs onnxruntime, which is not installed: "
        "pip install 'tinyswin[export]'"
    ]
