"""Tiny ImageNet on a laptop CPU: all 200 classes, the 100,000 training images, 30 minutes of training.

One command from the two zips to the number:

    .venv/bin/python benchmarks/cpu_speedrun.py                 # ../shared/data's two zips, preset laptop
    .venv/bin/python benchmarks/cpu_speedrun.py --zip tiny-imagenet-200.zip --work runs/cpu-speedrun

Steps, each skipped when its result is already in the work folder (so a second call after a kill continues):
  1. extract the zips one over the other into WORK/data (the shared data is tiny-imagenet-200-sub.zip, then
     tiny-imagenet-200-train-rest.zip: together the official layout with all 100,000 training images);
  2. `tinyswin prepare` them into a uint8 cache (WORK/cache);
  3. `tinyswin train --preset laptop` into WORK/run with the preset's time budget (or --budget): the clock
     of the trainer counts everything but the one-time warm-up (compilation), which it reports apart;
     a killed run is resumed with --resume;
  4. `tinyswin eval` of last.pt with and without the test-time flip (and the EMA weights where the run keeps
     them);
  5. WORK/cpu_speedrun.json: top-1/top-5 on the val images with and without the flip, epochs, images/s,
     compile seconds, training seconds, wall seconds, commit, CPU model, threads, load averages, the sha256 of
     last.pt; the plots are in WORK/run/plots/.

Time the run on a quiet machine: the load average at the start and the end goes into the summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_ZIPS = [SHARED / "tiny-imagenet-200-sub.zip", SHARED / "tiny-imagenet-200-train-rest.zip"]


def log(message: str) -> None:
    print(f"cpu_speedrun: {message}", flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux) and its core count."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} cores)"


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def extract(zips: list[Path], data: Path) -> Path:
    """The zips extracted one over the other into `data` (once: a marker names the zips and their sizes);
    returns the tiny-imagenet-200 folder."""
    marker = data / "EXTRACTED"
    want = "\n".join(f"{z.name} {z.stat().st_size}" for z in zips)
    if marker.is_file() and marker.read_text() == want:
        log(f"data: already extracted in {data}")
    else:
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        for z in zips:
            start = time.perf_counter()
            with zipfile.ZipFile(z) as archive:
                archive.extractall(data)
            log(f"data: extracted {z.name} in {time.perf_counter() - start:.1f} s")
        marker.write_text(want)
    roots = [p.parent for p in data.glob("*/wnids.txt")]
    if len(roots) != 1:
        sys.exit(f"cpu_speedrun: error: {data} holds {len(roots)} folders with a wnids.txt, expected one")
    return roots[0]


def torch_version(python: str) -> str:
    code = "import torch; print(torch.__version__)"
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


def tinyswin(python: str, *args: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [python, "-m", "tinyswin", *args]
    return subprocess.run(cmd, check=True, text=True, capture_output=capture)


def evaluate(python: str, checkpoint: Path, ema: bool) -> dict:
    args = ["eval", str(checkpoint), "--tta", "flip", "--json"] + (["--ema"] if ema else [])
    return json.loads(tinyswin(python, *args, capture=True).stdout)


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument(
        "--zip",
        dest="zips",
        action="append",
        type=Path,
        help="a Tiny ImageNet zip, extracted in the order given; may repeat [../shared/data: "
        "tiny-imagenet-200-sub.zip, then tiny-imagenet-200-train-rest.zip]",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=ROOT / "runs" / "cpu-speedrun",
        help="work folder: data, cache, run, summary [runs/cpu-speedrun]",
    )
    parser.add_argument("--preset", default="laptop", help="training preset [laptop]")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="training time budget in seconds [the preset's: 1800 for laptop]",
    )
    parser.add_argument("--python", default=sys.executable, help="Python with tinyswin installed [this one]")
    parser.add_argument("--fresh", action="store_true", help="start a new run even if WORK/run holds one")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for a new run")
    args = parser.parse_args(argv)
    zips = args.zips or DEFAULT_ZIPS
    for z in zips:
        if not z.is_file():
            parser.error(f"zip not found: {z}")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    load_start = os.getloadavg()
    phases: dict[str, float] = {}

    start = time.perf_counter()
    folder = extract(zips, work / "data")
    phases["extract"] = time.perf_counter() - start

    start = time.perf_counter()
    cache = work / "cache"
    tinyswin(args.python, "prepare", str(folder), "--out", str(cache), "--quiet")
    phases["prepare"] = time.perf_counter() - start

    start = time.perf_counter()
    run = work / "run"
    if args.fresh:
        shutil.rmtree(run, ignore_errors=True)
    if (run / "summary.json").is_file():
        log(f"train: {run} is finished")
    elif (run / "last.pt").is_file() or (run / "config.yaml").is_file():
        log(f"train: resuming {run}")
        tinyswin(args.python, "train", "--out", str(run), "--resume", "--quiet")
    else:
        budget = ["--time-budget", str(args.budget)] if args.budget else []
        log(f"train: preset {args.preset} {' '.join(budget + args.overrides)}")
        train_args = ["train", "--data", str(cache), "--preset", args.preset, "--out", str(run), "--quiet"]
        tinyswin(args.python, *train_args, *budget, *args.overrides)
    phases["train"] = time.perf_counter() - start

    start = time.perf_counter()
    train = json.loads((run / "summary.json").read_text())
    train.pop("val_details", None)
    config = (run / "config.yaml").read_text()
    has_ema = "\nema:\n  enabled: true" in config
    last = run / "last.pt"
    evals = {"last": evaluate(args.python, last, ema=False)}
    if has_ema:
        evals["last_ema"] = evaluate(args.python, last, ema=True)
    phases["eval"] = time.perf_counter() - start

    summary = {
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch_version(args.python),
        "commit": git("rev-parse", "HEAD"),
        "tree_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "zips": [{"zip": str(z), "sha256": sha256(z)} for z in zips],
        "preset": args.preset,
        "overrides": args.overrides,
        "budget_s": train.get("time_budget", {}).get("budget_s") if train.get("time_budget") else None,
        "val_top1": evals["last"]["top1"],
        "val_top5": evals["last"]["top5"],
        "val_top1_no_flip": evals["last"].get("top1_no_tta"),
        "val_top5_no_flip": evals["last"].get("top5_no_tta"),
        "ema_val_top1": evals.get("last_ema", {}).get("top1"),
        "ema_val_top1_no_flip": evals.get("last_ema", {}).get("top1_no_tta"),
        "epochs": train.get("epochs"),
        "images_per_s": train.get("images_per_s"),
        "compile_seconds": train.get("compile_seconds"),
        "train_seconds": train.get("train_seconds"),
        "wall_seconds": time.perf_counter() - wall,
        "phase_seconds": phases,
        "last_pt_sha256": sha256(last),
        "eval": evals,
        "train_summary": train,
        "plots": sorted(str(p) for p in (run / "plots").glob("*.png")),
    }
    out = work / "cpu_speedrun.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    log(
        f"{summary['cpu']}: val top-1 {pct(summary['val_top1'])} with the flip, "
        f"{pct(summary['val_top1_no_flip'])} without; top-5 {pct(summary['val_top5'])} "
        f"({pct(summary['val_top5_no_flip'])}); {summary['epochs']} epochs, "
        f"{summary['images_per_s']:.0f} img/s, compile {summary['compile_seconds']:.1f} s, "
        f"training {summary['train_seconds']:.0f} s, wall {summary['wall_seconds']:.0f} s"
    )
    log(f"summary: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
