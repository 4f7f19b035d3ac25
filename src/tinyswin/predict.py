"""Inference on image files: decode them as `prepare` does and name the top classes of each, with a
checkpoint, a run directory, an exported safetensors folder, or an exported ONNX file (ONNX Runtime).

Every path preprocesses the same way (`preprocess`: decode at the training image size, resize to the model's
input where it differs, normalise) and takes the softmax of the logits in float32, so one image gets the same
class with the same probability through each.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tinyswin.data.augment_backend import normalization_constants, normalize_, to_float_nchw
from tinyswin.data.augment_geometry import resize
from tinyswin.data.imagefolder import decode_image, image_extensions, is_image_name
from tinyswin.evaluate import LoadedModel
from tinyswin.export import info_from_onnx_metadata, model_info, ort_logits, ort_session
from tinyswin.exported import ModelInfo, load_timm_export
from tinyswin.modelpath import Kind, identify

BATCH = 64


def load_images(paths: Sequence[str | os.PathLike[str]], size: int) -> np.ndarray:
    """Image files of any size and mode -> uint8 (N, size, size, 3), as `prepare` decodes them
    (RGB, short side resized to `size`, centre crop).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a file is not a readable image.
    """
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"image not found: {p}")
        try:
            out.append(decode_image(p.read_bytes(), size))
        except Exception as exc:  # Pillow raises many kinds for unreadable files
            raise ValueError(f"{p}: not a readable image ({exc})") from None
    return np.stack(out)  # (N, size, size, 3)


def image_files(
    paths: Sequence[str | os.PathLike[str]], on_error: Callable[[str], None] | None = None
) -> list[Path]:
    """The image files named: files as given, folders as their image files (by extension, sorted).

    Args:
        paths: files and folders.
        on_error: called with a one-line message for a path that is neither (or a folder without
            images), which is then left out; None: raise.

    Raises:
        FileNotFoundError: a path is missing or a folder holds no image (when `on_error` is None).
    """
    exts = image_extensions()
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and is_image_name(p.name, exts))
            problem = None if found else f"{path}: no image files in this folder"
            files += found
        else:
            problem = None if path.is_file() else f"image not found: {path}"
            files += [path] if problem is None else []
        if problem and on_error is None:
            raise FileNotFoundError(problem)
        if problem and on_error is not None:
            on_error(problem)
    return files


def preprocess(images: np.ndarray | torch.Tensor, info: ModelInfo) -> torch.Tensor:
    """uint8 (B, H, W, 3) images -> the model's float32 (B, 3, H', W') input: resized to the model's input
    size where it differs (antialiased, rounded, with the run's filter), then normalised; the same ops, in
    the same order, as the run's evaluation."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # e.g. a read-only memory map of a cache: torch wants writable memory
    x = to_float_nchw(torch.as_tensor(images))  # (B, 3, H, W) in [0, 255]
    x = resize(x, info.input_size, info.interpolation)  # (B, 3, H', W'), x itself when the size matches
    return normalize_(x, normalization_constants(info.mean, info.std))


@dataclass
class Classifier:
    """A model ready for inference, whatever its format.

    Attributes:
        info: classes, normalisation and sizes.
        logits: float32 (B, 3, H', W') on the CPU -> float32 (B, K) logits on the CPU.
        kind: 'pytorch', 'onnxruntime' or 'timm'.
    """

    info: ModelInfo
    logits: Callable[[torch.Tensor], torch.Tensor]
    kind: str


def open_classifier(path: str | os.PathLike[str], *, device: str = "auto", ema: bool = False) -> Classifier:
    """A Classifier from any model path `tinyswin.modelpath` knows but a bare state dict: a .pt checkpoint, a
    run directory, an exported folder (safetensors or timm) or an .onnx file.

    Args:
        path: the model; an .onnx file runs through ONNX Runtime on the CPU, a timm model folder
            (`export --format timm`) through timm on the CPU.
        device: PyTorch models: 'auto', 'cpu', 'cuda', ...
        ema: checkpoints: the EMA weights.
    """
    found = identify(path)
    exported_weights = "holds the weights it was exported with: leave out --ema"
    if found.kind is Kind.ONNX:
        if not found.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {found.path}")
        if ema:
            raise ValueError(f"{found.path}: an ONNX model {exported_weights}")
        session = ort_session(found.path)
        info = info_from_onnx_metadata(dict(session.get_modelmeta().custom_metadata_map), str(found.path))
        return Classifier(info, lambda x: torch.from_numpy(ort_logits(session, x.numpy())), "onnxruntime")
    if found.kind is Kind.TIMM:
        if ema:
            raise ValueError(f"{found.path}: a timm model folder {exported_weights}")
        timm_model, info = load_timm_export(found.path)
        return Classifier(info, torch.no_grad()(lambda x: timm_model(x).float()), "timm")
    loaded = LoadedModel(found, device=device, ema=ema)

    @torch.no_grad()
    def logits(x: torch.Tensor) -> torch.Tensor:
        return loaded.model(x.to(loaded.device)).float().cpu()

    return Classifier(model_info(loaded), logits, "pytorch")


def _decoded(
    files: Sequence[Path], size: int, on_error: Callable[[str], None] | None
) -> Iterator[tuple[list[Path], np.ndarray]]:
    """Batches of (files, uint8 (b, size, size, 3)) of the readable files; unreadable ones reported."""
    for start in range(0, len(files), BATCH):
        good, arrays = [], []
        for file in files[start : start + BATCH]:
            try:
                arrays.append(load_images([file], size)[0])
                good.append(file)
            except (FileNotFoundError, ValueError) as exc:
                if on_error is None:
                    raise
                on_error(str(exc))
        if good:
            yield good, np.stack(arrays)


def predict(
    path: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]],
    *,
    topk: int = 5,
    device: str = "auto",
    ema: bool = False,
    on_error: Callable[[str], None] | None = None,
    progress: bool | None = False,
) -> list[dict[str, Any]]:
    """The `topk` classes of each image with their probabilities.

    Args:
        path: a .pt checkpoint, a run directory, an exported safetensors folder or an exported .onnx file.
        images: image files, and folders (their image files, sorted by name).
        topk: classes per image.
        device: PyTorch models: 'auto', 'cpu', 'cuda', ...
        ema: checkpoints: use the EMA weights.
        on_error: called with one line for each image that cannot be read (a missing file, a folder
            without images, an unreadable file), which is left out; None: the first one raises.
        progress: a progress bar over the batches (None: where stderr is a terminal).

    Returns:
        One dict per image read: {"image", "predictions": [{"class", "class_id", "index", "probability"}]}.

    Raises:
        FileNotFoundError, ValueError: an image cannot be read (when `on_error` is None).
    """
    classifier = open_classifier(path, device=device, ema=ema)
    info = classifier.info
    files = image_files(images, on_error)
    k = max(1, min(topk, len(info.class_names)))
    results = []
    batches = tqdm(
        _decoded(files, info.image_size, on_error),
        total=-(-len(files) // BATCH),
        disable=None if progress is None else not progress,
        unit="batch",
    )
    for names, pixels in batches:
        probs = classifier.logits(preprocess(pixels, info)).softmax(dim=1)  # (B, K) float32
        top = probs.topk(k, dim=1)
        for i, name in enumerate(names):
            preds = [
                {"class": info.class_names[j], "class_id": info.class_ids[j], "index": j, "probability": p}
                for p, j in zip(top.values[i].tolist(), top.indices[i].tolist(), strict=True)
            ]
            results.append({"image": str(name), "predictions": preds})
    return results
