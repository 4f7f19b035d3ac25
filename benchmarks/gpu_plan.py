"""The GPU visit, prepared on the machine that has the data: the two Tiny ImageNet zips cut into parts of at
most 60 MiB (``gpu_speedrun.sh split``: a sha256 per part and the zips' own), laid out one folder per device
call, and the calls printed in order: what each carries, its size with the working tree, the command, and the
seconds it is expected to take, against the visit's limits. ``benchmarks/gpu_plan.md`` explains the plan and
where each estimate comes from.

The device tool's limits it plans for: what travels with a call (working tree plus carried paths) <= 64 MiB;
one command <= 10 minutes; about 15 minutes of device time in all, the machine's start (about 3 minutes)
included; the machine goes back after about 30 s idle between calls (the parts it holds then go with it).

Every call runs the same command (``gpu_speedrun.sh``: each step is idempotent and keeps its state in the
work folder): the first starts compiling the preset's graphs in the background (``--warm-cache
--background``), the calls that bring parts return at once with status 3 (waiting for parts), and the call
with the last part joins and checks the zips, prepares the cache, waits for the compilation, trains within
the budget, evaluates and writes the summary (status 0).

    python benchmarks/gpu_plan.py                          # ../shared/data zips -> runs/gpu/call-N
    python benchmarks/gpu_plan.py --zips A.zip B.zip --out runs/gpu --budget 300
    python benchmarks/gpu_plan.py --dry-run                # sizes and calls only, nothing written
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
SHARED = ROOT.parent / "shared" / "data"
ZIPS = ("tiny-imagenet-200-sub.zip", "tiny-imagenet-200-train-rest.zip")  # extracted in this order
MANIFESTS = 4096  # bytes a call carries besides its parts: ZIPS and each zip's sha256 lists and name

# seconds, and where each comes from (benchmarks/gpu_plan.md: the CPU measurements behind the estimates)
ESTIMATES = {
    "start": (180, "a cold start of the machine (the device tool's notes: about 3 minutes)"),
    "mib_per_s": (10.0, "assumed transfer rate of carried files (not measured yet: the first call tells)"),
    "gap": (15, "between two calls, the lead's turnaround; must stay under the 30 s idle limit"),
    "command_short": (10, "a call that only brings parts: the script's start, copying the parts, exit 3"),
    "data": (20, "join + sha256 of 197 MiB, extract both zips (into /dev/shm: 13 s on the 2-core CPU here)"),
    "prepare": (5, "decode 102,000 JPEGs with 16 processes (2.4-2.6 s for the half on the H100 machine)"),
    "warm_compile": (15, "dynamo tracing and the cached kernels: 5-15% of a cold compile on the CPU"),
    "trainer_start": (15, "python, torch and CUDA start, the cache onto the GPU, setup"),
    "eval": (15, "best.pt and last.pt, raw and EMA, with and without the flip: one process"),
    "summary": (5, "summary JSON, plots, copies to $OUT"),
}


@dataclass
class Call:
    """One device call: the sizes of the parts it carries (and their files, once laid out)."""

    number: int
    sizes: list[int]
    last: bool = False
    parts: list[Path] = field(default_factory=list)

    @property
    def carried_bytes(self) -> int:
        return sum(self.sizes)


def tree_bytes(root: Path) -> int:
    """Bytes of what travels with every call: tracked files and untracked ones that git does not ignore."""
    out = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    return sum(
        (root / name).stat().st_size for name in out.decode().split("\0") if name and (root / name).is_file()
    )


def split_zips(zips: list[Path], parts_dir: Path, part_mib: float) -> list[Path]:
    """Cut the zips into parts with `gpu_speedrun.sh split` (checked against a SHA256SUMS beside them);
    returns the parts in the order the calls carry them."""
    script = ROOT / "benchmarks" / "gpu_speedrun.sh"
    size = str(int(part_mib * MIB))  # bytes, as split -b takes them
    command = ["bash", str(script), "split", *map(str, zips), str(parts_dir), "--part-size", size]
    subprocess.run(command, check=True)
    return [part for z in zips for part in sorted((parts_dir / z.stem).glob("part-*"))]


def plan_calls(part_sizes: list[int], tree: int, limit: int) -> list[list[int]]:
    """The parts (indices) of each call, in order: as many as fit with the tree within `limit` bytes."""
    calls: list[list[int]] = []
    room = 0
    for index, size in enumerate(part_sizes):
        if tree + size > limit:
            raise ValueError(f"part {index} ({size / MIB:.1f} MiB) and the tree do not fit in one call")
        if not calls or size > room:
            calls.append([])
            room = limit - tree
        calls[-1].append(index)
        room -= size
    return calls


def make_calls(sizes: list[int], tree: int, limit: int) -> list[Call]:
    """The calls, in order, for parts of `sizes` bytes."""
    groups = plan_calls(sizes, tree, limit)
    return [Call(n, [sizes[i] for i in g], last=n == len(groups)) for n, g in enumerate(groups, start=1)]


def lay_out(parts: list[Path], parts_dir: Path, calls: list[Call], out: Path) -> None:
    """OUT/call-N/: the parts of call N (hard links) and every zip's manifests, in gpu_speedrun's layout."""
    remaining = list(parts)
    for call in calls:
        folder = out / f"call-{call.number}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copy2(parts_dir / "ZIPS", _made(folder) / "ZIPS")
        for zip_dir in sorted(p for p in parts_dir.iterdir() if p.is_dir()):
            for name in ("PARTS.sha256", "PARTS.name", "SHA256SUMS"):
                shutil.copy2(zip_dir / name, _made(folder / zip_dir.name) / name)
        for _ in call.sizes:
            part = remaining.pop(0)
            target = folder / part.parent.name / part.name
            try:
                os.link(part, target)
            except OSError:
                shutil.copy2(part, target)
            call.parts.append(target)


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def call_seconds(call: Call, budget: float, compile_left: float = 0.0) -> tuple[float, str]:
    """Expected seconds of a call (transfer and command) and what its command does; `compile_left`: seconds
    of the background compilation still to go when the last call's training would start."""
    e = {k: v for k, (v, _) in ESTIMATES.items()}
    transfer = call.carried_bytes / MIB / e["mib_per_s"]
    if not call.last:
        what = "collect the parts (exit 3: waiting for parts)"
        if call.number == 1:
            what = "start compiling in the background; " + what
        return transfer + e["command_short"], what
    before = e["data"] + e["prepare"]
    after = e["trainer_start"] + e["warm_compile"] + budget + e["eval"] + e["summary"]
    what = f"join, check, prepare; wait {compile_left:.0f} s; train {budget:.0f} s (evaluations inside); eval"
    return transfer + before + compile_left + after, what


def print_plan(calls: list[Call], tree: int, args: argparse.Namespace) -> float:
    """The calls in order, their sizes and seconds, and the visit's total; returns the total seconds."""
    flags = " ".join(f"--parts {args.out_rel}/call-{c.number}" for c in calls)
    command = f"benchmarks/gpu_speedrun.sh {flags} --warm-cache --background --python python3 --out $OUT"
    print(
        f"working tree that travels with every call: {tree / MIB:.2f} MiB (limit {args.limit_mib} MiB a call)"
    )
    print(f"command of every call (run tool, kind nvidia-h100-x1):\n  {command}\n")
    start, gap = ESTIMATES["start"][0], ESTIMATES["gap"][0]
    # the background compilation runs from call 1's command until the last call's training starts
    before_last = sum(call_seconds(c, args.budget)[0] + gap for c in calls[:-1])
    before_last += ESTIMATES["data"][0] + ESTIMATES["prepare"][0]
    compile_left = max(0.0, args.cold_compile - before_last)
    total = start
    print(
        f"{'call':>4}  {'carry':<22} {'carried':>9} {'with tree':>10} {'timeout_s':>9} {'seconds':>8}  does"
    )
    for call in calls:
        seconds, what = call_seconds(call, args.budget, compile_left)
        size = call.carried_bytes / MIB
        print(
            f"{call.number:>4}  {args.out_rel + f'/call-{call.number}':<22} {size:>7.1f} M "
            f"{size + tree / MIB:>8.1f} M {600 if call.last else 120:>9} {seconds:>8.0f}  {what}"
        )
        total += seconds + (0 if call.last else gap)
    run = call_seconds(calls[-1], args.budget, compile_left)[0]
    print(
        f"\nexpected device time: {total:.0f} s = {total / 60:.1f} min (start {start} s, {len(calls) - 1} "
        f"gaps of {gap} s): target <= 13 min; the run's call {run:.0f} s = {run / 60:.1f} min (<= 8 min); "
        f"the {args.cold_compile:.0f} s compilation runs behind the calls before it"
    )
    print("estimates: " + "; ".join(f"{k} {v} ({why})" for k, (v, why) in ESTIMATES.items()))
    return total


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--zips", type=Path, nargs="+", default=[SHARED / z for z in ZIPS],
        help="the zips, in the order they are extracted (default: ../shared/data's two)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu", help="where call-N/ go (runs/gpu)")
    parser.add_argument("--part-mib", type=float, default=60, help="largest part in MiB (default: 60)")
    parser.add_argument("--limit-mib", type=float, default=64, help="what one call may carry, tree included")
    parser.add_argument("--budget", type=float, default=300, help="training budget in seconds (default: 300)")
    parser.add_argument(
        "--cold-compile", type=float, default=115,
        help="seconds of a cold compile on the GPU (default: 115, measured on an H100 with torch 2.11)",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the plan from the zips' sizes only")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Split, lay out, print."""
    args = build_parser().parse_args(argv)
    missing = [str(z) for z in args.zips if not z.is_file()]
    if missing:
        print(f"gpu_plan: zip not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    inside = out.is_relative_to(ROOT)
    args.out_rel = out.relative_to(ROOT).as_posix() if inside else str(out)
    if not inside:
        print(f"gpu_plan: note: {out} is outside the repository, which is where a call carries from")
    tree = tree_bytes(ROOT) + MANIFESTS
    limit = args.limit_mib * MIB
    if args.dry_run:
        part = int(args.part_mib * MIB)
        sizes = [
            min(part, z.stat().st_size - i * part)
            for z in args.zips
            for i in range(-(-z.stat().st_size // part))
        ]
        print_plan(make_calls(sizes, tree, limit), tree, args)
        return 0
    parts_dir = out / "parts"
    parts = split_zips(args.zips, parts_dir, args.part_mib)
    calls = make_calls([p.stat().st_size for p in parts], tree, limit)
    lay_out(parts, parts_dir, calls, out)
    print_plan(calls, tree, args)
    print(f"\nlaid out in {out}: " + ", ".join(f"call-{c.number}/ ({len(c.parts)} part)" for c in calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
