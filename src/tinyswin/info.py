"""What `tinyswin info` prints: each model preset's geometry, parameters and forward FLOPs per image, and what
the convolutional stem adds to it (counted by torch.utils.flop_counter on the meta device: no memory, no
compute).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tinyswin.layers import ConvStem, PatchEmbed
from tinyswin.model import IntPair, SwinConfig, SwinTransformer, WindowAttention
from tinyswin.model_presets import preset_config, preset_names


def count_flops(model: nn.Module, size: IntPair, in_chans: int = 3) -> int:
    """FLOPs (2 per multiply-add, as torch.utils.flop_counter counts) of one forward pass of one image.

    Attention is counted with the plain formula, whose matmuls the counter sees. The model may live on the
    meta device, which costs neither memory nor compute.

    Args:
        model: A SwinTransformer, or a part of one (e.g. a stem).
        size: (H, W) of the image.
        in_chans: Input channels.

    Returns:
        FLOPs per image.
    """
    attention = [m for m in model.modules() if isinstance(m, WindowAttention)]
    backends = [m.backend for m in attention]
    x = torch.zeros(1, in_chans, *size, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    try:
        for m in attention:
            m.backend = "plain"
        with torch.no_grad(), counter:
            model(x)
    finally:
        for m, backend in zip(attention, backends, strict=True):
            m.backend = backend
    return counter.get_total_flops()


def describe_presets() -> str:
    """A table of the presets: geometry, parameters and forward GFLOPs per image at the preset's img_size."""
    header = f"{'preset':<9} {'img':>7} {'patch':>5} {'dim':>4} {'depths':<10} {'windows':<10} "
    header += f"{'classes':>7} {'params':>8} {'GFLOP/img':>9}"
    lines = [header, "-" * len(header)]
    for name in preset_names():
        config = preset_config(name)
        with torch.device("meta"):  # shapes only: instant, no memory
            model = SwinTransformer(config).eval()
        params = sum(p.numel() for p in model.parameters())
        height, width = config.input_size
        gflops = count_flops(model, (height, width), config.in_chans) / 1e9
        depths = "-".join(map(str, config.depths))
        windows = "-".join(map(str, config.stage_windows))
        lines.append(
            f"{name:<9} {f'{height}x{width}':>7} {config.patch_size:>5} {config.embed_dim:>4} {depths:<10} "
            f"{windows:<10} {config.num_classes:>7} {params / 1e6:>7.2f}M {gflops:>9.3f}"
        )
    lines.append("GFLOP/img: one forward pass, 2 FLOPs per multiply-add (torch.utils.flop_counter)")
    added = []
    for name in preset_names():
        params, flops = conv_stem_cost(preset_config(name))
        added.append(f"{name} +{params / 1e6:.2f}M +{flops / 1e9:.3f}")
    lines.append("model.stem=conv adds (params, GFLOP/img): " + ", ".join(added))
    return "\n".join(lines)


def conv_stem_cost(config: SwinConfig) -> tuple[int, int]:
    """(parameters, forward FLOPs per image at the config's img_size) that `stem: conv` adds to the model of
    `config` (a patch size that is a power of two >= 2) over its patch embedding."""
    args = (config.patch_size, config.in_chans, config.embed_dim, config.patch_norm)
    with torch.device("meta"):  # shapes only
        conv, patch = ConvStem(*args), PatchEmbed(*args)
    size = config.input_size
    params = sum(p.numel() for p in conv.parameters()) - sum(p.numel() for p in patch.parameters())
    return params, count_flops(conv, size, config.in_chans) - count_flops(patch, size, config.in_chans)
