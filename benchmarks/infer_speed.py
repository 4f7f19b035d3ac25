"""CPU inference speed of the seed geometry (64px, 200 classes): tinyswin eager, ONNX Runtime float32,
ONNX Runtime int8 (dynamic quantization) and timm eager, side by side in one process.

The engines run round by round, interleaved (the order rotates), and each reports the median images/s of its
rounds, at batch 1 and at batch 64 by default; the table gives the ratio of each to timm eager. timm runs the
same network, its weights from `tinyswin.interop.to_timm`; timm always normalises the patch embedding, so its
model (and only its) has that one LayerNorm more than the seed, which has none.

Accuracy of int8: with --checkpoint RUN --data CACHE, the top-1 on the cache's val images of the float32 and
the int8 ONNX models (and eager); otherwise the top-1 agreement of int8 with float32 on random images.

--graph prints the op types of the graph ONNX Runtime runs after its optimizations (fused LayerNorm, GELU,
attention; leftover reshapes and transposes).

Usage: python benchmarks/infer_speed.py [--checkpoint RUN --data CACHE] [--batches 1 64] [--rounds 7]
       [--min-time 1.0] [--threads N] [--graph]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tinyswin.data import load_cache
from tinyswin.evaluate import LoadedModel
from tinyswin.export import model_info, onnx_bytes, ort_logits, ort_session, quantize_int8
from tinyswin.exported import ModelInfo
from tinyswin.extras import require
from tinyswin.interop import to_timm
from tinyswin.model import SwinTransformer
from tinyswin.model_presets import preset_config
from tinyswin.predict import preprocess
from tinyswin.version import __version__


def seed_model() -> tuple[SwinTransformer, ModelInfo]:
    """The seed preset with seeded random weights, and a ModelInfo for it (200 classes, 64px)."""
    torch.manual_seed(0)
    config = preset_config("seed")
    model = SwinTransformer(config).eval()
    names = [f"class{i}" for i in range(config.num_classes)]
    info = ModelInfo(
        model_config={},
        class_names=names,
        class_ids=names,
        mean=(0.4802, 0.4481, 0.3975),
        std=(0.2296, 0.2263, 0.2255),
        image_size=64,
        input_size=(64, 64),
        interpolation="bilinear",
        tinyswin_version=__version__,
    )
    return model, info


def timm_twin(model: SwinTransformer) -> nn.Module:
    """timm's SwinTransformer with `model`'s weights (a patch norm added where the model has none)."""
    timm = require("timm", "timm", "the timm comparison")
    source = model
    if not model.config.patch_norm:  # timm cannot leave the patch norm out: the same network plus it
        source = SwinTransformer(replace(model.config, patch_norm=True)).eval()
        missing = source.load_state_dict(model.state_dict(), strict=False).missing_keys
        assert missing == ["patch_embed.norm.weight", "patch_embed.norm.bias"], missing
    state, kwargs = to_timm(source)
    twin = timm.create_model(**kwargs).eval()
    twin.load_state_dict(state)
    return twin


def graph_ops(data: bytes, threads: int) -> collections.Counter[str]:
    """Op types of the graph ONNX Runtime runs (after ORT_ENABLE_ALL), counted."""
    ort = require("onnxruntime", "export", "ONNX Runtime")
    onnx = require("onnx", "export", "ONNX graphs")
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    return collections.Counter(node.op_type for node in graph.node)


def measure(engines: dict[str, Callable[[], object]], batch: int, rounds: int, min_time: float) -> dict:
    """Median images/s of each engine over `rounds` interleaved rounds of at least `min_time` seconds."""
    speeds: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    for fn in engines.values():
        fn()  # warm-up: plans, allocations, thread pools
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, calls, start = engines[name], 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_time:
                    break
            speeds[name].append(batch * calls / elapsed)
    return {name: statistics.median(values) for name, values in speeds.items()}


def top1(logits_fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """Predicted classes (N,) of float32 inputs (N, 3, H, W), in batches of 256."""
    preds = [logits_fn(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)]
    return np.concatenate(preds)


def accuracy_report(args: argparse.Namespace, model: nn.Module, info: ModelInfo, sessions: dict) -> None:
    """Top-1 of float32 vs int8 on the val images (--data), or their agreement on random images."""

    def eager(v: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(v)).numpy()

    fns = {"tinyswin eager": eager, **{k: (lambda v, s=s: ort_logits(s, v)) for k, s in sessions.items()}}
    if args.data:
        images, labels = load_cache(args.data).split("val")
        x = np.concatenate(
            [preprocess(images[i : i + 512], info).numpy() for i in range(0, len(images), 512)]
        )
        labels = np.asarray(labels)
        print(f"\ntop-1 on {args.data} val ({len(labels)} images):")
        for name, fn in fns.items():
            print(f"  {name:<18} {100 * float((top1(fn, x) == labels).mean()):6.2f}%")
        return
    x = torch.randn(512, 3, *info.input_size, generator=torch.Generator().manual_seed(1)).numpy()
    ref = top1(fns["ONNX Runtime fp32"], x)
    print("\ntop-1 agreement with ONNX Runtime float32 on 512 random images (no --data given):")
    for name, fn in fns.items():
        print(f"  {name:<18} {100 * float((top1(fn, x) == ref).mean()):6.2f}%")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a run directory or .pt (default: seed, random)")
    parser.add_argument("--data", default=None, help="a cache: top-1 of float32 vs int8 on its val split")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="batch sizes (default 1 64)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per batch size (default 7)")
    parser.add_argument(
        "--min-time", type=float, default=1.0, help="seconds per engine per round (default 1)"
    )
    parser.add_argument("--threads", type=int, default=0, help="threads for every engine (default: torch's)")
    parser.add_argument("--graph", action="store_true", help="print the op types ONNX Runtime runs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.checkpoint:
        loaded = LoadedModel(args.checkpoint, device="cpu")
        model, info = loaded.model.float().eval(), model_info(loaded)
    else:
        model, info = seed_model()
    print(
        f"tinyswin {__version__}, torch {torch.__version__}, {threads} threads; model {info.input_size} input"
    )
    start = time.perf_counter()
    data = onnx_bytes(model, info)
    print(f"ONNX export: {time.perf_counter() - start:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "fp32.onnx").write_bytes(data)
        quantize_int8(Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx")
        int8 = (Path(tmp) / "int8.onnx").read_bytes()
    # no spinning: idle ONNX Runtime threads would take the CPU from the PyTorch engines measured beside them
    sessions = {
        "ONNX Runtime fp32": ort_session(data, threads, spin=False),
        "ONNX Runtime int8": ort_session(int8, threads, spin=False),
    }
    twin = timm_twin(model)
    if args.graph:
        for name, blob in (("float32", data), ("int8", int8)):
            print(f"\nONNX Runtime graph ({name}):", dict(graph_ops(blob, threads).most_common()))
    rows = {}
    for batch in args.batches:
        x = torch.randn(batch, 3, *info.input_size, generator=torch.Generator().manual_seed(batch))
        xn = x.numpy()

        def eager(m: nn.Module = model, v: torch.Tensor = x) -> object:
            with torch.inference_mode():
                return m(v)

        engines = {
            "tinyswin eager": eager,
            "ONNX Runtime fp32": lambda v=xn: ort_logits(sessions["ONNX Runtime fp32"], v),
            "ONNX Runtime int8": lambda v=xn: ort_logits(sessions["ONNX Runtime int8"], v),
            "timm eager": lambda: eager(twin),
        }
        rows[batch] = measure(engines, batch, args.rounds, args.min_time)
    header = f"{'engine':<18}" + "".join(f" {f'batch {b} img/s':>15} {'x timm':>7}" for b in args.batches)
    print("\n" + header + "\n" + "-" * len(header))
    for name in rows[args.batches[0]]:
        cells = "".join(
            f" {rows[b][name]:>15.1f} {rows[b][name] / rows[b]['timm eager']:>6.2f}x" for b in args.batches
        )
        print(f"{name:<18}{cells}")
    accuracy_report(args, model, info, sessions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
