"""Weights a training starts from (the `init` key): read a source, take its geometry, fit it to the run.

A source is `timm:NAME`, a timm Swin Transformer (`timm.create_model(NAME, pretrained=True)`: timm downloads
the weights on first use and keeps them in its own cache), or a path that `tinyswin.modelpath.read_weights`
reads: a state dict (.pth, .bin, .safetensors; timm names, or an official Swin checkpoint's {"model": ...}), a
tinyswin checkpoint, a run directory, a `tinyswin export` folder, or a timm model folder as model hubs hold
them (`tinyswin export --format timm`).

The model of the run takes the source's geometry (patch size, width, depths, heads, MLP ratio, qkv bias,
patch norm), read from the weights themselves; the windows are fitted to the stage grids at the training
resolution (`fit_windows`), the relative position tables resized to them (bicubic, as official Swin does when
it fine-tunes at another resolution), and the head is new, initialised for the run's classes. The run's
config records that geometry as model overrides, so its checkpoints and config.yaml rebuild the model without
the source, and a resumed run never reads the source again.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tinyswin.config import TrainConfig, merge, plain_data, train_resolution
from tinyswin.errors import ConfigError, TinyswinError, one_line
from tinyswin.extras import require
from tinyswin.interop import WeightsMismatch, map_state_dict, tinyswin_names
from tinyswin.model import SwinTransformer
from tinyswin.modelpath import read_weights

TIMM_PREFIX = "timm:"
HEAD_KEYS = ("head.weight", "head.bias")
# SwinConfig fields that the shapes of the weights fix; a run may not override them with other values
WEIGHT_FIELDS = (
    "patch_size",
    "in_chans",
    "embed_dim",
    "depths",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "patch_norm",
)
# keys of Swin variants the tinyswin model does not have
_FOREIGN = re.compile(r"(absolute_pos_embed|logit_scale|cpb_mlp)")


@dataclass(frozen=True)
class InitWeights:
    """Weights read from an `init` source.

    Attributes:
        source: the source as given (for messages).
        state: the weights under tinyswin's names, the head left out.
        geometry: the SwinConfig fields the weights fix (`WEIGHT_FIELDS`).
        windows: the window side of each stage's relative position tables.
        shift_full_window: the source's shift rule (False for timm and official Swin).
    """

    source: str
    state: dict[str, torch.Tensor]
    geometry: dict[str, Any]
    windows: tuple[int, ...]
    shift_full_window: bool = False


def check_init_value(value: str) -> None:
    """Refuse an `init` value that names nothing: an empty string or a bare `timm:`.

    Raises:
        ConfigError: one line.
    """
    if not value.strip() or (value.startswith(TIMM_PREFIX) and not value[len(TIMM_PREFIX) :].strip()):
        raise ConfigError(f"init={value!r}: expected a file or folder of weights, or timm:NAME")


def read_init(value: str) -> InitWeights:
    """Read the weights an `init` value names, and their geometry.

    Args:
        value: `timm:NAME`, or the path of a state dict, checkpoint, run directory or export folder.

    Returns:
        The weights (tinyswin names, no head) with their geometry.

    Raises:
        FileNotFoundError, TinyswinError: one line naming the source and what is wrong with it.
    """
    check_init_value(value)
    if value.startswith(TIMM_PREFIX):
        state, shift_full = _timm_state(value[len(TIMM_PREFIX) :].strip()), False
    else:
        state, shift_full = read_weights(value)
    renamed = {k: v for k, v in tinyswin_names(state).items() if k not in HEAD_KEYS}
    geometry, windows = infer_geometry(renamed, value)
    return InitWeights(value, renamed, geometry, windows, shift_full)


def _timm_state(name: str) -> dict[str, torch.Tensor]:
    """The state dict of `timm.create_model(name, pretrained=True)`, a Swin Transformer (v1)."""
    timm = require("timm", "timm", f"--init timm:{name}")
    if not timm.is_model(name):
        swins = timm.list_models("swin_*")
        close = difflib.get_close_matches(name, swins, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" (Swin models: {', '.join(swins[:6])}, ...)"
        raise TinyswinError(f"init=timm:{name}: timm has no model of that name{hint}")
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as exc:  # a download or a file in timm's cache that failed, whatever its kind
        raise TinyswinError(
            f"init=timm:{name}: timm could not load its pretrained weights: {one_line(exc)}"
        ) from None
    swin = timm.models.swin_transformer.SwinTransformer
    if not isinstance(model, swin):
        raise TinyswinError(
            f"init=timm:{name}: is a {type(model).__name__}, not a Swin Transformer (v1) "
            "(the model whose weights tinyswin takes)"
        )
    return model.state_dict()


def infer_geometry(state: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The SwinConfig fields that a state dict's shapes fix, and each stage's window.

    Args:
        state: weights under tinyswin's names (`interop.tinyswin_names`).
        source: the source, for messages.

    Returns:
        (geometry, windows): `WEIGHT_FIELDS` -> value, and the window side of each stage's tables.

    Raises:
        TinyswinError: not the weights of a Swin Transformer (v1) tinyswin can build.
    """
    if any(key.startswith("patch_embed.convs.") for key in state):
        raise TinyswinError(
            f"init={source}: the weights of a conv stem (model.stem=conv); --init takes a patch embedding's"
        )
    if "patch_embed.patch_norm_in.weight" in state:
        raise TinyswinError(
            f"init={source}: the weights of a shifted-patch stem (model.stem=spt); --init takes a patch "
            "embedding's"
        )
    if any(key.endswith(".attn.scale") for key in state):
        raise TinyswinError(
            f"init={source}: the weights of locality self-attention (model.lsa=true); --init takes plain "
            "Swin attention"
        )
    foreign = sorted(k for k in state if _FOREIGN.search(k))
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4 or foreign:
        what = f"keys tinyswin's Swin has not: {foreign[:3]}" if foreign else "no patch_embed.proj.weight"
        raise TinyswinError(f"init={source}: not the weights of a Swin Transformer (v1) ({what})")
    blocks: dict[int, int] = {}
    for key in state:
        found = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", key)
        if found:
            stage, block = int(found.group(1)), int(found.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    if sorted(blocks) != list(range(len(blocks))) or not blocks:
        raise TinyswinError(f"init={source}: the stages of its blocks are not 0..N ({sorted(blocks)})")
    tables = [state.get(f"stages.{i}.blocks.0.attn.relative_position_bias_table") for i in range(len(blocks))]
    if any(t is None or t.ndim != 2 for t in tables):
        raise TinyswinError(f"init={source}: a stage has no relative position table")
    windows = []
    for i, table in enumerate(tables):
        side = math.isqrt(table.shape[0])
        if side * side != table.shape[0] or side % 2 == 0:
            raise TinyswinError(
                f"init={source}: stage {i}'s table of {table.shape[0]} rows is not a square window's"
            )
        windows.append((side + 1) // 2)
    dim = int(proj.shape[0])
    geometry = {
        "patch_size": int(proj.shape[2]),
        "in_chans": int(proj.shape[1]),
        "embed_dim": dim,
        "depths": tuple(blocks[i] for i in range(len(blocks))),
        "num_heads": tuple(int(t.shape[1]) for t in tables),
        "mlp_ratio": state["stages.0.blocks.0.mlp.fc1.weight"].shape[0] / dim,
        "qkv_bias": "stages.0.blocks.0.attn.qkv.bias" in state,
        "patch_norm": "patch_embed.norm.weight" in state,
    }
    return geometry, tuple(windows)


def fit_window(grid: tuple[int, int], source: int) -> int:
    """The window of a stage whose token grid is `grid`: the side nearest the source's window that tiles the
    grid, a side covering the grid counting as tiling it (no padding then, and, as official Swin does, no
    shift where a window covers the map); ties go to the larger window.

    Examples: grid 16 with window 7 -> 8; grid 8 -> 8 (covers the map); grid 56 -> 7; grid 16 with 12 -> 16.
    """
    largest = max(*grid, 1)  # a grid of 0 (an input too small) is the model config's to refuse
    fits = [w for w in range(1, largest + 1) if all(s % w == 0 or w >= s for s in grid)]
    return min(fits, key=lambda w: (abs(w - source), -w))


def fit_windows(img_size: tuple[int, int], patch_size: int, windows: tuple[int, ...]) -> tuple[int, ...]:
    """`fit_window` for every stage at an input of `img_size` (H, W) pixels (grid halved at each stage)."""
    grid = (img_size[0] // patch_size, img_size[1] // patch_size)
    return tuple(fit_window((grid[0] // 2**i, grid[1] // 2**i), w) for i, w in enumerate(windows))


def init_config(cfg: TrainConfig, weights: InitWeights, image_size: int) -> TrainConfig:
    """`cfg` with the model geometry of `weights` written into its model overrides.

    The windows are fitted to the training resolution unless `model.window_size` is overridden, the shift rule
    is the source's unless `model.shift_full_window` is; the other fields of the preset (drop path, table
    init) stay the run's.

    Raises:
        ConfigError: an override of the model contradicts the weights' geometry.
    """
    overrides = cfg.model.overrides
    if overrides.get("stem", "patch") != "patch":  # no preset has another stem
        raise ConfigError(
            f"model.stem={overrides['stem']!r} contradicts the init weights ({weights.source}), "
            "which have a patch embedding (stem 'patch')"
        )
    if overrides.get("lsa", False):
        raise ConfigError(
            f"model.lsa=true contradicts the init weights ({weights.source}), whose attention has no learned "
            "temperature (lsa false)"
        )
    for name in WEIGHT_FIELDS:
        if name in overrides and plain_data(overrides[name]) != plain_data(weights.geometry[name]):
            asked, have = plain_data(overrides[name]), plain_data(weights.geometry[name])
            raise ConfigError(
                f"model.{name}={asked!r} contradicts the init weights ({weights.source}), "
                f"which have {name} {have!r}"
            )
    size = overrides.get("img_size", train_resolution(cfg, image_size))
    pair = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    model = dict(weights.geometry)
    fitted = fit_windows(pair, weights.geometry["patch_size"], weights.windows)
    model["window_size"] = overrides.get("window_size", fitted)
    model["shift_full_window"] = overrides.get("shift_full_window", weights.shift_full_window)
    return merge(cfg, {"model": {k: plain_data(v) for k, v in model.items()}}, f"init {weights.source}")


def load_init(model: SwinTransformer, weights: InitWeights) -> None:
    """Copy `weights` into `model`: tables resized to its windows, its own (freshly initialised) head kept.

    Raises:
        TinyswinError: a key is missing or has a shape the model cannot take (one line).
    """
    try:
        model.load_state_dict(map_state_dict(weights.state, model, fresh=HEAD_KEYS))
    except WeightsMismatch as exc:
        raise TinyswinError(f"init={weights.source}: {exc.problem}") from None
    except ValueError as exc:  # a relative position table whose window cannot be told
        raise TinyswinError(f"init={weights.source}: {one_line(exc)}") from None


def describe_init(weights: InitWeights, model_config: Any) -> str:
    """One line: where the weights come from, their geometry, the windows before and after fitting."""
    g = weights.geometry

    def dashed(values: Any) -> str:
        return "-".join(map(str, values))

    return (
        f"init: weights from {weights.source} (patch {g['patch_size']}, C {g['embed_dim']}, depths "
        f"{dashed(g['depths'])}, heads {dashed(g['num_heads'])}); windows {dashed(weights.windows)} -> "
        f"{dashed(model_config.stage_windows)} at {model_config.img_size}px; new head for "
        f"{model_config.num_classes} classes"
    )
