"""Parameter groups and the warm-up + cosine schedule."""

import itertools
import math

import pytest
import torch

from tinyswin.model import SwinTransformer
from tinyswin.model_presets import preset_config
from tinyswin.optim import WarmupCosine, build_adamw, param_groups, schedule_lr


@pytest.fixture(scope="module")
def model() -> SwinTransformer:
    return SwinTransformer(
        preset_config("nano", img_size=16, num_classes=3, embed_dim=8, depths=(1, 1), num_heads=(1, 2))
    )


def _names(groups: list[dict]) -> tuple[set[str], set[str]]:
    return set(groups[0]["names"]), set(groups[1]["names"])


def test_decay_only_matrices_and_never_the_position_tables_by_default(model: SwinTransformer) -> None:
    decay, rest = _names(param_groups(model, 0.05))
    params = dict(model.named_parameters())
    assert decay | rest == set(params) and not decay & rest
    tables = {n for n in params if "relative_position_bias_table" in n}
    assert tables and tables <= rest  # 2-D, excluded by name
    assert all(params[n].ndim >= 2 for n in decay)
    assert {n for n in params if params[n].ndim < 2} <= rest  # norms and biases
    assert "head.weight" in decay and "head.bias" in rest
    assert any(n.endswith("qkv.weight") for n in decay)


def test_decay_rel_pos_bias_puts_the_tables_under_decay(model: SwinTransformer) -> None:
    decay, rest = _names(param_groups(model, 0.05, decay_rel_pos_bias=True))
    tables = {n for n, _ in model.named_parameters() if "relative_position_bias_table" in n}
    assert tables <= decay and not tables & rest


def test_adamw_groups_carry_their_weight_decay(model: SwinTransformer) -> None:
    opt = build_adamw(model, 1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_schedule_values() -> None:
    kw = dict(epochs=20, warmup_epochs=4, warmup_start=0.1, min_lr=1e-5)
    assert schedule_lr(0, 1.0, **kw) == pytest.approx(0.1)
    assert schedule_lr(2, 1.0, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert schedule_lr(4, 1.0, **kw) == pytest.approx(1.0)
    assert schedule_lr(12, 1.0, **kw) == pytest.approx(1e-5 + (1 - 1e-5) * 0.5)  # half-way through the cosine
    assert schedule_lr(20, 1.0, **kw) == pytest.approx(1e-5)
    assert schedule_lr(25, 1.0, **kw) == pytest.approx(1e-5)  # past the end: held at the minimum
    assert schedule_lr(0, 1.0, epochs=5, warmup_epochs=0, warmup_start=0.1, min_lr=0.0) == 1.0


def _scheduler(per_iteration: bool) -> WarmupCosine:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    return WarmupCosine(
        opt, 2.0, iters_per_epoch=10, epochs=5, warmup_epochs=1.5, warmup_start=0.0, min_lr=0.0,
        per_iteration=per_iteration,
    )  # fmt: skip


def test_stepped_per_iteration_follows_the_epoch_curve_at_fractional_epochs() -> None:
    sched = _scheduler(per_iteration=True)
    seen = []
    for step in range(50):
        assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(sched.lr_at(step))
        seen.append(sched.get_last_lr())
        sched.step()
    assert seen[5] == pytest.approx(2.0 * 0.5 / 1.5)  # t = 0.5 epoch into a 1.5-epoch warm-up
    assert seen[15] == pytest.approx(2.0)  # the peak at t = 1.5
    assert all(a < b for a, b in itertools.pairwise(seen[:16]))  # rising through warm-up
    assert all(a > b for a, b in itertools.pairwise(seen[15:50]))  # falling through the cosine
    t = 32 / 10
    expected = 0.5 * 2.0 * (1 + math.cos(math.pi * (t - 1.5) / 3.5))
    assert seen[32] == pytest.approx(expected)


def test_stepped_per_epoch_is_constant_within_an_epoch() -> None:
    sched = _scheduler(per_iteration=False)
    lrs = [sched.lr_at(s) for s in range(50)]
    for epoch in range(5):
        assert len(set(lrs[epoch * 10 : (epoch + 1) * 10])) == 1
    assert lrs[10] == pytest.approx(2.0 / 1.5)


def test_state_dict_resumes_the_schedule_exactly() -> None:
    a = _scheduler(True)
    for _ in range(23):
        a.step()
    b = _scheduler(True)
    b.load_state_dict(a.state_dict())
    assert b.steps == 23
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"] == a.lr_at(23)
