"""A tiny trained-looking checkpoint and its exports, shared by test_export.py and test_predict.py (the ONNX
export costs seconds: it is done once per session)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinyswin.checkpoint import atomic_save, make_checkpoint
from tinyswin.cli import main
from tinyswin.config import TrainConfig, plain_model_config, to_dict
from tinyswin.data.synthetic import CLASS_NAMES
from tinyswin.model import SwinConfig, SwinTransformer

KEEP = [0, 5, 6, 8]  # the classes of tests/test_cli_errors.py's small cache
IMAGE_SIZE = 28  # images are decoded to 28px and resized to the model's 32px input: both steps are tested
MEAN, STD = (0.45, 0.5, 0.55), (0.2, 0.25, 0.3)


def tiny_config(**overrides: object) -> SwinConfig:
    """Two stages, C 16, window 4, 4 classes, 32px input."""
    fields = dict(img_size=32, embed_dim=16, depths=(2, 1), num_heads=(1, 2), window_size=4, num_classes=4)
    return SwinConfig(**{**fields, **overrides})  # type: ignore[arg-type]


def random_model(config: SwinConfig, seed: int) -> SwinTransformer:
    """A model with random weights everywhere (norms, biases and relative position tables too), so that its
    logits differ clearly between images."""
    torch.manual_seed(seed)
    model = SwinTransformer(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            elif "relative_position_bias_table" in name:
                param.normal_(0.0, 1.0)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif name == "head.weight":
                param.normal_(0.0, 2.0)
        # centre the logits over random inputs, so that no class wins for every image
        size = config.img_size if isinstance(config.img_size, tuple) else (config.img_size,) * 2
        features = model.eval().forward_features(torch.randn(16, 3, *size)).mean(dim=(1, 2))  # (16, C)
        model.head.bias.copy_(-model.head.weight @ features.mean(0))
    return model


def tiny_checkpoint(path: Path, seed: int = 0, ema: bool = False, **overrides: object) -> Path:
    """A checkpoint of the format training writes, with a random tiny model (and EMA weights: the model's
    halved, when asked)."""
    config = tiny_config(**overrides)
    state = random_model(config, seed).state_dict()
    ckpt = make_checkpoint(
        model=state,
        optimizer=None,
        scheduler=None,
        scaler=None,
        ema={f"module.{k}": v * 0.5 for k, v in state.items()} if ema else None,
        epoch=1,
        step=1,
        best=0.0,
        model_config=plain_model_config(config),
        train_config=to_dict(TrainConfig(precision="fp32")),  # evaluated in fp32 on every CPU
        class_names=[CLASS_NAMES[k] for k in KEEP],
        class_ids=[f"c{k}" for k in KEEP],
        normalization={"mean": list(MEAN), "std": list(STD)},
        image_size=IMAGE_SIZE,
        rng_state=None,
        loop=None,
    )
    return atomic_save(ckpt, path)


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` PNG images of various sizes with smooth random content."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        h, w = 24 + 9 * i, 40 - 3 * i
        base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
        files.append(folder / f"img{i}.png")
        image.save(files[-1])
    return files


@dataclass(frozen=True)
class Exports:
    """A checkpoint and its exports."""

    checkpoint: Path
    safetensors: Path
    onnx: Path
    int8: Path
    timm: Path


def build_exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    """A tiny checkpoint exported (through the CLI) to each format, once per session: the modules that use it
    share the folder (a marker file says it is complete)."""
    root = tmp_path_factory.getbasetemp() / "exports"
    found = Exports(
        root / "best.pt",
        root / "best-safetensors",
        root / "best.onnx",
        root / "best.int8.onnx",
        root / "best-timm",
    )
    if (root / "complete").is_file():
        return found
    root.mkdir(exist_ok=True)
    tiny_checkpoint(found.checkpoint, ema=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for fmt, extra in (("safetensors", []), ("onnx", ["--quantize", "int8"]), ("timm", [])):
            assert main(["export", str(found.checkpoint), "--format", fmt, *extra]) == 0
    finally:
        torch.set_num_threads(threads)
    (root / "complete").touch()
    return found
