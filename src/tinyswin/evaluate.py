"""Evaluation: the per-epoch evaluation of a split, and the evaluation of a trained checkpoint on a split
of its data (LoadedModel rebuilds a checkpoint's model for evaluation and inference)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinyswin.checkpoint import check_compatible, load_checkpoint
from tinyswin.config import TrainConfig, build_augment_config, eval_size, from_dict, input_size
from tinyswin.data import BatchLoader, build_augment, load_cache
from tinyswin.data.sources import resolve_data
from tinyswin.metrics import (
    calibration_bins,
    confusion_matrix,
    ece_from_bins,
    per_class_accuracy,
    topk_correct,
)
from tinyswin.model import SwinConfig, SwinTransformer
from tinyswin.runtime import DistContext, all_reduce_, autocast, resolve_device, resolve_precision


@dataclass
class EvalResult:
    """Sums over one split (all processes): loss, top-1, top-5, confusion matrix, calibration bins."""

    n: int
    loss_sum: float
    correct1: int
    correct5: int
    confusion: torch.Tensor  # (K, K) int64, rows = true class
    bins: torch.Tensor  # (3, n_bins) float64, see metrics.calibration_bins

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n, 1)

    @property
    def top1(self) -> float:
        return self.correct1 / max(self.n, 1)

    @property
    def top5(self) -> float:
        return self.correct5 / max(self.n, 1)

    def summary(self, class_names: list[str]) -> dict[str, Any]:
        """Top-1/5, loss, per-class accuracy, confusion matrix and ECE, as plain data."""
        per_class = per_class_accuracy(self.confusion)
        return {
            "n": self.n,
            "loss": self.loss,
            "top1": self.top1,
            "top5": self.top5,
            "ece": ece_from_bins(self.bins),
            "per_class_accuracy": dict(zip(class_names, per_class, strict=True)),
            "confusion_matrix": self.confusion.tolist(),
        }


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
) -> EvalResult:
    """Loss, top-1, top-5, confusion matrix and calibration of `model` over batches of one split.

    Args:
        model: the classifier; put in eval mode here (and left so).
        batches: (uint8 images (B, H, W, 3), int64 labels (B,)) on the model's device; with several
            processes, each yields its own disjoint shard and the sums are all-reduced.
        normalize: uint8 (B, H, W, 3) -> float (B, 3, H', W'), the eval transform.
        num_classes: K.
        label_smoothing: of the reported loss (the training loss on unmixed batches).
        amp_dtype: autocast dtype, or None.
        dist: the process group's context, or None for one process.
    """
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # n, top-1, top-5
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    bins = torch.zeros(3, 15, dtype=torch.float64)
    for images, labels in batches:
        x = normalize(images)
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()  # (B, K)
        loss_sum += F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="sum").double()
        c1, c5 = topk_correct(logits, labels, (1, 5))
        counts += torch.stack([torch.tensor(labels.numel(), device=device), c1, c5])
        probs = logits.softmax(dim=1)
        confidence, pred = probs.max(dim=1)  # (B,), (B,)
        confusion += confusion_matrix(pred, labels, num_classes)
        bins += calibration_bins(confidence, pred == labels)
    sums = torch.cat([loss_sum.reshape(1), counts.double(), confusion.flatten().double()])
    all_reduce_(sums, dist)
    bins = all_reduce_(bins.to(device), dist).cpu()
    n, c1, c5 = (int(v) for v in sums[1:4].tolist())
    return EvalResult(
        n=n,
        loss_sum=float(sums[0]),
        correct1=c1,
        correct5=c5,
        confusion=sums[4:].round().long().reshape(num_classes, num_classes).cpu(),  # (K, K)
        bins=bins,
    )


def resolve_checkpoint(path: str | os.PathLike[str], prefer: str = "best.pt") -> Path:
    """A checkpoint file, or the one a run directory holds: `prefer`, else the other of best.pt / last.pt.

    Raises:
        FileNotFoundError: no such file, or a directory with neither checkpoint.
    """
    path = Path(path)
    if not path.is_dir():
        return path
    for name in (prefer, "last.pt" if prefer == "best.pt" else "best.pt"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path} holds no best.pt or last.pt: give a run directory or a .pt file")


class LoadedModel:
    """A model rebuilt from a checkpoint, in eval mode, with what inference needs.

    Attributes:
        model: the SwinTransformer (raw weights, or the EMA weights when asked).
        checkpoint: the checkpoint dict.
        config: its TrainConfig.
        class_names / class_ids: label order.
        image_size: side of the cache images it was trained on (predict resizes images to it).
        eval_size: (H, W) of the model's input, or None when it is the stored image size.
        input_size: (H, W) of the model's input.
    """

    def __init__(self, path: str | os.PathLike[str], *, device: str = "auto", ema: bool = False) -> None:
        self.path = resolve_checkpoint(path)
        ckpt = load_checkpoint(self.path)
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
        log: where a note about preparing the data goes.
        progress: show the progress of preparing the data, if it must be prepared.

    Returns:
        {"loss", "top1", "top5", "n", "split", "checkpoint", "ece"}.

    Raises:
        ValueError: the data's class list differs from the checkpoint's, or the split is missing.
    """
    loaded = LoadedModel(path, device=device, ema=ema)
    cfg = loaded.config
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
    loader = BatchLoader(
        images,
        labels,
        batch_size or cfg.eval_batch_size,
        shuffle=False,
        drop_last=False,
        device=loaded.device,
    )
    result = evaluate(
        loaded.model,
        iter(loader),
        loaded.normalize,
        num_classes=len(loaded.class_names),
        label_smoothing=cfg.label_smoothing,
        amp_dtype=loaded.amp_dtype,
    )
    return {
        "checkpoint": str(loaded.path),
        "split": split,
        "n": result.n,
        "loss": result.loss,
        "top1": result.top1,
        "top5": result.top5,
        "ece": result.summary(loaded.class_names)["ece"],
    }
