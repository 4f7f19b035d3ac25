"""Compile time of a preset's training step and evaluation (default: ``speedrun``), compiled as
``tinyswin train`` compiles them, with inductor's caches cold, warm, or filled from saved artifacts; and, once
compiled, the seconds of a training step and of an evaluation batch: the evaluation's share of an epoch.

One process is one measurement, as the start of a run:
  - setup: the ``Run`` built (``train.setup_run``) on synthetic data of the run's shape (uint8 images of
    ``--image-size``, ``--classes`` classes, enough for the warm-up and the timed steps);
  - warm-up: ``Run.warm_up()``, what a run reports as ``compile_seconds``: ``warmup_steps`` training steps and
    one evaluation batch, compiled (static shapes, the preset's ``compile_mode``), then undone;
  - again: the same warm-up, compiled already (its steps' own cost): ``compile`` = warm-up - again;
  - step, eval batch: median seconds of a training step and of an evaluation batch (with ``tta: flip``, two
    forward passes), compiled;
  - share: the evaluation's seconds per epoch over the training's, for ``--train-images`` and
    ``--val-images`` (raw and EMA weights: two evaluations of the split).

Caches (``torch.compile`` fills them as it compiles): ``TORCHINDUCTOR_CACHE_DIR`` (``--cache-dir``) holds
inductor's FX graph cache and the AOTAutograd cache, which a later process (a resumed run) reads instead of
compiling again; ``torch.compiler.save_cache_artifacts()`` (``--save-artifacts FILE``) writes what this
process compiled into one file, and ``load_cache_artifacts`` (``--load-artifacts FILE``) puts such a file into
the caches before compiling: how compiled kernels travel to another machine (a GPU's kernels serve the same
kind of GPU with the same torch; a CPU's, the same CPU).

    python benchmarks/compile_time.py --cache-dir runs/ind --json cold.json --save-artifacts art.bin  # cold
    python benchmarks/compile_time.py --cache-dir runs/ind --json warm.json                           # warm
    python benchmarks/compile_time.py --cache-dir runs/ind2 --load-artifacts art.bin --json loaded.json
    python benchmarks/compile_time.py --device cpu --batch-size 32 --eval-batch-size 64 precision=bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyswin.config import load_config
from tinyswin.data import write_cache
from tinyswin.engine import train_one_epoch
from tinyswin.evaluate import evaluate
from tinyswin.runtime import DistContext
from tinyswin.train import Run, setup_run


def synthetic_cache(root: Path, classes: int, size: int, train: int, val: int) -> Path:
    """A cache of random uint8 images: `train` and `val` of (size, size, 3), labels cycling over `classes`."""
    rng = np.random.default_rng(0)
    splits = {
        name: (
            rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            np.arange(n, dtype=np.int64) % classes,
        )
        for name, n in (("train", train), ("val", val))
    }
    names = [f"c{k}" for k in range(classes)]
    return write_cache(root, splits, names, names, source="compile_time.py (random images)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(run: Run, steps: int) -> dict[str, float]:
    """Seconds of the warm-up (compiling), of the same again (compiled), of a step and an evaluation batch."""
    out = {"warm_up": run.warm_up()}
    out["again"] = run.warm_up()
    out["compile"] = out["warm_up"] - out["again"]

    def one_step() -> None:
        train_one_epoch(run, mix=True, max_steps=1)  # epoch 0: run.state.epoch of a new run

    batch = next(iter(run.eval_loaders["val"]))

    def one_eval_batch() -> None:
        evaluate(run.eval_model, iter([batch]), run.normalize, num_classes=run.cache.num_classes,
                 amp_dtype=run.amp_dtype, tta=run.cfg.tta)  # fmt: skip

    out["step"] = _median_seconds(one_step, steps, run.device)
    out["eval_batch"] = _median_seconds(one_eval_batch, steps, run.device)
    return out


def evaluation_share(
    seconds: dict[str, float], cfg: Any, train_images: int, val_images: int
) -> dict[str, float]:
    """Seconds per epoch of training and of one evaluation (raw and EMA weights), and their ratio."""
    train = train_images // cfg.batch_size * seconds["step"]
    passes = 2 if cfg.ema.enabled else 1
    evaluation = passes * -(-val_images // cfg.eval_batch_size) * seconds["eval_batch"]
    return {"train_epoch_s": train, "evaluation_s": evaluation, "evaluation_share": evaluation / train}


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. precision=bf16)")
    parser.add_argument("--preset", default="speedrun", help="training preset (default: speedrun)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default: the preset's)")
    parser.add_argument("--eval-batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument(
        "--classes", type=int, default=200, help="classes of the synthetic data (default: 200)"
    )
    parser.add_argument("--image-size", type=int, default=64, help="image side (default: 64)")
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps and evaluation batches (default: 3)"
    )
    parser.add_argument(
        "--train-images", type=int, default=100_000, help="train split for the share (default: 100000)"
    )
    parser.add_argument(
        "--val-images", type=int, default=10_000, help="val split for the share (default: 10000, official)"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None,
        help="TORCHINDUCTOR_CACHE_DIR for this process (default: the environment's, else torch's default)",
    )  # fmt: skip
    parser.add_argument("--save-artifacts", type=Path, default=None, help="write the compiled artifacts here")
    parser.add_argument("--load-artifacts", type=Path, default=None, help="load compiled artifacts first")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Time one start of a compiled run; print and optionally write the results."""
    args = build_parser().parse_args(argv)
    wall = time.perf_counter()
    if args.cache_dir is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.cache_dir.resolve())  # read when inductor compiles
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
    }
    artifacts = args.load_artifacts is not None or args.save_artifacts is not None
    if artifacts and not hasattr(torch.compiler, "save_cache_artifacts"):
        print(f"compile_time: torch {torch.__version__} cannot save or load cache artifacts", file=sys.stderr)
        return 2
    if args.load_artifacts is not None:
        start = time.perf_counter()
        info = torch.compiler.load_cache_artifacts(args.load_artifacts.read_bytes())
        results["load_artifacts_s"] = time.perf_counter() - start
        results["loaded_artifacts"] = str(info) if info is not None else None
    cfg = load_config(args.preset, None, ["compile=true", *args.overrides])
    batch = args.batch_size or cfg.batch_size
    eval_batch = args.eval_batch_size or cfg.eval_batch_size
    with tempfile.TemporaryDirectory(prefix="compile-time-") as tmp:
        train_n = batch * (cfg.warmup_steps + args.steps + 1)
        cache = synthetic_cache(Path(tmp) / "cache", args.classes, args.image_size, train_n, eval_batch)
        overrides = [f"data.source={cache}", f"device={args.device}", f"batch_size={batch}"]
        overrides += [f"eval_batch_size={eval_batch}", "compile=true", *args.overrides]
        cfg = load_config(args.preset, None, overrides)
        start = time.perf_counter()
        run = setup_run(cfg, DistContext(), say=lambda _m: None)
        results["setup_s"] = time.perf_counter() - start
        seconds = measure(run, args.steps)
    results |= {f"{k}_s": v for k, v in seconds.items()}
    results |= evaluation_share(seconds, cfg, args.train_images, args.val_images)
    if args.save_artifacts is not None:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            tmp_path = args.save_artifacts.with_name(args.save_artifacts.name + ".tmp")
            tmp_path.write_bytes(saved[0])
            tmp_path.replace(args.save_artifacts)  # whole or absent
            results["artifacts_bytes"] = len(saved[0])
    results |= {
        "device": str(run.device),
        "preset": args.preset,
        "batch_size": batch,
        "eval_batch_size": eval_batch,
        "precision": cfg.precision,
        "compile_mode": cfg.compile_mode,
        "warmup_steps": cfg.warmup_steps,
        "process_s": time.perf_counter() - wall,
    }
    r = results
    print(
        f"compile_time: {r['device']} {args.preset} batch {batch}/{eval_batch} {cfg.precision}: "
        f"warm-up {r['warm_up_s']:.1f} s (compile {r['compile_s']:.1f} s), step {r['step_s']:.3f} s, "
        f"eval batch {r['eval_batch_s']:.3f} s, evaluation {100 * r['evaluation_share']:.1f}% of an "
        f"epoch's training; process {r['process_s']:.1f} s",
        flush=True,
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
