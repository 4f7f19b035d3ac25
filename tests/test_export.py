"""`tinyswin export`: safetensors folders, ONNX files and timm folders, checked against the PyTorch model."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tinyswin
from exportkit import KEEP, MEAN, STD, Exports, build_exports, random_model, tiny_checkpoint, tiny_config
from tinyswin import export as export_mod
from tinyswin import extras
from tinyswin.cli import main
from tinyswin.data import write_cache
from tinyswin.data.synthetic import CLASS_NAMES, synthetic_splits
from tinyswin.evaluate import LoadedModel
from tinyswin.exported import read_info
from tinyswin.interop import to_timm
from tinyswin.version import __version__

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return build_exports(tmp_path_factory)


def _logits(model: torch.nn.Module, batch: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x)


def test_safetensors_folder_holds_the_same_model(exports: Exports) -> None:
    assert sorted(p.name for p in exports.safetensors.iterdir()) == ["config.json", "model.safetensors"]
    loaded = LoadedModel(exports.checkpoint, device="cpu")
    model = tinyswin.load_pretrained(exports.safetensors)
    x, expected = _logits(loaded.model, 3)
    with torch.no_grad():
        got = model(x)
    assert expected.std(0).min() > 1e-3  # the logits differ between images: a real comparison
    assert torch.equal(got, expected)
    info = read_info(exports.safetensors)
    assert info.class_names == [CLASS_NAMES[k] for k in KEEP] and info.class_ids == [f"c{k}" for k in KEEP]
    assert (info.mean, info.std, info.image_size, info.input_size) == (MEAN, STD, 28, (32, 32))
    assert info.tinyswin_version == __version__ and info.swin_config() == tiny_config()
    config = json.loads((exports.safetensors / "config.json").read_text())
    assert config["train_config"]["data"]["source"] is None  # no path of the training machine
    assert config["label_names"] == info.class_ids


def test_ema_export_holds_the_ema_weights(exports: Exports, tmp_path: Path) -> None:
    out = tmp_path / "ema"
    assert (
        main(["export", str(exports.checkpoint), "--format", "safetensors", "--ema", "--out", str(out)]) == 0
    )
    raw = LoadedModel(exports.checkpoint, device="cpu").model.state_dict()
    ema = tinyswin.load_pretrained(out).state_dict()
    assert all(torch.equal(ema[k], raw[k] * 0.5) for k in raw)


def test_eval_of_an_exported_folder_needs_data_and_matches_the_checkpoint(
    exports: Exports, tmp_path: Path, capsys
) -> None:
    splits = synthetic_splits(size=32, train_per_class=1, val_per_class=4, seed=2)
    cache_splits = {}
    for name, (images, labels) in splits.items():
        mask = np.isin(labels, KEEP)
        cache_splits[name] = (images[mask], np.searchsorted(KEEP, labels[mask]).astype(np.int64))
    cache = write_cache(
        tmp_path / "cache", cache_splits, [f"c{k}" for k in KEEP], [CLASS_NAMES[k] for k in KEEP], "test"
    )
    capsys.readouterr()
    assert main(["eval", str(exports.safetensors)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data" in err[0]
    results = []
    for model in (exports.checkpoint, exports.safetensors):
        assert main(["eval", str(model), "--data", str(cache), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["n"] == results[1]["n"] == 16
    assert results[0]["loss"] == results[1]["loss"] and results[0]["top1"] == results[1]["top1"]


def test_onnx_logits_match_pytorch_at_two_batch_sizes(exports: Exports) -> None:
    model = LoadedModel(exports.checkpoint, device="cpu").model
    session = export_mod.ort_session(exports.onnx)
    assert session.get_inputs()[0].shape[0] == "batch"  # a dynamic batch dimension
    for batch in (1, 7):
        x, expected = _logits(model, batch, seed=batch)
        got = export_mod.ort_logits(session, x.numpy())
        assert got.shape == (batch, 4)
        assert np.abs(got - expected.numpy()).max() <= 1e-4


def test_onnx_metadata_alone_describes_the_model(exports: Exports) -> None:
    onnx = pytest.importorskip("onnx")
    for path in (exports.onnx, exports.int8):
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        info = export_mod.info_from_onnx_metadata(meta, str(path))
        assert info.to_json() | {"train_config": None} == read_info(exports.safetensors).to_json() | {
            "train_config": None
        }
    ops = {node.op_type for node in onnx.load(str(exports.int8)).graph.node}
    assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops  # int8 weights, quantized on the fly


def test_onnx_export_that_fails_its_check_leaves_nothing(
    exports: Exports, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    other = tiny_checkpoint(tmp_path / "other.pt", seed=1)  # same geometry, other weights
    stale = exports.onnx.read_bytes()  # the export of another model stands in for a faulty exporter
    monkeypatch.setattr(export_mod, "onnx_bytes", lambda model, info: stale)
    out = tmp_path / "out.onnx"
    capsys.readouterr()
    assert main(["export", str(other), "--format", "onnx", "--out", str(out), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ from PyTorch's" in err[0] and "> 0.0001" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt"]


def test_timm_folder_rebuilds_the_network_in_timm(exports: Exports) -> None:
    timm = pytest.importorskip("timm")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    config = json.loads((exports.timm / "config.json").read_text())
    reference = timm.create_model(config["architecture"], **config["model_args"]).eval()
    reference.load_state_dict(safetensors_torch.load_file(str(exports.timm / "model.safetensors")))
    model = LoadedModel(exports.checkpoint, device="cpu").model
    x, expected = _logits(model, 3)
    with torch.no_grad():
        got = reference(x)
    assert expected.std(0).min() > 1e-3
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert config["pretrained_cfg"]["mean"] == list(MEAN) and config["label_names"] == [f"c{k}" for k in KEEP]


def test_to_timm_shift_rule_and_clamped_windows_match_timm() -> None:
    timm = pytest.importorskip("timm")
    # the notebook's shift rule, and windows larger than the later maps (clamped, as tinyswin clamps them)
    model = random_model(tiny_config(window_size=(8, 8), shift_full_window=True, depths=(2, 2)), seed=3)
    state, kwargs = to_timm(model)
    reference = timm.create_model(**json.loads(json.dumps(kwargs))).eval()
    reference.load_state_dict(state)
    x, expected = _logits(model, 2)
    with torch.no_grad():
        got = reference(x)
    assert kwargs["window_size"] == [[8, 8], [4, 4]] and kwargs["always_partition"] is True
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_a_config_timm_cannot_express_is_one_line(tmp_path: Path, capsys) -> None:
    ckpt = tiny_checkpoint(tmp_path / "best.pt", patch_norm=False)
    out = tmp_path / "timm"
    capsys.readouterr()
    assert main(["export", str(ckpt), "--format", "timm", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot express" in err[0] and "patch_norm" in err[0]
    assert not out.exists()
    with pytest.raises(ValueError, match="do not tile"):  # a map the windows do not tile: padded differently
        to_timm(random_model(tiny_config(img_size=48, window_size=(4, 4), depths=(1, 1)), seed=0))


def test_a_missing_extra_is_one_line(exports: Exports, tmp_path: Path, monkeypatch, capsys) -> None:
    real = importlib.import_module

    def without_onnxruntime(name: str, *args: object) -> object:
        if name.split(".")[0] == "onnxruntime":
            raise ModuleNotFoundError(f"No module named {name!r}", name="onnxruntime")
        return real(name, *args)

    monkeypatch.setattr(extras.importlib, "import_module", without_onnxruntime)
    capsys.readouterr()
    out = tmp_path / "m.onnx"
    assert main(["export", str(exports.checkpoint), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "tinyswin export: error: ONNX export needs onnxruntime, which is not installed: "
        "pip install 'tinyswin[export]'"
    ]
    assert not out.exists()


def test_export_refuses_to_replace_what_is_not_an_export(exports: Exports, tmp_path: Path, capsys) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    capsys.readouterr()
    args = ["export", str(exports.checkpoint), "--format", "safetensors", "--out", str(tmp_path / "notes")]
    assert main(args) == 2
    assert "is not an export folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["keep.txt"]
    assert main([*args[:-1], str(exports.safetensors)]) == 0  # a previous export is replaced
    assert sorted(p.name for p in exports.safetensors.parent.iterdir() if p.name.startswith(".")) == []
