"""`model.stem`: the convolutional stem (`conv`) beside the patch embedding (`patch`, the default): token
grid, stride, parameters, training, config keys, checkpoints and exports, and what timm and `--init`
refuse."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import tinyswin
from exportkit import random_model, tiny_checkpoint, tiny_config
from tinyswin.checkpoint import atomic_save, load_checkpoint
from tinyswin.cli import main
from tinyswin.config import load_config
from tinyswin.data import write_cache
from tinyswin.data.synthetic import CLASS_NAMES, synthetic_splits
from tinyswin.errors import ConfigError, TinyswinError
from tinyswin.evaluate import LoadedModel
from tinyswin.export import ort_logits, ort_session
from tinyswin.info import conv_stem_cost
from tinyswin.interop import from_timm, to_timm
from tinyswin.layers import ConvStem, PatchEmbed
from tinyswin.model import SwinConfig, SwinTransformer
from tinyswin.model_presets import preset_config
from tinyswin.optim import build_adamw
from tinyswin.pretrained import init_config, read_init
from tinyswin.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

PATCH_KEYS = {"patch_embed.proj.weight", "patch_embed.proj.bias"}
NORM_KEYS = {"patch_embed.norm.weight", "patch_embed.norm.bias"}


def _logits(model: torch.nn.Module, size: int = 32, batch: int = 3) -> torch.Tensor:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("patch", [2, 4])
@pytest.mark.parametrize("size", [32, 64])
def test_conv_stem_gives_the_patch_embeddings_token_grid(patch: int, size: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    conv = ConvStem(patch, 3, 16, norm=True)(x)
    assert conv.shape == PatchEmbed(patch, 3, 16, norm=True)(x).shape == (2, size // patch, size // patch, 16)
    assert conv.is_contiguous()
    config = SwinConfig(img_size=size, patch_size=patch, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                        window_size=4, num_classes=5, stem="conv")  # fmt: skip
    assert SwinTransformer(config).eval()(x).shape == (2, 5)


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_stride_widths_and_parameters_as_counted_by_hand(patch: int) -> None:
    dim = 32
    stem = ConvStem(patch, 3, dim, norm=True)
    convs = [layer.conv for layer in stem.convs]
    widths = {2: [32], 4: [16, 32], 8: [8, 16, 32]}[patch]
    assert [c.out_channels for c in convs] == widths and stem.proj.kernel_size == (1, 1)
    assert np.prod([c.stride[0] for c in convs]) * stem.proj.stride[0] == patch
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    ins = [3, *widths[:-1]]
    by_hand = sum(9 * i * o + 2 * o for i, o in zip(ins, widths, strict=True))  # 3x3 conv, LayerNorm
    by_hand += widths[-1] * dim + dim + 2 * dim  # 1x1 conv with bias, patch norm
    assert sum(p.numel() for p in stem.parameters()) == by_hand
    # the cost that `tinyswin info` reports: these parameters over the patch embedding's, and the convs' FLOPs
    config = SwinConfig(
        img_size=64, patch_size=patch, embed_dim=dim, depths=(1,), num_heads=(1,), stem="conv"
    )
    params, flops = conv_stem_cost(config)
    assert params == by_hand - (patch * patch * 3 * dim + dim + 2 * dim)
    side = [64 // 2 ** (i + 1) for i in range(len(widths))]
    macs = sum(s * s * 9 * i * o for s, i, o in zip(side, ins, widths, strict=True))
    macs += side[-1] ** 2 * dim * dim  # the 1x1 conv
    assert flops == 2 * macs - 2 * (64 // patch) ** 2 * patch * patch * 3 * dim


@pytest.mark.parametrize("patch", [2, 4])
def test_moving_the_image_by_one_patch_moves_the_tokens_by_one(patch: int) -> None:
    """The total stride is the patch size: away from the borders (the padding, the wrapped columns), the
    tokens of an image rolled right by `patch` pixels are the tokens of the image one column further left."""
    torch.manual_seed(0)
    stem = ConvStem(patch, 3, 16, norm=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, moved = stem(x), stem(torch.roll(x, patch, dims=3))  # (B, H/p, W/p, C)
        half = stem(torch.roll(x, patch // 2, dims=3))
    torch.testing.assert_close(moved[:, :, 2:], tokens[:, :, 1:-1], rtol=1e-5, atol=1e-5)
    assert (half[:, :, 2:] - tokens[:, :, 1:-1]).abs().max() > 0.1  # half a patch is no whole token


def test_a_conv_stem_that_cannot_reach_the_patch_size_is_refused() -> None:
    for patch in (1, 3, 6):
        with pytest.raises(ValueError, match=rf"SwinConfig.stem='conv': needs a patch_size .* not {patch}$"):
            SwinConfig(img_size=96, patch_size=patch, depths=(1,), num_heads=(3,), stem="conv")
    with pytest.raises(ValueError, match=r"SwinConfig.stem='convs': must be one of patch, conv"):
        SwinConfig(stem="convs")  # type: ignore[arg-type]


def test_the_default_stem_keeps_the_state_dict_keys_and_old_checkpoints_load(tmp_path: Path) -> None:
    for name in tinyswin.preset_names():
        config = preset_config(name)
        with torch.device("meta"):  # shapes only
            keys = set(SwinTransformer(config).state_dict())
        assert config.stem == "patch"
        embed = {k for k in keys if k.startswith("patch_embed.")}
        assert embed == PATCH_KEYS | (NORM_KEYS if config.patch_norm else set())
    # a checkpoint written before the key existed: its model_config has no 'stem'
    path = tiny_checkpoint(tmp_path / "old.pt", seed=3)
    ckpt = load_checkpoint(path)
    del ckpt["model_config"]["stem"]
    atomic_save(ckpt, path)
    loaded = LoadedModel(path, device="cpu")
    assert loaded.model_config.stem == "patch"
    assert torch.equal(_logits(loaded.model), _logits(random_model(tiny_config(), seed=3)))


def test_a_conv_stem_model_trains_and_its_stem_weights_change() -> None:
    torch.manual_seed(0)
    model = SwinTransformer(tiny_config(stem="conv", drop_path_rate=0.0)).train()
    stem = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("patch_embed.")}
    assert sorted(stem) == [
        "patch_embed.convs.0.conv.weight",
        "patch_embed.convs.0.norm.bias",
        "patch_embed.convs.0.norm.weight",
        "patch_embed.convs.1.conv.weight",
        "patch_embed.convs.1.norm.bias",
        "patch_embed.convs.1.norm.weight",
        "patch_embed.norm.bias",
        "patch_embed.norm.weight",
        "patch_embed.proj.bias",
        "patch_embed.proj.weight",
    ]
    optimizer = build_adamw(model, 3e-3, weight_decay=0.05)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], before) for n, before in stem.items())
    assert losses[-1] < losses[0]


def test_the_key_is_typed_and_checked_naming_it() -> None:
    assert load_config("default", overrides=["model.stem=conv"]).model.overrides == {"stem": "conv"}
    with pytest.raises(ConfigError, match=r"model.stem='convolution': expected one of 'patch', 'conv'"):
        load_config("default", overrides=["model.stem=convolution"])
    with pytest.raises(ConfigError, match=r"model.stem.*needs a patch_size that is a power of two.*not 3"):
        load_config("default", overrides=["model.stem=conv", "model.patch_size=3", "model.img_size=48"])


def test_timm_and_init_refuse_a_conv_stem_in_one_line(tmp_path: Path, capsys) -> None:
    model = random_model(tiny_config(stem="conv"), seed=0)
    with pytest.raises(ValueError, match=r"^to_timm: .*cannot express this model: stem is 'conv'[^\n]*$"):
        to_timm(model)
    ckpt = tiny_checkpoint(tmp_path / "conv.pt", stem="conv")
    capsys.readouterr()
    assert main(["export", str(ckpt), "--format", "timm", "--out", str(tmp_path / "timm")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stem is 'conv'" in err[0] and not (tmp_path / "timm").exists()
    patch_state = random_model(tiny_config(), seed=0).state_dict()
    with pytest.raises(ValueError, match=r"^from_timm: config.stem='conv'"):
        from_timm(patch_state, tiny_config(stem="conv"))
    with pytest.raises(TinyswinError, match=r"conv\.pt: the weights of a conv stem \(model.stem=conv\)"):
        read_init(str(ckpt))
    weights = read_init(str(tiny_checkpoint(tmp_path / "patch.pt")))
    cfg = load_config("default", overrides=["model.stem=conv"])
    with pytest.raises(ConfigError, match=r"model.stem='conv' contradicts the init weights .*patch embed"):
        init_config(cfg, weights, 32)


def _tiny_cache(root: Path) -> Path:
    splits = synthetic_splits(size=32, train_per_class=8, val_per_class=4, seed=3)
    keep = [0, 5, 6, 8]
    out = {}
    for name, (images, labels) in splits.items():
        mask = np.isin(labels, keep)
        out[name] = (images[mask], np.searchsorted(keep, labels[mask]))
    names = [CLASS_NAMES[k] for k in keep]
    return write_cache(
        root, out, class_ids=[f"c{k}" for k in keep], class_names=names, source="stem test set"
    )


def test_a_conv_stem_run_records_the_stem_in_its_config_and_checkpoints(tmp_path: Path) -> None:
    cache = _tiny_cache(tmp_path / "cache")
    overrides = [f"data.source={cache}", "model.preset=nano", "model.stem=conv", "model.embed_dim=16",
                 "model.depths=[1, 1]", "model.num_heads=[1, 2]", "model.window_size=4",
                 "augment.preset=none", "batch_size=16", "eval_batch_size=64", "schedule.epochs=1",
                 "schedule.warmup_epochs=0", "schedule.mix_off_first_epochs=0", "tensorboard=false",
                 "seed=0"]  # fmt: skip
    run = tmp_path / "run"
    train(load_config(None, None, overrides), run, progress=False, log=lambda line: None)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["stem"] == "conv"
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["model_config"]["stem"] == "conv" and "patch_embed.convs.1.conv.weight" in ckpt["model"]
    assert isinstance(LoadedModel(run / "last.pt", device="cpu").model.patch_embed, ConvStem)


def test_a_conv_stem_checkpoint_and_its_exports_hold_the_same_model(tmp_path: Path) -> None:
    expected = _logits(random_model(tiny_config(stem="conv"), seed=4))
    assert expected.std(0).min() > 1e-3  # the logits differ between images: a real comparison
    path = tiny_checkpoint(tmp_path / "best.pt", seed=4, stem="conv")
    loaded = LoadedModel(path, device="cpu")
    assert isinstance(loaded.model.patch_embed, ConvStem) and torch.equal(_logits(loaded.model), expected)
    with redirect_stdout(io.StringIO()):
        assert main(["export", str(path), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    exported = tinyswin.load_pretrained(tmp_path / "st")
    assert isinstance(exported.patch_embed, ConvStem) and torch.equal(_logits(exported), expected)


@pytest.mark.slow  # the ONNX export takes about 15 s
def test_a_conv_stem_model_exports_to_onnx_with_the_same_logits(tmp_path: Path) -> None:
    expected = _logits(random_model(tiny_config(stem="conv"), seed=4))
    path = tiny_checkpoint(tmp_path / "best.pt", seed=4, stem="conv")
    with redirect_stdout(io.StringIO()):  # the export checks ONNX Runtime's logits against PyTorch's too
        assert main(["export", str(path), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))  # the images of `_logits`
    got = ort_logits(ort_session(tmp_path / "m.onnx"), x.numpy())
    assert np.abs(got - expected.numpy()).max() <= 1e-4
