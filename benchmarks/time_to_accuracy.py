"""Validation top-1 reached within a fixed training time on the CPU, for two recipes.

Task: 10 classes of the Tiny ImageNet subset (every 20th WordNet id of wnids.txt, in file order), their 250
train images each and their val images (10 per class in the subset: 100 in all), at 64x64. Each recipe trains
under `--time-budget` (default 600 s, counted from the start of the run, evaluation and checkpoints
included): its epoch count and schedule are fitted to the budget from the measured speed (`seed` is the
notebook's recipe with its 200-epoch schedule compressed into the budget). Chance is 10%.

Prints the top-1 reached and the curve (val top-1 against seconds) of each recipe, and writes
`time_to_accuracy.json` and `time_to_accuracy.png` to `--out`.

    python benchmarks/time_to_accuracy.py                     # seed vs fast, 10 minutes each
    python benchmarks/time_to_accuracy.py --budget 120 --recipes fast
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tinyswin.config import load_config
from tinyswin.data import is_cache, write_cache
from tinyswin.data.imagefolder import decode_image, list_source
from tinyswin.data.tinyimagenet import plan_tinyimagenet
from tinyswin.paths import cache_root
from tinyswin.plots import plot_curves, read_metrics
from tinyswin.train import train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ZIP = ROOT.parent / "shared" / "data" / "tiny-imagenet-200-sub.zip"


def build_subset(source: Path, out: Path, every: int = 20, size: int = 64) -> Path:
    """Cache of every `every`-th class of wnids.txt (file order): all their train and val images."""
    if is_cache(out):
        return out
    tree = list_source(source)
    plan = plan_tinyimagenet(tree)  # class ids sorted; labels index them
    with tree.open_reader() as reader:
        listed = [w.strip() for w in reader.read_text("wnids.txt").splitlines() if w.strip()]
        chosen = sorted(listed[::every])
        old_label = np.array([plan.class_ids.index(w) for w in chosen])
        splits = {}
        for split, (files, labels) in plan.splits.items():
            keep = np.flatnonzero(np.isin(labels, old_label))
            images = np.stack([decode_image(reader.read(files[i]), size) for i in keep])  # (N, S, S, 3)
            new = np.searchsorted(old_label, labels[keep]).astype(np.int64)  # (N,) old label -> 0..9
            splits[split] = (images, new)
    names = [plan.class_names[i] for i in old_label]
    return write_cache(out, splits, class_ids=chosen, class_names=names, source=f"{source} (every {every}th)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zip", type=Path, default=DEFAULT_ZIP, help="the Tiny ImageNet subset")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds per recipe (default 600)")
    parser.add_argument("--recipes", nargs="+", default=["seed", "fast"], help="training presets to compare")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "time_to_accuracy", help="output folder")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every recipe")
    args = parser.parse_args()

    cache = build_subset(args.zip, cache_root() / "tiny-imagenet-sub-every20-64px")
    print(f"task: {cache} (10 classes, 2500 train, 100 val images at 64px); budget {args.budget:.0f} s each")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {}
    for recipe in args.recipes:
        cfg = load_config(
            recipe, overrides=[f"data.source={cache}", f"time_budget={args.budget}", "tensorboard=false",
                               *args.overrides]
        )  # fmt: skip
        run_dir = args.out / f"{recipe}-{stamp}"
        print(f"\n== {recipe}: {run_dir}")
        summary = train(cfg, run_dir, progress=False)
        records = read_metrics(run_dir / "metrics.jsonl")
        results[recipe] = {
            "run_dir": str(run_dir),
            "final_top1": summary["val_top1"],
            "best_top1": summary["best_top1"],
            "epochs": summary["epochs"],
            "train_seconds": summary["train_seconds"],
            "images_per_s": summary["images_per_s"],
            "curve": [[r["elapsed"], r["val_top1"]] for r in records],
        }
    print(f"\nval top-1 within {args.budget:.0f} s of training (10 classes, chance 10%):")
    print(f"{'recipe':<10} {'final':>8} {'best':>8} {'epochs':>7} {'seconds':>8} {'img/s':>7}")
    for recipe, r in results.items():
        print(
            f"{recipe:<10} {100 * r['final_top1']:7.1f}% {100 * r['best_top1']:7.1f}% {r['epochs']:7d} "
            f"{r['train_seconds']:8.0f} {r['images_per_s']:7.1f}"
        )
    for recipe, r in results.items():
        points = "  ".join(f"{t:.0f}s:{100 * a:.0f}%" for t, a in r["curve"])
        print(f"curve {recipe}: {points}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "time_to_accuracy.json").write_text(
        json.dumps({"budget_s": args.budget, **results}, indent=2)
    )
    plot_curves(
        {k: ([t for t, _ in r["curve"]], [100 * a for _, a in r["curve"]]) for k, r in results.items()},
        args.out / "time_to_accuracy.png",
        xlabel="seconds of training",
        ylabel="val top-1 (%)",
        title=f"10 Tiny ImageNet classes at 64px, {args.budget:.0f} s budget",
    )
    print(f"wrote {args.out / 'time_to_accuracy.json'} and {args.out / 'time_to_accuracy.png'}")


if __name__ == "__main__":
    main()
