"""Classification metrics: top-k, confusion matrix, per-class accuracy, expected calibration error."""

from __future__ import annotations

import torch


def topk_correct(
    logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> list[torch.Tensor]:
    """Number of samples whose target is among the k highest logits, for each k.

    Args:
        logits: (B, K) scores.
        targets: (B,) int64 class indices.
        ks: the k values; a k larger than K counts every sample.

    Returns:
        One 0-dim int64 tensor per k (on the logits' device).
    """
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (B, kmax)
    hits = top == targets[:, None]  # (B, kmax)
    return [hits[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts: row = true class, column = predicted class.

    Args:
        preds: (N,) int64 predicted classes.
        targets: (N,) int64 true classes.
        num_classes: K.
    """
    flat = targets.long() * num_classes + preds.long()  # (N,) index into the flattened (K, K) matrix
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(cm: torch.Tensor) -> list[float | None]:
    """Accuracy of each true class from a confusion matrix (None for a class with no samples)."""
    totals = cm.sum(dim=1)
    diag = cm.diagonal()
    return [(d / t).item() if t > 0 else None for d, t in zip(diag.double(), totals.double(), strict=True)]


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Per-bin sums for the calibration error; bins are (i/n, (i+1)/n], a confidence of 0 goes to bin 0.

    The sums add up across batches and processes, so the error of a whole split is `ece_from_bins(sum)`.

    Args:
        confidence: (N,) max softmax probability of each sample.
        correct: (N,) bool, whether the top-1 prediction was right.
        n_bins: number of equal-width bins.

    Returns:
        float64 (3, n_bins) on the CPU: sample count, sum of confidences, number correct.
    """
    conf = confidence.detach().double().cpu()
    acc = correct.detach().double().cpu()
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)  # (N,)
    count = torch.bincount(idx, minlength=n_bins).double()
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=acc, minlength=n_bins)
    return torch.stack([count, conf_sum, acc_sum])  # (3, n_bins)


def ece_from_bins(bins: torch.Tensor) -> float:
    """Expected calibration error from `calibration_bins` sums: sum_b |conf_sum_b - correct_b| / N."""
    n = bins[0].sum()
    if n == 0:
        return 0.0
    return ((bins[1] - bins[2]).abs().sum() / n).item()
