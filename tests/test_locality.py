"""`model.stem=spt` (shifted patch tokenization) and `model.lsa` (locality self-attention), after Lee et al.
2021: the shifted copies against a per-pixel rule, the tokens against the paper's formula written out, the
masked diagonal and the learned temperature against a hand-written attention, and the options' wiring."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from exportkit import random_model, tiny_checkpoint, tiny_config
from tinyswin.config import build_model_config, load_config
from tinyswin.errors import ConfigError, TinyswinError
from tinyswin.interop import from_timm, to_timm
from tinyswin.layers import ShiftedPatchEmbed, window_attention
from tinyswin.model import SwinConfig, SwinTransformer, WindowAttention, relative_position_index
from tinyswin.optim import build_adamw
from tinyswin.pretrained import init_config, read_init

pytestmark = pytest.mark.usefixtures("one_thread")


def _shifted_by_rule(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """The image moved by (dx, dy) pixels: out[y, x] = img[y - dy, x - dx] where that pixel exists, else 0
    (one pixel at a time)."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[..., i, j] = x[..., i - dy, j - dx]
    return out


@pytest.mark.parametrize("patch", [2, 4])
def test_shifted_copies_are_the_image_moved_half_a_patch_diagonally(patch: int) -> None:
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    stack = ShiftedPatchEmbed(patch, 3, 8, norm=False).shifted_stack(x)  # (2, 15, 8, 8)
    assert stack.shape == (2, 15, 8, 8)
    assert torch.equal(stack[:, :3], x)
    s = patch // 2
    expected = [_shifted_by_rule(x, dx * s, dy * s) for dx, dy in ShiftedPatchEmbed.SHIFTS]
    for k, copy in enumerate(expected):
        assert torch.equal(stack[:, 3 * (k + 1) : 3 * (k + 2)], copy), (k, ShiftedPatchEmbed.SHIFTS[k])
    # the four diagonal directions, each once
    assert sorted(ShiftedPatchEmbed.SHIFTS) == [(-1, -1), (-1, 1), (1, -1), (1, 1)]


def test_spt_tokens_are_the_normalised_flattened_patches_projected() -> None:
    torch.manual_seed(0)
    embed = ShiftedPatchEmbed(4, 3, 16, norm=True)
    with torch.no_grad():  # non-trivial norm parameters
        for p in embed.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 8, 8)
    tokens = embed(x)
    assert tokens.shape == (2, 2, 2, 16) and tokens.is_contiguous()
    stack = embed.shifted_stack(x)
    for i in range(2):
        for j in range(2):
            patch = stack[:, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].reshape(2, -1)  # (B, 15*16)
            z = F.layer_norm(patch, (240,), embed.patch_norm_in.weight, embed.patch_norm_in.bias)
            z = F.linear(z, embed.proj.weight, embed.proj.bias)
            z = F.layer_norm(z, (16,), embed.norm.weight, embed.norm.bias)
            torch.testing.assert_close(tokens[:, i, j], z, rtol=1e-5, atol=1e-5)


def test_spt_needs_an_even_patch() -> None:
    with pytest.raises(ValueError, match="even patch_size"):
        SwinConfig(img_size=36, patch_size=3, depths=(1,), num_heads=(1,), embed_dim=8, stem="spt")


def _attention_by_hand(attn: WindowAttention, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """LSA written out: scores scaled by each head's learned temperature, the diagonal excluded."""
    b, nw, n, c = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(b, nw, n, 3, heads, c // heads)
    q, k, v = (qkv[:, :, :, i].transpose(2, 3) for i in range(3))  # (B, nW, heads, N, d)
    scores = q @ k.transpose(-1, -2) * attn.scale.view(1, 1, heads, 1, 1)
    scores = scores + attn.relative_bias(index)
    scores = scores.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    out = scores.softmax(-1) @ v  # (B, nW, heads, N, d)
    return F.linear(out.transpose(2, 3).reshape(b, nw, n, c), attn.proj.weight, attn.proj.bias)


@pytest.mark.parametrize("backend", ["plain", "sdpa"])
def test_lsa_attention_masks_the_diagonal_and_uses_the_learned_temperature(backend: str) -> None:
    torch.manual_seed(0)
    attn = WindowAttention(16, 2, (2, 2), lsa=True)
    attn.backend = backend
    assert attn.scale is not None
    torch.testing.assert_close(attn.scale.detach(), torch.full((2,), 8**-0.5))
    with torch.no_grad():
        attn.scale.copy_(torch.tensor([0.7, 0.1]))  # two heads, two temperatures
        attn.relative_position_bias_table.normal_()
    x = torch.randn(3, 2, 4, 16)
    index = relative_position_index((2, 2))
    torch.testing.assert_close(attn(x, index, None), _attention_by_hand(attn, x, index), rtol=1e-5, atol=1e-5)
    out = attn(x, index, None)
    out.sum().backward()
    assert attn.scale.grad is not None and attn.scale.grad.abs().min() > 0


def test_a_token_alone_in_its_region_attends_to_itself_under_lsa() -> None:
    """With every other token masked (a shifted region of one token), LSA falls back to the token itself
    instead of a softmax over nothing (NaN)."""
    q = torch.randn(1, 1, 4, 8)
    k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    alone = torch.zeros(1, 1, 4, 4)
    alone[..., 0, 1:] = float("-inf")  # token 0 shares its region with nobody
    attn = WindowAttention(8, 1, (2, 2), lsa=True)
    bias = alone.masked_fill(torch.eye(4, dtype=torch.bool), -1e4)
    out = window_attention(q, k, v, bias, "plain", attn.scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])


def test_without_lsa_the_attention_is_unchanged() -> None:
    torch.manual_seed(0)
    attn = WindowAttention(16, 2, (2, 2))
    assert attn.scale is None and "scale" not in dict(attn.named_parameters())
    x = torch.randn(2, 1, 4, 16)
    index = relative_position_index((2, 2))
    qkv = attn.qkv(x).view(2, 4, 3, 2, 8).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(*qkv, attn_mask=attn.relative_bias(index))  # diagonal kept
    torch.testing.assert_close(attn(x, index, None), attn.proj(ref.transpose(1, 2).reshape(2, 1, 4, 16)))


def test_keys_build_the_model_and_the_temperature_is_not_decayed() -> None:
    cfg = load_config("fast", None, ["model.stem=spt", "model.lsa=true", "model.patch_size=8",
                                     "augment.out_size=64"])  # fmt: skip
    model_config = build_model_config(cfg, 200, (64, 64))
    assert model_config.stem == "spt" and model_config.lsa
    model = SwinTransformer(model_config)
    assert isinstance(model.patch_embed, ShiftedPatchEmbed)
    scales = [n for n, _ in model.named_parameters() if n.endswith("attn.scale")]
    assert len(scales) == sum(model_config.depths)
    optimizer = build_adamw(model, 1e-3, weight_decay=0.05)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    named = dict(model.named_parameters())
    assert not any(id(named[n]) in decayed for n in scales)
    assert id(named["patch_embed.proj.weight"]) in decayed
    x = torch.randn(2, 3, 64, 64)
    loss = model(x).logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ConfigError, match="lsa"):
        load_config("fast", None, ["model.lsa=maybe"])


@pytest.mark.parametrize(
    ("fields", "why", "init_why"),
    [
        ({"stem": "spt"}, "stem is 'spt'", r"a shifted-patch stem \(model.stem=spt\)"),
        ({"lsa": True}, "lsa is true", r"locality self-attention \(model.lsa=true\)"),
    ],
)
def test_timm_and_init_refuse_spt_and_lsa_in_one_line(tmp_path: Path, fields: dict, why: str, init_why: str):
    model = random_model(tiny_config(**fields), seed=0)
    with pytest.raises(ValueError, match=rf"^to_timm: .*cannot express this model: {why}[^\n]*$"):
        to_timm(model)
    patch_state = random_model(tiny_config(), seed=0).state_dict()
    with pytest.raises(ValueError, match=r"^from_timm: config\.(stem='spt'|lsa is true)"):
        from_timm(patch_state, tiny_config(**fields))
    ckpt = tiny_checkpoint(tmp_path / "local.pt", **fields)
    with pytest.raises(TinyswinError, match=rf"local\.pt: the weights of {init_why}"):
        read_init(str(ckpt))
    weights = read_init(str(tiny_checkpoint(tmp_path / "patch.pt")))
    key, value = next(iter(fields.items()))
    cfg = load_config("default", overrides=[f"model.{key}={str(value).lower()}"])
    with pytest.raises(ConfigError, match=rf"model.{key}=.* contradicts the init weights"):
        init_config(cfg, weights, 32)
