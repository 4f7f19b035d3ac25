"""The range of every training config key (`RANGES`), and the small constructors it is written with.

`tinyswin.config.check_ranges` checks a resolved config against this table; each refusal is one line naming
the key, the value and the `Range.text`.
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
VAL_SPLITS = ("val", "holdout")
SCHEDULE_STEPS = ("iteration", "epoch")
SCHEDULE_SHAPES = ("cosine", "linear")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TTA_MODES = ("none", "flip")
PLOT_TIMES = ("epoch", "end")


class Range(NamedTuple):
    """The values a key accepts: a predicate and its description (the text after 'expected')."""

    check: Callable[[Any], bool]
    text: str


def interval(
    low: float,
    high: float | None = None,
    *,
    integer: bool = False,
    open_low: bool = False,
    open_high: bool = False,
    null: str | None = None,
) -> Range:
    """A finite number (an int if `integer`) between `low` and `high`, closed or open at either end; `null`,
    when given, describes what None means and lets it pass."""

    def check(value: Any) -> bool:
        if value is None:
            return null is not None
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if value <= low if open_low else value < low:
            return False
        return high is None or (value < high if open_high else value <= high)

    kind = "an integer" if integer else "a finite number"
    if high is None:
        text = f"{kind} {'>' if open_low else '>='} {low}"
    else:
        kind = "an integer" if integer else "a number"
        text = f"{kind} in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    return Range(check, f"{text}, or {null}" if null else text)


def items(count: int, item: Range, null: str | None = None) -> Range:
    """A list of `count` values that each pass `item`; `null` as in `_interval`."""

    def check(value: Any) -> bool:
        if value is None:
            return null is not None
        return isinstance(value, (list, tuple)) and len(value) == count and all(map(item.check, value))

    text = f"{count} values, each {item.text}"
    return Range(check, f"{text}, or {null}" if null else text)


def choice(options: Iterable[str]) -> Range:
    """One of `options`."""
    allowed = tuple(options)
    return Range(lambda value: isinstance(value, str) and value in allowed, one_of(allowed))


def boolean(null: str | None = None) -> Range:
    """True or false; `null` as in `_interval`."""
    return Range(
        lambda value: isinstance(value, bool) or (value is None and null is not None),
        f"true, false or {null}" if null else "true or false",
    )


def text(null: str) -> Range:
    """A non-empty string, or None (meaning `null`)."""
    return Range(lambda value: value is None or (isinstance(value, str) and value.strip() != ""), null)


def one_of(options: Iterable[str]) -> str:
    """ "one of 'a', 'b'", for messages."""
    return "one of " + ", ".join(repr(o) for o in options)


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

RANGES: Mapping[str, Range] = types.MappingProxyType(
    {
        "data.source": text("a cache, a dataset to prepare, or null (the built-in synthetic set)"),
        "data.size": interval(1, integer=True),
        "data.holdout": interval(0, 1, open_high=True),
        "data.holdout_seed": interval(0, integer=True),
        "data.val_split": choice(VAL_SPLITS),
        "data.mean": items(3, interval(0, 1), null="null (the cache's own)"),
        "data.std": items(3, interval(0, open_low=True), null="null (the cache's own)"),
        "data.repeats": interval(1, integer=True),
        "optim.lr": interval(0, open_low=True),
        "optim.lr_base_batch": interval(1, integer=True),
        "optim.betas": items(2, interval(0, 1, open_high=True)),
        "optim.eps": interval(0, open_low=True),
        "optim.weight_decay": interval(0),
        "optim.decay_rel_pos_bias": boolean(),
        "optim.layer_decay": interval(0, 1, open_low=True),
        "optim.grad_clip": interval(0, open_low=True, null="null (no clipping)"),
        "optim.fused": boolean(null="null (where the device supports it)"),
        "schedule.epochs": interval(1, integer=True),
        "schedule.warmup_epochs": interval(0),
        "schedule.warmup_start": interval(0, 1, open_low=True),
        "schedule.min_lr": interval(0),
        "schedule.step": choice(SCHEDULE_STEPS),
        "schedule.mix_off_first_epochs": interval(0, integer=True),
        "schedule.mix_off_last_epochs": interval(0, integer=True),
        "schedule.shape": choice(SCHEDULE_SHAPES),
        "ema.enabled": boolean(),
        "ema.decay": interval(0, 1, open_high=True),
        "batch_size": interval(1, integer=True),
        "accumulation": interval(1, integer=True),
        "eval_batch_size": interval(1, integer=True),
        "tta": choice(TTA_MODES),
        "label_smoothing": interval(0, 1, open_high=True),
        "precision": choice(PRECISIONS),
        "compile": boolean(),
        "compile_mode": choice(COMPILE_MODES),
        "warmup_steps": interval(0, integer=True),
        "sync_every": interval(1, integer=True),
        "checkpoint.every_epochs": interval(1, integer=True, null="null (by seconds only)"),
        "checkpoint.every_seconds": interval(0, open_low=True, null="null (by epochs only)"),
        "evaluation.every_epochs": interval(1, integer=True, null="null (by seconds only)"),
        "evaluation.every_seconds": interval(0, open_low=True, null="null (by epochs only)"),
        "seed": Range(interval(0, 2**64, integer=True, open_high=True).check, "an integer in [0, 2**64)"),
        "device": Range(
            lambda value: isinstance(value, str) and _DEVICE.fullmatch(value) is not None,
            "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'",
        ),
        "max_nonfinite": interval(1, integer=True),
        "threads": interval(0, integer=True),
        "time_budget": interval(0, open_low=True, null="null (no budget)"),
        "tensorboard": boolean(),
        "log.wandb": boolean(),
        "log.mlflow": boolean(),
        "log.project": Range(
            lambda value: isinstance(value, str) and value.strip() != "", "a non-empty name"
        ),
        "plots": choice(PLOT_TIMES),
        "init": Range(
            lambda value: value is None or (isinstance(value, str) and value.strip() not in ("", "timm:")),
            "a weights file, a run or export folder, timm:NAME, or null (fresh weights)",
        ),
    }
)
"""Dotted key -> the values it accepts, for every key of TrainConfig but those of the `model` and `augment`
sections (which `SwinConfig` and `AugmentConfig` check themselves, see `check_ranges`)."""
