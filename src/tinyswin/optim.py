"""Optimiser parameter groups and the learning-rate schedule: warm-up, then cosine or linear decay."""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

REL_POS_KEYWORD = "relative_position_bias_table"
SHAPES = ("cosine", "linear")  # the decay after the warm-up (`schedule.shape`)


def layer_id(name: str, depths: Sequence[int]) -> int:
    """The depth of a parameter for layer-wise learning-rate decay, as BEiT and timm's Swin count it.

    0: the patch embedding; 1..L: the blocks in order over all stages (a stage's patch merge goes with its
    first block, as timm's `group_matcher` puts it); L + 1: the final norm, the head and anything else.

    Args:
        name: a parameter name of a tinyswin SwinTransformer.
        depths: blocks per stage (L = their sum).
    """
    if name.startswith("patch_embed."):
        return 0
    found = re.match(r"stages\.(\d+)\.(blocks\.(\d+)|downsample)\.", name)
    if found is None:
        return sum(depths) + 1
    stage = int(found.group(1))
    block = int(found.group(3)) if found.group(3) is not None else 0
    return sum(depths[:stage]) + block + 1


def param_groups(
    model: nn.Module, weight_decay: float, decay_rel_pos_bias: bool = False, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW groups: decayed (tensors with ndim >= 2) and not decayed (the rest and the excluded names).

    Norm weights and biases are 1-D, so the ndim rule leaves them out; the relative position tables are 2-D,
    so they are left out by name (the model's `no_weight_decay_keywords()`), unless `decay_rel_pos_bias`.

    With `layer_decay` < 1 (layer-wise learning-rate decay, for fine-tuning: BEiT, timm's
    `param_groups_layer_decay`), each of the two groups is split by `layer_id`, and the group of depth i of
    L + 1 carries `"lr_scale": layer_decay ** (L + 1 - i)`: 1 for the head and final norm, `layer_decay` for
    the last block, `layer_decay ** (L + 1)` for the patch embedding. The schedule multiplies its rate by it.

    Args:
        model: the (unwrapped) model; a SwinTransformer when `layer_decay` < 1 (its config gives the depths).
        weight_decay: decay of the first group.
        decay_rel_pos_bias: also decay the relative position tables (the notebook's post-mortem blames this).
        layer_decay: per-block factor of the learning rate from the head down; 1: none (two groups).

    Returns:
        `[{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]` (with
        layer decay: such a pair per depth, empty groups left out, each with its "lr_scale"), each group also
        holding the parameter names under "names".
    """
    keywords = set(getattr(model, "no_weight_decay_keywords", lambda: {REL_POS_KEYWORD})())
    keywords.add(REL_POS_KEYWORD)
    if decay_rel_pos_bias:
        keywords = {k for k in keywords if k != REL_POS_KEYWORD}
    depths: Sequence[int] = ()
    if layer_decay != 1.0:
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "depths"):
            raise ValueError(
                f"layer_decay={layer_decay}: needs a SwinTransformer (its depths), got {type(model)}"
            )
        depths = config.depths
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = param.ndim >= 2 and not any(k in name for k in keywords)
        depth = layer_id(name, depths) if depths else 0
        group = groups.setdefault((depth, decayed), {"params": [], "names": []})
        group["params"].append(param)
        group["names"].append(name)
    if not depths:
        empty: dict[str, Any] = {"params": [], "names": []}
        return [
            {**groups.get((0, True), empty), "weight_decay": weight_decay},
            {**groups.get((0, False), empty), "weight_decay": 0.0},
        ]
    top = sum(depths) + 1
    return [
        {
            **groups[key],
            "weight_decay": weight_decay if key[1] else 0.0,
            "lr_scale": layer_decay ** (top - key[0]),
        }
        for key in sorted(groups, key=lambda k: (k[0], not k[1]))
    ]


def build_adamw(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    decay_rel_pos_bias: bool = False,
    layer_decay: float = 1.0,
    fused: bool | None = None,
    device: torch.device | str = "cpu",
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, ...)`; `fused=None` picks the fused kernel on CUDA.

    Groups with an "lr_scale" (layer-wise decay) start at `lr * lr_scale`; `WarmupCosine` keeps the scale.
    """
    groups = [
        {k: v for k, v in g.items() if k != "names"}
        for g in param_groups(model, weight_decay, decay_rel_pos_bias, layer_decay)
    ]
    for group in groups:
        if "lr_scale" in group:
            group["lr"] = lr * group["lr_scale"]
    kwargs: dict[str, Any] = {"lr": lr, "betas": tuple(betas), "eps": eps}
    use_fused = torch.device(device).type == "cuda" if fused is None else fused
    if use_fused and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def schedule_lr(
    t: float,
    peak_lr: float,
    *,
    epochs: float,
    warmup_epochs: float,
    warmup_start: float,
    min_lr: float,
    shape: str = "cosine",
) -> float:
    """Learning rate at time `t` (in epochs, fractional): linear warm-up, then a decay to `min_lr`.

    Warm-up goes linearly from `warmup_start * peak_lr` at t = 0 to `peak_lr` at t = warmup_epochs; the decay
    then runs over the remaining `epochs - warmup_epochs` epochs, with progress p going from 0 to 1:
    'cosine' is `min_lr + (peak_lr - min_lr) * (1 + cos(pi * p)) / 2` (torch's LinearLR, then
    CosineAnnealingLR), 'linear' is `min_lr + (peak_lr - min_lr) * (1 - p)` (a straight line; `min_lr` 0
    ends at zero).
    """
    if shape not in SHAPES:
        raise ValueError(f"schedule shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    if warmup_epochs > 0 and t < warmup_epochs:
        return peak_lr * (warmup_start + (1.0 - warmup_start) * t / warmup_epochs)
    span = max(epochs - warmup_epochs, 1e-12)
    progress = min(max(t - warmup_epochs, 0.0) / span, 1.0)
    if shape == "linear":
        return min_lr + (peak_lr - min_lr) * (1.0 - progress)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at_step(
    step: int,
    segments: list[dict[str, Any]],
    *,
    peak_lr: float,
    iters_per_epoch: int,
    warmup_start: float,
    min_lr: float,
) -> float:
    """The learning rate of optimizer step `step` (0-based) under a schedule that changed over time.

    Args:
        step: the step.
        segments: `{"from_step", "epochs", "warmup_epochs", "per_iteration", "shape"}` in order of
            `from_step`, the first from 0: each holds from its step until the next one's
            (`WarmupCosine.segments`; a segment without "shape", recorded before the key existed, is cosine).
        peak_lr, warmup_start, min_lr: see `schedule_lr`.
        iters_per_epoch: optimizer steps per epoch.
    """
    seg = next(s for s in reversed(segments) if s["from_step"] <= step)
    t = step / iters_per_epoch if seg["per_iteration"] else float(step // iters_per_epoch)
    return schedule_lr(
        t,
        peak_lr,
        epochs=seg["epochs"],
        warmup_epochs=seg["warmup_epochs"],
        warmup_start=warmup_start,
        min_lr=min_lr,
        shape=seg.get("shape", "cosine"),
    )


class WarmupCosine:
    """Warm-up + decay (cosine, or linear) schedule defined in epochs, applied every iteration (or epoch).

    Call `step()` after each optimizer step. The state is the number of steps taken, so a resumed schedule
    continues exactly. The shape is part of every recorded segment, so the lr plot and a resumed run follow
    it; a time budget's `reschedule` changes the length and keeps the shape.

    Args:
        optimizer: its groups' "lr" is set on construction and by every `step()` (times the group's
            "lr_scale" where it has one).
        peak_lr: the learning rate at the end of warm-up (after the scaling rule).
        iters_per_epoch: optimizer steps per epoch.
        epochs, warmup_epochs, warmup_start, min_lr, shape: see `schedule_lr`.
        per_iteration: False holds the rate constant within an epoch (the notebook's per-epoch stepping).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        peak_lr: float,
        *,
        iters_per_epoch: int,
        epochs: float,
        warmup_epochs: float,
        warmup_start: float = 0.01,
        min_lr: float = 0.0,
        per_iteration: bool = True,
        shape: str = "cosine",
    ) -> None:
        if iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
        if shape not in SHAPES:
            raise ValueError(f"schedule shape must be one of {', '.join(SHAPES)}, got {shape!r}")
        self.optimizer = optimizer
        self.peak_lr = peak_lr
        self.iters_per_epoch = iters_per_epoch
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs
        self.warmup_start = warmup_start
        self.min_lr = min_lr
        self.per_iteration = per_iteration
        self.shape = shape
        self.steps = 0
        self.segments: list[dict[str, Any]] = []  # the schedule's changes, see `lr_at_step`
        self._record_segment()
        self._apply()

    def _segment(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "warmup_epochs": self.warmup_epochs,
            "per_iteration": self.per_iteration,
            "shape": self.shape,
        }

    def _record_segment(self) -> None:
        """Note the current schedule as holding from the current step on (replacing one from that step)."""
        if self.segments and {k: self.segments[-1][k] for k in self._segment()} == self._segment():
            return
        if self.segments and self.segments[-1]["from_step"] == self.steps:
            self.segments.pop()
        self.segments.append({"from_step": self.steps if self.segments else 0, **self._segment()})

    def lr_at(self, step: int) -> float:
        """The learning rate optimizer step number `step` (0-based) takes under the current schedule."""
        return lr_at_step(
            step,
            [{"from_step": 0, **self._segment()}],
            peak_lr=self.peak_lr,
            iters_per_epoch=self.iters_per_epoch,
            warmup_start=self.warmup_start,
            min_lr=self.min_lr,
        )

    def get_last_lr(self) -> float:
        """The learning rate the next optimizer step will use."""
        return self.lr_at(self.steps)

    def step(self) -> None:
        """Advance by one optimizer step and set the next step's learning rate."""
        self.steps += 1
        self._apply()

    def _apply(self) -> None:
        lr = self.lr_at(self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # the scale of layer-wise decay, where set

    def reschedule(self, *, epochs: float, warmup_epochs: float, per_iteration: bool | None = None) -> None:
        """Change the length (and stepping) of the schedule from the next step on (a time budget's plan)."""
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs
        if per_iteration is not None:
            self.per_iteration = per_iteration
        self._record_segment()
        self._apply()

    def describe(self) -> dict[str, Any]:
        """What `lr_at_step` needs for the rate of every step taken so far (the lr plot draws it)."""
        return {
            "iters_per_epoch": self.iters_per_epoch,
            "peak_lr": self.peak_lr,
            "warmup_start": self.warmup_start,
            "min_lr": self.min_lr,
            "segments": [dict(seg) for seg in self.segments],
        }

    def state_dict(self) -> dict[str, Any]:
        """`{"steps": n}` plus the schedule's parameters (for the record)."""
        return {"steps": self.steps, **self._segment(), **self.describe()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state["steps"]` (the other parameters come from the config; a schedule that differs
        from the saved one holds from this step on; saved segments without a shape are cosine)."""
        self.steps = int(state["steps"])
        self.segments = [{"shape": "cosine", **seg} for seg in state.get("segments", [])]
        self._record_segment()
        self._apply()
