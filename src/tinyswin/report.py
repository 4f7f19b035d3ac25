"""`tinyswin report RUN [RUN ...]`: what a run gets wrong, gathered from its directory and its evaluation data
(the HTML is drawn by `tinyswin.report_html`).

    RUN/metrics.jsonl, config.yaml, summary.json      -> curves, final numbers, config keys
    RUN/best.pt (else last.pt) on the run's val split   -> per-class accuracy, confused pairs, mistakes with
                                                           their top-3, reliability diagram and ECE

The images come from the cache the run names (or `data`). A run whose data or checkpoint is gone still gets
its curves and tables, from summary.json, and one line saying why the images are missing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from tinyswin.data import BatchLoader, load_cache
from tinyswin.data.sources import resolve_data
from tinyswin.errors import TinyswinError, one_line
from tinyswin.evaluate import LoadedModel
from tinyswin.metrics import calibration_bins, confusion_matrix, ece_from_bins, per_class_accuracy
from tinyswin.plots import read_metrics
from tinyswin.runtime import autocast
from tinyswin.trackers import flatten

LogFn = Callable[[str], None]
PAIRS = 12  # most confused pairs shown
PER_PAIR = 4  # val images shown for each pair
MISTAKES = 48  # misclassified images in the grid
TOP = 3  # predictions shown for each mistake


@dataclass(frozen=True)
class Mistake:
    """A misclassified image: its index in the split, its true class, its top predictions (class,
    probability), best first."""

    index: int
    label: int
    top: tuple[tuple[int, float], ...]


@dataclass
class Analysis:
    """A model's predictions on one split, summed (and, where the images were at hand, image by image).

    Attributes:
        split: the split.
        source: which weights and data gave them, in words.
        class_names / class_ids: label order.
        confusion: int64 (K, K), rows = true class.
        bins: float64 (3, n_bins) calibration sums (`metrics.calibration_bins`), or None.
        pairs: the most confused (true, predicted, count), most first.
        pair_images: (true, predicted) -> indices of images behind the pair (most confident first).
        mistakes: the most confident mistakes.
        images: index -> uint8 (H, W, 3), every image the report shows.
    """

    split: str
    source: str
    class_names: list[str]
    class_ids: list[str]
    confusion: np.ndarray
    bins: np.ndarray | None
    pairs: list[tuple[int, int, int]] = field(default_factory=list)
    pair_images: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    mistakes: list[Mistake] = field(default_factory=list)
    images: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    @property
    def top1(self) -> float:
        return float(np.trace(self.confusion) / max(self.n, 1))

    @property
    def per_class(self) -> list[float | None]:
        return per_class_accuracy(torch.from_numpy(self.confusion))

    @property
    def ece(self) -> float | None:
        return None if self.bins is None else ece_from_bins(torch.from_numpy(self.bins))


@dataclass
class RunReport:
    """One run directory, read.

    Attributes:
        name: the directory's name.
        path: the directory.
        config: the run's config.yaml as flat dotted keys (empty without one).
        metrics: the records of metrics.jsonl.
        summary: summary.json, or None (a run still going or stopped).
        analysis: the evaluation the report shows, or None.
        notes: one line each: what is missing and why.
    """

    name: str
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    analysis: Analysis | None = None
    notes: list[str] = field(default_factory=list)


def top_pairs(confusion: np.ndarray, count: int = PAIRS) -> list[tuple[int, int, int]]:
    """The `count` largest off-diagonal cells of a confusion matrix: (true, predicted, images), most first
    (ties: the lower true class, then the lower predicted class, first)."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    order = np.lexsort((np.arange(off.size), -off.ravel()))  # by count, descending; then by position
    pairs = []
    for flat in order[:count]:
        t, p = divmod(int(flat), off.shape[1])
        if off[t, p] <= 0:
            break
        pairs.append((t, p, int(off[t, p])))
    return pairs


def _from_summary(summary: dict[str, Any], names: list[str]) -> Analysis | None:
    """The numbers-only analysis that summary.json holds (no images)."""
    key = next((k for k in summary if k.endswith("_details")), None)
    details = summary.get(key) if key else None
    if not isinstance(details, dict) or "confusion_matrix" not in details:
        return None
    confusion = np.asarray(details["confusion_matrix"], dtype=np.int64)
    names = names or list(details.get("per_class_accuracy", {})) or [str(i) for i in range(len(confusion))]
    bins = details.get("calibration_bins")
    split = key.removesuffix("_details")
    return Analysis(
        split=split,
        source=f"summary.json: the final weights on {split}",
        class_names=names,
        class_ids=names,
        confusion=confusion,
        bins=None if bins is None else np.asarray(bins, dtype=np.float64),
        pairs=top_pairs(confusion),
    )


@torch.no_grad()
def predict_split(
    loaded: LoadedModel, images: np.ndarray, labels: np.ndarray, batch_size: int, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The top-`TOP` predictions of every image of a split, as the run evaluated (its transform, precision and
    test-time flip).

    Returns:
        int64 (N, TOP) classes and float32 (N, TOP) probabilities, best first.
    """
    loader = BatchLoader(images, labels, batch_size, shuffle=False, drop_last=False, device=loaded.device)
    flip = loaded.config.tta == "flip"
    classes, probs = [], []
    for batch, _labels in tqdm(loader, desc="report: predicting", leave=False, disable=not progress):
        x = loaded.normalize(batch)  # (B, 3, H, W)
        with autocast(loaded.device, loaded.amp_dtype):
            logits = loaded.model(x).float()  # (B, K)
            if flip:
                logits = (logits + loaded.model(x.flip(-1)).float()) * 0.5
        top = logits.softmax(dim=1).topk(min(TOP, logits.shape[1]), dim=1)
        classes.append(top.indices.cpu())
        probs.append(top.values.cpu())
    return torch.cat(classes).numpy(), torch.cat(probs).numpy()


def analyse(
    loaded: LoadedModel, images: np.ndarray, labels: np.ndarray, split: str, progress: bool = False
) -> Analysis:
    """The model's predictions on a split: confusion, calibration, confused pairs and mistakes with images."""
    k = len(loaded.class_names)
    classes, probs = predict_split(loaded, images, labels, loaded.config.eval_batch_size, progress)
    labels = np.asarray(labels, dtype=np.int64)
    pred, confidence = classes[:, 0], probs[:, 0]  # (N,), (N,)
    confusion = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(labels), k).numpy()
    bins = calibration_bins(torch.from_numpy(confidence), torch.from_numpy(pred == labels)).numpy()
    epoch = loaded.checkpoint.get("epoch")
    analysis = Analysis(
        split=split,
        source=f"{loaded.path.name} (epoch {epoch}) on {split}, {len(labels)} images",
        class_names=loaded.class_names,
        class_ids=loaded.class_ids,
        confusion=confusion,
        bins=bins,
        pairs=top_pairs(confusion),
    )
    by_confidence = np.argsort(-confidence, kind="stable")  # (N,) most confident first
    wrong = by_confidence[pred[by_confidence] != labels[by_confidence]]
    for t, p, _count in analysis.pairs:
        analysis.pair_images[(t, p)] = [int(i) for i in wrong[(labels[wrong] == t) & (pred[wrong] == p)]][
            :PER_PAIR
        ]
    for i in wrong[:MISTAKES]:
        top = tuple((int(c), float(q)) for c, q in zip(classes[i], probs[i], strict=True))
        analysis.mistakes.append(Mistake(int(i), int(labels[i]), top))
    shown = {m.index for m in analysis.mistakes} | {i for ids in analysis.pair_images.values() for i in ids}
    analysis.images = {i: np.asarray(images[i]) for i in sorted(shown)}
    return analysis


def _read_run(path: Path) -> RunReport:
    """The files of a run directory: config, metrics, summary.

    Raises:
        FileNotFoundError: not a directory, or one without metrics.jsonl (not a run).
    """
    if not path.is_dir():
        raise FileNotFoundError(f"run directory not found: {path}")
    if not (path / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl: not a tinyswin run directory")
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        data = yaml.safe_load((path / "config.yaml").read_text())
        config = flatten(data) if isinstance(data, dict) else {}  # dotted keys, as the trackers log them
    summary = None
    if (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text())
    return RunReport(path.name, path, config, read_metrics(path / "metrics.jsonl"), summary)


def gather(
    run_dir: str | os.PathLike[str],
    *,
    data: str | None = None,
    split: str | None = None,
    device: str = "cpu",
    log: LogFn = print,
    progress: bool = False,
) -> RunReport:
    """Read a run directory and evaluate its model on its data for the report.

    Args:
        run_dir: the run directory.
        data: a cache or source to take the images from (default: the run's own).
        split: the split to analyse (default: val if the data has it, else the run's selection split).
        device: where the model runs.
        log: where notes go.
        progress: show a progress bar over the predictions.

    Raises:
        FileNotFoundError: `run_dir` is not a run directory.
    """
    report = _read_run(Path(run_dir))
    try:
        loaded = LoadedModel(report.path, device=device)
    except (FileNotFoundError, TinyswinError, ValueError, RuntimeError, OSError) as exc:
        report.notes.append(f"no images: the run's checkpoint cannot be read ({one_line(exc)})")
        report.analysis = _from_summary(report.summary or {}, [])
        return report
    cfg = loaded.config
    source = data if data is not None else cfg.data.source
    try:
        data_cfg = cfg.data
        path = resolve_data(source, size=data_cfg.size, holdout=data_cfg.holdout,
                            holdout_seed=data_cfg.holdout_seed, log=log, progress=False)  # fmt: skip
        cache = load_cache(path)
        if cache.class_names != loaded.class_names:
            raise ValueError(f"{cache.path} holds other classes than the run's")
        name = split or ("val" if "val" in cache.splits else cfg.data.val_split)
        images, labels = cache.split(name)
    except (FileNotFoundError, TinyswinError, ValueError, OSError) as exc:
        where = "--data" if data is not None else "the run's data"
        report.notes.append(
            f"no images: {where} ({source or 'the built-in dataset'}) cannot be read: {one_line(exc)}; "
            "give it with --data CACHE"
        )
        report.analysis = _from_summary(report.summary or {}, loaded.class_names)
        return report
    report.analysis = analyse(loaded, images, labels, name, progress)
    return report
