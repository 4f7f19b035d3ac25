"""The augmentation path for GPU batches (`augment.device_params`, tinyswin.data.augment_device): parameters
drawn on the batch's device, applied without a host sync, and the same pixels as the exact eager path for the
same parameters."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor, FakeTensorMode

from imagegen import smooth_images
from tinyswin.data import augment_device as dev
from tinyswin.data.augment import augment_preset, build_augment
from tinyswin.data.augment_backend import to_float_nchw
from tinyswin.data.augment_mix import MIX_CUTMIX, MIX_MIXUP

MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2296, 0.2263, 0.2255)

pytestmark = pytest.mark.usefixtures("one_thread")

# what reads a tensor's values on the host (a device sync on a GPU), as methods and as torch functions, and
# what makes a tensor of host data (a copy to a GPU, which waits for it too)
SYNC_METHODS = (
    "item",
    "tolist",
    "numpy",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "nonzero",
    "any",
    "all",
)
SYNC_FUNCTIONS = (
    "nonzero",
    "any",
    "all",
    "unique",
    "bincount",
    "repeat_interleave",
    "masked_select",
    "argwhere",
    "tensor",
    "as_tensor",
    "from_numpy",
)


@contextlib.contextmanager
def count_host_reads() -> Iterator[list[str]]:
    """Record every call that reads tensor values on the host (patched tensor methods and torch functions)."""
    calls: list[str] = []
    patch = pytest.MonkeyPatch()

    def spy(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            reduces_along = name in ("any", "all") and (len(args) > 1 or "dim" in kwargs)
            if not reduces_along:  # x.any(dim=1) stays on the device; x.any() is there to be read
                calls.append(name)
            return original(*args, **kwargs)

        patch.setattr(owner, name, wrapper)

    for name in SYNC_METHODS:
        spy(torch.Tensor, name)
    for name in SYNC_FUNCTIONS:
        spy(torch, name)
    try:
        yield calls
    finally:
        patch.undo()


def batch(n: int = 16, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    images = smooth_images(n, size=size, seed=seed).permute(0, 2, 3, 1).contiguous()  # (N, H, W, 3)
    labels = torch.arange(n) % 10
    return images, labels


SPEEDRUN = {"preset": "light", "device_params": True}
CASES = {
    "light (speedrun)": SPEEDRUN,
    "light, Mixup": {**SPEEDRUN, "mixup_p": 1.0},
    "light, CutMix": {**SPEEDRUN, "mixup_p": 0.0, "cutmix_p": 1.0},
    "seed (jitter, erasing)": {"preset": "seed", "device_params": True, "mixup_p": 1.0},
    "per-sample mixing, pad crop": {**SPEEDRUN, "crop": "pad", "mix_per_sample": True, "erase_p": 0.5},
    "shrinking bicubic crop": {
        **SPEEDRUN,
        "out_size": 48,
        "interpolation": "bicubic",
        "erase_p": 1.0,
        "erase_value": 0.5,
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_device_path_reads_nothing_on_the_host(case: str) -> None:
    fields = dict(CASES[case])
    augment = build_augment(augment_preset(fields.pop("preset"), **fields), MEAN, STD, 10)
    images, labels = batch()
    augment.call_device(images, labels, seed=0)  # warm: first-use set-up (generators, constant tables)
    with count_host_reads() as calls:
        outputs = [augment.call_device(images, labels, seed=s) for s in range(1, 4)]
    assert calls == []
    x, targets = outputs[0]
    assert x.shape == (16, 3, *augment.output_size(64, 64)) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    if fields.get("mixup_p") == 1.0 or fields.get("cutmix_p") == 1.0 or fields.get("mix_per_sample"):
        assert targets.shape == (16, 10) and torch.allclose(targets.sum(1), torch.ones(16))


@pytest.mark.parametrize("case", sorted(CASES))
def test_device_path_runs_on_fake_tensors_which_refuse_data_dependent_ops(case: str) -> None:
    """Fake tensors carry shapes and no values: an op whose result depends on values (``.item()``,
    ``nonzero``, a boolean mask, ``bincount``, ``unique``, a Python ``if`` on a tensor), in Python or inside
    torch, raises."""
    fields = dict(CASES[case])
    augment = build_augment(augment_preset(fields.pop("preset"), **fields), MEAN, STD, 10)
    images, labels = batch()
    augment.call_device(images, labels, seed=0)  # the constant tables are built from real tensors first
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_images, fake_labels = mode.from_tensor(images), mode.from_tensor(labels)
    with mode:
        x, _ = augment.call_device(fake_images, fake_labels, seed=1)
        assert isinstance(x, FakeTensor) and x.shape == (16, 3, *augment.output_size(64, 64))
        with pytest.raises(DataDependentOutputException):  # the mode does refuse what would sync
            build_augment(augment_preset("light", mixup_p=1.0), MEAN, STD, 10, native=False)(
                fake_images, fake_labels, torch.Generator().manual_seed(0)
            )


def test_the_detector_sees_the_host_reads_of_the_default_path() -> None:
    augment = build_augment(augment_preset("light", mixup_p=1.0), MEAN, STD, 10, native=False)
    images, labels = batch()
    with count_host_reads() as calls:
        augment(images, labels, torch.Generator().manual_seed(0))
    assert len(calls) > 0


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("light", {}),
        ("light", {"randaug_magnitude_std": 2.0, "randaug_interpolation": "bilinear"}),
        ("seed", {"mixup_p": 0.0, "cutmix_p": 0.0, "erase_p": 0.0}),
        ("light", {"crop": "pad"}),
        ("light", {"crop": "none", "jitter_hue": 0.3, "jitter_saturation": 0.5}),
        ("light", {"out_size": 48, "interpolation": "bicubic"}),
    ],
)
def test_same_parameters_give_the_exact_paths_pixels(preset: str, overrides: dict) -> None:
    """Crop, flip, RandAugment and ColorJitter on the device path equal the eager path (itself checked against
    torchvision), bit for bit, for the same draws; every RandAugment op is drawn in the batch."""
    augment = build_augment(augment_preset(preset, **overrides), MEAN, STD, 10, native=False)
    images, _ = batch(n=48, seed=5)
    params = augment.sample(48, 64, 64, torch.Generator().manual_seed(7), mix=False)
    if params.randaug is not None:
        assert set(params.randaug.ops.flatten().tolist()) == set(range(14))
    exact = augment.augment_uint8(images, params)  # (N, 3, H', W') whole numbers in [0, 255]
    cfg, out_hw = augment.config, augment.output_size(64, 64)
    x = dev.crop_static(to_float_nchw(images), cfg, params.crop, params.flip, out_hw)
    if params.randaug is not None:
        x = dev.randaugment_static_(x, params.randaug, cfg.randaug_interpolation)
    if params.jitter is not None:
        x = dev.color_jitter_static_(x, params.jitter)
    assert torch.equal(x, exact)


def test_same_seed_same_batch_other_seed_other_batch_and_mix_off_gives_labels() -> None:
    augment = build_augment(augment_preset("light", device_params=True, mixup_p=1.0), MEAN, STD, 10)
    images, labels = batch()
    a, ta = augment.call_device(images, labels, seed=11)
    b, tb = augment.call_device(images, labels, seed=11)
    c, _ = augment.call_device(images, labels, seed=12)
    assert torch.equal(a, b) and torch.equal(ta, tb) and not torch.equal(a, c)
    _, targets = augment.call_device(images, labels, seed=11, mix=False)
    assert targets.dtype == torch.int64 and torch.equal(targets, labels)
    # __call__ draws the seed from the CPU generator: the same generator state, the same batch
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(augment(images, labels, g1)[0], augment(images, labels, g2)[0])


@pytest.mark.parametrize("mode", [MIX_MIXUP, MIX_CUTMIX])
def test_batch_mix_blends_pixels_and_targets_with_one_lambda(mode: int) -> None:
    overrides = {"mixup_p": 1.0} if mode == MIX_MIXUP else {"mixup_p": 0.0, "cutmix_p": 1.0}
    cfg = augment_preset("none", mixup_alpha=0.4, cutmix_alpha=1.0, device_params=True, **overrides)
    x0 = torch.rand(16, 3, 32, 32)
    labels = torch.arange(16) % 10
    mix = dev.sample_batch_mix(16, 32, 32, cfg, random.Random(4), torch.Generator().manual_seed(4))
    assert mix.mode == mode and 0.0 < mix.lam < 1.0
    x, targets = dev.mix_static_(x0.clone(), labels, mix, 10, 0.0)
    partner = mix.partner
    if mode == MIX_MIXUP:
        assert torch.allclose(x, mix.lam * x0 + (1 - mix.lam) * x0[partner], atol=1e-6)
    else:
        y1, y2, x1, x2 = mix.box
        pasted = torch.zeros(32, 32, dtype=torch.bool)
        pasted[y1:y2, x1:x2] = True
        assert torch.equal(x[:, :, pasted], x0[partner][:, :, pasted])
        assert torch.equal(x[:, :, ~pasted], x0[:, :, ~pasted])
        assert mix.lam == pytest.approx(1 - pasted.float().mean().item())
    own = targets[torch.arange(16), labels]
    other = targets[torch.arange(16), labels[partner]]
    same = labels == labels[partner]
    assert torch.allclose(own[~same], torch.full_like(own[~same], mix.lam), atol=1e-6)
    assert torch.allclose(other[~same], torch.full_like(other[~same], 1 - mix.lam), atol=1e-6)


def test_dense_erasing_fills_exactly_the_drawn_boxes() -> None:
    cfg = augment_preset("none", erase_p=0.7, erase_value=(1.0, 2.0, 3.0), device_params=True)
    g = torch.Generator().manual_seed(2)
    params = dev.sample_device(cfg, 32, 24, 24, (24, 24), g, random.Random(2))
    x0 = torch.randn(32, 3, 24, 24)
    x = dev.erase_dense_(x0.clone(), params.erase, cfg.erase_value)
    e = params.erase
    assert 0 < int(e.apply.sum()) < 32
    for i in range(32):
        inside = torch.zeros(24, 24, dtype=torch.bool)
        if e.apply[i]:
            t, left, h, w = (int(v) for v in (e.top[i], e.left[i], e.height[i], e.width[i]))
            inside[t : t + h, left : left + w] = True
        for c, value in enumerate((1.0, 2.0, 3.0)):
            assert torch.all(x[i, c][inside] == value)
            assert torch.equal(x[i, c][~inside], x0[i, c][~inside])


def test_batch_mix_draws_follow_the_configured_probabilities_and_lambdas() -> None:
    """`seed`'s rule on the host stream: Mixup with p 0.3 (Beta(0.4, 0.4)), else CutMix with p 0.3 (its lambda
    the kept fraction of the image), else none."""
    cfg = augment_preset("seed", device_params=True)
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    draws = [dev.sample_batch_mix(8, 64, 64, cfg, rng, generator) for _ in range(4000)]
    mixup = [d.lam for d in draws if d.mode == MIX_MIXUP]
    cutmix = [d for d in draws if d.mode == MIX_CUTMIX]
    none = [d for d in draws if d.mode not in (MIX_MIXUP, MIX_CUTMIX)]
    assert len(mixup) / 4000 == pytest.approx(0.3, abs=0.025)
    assert len(cutmix) / 4000 == pytest.approx(0.7 * 0.3, abs=0.025)
    lam = torch.tensor(mixup, dtype=torch.float64)
    assert float(lam.mean()) == pytest.approx(0.5, abs=0.03)
    assert float(lam.var()) == pytest.approx(1 / (4 * (2 * 0.4 + 1)), abs=0.015)  # Beta(0.4, 0.4)
    assert float(lam.min()) >= 0.001 and float(lam.max()) <= 0.999
    for d in cutmix:
        y1, y2, x1, x2 = d.box
        assert 0 <= y1 <= y2 <= 64 and 0 <= x1 <= x2 <= 64
        assert d.lam == 1 - (y2 - y1) * (x2 - x1) / 64**2
    assert all(d.lam == 1.0 for d in none)
    assert all(sorted(d.partner.tolist()) == list(range(8)) for d in draws[:50])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_path_never_waits_for_the_gpu_and_agrees_with_the_cpu() -> None:
    """On a GPU: CUDA's sync debug mode raises on any synchronizing call (a read, a copy from the host) during
    five batches; and the same parameters give the CPU's pixels (up to rounding ties, as the eager path)."""
    augment = build_augment(augment_preset("seed", device_params=True, mixup_p=0.5), MEAN, STD, 10)
    images, labels = batch(n=64)
    gpu_images, gpu_labels = images.cuda(), labels.cuda()
    augment.call_device(gpu_images, gpu_labels, seed=0)  # first use: generator, constant tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for seed in range(1, 6):
            augment.call_device(gpu_images, gpu_labels, seed=seed)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    params = augment.sample(64, 64, 64, torch.Generator().manual_seed(7), mix=False)
    cfg, out_hw = augment.config, augment.output_size(64, 64)

    def pixels(x: torch.Tensor, device: str) -> torch.Tensor:
        crop = type(params.crop)(*(t.to(device) for t in vars(params.crop).values()))
        ra = type(params.randaug)(*(t.to(device) for t in vars(params.randaug).values()))
        jitter = type(params.jitter)(
            params.jitter.order.to(device), params.jitter.factors.to(device), params.jitter.enabled
        )
        x = dev.crop_static(to_float_nchw(x.to(device)), cfg, crop, params.flip.to(device), out_hw)
        return dev.color_jitter_static_(
            dev.randaugment_static_(x, ra, cfg.randaug_interpolation), jitter
        ).cpu()

    d = (pixels(images, "cuda") - pixels(images, "cpu")).abs()
    assert (d > 1e-4).float().mean().item() < 0.002 and d.mean().item() < 0.05
