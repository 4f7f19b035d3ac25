"""`tinyswin <command>`: a thin layer over the package's functions."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def cmd_info(args: argparse.Namespace) -> int:
    """List the model presets with their parameter counts and FLOPs per image."""
    from tinyswin.model import describe_presets

    print(describe_presets())
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Decode a dataset once into a uint8 cache."""
    from tinyswin.data import prepare

    start = time.perf_counter()
    out = prepare(
        args.source,
        args.out,
        size=args.size,
        holdout=args.holdout,
        skip_bad=args.skip_bad,
        workers=args.workers,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(f"cache ready at {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `tinyswin` command."""
    parser = argparse.ArgumentParser(
        prog="tinyswin",
        description="Train a Swin Transformer from scratch on small images.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="list the model presets with parameters and FLOPs")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "prepare",
        help="decode a dataset once into a uint8 cache",
        description="Read Tiny ImageNet (zip or folder) or an image-folder root once, check it, and write a "
        "uint8 cache that training reads at memory speed.",
    )
    p.add_argument(
        "source", help="tiny-imagenet-200.zip, an extracted tiny-imagenet-200/ folder, or root/<class>/*"
    )
    p.add_argument(
        "--out", required=True, help="cache directory to create (left untouched if it already matches)"
    )
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    p.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="fraction of every class of train kept aside as split 'holdout' (default: 0, none)",
    )
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable images instead of failing")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the holdout draw (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `tinyswin` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tinyswin {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
