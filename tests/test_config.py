"""TrainConfig: presets, layering, typed `key=value` overrides, and the seed preset against the notebook."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from tinyswin.config import (
    TrainConfig,
    apply_overrides,
    config_preset_names,
    from_dict,
    load_config,
    scaled_lr,
    to_dict,
    to_yaml,
)
from tinyswin.optim import WarmupCosine
from tinyswin.paths import cache_root
from tinyswin.train import build_augment_config, build_model_config

# The notebook's recipe, written out from docs/design.md ("The notebook's recipe, value by value").
NOTEBOOK_MODEL = {
    "img_size": 64,
    "patch_size": 4,
    "in_chans": 3,
    "num_classes": 200,
    "embed_dim": 96,
    "depths": (2, 2, 6, 2),
    "num_heads": (2, 4, 8, 16),
    "window_size": (8, 8, 4, 2),
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "drop_path_rate": 0.2,
    "patch_norm": False,  # no norm after the patch embedding
    "shift_full_window": True,  # shifts even where the window covers the whole map
    "rpb_init_std": 0.0,  # relative position tables initialised to zero
}
NOTEBOOK_AUGMENT = {
    "out_size": 64,  # RandomResizedCrop(64, ...)
    "crop": "rrc",
    "crop_scale": (0.9, 1.0),
    "crop_ratio": (3 / 4, 4 / 3),  # torchvision's default ratio
    "interpolation": "bilinear",  # torchvision's default
    "hflip": 0.5,  # RandomHorizontalFlip()
    "randaug_ops": 2,
    "randaug_magnitude": 5,
    "randaug_bins": 31,  # torchvision's default num_magnitude_bins
    "jitter_brightness": 0.2,
    "jitter_contrast": 0.2,
    "jitter_saturation": 0.2,
    "jitter_hue": 0.05,
    "erase_p": 0.1,
    "erase_scale": (0.02, 0.2),
    "erase_ratio": (0.3, 3.3),  # torchvision's default
    "erase_value": "random",
    "mixup_p": 0.3,
    "mixup_alpha": 0.4,
    "cutmix_p": 0.3,
    "cutmix_alpha": 0.8,
    "mix_select": "sequential",  # Mixup with p 0.3, else CutMix with p 0.3, else none
    "mix_lambda_clip": (0.001, 0.999),
    "mix_label_smoothing": 0.0,  # plain soft-target cross-entropy on mixed batches
}
NOTEBOOK_TRAIN = {
    "label_smoothing": 0.05,
    "batch_size": 64,
    "accumulation": 1,
    "precision": "fp16",
    "optim.betas": (0.9, 0.999),
    "optim.weight_decay": 0.05,
    "optim.decay_rel_pos_bias": False,
    "optim.grad_clip": 3.0,
    "schedule.epochs": 200,
    "schedule.warmup_epochs": 10,
    "schedule.warmup_start": 0.01,
    "schedule.min_lr": 5e-6,
    "schedule.step": "epoch",
    "schedule.mix_off_first_epochs": 1,
    "schedule.mix_off_last_epochs": 10,
    "data.val_split": "val",
    "data.mean": (0.4802, 0.4481, 0.3975),
    "data.std": (0.2296, 0.2263, 0.2255),
    "ema.enabled": False,
}


def _get(cfg: TrainConfig, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_seed_preset_is_the_notebook_key_by_key() -> None:
    cfg = load_config("seed")
    for key, expected in NOTEBOOK_TRAIN.items():
        assert _get(cfg, key) == expected, key
    assert cfg.peak_lr() == pytest.approx(2.5e-4, rel=1e-12)  # 1e-3 x 64 / 256
    model = build_model_config(cfg, num_classes=200, image_size=64)
    for key, expected in NOTEBOOK_MODEL.items():
        assert getattr(model, key) == expected, f"model.{key}"
    augment = build_augment_config(cfg)
    for key, expected in NOTEBOOK_AUGMENT.items():
        value = getattr(augment, key)
        if isinstance(expected, tuple):
            assert value == pytest.approx(expected), f"augment.{key}"
        else:
            assert value == expected, f"augment.{key}"


def test_seed_schedule_matches_torch_linear_then_cosine_stepped_per_epoch() -> None:
    cfg = load_config("seed")
    param = torch.nn.Parameter(torch.zeros(1))
    ours = WarmupCosine(
        torch.optim.AdamW([param], lr=1.0),
        cfg.peak_lr(),
        iters_per_epoch=7,
        epochs=cfg.schedule.epochs,
        warmup_epochs=cfg.schedule.warmup_epochs,
        warmup_start=cfg.schedule.warmup_start,
        min_lr=cfg.schedule.min_lr,
        per_iteration=cfg.schedule.step == "iteration",
    )
    # the notebook's schedulers: LinearLR for 10 epochs, then CosineAnnealingLR over 190, stepped per epoch
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.5e-4)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, end_factor=1.0, total_iters=10)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=190, eta_min=5e-6)
    sequential = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[10])
    reference = []
    for _ in range(200):
        reference.append(opt.param_groups[0]["lr"])
        opt.step()
        sequential.step()
    for epoch in range(200):
        for it in range(7):  # constant within an epoch
            assert ours.lr_at(epoch * 7 + it) == pytest.approx(reference[epoch], rel=1e-9, abs=1e-15), epoch
    assert reference[0] == pytest.approx(2.5e-6)
    assert reference[10] == pytest.approx(2.5e-4)


def test_unknown_key_suggests_the_closest() -> None:
    cfg = TrainConfig()
    with pytest.raises(
        ValueError, match=r"unknown key 'optim\.weight_decy'; did you mean 'optim\.weight_decay'"
    ):
        apply_overrides(cfg, ["optim.weight_decy=0.1"])
    with pytest.raises(ValueError, match=r"did you mean 'schedule\.mix_off_last_epochs'"):
        apply_overrides(cfg, ["schedule.mix_off_last=3"])
    with pytest.raises(ValueError, match=r"did you mean 'model\.drop_path_rate'"):
        apply_overrides(cfg, ["model.drop_path=0.1"])
    with pytest.raises(ValueError, match=r"did you mean 'augment\.randaug_ops'"):
        apply_overrides(cfg, ["augment.randaug_op=1"])
    with pytest.raises(ValueError, match=r"did you mean 'label_smoothing'"):
        apply_overrides(cfg, ["label_smoothin=0.1"])


def test_values_are_typed_or_refused_naming_the_key() -> None:
    cfg = apply_overrides(
        TrainConfig(),
        [
            "optim.lr=2e-3",  # YAML reads this as a string; it is a float field
            "optim.grad_clip=null",
            "batch_size=256",
            "schedule.warmup_epochs=3",
            "model.depths=[2, 2]",
            "model.embed_dim=32",
            "augment.crop_scale=[0.5, 1]",
            "precision=bf16",
            "data.val_split=holdout",
        ],
    )
    assert cfg.optim.lr == 2e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.grad_clip is None
    assert cfg.batch_size == 256
    assert cfg.schedule.warmup_epochs == 3.0 and isinstance(cfg.schedule.warmup_epochs, float)
    assert cfg.model.overrides == {"depths": (2, 2), "embed_dim": 32}
    assert cfg.augment.overrides == {"crop_scale": (0.5, 1.0)}
    assert cfg.precision == "bf16"
    assert cfg.data.val_split == "holdout"
    for bad, message in [
        ("batch_size=1.5", "batch_size=1.5: expected int"),
        ("precision=fp8", "precision='fp8': expected one of 'auto', 'bf16', 'fp16', 'fp32'"),
        ("optim.lr=fast", "optim.lr='fast': expected float"),
        ("compile=3", "compile=3: expected bool"),
        ("optim.betas=[0.9]", r"optim.betas=\[0.9\]"),
        ("model.num_classes=5", "set by the data"),
        ("optim.lr", "expected key=value"),
    ]:
        with pytest.raises(ValueError, match=message):
            apply_overrides(cfg, [bad])


def test_overrides_never_change_the_config_they_start_from() -> None:
    base = load_config("default")
    before = to_dict(base)
    apply_overrides(base, ["optim.lr=5", "model.embed_dim=8", "schedule.epochs=1"])
    assert to_dict(base) == before


def test_layers_preset_then_file_then_overrides(tmp_path: Path) -> None:
    file = tmp_path / "mine.yaml"
    file.write_text(
        "base: seed\nschedule:\n  epochs: 30\noptim:\n  grad_clip: 10\nmodel:\n  drop_path_rate: 0.1\n"
    )
    cfg = load_config(None, file, ["schedule.epochs=40"])
    assert cfg.schedule.epochs == 40  # the override wins over the file
    assert cfg.optim.grad_clip == 10.0  # the file wins over the preset
    assert cfg.schedule.mix_off_last_epochs == 10  # the base preset shows through
    assert cfg.model.preset == "seed" and cfg.model.overrides == {"drop_path_rate": 0.1}
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown key 'optim\.lrr'; did you mean 'optim\.lr'"):
        load_config("default", bad)
    with pytest.raises(ValueError, match=r"unknown preset 'sed'.*did you mean 'seed'"):
        load_config("sed")
    with pytest.raises(FileNotFoundError, match=r"nothere\.yaml"):
        load_config(None, tmp_path / "nothere.yaml")


@pytest.mark.parametrize("name", ["default", "seed", "fast"])
def test_presets_round_trip_through_plain_dicts_and_yaml(name: str) -> None:
    import yaml

    cfg = load_config(name)
    plain = to_dict(cfg)
    assert from_dict(plain) == cfg
    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg
    assert name in config_preset_names()


def test_every_dataclass_key_is_settable() -> None:
    cfg = TrainConfig()
    for f in dataclasses.fields(cfg.schedule):
        value = getattr(cfg.schedule, f.name)
        assert _get(apply_overrides(cfg, [f"schedule.{f.name}={value}"]), f"schedule.{f.name}") == value


def test_scaling_rule_is_linear() -> None:
    assert scaled_lr(1e-3, 512, 256) == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 64, 256) == pytest.approx(2.5e-4)
    cfg = apply_overrides(load_config("seed"), ["batch_size=256"])
    assert cfg.peak_lr() == pytest.approx(1e-3)
    assert math.isclose(apply_overrides(cfg, ["accumulation=4"]).peak_lr(), 1e-3)  # global batch unchanged


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TINYSWIN_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "a"
    monkeypatch.delenv("TINYSWIN_CACHE")
    assert cache_root() == tmp_path / "x" / "tinyswin"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "tinyswin"
