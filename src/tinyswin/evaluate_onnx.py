"""`tinyswin eval --onnx MODEL.onnx`: an exported ONNX file (or its int8 copy) on a split of a dataset,
through ONNX Runtime, with the preprocessing of `predict` (the run's evaluation transform) and the sums of
`evaluate`: a quantized model's accuracy measured on images, not only its logits' difference from PyTorch's.

The loss uses the run's label smoothing and the default test-time augmentation is the run's, both read from
the file's metadata (files exported before they were stored there: no smoothing, no flip)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tinyswin.data import load_cache
from tinyswin.data.sources import resolve_data
from tinyswin.evaluate import evaluate, split_batches
from tinyswin.modelpath import Kind, identify
from tinyswin.predict import open_classifier, preprocess

DEFAULT_BATCH = 256


class SessionModule(nn.Module):
    """An ONNX Runtime classifier as the module `evaluate` takes: float32 (B, 3, H, W) -> (B, K) logits on
    the CPU. It holds no weights; an empty parameter tells `evaluate` its device."""

    def __init__(self, logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.logits = logits
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 -> (B, K) float32 logits."""
        return self.logits(x.float().contiguous())


def evaluate_onnx(
    path: str | os.PathLike[str],
    *,
    data: str | None,
    split: str = "val",
    batch_size: int | None = None,
    tta: str | None = None,
    log: Any = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Loss, top-1, top-5 and calibration error of an ONNX model on a split of `data`.

    Args:
        path: the .onnx file (`tinyswin export --format onnx`, or its `.int8.onnx` copy).
        data: a cache or a source (prepared at the model's image size); an ONNX file does not name its data.
        split: the split to evaluate.
        batch_size: images per ONNX Runtime call (default 256).
        tta: 'none' or 'flip'; default: the training run's `tta`.
        log: where a note about preparing the data goes.
        progress: show the progress of preparing the data, if it must be prepared.

    Returns:
        The keys of `evaluate_checkpoint`: {"checkpoint", "split", "n", "tta", "loss", "top1", "top5", "ece"}
        (with 'flip', also the numbers without it), plus "runtime": "onnxruntime".

    Raises:
        ValueError: not an .onnx file, no `data`, a class list that differs from the model's, or a missing
            split.
        FileNotFoundError: no such file.
    """
    found = identify(path)
    if found.kind is not Kind.ONNX:
        raise ValueError(
            f"--onnx {found.given}: not an .onnx file ({found.kind.value}); name it without --onnx"
        )
    path = found.path
    if data is None:
        raise ValueError(f"{path}: an ONNX model does not name its data: give it (--data CACHE)")
    classifier = open_classifier(found.path)
    info = classifier.info
    train_config = info.train_config or {}
    cache = load_cache(resolve_data(data, size=info.image_size, log=log, progress=progress))
    if cache.class_names != info.class_names:
        raise ValueError(
            f"{cache.path}: its {cache.num_classes} classes are not those of {path} "
            f"({len(info.class_names)} classes, in the model's order)"
        )
    images, labels = cache.split(split)  # raises, listing the splits, if there is no such split
    result = evaluate(
        SessionModule(classifier.logits),
        split_batches(images, labels, batch_size or DEFAULT_BATCH, torch.device("cpu")),
        lambda batch: preprocess(batch, info),
        num_classes=len(info.class_names),
        label_smoothing=float(train_config.get("label_smoothing", 0.0)),
        tta=tta or str(train_config.get("tta", "none")),
        static_shapes=False,  # the ONNX graph takes any batch size
    )
    return {"checkpoint": str(path), "runtime": "onnxruntime", "split": split} | result.numbers()
