"""The training and evaluation loops: one epoch at a time, explicit state, no globals.

`train(cfg, run_dir)` runs a whole training: data, model, AdamW with its parameter groups, warm-up + cosine
stepped per iteration, mixed precision, clipping, accumulation, optional EMA and torch.compile, evaluation
every epoch, checkpoints (`last.pt`, `best.pt`), `metrics.jsonl`, plots and `summary.json` in the run
directory. Every epoch's randomness (data order, augmentation draws, drop path) is derived from
(seed, epoch, rank) alone, so a run resumed from `last.pt` computes exactly what the uninterrupted run would.

The plots are redrawn after an epoch unless drawing them would take more than about a tenth of the run's
time (then after a later epoch), and always at the end.

Processes: `DistContext` says which rank this process is among how many. The global batch is split evenly
over processes and accumulation steps; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tinyswin.checkpoint import atomic_save, check_compatible, load_checkpoint, remove_stale_temps, unwrap
from tinyswin.config import TrainConfig, cache_root, save_yaml, to_dict
from tinyswin.metrics import (
    calibration_bins,
    confusion_matrix,
    ece_from_bins,
    per_class_accuracy,
    topk_correct,
)
from tinyswin.optim import WarmupCosine, build_adamw

LogFn = Callable[[str], None]

# purposes mixed into the per-epoch seeds, so the streams never coincide
_AUGMENT_STREAM = 1
_TORCH_STREAM = 2


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the message says why and what to do."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands among the processes of one training run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files and prints."""
        return self.rank == 0


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends only on `seed` and `keys` (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(seed), *(int(k) for k in keys)]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


# ---------------------------------------------------------------------------------------------------------
# devices and precision


def resolve_device(name: str, dist: DistContext | None = None) -> torch.device:
    """'auto' -> cuda (this process's local GPU) when available, else cpu; anything else as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank if dist else torch.cuda.current_device())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available on this machine")
    return device


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool, str | None]:
    """The autocast dtype (None = fp32), whether a GradScaler is needed, and a note when a request is changed.

    'auto': bf16 on CUDA where supported, else fp16 with a GradScaler; fp32 on CPU. 'fp16' on CPU runs fp32
    (fp16 with loss scaling is a CUDA recipe; CPU autocast is bf16), with a note.
    """
    if precision == "fp32":
        return None, False, None
    if device.type == "cuda":
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if precision == "bf16":
            return torch.bfloat16, False, None
        return torch.float16, True, None
    if precision == "bf16":
        return torch.bfloat16, False, None
    if precision == "fp16":
        return None, False, "precision=fp16 is for CUDA; running fp32 on the CPU"
    return None, False, None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """torch.autocast for `dtype`, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# data


def resolve_data(source: str | None, cfg: TrainConfig, log: LogFn = print, progress: bool = True) -> Path:
    """The cache to train from: the built-in dataset, an existing cache, or a source prepared into one.

    A source that is not a cache is prepared once into `cache_root()/<name>-<hash of its path>-<size>px[...]`
    and reused afterwards.
    """
    from tinyswin.data import is_cache, prepare
    from tinyswin.data.synthetic import ensure_synthetic

    if source is None:
        return ensure_synthetic()
    path = Path(source).expanduser()
    if is_cache(path):
        return path
    if not path.exists():
        raise FileNotFoundError(f"data source not found: {source}")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    stem = resolved.name.removesuffix(".zip")
    suffix = f"-holdout{cfg.data.holdout:g}" if cfg.data.holdout > 0 else ""
    out = cache_root() / f"{stem}-{digest}-{cfg.data.size}px{suffix}"
    if is_cache(out):  # prepare checks that it still matches the source, and returns at once
        return prepare(path, out, size=cfg.data.size, holdout=cfg.data.holdout, seed=cfg.seed, progress=False)
    log(f"preparing {source} into the cache {out} (once; reused next time)")
    return prepare(path, out, size=cfg.data.size, holdout=cfg.data.holdout, seed=cfg.seed, progress=progress)


def eval_splits(cache_splits: tuple[str, ...], selection: str) -> list[str]:
    """The splits evaluated every epoch: 'val' and 'holdout' where the cache has them, selection first."""
    if selection not in cache_splits:
        hint = " (prepare the source with data.holdout=0.1)" if selection == "holdout" else ""
        raise ValueError(
            f"data.val_split={selection!r}: the cache has no split {selection!r} "
            f"(it has {', '.join(cache_splits)}){hint}"
        )
    others = [s for s in ("val", "holdout") if s in cache_splits and s != selection]
    return [selection, *others]


# ---------------------------------------------------------------------------------------------------------
# model


def build_model_config(cfg: TrainConfig, num_classes: int, image_size: int) -> Any:
    """The SwinConfig of a run: the preset, its overrides, the data's classes and the training resolution.

    `img_size` is the augmentation's output size if it sets one, else the cache's image size, unless the model
    section overrides it.
    """
    from tinyswin.model import preset_config

    overrides = dict(cfg.model.overrides)
    overrides.setdefault("img_size", train_resolution(cfg, image_size))
    overrides["num_classes"] = num_classes
    if isinstance(overrides["img_size"], list):
        overrides["img_size"] = tuple(overrides["img_size"])
    return preset_config(cfg.model.preset, **overrides)


def train_resolution(cfg: TrainConfig, image_size: int) -> int:
    """Side of the training inputs: the augmentation's `out_size` if set, else the cache's image size."""
    out_size = cfg.augment.overrides.get("out_size")
    if out_size is None:
        out_size = getattr(build_augment_config(cfg), "out_size", None)
    return int(out_size) if out_size else int(image_size)


def build_augment_config(cfg: TrainConfig) -> Any:
    """The AugmentConfig of a run: its preset with the overrides."""
    from tinyswin.data.augment import augment_preset

    return augment_preset(cfg.augment.preset, **cfg.augment.overrides)


def plain_model_config(model_config: Any) -> dict[str, Any]:
    """A SwinConfig as a plain dict (lists for tuples), the form stored in checkpoints."""
    out = {}
    for f in dataclasses.fields(model_config):
        value = getattr(model_config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


# ---------------------------------------------------------------------------------------------------------
# evaluation


@dataclass
class EvalResult:
    """Sums over one split (all processes): loss, top-1, top-5, confusion matrix, calibration bins."""

    n: int
    loss_sum: float
    correct1: int
    correct5: int
    confusion: torch.Tensor  # (K, K) int64, rows = true class
    bins: torch.Tensor  # (3, n_bins) float64, see metrics.calibration_bins

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n, 1)

    @property
    def top1(self) -> float:
        return self.correct1 / max(self.n, 1)

    @property
    def top5(self) -> float:
        return self.correct5 / max(self.n, 1)

    def summary(self, class_names: list[str]) -> dict[str, Any]:
        """Top-1/5, loss, per-class accuracy, confusion matrix and ECE, as plain data."""
        per_class = per_class_accuracy(self.confusion)
        return {
            "n": self.n,
            "loss": self.loss,
            "top1": self.top1,
            "top5": self.top5,
            "ece": ece_from_bins(self.bins),
            "per_class_accuracy": dict(zip(class_names, per_class, strict=True)),
            "confusion_matrix": self.confusion.tolist(),
        }


def _all_reduce_(tensor: torch.Tensor, dist: DistContext | None) -> torch.Tensor:
    if dist is not None and dist.world_size > 1:
        import torch.distributed as tdist

        tdist.all_reduce(tensor)
    return tensor


def _broadcast_from_rank0(tensor: torch.Tensor, dist: DistContext, device: torch.device) -> torch.Tensor:
    """Rank 0's `tensor` on every rank (through `device`, which the backend needs), returned on the CPU."""
    if dist.world_size == 1:
        return tensor
    import torch.distributed as tdist

    on_device = tensor.to(device)
    tdist.broadcast(on_device, src=0)
    return on_device.cpu()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | Any,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    *,
    num_classes: int,
    label_smoothing: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    dist: DistContext | None = None,
) -> EvalResult:
    """Loss, top-1, top-5, confusion matrix and calibration of `model` over batches of one split.

    Args:
        model: the classifier; put in eval mode here (and left so).
        batches: (uint8 images (B, H, W, 3), int64 labels (B,)) on the model's device; with several
            processes, each yields its own disjoint shard and the sums are all-reduced.
        normalize: uint8 (B, H, W, 3) -> float (B, 3, H', W'), the eval transform.
        num_classes: K.
        label_smoothing: of the reported loss (the training loss on unmixed batches).
        amp_dtype: autocast dtype, or None.
        dist: the process group's context, or None for one process.
    """
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # n, top-1, top-5
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    bins = torch.zeros(3, 15, dtype=torch.float64)
    for images, labels in batches:
        x = normalize(images)
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()  # (B, K)
        loss_sum += F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="sum").double()
        c1, c5 = topk_correct(logits, labels, (1, 5))
        counts += torch.stack([torch.tensor(labels.numel(), device=device), c1, c5])
        probs = logits.softmax(dim=1)
        confidence, pred = probs.max(dim=1)  # (B,), (B,)
        confusion += confusion_matrix(pred, labels, num_classes)
        bins += calibration_bins(confidence, pred == labels)
    sums = torch.cat([loss_sum.reshape(1), counts.double(), confusion.flatten().double()])
    _all_reduce_(sums, dist)
    bins = _all_reduce_(bins.to(device), dist).cpu()
    n, c1, c5 = (int(v) for v in sums[1:4].tolist())
    return EvalResult(
        n=n,
        loss_sum=float(sums[0]),
        correct1=c1,
        correct5=c5,
        confusion=sums[4:].round().long().reshape(num_classes, num_classes).cpu(),  # (K, K)
        bins=bins,
    )


# ---------------------------------------------------------------------------------------------------------
# one training epoch


@dataclass
class EpochStats:
    """What one training epoch did."""

    loss: float  # mean over the optimizer steps with a finite loss
    steps: int
    images: int  # global images seen
    seconds: float
    nonfinite: int  # steps skipped because the loss was not finite
    lr: float  # the learning rate of the last step

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass
class LoopState:
    """The state the training loop carries between steps and epochs (all saved in checkpoints)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken (skipped steps included)
    best_top1: float = -1.0
    best_epoch: int = 0
    nonfinite_total: int = 0
    nonfinite_run: int = 0  # in a row, up to now
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, Any] | None = None


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Integer targets: cross-entropy with label smoothing; soft (mixed) targets: soft cross-entropy."""
    logits = logits.float()
    if targets.dtype.is_floating_point:
        return F.cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    augment: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: WarmupCosine,
    scaler: torch.amp.GradScaler,
    state: LoopState,
    *,
    cfg: TrainConfig,
    epoch: int,
    mix: bool,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    dist: DistContext | None = None,
    progress: Any = None,
    step_hook: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EpochStats:
    """One pass over the training split.

    Randomness comes only from (cfg.seed, epoch, rank): the loader's epoch permutation, a CPU generator for
    the augmentation and the global torch seed (drop path). `state.step` and the non-finite counters advance.

    Args:
        model: the model to train (possibly DDP- and/or compile-wrapped).
        loader: BatchLoader of the train split (per-rank micro-batches).
        augment: Augment: (uint8 batch, labels, generator, mix) -> (float batch, targets).
        optimizer, scheduler, scaler: stepped once per `cfg.accumulation` micro-batches.
        state: the loop state (step, non-finite counters).
        cfg: the run's config.
        epoch: 0-based epoch index.
        mix: whether Mixup/CutMix may be applied this epoch.
        device, amp_dtype: where and in which autocast dtype to compute.
        ema: the weight average to update after each step, if any.
        dist: process context (None: one process).
        progress: a tqdm bar to update, or None.
        step_hook: called with the number of steps done in this epoch after each optimizer step.
        should_stop: asked after each optimizer step; True ends the epoch there (a time budget ran out).

    Raises:
        TrainingError: `cfg.max_nonfinite` non-finite losses in a row.
    """
    dist = dist or DistContext()
    rank = dist.rank
    model.train()
    loader.set_epoch(epoch)
    generator = torch.Generator()
    generator.manual_seed(derive_seed(cfg.seed, _AUGMENT_STREAM, epoch, rank))
    torch.manual_seed(derive_seed(cfg.seed, _TORCH_STREAM, epoch, rank))
    accum = cfg.accumulation
    steps = len(loader) // accum
    batches = iter(loader)
    first_step = state.step
    loss_total, finite_steps, nonfinite, images = 0.0, 0, 0, 0
    start = time.perf_counter()
    lr = scheduler.get_last_lr()
    for _ in range(steps):
        lr = scheduler.get_last_lr()
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            x_u8, labels = next(batches)
            x, targets = augment(x_u8, labels, generator=generator, mix=mix)
            sync = micro == accum - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync(), autocast(device, amp_dtype):
                logits = model(x)
            loss = loss_fn(logits, targets, cfg.label_smoothing)
            scaler.scale(loss / accum).backward()
            step_loss += loss.detach() / accum
            images += labels.shape[0] * dist.world_size
        value = float(_all_reduce_(step_loss.reshape(1).double(), dist)) / dist.world_size
        if not math.isfinite(value):
            nonfinite += 1
            state.nonfinite_total += 1
            state.nonfinite_run += 1
            optimizer.zero_grad(set_to_none=True)
            if state.nonfinite_run >= cfg.max_nonfinite:
                raise TrainingError(
                    f"the loss was not finite for {state.nonfinite_run} optimizer steps in a row (epoch "
                    f"{epoch + 1}, step {state.step + 1}, lr {lr:.3g}): lower optim.lr, set optim.grad_clip, "
                    "or use precision=fp32; the last good checkpoint is last.pt"
                )
        else:
            state.nonfinite_run = 0
            if cfg.optim.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), cfg.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(unwrap(model))
            loss_total += value
            finite_steps += 1
        scheduler.step()
        state.step += 1
        if step_hook is not None:
            step_hook(state.step - first_step)
        progress_update(progress, value, lr, images, start)
        if should_stop is not None and should_stop():
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return EpochStats(
        loss=loss_total / finite_steps if finite_steps else float("nan"),
        steps=state.step - first_step,
        images=images,
        seconds=time.perf_counter() - start,
        nonfinite=nonfinite,
        lr=lr,
    )


def progress_update(progress: Any, loss: float, lr: float, images: int, start: float) -> None:
    """Advance a tqdm bar by one step with the loss, learning rate and images/s (no-op for None)."""
    if progress is None:
        return
    progress.update(1)
    progress.set_postfix(
        loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{images / (time.perf_counter() - start):.0f}"
    )


# ---------------------------------------------------------------------------------------------------------
# time budget


def compress_schedule(schedule: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The schedule section stretched or compressed to `epochs`: warm-up and mixing-off epochs scale with it.

    Warm-up scales exactly (it may become fractional); the mixing-off counts are rounded, and stay at least 1
    where they were at least 1. A compressed schedule is stepped every iteration, so that its shape survives
    a handful of epochs (stepped per epoch, a 10-of-200-epoch warm-up squeezed into a few epochs would hold
    the whole first epoch at the starting rate).
    """
    factor = epochs / schedule["epochs"]

    def count(value: int) -> int:
        return 0 if value <= 0 else max(1, round(value * factor))

    return {
        **schedule,
        "epochs": epochs,
        "warmup_epochs": schedule["warmup_epochs"] * factor,
        "mix_off_first_epochs": count(schedule["mix_off_first_epochs"]),
        "mix_off_last_epochs": count(schedule["mix_off_last_epochs"]),
        "step": "iteration" if factor < 1 else schedule["step"],
    }


def _apply_schedule(cfg: TrainConfig, schedule: dict[str, Any]) -> TrainConfig:
    return dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, **schedule))


def fitting_epochs(seconds_left: float, epoch_seconds: float) -> int:
    """How many whole epochs of `epoch_seconds` fit in `seconds_left` (at least 1)."""
    return max(1, int(seconds_left // max(epoch_seconds, 1e-9)))


# ---------------------------------------------------------------------------------------------------------
# the run


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("python"):
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("numpy"):
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _tensorboard(run_dir: Path, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _format_epoch(record: dict[str, Any], splits: list[str], epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"train loss {record['train_loss']:.4f}"]
    for split in splits:
        parts.append(
            f"{split} loss {record[f'{split}_loss']:.4f} top-1 {100 * record[f'{split}_top1']:.2f}% "
            f"top-5 {100 * record[f'{split}_top5']:.2f}%"
        )
        if f"ema_{split}_top1" in record:
            parts.append(f"EMA {split} top-1 {100 * record[f'ema_{split}_top1']:.2f}%")
    parts += [f"lr {record['lr']:.3g}", f"{record['images_per_s']:.0f} img/s", f"{record['seconds']:.1f} s"]
    if record.get("nonfinite"):
        parts.append(f"{record['nonfinite']} non-finite steps skipped")
    return "  ".join(parts)


def train(
    cfg: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    dist: DistContext | None = None,
    progress: bool | None = None,
    log: LogFn | None = None,
) -> dict[str, Any]:
    """Train a model as `cfg` says, writing everything to `run_dir`; returns the summary.

    Args:
        cfg: the training config (with `--resume`, the run's own config, possibly with keys changed).
        run_dir: the run directory (created).
        resume: continue from `run_dir/last.pt`.
        dist: the process context (None: one process).
        progress: tqdm bars per epoch (None: when stderr is a terminal).
        log: where progress lines go (default: print, rank 0 only).

    Returns:
        The summary (also written to `run_dir/summary.json`).

    Raises:
        ValueError / FileNotFoundError: bad config, data or checkpoint.
        TrainingError: the loss stayed non-finite.
    """
    from tinyswin.data import BatchLoader, load_cache
    from tinyswin.data.augment import build_augment
    from tinyswin.model import SwinTransformer
    from tinyswin.plots import plot_run

    if cfg.threads < 0:
        raise ValueError(f"threads={cfg.threads}: expected 0 (torch's default) or a number of CPU threads")
    if cfg.threads:
        # one thread is often faster for small models, and on a machine shared with other work
        torch.set_num_threads(cfg.threads)
    wall_start = time.perf_counter()
    dist = dist or DistContext()
    main = dist.is_main
    say: LogFn = (log or print) if main else (lambda _msg: None)
    if progress is None:
        progress = sys.stderr.isatty()
    progress = progress and main
    run_dir = Path(run_dir)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(run_dir)
    if not resume and last_path.exists():
        raise ValueError(
            f"{run_dir} already holds a run (last.pt): resume it with --resume or pick another --out"
        )
    if resume and not last_path.exists():
        raise FileNotFoundError(f"nothing to resume: {last_path} does not exist")
    ckpt = load_checkpoint(last_path) if resume else None

    device = resolve_device(cfg.device, dist)
    amp_dtype, use_scaler, note = resolve_precision(cfg.precision, device)
    if note:
        say(note)

    # data
    cache = load_cache(resolve_data(cfg.data.source, cfg, say))
    splits = eval_splits(cache.splits, cfg.data.val_split)
    num_classes = cache.num_classes
    mean = tuple(cfg.data.mean) if cfg.data.mean is not None else cache.mean
    std = tuple(cfg.data.std) if cfg.data.std is not None else cache.std
    per_rank = cfg.batch_size // dist.world_size
    micro = per_rank // cfg.accumulation
    if micro * cfg.accumulation * dist.world_size != cfg.batch_size or micro < 1:
        raise ValueError(
            f"batch_size={cfg.batch_size} does not split into {dist.world_size} process(es) x "
            f"accumulation={cfg.accumulation} equal micro-batches"
        )
    train_images, train_labels = cache.split("train")
    loader = BatchLoader(
        train_images,
        train_labels,
        micro,
        shuffle=True,
        drop_last=True,
        seed=cfg.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        device=device,
    )
    iters_per_epoch = len(loader) // cfg.accumulation
    if iters_per_epoch < 1:
        raise ValueError(f"the train split ({len(train_labels)} images) is smaller than one global batch")
    eval_loaders = {
        split: BatchLoader(
            *cache.split(split),
            cfg.eval_batch_size,
            shuffle=False,
            drop_last=False,
            rank=dist.rank,
            world_size=dist.world_size,
            device=device,
        )
        for split in splits
    }
    augment_cfg = build_augment_config(cfg)
    augment = build_augment(augment_cfg, mean, std, num_classes)

    # model
    model_config = build_model_config(cfg, num_classes, cache.image_size)
    plain_config = plain_model_config(model_config)
    eval_size = model_config.img_size if isinstance(model_config.img_size, int) else model_config.img_size[0]
    eval_size = None if eval_size == cache.image_size else eval_size

    def normalize(images: torch.Tensor) -> torch.Tensor:
        return augment.normalize(images, eval_size)

    if ckpt is not None:
        check_compatible(
            ckpt, model_config=plain_config, class_names=cache.class_names, source=str(last_path)
        )
    torch.manual_seed(cfg.seed)
    model = SwinTransformer(model_config).to(device)
    optimizer = build_adamw(
        model,
        cfg.peak_lr(),
        weight_decay=cfg.optim.weight_decay,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        decay_rel_pos_bias=cfg.optim.decay_rel_pos_bias,
        fused=cfg.optim.fused,
        device=device,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    ema = None
    if cfg.ema.enabled:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema.decay)
        )
    state = LoopState()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            if ckpt.get("ema") is None:
                raise ValueError(f"{last_path}: has no EMA weights but ema.enabled is true")
            ema.load_state_dict(ckpt["ema"])
        loop = ckpt["loop"]
        state = LoopState(
            **{k: loop[k] for k in loop if k in {f.name for f in dataclasses.fields(LoopState)}}
        )
        _set_rng_state(ckpt["rng_state"])
    train_model: nn.Module = model
    if dist.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    eval_model: nn.Module = model
    if cfg.compile:
        # static shapes: one graph per batch shape (train, eval, a last partial eval batch); dynamic-shape
        # graphs of the windowed attention failed to run under inductor (torch 2.11, H100)
        train_model = torch.compile(train_model, dynamic=False)
        eval_model = train_model if dist.world_size == 1 else torch.compile(model, dynamic=False)

    if cfg.time_budget is not None and state.plan is None and resume:
        raise ValueError(
            "time_budget can only be set when a run starts (its plan is made in the first epoch)"
        )
    if cfg.time_budget is not None and state.plan is not None and state.plan["budget_s"] != cfg.time_budget:
        raise ValueError(
            f"time_budget={cfg.time_budget}: this run was planned for {state.plan['budget_s']} s"
        )

    scheduler = _build_scheduler(cfg, optimizer, iters_per_epoch)
    if ckpt is not None:
        scheduler.load_state_dict(ckpt["scheduler"])

    metrics_path = run_dir / "metrics.jsonl"
    writer = None
    if main:
        save_yaml(cfg, run_dir / "config.yaml")
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in state.history))
        writer = _tensorboard(run_dir, cfg.tensorboard)
        say(f"run directory: {run_dir}  (config.yaml, metrics.jsonl, last.pt, best.pt, plots/, summary.json)")
        n_params = sum(p.numel() for p in model.parameters())
        say(
            f"data {cache.path} ({len(train_labels)} train images, {num_classes} classes); model "
            f"{cfg.model.preset} {n_params / 1e6:.2f}M params at {model_config.img_size}px; device {device}"
            f"{' x' + str(dist.world_size) if dist.world_size > 1 else ''}; global batch {cfg.batch_size}, "
            f"peak lr {cfg.peak_lr():.3g}"
        )
    resumed_at = state.epoch
    if resume:
        say(f"resuming after epoch {state.epoch} (step {state.step})")
    last_results: dict[str, EvalResult] = {}

    def evaluate_split(net: nn.Module, split: str) -> EvalResult:
        return evaluate(
            net,
            iter(eval_loaders[split]),
            normalize,
            num_classes=num_classes,
            label_smoothing=cfg.label_smoothing,
            amp_dtype=amp_dtype,
            dist=dist,
        )

    epoch_times: list[float] = []
    plot_clock = [0.0, 0.0]  # end and duration of the last plot drawing
    budget_clock = wall_start - state.train_seconds  # the budget counts wall time, across resumes

    def measure_eval() -> float:
        """Seconds one evaluation pass (all splits, raw and EMA) takes, timed on a batch of each split."""
        seconds = 0.0
        for eval_loader in eval_loaders.values():
            batch = next(iter(eval_loader))
            start = time.perf_counter()
            evaluate(eval_model, iter([batch]), normalize, num_classes=num_classes, amp_dtype=amp_dtype)
            per_image = (time.perf_counter() - start) / batch[1].shape[0]
            seconds += per_image * eval_loader.num_total / dist.world_size * (2 if ema is not None else 1)
        train_model.train()
        return seconds

    def save(path: Path) -> None:
        atomic_save(
            {
                "format": 1,
                "model": unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "epoch": state.epoch,
                "step": state.step,
                "best": {"top1": state.best_top1, "epoch": state.best_epoch, "split": splits[0]},
                "model_config": plain_config,
                "train_config": to_dict(cfg),
                "class_names": cache.class_names,
                "class_ids": cache.class_ids,
                "normalization": {"mean": list(mean), "std": list(std)},
                "image_size": cache.image_size,
                "rng_state": _rng_state(),
                "loop": dataclasses.asdict(state),
            },
            path,
        )

    while state.epoch < cfg.schedule.epochs:
        epoch = state.epoch
        epochs = cfg.schedule.epochs
        mix = cfg.schedule.mix_off_first_epochs <= epoch < epochs - cfg.schedule.mix_off_last_epochs
        epoch_start = time.perf_counter()
        bar = _progress_bar(iters_per_epoch, f"epoch {epoch + 1}/{epochs}", progress)
        hook = None
        stop = None
        if cfg.time_budget is not None:
            stop = _BudgetClock(cfg.time_budget, budget_clock, dist, device)
        if cfg.time_budget is not None and state.plan is None:
            hook = _BudgetPlanner(
                cfg, state, scheduler, iters_per_epoch, wall_start, measure_eval, dist, device
            )
        try:
            stats = train_one_epoch(
                train_model,
                loader,
                augment,
                optimizer,
                scheduler,
                scaler,
                state,
                cfg=cfg,
                epoch=epoch,
                mix=mix,
                device=device,
                amp_dtype=amp_dtype,
                ema=ema,
                dist=dist,
                progress=bar,
                step_hook=hook,
                should_stop=stop,
            )
        finally:
            if bar is not None:
                bar.close()
        if hook is not None and hook.plan is not None:
            cfg = _apply_schedule(cfg, hook.plan["schedule"])
            plan = hook.plan
            say(
                f"time budget {plan['budget_s']:.0f} s: {plan['sec_per_step'] * 1000:.0f} ms per step, "
                f"~{plan['epoch_seconds']:.1f} s per epoch -> {cfg.schedule.epochs} epochs "
                f"(warm-up {cfg.schedule.warmup_epochs:.2f})"
            )
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": state.step,
            "lr": stats.lr,
            "train_loss": stats.loss,
            "mix": mix,
        }
        if stats.steps < iters_per_epoch:
            record["partial"] = stats.steps  # the time budget ended the epoch after this many steps
            say(
                f"time budget: {cfg.time_budget:.0f} s reached after {stats.steps} steps of epoch {epoch + 1}"
            )
        for split in splits:
            result = evaluate_split(eval_model, split)
            last_results[split] = result
            record |= {
                f"{split}_loss": result.loss,
                f"{split}_top1": result.top1,
                f"{split}_top5": result.top5,
            }
            if ema is not None:
                result = evaluate_split(ema.module, split)
                record |= {
                    f"ema_{split}_loss": result.loss,
                    f"ema_{split}_top1": result.top1,
                    f"ema_{split}_top5": result.top5,
                }
        state.epoch += 1
        improved = record[f"{splits[0]}_top1"] > state.best_top1
        if improved:
            state.best_top1 = record[f"{splits[0]}_top1"]
            state.best_epoch = state.epoch
        record |= {
            "images_per_s": stats.images_per_s,
            "train_seconds": stats.seconds,
            "nonfinite": stats.nonfinite,
        }
        epoch_seconds = time.perf_counter() - epoch_start
        epoch_times.append(epoch_seconds)
        state.train_seconds = time.perf_counter() - budget_clock
        record |= {"seconds": epoch_seconds, "elapsed": state.train_seconds}
        state.history.append(record)
        first_replan = state.plan is not None and not state.plan["replanned"]
        if "partial" in record:  # the budget ran out inside the epoch: the run ends here
            if state.plan is None:
                state.plan = {"budget_s": cfg.time_budget, "original_schedule": _schedule_dict(cfg)}
            state.plan["stopped"] = {"epoch": state.epoch, "steps": stats.steps}
            cfg = _apply_schedule(cfg, {"epochs": state.epoch})
        elif cfg.time_budget is not None and (state.epoch < cfg.schedule.epochs or first_replan):
            cfg = _replan(cfg, state, epoch_times, say)
            scheduler.reschedule(
                epochs=cfg.schedule.epochs,
                warmup_epochs=cfg.schedule.warmup_epochs,
                per_iteration=cfg.schedule.step == "iteration",
            )
        if main:
            _append_jsonl(metrics_path, record)
            if cfg.time_budget is not None:  # the plan may have changed the schedule
                save_yaml(cfg, run_dir / "config.yaml")
            if improved:
                save(best_path)
            save(last_path)
            if time.perf_counter() - plot_clock[0] >= 10 * plot_clock[1]:  # at most ~10% of the time
                plot_start = time.perf_counter()
                plot_run(run_dir)
                plot_clock[:] = [time.perf_counter(), time.perf_counter() - plot_start]
            if writer is not None:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key != "epoch":
                        writer.add_scalar(key, value, state.epoch)
                writer.flush()
            say(_format_epoch(record, splits, cfg.schedule.epochs))
        if dist.world_size > 1:
            import torch.distributed as tdist

            tdist.barrier()

    if writer is not None:
        writer.close()
    if main and state.history:
        plot_run(run_dir)
    if not last_results:  # resumed a finished run: evaluate once for the summary
        for split in splits:
            last_results[split] = evaluate_split(eval_model, split)
    summary = _summary(cfg, state, splits, last_results, cache.class_names, run_dir, resumed_at)
    if main:
        save_yaml(cfg, run_dir / "config.yaml")
        _write_json(run_dir / "summary.json", summary)
        say(
            f"done: {splits[0]} top-1 {100 * summary[f'{splits[0]}_top1']:.2f}% (best "
            f"{100 * summary['best_top1']:.2f}% at epoch {summary['best_epoch']}), "
            f"{summary['images_per_s']:.0f} img/s, {summary['train_seconds']:.0f} s"
        )
        say(f"run directory: {run_dir}")
        say(f"checkpoints:   {last_path}  {best_path}")
        say(f"plots:         {run_dir / 'plots'}")
        say(f"summary:       {run_dir / 'summary.json'}")
    return summary


def resume_config(
    run_dir: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """The config of the run in `run_dir` (from its last.pt) with `key=value` overrides applied."""
    from tinyswin.config import apply_overrides, from_dict

    path = Path(run_dir) / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    ckpt = load_checkpoint(path)
    return apply_overrides(from_dict(ckpt["train_config"], str(path)), overrides)


def _build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, iters_per_epoch: int
) -> WarmupCosine:
    return WarmupCosine(
        optimizer,
        cfg.peak_lr(),
        iters_per_epoch=iters_per_epoch,
        epochs=cfg.schedule.epochs,
        warmup_epochs=cfg.schedule.warmup_epochs,
        warmup_start=cfg.schedule.warmup_start,
        min_lr=cfg.schedule.min_lr,
        per_iteration=cfg.schedule.step == "iteration",
    )


def _schedule_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg.schedule)


def plan_budget(
    cfg: TrainConfig,
    *,
    sec_per_step: float,
    eval_seconds: float,
    iters_per_epoch: int,
    steps_done: int,
    elapsed: float,
) -> dict[str, Any]:
    """The plan of a time-budgeted run, made during its first epoch from the measured speed.

    With `elapsed` seconds gone (setup included) and `steps_done` steps of the first epoch taken, the rest of
    that epoch plus N - 1 more epochs (each `sec_per_step * iters_per_epoch + eval_seconds`, with 3% spare for
    checkpoints and plots) must fit in what is left of `cfg.time_budget`. The schedule section is then
    compressed (or stretched) to N epochs, see `compress_schedule`.
    """
    assert cfg.time_budget is not None
    epoch_seconds = sec_per_step * iters_per_epoch + eval_seconds
    first_rest = sec_per_step * (iters_per_epoch - steps_done) + eval_seconds
    left = (cfg.time_budget - elapsed) / 1.03 - first_rest
    epochs = 1 + (fitting_epochs(left, epoch_seconds) if left >= epoch_seconds else 0)
    original = _schedule_dict(cfg)
    return {
        "budget_s": cfg.time_budget,
        "sec_per_step": sec_per_step,
        "eval_seconds": eval_seconds,
        "epoch_seconds": epoch_seconds,
        "planned_at_s": elapsed,
        "original_schedule": original,
        "schedule": compress_schedule(original, epochs),
        "replanned": [],
    }


class _BudgetClock:
    """`should_stop` of a time-budgeted epoch: True once the run's wall time passes the budget.

    With several processes, rank 0's clock decides for all, by a broadcast on `device` every `every` steps
    (a broadcast waits for the device, so not every step; the run may overshoot by `every - 1` steps).
    """

    def __init__(
        self, budget: float, clock_start: float, dist: DistContext, device: torch.device, every: int = 8
    ) -> None:
        self.budget = budget
        self.clock_start = clock_start
        self.dist = dist
        self.device = device
        self.every = every
        self.calls = 0

    def __call__(self) -> bool:
        over = time.perf_counter() - self.clock_start > self.budget
        if self.dist.world_size == 1:
            return over
        self.calls += 1
        if self.calls % self.every:
            return False  # every process skips the same steps
        flag = torch.tensor([over], dtype=torch.uint8)
        return bool(_broadcast_from_rank0(flag, self.dist, self.device)[0])


class _BudgetPlanner:
    """Step hook of the first epoch of a time-budgeted run: times a few steps, then fits the schedule.

    The first step (warm-up of kernels and allocations) is not timed; then up to 5 steps, or fewer if they
    take more than 3% of the budget. The scheduler is switched to the plan at once, so the run follows it from
    the next step; `plan` holds the plan afterwards.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        state: LoopState,
        scheduler: WarmupCosine,
        iters_per_epoch: int,
        wall_start: float,
        measure_eval: Callable[[], float],
        dist: DistContext,
        device: torch.device,
    ) -> None:
        self.device = device
        self.cfg = cfg
        self.state = state
        self.scheduler = scheduler
        self.iters_per_epoch = iters_per_epoch
        self.wall_start = wall_start
        self.measure_eval = measure_eval
        self.dist = dist
        self.t1: float | None = None
        self.plan: dict[str, Any] | None = None

    def __call__(self, done: int) -> None:
        if self.plan is not None:
            return
        now = time.perf_counter()
        if self.t1 is None:
            self.t1 = now
            if self.iters_per_epoch > 1:
                return
        assert self.cfg.time_budget is not None
        timed = done - 1
        spent = now - self.t1
        if timed < 5 and spent < 0.03 * self.cfg.time_budget and done < self.iters_per_epoch:
            return
        sec_per_step = spent / timed if timed > 0 else now - self.wall_start
        measured = torch.tensor([sec_per_step, self.measure_eval()], dtype=torch.float64)
        measured = _broadcast_from_rank0(measured, self.dist, self.device)  # every rank follows rank 0
        plan = plan_budget(
            self.cfg,
            sec_per_step=float(measured[0]),
            eval_seconds=float(measured[1]),
            iters_per_epoch=self.iters_per_epoch,
            steps_done=done,
            elapsed=time.perf_counter() - self.wall_start,
        )
        schedule = plan["schedule"]
        self.scheduler.reschedule(
            epochs=schedule["epochs"],
            warmup_epochs=schedule["warmup_epochs"],
            per_iteration=schedule["step"] == "iteration",
        )
        self.state.plan = plan
        self.plan = plan


def _replan(cfg: TrainConfig, state: LoopState, epoch_times: list[float], say: LogFn) -> TrainConfig:
    """After an epoch: fit the remaining epochs into the remaining budget (after the first epoch in either
    direction, later only fewer); the run stops at a checkpoint when no further epoch fits."""
    assert cfg.time_budget is not None and state.plan is not None
    recent = epoch_times[-3:]
    epoch_seconds = sum(recent) / len(recent)
    left = cfg.time_budget - state.train_seconds
    fit = state.epoch + (int(left // epoch_seconds) if left > 0 else 0)
    planned = cfg.schedule.epochs
    first = not state.plan["replanned"]
    new = max(fit, state.epoch) if first else min(planned, max(fit, state.epoch))
    state.plan["replanned"].append(
        {"after_epoch": state.epoch, "epochs": new, "epoch_seconds": epoch_seconds}
    )
    if new == planned:
        return cfg
    schedule = compress_schedule(state.plan["original_schedule"], new)
    state.plan["schedule"] = schedule
    if new == state.epoch:
        say(f"time budget: no further epoch fits in the {cfg.time_budget:.0f} s budget; stopping")
    else:
        say(f"time budget: {epoch_seconds:.1f} s per epoch -> {new} epochs in all")
    return _apply_schedule(cfg, schedule)


def _summary(
    cfg: TrainConfig,
    state: LoopState,
    splits: list[str],
    results: dict[str, EvalResult],
    class_names: list[str],
    run_dir: Path,
    resumed_at: int,
) -> dict[str, Any]:
    history = state.history
    speeds = [r["images_per_s"] for r in history if r.get("images_per_s")]
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "epochs": state.epoch,
        "planned_epochs": cfg.schedule.epochs,
        "steps": state.step,
        "best_epoch": state.best_epoch,
        "best_top1": state.best_top1,
        "best_split": splits[0],
        "images_per_s": sum(speeds) / len(speeds) if speeds else 0.0,
        "train_seconds": state.train_seconds,
        "nonfinite_steps": state.nonfinite_total,
        "resumed_at_epoch": resumed_at or None,
        "time_budget": state.plan,
    }
    for split in splits:
        r = results[split]
        summary |= {f"{split}_top1": r.top1, f"{split}_top5": r.top5, f"{split}_loss": r.loss}
    if history:
        for key, value in history[-1].items():
            if key.startswith("ema_"):
                summary[key] = value
    detail = "val" if "val" in results else splits[0]
    summary[f"{detail}_details"] = results[detail].summary(class_names)
    summary["ece"] = summary[f"{detail}_details"]["ece"]
    return summary
