"""Native CPU augmentation kernels (tinyswin.data.augment_native): bit-for-bit equal to the eager ops.

The eager batched ops are checked against torchvision in test_augment.py; here every kernel is checked
against them with tolerance 0, on synthetic and real images, several image sizes (the contrast mean of a
non-power-of-two pixel count rounds), flips, both input layouts and random per-sample parameters. Then
the whole pipeline with and without the kernels, the fallback, and the build cache.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF

from imagegen import smooth_images
from tinyswin.data import augment_geometry as geo
from tinyswin.data import augment_mix as mixing
from tinyswin.data import augment_native as native
from tinyswin.data import augment_policy as policy
from tinyswin.data import augment_table as table
from tinyswin.data.augment import AugmentConfig, augment_preset, build_augment
from tinyswin.data.augment_backend import EagerBackend, NativeBackend

MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2296, 0.2263, 0.2255)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def kernels() -> native.NativeKernels:
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler!r} is not on PATH): the native kernels cannot be built here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with a compiler, a failed build must fail here, not fall back
        loaded = native.load()
    if loaded is None:
        pytest.skip("native kernels are off (TINYSWIN_NATIVE=0)")
    return loaded


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images at another size (area average), for the size-dependent paths."""
    return (
        torch.nn.functional.interpolate(images.float(), size=(size, size), mode="area")
        .round()
        .to(torch.uint8)
    )


@pytest.mark.parametrize("size", [64, 32])
@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_crop_kernel_equals_the_grid_path_and_torchvision(
    kernels, images, size, scale, channels_last
) -> None:
    imgs = images if images.shape[-1] == size else resized(images, size)
    n = len(imgs)
    g = torch.Generator().manual_seed(size)
    boxes = geo.sample_resized_crop(n, size, size, scale, (3 / 4, 4 / 3), g)
    flip = torch.rand(n, generator=g) < 0.5
    assert geo.upsamples_exactly(boxes, (size, size), "bilinear")
    ys, xs = geo.crop_source_coords(boxes, flip, (size, size))
    source = imgs.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) if channels_last else imgs
    ours = kernels.crop_bilinear(source, ys, xs)
    eager = geo.resized_crop(imgs.float(), boxes, flip, (size, size), "bilinear")
    assert torch.equal(ours, eager)
    for i in range(0, n, 5):  # and torchvision itself, image by image
        ref = TF.resized_crop(
            imgs[i], *(int(v[i]) for v in (boxes.top, boxes.left, boxes.height, boxes.width)), [size, size],
            antialias=True,
        )  # fmt: skip
        assert torch.equal(ours[i], (TF.hflip(ref) if flip[i] else ref).float())


def test_crop_kernel_is_used_only_where_it_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = geo.sample_resized_crop(16, 64, 64, (0.9, 1.0), (3 / 4, 4 / 3), g)
    assert geo.upsamples_exactly(boxes, (64, 64), "bilinear")
    assert not geo.upsamples_exactly(boxes, (64, 64), "bicubic")
    assert not geo.upsamples_exactly(boxes, (48, 48), "bilinear")  # weights k / 96: not exact in float32
    assert not geo.upsamples_exactly(boxes, (128, 128), "bilinear")  # products beyond 2^24
    shrink = geo.sample_resized_crop(16, 64, 64, (0.9, 1.0), (3 / 4, 4 / 3), g)
    assert not geo.upsamples_exactly(shrink, (32, 32), "bilinear")


@pytest.mark.parametrize("size", [64, 32, 24])
@pytest.mark.parametrize(
    ("magnitude", "std", "interpolation"),
    [(9, 0.0, "nearest"), (5, 2.0, "nearest"), (9, 0.0, "bilinear"), (30, 0.0, "nearest")],
)
def test_randaugment_kernel_equals_the_eager_ops(
    kernels, images, size, magnitude, std, interpolation
) -> None:
    imgs = (images if images.shape[-1] == size else resized(images, size)).float()
    imgs = torch.cat([imgs, imgs.flip(0)])  # 48 samples, so that every op is drawn in every slot
    g = torch.Generator().manual_seed(magnitude)
    params = policy.sample_randaugment(len(imgs), 3, magnitude, 31, std, size, size, g)
    drawn = set(params.ops.flatten().tolist())
    assert len(drawn) == 14
    backend = NativeBackend(AugmentConfig(randaug_interpolation=interpolation), kernels)
    ours = backend.randaugment(imgs.clone(), params)
    eager = policy.randaugment_(imgs.clone(), params, interpolation)
    assert torch.equal(ours, eager)


@pytest.mark.parametrize("size", [64, 32, 24])
@pytest.mark.parametrize("strength", [(0.2, 0.2, 0.2, 0.05), (0.9, 0.9, 1.0, 0.5), (0.4, 0.0, 0.3, 0.0)])
def test_color_jitter_kernel_equals_the_eager_ops(kernels, images, size, strength) -> None:
    imgs = (images if images.shape[-1] == size else resized(images, size)).float()
    g = torch.Generator().manual_seed(size)
    params = policy.sample_color_jitter(len(imgs), *strength, g)
    ours = kernels.color_jitter_(imgs.clone(), params.order, params.factors, params.enabled)
    eager = policy.color_jitter_(imgs.clone(), params)
    assert torch.equal(ours, eager)
    # with Normalize fused: x * scale - shift in float32, as the eager in-place normalization
    scale = torch.tensor([1.0 / (255.0 * s) for s in STD])
    shift = torch.tensor([m / s for m, s in zip(MEAN, STD, strict=True)])
    fused = kernels.color_jitter_(imgs.clone(), params.order, params.factors, params.enabled, (scale, shift))
    assert torch.equal(fused, eager.mul_(scale.view(1, 3, 1, 1)).sub_(shift.view(1, 3, 1, 1)))


def test_equalize_and_autocontrast_kernels_leave_flat_channels_alone(kernels) -> None:
    flat = torch.full((3, 3, 8, 8), 77.0)
    flat[1, :, :4] = 10.0  # two levels: torchvision's step is 0, image unchanged
    flat[2, 0] = torch.arange(64.0).view(8, 8)  # one varying channel, two constant ones
    results = {}
    for op in ("Equalize", "AutoContrast"):
        code = torch.full((3,), policy.RANDAUGMENT_OPS.index(op))
        results[op] = kernels.randaugment_slot_(flat.clone(), code, torch.zeros(3, dtype=torch.float64))
        assert torch.equal(
            results[op], policy.apply_randaugment_op(flat, op, torch.zeros(3, dtype=torch.float64))
        )
    assert torch.equal(results["Equalize"][:2], flat[:2])
    assert torch.equal(results["AutoContrast"][0], flat[0]) and torch.equal(
        results["AutoContrast"][2, 1:], flat[2, 1:]
    )
    assert results["AutoContrast"][2, 0].max() == 255.0


@pytest.mark.parametrize("preset", ["seed", "light"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_the_pipeline_gives_the_same_batch_with_and_without_kernels(kernels, preset, channels_last) -> None:
    imgs = smooth_images(32, size=64)
    imgs = imgs.permute(0, 2, 3, 1).contiguous() if channels_last else imgs
    labels = torch.arange(32) % 10
    fast = build_augment(augment_preset(preset, out_size=64), MEAN, STD, 10)
    slow = build_augment(augment_preset(preset, out_size=64), MEAN, STD, 10, native=False)
    assert fast.kernels(imgs.device) is kernels and slow.kernels(imgs.device) is None
    for seed in range(3):
        x1, t1 = fast(imgs, labels, torch.Generator().manual_seed(seed))
        x2, t2 = slow(imgs, labels, torch.Generator().manual_seed(seed))
        assert torch.equal(x1, x2) and torch.equal(t1, t2)


def test_pad_crop_and_bicubic_recipes_fall_back_to_the_eager_crop_and_agree(kernels) -> None:
    imgs = smooth_images(16, size=32)
    labels = torch.arange(16) % 4
    for overrides in ({"crop": "pad", "out_size": 32}, {"crop": "rrc", "interpolation": "bicubic"}):
        config = augment_preset("seed", **overrides)
        x1, _ = build_augment(config, MEAN, STD, 4)(imgs, labels, torch.Generator().manual_seed(1))
        x2, _ = build_augment(config, MEAN, STD, 4, native=False)(
            imgs, labels, torch.Generator().manual_seed(1)
        )
        assert torch.equal(x1, x2)


def test_the_backend_is_chosen_once_per_device_type(kernels) -> None:
    cpu = torch.device("cpu")
    fast = build_augment("seed", MEAN, STD, 10)
    assert isinstance(fast.backend(cpu), NativeBackend) and fast.backend(cpu) is fast.backend(cpu)
    assert type(build_augment("seed", MEAN, STD, 10, native=False).backend(cpu)) is EagerBackend
    assert type(fast.backend(torch.device("cuda"))) is EagerBackend  # the kernels run CPU batches only
    copy = pickle.loads(pickle.dumps(fast))  # the backends are not pickled; the copy chooses its own
    assert isinstance(copy.backend(cpu), NativeBackend) and copy.backend(cpu) is not fast.backend(cpu)


@pytest.mark.parametrize(
    "overrides",
    [
        {"randaug_interpolation": "bilinear"},  # native crop, eager warps, native pixel ops
        {"mix_per_sample": True, "mixup_p": 0.5, "cutmix_p": 0.5},  # eager per-sample mixing
        {"crop": "none", "out_size": None, "erase_value": (0.5, -1.0, 2.0)},  # flip without a crop
        {"randaug_ops": 0, "jitter_hue": 0.0, "jitter_brightness": 0.0, "jitter_contrast": 0.0,
         "jitter_saturation": 0.0},  # fused crop and Normalize only
    ],
)  # fmt: skip
def test_native_backend_falls_back_step_by_step_and_agrees(kernels, overrides) -> None:
    imgs = smooth_images(24, size=64).permute(0, 2, 3, 1).contiguous()
    labels = torch.arange(24) % 10
    config = augment_preset("seed", **overrides)
    for seed in range(2):
        x1, t1 = build_augment(config, MEAN, STD, 10)(imgs, labels, torch.Generator().manual_seed(seed))
        x2, t2 = build_augment(config, MEAN, STD, 10, native=False)(
            imgs, labels, torch.Generator().manual_seed(seed)
        )
        assert torch.equal(x1, x2) and torch.equal(t1, t2)


def test_the_kernels_op_codes_are_the_tables() -> None:
    """augment_kernels.c names each op's code (ShearX: OP_SHEAR_X) in an enum that must equal the table's
    kernel_code column, and its switch must have a case for each; read from the source, no compiler needed."""
    source = (Path(native.__file__).parent / "augment_kernels.c").read_text()
    enum = re.search(r"enum randaugment_op \{(.*?)\};", source, re.S)
    switch = re.search(r"static void randaugment_one\(.*?switch \(op\) \{(.*?)\n    \}", source, re.S)
    assert enum is not None and switch is not None
    codes = {name: int(code) for name, code in re.findall(r"(OP_\w+) = (\d+)", enum.group(1))}
    words = {row.name: re.sub(r"(?<=[a-z])(?=[A-Z])", "_", row.name) for row in table.RANDAUGMENT}
    expected = {f"OP_{words[row.name].upper()}": row.kernel_code for row in table.RANDAUGMENT}
    assert codes == expected and "OP_AUTO_CONTRAST" in codes  # the names are read as written
    assert len(set(codes.values())) == len(codes)
    assert set(re.findall(r"case (OP_\w+):", switch.group(1))) == set(codes)
    assert torch.equal(table.kernel_codes(), torch.tensor([row.kernel_code for row in table.RANDAUGMENT]))


def test_the_kernels_get_each_ops_code_from_the_table(kernels, monkeypatch) -> None:
    x = smooth_images(6, size=16).float()
    ops = torch.full((6,), table.RANDAUGMENT_OPS.index("Identity"))
    zero = torch.zeros(6, dtype=torch.float64)
    assert torch.equal(kernels.randaugment_slot_(x.clone(), ops, zero), x)
    codes = table.kernel_codes().clone()
    codes[table.RANDAUGMENT_OPS.index("Identity")] = table.op_row("Equalize").kernel_code
    monkeypatch.setattr(native, "kernel_codes", lambda: codes)  # a table whose Identity runs Equalize's case
    equalized = policy.apply_randaugment_op(x, "Equalize", zero)
    assert not torch.equal(equalized, x)
    assert torch.equal(kernels.randaugment_slot_(x.clone(), ops, zero), equalized)


def test_kernels_refuse_batches_they_cannot_take(kernels) -> None:
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="contiguous float32"):
        kernels.color_jitter_(x.transpose(2, 3), torch.zeros(2, 4), torch.zeros(2, 4), (True,) * 4)
    with pytest.raises(ValueError, match="uint8"):
        kernels.crop_bilinear(x, torch.zeros(2, 8), torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"\(2,\) ops"):
        kernels.randaugment_slot_(x, torch.zeros(3, dtype=torch.int64), torch.zeros(3))


def test_build_is_cached_and_atomic_and_a_missing_compiler_falls_back(kernels, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TINYSWIN_CACHE", str(tmp_path / "cache"))
    first = native.load()
    assert first is not None and native.load() is first
    built = sorted((tmp_path / "cache" / "kernels").iterdir())
    assert [p.suffix for p in built] == [".so"]  # the library only: no half-written temporary left
    monkeypatch.setenv("TINYSWIN_NATIVE", "0")
    assert native.load() is None
    monkeypatch.setenv("TINYSWIN_NATIVE", "1")
    monkeypatch.setenv("TINYSWIN_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("CC", "no-such-compiler-tinyswin")
    with pytest.warns(RuntimeWarning, match="no-such-compiler-tinyswin"):
        assert native.load() is None
    imgs = smooth_images(4, size=64).permute(0, 2, 3, 1)
    fallback = build_augment("seed", MEAN, STD, 4)
    assert fallback.kernels(imgs.device) is None
    x, _ = fallback(imgs, torch.arange(4), torch.Generator().manual_seed(0))
    eager, _ = build_augment("seed", MEAN, STD, 4, native=False)(
        imgs, torch.arange(4), torch.Generator().manual_seed(0)
    )
    assert torch.equal(x, eager)


@pytest.mark.parametrize("mode", [1, 2])
def test_mix_kernel_equals_the_eager_mix_for_any_partner_permutation(kernels, mode) -> None:
    backend = NativeBackend(AugmentConfig(), kernels)
    g = torch.Generator().manual_seed(mode)
    x = torch.randn(12, 3, 16, 16, generator=g)
    labels = torch.arange(12) % 5
    for partner in (
        torch.randperm(12, generator=g),
        torch.arange(12),
        torch.tensor([1, 0, 3, 4, 2, *range(5, 12)]),
    ):
        params = mixing.sample_mix(12, 16, 16, float(mode == 1), 0.4, 1.0, 0.8, g)
        assert int(params.mode[0]) == mode
        params.partner = partner
        ours, t1 = backend.mix(x.clone(), labels, params, 5, 0.1)
        eager, t2 = mixing.mix_(x.clone(), labels, params, 5, 0.1)
        assert torch.equal(ours, eager) and torch.equal(t1, t2)
        lam = float(params.lam[0])
        if mode == 1:  # the notebook's expression, in float32
            assert torch.equal(ours, x * lam + x[partner] * (1.0 - lam))
        else:
            y1, y2, x1, x2 = params.box[0].tolist()
            expected = x.clone()
            expected[:, :, y1:y2, x1:x2] = x[partner][:, :, y1:y2, x1:x2]
            assert torch.equal(ours, expected) and (y2 - y1) * (x2 - x1) > 0
    with pytest.raises(ValueError, match="permutation"):
        kernels.mix_batch_(x.clone(), torch.zeros(12, dtype=torch.int64), 1, 0.5, (0, 0, 0, 0))


@pytest.mark.slow
def test_hue_kernel_equals_torchvision_on_every_rgb_triple(kernels) -> None:
    every = torch.arange(256**3)
    img = torch.stack([every // 65536, every // 256 % 256, every % 256]).to(torch.uint8).view(3, 4096, 4096)
    for shift in (0.05, -0.37):
        factors = torch.tensor([[1.0, 1.0, 1.0, shift]], dtype=torch.float64)
        ours = kernels.color_jitter_(
            img.float().unsqueeze(0), torch.tensor([[3, 0, 1, 2]]), factors, (False,) * 3 + (True,)
        )
        assert torch.equal(ours[0], TF.adjust_hue(img, shift).float())
