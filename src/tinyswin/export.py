"""`tinyswin export`: a trained model to a safetensors folder, an ONNX file, or a timm model folder.

Each export is checked before it is put in place (ONNX and timm: their logits against the PyTorch model's)
and written atomically: a failed export leaves nothing at its destination.

- safetensors: `model.safetensors` + `config.json` (`tinyswin.exported`), read by `load_pretrained`,
  `predict` and `eval`; a folder that can be pushed to a model hub as it is.
- onnx: one `.onnx` file (dynamo exporter, dynamic batch) whose metadata holds what inference needs;
  optionally an int8 copy (ONNX Runtime's dynamic quantization) beside it.
- timm: `model.safetensors` + `config.json` in timm's hub layout (`architecture`, `model_args`,
  `pretrained_cfg`): `timm.create_model(cfg["architecture"], **cfg["model_args"])` rebuilds the network,
  and `timm.create_model("local-dir:FOLDER", pretrained=True)` loads it where timm reads local folders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tinyswin.checkpoint import TEMP_MARKER, atomic_write
from tinyswin.config import to_dict
from tinyswin.errors import TinyswinError
from tinyswin.evaluate import LoadedModel
from tinyswin.exported import CONFIG_FILE, TIMM_INFO_KEY, WEIGHTS_FILE, ModelInfo, folder_config
from tinyswin.extras import require
from tinyswin.interop import to_timm
from tinyswin.model import WindowAttention
from tinyswin.version import __version__

FORMATS = ("safetensors", "onnx", "timm")
QUANTIZE = ("int8",)
TOLERANCE = 1e-4  # max abs difference of float32 logits allowed between the export and the PyTorch model
OPSET = 20  # 20: GELU is one op (ONNX Gelu), which ONNX Runtime runs as one kernel
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"
INT8_SUFFIX = ".int8.onnx"


class ExportError(TinyswinError):
    """An export failed its check, or cannot be written where it was asked to go."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote.

    Attributes:
        paths: the files or folders written (the ONNX int8 copy second, when asked for).
        max_abs_diff: max abs difference of the export's logits from the PyTorch model's (None: not run,
            the safetensors folder holds the very tensors).
        int8_max_abs_diff: the same for the int8 ONNX copy, against the float32 ONNX model.
    """

    paths: list[Path]
    max_abs_diff: float | None = None
    int8_max_abs_diff: float | None = None


def model_info(loaded: LoadedModel) -> ModelInfo:
    """The ModelInfo of a loaded checkpoint (its training config without the data source's path)."""
    train_config = to_dict(loaded.config)
    train_config["data"]["source"] = None  # a path on the training machine; an export names no data
    train_config["device"] = "auto"
    norm = loaded.checkpoint["normalization"]
    return ModelInfo(
        model_config=dict(loaded.checkpoint["model_config"]),
        class_names=list(loaded.class_names),
        class_ids=list(loaded.class_ids),
        mean=tuple(float(v) for v in norm["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in norm["std"]),  # type: ignore[arg-type]
        image_size=loaded.image_size,
        input_size=tuple(loaded.input_size),  # type: ignore[arg-type]
        interpolation=loaded.augment.config.interpolation,
        tinyswin_version=__version__,
        train_config=train_config,
    )


def default_out(checkpoint: Path, fmt: str, ema: bool) -> Path:
    """Where an export goes by default: beside the checkpoint, named after it (`best.onnx`,
    `best-safetensors/`, `best-timm/`; `-ema` added for the EMA weights)."""
    stem = checkpoint.stem + ("-ema" if ema else "")
    return checkpoint.parent / (f"{stem}.onnx" if fmt == "onnx" else f"{stem}-{fmt}")


def int8_path(out: Path) -> Path:
    """The int8 copy of an ONNX file: `model.onnx` -> `model.int8.onnx`."""
    return out.with_name(out.name.removesuffix(".onnx") + INT8_SUFFIX)


def example_batch(info: ModelInfo, batch: int, seed: int = 0) -> torch.Tensor:
    """A normalised-looking float32 (batch, 3, H, W) batch at the model's input size, seeded."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *info.input_size, generator=generator)


# ----------------------------------------------------------------------------------------------------
# Atomic placement
# ----------------------------------------------------------------------------------------------------


def _check_destination(out: Path, folder: bool) -> None:
    """Refuse to replace anything but a previous export of the same kind."""
    if not out.exists() and not out.is_symlink():
        return
    if folder and out.is_dir() and (out / CONFIG_FILE).is_file():
        return  # a previous export folder: replaced
    if not folder and out.is_file() and out.suffix == ".onnx":
        return
    kind = "an export folder" if folder else "an .onnx file"
    raise ExportError(f"{out} exists and is not {kind}: remove it or choose another --out")


def _place_folder(build: Callable[[Path], None], out: Path) -> Path:
    """Build a folder in a temporary folder beside `out`, then rename it into place (replacing a previous
    export); on any failure nothing is left at `out` but what was there."""
    _check_destination(out, folder=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TEMP_MARKER}", dir=out.parent))
    old = out.with_name(f".{out.name}{TEMP_MARKER}old-{os.getpid()}")
    try:
        build(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------------


def _contiguous_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as separate contiguous CPU tensors (safetensors refuses shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def export_safetensors(loaded: LoadedModel, out: Path) -> ExportResult:
    """`model.safetensors` + `config.json` in the folder `out`; read back and compared before it is placed.

    Raises:
        ExportError: the weights read back differ from the model's.
    """
    st = require("safetensors.torch", "export", "safetensors export")
    info = model_info(loaded)
    state = _contiguous_state(loaded.model)

    def build(folder: Path) -> None:
        st.save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(folder / CONFIG_FILE, folder_config(info))
        back = st.load_file(str(folder / WEIGHTS_FILE))
        if back.keys() != state.keys() or any(not torch.equal(back[k], v) for k, v in state.items()):
            raise ExportError(f"{out}: the weights read back from {WEIGHTS_FILE} differ from the model's")

    return ExportResult([_place_folder(build, out)])


# ----------------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------------


EVAL_KEYS = ("label_smoothing", "tta")  # of the training config, kept in an ONNX file's metadata


def onnx_metadata(info: ModelInfo) -> dict[str, str]:
    """The ONNX metadata_props: each ModelInfo field as a JSON string; of the training config, only what
    evaluating the file needs (`label_smoothing` of the reported loss, `tta`)."""
    data = info.to_json()
    config = data.pop("train_config") or {}
    data["train_config"] = {key: config[key] for key in EVAL_KEYS if key in config}
    return {"library": "tinyswin", **{key: json.dumps(value) for key, value in data.items()}}


def info_from_onnx_metadata(metadata: dict[str, str], origin: str) -> ModelInfo:
    """The ModelInfo stored by `onnx_metadata`.

    Raises:
        TinyswinError: the metadata is not a tinyswin export's.
    """
    if metadata.get("library") != "tinyswin":
        raise TinyswinError(f"{origin}: not an ONNX model exported by tinyswin (no tinyswin metadata)")
    try:
        fields = ModelInfo.__dataclass_fields__  # other tools (the quantizer) add keys of their own
        data = {key: json.loads(value) for key, value in metadata.items() if key in fields}
    except json.JSONDecodeError as exc:
        raise TinyswinError(f"{origin}: malformed tinyswin metadata ({exc})") from None
    return ModelInfo.from_json(data, origin)


def onnx_bytes(model: nn.Module, info: ModelInfo) -> bytes:
    """The model as a serialized ONNX model (dynamo exporter, opset `OPSET`, dynamic batch), metadata in.

    The model builds its per-size plans on the first batch, so one batch runs before the export traces it.
    Attention is traced on its plain path in every block (MatMul, scale, bias, Softmax, MatMul: ONNX Runtime
    folds the scale into the first MatMul; measured a little faster there than SDPA's decomposition); the
    model's own backends are restored afterwards.
    """
    require("onnxscript", "export", "ONNX export")
    onnx = require("onnx", "export", "ONNX export")
    x = example_batch(info, 2)
    attention = [m for m in model.modules() if isinstance(m, WindowAttention)]
    backends = [m.backend for m in attention]
    try:
        for m in attention:
            m.backend = "plain"
        with torch.no_grad():
            model(x)  # builds the plans of this input size, outside the trace
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    finally:
        for m, backend in zip(attention, backends, strict=True):
            m.backend = backend
    proto = program.model_proto
    for key, value in onnx_metadata(info).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def ort_session(model: bytes | str | os.PathLike[str], threads: int = 0, spin: bool = True) -> Any:
    """An ONNX Runtime CPU session with every graph optimization on.

    Args:
        model: the serialized model, or its file.
        threads: intra-op threads (0: ONNX Runtime's default, one per core).
        spin: let idle threads spin between runs (faster back-to-back runs; False shares the CPU with
            other work, e.g. PyTorch measured in the same process).
    """
    ort = require("onnxruntime", "export", "ONNX Runtime inference")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def ort_logits(session: Any, x: np.ndarray) -> np.ndarray:
    """float32 logits (B, K) of a session for float32 inputs (B, 3, H, W)."""
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def _max_diff(model: nn.Module, session: Any, info: ModelInfo, batches: tuple[int, ...]) -> float:
    """Max abs difference of the session's logits from the model's over seeded batches of these sizes."""
    worst = 0.0
    for i, batch in enumerate(batches):
        x = example_batch(info, batch, seed=i + 1)
        with torch.no_grad():
            expected = model(x).float().numpy()
        worst = max(worst, float(np.abs(ort_logits(session, x.numpy()) - expected).max()))
    return worst


def quantize_int8(source: Path, target: Path) -> None:
    """ONNX Runtime dynamic quantization (int8 weights, activations quantized on the fly) of an ONNX file."""
    quantization = require("onnxruntime.quantization", "export", "int8 quantization")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer advises its optional pre-processing through the root logger
    try:
        quantization.quantize_dynamic(str(source), str(target), weight_type=quantization.QuantType.QInt8)
    finally:
        root.setLevel(level)


def export_onnx(
    loaded: LoadedModel, out: Path, quantize: str | None = None, log: Any = print
) -> ExportResult:
    """An ONNX file at `out`, checked with ONNX Runtime at two batch sizes against the PyTorch logits;
    with `quantize` 'int8', also its dynamically quantized copy beside it (`int8_path(out)`).

    Raises:
        ExportError: the ONNX logits differ by more than `TOLERANCE`.
    """
    for module in ("onnx", "onnxscript", "onnxruntime"):  # before the slow trace
        require(module, "export", "ONNX export")
    _check_destination(out, folder=False)
    if quantize:
        _check_destination(int8_path(out), folder=False)
    model = loaded.model.float().cpu().eval()
    info = model_info(loaded)
    data = onnx_bytes(model, info)
    diff = _max_diff(model, ort_session(data), info, (1, 3))
    log(f"ONNX Runtime vs PyTorch logits: max abs difference {diff:.3g} (batches of 1 and 3)")
    if not diff <= TOLERANCE:
        raise ExportError(f"{out}: ONNX Runtime logits differ from PyTorch's by {diff:.3g} > {TOLERANCE:g}")
    if not quantize:
        atomic_write(out, lambda f: f.write(data))
        return ExportResult([out], diff)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}{TEMP_MARKER}", dir=out.parent) as tmp:
        float_file, int8_file = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        float_file.write_bytes(data)
        quantize_int8(float_file, int8_file)
        float_session = ort_session(data)
        x = example_batch(info, 8, seed=3).numpy()
        int8_diff = float(np.abs(ort_logits(ort_session(int8_file), x) - ort_logits(float_session, x)).max())
        log(f"int8 vs float32 ONNX logits: max abs difference {int8_diff:.3g} (batch of 8)")
        int8_data = int8_file.read_bytes()
    atomic_write(out, lambda f: f.write(data))
    atomic_write(int8_path(out), lambda f: f.write(int8_data))
    return ExportResult([out, int8_path(out)], diff, int8_diff)


# ----------------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------------


def timm_config(info: ModelInfo, kwargs: dict[str, Any], num_features: int) -> dict[str, Any]:
    """config.json in timm's hub layout for the network `kwargs` (from `to_timm`) builds."""
    args = {k: v for k, v in kwargs.items() if k != "model_name"}
    return {
        "architecture": kwargs["model_name"],
        "num_classes": len(info.class_names),
        "num_features": num_features,
        "global_pool": "avg",
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [3, *info.input_size],
            "fixed_input_size": True,
            "interpolation": info.interpolation,
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(info.mean),
            "std": list(info.std),
            "num_classes": len(info.class_names),
            "first_conv": "patch_embed.proj",
            "classifier": "head.fc",
            "license": "",
        },
        "label_names": info.class_ids,
        "label_descriptions": dict(zip(info.class_ids, info.class_names, strict=True)),
        TIMM_INFO_KEY: {**info.to_json(), "train_config": None},  # what `tinyswin predict` needs besides timm
    }


def export_timm(loaded: LoadedModel, out: Path, log: Any = print) -> ExportResult:
    """A timm model folder (`model.safetensors` + `config.json`), checked by building the timm model,
    loading the weights and comparing logits.

    Raises:
        ValueError: timm cannot express the model's config (one line saying why).
        ExportError: timm's logits differ by more than `TOLERANCE`.
    """
    timm = require("timm", "timm", "timm export")
    st = require("safetensors.torch", "export", "timm export (safetensors weights)")
    model = loaded.model.float().cpu().eval()
    state, kwargs = to_timm(model)
    kwargs = json.loads(json.dumps(kwargs))  # exactly what config.json gives back
    reference = timm.create_model(**kwargs).eval()
    reference.load_state_dict(state)
    info = model_info(loaded)
    x = example_batch(info, 3, seed=1)
    with torch.no_grad():
        diff = float((reference(x) - model(x)).abs().max())
    log(f"timm vs tinyswin logits: max abs difference {diff:.3g} (batch of 3)")
    if not diff <= TOLERANCE:
        raise ExportError(f"{out}: timm's logits differ from tinyswin's by {diff:.3g} > {TOLERANCE:g}")
    state = {k: v.contiguous() for k, v in state.items()}

    def build(folder: Path) -> None:
        st.save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(folder / CONFIG_FILE, timm_config(info, kwargs, reference.num_features))

    return ExportResult([_place_folder(build, out)], diff)


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------


def export(
    checkpoint: str | os.PathLike[str],
    fmt: str,
    out: str | os.PathLike[str] | None = None,
    *,
    ema: bool = False,
    quantize: str | None = None,
    log: Any = print,
) -> ExportResult:
    """Export a trained model.

    Args:
        checkpoint: a .pt checkpoint, a run directory (its best.pt, else last.pt) or an exported folder.
        fmt: 'safetensors', 'onnx' or 'timm'.
        out: destination (a folder; for onnx, the .onnx file); default: beside the checkpoint
            (`default_out`).
        ema: export the EMA weights.
        quantize: 'int8' (onnx only): also write the dynamically quantized model beside the float one.
        log: where the check's numbers go.

    Returns:
        The ExportResult.

    Raises:
        ValueError: an unknown format, or an option that does not apply to it.
        ExportError: the export failed its check or cannot be placed; nothing is left at `out`.
        MissingExtraError: an optional dependency is missing (one line naming the extra).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if quantize is not None and (fmt != "onnx" or quantize not in QUANTIZE):
        raise ValueError(f"--quantize {quantize}: quantization applies to --format onnx only, as int8")
    loaded = LoadedModel(checkpoint, device="cpu", ema=ema)
    target = Path(out) if out is not None else default_out(loaded.path, fmt, ema)
    if fmt == "safetensors":
        return export_safetensors(loaded, target)
    if fmt == "onnx":
        return export_onnx(loaded, target, quantize, log)
    return export_timm(loaded, target, log)
