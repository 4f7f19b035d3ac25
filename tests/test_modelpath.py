"""What a model path is (`tinyswin.modelpath`): told from names alone, and read the same way by every
command: a checkpoint, its run, its export and the export's model.safetensors give the same weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from exportkit import Exports, build_exports, write_images
from tinyswin.checkpoint import load_checkpoint
from tinyswin.cli import main
from tinyswin.interop import tinyswin_names
from tinyswin.modelpath import Kind, identify, read_checkpoint, read_weights

pytest.importorskip("onnxruntime")
pytest.importorskip("timm")


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return build_exports(tmp_path_factory)


def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_path_is_told_from_its_names(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _touch(run / "last.pt")
    assert identify(run) == identify(str(run))
    assert (identify(run).kind, identify(run).path) == (Kind.RUN, run / "last.pt")
    _touch(run / "best.pt")
    assert identify(run).path == run / "best.pt"  # best.pt first
    export = tmp_path / "export"
    _touch(export / "config.json", json.dumps({"library": "tinyswin"}))
    _touch(export / "model.safetensors")
    assert (identify(export).kind, identify(export).path) == (Kind.EXPORT, export)
    inner = identify(export / "model.safetensors")  # an export's weights file stands for its folder
    assert (inner.kind, inner.path, inner.given) == (Kind.EXPORT, export, export / "model.safetensors")
    hub = tmp_path / "hub"
    _touch(hub / "config.json", json.dumps({"architecture": "swin_tiny_patch4_window7_224"}))
    _touch(hub / "model.safetensors")
    assert identify(hub).kind is Kind.TIMM
    assert identify(hub / "model.safetensors").kind is Kind.SAFETENSORS
    assert identify(tmp_path / "empty").kind is Kind.CHECKPOINT  # missing: the kind its name says
    (tmp_path / "empty").mkdir()
    assert identify(tmp_path / "empty").kind is Kind.FOLDER
    assert identify(tmp_path / "m.int8.onnx").kind is Kind.ONNX
    assert identify(tmp_path / "w.pth").kind is Kind.CHECKPOINT
    assert identify(tmp_path / "w.safetensors").kind is Kind.SAFETENSORS


def test_every_path_of_one_model_reads_the_same_weights(exports: Exports) -> None:
    ckpt = load_checkpoint(exports.checkpoint)
    expected = {k: v for k, v in ckpt["model"].items() if not k.startswith("head.")}
    run = exports.checkpoint.parent  # holds best.pt beside the exports
    assert identify(run).kind is Kind.RUN
    for path in (exports.checkpoint, run, exports.safetensors, exports.safetensors / "model.safetensors"):
        found, read = read_checkpoint(path)
        assert found.path == (exports.safetensors if found.kind is Kind.EXPORT else exports.checkpoint)
        assert read["class_names"] == ckpt["class_names"]
        for name, value in ckpt["model"].items():
            assert torch.equal(read["model"][name], value), (path, name)
    paths = (
        exports.checkpoint,
        run,
        exports.safetensors,
        exports.safetensors / "model.safetensors",
        exports.timm,
    )
    for path in paths:
        state, shift_full_window = read_weights(path)
        renamed = {k: v for k, v in tinyswin_names(state).items() if not k.startswith("head.")}
        assert renamed.keys() == expected.keys(), path
        assert all(torch.equal(renamed[k], expected[k]) for k in expected), path
        assert shift_full_window is False


def test_a_path_of_the_wrong_kind_is_refused_in_one_line(
    exports: Exports, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "--onnx", str(exports.checkpoint), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"tinyswin eval: error: --onnx {exports.checkpoint}: not an .onnx file (a checkpoint or state dict "
        "file); name it without --onnx"
    ]
    hub = tmp_path / "hub"  # a timm folder without the model info that `tinyswin export` writes
    shutil.copytree(exports.timm, hub)
    config = json.loads((hub / "config.json").read_text())
    del config["tinyswin"]
    (hub / "config.json").write_text(json.dumps(config))
    image = write_images(tmp_path / "images", 1)[0]
    assert main(["predict", str(hub), str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tinyswin predict: error: {hub / 'config.json'}: holds no")
    assert main(["eval", str(hub), "--data", str(tmp_path)]) == 2
    assert "holds no best.pt or last.pt" in capsys.readouterr().err
