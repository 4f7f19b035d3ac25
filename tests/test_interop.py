"""Parity with timm's SwinTransformer and the weight loader (tinyswin.interop)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tinyswin import SwinConfig, from_timm, preset_config
from tinyswin.interop import resize_relative_position_table

timm_swin = pytest.importorskip("timm.models.swin_transformer")


@pytest.fixture(autouse=True)
def one_thread():
    """Small models: one thread is faster, and far faster on a CPU shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def timm_model(config: SwinConfig, seed: int = 0) -> torch.nn.Module:
    """A timm SwinTransformer of `config`'s geometry with random weights everywhere (norms and biases too)."""
    torch.manual_seed(seed)
    model = timm_swin.SwinTransformer(
        img_size=config.img_size,
        patch_size=config.patch_size,
        num_classes=config.num_classes,
        embed_dim=config.embed_dim,
        depths=config.depths,
        num_heads=config.num_heads,
        window_size=config.window_size,
        drop_path_rate=0.0,
        always_partition=config.shift_full_window,  # timm's switch for the notebook's shift rule
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            elif "relative_position_bias_table" in name:
                param.normal_(0.0, 1.0)  # large, so that a misplaced bias entry shows in the logits
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model.eval()


PARITY = {
    # reduced-depth Swin-T at 224: 56-28-14-7 maps, window 7
    "swin_t_224": (preset_config("swin_t", depths=(2, 2, 2, 2), num_classes=50), (224, 224)),
    # the seed geometry with patch norm on (timm always has it); timm's default rule drops the shift where the
    # window covers the map, which is tinyswin's official rule (the tiny64 preset)
    "seed_geometry": (preset_config("tiny64"), (64, 64)),
    # the notebook's rule: shift every second block even where the window covers the map
    "seed_notebook_shift": (preset_config("seed", patch_norm=True), (64, 64)),
    # non-square input, one window per stage: 8x16 then 4x8 then 2x4 tokens with windows 8, 4, 4; the window
    # is clamped on one side only and the shift is (0, s) where one side is covered
    "non_square": (
        SwinConfig(
            img_size=(32, 64),
            num_classes=10,
            embed_dim=32,
            depths=(2, 2, 2),
            num_heads=(2, 4, 8),
            window_size=(8, 4, 4),
        ),
        (32, 64),
    ),
}


@pytest.mark.parametrize("name", sorted(PARITY))
def test_logits_equal_timm(name: str) -> None:
    config, size = PARITY[name]
    reference = timm_model(config)
    model = from_timm(reference, config).eval()
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference(x), model(x)
    scale = expected.abs().max()
    assert scale > 0.1
    assert expected.std(0).min() > 1e-3 * scale  # logits differ across images: a real test
    assert (got - expected).abs().max() <= 1e-5 * scale


def test_parity_also_with_the_plain_attention_path_and_a_state_dict() -> None:
    config, size = PARITY["seed_notebook_shift"]
    reference = timm_model(config, seed=2)
    model = from_timm(reference.state_dict(), config).eval()
    model.set_attention_backend("plain")
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_timm_parity_breaks_when_a_table_is_wrong() -> None:
    """The parity check is sensitive to the relative position bias (guards against a vacuous comparison)."""
    config, size = PARITY["seed_geometry"]
    reference = timm_model(config)
    model = from_timm(reference, config).eval()
    with torch.no_grad():
        table = model.stages[0].blocks[1].attn.relative_position_bias_table
        table.copy_(table.flip(0))
        x = torch.randn(2, 3, *size)
        assert (model(x) - reference(x)).abs().max() > 1e-3 * reference(x).abs().max()


def test_train_mode_gradients_match_timm() -> None:
    config = replace(PARITY["non_square"][0], drop_path_rate=0.0)  # timm_model has no stochastic depth
    reference = timm_model(config).train()
    model = from_timm(reference, config).train()
    x = torch.randn(2, 3, 32, 64)
    target = torch.tensor([3, 7])
    F.cross_entropy(reference(x), target).backward()
    F.cross_entropy(model(x), target).backward()
    grads = {
        n.replace("layers.", "stages.").replace("head.fc.", "head."): p.grad
        for n, p in reference.named_parameters()
    }
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6)


def test_missing_and_unexpected_keys_are_listed() -> None:
    config = PARITY["non_square"][0]
    state = timm_model(config).state_dict()
    del state["layers.1.blocks.0.mlp.fc1.weight"]
    state["layers.9.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        from_timm(state, config)
    message = str(info.value)
    assert "missing keys ['stages.1.blocks.0.mlp.fc1.weight']" in message
    assert "unexpected keys ['stages.9.extra.weight']" in message
    assert "\n" not in message


def test_shape_mismatch_names_the_key() -> None:
    state = timm_model(PARITY["non_square"][0]).state_dict()
    wider = SwinConfig(
        img_size=(32, 64),
        num_classes=10,
        embed_dim=64,
        depths=(2, 2, 2),
        num_heads=(2, 4, 8),
        window_size=(8, 4, 4),
    )
    with pytest.raises(ValueError, match=r"patch_embed\.proj\.weight has shape \(32, 3, 4, 4\)"):
        from_timm(state, wider)
    with pytest.raises(ValueError, match="expected a timm model or a state dict"):
        from_timm([1, 2], wider)


def official_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm state dict rewritten the way the official Swin repository stores its checkpoints."""
    out = {}
    for key, value in state.items():
        match = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if match:  # official: the merge closes stage i - 1
            key = f"layers.{int(match.group(1)) - 1}.downsample.{match.group(2)}"
        out[key.replace("head.fc.", "head.")] = value
        if key.endswith("relative_position_bias_table"):  # buffers that official checkpoints carry
            out[key.replace("bias_table", "index")] = torch.zeros(1, dtype=torch.long)
    return out


def test_official_checkpoint_layout_loads_the_same_weights() -> None:
    config, size = PARITY["seed_geometry"]
    reference = timm_model(config)
    from_official = from_timm(official_layout(reference.state_dict()), config).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert (from_official(x) - reference(x)).abs().max() <= 1e-5 * reference(x).abs().max()


def test_resize_matches_the_official_bicubic_rule() -> None:
    """Official Swin's fine-tuning code: interpolate the (heads, 2S-1, 2S-1) grid bicubically."""
    table = torch.randn(13 * 13, 3)
    expected = F.interpolate(table.permute(1, 0).reshape(1, 3, 13, 13), size=(15, 15), mode="bicubic")
    expected = expected.reshape(3, 15 * 15).permute(1, 0)
    torch.testing.assert_close(resize_relative_position_table(table, (7, 7), (8, 8)), expected)
    constant = torch.full((13 * 13, 2), 0.25)
    torch.testing.assert_close(
        resize_relative_position_table(constant, (7, 7), (4, 6)), torch.full((7 * 11, 2), 0.25)
    )
    assert resize_relative_position_table(table, (7, 7), (7, 7)) is table


def test_pretrained_224_weights_load_into_a_64px_model() -> None:
    """ImageNet-style weights (window 7 at 224) into the 64px geometry (windows 8-8-4-2): tables resized,
    everything else copied."""
    source_config = preset_config("swin_t", depths=(2, 2, 2, 2), num_classes=50)
    reference = timm_model(source_config)
    target_config = preset_config("tiny64", num_heads=(3, 6, 12, 24), depths=(2, 2, 2, 2), num_classes=50)
    model = from_timm(reference, target_config)
    source = reference.state_dict()
    table = "stages.0.blocks.1.attn.relative_position_bias_table"
    assert model.get_parameter(table).shape == (15 * 15, 3)
    torch.testing.assert_close(
        model.get_parameter(table),
        resize_relative_position_table(source[table.replace("stages", "layers")], (7, 7), (8, 8)),
    )
    assert model.get_parameter("stages.3.blocks.0.attn.relative_position_bias_table").shape == (3 * 3, 24)
    torch.testing.assert_close(
        model.stages[2].blocks[1].mlp.fc2.weight, source["layers.2.blocks.1.mlp.fc2.weight"]
    )
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 50) and torch.isfinite(out).all()
