"""The range of every config key: each is refused outside it, as one line naming the key, value and range."""

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any

import pytest

from tinyswin.cli import main
from tinyswin.config import (
    RANGES,
    TrainConfig,
    apply_overrides,
    check_ranges,
    config_preset_names,
    from_dict,
    load_config,
    merge,
    to_dict,
)
from tinyswin.data.augment_config import AugmentConfig, AugmentConfigError
from tinyswin.errors import ConfigError
from tinyswin.model import SwinConfig, SwinConfigError

EXTERNAL = ("model", "augment")

# key -> (a refused value, an accepted value at the edge of the range)
CASES: dict[str, tuple[Any, Any]] = {
    "data.source": ("", "tiny-imagenet-200.zip"),
    "data.size": (0, 1),
    "data.holdout": (1.0, 0.0),
    "data.holdout_seed": (-1, 0),
    "data.val_split": ("test", "holdout"),
    "data.mean": ((0.5, 0.5, 1.5), (0.0, 0.0, 1.0)),
    "data.std": ((0.2, 0.2, 0.0), (1e-6, 1e-6, 1e-6)),
    "data.repeats": (0, 1),
    "optim.lr": (0.0, 1e-12),
    "optim.lr_base_batch": (0, 1),
    "optim.betas": ((0.9, 1.0), (0.0, 0.9999)),
    "optim.eps": (0.0, 1e-30),
    "optim.weight_decay": (-0.1, 0.0),
    "optim.decay_rel_pos_bias": (None, True),
    "optim.layer_decay": (0.0, 1.0),
    "optim.grad_clip": (0.0, 1e-9),
    "optim.fused": ("yes", None),
    "schedule.epochs": (0, 1),
    "schedule.warmup_epochs": (-0.5, 0.0),
    "schedule.warmup_start": (0.0, 1.0),
    "schedule.min_lr": (-1e-9, 0.0),
    "schedule.step": ("batch", "epoch"),
    "schedule.mix_off_first_epochs": (-1, 0),
    "schedule.mix_off_last_epochs": (-1, 0),
    "schedule.shape": ("step", "linear"),
    "ema.enabled": (1, False),
    "ema.decay": (1.0, 0.0),
    "batch_size": (0, 1),
    "accumulation": (0, 1),
    "eval_batch_size": (0, 1),
    "tta": ("sideways", "flip"),
    "label_smoothing": (1.0, 0.0),
    "precision": ("fp8", "fp32"),
    "compile": ("true", True),
    "compile_mode": ("fast", "max-autotune-no-cudagraphs"),
    "warmup_steps": (-1, 0),
    "sync_every": (0, 1),
    "checkpoint.every_epochs": (0, None),
    "checkpoint.every_seconds": (0.0, 1e-9),
    "evaluation.every_epochs": (0, None),
    "evaluation.every_seconds": (-1.0, 1e-9),
    "seed": (-1, 0),
    "device": ("foo", "cuda:0"),
    "max_nonfinite": (0, 1),
    "threads": (-1, 0),
    "time_budget": (0.0, 1e-9),
    "tensorboard": (None, False),
    "log.wandb": ("yes", True),
    "log.mlflow": (None, False),
    "log.project": ("  ", "p"),
    "plots": ("never", "end"),
    "init": ("timm:", "timm:swin_tiny_patch4_window7_224"),
}


def _own_keys() -> set[str]:
    """Every dotted key of TrainConfig and its sections, but those of the model and augment sections."""
    keys = set()
    for f in dataclasses.fields(TrainConfig):
        if f.name in EXTERNAL:
            continue
        section = getattr(TrainConfig(), f.name)
        if dataclasses.is_dataclass(section):
            keys |= {f"{f.name}.{g.name}" for g in dataclasses.fields(section)}
        else:
            keys.add(f.name)
    return keys


def _hint(key: str) -> Any:
    owner: Any = TrainConfig
    *sections, name = key.split(".")
    for section in sections:
        owner = typing.get_type_hints(owner)[section]
    return typing.get_type_hints(owner)[name]


def _with(cfg: TrainConfig, key: str, value: Any) -> TrainConfig:
    """`cfg` with `key` set to `value` as is (no type conversion), as a config built in code may hold."""
    if "." not in key:
        return dataclasses.replace(cfg, **{key: value})
    section, name = key.split(".")
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})


def _get(cfg: TrainConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _shown(value: Any) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def _refusal(call: Any, *args: Any) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_every_key_has_a_range_and_a_case() -> None:
    assert set(RANGES) == _own_keys()
    assert set(CASES) == _own_keys()


@pytest.mark.parametrize("key", sorted(CASES))
def test_a_value_outside_the_range_is_refused_naming_key_value_and_range(key: str) -> None:
    refused, accepted = CASES[key]
    message = _refusal(check_ranges, _with(TrainConfig(), key, refused), "test")
    assert message == f"test: {key}={_shown(refused)}: expected {RANGES[key].text}"
    check_ranges(_with(TrainConfig(), key, accepted), "test")


@pytest.mark.parametrize("key", sorted(CASES))
def test_overrides_are_range_checked(key: str) -> None:
    refused, accepted = CASES[key]
    cfg = apply_overrides(TrainConfig(), [f"{key}={json.dumps(accepted)}"])
    assert _get(cfg, key) == accepted
    message = _refusal(apply_overrides, TrainConfig(), [f"{key}={json.dumps(refused)}"])
    assert message.startswith(f"override: {key}=") and ": expected " in message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("schedule.epochs=0", "override: schedule.epochs=0: expected an integer >= 1"),
        ("optim.grad_clip=-1", "override: optim.grad_clip=-1.0: expected a finite number > 0, or null"),
        ("time_budget=-5", "override: time_budget=-5.0: expected a finite number > 0, or null"),
        ("time_budget=0", "override: time_budget=0.0: expected a finite number > 0"),
        ("time_budget=nan", "override: time_budget=nan: expected a finite number > 0"),
        ("time_budget=.inf", "override: time_budget=inf: expected a finite number > 0"),
        ("optim.lr=nan", "override: optim.lr=nan: expected a finite number > 0"),
        ("optim.lr=-inf", "override: optim.lr=-inf: expected a finite number > 0"),
        ("schedule.warmup_epochs=inf", "override: schedule.warmup_epochs=inf: expected a finite number >= 0"),
        ("accumulation=0", "override: accumulation=0: expected an integer >= 1"),
        ("label_smoothing=2", "override: label_smoothing=2.0: expected a number in [0, 1)"),
        ("device=foo", "override: device='foo': expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
        ("device=cuda:x", "override: device='cuda:x': expected"),
        ("data.mean=[0.5, nan, 0.5]", "override: data.mean=[0.5, nan, 0.5]: expected 3 values, each"),
        (
            "optim.betas=[0.9, 1]",
            "override: optim.betas=[0.9, 1.0]: expected 2 values, each a number in [0, 1)",
        ),
        (
            "seed=18446744073709551616",
            "override: seed=18446744073709551616: expected an integer in [0, 2**64)",
        ),
    ],
)
def test_the_issue_values_are_refused_before_a_run(override: str, message: str) -> None:
    assert _refusal(load_config, "default", None, [override]).startswith(message)


def test_boundaries_of_the_issue_keys_are_accepted() -> None:
    cfg = load_config(
        "default", None, ["optim.grad_clip=null", "time_budget=null", "seed=18446744073709551615"]
    )
    assert cfg.optim.grad_clip is None and cfg.time_budget is None and cfg.seed == 2**64 - 1
    for device in ("auto", "cpu", "cuda", "cuda:12", "mps"):
        assert load_config("default", None, [f"device={device}"]).device == device
    assert load_config("default", None, ["time_budget=0.5"]).time_budget == 0.5


def _float_keys() -> list[str]:
    keys = []
    for key in RANGES:
        hint = _hint(key)
        args = typing.get_args(hint)
        if hint is float or float in args or any(float in typing.get_args(a) for a in args):
            keys.append(key)
    return keys


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_no_number_is_nan_or_infinite(bad: float) -> None:
    keys = _float_keys()
    assert {"optim.lr", "time_budget", "optim.grad_clip", "data.mean", "optim.betas"} <= set(keys)
    for key in keys:
        default = _get(TrainConfig(), key)
        value = tuple(bad for _ in default) if isinstance(default, tuple) else bad
        if key in ("data.mean", "data.std"):
            value = (bad, bad, bad)
        message = _refusal(check_ranges, _with(TrainConfig(), key, value), "test")
        assert message.startswith(f"test: {key}=") and ("nan" in message or "inf" in message)


@pytest.mark.parametrize("name", config_preset_names())
def test_every_shipped_preset_loads_within_its_ranges(name: str) -> None:
    cfg = load_config(name)
    check_ranges(cfg, name)
    assert from_dict(to_dict(cfg), name) == cfg
    assert cfg.tensorboard is False


def test_tensorboard_is_off_unless_asked() -> None:
    assert TrainConfig().tensorboard is False
    assert load_config("default", None, ["tensorboard=true"]).tensorboard is True


def test_augment_overrides_are_checked_by_the_augmentation_naming_the_key() -> None:
    message = _refusal(load_config, "default", None, ["augment.hflip=2"])
    assert message.startswith("override: augment.hflip=2.0: ") and "[0, 1]" in message
    message = _refusal(load_config, "default", None, ["augment.mixup_p=0.5"])
    assert message.startswith("override: augment.mixup_p=0.5: ") and "mixup_alpha" in message
    message = _refusal(load_config, "default", None, ["augment.preset=strong"])
    assert message.startswith("override: augment.preset='strong': expected one of ")
    assert load_config("default", None, ["augment.mixup_p=0.5", "augment.mixup_alpha=0.2"]).augment.overrides


def test_model_overrides_are_checked_by_the_model_naming_the_key() -> None:
    message = _refusal(load_config, "default", None, ["model.drop_path_rate=1"])
    assert message == "override: model.drop_path_rate=1.0: must be in [0, 1)"
    message = _refusal(load_config, "default", None, ["model.embed_dim=51", "model.num_heads=[2, 4, 8]"])
    assert message.startswith("override: model.num_heads=[2, 4, 8]: stage 0 has width 51")
    message = _refusal(load_config, "default", None, ["model.window_size=0"])
    assert message.startswith("override: model.window_size=0: ")
    message = _refusal(load_config, "default", None, ["model.preset=huge"])
    assert message.startswith("override: model.preset='huge': expected one of ")
    message = _refusal(load_config, "fast", None, ["model.patch_size=3"])
    assert message.startswith("override: model.img_size (augment.out_size)=32: ")
    # without an output size the resolution is the data's, known only to the run
    assert load_config("default", None, ["model.patch_size=3"]).model.overrides == {"patch_size": 3}
    # a preset's own value that no longer fits (its 3 stages of heads for 2 stages) is the run's to refuse
    assert load_config("default", None, ["model.depths=[2, 2]"]).model.overrides == {"depths": (2, 2)}


def test_the_check_runs_on_the_whole_result_and_names_the_layer_of_the_value(tmp_path: Path) -> None:
    file = tmp_path / "mine.yaml"
    file.write_text("base: fast\nmodel:\n  depths: [1, 1]\n  num_heads: [2, 4]\n")
    message = _refusal(load_config, None, file)
    assert message.startswith(f"{file}: model.window_size=[4, 4, 2]: ")
    cfg = load_config(None, file, ["model.window_size=4"])  # the file's layer alone does not fit; all do
    assert cfg.model.overrides["depths"] == (1, 1)
    message = _refusal(load_config, None, file, ["model.window_size=4", "model.num_heads=[2, 5]"])
    assert message.startswith("override: model.num_heads=[2, 5]: ")
    file.write_text("base: fast\nschedule:\n  epochs: 0\n")
    assert _refusal(load_config, None, file).startswith(f"{file}: schedule.epochs=0: expected")
    file.write_text("base: fast\nschedule:\n  epochs: 3\n")
    assert _refusal(load_config, None, file, ["batch_size=0"]).startswith("override: batch_size=0: ")
    assert _refusal(from_dict, {"schedule": {"epochs": 0}}).startswith("config: schedule.epochs=0: ")
    assert _refusal(merge, TrainConfig(), {"ema": {"decay": 1}}, "ckpt.pt").startswith(
        "ckpt.pt: ema.decay=1.0"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "override: schedule.epochs=0: expected an integer >= 1"),
        (["--time-budget", "nan"], "override: time_budget=nan: expected a finite number > 0"),
        (["optim.grad_clip=-1"], "override: optim.grad_clip=-1.0: expected a finite number > 0"),
    ],
)
def test_the_command_line_refuses_before_writing(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tinyswin train: error: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_the_model_and_augment_configs_refuse_with_the_field_not_a_message_to_parse() -> None:
    with pytest.raises(SwinConfigError) as model_error:
        SwinConfig(drop_path_rate=1.0)
    error = model_error.value
    assert (error.field, error.value, error.reason) == ("drop_path_rate", 1.0, "must be in [0, 1)")
    with pytest.raises(AugmentConfigError) as augment_error:
        AugmentConfig(crop="rrc", crop_ratio=(0.0, 1.0))
    assert (augment_error.value.field, augment_error.value.value) == ("crop_ratio", (0.0, 1.0))
    # the key refused is the one whose value is wrong, shown with that value
    message = _refusal(load_config, "default", None, ["augment.crop_ratio=[0, 1]"])
    assert message == "override: augment.crop_ratio=[0.0, 1.0]: must have a low end > 0, got (0.0, 1.0)"
    message = _refusal(load_config, "default", None, ["augment.erase_scale=[-0.1, 0.2]"])
    assert message.startswith("override: augment.erase_scale=[-0.1, 0.2]: must have a low end >= 0")
