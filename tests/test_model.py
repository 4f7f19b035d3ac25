"""Tests of tinyswin.model: window ops, masks, attention paths, stochastic depth, presets, config checks."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from tinyswin.info import count_flops, describe_presets
from tinyswin.layers import _AddRows, add_residual, drop_path, permute_tokens, window_attention
from tinyswin.model import (
    SwinBlock,
    SwinConfig,
    SwinTransformer,
    WindowGeometry,
    block_geometry,
    relative_position_index,
    window_mask,
    window_partition,
    window_reverse,
    window_token_order,
)
from tinyswin.model_presets import preset_config, preset_names


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and far faster on a CPU shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A small geometry of every preset: the preset's rules (patch norm, shift rule, table init, windows) with
# fewer channels so that each forward/backward takes milliseconds.
REDUCED = {
    "swin_t": {"img_size": 64, "embed_dim": 24},  # 16-8-4-2 maps: window 7 pads stage 0, clamps stage 3
    "seed": {"embed_dim": 32},
    "tiny64": {"embed_dim": 32},
    "small64": {"embed_dim": 24, "depths": (2, 2, 2)},
    "nano": {},
}


def test_every_preset_has_a_reduced_geometry() -> None:
    assert sorted(REDUCED) == sorted(preset_names())


# ----------------------------------------------------------------------------------------------------
# window ops
# ----------------------------------------------------------------------------------------------------


def test_window_partition_reverse_round_trip_and_content() -> None:
    x = torch.randn(2, 8, 12, 5)
    windows = window_partition(x, (4, 3))
    assert windows.shape == (2 * 2 * 4, 12, 5)
    # window 5 of image 0 is row block 1, column block 1
    torch.testing.assert_close(windows[5], x[0, 4:8, 3:6].reshape(12, 5), rtol=0, atol=0)
    torch.testing.assert_close(window_reverse(windows, (4, 3), 8, 12), x, rtol=0, atol=0)


def test_relative_position_index_brute_force() -> None:
    for window, table in [((3, 3), (3, 3)), ((2, 3), (4, 5)), ((1, 4), (1, 4))]:
        index = relative_position_index(window, table)
        tokens = list(itertools.product(range(window[0]), range(window[1])))
        for (i, (ri, ci)), (j, (rj, cj)) in itertools.product(enumerate(tokens), repeat=2):
            row = (ri - rj + table[0] - 1) * (2 * table[1] - 1) + (ci - cj + table[1] - 1)
            assert index[i, j].item() == row


@pytest.mark.parametrize(
    ("size", "table", "shifted", "full", "expected"),
    [
        ((16, 16), (8, 8), True, False, WindowGeometry((8, 8), (4, 4), (16, 16))),
        ((8, 8), (8, 8), True, False, WindowGeometry((8, 8), (0, 0), (8, 8))),  # covers the map: no shift
        ((8, 8), (8, 8), True, True, WindowGeometry((8, 8), (4, 4), (8, 8))),  # notebook: shift anyway
        ((2, 2), (7, 7), True, False, WindowGeometry((2, 2), (0, 0), (2, 2))),  # window clamped to the map
        ((8, 16), (8, 8), True, False, WindowGeometry((8, 8), (0, 4), (8, 16))),  # per side
        ((10, 7), (4, 4), True, False, WindowGeometry((4, 4), (2, 2), (12, 8))),  # padded
        ((10, 7), (4, 4), False, False, WindowGeometry((4, 4), (0, 0), (12, 8))),
    ],
)
def test_block_geometry(size, table, shifted, full, expected) -> None:
    assert block_geometry(size, table, shifted, full) == expected


def brute_force_mask(size: tuple[int, int], geo: WindowGeometry) -> torch.Tensor:
    """Allowed pairs, from first principles: simulate padding and the cyclic shift token by token.

    Two tokens may attend iff, on the padded and shifted grid, they share a window and came from the same
    region: per side, both are padding, or both are real and the shift moved them by the same amount (no
    wrap-around between them).
    """
    (h, w), (hp, wp), (wh, ww), (sh, sw) = size, geo.padded, geo.window, geo.shift
    # the token at shifted position (i, j) came from padded position ((i + sh) % hp, (j + sw) % wp)
    cells = [(i, j, (i + sh) % hp, (j + sw) % wp) for i in range(hp) for j in range(wp)]
    windows: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for cell in cells:
        windows.setdefault((cell[0] // wh, cell[1] // ww), []).append(cell)
    allowed = []
    for key in sorted(windows):
        tokens = windows[key]
        grid = torch.zeros(len(tokens), len(tokens), dtype=torch.bool)
        for (a, (i1, j1, r1, c1)), (b, (i2, j2, r2, c2)) in itertools.product(enumerate(tokens), repeat=2):
            same_rows = (r1 >= h) == (r2 >= h) and r1 - r2 == i1 - i2
            same_cols = (c1 >= w) == (c2 >= w) and c1 - c2 == j1 - j2
            grid[a, b] = same_rows and same_cols
        allowed.append(grid)
    return torch.stack(allowed)  # (nW, N, N)


@pytest.mark.parametrize(
    ("size", "table", "shifted", "full"),
    [
        ((8, 8), (4, 4), True, False),  # divisible
        ((16, 16), (8, 8), True, False),
        ((7, 10), (4, 4), True, False),  # not divisible: padded before the shift
        ((7, 10), (4, 4), False, False),  # padding alone
        ((9, 6), (4, 3), True, False),  # rectangular window, padding on one side
        ((4, 4), (4, 4), True, True),  # window covers the map, shifted anyway (notebook)
        ((2, 2), (2, 2), True, True),
    ],
)
def test_window_mask_matches_brute_force(size, table, shifted, full) -> None:
    geo = block_geometry(size, table, shifted, full)
    mask = window_mask(size, geo)
    assert mask is not None
    expected = brute_force_mask(size, geo)
    assert mask.shape == (expected.shape[0], 1, *expected.shape[1:])
    assert torch.equal(mask[:, 0] == 0, expected)
    assert torch.all((mask == 0) | (mask == float("-inf")))


def test_window_mask_is_none_without_shift_or_padding() -> None:
    assert window_mask((8, 8), block_geometry((8, 8), (4, 4), False)) is None
    assert window_mask((8, 8), block_geometry((8, 8), (8, 8), True)) is None  # shift dropped


def test_window_token_order_is_shift_then_partition() -> None:
    geo = block_geometry((6, 8), (3, 4), True)  # shift (1, 2)
    x = torch.randn(2, 6, 8, 3)
    expected = window_partition(torch.roll(x, shifts=(-1, -2), dims=(1, 2)), (3, 4))  # (B*nW, N, C)
    order = window_token_order(geo)
    assert order is not None
    got = permute_tokens(x.reshape(2, 48, 3), order, torch.argsort(order))
    torch.testing.assert_close(got.reshape(-1, 12, 3), expected, rtol=0, atol=0)
    assert window_token_order(block_geometry((4, 4), (4, 4), False)) is None


@pytest.mark.parametrize("shifted", [False, True])
def test_window_token_order_is_none_exactly_where_windowing_keeps_the_order(shifted: bool) -> None:
    """The rule read off the geometry (no host read of a tensor) against the permutation itself."""
    for size in [(1, 1), (1, 6), (4, 1), (4, 4), (5, 7), (6, 8), (8, 8)]:
        for table in [(1, 1), (1, 4), (2, 2), (3, 4), (4, 1), (4, 4), (8, 8)]:
            geo = block_geometry(size, table, shifted, shift_full_window=True)
            hp, wp = geo.padded
            tokens = torch.roll(
                torch.arange(hp * wp).view(1, hp, wp, 1), (-geo.shift[0], -geo.shift[1]), (1, 2)
            )
            identity = torch.equal(window_partition(tokens, geo.window).flatten(), torch.arange(hp * wp))
            order = window_token_order(geo)
            assert (order is None) == identity, (size, table, geo)
            if order is not None:
                assert torch.equal(order, window_partition(tokens, geo.window).flatten())


def test_permute_tokens_backward_is_the_inverse_gather() -> None:
    order = torch.randperm(10)
    x = torch.randn(3, 10, 4, requires_grad=True)
    weights = torch.randn(3, 10, 4)
    (permute_tokens(x, order, torch.argsort(order)) * weights).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    (reference[:, order] * weights).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# attention paths
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", [1, 3])
def test_sdpa_equals_plain_softmax_path_with_gradients(positions: int) -> None:
    """4 images x 3 windows, 5 heads, 16 tokens; a bias per window position (3) or shared by all (1)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(4 * 3, 5, 16, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(positions, 5, 16, 16, dtype=torch.float64)
    blocked = torch.rand(positions, 1, 16, 16) < 0.3
    blocked[..., torch.arange(16), torch.arange(16)] = False  # every token may see itself
    outputs, grads = [], []
    for backend in ("sdpa", "plain"):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
        out = window_attention(*inputs[:3], inputs[3].masked_fill(blocked, float("-inf")), backend)
        out.backward(torch.ones_like(out))
        outputs.append(out.detach())
        grads.append([t.grad for t in inputs])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-10)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # both equal the formula written out per image, window and head
    full = bias.masked_fill(blocked, float("-inf")).repeat(4 * 3 // positions, 1, 1, 1)  # (12, 5, 16, 16)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5 + full, -1) @ v
    torch.testing.assert_close(outputs[1], expected, rtol=1e-10, atol=1e-10)


def test_model_backends_agree_in_train_and_eval() -> None:
    config = preset_config("nano", img_size=32, depths=(2, 2), num_heads=(2, 4), drop_path_rate=0.0)
    torch.manual_seed(0)
    model = SwinTransformer(config).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    results = {}
    for backend in ("sdpa", "plain"):
        model.set_attention_backend(backend)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results[backend] = (out.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results["sdpa"][0], results["plain"][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(results["sdpa"][1], results["plain"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="attention backend"):
        model.set_attention_backend("flash")


# ----------------------------------------------------------------------------------------------------
# stochastic depth
# ----------------------------------------------------------------------------------------------------


def test_drop_path_is_identity_in_eval() -> None:
    x = torch.randn(8, 3, 4)
    assert drop_path(x, 0.5, training=False) is x
    branch_calls = []

    def branch(t: torch.Tensor) -> torch.Tensor:
        branch_calls.append(t.shape[0])
        return 2 * t

    torch.testing.assert_close(add_residual(x, branch, 0.5, training=False), 3 * x, rtol=0, atol=0)
    assert branch_calls == [8]


@pytest.mark.parametrize("skip_dropped", [True, False])
def test_drop_path_keeps_the_expectation_in_train(skip_dropped: bool) -> None:
    """Each sample's branch is kept with probability 1 - p and scaled by 1 / (1 - p)."""
    torch.manual_seed(0)
    p, n = 0.3, 20000
    x = torch.randn(n, 2).abs() + 1.0
    if skip_dropped:  # the CPU path: dropped samples are not computed
        out = add_residual(x, lambda t: 2 * t, p, training=True) - x
    else:  # the masking path
        out = drop_path(2 * x, p, training=True)
    factor = out / (2 * x)  # 0 or 1 / (1 - p), the same for a sample's two values
    torch.testing.assert_close(factor[:, 0], factor[:, 1])
    kept = factor[:, 0].abs() > 1e-6
    torch.testing.assert_close(factor[kept, 0], torch.full((int(kept.sum()),), 1 / (1 - p)))
    # mean of the factor is 1 up to sampling noise: std of the mean = sqrt(p / (1 - p) / n) ~ 0.0046
    assert abs(factor[:, 0].mean().item() - 1.0) < 4 * (p / (1 - p) / n) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 0.015


def test_add_residual_gradient_reaches_only_kept_samples() -> None:
    torch.manual_seed(3)
    x = torch.randn(64, 5, requires_grad=True)
    weight = torch.randn(5, 5, requires_grad=True)
    out = add_residual(x, lambda t: t @ weight, 0.5, training=True)
    out.sum().backward()
    kept = (out.detach() - x.detach()).abs().sum(1) > 0
    assert 0 < kept.sum() < 64
    expected = (x.detach()[kept].sum(0, keepdim=True).T * torch.ones(1, 5)) * 2.0  # d/dW of sum(2 x_k W)
    torch.testing.assert_close(weight.grad, expected)
    torch.testing.assert_close(x.grad[~kept], torch.ones(int((~kept).sum()), 5))


def test_eval_output_does_not_depend_on_drop_path_rate() -> None:
    config = preset_config("nano", img_size=32, depths=(2, 2), num_heads=(2, 4))
    torch.manual_seed(0)
    a = SwinTransformer(replace(config, drop_path_rate=0.0)).eval()
    b = SwinTransformer(replace(config, drop_path_rate=0.5)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    b.train()
    assert not torch.allclose(a(x), b(x))  # and in training it does drop


# ----------------------------------------------------------------------------------------------------
# presets and the whole model
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REDUCED))
def test_preset_forward_backward_gradients(name: str) -> None:
    config = preset_config(name, num_classes=7, drop_path_rate=0.0, **REDUCED[name])
    torch.manual_seed(0)
    model = SwinTransformer(config).train()
    size = config.img_size if isinstance(config.img_size, tuple) else (config.img_size,) * 2
    x = torch.randn(2, 3, *size)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.tensor([1, 4])).backward()
    # A block whose windows let every token see only itself (the notebook's shifted 2x2 last stage) has no
    # use for its relative position bias: the softmax over one score has zero gradient.
    self_only = {
        f"stages.{i}.blocks.{j}.attn.relative_position_bias_table"
        for i, stage in enumerate(model.stages)
        for j, block in enumerate(stage.blocks)
        if (
            plan := block.plan((size[0] // config.stride * 2 ** (len(config.depths) - 1 - i),) * 2, x.device)
        ).mask
        is not None
        and torch.equal((plan.mask[:, 0] == 0).sum(-1), torch.ones_like(plan.mask[:, 0, 0], dtype=torch.long))
    }
    assert self_only == ({"stages.3.blocks.1.attn.relative_position_bias_table"} if name == "seed" else set())
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname
        assert (param.grad.abs().sum() > 0) != (pname in self_only), pname


@pytest.mark.parametrize("name", sorted(REDUCED))
def test_preset_trains_with_its_drop_path(name: str) -> None:
    config = preset_config(name, **REDUCED[name])
    model = SwinTransformer(config).train()
    size = config.img_size if isinstance(config.img_size, tuple) else (config.img_size,) * 2
    out = model(torch.randn(4, 3, *size))
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_seed_preset_is_the_notebook_model() -> None:
    config = preset_config("seed")
    assert (config.img_size, config.patch_size, config.embed_dim, config.num_classes) == (64, 4, 96, 200)
    assert (config.depths, config.num_heads, config.stage_windows) == (
        (2, 2, 6, 2),
        (2, 4, 8, 16),
        (8, 8, 4, 2),
    )
    assert (config.patch_norm, config.shift_full_window, config.rpb_init_std) == (False, True, 0.0)
    model = SwinTransformer(config)
    tables = [p for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")]
    assert len(tables) == 12 and all(torch.count_nonzero(t) == 0 for t in tables)
    assert isinstance(model.patch_embed.norm, torch.nn.Identity)
    rates = [block.drop_path_rate for stage in model.stages for block in stage.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.2, 12))
    # every second block shifts by half its window, also where the window covers the map
    shifts = [
        block.plan((16 // 2**i, 16 // 2**i), torch.device("cpu")).geometry.shift
        for i, stage in enumerate(model.stages)
        for block in stage.blocks
    ]
    assert shifts[1::2] == [(4, 4), (4, 4), (2, 2), (2, 2), (2, 2), (1, 1)]
    assert set(shifts[0::2]) == {(0, 0)}


def test_official_rules_drop_the_shift_where_the_window_covers_the_map() -> None:
    model = SwinTransformer(preset_config("tiny64"))
    shifts = [
        block.plan((16 // 2**i, 16 // 2**i), torch.device("cpu")).geometry.shift
        for i, stage in enumerate(model.stages)
        for block in stage.blocks
    ]
    assert shifts[1] == (4, 4) and set(shifts[2:]) == {(0, 0)}
    std = torch.cat([p.flatten() for n, p in model.named_parameters() if "relative_position" in n]).std()
    assert 0.015 < std.item() < 0.025


def test_swin_t_matches_the_published_size() -> None:
    """Swin-T: 28.3M parameters and 4.5G multiply-adds at 224px (Liu et al. 2021, table 1)."""
    with torch.device("meta"):
        model = SwinTransformer(preset_config("swin_t")).eval()
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 28.3) < 0.05
    macs = count_flops(model, (224, 224)) / 2
    assert abs(macs / 1e9 - 4.5) < 0.1


def test_describe_presets_lists_every_preset_with_its_parameters() -> None:
    table = describe_presets()
    for name in preset_names():
        row = next(line for line in table.splitlines() if line.split()[0] == name)
        with torch.device("meta"):
            params = sum(p.numel() for p in SwinTransformer(preset_config(name)).parameters())
        assert f"{params / 1e6:.2f}M" in row


def test_state_dict_holds_only_learned_weights_and_moves_across_sizes() -> None:
    config = preset_config("seed", embed_dim=32)
    torch.manual_seed(0)
    model = SwinTransformer(config).eval()
    state = model.state_dict()
    assert set(state) == {name for name, _ in model.named_parameters()}
    bigger = SwinTransformer(replace(config, img_size=128)).eval()  # same windows, same tables
    bigger.load_state_dict(state)
    x64, x96 = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 96, 96)
    first = model(x64)
    assert model(x96).shape == (2, 200)  # another size works (padding in stage 0: 24 % 8 == 0, 12 % 8 != 0)
    torch.testing.assert_close(model(x64), first, rtol=0, atol=0)  # masks are cached per size
    torch.testing.assert_close(bigger(x64), first)


def test_no_weight_decay_keywords_name_the_tables() -> None:
    model = SwinTransformer(preset_config("nano"))
    keywords = model.no_weight_decay_keywords()
    assert "relative_position_bias_table" in keywords
    matched = [n for n, p in model.named_parameters() if any(k in n for k in keywords)]
    assert len(matched) == sum(preset_config("nano").depths)
    assert all(model.get_parameter(n).ndim == 2 for n in matched)  # 2-D: the ndim rule alone would decay them


# ----------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_heads": (5, 6, 12, 24)}, "num_heads"),  # 96 channels, 5 heads
        ({"embed_dim": 100}, "num_heads"),  # 3 heads do not divide 100
        ({"num_heads": (3, 6, 12)}, "num_heads"),  # wrong length
        ({"window_size": (7, 7)}, "window_size"),  # wrong length
        ({"window_size": 0}, "window_size"),
        ({"img_size": 226}, "img_size"),  # patch 4 does not divide 226
        ({"img_size": 240}, "img_size"),  # 60 tokens cannot be merged three times
        ({"img_size": (224,)}, "img_size"),
        ({"patch_size": 0}, "patch_size"),
        ({"depths": ()}, "depths"),
        ({"depths": (2, 0, 6, 2)}, "depths"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
        ({"num_classes": -1}, "num_classes"),
        ({"rpb_init_std": -0.1}, "rpb_init_std"),
        ({"patch_norm": "yes"}, "patch_norm"),
    ],
)
def test_bad_config_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^SwinConfig\.{field}=") as info:
        SwinConfig(**overrides)
    assert "\n" not in str(info.value)


def test_config_accepts_lists_and_stays_hashable() -> None:
    config = SwinConfig(depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=[7, 7, 7, 7])
    assert config.depths == (2, 2, 6, 2) and config.stage_windows == (7, 7, 7, 7)
    assert hash(config) == hash(SwinConfig(window_size=(7, 7, 7, 7)))


def test_preset_config_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown model preset 'swin_xl'"):
        preset_config("swin_xl")
    with pytest.raises(ValueError, match="window"):
        preset_config("nano", window=4)


def test_bad_input_size_gives_the_nearest_sizes() -> None:
    model = SwinTransformer(preset_config("nano"))  # stride 4 * 2 * 2 = 16
    with pytest.raises(
        ValueError, match=r"height 70 is not a multiple of 16 \(nearest sizes that work: 64 or 80\)"
    ):
        model(torch.randn(1, 3, 70, 64))
    with pytest.raises(ValueError, match=r"width 8 .*nearest sizes that work: 16\)"):
        model(torch.randn(1, 3, 64, 8))
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))
    assert model(torch.randn(1, 3, 48, 80)).shape == (1, 10)  # a size the geometry allows


def test_bfloat16_autocast_on_cpu_stays_close_to_float32() -> None:
    config = preset_config("nano", img_size=32, depths=(2, 2), num_heads=(1, 2), drop_path_rate=0.0)
    torch.manual_seed(0)
    model = SwinTransformer(config)
    x = torch.randn(2, 3, 32, 32)
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_block_gradients_pass_gradcheck_with_padding_and_shift() -> None:
    """Autograd through padding, the shift gather, masked attention and the in-place residual adds."""
    torch.manual_seed(0)
    block = SwinBlock(dim=4, num_heads=2, table_window=(3, 3), shifted=True).double().train()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64, requires_grad=True)  # 5x4 map, window 3: padded to 6x6
    assert block.plan((5, 4), x.device).geometry == WindowGeometry((3, 3), (1, 1), (6, 6))
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-5)
    rows = torch.tensor([0, 2])
    src = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    base = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, s: _AddRows.apply(b, rows, s, 1.25), (base, src))
