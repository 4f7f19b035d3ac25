"""Drawing a batch's augmentation parameters: ``sample_params`` for ``Augment.sample``, and its stages, which
``augment_device.sample_device`` shares.

Every stage draws from one ``torch.Generator`` on its device, in the pipeline's order (crop, flip,
RandAugment, ColorJitter, erasing, mixing), with the distributions of torchvision's transforms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tinyswin.data.augment_config import AugmentConfig
from tinyswin.data.augment_geometry import CropBoxes, sample_pad_crop, sample_resized_crop
from tinyswin.data.augment_mix import EraseParams, MixParams, sample_erasing, sample_mix
from tinyswin.data.augment_policy import (
    ColorJitterParams,
    RandAugmentParams,
    sample_color_jitter,
    sample_randaugment,
)

__all__ = ["AugmentParams", "sample_colour", "sample_crop", "sample_erase", "sample_mixing", "sample_params"]


@dataclass
class AugmentParams:
    """Every random draw for one batch (CPU tensors; None where a stage is off)."""

    crop: CropBoxes | None
    flip: Tensor
    randaug: RandAugmentParams | None
    jitter: ColorJitterParams | None
    erase: EraseParams | None
    mix: MixParams | None


def sample_crop(
    cfg: AugmentConfig, n: int, height: int, width: int, out_hw: tuple[int, int], generator: torch.Generator
) -> CropBoxes | None:
    """The crop boxes of ``cfg.crop`` ('rrc' or 'pad') for ``n`` images of size (height, width) resized to
    ``out_hw``; None for 'none'."""
    if cfg.crop == "rrc":
        return sample_resized_crop(n, height, width, cfg.crop_scale, cfg.crop_ratio, generator)
    if cfg.crop == "pad":
        return sample_pad_crop(n, *out_hw, out_hw, cfg.crop_padding, generator)
    return None


def sample_colour(
    cfg: AugmentConfig, n: int, out_hw: tuple[int, int], generator: torch.Generator
) -> tuple[RandAugmentParams | None, ColorJitterParams | None]:
    """RandAugment's and then ColorJitter's draws for ``n`` images of size ``out_hw`` (None where off)."""
    randaug = None
    if cfg.randaug_ops > 0:
        randaug = sample_randaugment(
            n, cfg.randaug_ops, cfg.randaug_magnitude, cfg.randaug_bins, cfg.randaug_magnitude_std, *out_hw,
            generator,
        )  # fmt: skip
    strengths = (cfg.jitter_brightness, cfg.jitter_contrast, cfg.jitter_saturation, cfg.jitter_hue)
    jitter = sample_color_jitter(n, *strengths, generator) if max(strengths) > 0 else None
    return randaug, jitter


def sample_erase(
    cfg: AugmentConfig, n: int, out_hw: tuple[int, int], generator: torch.Generator, dense_noise: bool = False
) -> EraseParams | None:
    """RandomErasing's draws (``augment_mix.sample_erasing``), None where it is off."""
    if cfg.erase_p <= 0:
        return None
    random_value = cfg.erase_value == "random"
    return sample_erasing(
        n, *out_hw, cfg.erase_p, cfg.erase_scale, cfg.erase_ratio, random_value, generator,
        dense_noise=dense_noise,
    )  # fmt: skip


def sample_mixing(
    cfg: AugmentConfig, n: int, out_hw: tuple[int, int], generator: torch.Generator
) -> MixParams:
    """Mixup / CutMix draws of ``cfg`` (per batch or per sample) for ``n`` images of size ``out_hw``."""
    return sample_mix(
        n, *out_hw, cfg.mixup_p, cfg.mixup_alpha, cfg.cutmix_p, cfg.cutmix_alpha, generator,
        per_sample=cfg.mix_per_sample, select=cfg.mix_select, lam_clip=cfg.mix_lambda_clip,
    )  # fmt: skip


def sample_params(
    cfg: AugmentConfig,
    n: int,
    height: int,
    width: int,
    out_hw: tuple[int, int],
    generator: torch.Generator,
    mix: bool = True,
) -> AugmentParams:
    """Draw every random parameter of one batch.

    Args:
        cfg: the pipeline.
        n: batch size.
        height, width: stored image size.
        out_hw: output size.
        generator: CPU generator (its state advances).
        mix: draw Mixup / CutMix (False: no mixing).

    Returns:
        AugmentParams.
    """
    crop = sample_crop(cfg, n, height, width, out_hw, generator)
    flip = torch.zeros(n, dtype=torch.bool)
    if cfg.hflip > 0:
        flip = torch.rand(n, generator=generator, dtype=torch.float64) < cfg.hflip
    randaug, jitter = sample_colour(cfg, n, out_hw, generator)
    erase = sample_erase(cfg, n, out_hw, generator)
    mixing = None
    if mix and (cfg.mixup_p > 0 or cfg.cutmix_p > 0):
        mixing = sample_mixing(cfg, n, out_hw, generator)
    return AugmentParams(crop=crop, flip=flip, randaug=randaug, jitter=jitter, erase=erase, mix=mixing)
