"""Training configuration: the `TrainConfig` dataclass, YAML presets and `key=value` overrides.

A configuration is built in layers, each a partial nested mapping over the one before:

    dataclass defaults -> preset YAML (`configs/NAME.yaml`, may name a `base:` preset) -> `--config FILE.yaml`
    -> `key=value` overrides (dotted keys, e.g. `optim.lr=1e-3 model.drop_path_rate=0.1`)

Every key is checked: an unknown key is an error that names the closest known one, and every value is
converted to the type of its field (`1` -> 1.0 for a float, `[2, 2]` -> (2, 2) for a tuple) or refused.
A resolved config is then checked against the range of every key (`tinyswin.ranges.RANGES`: epochs >= 1,
`optim.lr` > 0 and finite, ...) and its model and augmentation are built from their presets and overrides,
so a value outside its range is a `ConfigError` of one line that names the key, the value and the range,
before a run writes anything.
The `model` and `augment` sections hold a preset name plus overrides of the fields of
`tinyswin.model.SwinConfig` and `tinyswin.data.AugmentConfig`; in YAML and in `key=value` form the
overrides sit beside `preset` (`model.preset=nano model.embed_dim=64`).

Why not OmegaConf's structured configs (tried, 2.4): it merges and types the layers, but converts values this
config refuses (`compile=3`, `ema.enabled=1`, `log.wandb=yes` all become true), records no layer per key,
reports in several lines, and takes the model and augment sections (a preset plus any field of another
dataclass) only through a schema generated for them; keeping our refusals took back most of what it removed
(config + coerce + ranges 7% shorter, `load_config` about 15x slower, one more dependency).

Learning-rate rule (linear scaling): the optimiser runs at
`optim.lr * batch_size / optim.lr_base_batch`, where `batch_size` is the global batch (all processes, all
accumulation steps). The notebook's 2.5e-4 at batch 64 is `lr 1e-3, lr_base_batch 256`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from tinyswin.coerce import convert, describe
from tinyswin.data.augment import AugmentConfig, augment_preset, augment_preset_names
from tinyswin.errors import AugmentConfigError, ConfigError, SwinConfigError
from tinyswin.model import SwinConfig
from tinyswin.model_presets import preset_config, preset_names
from tinyswin.ranges import RANGES, one_of


@dataclass
class ModelSection:
    """Which model: a preset of `tinyswin.model_presets` and overrides of its `SwinConfig` fields.

    `num_classes` always follows the data; `img_size` follows the training resolution (the augmentation's
    output size, else the cache's image size) unless it is overridden here.
    """

    preset: str = "nano"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class AugmentSection:
    """Which augmentation: a preset of `tinyswin.data.augment` and overrides of its `AugmentConfig` fields."""

    preset: str = "none"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where the images come from and which split is which."""

    source: str | None = None  # a cache, a dataset to prepare, or None for the built-in synthetic set
    size: int = 64  # image side when a source is prepared into a cache (the built-in set is 32px)
    holdout: float = 0.0  # fraction of every train class kept aside as split 'holdout' when preparing
    holdout_seed: int = 0  # seed of the holdout draw (its own: runs with other seeds score the same images)
    val_split: Literal["val", "holdout"] = "val"  # the split that picks best.pt
    mean: tuple[float, float, float] | None = None  # normalisation (0..1 scale); None: the cache's own
    std: tuple[float, float, float] | None = None
    repeats: int = 1  # repeated augmentation: a train batch holds k augmented copies of batch_size/k images


@dataclass
class OptimConfig:
    """AdamW and what surrounds each step."""

    lr: float = 1e-3  # at a global batch of lr_base_batch; scaled linearly to the actual batch
    lr_base_batch: int = 256
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05  # on tensors with ndim >= 2 only
    decay_rel_pos_bias: bool = False  # False: the relative position tables are not decayed
    layer_decay: float = 1.0  # fine-tuning: block i of L gets lr x layer_decay^(L+1-i); 1: off
    grad_clip: float | None = 5.0  # max global grad norm; None: no clipping
    fused: bool | None = None  # None: fused AdamW where the device supports it


@dataclass
class ScheduleConfig:
    """Epochs, learning-rate schedule (defined in epochs) and the Mixup/CutMix schedule."""

    epochs: int = 30
    warmup_epochs: float = 2.0
    warmup_start: float = 0.01  # warm-up starts at this fraction of the peak learning rate
    min_lr: float = 1e-5  # the cosine ends here (absolute, not scaled)
    step: Literal["iteration", "epoch"] = "iteration"  # the learning rate changes every iteration or epoch
    mix_off_first_epochs: int = 1  # Mixup/CutMix off in the first N epochs
    mix_off_last_epochs: int = 0  # and in the last M
    shape: Literal["cosine", "linear"] = "cosine"  # after the warm-up: cosine, or a straight line, to min_lr


@dataclass
class EmaConfig:
    """Exponential moving average of the weights, evaluated beside the raw weights."""

    enabled: bool = False
    decay: float = 0.999  # per optimizer step


@dataclass
class CheckpointConfig:
    """When last.pt is written (it is always written after the last epoch and when a run is stopped).

    After an epoch, last.pt is due when `every_epochs` epochs or `every_seconds` seconds have passed since the
    previous write, whichever comes first (null: that rule is off; both null: only at the end and on a stop).
    The epochs in between are kept in memory, so a stop by a signal writes the last finished one.
    """

    every_epochs: int | None = 1
    every_seconds: float | None = None


@dataclass
class LogConfig:
    """Experiment trackers (rank 0 only; a tracker that fails is one warning and the run goes on).

    `wandb` needs the extra [wandb] (honours WANDB_MODE=offline), `mlflow` the extra [mlflow] (writes to
    MLFLOW_TRACKING_URI, or ./mlruns). Both name the tracker's run after the run directory.
    """

    wandb: bool = False  # log to Weights & Biases
    mlflow: bool = False  # log to MLflow
    project: str = "tinyswin"  # the W&B project and the MLflow experiment


@dataclass
class EvaluationConfig:
    """When the evaluated splits are evaluated (raw and EMA weights; this time counts in a time budget).

    Always after the last epoch, a time budget's last included. In between, after an epoch once `every_epochs`
    epochs or `every_seconds` seconds (the run's clock) have passed since the previous evaluation, whichever
    comes first (null: that rule is off; both null: only at the end). best.pt follows the evaluated epochs.
    """

    every_epochs: int | None = 1
    every_seconds: float | None = None


@dataclass
class TrainConfig:
    """Everything a training run needs besides the run directory."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentSection = field(default_factory=AugmentSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    log: LogConfig = field(default_factory=LogConfig)
    batch_size: int = 128  # global: summed over processes and accumulation steps
    accumulation: int = 1  # micro-batches per optimizer step
    eval_batch_size: int = 256  # per process
    tta: Literal["none", "flip"] = "none"  # test-time augmentation: flip averages image and mirror logits
    label_smoothing: float = 0.1  # on unmixed batches
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 (or fp16) on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "default"  # torch.compile's mode; reduce-overhead: CUDA graphs
    )
    warmup_steps: int = 0  # steps run and undone before the time budget's clock starts (compile, allocations)
    sync_every: int = 1  # the loss and non-finite checks are read on the host every N steps
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    max_nonfinite: int = 5  # this many non-finite losses in a row stop the run
    threads: int = 0  # CPU threads for torch's intra-op work (0: torch's default, one per core)
    time_budget: float | None = None  # seconds; the schedule is planned to fit and the run stops in time
    tensorboard: bool = False  # TensorBoard event files (RUN_DIR/tensorboard/) when tensorboard is installed
    plots: Literal["epoch", "end"] = "epoch"  # redrawn after epochs (<= ~10% of the time), or only at the end
    init: str | None = None  # start from these weights: timm:NAME, a weights file, a run or export folder

    def peak_lr(self) -> float:
        """The learning rate after the linear scaling rule: lr * batch_size / lr_base_batch."""
        return scaled_lr(self.optim.lr, self.batch_size, self.optim.lr_base_batch)


def scaled_lr(base_lr: float, global_batch: int, base_batch: int) -> float:
    """Linear scaling rule: `base_lr` holds at `base_batch`; a batch k times larger gets k times the rate."""
    return base_lr * global_batch / base_batch


# ---------------------------------------------------------------------------------------------------------
# presets


def preset_dir() -> Path:
    """The folder of the YAML presets shipped inside the package."""
    return Path(str(resources.files("tinyswin") / "configs"))


def config_preset_names() -> list[str]:
    """Names of the shipped training presets (`configs/*.yaml`)."""
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a YAML config file")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file, so not a YAML config") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(str(exc))}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _preset_layers(name: str, seen: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """The mappings of preset `name`, its `base:` chain first."""
    if name in seen:
        raise ConfigError(f"preset {name!r}: circular 'base' chain {' -> '.join((*seen, name))}")
    path = preset_dir() / f"{name}.yaml"
    if not path.is_file():
        names = config_preset_names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown preset {name!r} (presets: {', '.join(names)}){hint}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    layers = _preset_layers(base, (*seen, name)) if base else []
    return [*layers, (str(path), data)]


def load_config(
    preset: str | None = None,
    file: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    *,
    default_preset: str | None = None,
) -> TrainConfig:
    """Build a training config from a preset, a YAML file and `key=value` overrides, in that order.

    Args:
        preset: name of a shipped preset (`configs/NAME.yaml`); None: none (a file may name a `base:`).
        file: a YAML file whose keys apply over the preset; it may name a `base:` preset (without `preset`).
        overrides: `dotted.key=value` strings applied last; values read as YAML (`null`, `[2, 2]`, `1e-3`).
        default_preset: the preset under a `file` that names no `base:` when `preset` is None (the CLI's
            'default'); None: the dataclass defaults.

    Returns:
        The resolved TrainConfig, every key within its range.

    Raises:
        ConfigError: an unknown preset or key (naming the closest), a value of the wrong type or outside its
            range (naming the layer that set it), a file that is not a mapping of keys.
        FileNotFoundError: `file` does not exist.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if preset:
        layers += _preset_layers(preset)
    if file is not None:
        data = _read_yaml(Path(file))
        base = data.pop("base", None)
        if base and preset and base != preset:
            raise ConfigError(f"{file}: names base preset {base!r} but --preset {preset!r} was given")
        if not preset and (base or default_preset):
            layers += _preset_layers(base or default_preset)
        layers.append((str(file), data))
    cfg = TrainConfig()
    origins: dict[str, str] = {}
    for origin, data in layers:
        cfg = _merged(cfg, data, origin, origins)
    cfg = _overridden(cfg, overrides, origins)
    check_ranges(cfg, origins)
    return cfg


# ---------------------------------------------------------------------------------------------------------
# to and from plain mappings


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain nested dicts/lists/scalars (YAML- and `torch.load(weights_only=True)`-safe).

    The `model` and `augment` sections are written flat: `{"preset": NAME, **overrides}`.
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, (ModelSection, AugmentSection)):
            out[f.name] = {"preset": value.preset, **{k: plain_data(v) for k, v in value.overrides.items()}}
        elif dataclasses.is_dataclass(value):
            out[f.name] = {g.name: plain_data(getattr(value, g.name)) for g in dataclasses.fields(value)}
        else:
            out[f.name] = plain_data(value)
    return out


def from_dict(data: Mapping[str, Any], origin: str = "config") -> TrainConfig:
    """A TrainConfig from a (possibly partial) nested mapping over the dataclass defaults; see `to_dict`.

    Raises:
        ConfigError: an unknown key, or a value of the wrong type or outside its range.
    """
    return merge(TrainConfig(), data, origin)


def to_yaml(cfg: TrainConfig) -> str:
    """The config as YAML text (the form of `RUN_DIR/config.yaml`)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def plain_data(value: Any) -> Any:
    """A value as YAML and JSON hold it: tuples (nested too) as lists."""
    if isinstance(value, (tuple, list)):
        return [plain_data(v) for v in value]
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------------------
# merging and overrides


def merge(cfg: TrainConfig, data: Mapping[str, Any], origin: str = "config") -> TrainConfig:
    """A copy of `cfg` with the keys of nested mapping `data` set (every key and value checked).

    Raises:
        ConfigError: an unknown key, or a value of the wrong type or outside its range.
    """
    out = _merged(cfg, data, origin)
    check_ranges(out, origin)
    return out


def apply_overrides(cfg: TrainConfig, overrides: Iterable[str]) -> TrainConfig:
    """A copy of `cfg` with `dotted.key=value` strings applied (values read as YAML).

    Raises:
        ConfigError: an item that is not key=value, an unknown key, or a value of the wrong type or outside
            its range.
    """
    out = _overridden(cfg, overrides)
    check_ranges(out, "override")
    return out


def _merged(
    cfg: TrainConfig, data: Mapping[str, Any], origin: str, origins: dict[str, str] | None = None
) -> TrainConfig:
    """`merge` without the range check; records `origin` for every key set in `origins`."""
    out = dataclasses.replace(cfg)
    for key, value in _flatten(data):
        _set(out, key, value, origin)
        _record(origins, key, origin)
    return out


def _overridden(
    cfg: TrainConfig, overrides: Iterable[str], origins: dict[str, str] | None = None
) -> TrainConfig:
    """`apply_overrides` without the range check; records 'override' for every key set in `origins`."""
    out = dataclasses.replace(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-3")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        _set(out, key.strip(), value, "override")
        _record(origins, key.strip(), "override")
    return out


def _record(origins: dict[str, str] | None, key: str, origin: str) -> None:
    """Note that `key` was last set by `origin` (the latest key last, for `_origin_of`)."""
    if origins is not None:
        origins.pop(key, None)
        origins[key] = origin


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mapping -> [(dotted key, value)], descending into the sections only."""
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and dotted in _SECTIONS:
            items += _flatten(value, dotted + ".")
        else:
            items.append((dotted, value))
    return items


_SECTIONS = ("model", "data", "augment", "optim", "schedule", "ema", "checkpoint", "evaluation", "log")
_EXTERNAL = ("model", "augment")  # sections whose overrides are the fields of another module's dataclass


def _external_hints(section: str) -> dict[str, Any]:
    """Field name -> type hint of SwinConfig ('model') or AugmentConfig ('augment')."""
    if section == "model":
        cls: type = SwinConfig
    else:
        cls = AugmentConfig
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def known_keys() -> list[str]:
    """Every dotted key a config accepts (model/augment keys include their dataclass's fields)."""
    keys: list[str] = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in _EXTERNAL:
            keys.append(f"{f.name}.preset")
            keys += [f"{f.name}.{name}" for name in _external_hints(f.name)]
        elif f.name in _SECTIONS:
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(_section_type(f.name))]
        else:
            keys.append(f.name)
    return keys


def _section_type(name: str) -> type:
    return typing.get_type_hints(TrainConfig)[name]


def _unknown(key: str, origin: str) -> ConfigError:
    close = difflib.get_close_matches(key, known_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{origin}: unknown key {key!r}{hint}")


def _set(cfg: TrainConfig, key: str, value: Any, origin: str) -> None:
    """Set dotted `key` of `cfg` (sections are replaced, never mutated in place) after checking its type."""
    parts = key.split(".")
    top = parts[0]
    hints = typing.get_type_hints(TrainConfig)
    if top not in hints:
        raise _unknown(key, origin)
    if top in _SECTIONS:
        if len(parts) != 2:
            raise _unknown(key, origin)
        name = parts[1]
        section = getattr(cfg, top)
        if top in _EXTERNAL:
            if name == "preset":
                new = dataclasses.replace(section, preset=_coerce(value, str, key, origin))
            else:
                ext = _external_hints(top)
                if name not in ext:
                    raise _unknown(key, origin)
                if name == "num_classes" and top == "model":
                    raise ConfigError(f"{origin}: {key} is set by the data (its number of classes)")
                new = dataclasses.replace(
                    section, overrides={**section.overrides, name: _coerce(value, ext[name], key, origin)}
                )
        else:
            sec_hints = typing.get_type_hints(type(section))
            if name not in sec_hints:
                raise _unknown(key, origin)
            new = dataclasses.replace(section, **{name: _coerce(value, sec_hints[name], key, origin)})
        setattr(cfg, top, new)
        return
    if len(parts) != 1:
        raise _unknown(key, origin)
    setattr(cfg, top, _coerce(value, hints[top], key, origin))


def _coerce(value: Any, hint: Any, key: str, origin: str) -> Any:
    """`value` converted to type `hint`, or a ConfigError naming the key."""
    try:
        return convert(value, hint)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{origin}: {key}={value!r}: expected {describe(hint)}")


# ---------------------------------------------------------------------------------------------------------
# ranges


def check_ranges(cfg: TrainConfig, origin: str | Mapping[str, str] = "config") -> None:
    """Refuse a config with a key outside its range, or a model or augmentation its presets cannot build.

    Every key of `RANGES` is checked; then the AugmentConfig is built, and the SwinConfig is built at the
    training resolution where the config fixes it (`model.img_size` or `augment.out_size`). A refusal of
    the SwinConfig is reported where it names a field that the config overrides (or the resolution that
    `augment.out_size` fixes); one that names a value of the preset, e.g. `num_heads` after `model.depths`
    alone changed, or the data's image size, is left to the run, which builds the model for its data.

    Args:
        cfg: the config to check.
        origin: where the values come from, for the message: one name, or dotted key -> the name of the layer
            that set it (a refusal in the model or augment section names the latest layer of that section).

    Raises:
        ConfigError: one line, e.g. "override: schedule.epochs=0: expected an integer >= 1".
    """
    for key, allowed in RANGES.items():
        value = _get(cfg, key)
        if not allowed.check(value):
            raise ConfigError(f"{_origin_of(origin, key)}: {key}={_shown(value)}: expected {allowed.text}")
    _check_repeats(cfg, origin)
    _check_augment(cfg, origin)
    _check_model(cfg, origin)


def _get(cfg: TrainConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _shown(value: Any) -> str:
    """A value as the messages show it: YAML's lists for tuples, quotes around strings."""
    return repr(plain_data(value))


def _origin_of(origin: str | Mapping[str, str], key: str, related: tuple[str, ...] = ()) -> str:
    """The layer to name for `key`: `origin` itself, or from the map the latest layer that set `key` or a
    key that starts with one of `related` (e.g. 'model.': fields that are checked together)."""
    if isinstance(origin, str):
        return origin
    latest = [name for dotted, name in origin.items() if dotted == key or dotted.startswith(related)]
    return latest[-1] if latest else "config"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _check_repeats(cfg: TrainConfig, origin: str | Mapping[str, str]) -> None:
    """`data.repeats` copies of each image fill every micro-batch: batch_size / accumulation divides by it."""
    repeats, accumulation = cfg.data.repeats, cfg.accumulation
    if repeats > 1 and cfg.batch_size % (accumulation * repeats):
        where = _origin_of(origin, "data.repeats", ("batch_size", "accumulation"))
        batch = f"batch_size={cfg.batch_size}"
        if accumulation > 1:
            batch += f" / accumulation={accumulation}"
        raise ConfigError(f"{where}: data.repeats={repeats}: {batch} is not divisible by it")


def _check_augment(cfg: TrainConfig, origin: str | Mapping[str, str]) -> None:
    """Build the AugmentConfig; its refusal becomes a ConfigError naming `augment.<field>`."""
    preset = cfg.augment.preset
    if preset not in augment_preset_names():
        allowed = one_of(augment_preset_names())
        raise ConfigError(
            f"{_origin_of(origin, 'augment.preset')}: augment.preset={preset!r}: expected {allowed}"
        )
    try:
        build_augment_config(cfg)
    except AugmentConfigError as exc:
        key = f"augment.{exc.field}"
        where = _origin_of(origin, key, ("augment.",))
        raise ConfigError(f"{where}: {key}={_shown(exc.value)}: {exc.reason}") from None
    except (TypeError, ValueError) as exc:  # not a field's refusal
        where = _origin_of(origin, "augment.preset", ("augment.",))
        raise ConfigError(f"{where}: augment: {_one_line(str(exc))}") from None


def _check_model(cfg: TrainConfig, origin: str | Mapping[str, str]) -> None:
    """Build the SwinConfig (the preset's own classes); a refusal that names an overridden field, or the
    resolution fixed by `augment.out_size`, becomes a ConfigError naming `model.<field>`."""
    preset = cfg.model.preset
    if preset not in preset_names():
        allowed = one_of(preset_names())
        raise ConfigError(
            f"{_origin_of(origin, 'model.preset')}: model.preset={preset!r}: expected {allowed}"
        )
    overrides = dict(cfg.model.overrides)
    out_size = build_augment_config(cfg).out_size
    follows_data = "img_size" not in overrides and not out_size
    if "img_size" not in overrides and out_size:
        overrides["img_size"] = int(out_size)
    try:
        preset_config(preset, **overrides)
    except SwinConfigError as exc:
        if exc.field in cfg.model.overrides:
            key = f"model.{exc.field}"
            where = _origin_of(origin, key, ("model.",))
        elif exc.field == "img_size" and not follows_data:
            key = "model.img_size (augment.out_size)"
            where = _origin_of(origin, "augment.out_size", ("model.",))
        else:
            return
        raise ConfigError(f"{where}: {key}={_shown(exc.value)}: {exc.reason}") from None
    except (TypeError, ValueError):
        return  # not a field's refusal: the run, which builds the model for its data, reports it


# ---------------------------------------------------------------------------------------------------------
# the run's model and augmentation


def build_augment_config(cfg: TrainConfig) -> AugmentConfig:
    """The AugmentConfig of a run: its preset with the overrides."""
    return augment_preset(cfg.augment.preset, **cfg.augment.overrides)


def train_resolution(cfg: TrainConfig, image_size: int) -> int:
    """Side of the training inputs: the augmentation's `out_size` if set, else the cache's image size."""
    out_size = build_augment_config(cfg).out_size
    return int(out_size) if out_size else int(image_size)


def build_model_config(cfg: TrainConfig, num_classes: int, image_size: int) -> SwinConfig:
    """The SwinConfig of a run: the preset, its overrides, the data's classes and the training resolution.

    `img_size` is the augmentation's output size if it sets one, else the cache's image size, unless the model
    section overrides it.
    """
    overrides = dict(cfg.model.overrides)
    overrides.setdefault("img_size", train_resolution(cfg, image_size))
    overrides["num_classes"] = num_classes
    if isinstance(overrides["img_size"], list):
        overrides["img_size"] = tuple(overrides["img_size"])
    return preset_config(cfg.model.preset, **overrides)


def input_size(model_config: SwinConfig) -> tuple[int, int]:
    """(H, W) of the model's input."""
    size = model_config.img_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def eval_size(model_config: SwinConfig, image_size: int) -> tuple[int, int] | None:
    """(H, W) that evaluation resizes the stored `image_size` images to: the model's input size, or None
    where it is the stored size."""
    hw = input_size(model_config)
    return None if hw == (image_size, image_size) else hw


def plain_model_config(model_config: SwinConfig) -> dict[str, Any]:
    """A SwinConfig as a plain dict (lists for tuples), the form stored in checkpoints."""
    return {f.name: plain_data(getattr(model_config, f.name)) for f in dataclasses.fields(model_config)}


def expand(cfg: TrainConfig, num_classes: int, image_size: int) -> TrainConfig:
    """`cfg` with the model and augmentation sections spelled out field by field (what `config.yaml` holds).

    The presets stay named, and every field of the resolved SwinConfig (but `num_classes`, which follows the
    data) and AugmentConfig becomes an override, so the config alone reproduces the run.
    """
    model = plain_model_config(build_model_config(cfg, num_classes, image_size))
    del model["num_classes"]
    augment_config = build_augment_config(cfg)
    augment = {f.name: plain_data(getattr(augment_config, f.name)) for f in dataclasses.fields(AugmentConfig)}
    return merge(cfg, {"model": model, "augment": augment}, "expanded config")


def override_keys() -> str:
    """The top-level keys of TrainConfig, sections as ``name.*``, for help texts."""
    names = []
    for f in dataclasses.fields(TrainConfig):
        names.append(f"{f.name}.*" if dataclasses.is_dataclass(f.default_factory) else f.name)
    return ", ".join(names)
