"""Speed of tinyswin's SwinTransformer against timm's on the same architecture, in one process.

For the `seed` preset (64px, batch 64 by default) it measures, interleaving the two models round by round
(the order alternates) and reporting medians:
  - train step (forward, cross-entropy, backward, zeroing grads) images/s, with the preset's drop path 0.2;
  - the same train step with drop path 0 (stochastic depth off in both), unless --quick;
  - inference (eval, torch.inference_mode) images/s;
  - FLOPs per image (torch.utils.flop_counter, 2 per multiply-add) and the GFLOP/s achieved;
  - peak memory of a train step: on the CPU, the largest total of live tensors (weights, gradients,
    activations, temporaries) in the profiler's memory timeline, which the allocator's caching does not
    blur (drop path draws seeded alike); on CUDA, torch.cuda.max_memory_allocated.

timm's model gets the same geometry: always_partition=True reproduces the seed's shift where a window covers
the whole map, and its patch-embedding norm is removed because the seed has none. timm runs as it comes
(its Swin attention uses the plain softmax path by default).

Usage: python benchmarks/model_speed.py [--quick] [--batch 64] [--rounds 15] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from tinyswin import SwinConfig, SwinTransformer, preset_config


def build_timm(config: SwinConfig) -> nn.Module:
    """timm's SwinTransformer with the geometry of `config`."""
    from timm.models.swin_transformer import SwinTransformer as TimmSwin

    model = TimmSwin(
        img_size=config.img_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=config.num_classes,
        embed_dim=config.embed_dim,
        depths=config.depths,
        num_heads=config.num_heads,
        window_size=config.window_size,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        drop_path_rate=config.drop_path_rate,
        always_partition=config.shift_full_window,
    )
    if not config.patch_norm:
        model.patch_embed.norm = nn.Identity()
    return model


def build(name: str, config: SwinConfig, device: str) -> nn.Module:
    """One of the two models, on `device`."""
    torch.manual_seed(0)
    model = SwinTransformer(config) if name == "tinyswin" else build_timm(config)
    return model.to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_batch(config: SwinConfig, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    size = config.img_size if isinstance(config.img_size, tuple) else (config.img_size, config.img_size)
    x = torch.randn(batch, config.in_chans, *size, generator=generator)
    y = torch.randint(0, config.num_classes, (batch,), generator=generator)
    return x.to(device), y.to(device)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def infer_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.eval()
    with torch.inference_mode():
        model(x)


def interleaved(
    models: dict[str, nn.Module],
    step: Callable[[nn.Module, torch.Tensor, torch.Tensor], None],
    x: torch.Tensor,
    y: torch.Tensor,
    rounds: int,
    steps_per_round: int,
    device: str,
) -> dict[str, list[float]]:
    """Images/s of each model per round; models alternate order every round."""
    for model in models.values():  # warm-up: allocator, caches, lazy init
        for _ in range(2):
            step(model, x, y)
    sync(device)
    names = list(models)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(steps_per_round):
                step(models[name], x, y)
            sync(device)
            rates[name].append(steps_per_round * x.shape[0] / (time.perf_counter() - start))
    return rates


def flops_per_image(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool) -> float:
    counter = FlopCounterMode(display=False)
    if train:
        model.train()
        with counter:
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
    else:
        model.eval()
        with counter, torch.no_grad():
            model(x)
    return counter.get_total_flops() / x.shape[0]


def peak_memory_mib(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str) -> tuple[float, float]:
    """Peak memory of one train step and the memory live before it, in MiB.

    On the CPU: every tensor's bytes as the profiler's memory timeline tracks them (weights, gradients,
    activations, temporaries), so the allocator's caching does not enter. On CUDA: max_memory_allocated.
    """
    train_step(model, x, y)  # warm-up
    torch.manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20, start / 2**20
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        train_step(model, x, y)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # the export is deprecated in favour of CUDA-only tools
        path = os.path.join(folder, "memory.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)  # [times, bytes per category at each time]
    totals = [sum(row) for row in sizes]
    return max(totals) / 2**20, totals[0] / 2**20


def cpu_pressure() -> str:
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().strip()
    except OSError:
        return "n/a"


def report(title: str, rates: dict[str, list[float]], flops: float | None) -> None:
    """Median, best run and ratios; the per-round ratio compares runs made moments apart."""
    ours, ref = rates["tinyswin"], rates["timm"]
    print(f"{title}:")
    for name in ("timm", "tinyswin"):
        med = statistics.median(rates[name])
        runs = " ".join(f"{r:.1f}" for r in rates[name])
        extra = f", {med * flops / 1e9:.1f} GFLOP/s" if flops else ""
        print(f"  {name:<9} {med:7.1f} img/s median{extra}; best {max(rates[name]):.1f}; runs: {runs}")
    pair = statistics.median(a / b for a, b in zip(ours, ref, strict=True))
    ratio = statistics.median(ours) / statistics.median(ref)
    best = max(ours) / max(ref)
    print(
        f"  tinyswin/timm: {pair:.3f} median of per-round ratios, {ratio:.3f} ratio of medians, "
        f"{best:.3f} ratio of bests"
    )
    print(f"  cpu pressure after: {cpu_pressure()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15, quick 4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, no drop-path-0 run")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (4 if args.quick else 15)
    config = preset_config(args.preset)
    print(
        f"preset {args.preset}, batch {args.batch}, device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {rounds} interleaved rounds"
    )
    print(f"cpu pressure at start: {cpu_pressure()}")
    x, y = make_batch(config, args.batch, args.device)
    models = {name: build(name, config, args.device) for name in ("timm", "tinyswin")}
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    print(f"parameters: timm {counts['timm']:,}, tinyswin {counts['tinyswin']:,}")

    # Nominal FLOPs: no stochastic depth (which would skip work at random) and the plain attention formula
    # (whose matmuls the counter sees) in both models.
    nominal = preset_config(args.preset, drop_path_rate=0.0)
    cpu_x, cpu_y = make_batch(nominal, 2, "cpu")
    probe = build("tinyswin", nominal, "cpu")
    probe.set_attention_backend("plain")
    fwd_flops = flops_per_image(probe, cpu_x, cpu_y, train=False)
    train_flops = flops_per_image(probe, cpu_x, cpu_y, train=True)
    timm_probe = build("timm", nominal, "cpu")
    timm_fwd = flops_per_image(timm_probe, cpu_x, cpu_y, train=False)
    timm_train = flops_per_image(timm_probe, cpu_x, cpu_y, train=True)
    print(
        f"FLOPs/image (2 per multiply-add): forward {fwd_flops / 1e9:.3f} G, "
        f"train step {train_flops / 1e9:.3f} G "
        f"(timm: {timm_fwd / 1e9:.3f} G, {timm_train / 1e9:.3f} G); GFLOP/s below use these nominal counts"
    )

    steps = 1
    report(
        f"train step, drop path {config.drop_path_rate}",
        interleaved(models, train_step, x, y, rounds, steps, args.device),
        train_flops,
    )
    if not args.quick:
        plain = preset_config(args.preset, drop_path_rate=0.0)
        models0 = {name: build(name, plain, args.device) for name in ("timm", "tinyswin")}
        report(
            "train step, drop path 0 (stochastic depth off in both)",
            interleaved(models0, train_step, x, y, rounds, steps, args.device),
            train_flops,
        )
        del models0
    report(
        "inference",
        interleaved(models, infer_step, x, y, rounds, 2, args.device),
        fwd_flops,
    )
    if not args.no_memory:
        memory = {name: peak_memory_mib(model, x, y, args.device) for name, model in models.items()}
        how = (
            "max_memory_allocated"
            if args.device.startswith("cuda")
            else "live tensors, profiler memory timeline"
        )
        print(f"peak memory of a train step ({how}):")
        for name, (peak, start) in memory.items():
            print(
                f"  {name:<9} peak {peak:7.1f} MiB = {start:.1f} MiB before the step + {peak - start:.1f} MiB"
            )
        print(f"  ratio tinyswin/timm of the peaks: {memory['tinyswin'][0] / memory['timm'][0]:.3f}")
    print(f"cpu pressure at end: {cpu_pressure()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
