"""Synthetic test images shared by the augmentation tests."""

from __future__ import annotations

import numpy as np
import torch


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Natural-looking uint8 images (N, 3, size, size): colour waves, a gradient, an edge, grain."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3))
    for i in range(n):
        img = np.zeros((size, size, 3)) + rng.uniform(40, 200, size=3)
        for _ in range(3):
            f = rng.uniform(0.5, 3.0, size=2)
            amp = rng.uniform(10, 50, size=3)
            img += amp * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy) + rng.uniform(0, 6.3))[..., None]
        img += rng.uniform(-40, 40) * xx[..., None]
        img[: size // 3, : size // 2] += rng.uniform(-60, 60, size=3)  # an edge
        img += rng.normal(0, 3, size=img.shape)  # sensor grain
        out[i] = img
    if n > 1:
        out[1, :, :, :] = out[1, :, :, :1]  # one gray image (hue and saturation corner cases)
    if n > 2:
        out[2] = np.clip(out[2], 90, 160)  # a low-contrast one
    return torch.from_numpy(np.clip(out, 0, 255).round().astype(np.uint8)).permute(0, 3, 1, 2).contiguous()
