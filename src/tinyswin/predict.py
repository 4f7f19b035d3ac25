"""Inference on image files: decode them as `prepare` does and name the top classes of each."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyswin.data.imagefolder import decode_image
from tinyswin.evaluate import LoadedModel


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


@torch.no_grad()
def predict(
    path: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]],
    *,
    topk: int = 5,
    device: str = "auto",
    ema: bool = False,
) -> list[dict[str, Any]]:
    """The `topk` classes of each image file with their probabilities.

    Returns:
        One dict per image: {"image", "predictions": [{"class", "class_id", "index", "probability"}, ...]}.
    """
    loaded = LoadedModel(path, device=device, ema=ema)
    pixels = torch.from_numpy(load_images(images, loaded.image_size)).to(loaded.device)  # (N, S, S, 3)
    k = max(1, min(topk, len(loaded.class_names)))
    results = []
    for start in range(0, len(images), 64):
        x = loaded.normalize(pixels[start : start + 64])
        logits = loaded.model(x).float()  # (B, K)
        probs = logits.softmax(dim=1)
        top = probs.topk(k, dim=1)
        for i in range(x.shape[0]):
            preds = [
                {
                    "class": loaded.class_names[j],
                    "class_id": loaded.class_ids[j],
                    "index": j,
                    "probability": p,
                }
                for p, j in zip(top.values[i].tolist(), top.indices[i].tolist(), strict=True)
            ]
            results.append({"image": str(images[start + i]), "predictions": preds})
    return results
