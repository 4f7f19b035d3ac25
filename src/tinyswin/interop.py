"""Weights in: timm `SwinTransformer` models and state dicts (and official Swin checkpoints) -> tinyswin.

Relative position tables are resized (bicubic) when the source window differs from tinyswin's, so that
ImageNet-pretrained weights can be fine-tuned at another resolution.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tinyswin.model import SwinConfig, SwinTransformer

# Buffers that older timm versions and official checkpoints store; tinyswin derives them.
_DERIVED = re.compile(r"(relative_position_index|attn_mask|relative_coords_table)$")


def resize_relative_position_table(
    table: torch.Tensor, source_window: tuple[int, int], target_window: tuple[int, int]
) -> torch.Tensor:
    """Resize a relative position bias table to another window, bicubic over the (dy, dx) grid.

    Args:
        table: ((2*sh - 1) * (2*sw - 1), heads).
        source_window: (sh, sw) the table was made for.
        target_window: (th, tw) wanted.

    Returns:
        ((2*th - 1) * (2*tw - 1), heads).
    """
    if tuple(source_window) == tuple(target_window):
        return table
    heads = table.shape[1]
    src = (2 * source_window[0] - 1, 2 * source_window[1] - 1)
    dst = (2 * target_window[0] - 1, 2 * target_window[1] - 1)
    grid = table.T.reshape(1, heads, *src).float()  # (1, heads, 2sh-1, 2sw-1)
    grid = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False)  # (1, heads, 2th-1, 2tw-1)
    return grid.reshape(heads, -1).T.contiguous().to(table.dtype)  # (rows, heads)


def _source_window(rows: int, target_window: tuple[int, int]) -> tuple[int, int]:
    """The window of a table with `rows` rows: square, or the target's window when the rows say so."""
    if rows == (2 * target_window[0] - 1) * (2 * target_window[1] - 1):
        return target_window
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise ValueError(f"cannot tell the window of a relative position table with {rows} rows")
    return ((side + 1) // 2, (side + 1) // 2)


def _is_official_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """Official Swin checkpoints keep the patch merge at the end of a stage and the head as `head`."""
    return "head.weight" in state or ("layers.0.downsample.reduction.weight" in state)


def _rename(key: str, official: bool) -> str:
    """A timm (or official Swin) parameter name -> the tinyswin name."""
    if official:
        match = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if match:  # official: merge at the end of stage i == tinyswin: at the start of stage i + 1
            return f"stages.{int(match.group(1)) + 1}.downsample.{match.group(2)}"
    key = re.sub(r"^layers\.", "stages.", key)
    return re.sub(r"^head\.fc\.", "head.", key)


def from_timm(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], config: SwinConfig
) -> SwinTransformer:
    """A tinyswin model holding the weights of a timm SwinTransformer.

    Args:
        model_or_state_dict: A `timm.models.swin_transformer.SwinTransformer`, its state dict, or an official
            Swin checkpoint's "model" dict.
        config: The tinyswin architecture; widths, depths and heads must match the source, and its stem must
            be "patch".

    Returns:
        A SwinTransformer (on the CPU, float32) with the source's weights; relative position tables are
        resized where the windows differ.
    """
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = dict(model_or_state_dict)
    else:
        raise ValueError(f"from_timm: expected a timm model or a state dict, got {type(model_or_state_dict)}")
    if config.stem != "patch":
        raise ValueError(f"from_timm: config.stem={config.stem!r}, and timm's Swin has a patch embedding")
    if config.lsa:
        raise ValueError(
            "from_timm: config.lsa is true, and timm's Swin attention has no learned temperature"
        )
    model = SwinTransformer(config)
    model.load_state_dict(map_state_dict(state, model))
    return model


class WeightsMismatch(ValueError):
    """Weights that do not fit the model: `problem` says how (the message is "from_timm: <problem>")."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"from_timm: {problem}")
        self.problem = problem


def tinyswin_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm, official Swin or tinyswin state dict with tinyswin's parameter names, derived buffers left out.

    A tinyswin state dict (keys under `stages.`) comes back as it is, buffers aside.
    """
    official = _is_official_layout(state) and not any(k.startswith("stages.") for k in state)
    return {_rename(key, official): value for key, value in state.items() if not _DERIVED.search(key)}


def map_state_dict(
    state: Mapping[str, torch.Tensor], model: SwinTransformer, *, fresh: Collection[str] = ()
) -> dict[str, torch.Tensor]:
    """The entries of `model.state_dict()` taken from a timm / official / tinyswin state dict.

    Relative position tables are resized (bicubic) where the source's window differs from the model's.

    Args:
        state: the source weights.
        model: the model they go into (its config fixes every shape).
        fresh: keys of the model that keep the model's own values (e.g. a head for other classes); source
            entries under these names are dropped.

    Returns:
        A full state dict for `model` (CPU tensors of the model's dtypes).

    Raises:
        WeightsMismatch: one line naming the missing and unexpected keys, or a key whose shape does not fit.
        ValueError: a relative position table whose window cannot be told from its rows.
    """
    target = model.state_dict()
    renamed = {k: v for k, v in tinyswin_names(state).items() if k not in fresh}
    missing = sorted(set(target) - set(renamed) - set(fresh))
    unexpected = sorted(set(renamed) - set(target))
    if missing or unexpected:
        raise WeightsMismatch(
            f"weights do not match the config: missing keys {missing or 'none'}; "
            f"unexpected keys {unexpected or 'none'}"
        )
    windows = {
        f"{name}.relative_position_bias_table": module.table_window
        for name, module in model.named_modules()
        if hasattr(module, "table_window")
    }
    loaded = {key: target[key] for key in fresh if key in target}
    for key, value in renamed.items():
        if key in windows and value.shape != target[key].shape and value.ndim == 2:
            if value.shape[1] != target[key].shape[1]:
                raise WeightsMismatch(f"{key} has {value.shape[1]} heads, the config {target[key].shape[1]}")
            value = resize_relative_position_table(
                value, _source_window(value.shape[0], windows[key]), windows[key]
            )
        if value.shape != target[key].shape:
            raise WeightsMismatch(
                f"{key} has shape {tuple(value.shape)}, the config needs {tuple(target[key].shape)}"
            )
        loaded[key] = value.detach().to(dtype=target[key].dtype, device="cpu")
    return loaded


# The timm builder that `to_timm` names; every geometry argument is given, so its defaults play no part.
TIMM_ARCHITECTURE = "swin_tiny_patch4_window7_224"


def _timm_problem(model: SwinTransformer) -> str | None:
    """Why timm's SwinTransformer cannot build the same network as `model`, or None."""
    config = model.config
    if config.stem != "patch":
        return f"stem is {config.stem!r} and timm's Swin embeds patches with one convolution"
    if config.lsa:
        return "lsa is true and timm's Swin attention has no learned temperature nor a masked diagonal"
    if not config.patch_norm:
        return "patch_norm is false and timm always normalises the patch embedding"
    height, width = config.img_size if isinstance(config.img_size, tuple) else (config.img_size,) * 2
    for i, stage in enumerate(model.stages):
        res = (height // config.patch_size // 2**i, width // config.patch_size // 2**i)
        window = stage.blocks[0].attn.table_window
        if res[0] % window[0] or res[1] % window[1]:
            return (
                f"stage {i} has a {res[0]}x{res[1]} map that {window[0]}x{window[1]} windows do not tile, "
                "and timm pads it after the shift where tinyswin pads before it"
            )
    return None


def to_timm(model: SwinTransformer) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The inverse of `from_timm`: a state dict and the arguments that rebuild the same network in timm.

    `timm.create_model(**kwargs)` builds the network (windows are given per stage, clamped to the stage's map
    as tinyswin clamps them; `always_partition` is timm's switch for `shift_full_window`), and
    `load_state_dict(state_dict)` fills it; its logits equal the tinyswin model's at the config's image size.

    Args:
        model: a tinyswin SwinTransformer.

    Returns:
        (state_dict, create_model_kwargs): timm's parameter names, tensors on the CPU; plain data
        (lists, numbers, strings) that `json.dumps` takes, `model_name` included.

    Raises:
        ValueError: the config is one timm's SwinTransformer cannot express (one line saying why).
    """
    config = model.config
    problem = _timm_problem(model)
    if problem:
        raise ValueError(f"to_timm: timm's SwinTransformer cannot express this model: {problem}")
    state = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"^stages\.", "layers.", key)
        state[re.sub(r"^head\.", "head.fc.", key)] = value.detach().cpu().clone()
    img_size = config.img_size if isinstance(config.img_size, int) else list(config.img_size)
    kwargs: dict[str, object] = {
        "model_name": TIMM_ARCHITECTURE,
        "img_size": img_size,
        "patch_size": config.patch_size,
        "in_chans": config.in_chans,
        "num_classes": config.num_classes,
        "embed_dim": config.embed_dim,
        "depths": list(config.depths),
        "num_heads": list(config.num_heads),
        # one (h, w) pair per stage: a flat pair would read as one window for every stage
        "window_size": [list(stage.blocks[0].attn.table_window) for stage in model.stages],
        "always_partition": config.shift_full_window,
        "mlp_ratio": config.mlp_ratio,
        "qkv_bias": config.qkv_bias,
        "drop_path_rate": config.drop_path_rate,
    }
    return state, kwargs
