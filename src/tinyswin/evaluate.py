"""Evaluation: the per-epoch evaluation of a split, and the evaluation of a trained checkpoint on a split
of its data (LoadedModel rebuilds the model of a checkpoint, run or export, as `tinyswin.modelpath` reads
them, for evaluation and inference)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tinyswin.checkpoint import check_compatible
from tinyswin.config import TrainConfig, build_augment_config, eval_size, from_dict, input_size
from tinyswin.data import BatchLoader, build_augment, load_cache
from tinyswin.data.sources import resolve_data
from tinyswin.metrics import (
    calibration_bins,
    ece_from_bins,
    per_class_accuracy,
    topk_correct,
)
from tinyswin.model import SwinConfig, SwinTransformer
from tinyswin.modelpath import Kind, ModelPath, read_checkpoint
from tinyswin.ranges import TTA_MODES
from tinyswin.runtime import DistContext, all_reduce_, autocast, resolve_device, resolve_precision


@dataclass
class EvalResult:
    """Sums over one split (all processes): loss, top-1, top-5, confusion matrix, calibration bins.

    With test-time augmentation (`tta` 'flip') the sums are those of the averaged logits, and `plain` holds
    the same sums for the unaugmented images (computed in the same pass).
    """

    n: int
    loss_sum: float
    correct1: int
    correct5: int
    confusion: torch.Tensor  # (K, K) int64, rows = true class
    bins: torch.Tensor  # (3, n_bins) float64, see metrics.calibration_bins
    tta: str = "none"
    plain: EvalResult | None = None  # the same split without test-time augmentation (tta 'flip' only)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n, 1)

    @property
    def top1(self) -> float:
        return self.correct1 / max(self.n, 1)

    @property
    def top5(self) -> float:
        return self.correct5 / max(self.n, 1)

    def no_tta(self, prefix: str = "") -> dict[str, float]:
        """``{prefix}loss_no_tta``, ``{prefix}top1_no_tta`` and ``{prefix}top5_no_tta``: the loss, top-1 and
        top-5 of the same images without test-time augmentation (empty where there was none)."""
        if self.plain is None:
            return {}
        plain = self.plain
        return {
            f"{prefix}loss_no_tta": plain.loss,
            f"{prefix}top1_no_tta": plain.top1,
            f"{prefix}top5_no_tta": plain.top5,
        }

    def numbers(self) -> dict[str, Any]:
        """n, tta, loss, top-1, top-5 and ECE (with 'flip', also the numbers without it), as `eval` prints."""
        numbers = {"n": self.n, "tta": self.tta, "loss": self.loss, "top1": self.top1, "top5": self.top5}
        return numbers | {"ece": ece_from_bins(self.bins)} | self.no_tta()

    def summary(self, class_names: list[str]) -> dict[str, Any]:
        """Top-1/5, loss, per-class accuracy, confusion matrix, ECE and its bins, as plain data (with 'flip',
        also the top-1/5 and loss without test-time augmentation)."""
        per_class = per_class_accuracy(self.confusion)
        out = {
            "n": self.n,
            "loss": self.loss,
            "top1": self.top1,
            "top5": self.top5,
            "ece": ece_from_bins(self.bins),
            "tta": self.tta,
            "per_class_accuracy": dict(zip(class_names, per_class, strict=True)),
            "confusion_matrix": self.confusion.tolist(),
            "calibration_bins": self.bins.tolist(),  # (3, n_bins): count, sum of confidences, correct
        }
        return out | self.no_tta()


class _Sums:
    """Running sums of one evaluation on the device (no host sync per batch): loss, top-1/5 counts, the
    confusion matrix, and the confidences and hits for the calibration bins (binned once at the end)."""

    def __init__(self, num_classes: int, label_smoothing: float, device: torch.device) -> None:
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.n = 0
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.hits = torch.zeros(2, dtype=torch.int64, device=device)  # top-1, top-5
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        self.confidence: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: float (B, K) logits of its real rows, int64 (B,) labels."""
        self.n += labels.shape[0]
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing, reduction="sum")
        self.loss += ce.double()
        self.hits += torch.stack(topk_correct(logits, labels, (1, 5)))
        confidence, pred = logits.softmax(dim=1).max(dim=1)  # (B,), (B,)
        flat = labels * self.num_classes + pred  # (B,) index into the flattened (K, K) matrix
        self.confusion.index_add_(0, flat, torch.ones_like(flat))
        self.confidence.append(confidence)
        self.correct.append(pred == labels)

    def result(self, dist: DistContext | None, tta: str = "none") -> EvalResult:
        """The sums over all processes (the one host sync of the evaluation)."""
        device = self.loss.device
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=device)
        sums = torch.cat([self.loss.reshape(1), n, self.hits.double(), self.confusion.double()])
        all_reduce_(sums, dist)
        empty = torch.zeros(0, device=device)
        confidence = torch.cat(self.confidence) if self.confidence else empty
        correct = torch.cat(self.correct) if self.correct else empty.bool()
        bins = all_reduce_(calibration_bins(confidence, correct).to(device), dist).cpu()  # (3, n_bins)
        k = self.num_classes
        n_all, c1, c5 = (round(v) for v in sums[1:4].tolist())
        return EvalResult(
            n=n_all,
            loss_sum=float(sums[0]),
            correct1=c1,
            correct5=c5,
            confusion=sums[4:].round().long().reshape(k, k).cpu(),  # (K, K)
            bins=bins,
            tta=tta,
        )


def split_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of a split for `evaluate`: of uint8 (N, H, W, 3) images and (N,) labels, uint8
    (B, H, W, 3) and int64 (B,) batches on `device`, in order, the last one partial."""
    return iter(BatchLoader(images, labels, batch_size, shuffle=False, drop_last=False, device=device))


def _padded(images: torch.Tensor, rows: int) -> torch.Tensor:
    """`images` (B, ...) with zero rows appended up to `rows` (>= B): one batch shape for a compiled model."""
    if images.shape[0] >= rows:
        return images
    pad = images.new_zeros((rows - images.shape[0], *images.shape[1:]))
    return torch.cat([images, pad])  # (rows, ...)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    normalize: Callable[[torch.Tensor], torch.Tensor],
    *,
    num_classes: int,
    label_smoothing: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    dist: DistContext | None = None,
    tta: str = "none",
    static_shapes: bool = True,
) -> EvalResult:
    """Loss, top-1, top-5, confusion matrix and calibration of `model` over batches of one split.

    Static shapes: a batch smaller than the first (the last, partial one) is padded with zero images to the
    first batch's size, so that a compiled model sees one input shape; only the real rows' logits enter the
    sums (loss, top-1/5, confusion, calibration). Nothing waits for the device until the end.

    Test-time augmentation 'flip' (as airbench): the logits of a batch are the mean of the model's logits on
    the images and on their horizontal mirrors (two calls of the same shape); the result's `plain` holds the
    sums of the first call alone, i.e. the same split without test-time augmentation.

    Args:
        model: the classifier; put in eval mode here (and left so).
        batches: (uint8 images (B, H, W, 3), int64 labels (B,)) on the model's device; with several
            processes, each yields its own disjoint shard and the sums are all-reduced.
        normalize: uint8 (B, H, W, 3) -> float (B, 3, H', W'), the eval transform.
        num_classes: K.
        label_smoothing: of the reported loss (the training loss on unmixed batches).
        amp_dtype: autocast dtype, or None.
        dist: the process group's context, or None for one process.
        tta: 'none' or 'flip'.
        static_shapes: pad partial batches to the first batch's size (False: run them as they come).

    Raises:
        ValueError: an unknown `tta`.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"evaluate: tta must be one of {TTA_MODES}, got {tta!r}")
    model.eval()
    device = next(model.parameters()).device
    sums = _Sums(num_classes, label_smoothing, device)
    plain = _Sums(num_classes, label_smoothing, device) if tta == "flip" else None
    rows = 0  # the batch size the model sees: that of the first batch
    for images, labels in batches:
        b = labels.shape[0]
        rows = rows or b
        x = normalize(_padded(images, rows) if static_shapes else images)  # (rows, 3, H', W')
        with autocast(device, amp_dtype):
            logits = model(x).float()  # (rows, K)
            if plain is not None:
                plain.add(logits[:b], labels)
                logits = (logits + model(x.flip(-1)).float()) * 0.5  # mean with the mirror's logits
        sums.add(logits[:b], labels)
    result = sums.result(dist, tta)
    if plain is not None:
        result.plain = plain.result(dist)
    return result


class LoadedModel:
    """A model rebuilt from a checkpoint, a run directory or an export folder (`modelpath.read_checkpoint`),
    in eval mode, with what inference needs.

    Attributes:
        path: the checkpoint file read (a run's best.pt, else last.pt), or the export folder.
        exported: whether it is an export folder (which names no data).
        model: the SwinTransformer (raw weights, or the EMA weights when asked).
        checkpoint: the checkpoint dict.
        config: its TrainConfig.
        class_names / class_ids: label order.
        image_size: side of the cache images it was trained on (predict resizes images to it).
        eval_size: (H, W) of the model's input, or None when it is the stored image size.
        input_size: (H, W) of the model's input.
    """

    def __init__(
        self, path: str | os.PathLike[str] | ModelPath, *, device: str = "auto", ema: bool = False
    ) -> None:
        found, ckpt = read_checkpoint(path)
        self.exported = found.kind is Kind.EXPORT  # a folder of `tinyswin export --format safetensors`
        self.path = found.path
        self.checkpoint = ckpt
        self.config: TrainConfig = from_dict(ckpt["train_config"], str(self.path))
        self.device = resolve_device(device if device != "auto" else self.config.device)
        mc = dict(ckpt["model_config"])
        for key, value in mc.items():
            if isinstance(value, list):
                mc[key] = tuple(value)
        self.model_config = SwinConfig(**mc)
        model = SwinTransformer(self.model_config)
        if ema:
            if ckpt.get("ema") is None:
                raise ValueError(f"{self.path}: holds no EMA weights (the run had ema.enabled false)")
            state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
        else:
            state = ckpt["model"]
        model.load_state_dict(state)
        self.model = model.to(self.device).eval()
        self.class_names: list[str] = list(ckpt["class_names"])
        self.class_ids: list[str] = list(ckpt.get("class_ids") or self.class_names)
        self.image_size = int(ckpt["image_size"])
        self.eval_size = eval_size(self.model_config, self.image_size)
        self.input_size = input_size(self.model_config)
        norm = ckpt["normalization"]
        self.augment = build_augment(
            build_augment_config(self.config), tuple(norm["mean"]), tuple(norm["std"]), len(self.class_names)
        )
        self.amp_dtype = resolve_precision(self.config.precision, self.device)[0]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float (B, 3, H', W'), exactly as the run evaluated; images of another size
        than the run's are resized to the model's input."""
        size = self.eval_size
        if tuple(images.shape[1:3]) != (self.image_size, self.image_size):
            size = self.input_size
        return self.augment.normalize(images, size)


def evaluate_checkpoint(
    path: str | os.PathLike[str],
    *,
    data: str | None = None,
    split: str = "val",
    batch_size: int | None = None,
    device: str = "auto",
    ema: bool = False,
    tta: str | None = None,
    log: Any = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Loss, top-1 and top-5 of a checkpoint on a split of its dataset (or of `data`).

    Args:
        path: the checkpoint, or a run directory (its best.pt, else last.pt).
        data: a cache or source; default: the run's own data.
        split: the split to evaluate.
        batch_size: default: the run's eval batch size.
        device: 'auto', 'cpu', 'cuda', ...
        ema: evaluate the EMA weights.
        tta: test-time augmentation, 'none' or 'flip' (see `evaluate`); default: the run's `tta` key.
        log: where a note about preparing the data goes.
        progress: show the progress of preparing the data, if it must be prepared.

    Returns:
        {"checkpoint", "split", "n", "tta", "loss", "top1", "top5", "ece"}, and with 'flip' also
        "loss_no_tta", "top1_no_tta", "top5_no_tta" (the same images without test-time augmentation).

    Raises:
        ValueError: the data's class list differs from the checkpoint's, or the split is missing.
    """
    loaded = LoadedModel(path, device=device, ema=ema)
    cfg = loaded.config
    if data is None and loaded.exported:
        raise ValueError(f"{loaded.path}: an exported model does not name its data: give it (--data CACHE)")
    source = data if data is not None else cfg.data.source
    cache = load_cache(
        resolve_data(
            source,
            size=cfg.data.size,
            holdout=cfg.data.holdout,
            holdout_seed=cfg.data.holdout_seed,
            log=log,
            progress=progress,
        )
    )
    check_compatible(loaded.checkpoint, class_names=cache.class_names, source=str(loaded.path))
    if cache.image_size != loaded.image_size:
        log(
            f"note: {cache.path} holds {cache.image_size}px images, the model was trained on "
            f"{loaded.image_size}px: resizing them to its input {loaded.model_config.img_size}"
        )
    images, labels = cache.split(split)  # raises, listing the splits, if there is no such split
    result = evaluate(
        loaded.model,
        split_batches(images, labels, batch_size or cfg.eval_batch_size, loaded.device),
        loaded.normalize,
        num_classes=len(loaded.class_names),
        label_smoothing=cfg.label_smoothing,
        amp_dtype=loaded.amp_dtype,
        tta=cfg.tta if tta is None else tta,
    )
    return {"checkpoint": str(loaded.path), "split": split} | result.numbers()
