"""The search space of `tinyswin tune`: a YAML file of config keys with a distribution each, the budget of a
trial, the pruner and the sampler. Read and checked here (every problem is one line naming the file and the
key) before a study starts.

    preset: default                 # the training preset the trials start from (default: 'default')
    config: base.yaml               # optional: a YAML config over the preset (relative to this file)
    overrides: [batch_size=64]      # optional: key=value for every trial (the command line adds more)
    epochs: 4                       # the budget of a trial: schedule.epochs ...
    time_budget: null               # ... or seconds (the time_budget key); --epochs / --time-budget win
    pruner: {type: median, startup_trials: 2, warmup_epochs: 1}   # or {type: hyperband, min_epochs: 1,
                                    #    reduction_factor: 3}, or {type: none}
    sampler: {type: tpe, seed: null}                              # or {type: random}
    heartbeat: 10                   # seconds; a trial silent for 3 heartbeats (a killed process) is failed
    params:                         # key: one of float / int / categorical
      optim.lr: {float: [1.0e-4, 1.0e-2], log: true}
      optim.weight_decay: {float: [0.0, 0.1]}
      augment.randaug_ops: {int: [0, 2]}
      model.depths: {categorical: [[1, 1], [2, 2]]}
    enqueue:                        # optional: points tried first (e.g. the preset's own values)
      - {optim.lr: 3.0e-3}
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tinyswin.config import TrainConfig, merge
from tinyswin.errors import ConfigError, one_line

KINDS = ("float", "int", "categorical")
PRUNERS = ("median", "hyperband", "none")
SAMPLERS = ("tpe", "random")
TOP_KEYS = (
    "preset", "config", "overrides", "epochs", "time_budget", "pruner", "sampler", "heartbeat", "params",
    "enqueue",
)  # fmt: skip
PRUNER_KEYS = {"median": ("startup_trials", "warmup_epochs"), "hyperband": ("min_epochs", "reduction_factor")}


@dataclass(frozen=True)
class Param:
    """One config key searched over.

    Attributes:
        key: the dotted config key, e.g. 'optim.lr'.
        kind: 'float', 'int' or 'categorical'.
        low, high: the range (float, int).
        log: sample on a log scale (float, int).
        step: the grid of the range, or None (float, int).
        choices: the values (categorical).
    """

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """Draw this key's value for an Optuna trial."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=step)
        return self.decode(trial.suggest_categorical(self.key, [self.encode(c) for c in self.choices]))

    def encode(self, value: Any) -> Any:
        """A value as the study stores it: a list choice (Optuna takes scalars only) as its JSON text."""
        if self.kind == "categorical" and isinstance(value, (list, tuple)):
            return json.dumps(list(value))
        return value

    def decode(self, stored: Any) -> Any:
        """The config value of a stored one (`encode` undone)."""
        if self.kind == "categorical" and isinstance(stored, str):
            for choice in self.choices:
                if isinstance(choice, tuple) and stored == json.dumps(list(choice)):
                    return choice
        return stored

    def edges(self) -> list[Any]:
        """The values that bound the key's range (every choice of a categorical key), for checking."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


@dataclass(frozen=True)
class Space:
    """A search space file, read and checked (see the module's docstring)."""

    path: Path
    params: tuple[Param, ...]
    preset: str | None = None
    config: Path | None = None
    overrides: tuple[str, ...] = ()
    epochs: int | None = None
    time_budget: float | None = None
    pruner: str = "median"
    pruner_args: tuple[tuple[str, Any], ...] = ()
    sampler: str = "tpe"
    seed: int | None = None
    heartbeat: int = 10
    enqueue: tuple[dict[str, Any], ...] = ()

    def describe(self) -> str:
        """One line: the keys searched and the budget of a trial."""
        budget = f"{self.epochs} epochs" if self.time_budget is None else f"{self.time_budget:g} s"
        return f"{len(self.params)} keys ({', '.join(p.key for p in self.params)}), {budget} a trial"


def _fail(path: Path, text: str) -> ConfigError:
    return ConfigError(f"{path}: {text}")


def _number(path: Path, where: str, value: Any, integer: bool = False) -> float:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _fail(path, f"{where}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    return value


def _param(path: Path, key: str, spec: Any) -> Param:
    """One entry of `params:`."""
    if not isinstance(spec, Mapping):
        raise _fail(path, f"params.{key}: expected a mapping such as {{float: [1.0e-4, 1.0e-2], log: true}}")
    kinds = [k for k in KINDS if k in spec]
    extra = sorted(set(spec) - {*KINDS, "log", "step"})
    if len(kinds) != 1 or extra:
        found = f" (unknown: {', '.join(map(str, extra))})" if extra else ""
        raise _fail(path, f"params.{key}: expected exactly one of {', '.join(KINDS)}, with log / step{found}")
    kind = kinds[0]
    values = spec[kind]
    if kind == "categorical":
        if not isinstance(values, list) or not values or set(spec) != {kind}:
            raise _fail(path, f"params.{key}: categorical takes a non-empty list of values (no log / step)")
        return Param(key, kind, choices=tuple(tuple(v) if isinstance(v, list) else v for v in values))
    if not isinstance(values, list) or len(values) != 2:
        raise _fail(path, f"params.{key}: {kind} takes [low, high]")
    low, high = (_number(path, f"params.{key}", v, kind == "int") for v in values)
    log = spec.get("log", False)
    step = spec.get("step")
    if not isinstance(log, bool):
        raise _fail(path, f"params.{key}.log: expected true or false, got {log!r}")
    if step is not None and _number(path, f"params.{key}.step", step, kind == "int") <= 0:
        raise _fail(path, f"params.{key}.step: expected a number > 0, got {step!r}")
    if not low < high or (log and low <= 0) or (log and step is not None):
        raise _fail(path, f"params.{key}: expected low < high ({low!r}, {high!r}), low > 0 with log, no step "
                    "with log")  # fmt: skip
    return Param(key, kind, float(low), float(high), log, None if step is None else float(step))


def _pruner(path: Path, data: Any) -> tuple[str, tuple[tuple[str, Any], ...]]:
    spec = {"type": data} if isinstance(data, str) else data
    if not isinstance(spec, Mapping) or spec.get("type") not in PRUNERS:
        raise _fail(path, f"pruner: expected {{type: {' | '.join(PRUNERS)}, ...}}, got {data!r}")
    kind = spec["type"]
    allowed = PRUNER_KEYS.get(kind, ())
    args = []
    for key, value in spec.items():
        if key == "type":
            continue
        if key not in allowed:
            raise _fail(path, f"pruner.{key}: unknown for {kind} (keys: {', '.join(allowed) or 'none'})")
        if _number(path, f"pruner.{key}", value, integer=True) < (2 if key == "reduction_factor" else 0):
            raise _fail(path, f"pruner.{key}: {value!r} is too small")
        args.append((key, value))
    return kind, tuple(args)


def _sampler(path: Path, data: Any) -> tuple[str, int | None]:
    spec = {"type": data} if isinstance(data, str) else data
    if (
        not isinstance(spec, Mapping)
        or spec.get("type", "tpe") not in SAMPLERS
        or set(spec) - {"type", "seed"}
    ):
        raise _fail(path, f"sampler: expected {{type: {' | '.join(SAMPLERS)}, seed: N}}, got {data!r}")
    seed = spec.get("seed")
    if seed is not None:
        _number(path, "sampler.seed", seed, integer=True)
    return spec.get("type", "tpe"), seed


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"search space file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, f"cannot read it ({one_line(exc)})") from None
    except yaml.YAMLError as exc:
        raise _fail(path, f"not valid YAML: {one_line(exc)}") from None
    if not isinstance(data, dict):
        raise _fail(path, "expected a mapping of keys (params:, epochs:, pruner: ...)")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise _fail(path, f"unknown key {unknown[0]!r} (keys: {', '.join(TOP_KEYS)})")
    return data


def read_space(path: str | os.PathLike[str]) -> Space:
    """Read and check a search space file (the keys' values are checked against a config by `check_space`).

    Raises:
        FileNotFoundError: no such file.
        ConfigError: one line naming the file and the key that is wrong.
    """
    path = Path(path)
    data = _read(path)
    params = data.get("params")
    if not isinstance(params, Mapping) or not params:
        raise _fail(path, "params: expected a mapping of config keys to distributions (at least one)")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise _fail(path, "overrides: expected a list of key=value strings")
    enqueue = data.get("enqueue") or []
    if not isinstance(enqueue, list) or not all(isinstance(e, Mapping) for e in enqueue):
        raise _fail(path, "enqueue: expected a list of mappings of config keys to values")
    for point in enqueue:
        stray = sorted(set(point) - set(params))
        if stray:
            raise _fail(path, f"enqueue: {stray[0]!r} is not one of the params")
    epochs, budget = data.get("epochs"), data.get("time_budget")
    if epochs is not None and _number(path, "epochs", epochs, integer=True) < 1:
        raise _fail(path, f"epochs: expected an integer >= 1, got {epochs!r}")
    if budget is not None and not _number(path, "time_budget", budget) > 0:
        raise _fail(path, f"time_budget: expected seconds > 0, got {budget!r}")
    heartbeat = data.get("heartbeat", 10)
    if _number(path, "heartbeat", heartbeat, integer=True) < 1:
        raise _fail(path, f"heartbeat: expected seconds >= 1, got {heartbeat!r}")
    pruner, pruner_args = _pruner(path, data.get("pruner", "median"))
    sampler, seed = _sampler(path, data.get("sampler", "tpe"))
    config = data.get("config")
    return Space(
        path=path,
        params=tuple(_param(path, str(key), spec) for key, spec in params.items()),
        preset=data.get("preset"),
        config=(path.parent / config) if config else None,
        overrides=tuple(overrides),
        epochs=epochs,
        time_budget=budget,
        pruner=pruner,
        pruner_args=pruner_args,
        sampler=sampler,
        seed=seed,
        heartbeat=heartbeat,
        enqueue=tuple(dict(point) for point in enqueue),
    )


def check_space(space: Space, base: TrainConfig) -> None:
    """Every searched key exists and takes the edges of its range (each choice), over the base config.

    Raises:
        ConfigError: '<file>: params.<key>: <the config's refusal>'.
    """
    for param in space.params:
        where = f"{space.path}: params.{param.key}"  # the origin that the config's refusal names
        for value in param.edges():
            merge(base, {param.key: list(value) if isinstance(value, tuple) else value}, where)


def with_values(base: TrainConfig, values: Mapping[str, Any], origin: str) -> TrainConfig:
    """`base` with a trial's values set (tuples of a categorical key as lists).

    Raises:
        ConfigError: a combination the config refuses (e.g. a batch that `data.repeats` does not divide).
    """
    plain = {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
    return dataclasses.replace(merge(base, plain, origin))
