"""`tinyswin <command>`: a thin layer over the package's functions."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tinyswin.errors import Interrupted, TinyswinError, one_line
from tinyswin.version import __version__


def cmd_info(args: argparse.Namespace) -> int:
    """List the model presets with their parameter counts and FLOPs per image."""
    from tinyswin.info import describe_presets

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


def cmd_download(args: argparse.Namespace) -> int:
    """Download a dataset's official archive: resumable, checked against its published checksum."""
    from tinyswin.data.download import default_download_dir, download_dataset

    log = None if args.quiet else print
    path = download_dataset(
        args.name, to=args.to, url=args.url, sha256=args.sha256, progress=log is not None, log=log
    )
    if not args.quiet:
        by_name = args.to is None or path.parent.resolve() == default_download_dir().resolve()
        data = args.name if by_name else str(path)
        print(f"{path}\nnext: tinyswin train --data {data}  (or: tinyswin prepare {path} --out CACHE_DIR)")
    return 0


def _default_run_dir(name: str) -> str:
    return str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model; the run directory receives config, metrics, checkpoints, plots and a summary."""
    from tinyswin.config import load_config
    from tinyswin.distributed import DistributedError, distributed
    from tinyswin.train import TrainingError, resume_config, train

    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.source={json.dumps(args.data)}")
    if args.epochs is not None:
        overrides.append(f"schedule.epochs={args.epochs}")
    if args.time_budget is not None:
        overrides.append(f"time_budget={args.time_budget}")
    if args.init is not None:
        if args.resume:
            raise ValueError("--init starts a new run; --resume continues from the weights in last.pt")
        overrides.append(f"init={json.dumps(args.init)}")
    if args.resume:
        if args.out is None:
            raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
        if args.preset or args.config:
            raise ValueError(
                "--resume continues with the run's own config; change keys with key=value instead"
            )
        cfg = resume_config(args.out, overrides)
        run_dir = args.out
    else:
        preset = args.preset or (None if args.config else "default")
        cfg = load_config(preset, args.config, overrides, default_preset="default")
        name = preset or Path(args.config).stem
        run_dir = args.out or _default_run_dir(name)
    from tinyswin.data.download import fetch_for_training, resolve_known

    if args.download:
        fetch_for_training(cfg.data.source, progress=not args.quiet)
    elif cfg.data.source is not None:
        resolve_known(cfg.data.source)  # a name not downloaded yet: one line, before any file is written
    try:
        with distributed(cfg.device) as dist:  # torchrun's process group, or one process
            train(cfg, run_dir, resume=args.resume, dist=dist, progress=False if args.quiet else None)
    except (TrainingError, DistributedError) as exc:
        print(f"tinyswin train: stopped: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint (or an ONNX file) on a split: loss, top-1, top-5."""
    from tinyswin.evaluate import evaluate_checkpoint
    from tinyswin.evaluate_onnx import evaluate_onnx

    log = (lambda _msg: None) if args.json else print
    if args.onnx is not None:
        if args.checkpoint is not None:
            raise ValueError(f"give either a checkpoint ({args.checkpoint}) or --onnx {args.onnx}, not both")
        if args.ema:
            raise ValueError(
                f"{args.onnx}: an ONNX model holds the weights it was exported with: leave out --ema"
            )
        result = evaluate_onnx(
            args.onnx, data=args.data, split=args.split, batch_size=args.batch_size, tta=args.tta, log=log,
            progress=not args.json,
        )  # fmt: skip
    elif args.checkpoint is None:
        raise ValueError("no model given: name a checkpoint or run directory, or --onnx MODEL.onnx")
    else:
        result = evaluate_checkpoint(
            args.checkpoint, data=args.data, split=args.split, batch_size=args.batch_size, device=args.device,
            ema=args.ema, tta=args.tta, log=log, progress=not args.json,
        )  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['checkpoint']} on {result['split']} ({result['n']} images): loss {result['loss']:.4f}  "
            f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  ECE {result['ece']:.4f}"
        )
        if "top1_no_tta" in result:
            print(
                f"  test-time flip: without it, loss {result['loss_no_tta']:.4f}  top-1 "
                f"{100 * result['top1_no_tta']:.2f}%  top-5 {100 * result['top5_no_tta']:.2f}%"
            )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Print the top classes of each image with their probabilities."""
    from tinyswin.predict import predict

    model, images = args.checkpoint, args.images
    if args.onnx:  # no model before the images
        model, images = args.onnx, [args.checkpoint, *args.images]
    if not images:
        raise ValueError("no IMAGE given: name image files or folders after the model")
    failed: list[str] = []

    def report(message: str) -> None:
        failed.append(message)
        print(f"tinyswin predict: {' '.join(message.split())}", file=sys.stderr)

    results = predict(
        model, images, topk=args.topk, device=args.device, ema=args.ema, on_error=report, progress=None
    )
    if args.json:
        print(json.dumps(results))
    else:
        for item in results:
            print(item["image"])
            for p in item["predictions"]:
                print(f"  {100 * p['probability']:6.2f}%  {p['class']} ({p['class_id']})")
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a trained model to a safetensors folder, an ONNX file or a timm model folder."""
    from tinyswin.export import export

    result = export(args.checkpoint, args.format, args.out, ema=args.ema, quantize=args.quantize)
    for path in result.paths:
        print(f"exported {path}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Search training configs with Optuna; write the best one as a preset."""
    from tinyswin.tune import TuneOptions, run_study
    from tinyswin.tune_space import read_space

    if args.trials < 1:
        raise ValueError(f"--trials {args.trials}: expected an integer >= 1")
    if args.epochs is not None and args.time_budget is not None:
        raise ValueError("give a trial's budget as --epochs or --time-budget, not both")
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.source={json.dumps(args.data)}")
    options = TuneOptions(
        space=read_space(args.space), trials=args.trials, storage=args.storage, study=args.study,
        out=Path(args.out) if args.out else None, overrides=tuple(overrides), epochs=args.epochs,
        time_budget=args.time_budget,
    )  # fmt: skip
    try:
        result = run_study(options)
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(
            f"tinyswin tune: interrupted; the trial that ran is recorded as failed. Run the same command "
            f"again to continue study {options.study_name!r}",
            file=sys.stderr,
        )
        return 128 + signum
    return 0 if result.best is not None else 1


def cmd_report(args: argparse.Namespace) -> int:
    """Write one self-contained HTML report of one or more runs."""
    from tinyswin.report_html import write_report

    start = time.perf_counter()
    out, runs = write_report(
        args.runs,
        args.out,
        data=args.data,
        split=args.split,
        device=args.device,
        progress=sys.stderr.isatty(),
    )
    for run in runs:
        for note in run.notes:
            print(f"{run.name}: {note}")
    size = out.stat().st_size
    print(f"report: {out} ({size / 1e6:.2f} MB, {time.perf_counter() - start:.1f} s)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Redraw the plots of a run directory."""
    from tinyswin.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


class _TrainHelp(argparse.Action):
    """`train --help`: the presets and keys are read when the help is asked for (reading them loads the model
    and the data layer, which every other command line would pay for)."""

    def __call__(self, parser: argparse.ArgumentParser, *_args: object, **_kwargs: object) -> None:
        from tinyswin.config import config_preset_names, known_keys, override_keys

        parser.epilog = (
            f"Presets: {', '.join(config_preset_names())}. Keys ({override_keys()}; a run's config.yaml "
            f"lists each with its value): {', '.join(known_keys())}."
        )
        parser.print_help()
        parser.exit()


def _add_info(sub: argparse._SubParsersAction) -> None:
    """`tinyswin info`."""
    p = sub.add_parser("info", help="list the model presets with parameters and FLOPs")
    p.set_defaults(func=cmd_info)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    """`tinyswin prepare SOURCE --out CACHE`."""
    p = sub.add_parser(
        "prepare",
        help="decode a dataset once into a uint8 cache",
        description="Read Tiny ImageNet (zip or folder) or an image-folder root once, check it, and write a "
        "uint8 cache that training reads at memory speed.",
    )
    p.add_argument(
        "source",
        help="tiny-imagenet-200.zip, an extracted tiny-imagenet-200/ folder, root/<class>/*, or the official "
        "cifar-10-python.tar.gz / cifar-100-python.tar.gz",
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


def _add_train(sub: argparse._SubParsersAction) -> None:
    """`tinyswin train [--data ...] [key=value ...]`."""
    p = sub.add_parser(
        "train",
        add_help=False,
        help="train a model (default: the built-in synthetic dataset and a small model)",
        description="Train a Swin Transformer. Without --data: a built-in synthetic dataset (10 classes of "
        "shapes and textures) that trains in about a minute on 2 CPU cores. Config layers: --preset (default "
        "'default'), then --config FILE.yaml, then key=value overrides (dotted keys, e.g. optim.lr=1e-3). "
        "Learning rate rule: optim.lr * batch_size / optim.lr_base_batch.",
    )
    p.add_argument("-h", "--help", action=_TrainHelp, nargs=0, help="show this help message and exit")
    p.add_argument(
        "--data",
        default=None,
        help="a cache; a dataset to prepare into one (zip, folder or CIFAR tarball); or tiny-imagenet, "
        "cifar10, cifar100: the archive `tinyswin download NAME` fetched",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="download the dataset --data names (tiny-imagenet, cifar10, cifar100) first if it is not there "
        "yet; without this flag nothing is ever downloaded",
    )
    p.add_argument("--preset", default=None, help="a training preset (default: 'default'; listed below)")
    p.add_argument("--config", default=None, help="a YAML file of keys applied over the preset")
    p.add_argument("--out", default=None, help="run directory (default: runs/<preset>-<date>-<time>)")
    p.add_argument("--epochs", type=int, default=None, help="number of epochs (schedule.epochs)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="fit the schedule into this many seconds (measured speed) and stop at a checkpoint in time",
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="WEIGHTS",
        help="fine-tune from these weights (key init): timm:NAME (a timm Swin; timm downloads it), a timm "
        "or official Swin state dict (.pth/.bin/.safetensors), a tinyswin checkpoint or run directory, or an "
        "exported folder; the model takes their geometry, windows fitted to the resolution, a new head",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars (one line per epoch)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=cmd_train)


def _add_download(sub: argparse._SubParsersAction) -> None:
    """`tinyswin download NAME`."""
    p = sub.add_parser(
        "download",
        help="download Tiny ImageNet, CIFAR-10 or CIFAR-100 (resumable, checksum-verified)",
        description="Download a dataset's official archive with a progress bar. An interrupted download "
        "resumes where it stopped; the file is checked against its published size and checksum and only then "
        "takes its final name. A file already downloaded and verified is not downloaded again. Default "
        "folder: $TINYSWIN_CACHE/downloads (~/.cache/tinyswin/downloads), where `train --data NAME` finds "
        "it.",
    )
    p.add_argument("name", metavar="NAME", help="tiny-imagenet, cifar10 or cifar100")
    p.add_argument(
        "--to", default=None, metavar="DIR", help="folder to download into (default: the download folder)"
    )
    p.add_argument(
        "--url",
        default=None,
        help="a mirror of the official file (still checked against the published checksum)",
    )
    p.add_argument(
        "--sha256",
        default=None,
        metavar="HEX",
        help="the sha256 of a file that is not the official one (checked instead of the published values)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar and no notes")
    p.set_defaults(func=cmd_download)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    """`tinyswin eval CHECKPOINT`."""
    p = sub.add_parser("eval", help="evaluate a checkpoint or an ONNX file: loss, top-1, top-5")
    p.add_argument(
        "checkpoint",
        nargs="?",
        default=None,
        help="a .pt checkpoint, a run directory (its best.pt, else last.pt) or an exported safetensors "
        "folder (left out with --onnx)",
    )
    p.add_argument(
        "--onnx",
        default=None,
        metavar="MODEL.onnx",
        help="evaluate an exported ONNX file (or its .int8.onnx copy) with ONNX Runtime, preprocessed as the "
        "run evaluated; needs --data",
    )
    p.add_argument(
        "--data", default=None, help="cache or dataset (default: the run's own; required with --onnx)"
    )
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's eval batch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument(
        "--tta",
        choices=("none", "flip"),
        default=None,
        help="test-time augmentation: flip averages the logits of each image and its mirror, and also "
        "reports the numbers without it (default: the run's tta key)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (loss, top1, top5, ...)")
    p.set_defaults(func=cmd_eval)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    """`tinyswin predict MODEL IMAGE...`."""
    p = sub.add_parser(
        "predict",
        help="classify image files with a checkpoint, an exported folder or an ONNX file",
        description="Print the top classes of each image. An unreadable image is reported on stderr in one "
        "line and the others are still classified; the exit status is then 1.",
    )
    p.add_argument(
        "checkpoint",
        metavar="MODEL",
        help="a .pt checkpoint, a run directory (its best.pt, else last.pt) or an exported safetensors "
        "folder (left out with --onnx)",
    )
    p.add_argument(
        "images", nargs="*", metavar="IMAGE", help="image files (any size and mode) or folders of them"
    )
    p.add_argument(
        "--onnx", default=None, metavar="MODEL.onnx", help="run an exported ONNX file with ONNX Runtime"
    )
    p.add_argument("--topk", type=int, default=5, help="classes to show per image (default: 5)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_predict)


def _add_export(sub: argparse._SubParsersAction) -> None:
    """`tinyswin export CHECKPOINT --format ...`."""
    p = sub.add_parser(
        "export",
        help="export a trained model: safetensors folder, ONNX file or timm model folder",
        description="Write a trained model in another format, checked before it is put in place (ONNX and "
        "timm: their logits against PyTorch's, within 1e-4); a failed export leaves nothing behind. Needs "
        "the extra 'export' (and 'timm' for --format timm).",
    )
    p.add_argument(
        "checkpoint",
        help="a .pt checkpoint, a run directory (its best.pt, else last.pt) or an exported folder",
    )
    p.add_argument(
        "--format",
        required=True,
        choices=("safetensors", "onnx", "timm"),
        help="safetensors: model.safetensors + config.json (load_pretrained, predict, eval); onnx: one .onnx "
        "file with its classes and normalisation in its metadata; timm: a folder in timm's hub layout",
    )
    p.add_argument(
        "--out",
        default=None,
        help="destination: a folder, or the .onnx file (default: beside the checkpoint, e.g. best.onnx, "
        "best-safetensors/, best-timm/)",
    )
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help="onnx: also write an int8 copy (ONNX Runtime dynamic quantization) beside it, as NAME.int8.onnx",
    )
    p.set_defaults(func=cmd_export)


def _add_plot(sub: argparse._SubParsersAction) -> None:
    """`tinyswin plot RUN_DIR`."""
    p = sub.add_parser("plot", help="redraw the loss, accuracy and learning-rate plots of a run")
    p.add_argument("run_dir", help="a run directory (holding metrics.jsonl)")
    p.set_defaults(func=cmd_plot)


def _add_report(sub: argparse._SubParsersAction) -> None:
    """`tinyswin report RUN [RUN ...]`."""
    p = sub.add_parser(
        "report",
        help="one self-contained HTML report of runs: curves, numbers, what the model gets wrong",
        description="Write one HTML file (no network, images inline) with the runs' learning curves "
        "overlaid, their final numbers and the config keys in which they differ, and for each run: "
        "per-class accuracy, the most confused pairs with their val images, the most confident mistakes "
        "with their top-3 predictions, and the reliability diagram with the expected calibration error. "
        "Each run's model (best.pt, else last.pt) is evaluated on its data; a run whose data or checkpoint "
        "is gone gets its curves and tables from summary.json and a line saying why its images are missing.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--out", default="report.html", help="the HTML file to write (default: report.html)")
    p.add_argument(
        "--data", default=None, help="the cache or dataset the images come from (default: each run's own)"
    )
    p.add_argument(
        "--split", default=None, help="the split to analyse (default: val, else the run's selection split)"
    )
    p.add_argument("--device", default="cpu", help="where the models run: cpu, cuda, ... (default: cpu)")
    p.set_defaults(func=cmd_report)


def _add_tune(sub: argparse._SubParsersAction) -> None:
    """`tinyswin tune SPACE.yaml`."""
    p = sub.add_parser(
        "tune",
        help="search training configs with Optuna (extra [tune]); the best becomes a preset",
        description="Run a study over the config keys SPACE.yaml names (a distribution each, the budget "
        "of a trial, the pruner: see the README). Every trial is a run directory OUT/trial-NNNN; trials "
        "score on a holdout carved from train (data.val_split=holdout), each epoch reported to the pruner. "
        "At the end the best trial's config is written as OUT/best.yaml (tinyswin train --config "
        "OUT/best.yaml) and its val top-1 is measured once. The same command again resumes the study; "
        "several processes on one storage share it.",
    )
    p.add_argument("space", metavar="SPACE.yaml", help="the search space file")
    p.add_argument(
        "--trials",
        type=int,
        default=20,
        help="finished trials (complete, pruned or failed) the study should hold, counting those of earlier "
        "runs and of other processes (default: 20)",
    )
    p.add_argument(
        "--storage",
        default="sqlite:///tune.db",
        metavar="URL",
        help="Optuna storage: an SQLAlchemy URL (default: sqlite:///tune.db in the current folder; "
        "postgresql://USER:PASSWORD@HOST/DB lets several machines join)",
    )
    p.add_argument("--study", default=None, metavar="NAME", help="the study's name (default: SPACE's stem)")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="trials' run directories and best.yaml (default: runs/tune-NAME)",
    )
    p.add_argument(
        "--data", default=None, help="a cache or a dataset, as train --data (default: the config's)"
    )
    p.add_argument("--epochs", type=int, default=None, help="the budget of a trial in epochs (over SPACE's)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="the budget of a trial in seconds (train --time-budget; over SPACE's)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every trial")
    p.set_defaults(func=cmd_tune)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `tinyswin` command."""
    parser = argparse.ArgumentParser(
        prog="tinyswin",
        description="Train a Swin Transformer from scratch on small images.",
    )
    parser.add_argument("--version", action="version", version=f"tinyswin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_info(sub)
    _add_prepare(sub)
    _add_train(sub)
    _add_download(sub)
    _add_eval(sub)
    _add_predict(sub)
    _add_export(sub)
    _add_plot(sub)
    _add_tune(sub)
    _add_report(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; `key=value` overrides of `train` may stand anywhere, also after options."""
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides]
    if args.command not in ("train", "tune") and overrides:
        unknown = extra
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def _quiet_broken_pipe() -> int:
    """The reader of our output went away (`tinyswin info | head`): no traceback, no more output."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `tinyswin` command; returns the exit status.

    A problem with the input (a `TinyswinError`, or a ValueError / FileNotFoundError naming it) is one line
    on stderr and exit status 2; an interrupted training says where to resume and exits 128 + the signal
    (130 for Ctrl-C, 143 for SIGTERM); anything else is a bug and keeps its traceback.
    """
    parser = build_parser()
    args = _parse(parser, argv)
    try:
        status = args.func(args)
        sys.stdout.flush()
        return status
    except Interrupted as exc:
        print(f"tinyswin {args.command}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"tinyswin {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (TinyswinError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        message = one_line(exc)
        print(f"tinyswin {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
