"""Batched augmentation (tinyswin.data.augment*): op parity with torchvision, distributions, mixing.

Parity tests pin the per-sample parameters and compare with torchvision's functional ops on uint8 tensors,
image by image. Tolerances: 0 (bit for bit) for every colour, pixel and nearest-neighbour op and for
bilinear upsampling crops; for bilinear RandAugment warps, shrinking (antialiased) and bicubic crops, a
value may sit on a .5 rounding tie that float rounding of the interpolation weights resolves the other
way, so those allow a difference of 1 level on a small fraction of pixels (MAE <= 1/255 and far below).
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode
from torchvision.transforms.autoaugment import _apply_op

from imagegen import smooth_images
from tinyswin.data import augment_geometry as geo
from tinyswin.data import augment_mix as mixing
from tinyswin.data import augment_ops as ops
from tinyswin.data import augment_policy as policy
from tinyswin.data import augment_table as table
from tinyswin.data.augment import Augment, AugmentConfig, augment_preset, augment_preset_names, build_augment

MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2296, 0.2263, 0.2255)


pytestmark = pytest.mark.usefixtures("one_thread")


def per_image(images: torch.Tensor, fn) -> torch.Tensor:
    """torchvision reference: ``fn(i, image)`` on each uint8 image, stacked as float."""
    return torch.stack([fn(i, img) for i, img in enumerate(images)]).float()


def diff_stats(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(max abs difference, fraction of differing values, mean abs difference / 255)."""
    d = (ours.float() - ref.float()).abs()
    return d.max().item(), (d > 0).float().mean().item(), d.mean().item() / 255.0


def factors(n: int, low: float, high: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- parity


COLOUR_CASES = {
    "brightness": (lambda x, f: ops.adjust_brightness(x, f), TF.adjust_brightness, (0.1, 1.9)),
    "saturation": (lambda x, f: ops.adjust_saturation(x, f), TF.adjust_saturation, (0.0, 2.0)),
    "contrast": (lambda x, f: ops.adjust_contrast(x, f), TF.adjust_contrast, (0.1, 1.9)),
    "sharpness": (lambda x, f: ops.adjust_sharpness(x, f), TF.adjust_sharpness, (0.1, 1.9)),
    "hue": (lambda x, f: ops.adjust_hue(x, f), TF.adjust_hue, (-0.5, 0.5)),
    "solarize": (lambda x, f: ops.solarize(x, f), TF.solarize, (0.0, 255.0)),
}


@pytest.mark.parametrize("name", sorted(COLOUR_CASES))
def test_colour_ops_equal_torchvision_bit_for_bit(images: torch.Tensor, name: str) -> None:
    ours_fn, ref_fn, (low, high) = COLOUR_CASES[name]
    f = factors(len(images), low, high)
    ours = ours_fn(images.float(), f)
    ref = per_image(images, lambda i, img: ref_fn(img, float(f[i])))
    assert diff_stats(ours, ref)[0] == 0.0


@pytest.mark.parametrize("name", ["posterize", "autocontrast", "equalize"])
def test_histogram_and_bit_ops_equal_torchvision_bit_for_bit(images: torch.Tensor, name: str) -> None:
    bits = torch.arange(len(images)) % 9  # 0..8 bits
    if name == "posterize":
        ours = ops.posterize(images.float(), bits)
        ref = per_image(images, lambda i, img: TF.posterize(img, int(bits[i])))
    elif name == "autocontrast":
        ours = ops.autocontrast(images.float())
        ref = per_image(images, lambda i, img: TF.autocontrast(img))
    else:
        ours = ops.equalize(images.float())
        ref = per_image(images, lambda i, img: TF.equalize(img))
    assert diff_stats(ours, ref)[0] == 0.0


def test_equalize_constant_and_two_level_channels() -> None:
    flat = torch.full((2, 3, 8, 8), 77.0)
    flat[1, :, :4] = 10.0  # two levels: torchvision's step is (64 - 32) // 255 = 0, image unchanged
    ref = torch.stack([TF.equalize(img.to(torch.uint8)) for img in flat]).float()
    assert torch.equal(ops.equalize(flat), ref)


GEOMETRIC = {
    "ShearX": [0.05, -0.3, 0.17],
    "ShearY": [-0.05, 0.3],
    "TranslateX": [4.83, -14.5, 9.0],
    "TranslateY": [-4.83, 14.5],
    "Rotate": [5.0, -30.0, 17.3],
}


@pytest.mark.parametrize("op", sorted(GEOMETRIC))
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_geometric_ops_match_torchvision(images: torch.Tensor, op: str, interpolation: str) -> None:
    n = len(images)
    values = torch.tensor(GEOMETRIC[op], dtype=torch.float64)[torch.arange(n) % len(GEOMETRIC[op])]
    ours = policy.apply_randaugment_op(images.float(), op, values, interpolation)
    mode = InterpolationMode(interpolation)
    ref = per_image(images, lambda i, img: _apply_op(img, op, float(values[i]), mode, None))
    worst, frac, mae = diff_stats(ours, ref)
    if interpolation == "nearest" or op.startswith("Translate"):
        assert worst == 0.0
    else:  # rounding ties of bilinear weights
        assert worst <= 1.0 and frac < 0.01 and mae <= 1.0 / 255.0


@pytest.mark.parametrize(("num_bins", "height", "width"), [(31, 64, 48), (11, 32, 32)])
def test_the_op_table_is_torchvisions_augmentation_space(num_bins: int, height: int, width: int) -> None:
    space = T.RandAugment()._augmentation_space(num_bins, (height, width))
    assert tuple(space) == table.RANDAUGMENT_OPS  # torchvision's order: an op draw indexes both alike
    bins = torch.arange(num_bins, dtype=torch.float64)
    for row in table.RANDAUGMENT:
        magnitudes, signed = space[row.name]
        assert row.signed == signed, row.name
        expected = magnitudes.double().expand(num_bins)  # a 0-d tensor: the op takes no argument
        assert torch.equal(row.values(bins, num_bins, height, width), expected), row.name
    kinds = {name: table.op_row(name).kind for name in space}
    assert {name for name, kind in kinds.items() if kind is table.Geometric} == set(GEOMETRIC)
    assert {name for name, kind in kinds.items() if kind is table.Blend} == {"Color", "Sharpness"}
    assert table.op_row("Identity").identity and not table.op_row("Equalize").identity
    with pytest.raises(ValueError, match="unknown RandAugment op 'Invert'"):
        table.op_row("Invert")


@pytest.mark.parametrize("magnitude_std", [0.0, 1.5])
def test_randaugment_sequences_equal_torchvision(images: torch.Tensor, magnitude_std: float) -> None:
    n, _, h, w = images.shape
    g = torch.Generator().manual_seed(3)
    params = policy.sample_randaugment(n, 3, 9, 31, magnitude_std, h, w, g)
    ours = policy.randaugment_(images.float(), params)

    def reference(i: int, img: torch.Tensor) -> torch.Tensor:
        for slot in range(3):
            name = policy.RANDAUGMENT_OPS[int(params.ops[i, slot])]
            img = _apply_op(img, name, float(params.values[i, slot]), InterpolationMode.NEAREST, None)
        return img

    assert diff_stats(ours, per_image(images, reference))[0] == 0.0


def test_color_jitter_equals_torchvision_in_each_samples_order(images: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(4)
    params = policy.sample_color_jitter(len(images), 0.4, 0.4, 0.4, 0.1, g)
    ours = policy.color_jitter_(images.float(), params)
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)

    def reference(i: int, img: torch.Tensor) -> torch.Tensor:
        for k in params.order[i].tolist():
            img = fns[k](img, float(params.factors[i, k]))
        return img

    assert diff_stats(ours, per_image(images, reference))[0] == 0.0


def test_color_jitter_skips_disabled_ops() -> None:
    imgs = smooth_images(8)
    params = policy.sample_color_jitter(8, 0.3, 0.0, 0.0, 0.0, torch.Generator().manual_seed(0))
    ours = policy.color_jitter_(imgs.float(), params)
    ref = per_image(imgs, lambda i, img: TF.adjust_brightness(img, float(params.factors[i, 0])))
    assert diff_stats(ours, ref)[0] == 0.0


def crop_reference(images, boxes, flip, size, interpolation):
    def one(i, img):
        out = TF.resized_crop(
            img,
            int(boxes.top[i]),
            int(boxes.left[i]),
            int(boxes.height[i]),
            int(boxes.width[i]),
            list(size),
            InterpolationMode(interpolation),
            antialias=True,
        )
        return TF.hflip(out) if flip[i] else out

    return per_image(images, one)


@pytest.mark.parametrize(
    ("scale", "out", "interpolation", "exact"),
    [
        ((0.9, 1.0), None, "bilinear", True),  # the seed recipe: upsampling, one grid_sample
        ((0.08, 1.0), None, "bilinear", True),
        ((0.3, 1.0), 0.5, "bilinear", False),  # shrinking: antialiased separable filter
        ((0.3, 1.0), None, "bicubic", False),
    ],
)
def test_resized_crop_with_flip_matches_torchvision(images, scale, out, interpolation, exact) -> None:
    n, _, h, w = images.shape
    size = (h, w) if out is None else (int(h * out), int(w * out))
    g = torch.Generator().manual_seed(5)
    boxes = geo.sample_resized_crop(n, h, w, scale, (3 / 4, 4 / 3), g)
    flip = torch.arange(n) % 2 == 0
    ours = geo.resized_crop(images.float(), boxes, flip, size, interpolation)
    worst, frac, mae = diff_stats(ours, crop_reference(images, boxes, flip, size, interpolation))
    if exact:
        assert worst == 0.0
    else:
        assert worst <= 1.0 and frac < 0.01 and mae <= 1.0 / 255.0


def test_pad_crop_matches_torchvision() -> None:
    imgs = smooth_images(16)
    g = torch.Generator().manual_seed(6)
    boxes = geo.sample_pad_crop(16, 32, 32, (32, 32), 4, g)
    flip = torch.arange(16) % 3 == 0
    ours = geo.pad_crop(imgs.float(), boxes, flip, 4)

    def one(i, img):
        out = TF.crop(TF.pad(img, 4), int(boxes.top[i]), int(boxes.left[i]), 32, 32)
        return TF.hflip(out) if flip[i] else out

    assert diff_stats(ours, per_image(imgs, one))[0] == 0.0


@pytest.mark.parametrize("per_box", [True, False])  # the CPU's slice per box, the GPU's indexed write
@pytest.mark.parametrize("random_value", [True, False])
def test_erasing_matches_torchvision_erase(random_value: bool, per_box: bool) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 3, 16, 16, generator=g)
    params = mixing.sample_erasing(40, 16, 16, 0.5, (0.02, 0.33), (0.3, 3.3), random_value, g)
    ours = mixing.erase_(x.clone(), params, (1.0, -2.0, 3.0), per_box=per_box)
    ref, used = [], 0
    for i in range(40):
        if not params.apply[i]:
            ref.append(x[i])
            continue
        h, w = int(params.height[i]), int(params.width[i])
        if random_value:
            value = params.noise[used : used + 3 * h * w].view(3, h, w)
            used += 3 * h * w
        else:
            value = torch.tensor([1.0, -2.0, 3.0]).view(3, 1, 1)
        ref.append(TF.erase(x[i], int(params.top[i]), int(params.left[i]), h, w, value))
    assert torch.equal(ours, torch.stack(ref))
    assert 10 < int(params.apply.sum()) < 30  # p = 0.5 of 40


def test_normalize_eval_path_matches_to_tensor_and_normalize() -> None:
    imgs = smooth_images(6, size=32)
    aug = build_augment("seed", MEAN, STD, 10)
    ref = torch.stack([TF.normalize(img.float() / 255.0, MEAN, STD) for img in imgs])
    assert torch.allclose(aug.normalize(imgs.permute(0, 2, 3, 1)), ref, atol=1e-5)
    resized = torch.stack([TF.resize(img, [48, 48], antialias=True) for img in imgs])
    ref48 = torch.stack([TF.normalize(img.float() / 255.0, MEAN, STD) for img in resized])
    assert torch.allclose(aug.normalize(imgs, size=48), ref48, atol=1e-5)


def test_normalize_eval_path_takes_a_height_and_width() -> None:
    imgs = smooth_images(6, size=32)
    aug = build_augment("seed", MEAN, STD, 10)
    out = aug.normalize(imgs.permute(0, 2, 3, 1), size=(24, 32))
    assert out.shape == (6, 3, 24, 32)
    resized = geo.resize(imgs.float(), (24, 32), aug.config.interpolation)  # (6, 3, 24, 32) whole numbers
    assert torch.equal(out, aug.normalize(resized.to(torch.uint8)))
    ref = torch.stack([TF.resize(img, [24, 32], antialias=True) for img in imgs])
    assert torch.allclose(
        out, torch.stack([TF.normalize(img.float() / 255.0, MEAN, STD) for img in ref]), atol=1e-5
    )


# -------------------------------------------------------------------------------------- distributions


def test_randaugment_op_choices_signs_and_magnitudes_follow_the_configuration() -> None:
    n = 7000
    g = torch.Generator().manual_seed(8)
    params = policy.sample_randaugment(n, 2, 9, 31, 0.0, 64, 64, g)
    counts = torch.bincount(params.ops.flatten(), minlength=14).double()
    expected = 2 * n / 14
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 34.5  # chi-square, 13 degrees of freedom, p = 0.001
    assert torch.all(params.magnitudes == 9)
    rotate = params.ops == policy.RANDAUGMENT_OPS.index("Rotate")
    assert set(params.values[rotate].abs().tolist()) == {9.0}  # linspace(0, 30, 31)[9]
    negative = (params.values[rotate] < 0).double().mean().item()
    assert abs(negative - 0.5) < 4 * math.sqrt(0.25 / rotate.sum().item())
    posterize = params.ops == policy.RANDAUGMENT_OPS.index("Posterize")
    assert set(params.values[posterize].tolist()) == {7.0}  # 8 - round(9 / 7.5)
    solarize = params.ops == policy.RANDAUGMENT_OPS.index("Solarize")
    assert set(params.values[solarize].tolist()) == {255.0 - 9 * 8.5}

    spread = policy.sample_randaugment(n, 2, 9, 31, 2.0, 64, 64, g).magnitudes.flatten()
    assert abs(spread.mean().item() - 9.0) < 0.1 and abs(spread.std().item() - 2.0) < 0.1
    uniform = policy.sample_randaugment(n, 2, 9, 31, math.inf, 64, 64, g).magnitudes.flatten()
    assert uniform.min() >= 0 and uniform.max() <= 9 and abs(uniform.mean().item() - 4.5) < 0.15


def test_crop_and_erasing_boxes_follow_torchvisions_distribution() -> None:
    n = 3000
    g = torch.Generator().manual_seed(9)
    ours = geo.sample_resized_crop(n, 64, 64, (0.35, 1.0), (3 / 4, 4 / 3), g)
    torch.manual_seed(0)
    img = torch.zeros(3, 64, 64)
    theirs = torch.tensor(
        [T.RandomResizedCrop.get_params(img, [0.35, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    )
    assert torch.all(ours.top + ours.height <= 64) and torch.all(ours.left + ours.width <= 64)
    for a, b in (
        ((ours.height * ours.width).double(), (theirs[:, 2] * theirs[:, 3]).double()),
        (ours.width.double() / ours.height.double(), theirs[:, 3].double() / theirs[:, 2].double()),
        (ours.top.double(), theirs[:, 0].double()),
    ):
        se = math.sqrt(a.var().item() / n + b.var().item() / n)
        assert abs(a.mean().item() - b.mean().item()) < 4 * se  # same mean
        assert abs(a.std().item() / b.std().item() - 1.0) < 0.1  # same spread

    erase = mixing.sample_erasing(n, 64, 64, 1.0, (0.02, 0.33), (0.3, 3.3), False, g)
    eraser = T.RandomErasing(p=1.0, scale=(0.02, 0.33), ratio=(0.3, 3.3))
    boxes = torch.tensor([eraser.get_params(img, eraser.scale, eraser.ratio, [0.0])[:4] for _ in range(n)])
    area_ours = (erase.height * erase.width).double()
    area_theirs = (boxes[:, 2] * boxes[:, 3]).double()
    se = math.sqrt(area_ours.var().item() / n + area_theirs.var().item() / n)
    assert abs(area_ours.mean().item() - area_theirs.mean().item()) < 4 * se
    assert torch.all(erase.top + erase.height <= 64) and torch.all(erase.left + erase.width <= 64)


def test_flip_erasing_and_jitter_parameters_follow_their_probabilities_and_ranges() -> None:
    n = 4000
    g = torch.Generator().manual_seed(9)
    jitter = policy.sample_color_jitter(n, 0.2, 0.3, 0.4, 0.05, g)
    lows, highs = torch.tensor([0.8, 0.7, 0.6, -0.05]), torch.tensor([1.2, 1.3, 1.4, 0.05])
    assert torch.all(jitter.factors >= lows.double()) and torch.all(jitter.factors <= highs.double())
    codes = (jitter.order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[torch.bincount(codes, minlength=256) > 0].double()
    assert len(counts) == 24  # every order of the four ops occurs
    chi2 = ((counts - n / 24) ** 2 / (n / 24)).sum().item()
    assert chi2 < 49.7  # 23 degrees of freedom, p = 0.001

    aug = build_augment(augment_preset("seed", hflip=0.3, erase_p=0.25), MEAN, STD, 10)
    params = aug.sample(n, 64, 64, g)
    for rate, p in (
        (params.flip.double().mean().item(), 0.3),
        (params.erase.apply.double().mean().item(), 0.25),
    ):
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_mix_mode_and_lambda_distributions() -> None:
    g = torch.Generator().manual_seed(10)
    n = 6000
    draws = mixing.sample_mix(n, 16, 16, 0.3, 0.4, 0.3, 0.8, g, per_sample=True)
    for mode, p in ((1, 0.3), (2, 0.7 * 0.3)):  # sequential: Mixup with 0.3, else CutMix with 0.3
        rate = (draws.mode == mode).double().mean().item()
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)
    lam = draws.lam[draws.mode == 1]
    assert lam.min() >= 0.001 and lam.max() <= 0.999
    assert (
        abs(lam.mean().item() - 0.5) < 0.03 and abs(lam.var().item() - 1 / (4 * 1.8)) < 0.02
    )  # Beta(.4, .4)
    assert torch.all(draws.lam[draws.mode == 0] == 1.0)
    exclusive = mixing.sample_mix(n, 16, 16, 0.3, 0.4, 0.3, 0.8, g, per_sample=True, select="exclusive")
    rate = (exclusive.mode == 2).double().mean().item()
    assert abs(rate - 0.3) < 4 * math.sqrt(0.21 / n)
    batches = [mixing.sample_mix(8, 16, 16, 0.3, 0.4, 0.3, 0.8, g) for _ in range(200)]
    assert all(len(set(b.mode.tolist())) == 1 and len(set(b.lam.tolist())) == 1 for b in batches)
    assert {int(b.mode[0]) for b in batches} == {0, 1, 2}
    assert all(sorted(b.partner.tolist()) == list(range(8)) for b in batches)


# ----------------------------------------------------------------------------------- whole pipeline


def seed_augment(**overrides) -> Augment:
    return build_augment(augment_preset("seed", **overrides), MEAN, STD, num_classes=10)


def test_seed_preset_is_the_notebooks_recipe() -> None:
    cfg = augment_preset("seed")
    assert (cfg.out_size, cfg.crop, cfg.crop_scale, cfg.interpolation) == (64, "rrc", (0.9, 1.0), "bilinear")
    assert cfg.crop_ratio == pytest.approx((3 / 4, 4 / 3)) and cfg.hflip == 0.5
    assert (cfg.randaug_ops, cfg.randaug_magnitude, cfg.randaug_bins, cfg.randaug_magnitude_std) == (
        2,
        5,
        31,
        0,
    )
    jitter = (cfg.jitter_brightness, cfg.jitter_contrast, cfg.jitter_saturation, cfg.jitter_hue)
    assert jitter == (0.2, 0.2, 0.2, 0.05)
    erase = (cfg.erase_p, cfg.erase_scale, cfg.erase_ratio, cfg.erase_value)
    assert erase == (0.1, (0.02, 0.2), (0.3, 3.3), "random")
    assert (cfg.mixup_p, cfg.mixup_alpha, cfg.cutmix_p, cfg.cutmix_alpha) == (0.3, 0.4, 0.3, 0.8)
    assert (cfg.mix_per_sample, cfg.mix_lambda_clip, cfg.mix_label_smoothing) == (False, (0.001, 0.999), 0.0)
    assert {"seed", "none", "light"} <= set(augment_preset_names())


def test_two_samples_of_one_batch_get_different_crops_flips_and_ops() -> None:
    imgs = smooth_images(1, size=64).permute(0, 2, 3, 1).expand(16, 64, 64, 3).contiguous()
    aug = seed_augment(mixup_p=0.0, cutmix_p=0.0, erase_p=0.0)
    params = aug.sample(16, 64, 64, torch.Generator().manual_seed(11))
    assert (
        len(
            {
                tuple(b)
                for b in torch.stack([params.crop.top, params.crop.left, params.crop.height], 1).tolist()
            }
        )
        > 8
    )
    assert 0 < int(params.flip.sum()) < 16
    assert len({tuple(o) for o in params.randaug.ops.tolist()}) > 8
    x, _ = aug.apply(imgs, torch.zeros(16, dtype=torch.int64), params)
    flat = x.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(16) for j in range(i + 1, 16))


def test_same_seed_gives_the_same_batch_and_another_seed_does_not() -> None:
    imgs = smooth_images(12, size=64).permute(0, 2, 3, 1)
    labels = torch.arange(12) % 10
    aug = seed_augment(mixup_p=1.0)
    x1, t1 = aug(imgs, labels, torch.Generator().manual_seed(12))
    x2, t2 = aug(imgs, labels, torch.Generator().manual_seed(12))
    x3, _ = aug(imgs, labels, torch.Generator().manual_seed(13))
    assert torch.equal(x1, x2) and torch.equal(t1, t2)
    assert not torch.allclose(x1, x3)


def test_channels_first_and_last_inputs_agree() -> None:
    imgs = smooth_images(8, size=64)
    aug = seed_augment()
    a = aug(imgs, torch.arange(8), torch.Generator().manual_seed(14))
    b = aug(imgs.permute(0, 2, 3, 1).contiguous(), torch.arange(8), torch.Generator().manual_seed(14))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_cutmix_targets_sum_to_one_and_equal_the_pasted_pixel_fraction() -> None:
    n = 8
    labels = torch.arange(n)
    imgs = (torch.arange(n, dtype=torch.uint8) * 20).view(n, 1, 1, 1).expand(n, 32, 32, 3).contiguous()
    aug = build_augment(AugmentConfig(cutmix_p=1.0, cutmix_alpha=1.0), MEAN, STD, num_classes=n)
    for seed in range(5):
        x, targets = aug(imgs, labels, torch.Generator().manual_seed(seed))
        assert targets.dtype == torch.float32 and torch.allclose(targets.sum(1), torch.ones(n))
        own = aug.normalize(imgs)  # constant images: each pixel tells its source
        from_own = (x == own).all(dim=1).float().mean(dim=(1, 2))  # (N,) fraction of own pixels kept
        assert torch.allclose(targets[torch.arange(n), labels], from_own, atol=1e-6)
        pasted = 1.0 - from_own
        partner = targets.clone()
        partner[torch.arange(n), labels] = 0.0
        assert torch.allclose(partner.sum(1), pasted, atol=1e-6)
        assert (pasted > 0).any()


def test_mixup_blends_pixels_and_targets_with_the_same_lambda_and_smoothing_is_folded_in() -> None:
    n, k, eps = 6, 6, 0.1
    labels = torch.arange(n)
    imgs = (torch.arange(n, dtype=torch.uint8) * 40).view(n, 1, 1, 1).expand(n, 16, 16, 3).contiguous()
    cfg = AugmentConfig(mixup_p=1.0, mixup_alpha=0.4, mix_label_smoothing=eps)
    aug = build_augment(cfg, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), num_classes=k)
    params = aug.sample(n, 16, 16, torch.Generator().manual_seed(15))
    x, targets = aug.apply(imgs, labels, params)
    lam, partner = params.mix.lam, params.mix.partner
    own, other = labels.double() * 40, labels[partner].double() * 40
    assert torch.allclose(x[:, 0, 0, 0].double() * 255.0, lam * own + (1 - lam) * other, atol=1e-3)
    expected = torch.full((n, k), eps / k, dtype=torch.float64)
    expected[torch.arange(n), labels] += (1 - eps) * lam
    expected[torch.arange(n), labels[partner]] += (1 - eps) * (1 - lam)
    assert torch.allclose(targets.double(), expected, atol=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(n)) and 0.001 <= lam[0] <= 0.999


def test_per_sample_mixing_mixes_some_samples_and_keeps_others() -> None:
    n = 32
    imgs = smooth_images(n, size=32).permute(0, 2, 3, 1)
    cfg = AugmentConfig(mixup_p=0.3, mixup_alpha=0.4, cutmix_p=0.3, cutmix_alpha=1.0, mix_per_sample=True)
    aug = build_augment(cfg, MEAN, STD, num_classes=n)
    params = aug.sample(n, 32, 32, torch.Generator().manual_seed(16))
    assert len(set(params.mix.mode.tolist())) == 3 and len(set(params.mix.lam.tolist())) > 5
    x, targets = aug.apply(imgs, torch.arange(n), params)
    plain = aug.normalize(imgs)
    kept = params.mix.mode == 0
    assert torch.equal(x[kept], plain[kept])
    assert torch.allclose(targets.sum(1), torch.ones(n))
    assert torch.allclose(targets[torch.arange(n), torch.arange(n)][kept], torch.ones(int(kept.sum())))


def test_mix_false_and_unmixed_batches_give_integer_targets() -> None:
    imgs = smooth_images(8, size=64).permute(0, 2, 3, 1)
    labels = torch.arange(8)
    aug = seed_augment(mixup_p=1.0)
    _, targets = aug(imgs, labels, torch.Generator().manual_seed(17), mix=False)
    assert targets.dtype == torch.int64 and torch.equal(targets, labels)
    _, soft = aug(imgs, labels, torch.Generator().manual_seed(17))
    assert soft.dtype == torch.float32 and soft.shape == (8, 10)
    none = build_augment("none", MEAN, STD, 10)
    x, targets = none(imgs, labels, torch.Generator().manual_seed(17))
    assert targets.dtype == torch.int64 and torch.equal(x, none.normalize(imgs))


def test_flip_without_crop_mirrors_the_chosen_samples() -> None:
    imgs = smooth_images(16, size=32).permute(0, 2, 3, 1)
    aug = build_augment(AugmentConfig(hflip=0.5), MEAN, STD, 10)
    params = aug.sample(16, 32, 32, torch.Generator().manual_seed(20))
    x, _ = aug.apply(imgs, torch.arange(16), params)
    plain = aug.normalize(imgs)
    expected = torch.where(params.flip.view(16, 1, 1, 1), plain.flip(3), plain)
    assert torch.equal(x, expected) and 0 < int(params.flip.sum()) < 16


def test_out_size_gives_the_training_resolution() -> None:
    imgs = smooth_images(4, size=64).permute(0, 2, 3, 1)
    for crop in ("rrc", "pad", "none"):
        aug = build_augment(AugmentConfig(crop=crop, out_size=40, crop_scale=(0.5, 1.0)), MEAN, STD, 10)
        x, _ = aug(imgs, torch.arange(4), torch.Generator().manual_seed(18))
        assert x.shape == (4, 3, 40, 40)


def test_bad_configuration_and_inputs_raise_one_clear_error() -> None:
    with pytest.raises(ValueError, match="hflip"):
        augment_preset("seed", hflip=1.5)
    with pytest.raises(ValueError, match="crop"):
        AugmentConfig(crop="square")
    with pytest.raises(ValueError, match="colour_jitter"):
        augment_preset("seed", colour_jitter=0.1)
    with pytest.raises(ValueError, match="nope"):
        augment_preset("nope")
    with pytest.raises(ValueError, match="mixup_alpha"):
        AugmentConfig(mixup_p=0.5)
    aug = seed_augment()
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.zeros(2, 64, 64, 3), torch.zeros(2, dtype=torch.int64), torch.Generator())
    assert build_augment({"preset": "seed", "hflip": 0.0}, MEAN, STD, 10).config.hflip == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_agrees_with_cpu_batch() -> None:
    imgs = smooth_images(32, size=64).permute(0, 2, 3, 1).contiguous()
    labels = torch.arange(32) % 10
    aug = seed_augment(mixup_p=0.0, cutmix_p=1.0)
    x_cpu, t_cpu = aug(imgs, labels, torch.Generator().manual_seed(19))
    x_gpu, t_gpu = aug(imgs.cuda(), labels.cuda(), torch.Generator().manual_seed(19))
    assert x_gpu.device.type == "cuda"
    # same draws; float reductions (contrast means) and grid arithmetic may round differently on the GPU,
    # which moves a value on a rounding tie by one level or a nearest-neighbour sample on a .5 tie
    d = (x_gpu.cpu() - x_cpu).abs()
    assert (d > 1e-4).float().mean().item() < 0.002 and d.mean().item() < 1e-3
    assert torch.allclose(t_gpu.cpu(), t_cpu)
