"""The step loop without host syncs: non-finite losses skipped on the device exactly as on the host, the
limit of non-finite losses in a row caught at most `sync_every` steps late, no reads of device values
between two reads, and a skipped step that changes nothing (weights, AdamW state, EMA); `compile_mode`
reaching torch.compile."""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from test_train import make_tiny_cache
from tinyswin.config import TrainConfig, load_config, to_yaml
from tinyswin.data import BatchLoader, load_cache
from tinyswin.engine import TrainingError, ema_update, masked_step, train_one_epoch
from tinyswin.optim import WarmupCosine
from tinyswin.runstate import LoopState, RunState
from tinyswin.runtime import DistContext, wrap_model

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 12  # 200 train images in batches of 16


class _Poisoned(torch.nn.Module):
    """A small MLP classifier whose output is NaN on the calls numbered in `bad` (0-based)."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)
        )
        self.bad = bad
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)  # (B, 4)
        self.calls += 1
        return out * float("nan") if self.calls - 1 in self.bad else out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_cache(tmp_path_factory.mktemp("data") / "tiny")


def _to_float(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, mix: bool):
    """An augmentation that only converts: uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float() / 255, labels


def _epoch(cache: Path, bad: set[int], *, sync_every: int, fused: bool, max_nonfinite: int = 20):
    """One epoch of the poisoned model with AdamW (weight decay), grad clipping and an EMA; returns the
    model, optimizer, EMA, loop state and either the epoch's stats or the TrainingError raised (no
    augmentation: the loop alone)."""
    data = load_cache(cache)
    loader = BatchLoader(*data.split("train"), 16, seed=0)
    model = _Poisoned(bad)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, fused=fused)
    sched = WarmupCosine(opt, 1e-2, iters_per_epoch=len(loader), epochs=1, warmup_epochs=0)
    ema = torch.optim.swa_utils.AveragedModel(model)  # updated by the loop with decay cfg.ema.decay
    cfg = dataclasses.replace(TrainConfig(), sync_every=sync_every, max_nonfinite=max_nonfinite)
    cfg.ema = dataclasses.replace(cfg.ema, decay=0.9)
    state = LoopState()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    try:
        cpu = torch.device("cpu")
        run = RunState(cfg=cfg, train_model=model, loader=loader, augment=_to_float, optimizer=opt,
                       scheduler=sched, scaler=scaler, device=cpu, ema=ema, state=state)  # fmt: skip
        out = train_one_epoch(run, mix=False)
    except TrainingError as exc:
        out = exc
    return model, opt, ema, state, out


def _assert_same(a, b) -> None:
    (model_a, opt_a, ema_a, *_), (model_b, opt_b, ema_b, *_) = a, b
    for (name, x), y in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    for x, y in zip(ema_a.state_dict().values(), ema_b.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for index, entries in sa.items():
        for key, value in entries.items():
            assert torch.equal(value, sb[index][key]), (index, key)


@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_steps_skipped_on_the_device_equal_those_skipped_on_the_host(
    cache: Path, fused: bool
) -> None:
    bad = {0, 4, 5, 9}  # the very first step too: AdamW's state does not exist yet
    host = _epoch(cache, bad, sync_every=1, fused=fused)
    device = _epoch(cache, bad, sync_every=5, fused=fused)
    _assert_same(host, device)
    clean = _epoch(cache, set(), sync_every=1, fused=fused)
    assert not torch.equal(host[0].net[1].weight, clean[0].net[1].weight)  # the poison mattered
    (*_, state_h, stats_h), (*_, state_d, stats_d) = host, device
    assert stats_h.nonfinite == stats_d.nonfinite == 4 == state_d.nonfinite_total
    assert stats_h.loss == stats_d.loss and stats_h.steps == stats_d.steps == STEPS
    assert state_h.nonfinite_run == state_d.nonfinite_run == 0
    assert int(device[2].n_averaged) == STEPS - 4  # the EMA skipped the same steps


@pytest.mark.parametrize("sync_every", [1, 3, 7])
def test_the_limit_of_nonfinite_losses_in_a_row_is_caught_at_most_n_steps_late(
    cache: Path, sync_every: int
) -> None:
    bad = set(range(2, 100))  # from the third step on; the limit (3) is reached at step 5
    reference = _epoch(cache, bad, sync_every=1, fused=False, max_nonfinite=3)
    result = _epoch(cache, bad, sync_every=sync_every, fused=False, max_nonfinite=3)
    error = result[-1]
    assert isinstance(error, TrainingError) and "not finite for 3 optimizer steps in a row" in str(error)
    steps_taken = result[3].step  # before the step whose read raised
    assert 4 <= steps_taken <= 4 + sync_every - 1
    assert reference[3].step == 4
    assert result[3].nonfinite_run >= 3
    _assert_same(reference, result)  # steps after the limit are skipped too: the weights where it was reached


def test_the_loop_reads_nothing_from_tensors_between_two_reads(cache: Path, monkeypatch) -> None:
    counts: dict[str, int] = {}

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return original(self, *args, **kwargs)

        return wrapper

    def run(sync_every: int) -> dict[str, int]:
        counts.clear()
        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "cpu", "__float__", "__int__", "__bool__"):
                patch.setattr(torch.Tensor, name, counting(name))
            _epoch(cache, {3}, sync_every=sync_every, fused=True)
        return dict(counts)

    once = run(STEPS + 1)
    assert once == {"tolist": 1}  # the one read after the last step
    every = run(1)
    assert every["tolist"] == STEPS and every["__bool__"] == STEPS  # the host path: a read per step


@pytest.mark.parametrize("fused", [False, True])
def test_a_masked_step_is_a_true_noop_and_an_unmasked_one_a_plain_step(fused: bool) -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 4))
    b = torch.nn.Parameter(torch.randn(4))
    groups = [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=0.1, fused=fused)
    w2, b2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone())
    groups2 = [{"params": [w2], "weight_decay": 0.1}, {"params": [b2], "weight_decay": 0.0}]
    plain = torch.optim.AdamW(groups2, lr=0.1, fused=fused)
    for step in range(4):
        grads = torch.randn(5, 4), torch.randn(4)
        w.grad, b.grad = grads[0].clone(), grads[1].clone()
        before = [w.detach().clone(), b.detach().clone()]
        state_before = {k: v.clone() for k, v in opt.state[w].items()}
        masked_step(opt, torch.tensor(True))  # a zero or NaN grad must not matter: nothing moves
        assert torch.equal(w, before[0]) and torch.equal(b, before[1])
        if state_before:
            assert all(torch.equal(opt.state[w][k], v) for k, v in state_before.items())
        else:  # AdamW's initial state: step 0, zero moments
            assert all(not v.any() for v in opt.state[w].values())
        masked_step(opt, torch.tensor(False))
        w2.grad, b2.grad = grads
        plain.step()
        assert torch.equal(w, w2) and torch.equal(b, b2), step
        assert all(torch.equal(opt.state[w][k], v) for k, v in plain.state[w2].items())


def test_ema_update_copies_first_skips_exactly_and_then_follows_the_decay() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    ema = torch.optim.swa_utils.AveragedModel(model)
    reference = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.8)
    )
    with torch.no_grad():
        model.weight.add_(1.0)
    ema_update(ema, model, 0.8, torch.tensor(True))  # skipped: not even the first copy
    assert int(ema.n_averaged) == 0 and not torch.equal(ema.module.weight, model.weight)
    ema_update(ema, model, 0.8, torch.tensor(False))
    reference.update_parameters(model)
    assert torch.equal(ema.module.weight, model.weight) and int(ema.n_averaged) == 1  # an exact copy
    for _ in range(3):
        with torch.no_grad():
            model.weight.mul_(1.5)
        held = ema.module.weight.detach().clone()
        ema_update(ema, model, 0.8, torch.tensor(True))
        assert torch.equal(ema.module.weight, held)
        ema_update(ema, model, 0.8, torch.tensor(False))
        reference.update_parameters(model)
        torch.testing.assert_close(ema.module.weight, reference.module.weight, rtol=1e-6, atol=1e-6)
    assert int(ema.n_averaged) == 4
    assert not torch.allclose(ema.module.weight, model.weight)  # an average, not a copy


@pytest.mark.parametrize("world_size", [1, 2])
def test_compile_mode_reaches_torch_compile_and_config_yaml(monkeypatch, world_size: int) -> None:
    compiled: list[dict] = []

    def fake_compile(module, **kwargs):
        compiled.append(kwargs)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda module, **_: module)
    model = torch.nn.Linear(2, 2)
    dist = DistContext(0, world_size, 0)
    wrap_model(model, True, dist, torch.device("cpu"), "max-autotune-no-cudagraphs")
    # the training forward and the evaluation function, whatever the number of processes
    assert compiled == [{"dynamic": False, "mode": "max-autotune-no-cudagraphs"}] * 2
    cfg = load_config(None, None, ["compile=true", "compile_mode=reduce-overhead", "sync_every=50"])
    saved = yaml.safe_load(to_yaml(cfg))
    assert (saved["compile_mode"], saved["sync_every"]) == ("reduce-overhead", 50)
    assert load_config("speedrun").compile and load_config("default").sync_every == 1
