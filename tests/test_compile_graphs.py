"""The compiled speedrun, as a GPU would run it, traced on the CPU: one training graph and one evaluation
graph, each traced whole (no graph break), never recompiled across training -> evaluation -> training ->
evaluation nor across a resume; the EMA weights evaluated on the evaluation graph; and the host reads of the
step loop where they were (the loss every `sync_every` steps, once per evaluation). A break or a recompile on
a GPU leaves blocks running uncompiled, at the eager rate (~11k images/s on an H100, not the compiled one).

The graphs are counted with a backend that records them (tests/compilecount.py) in place of inductor, with
the modes and static shapes that the run asks for.
"""

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from compilecount import CompileCounter, HostReads, counting
from test_recipe import _load_throughput
from test_train import make_tiny_cache
from tinyswin.config import build_augment_config, load_config
from tinyswin.data import write_cache
from tinyswin.engine import train_one_epoch
from tinyswin.evaluate import evaluate
from tinyswin.model import SwinTransformer
from tinyswin.model_presets import preset_config
from tinyswin.plots import read_metrics
from tinyswin.runtime import DistContext
from tinyswin.train import Run, resume_config, setup_run, train

pytestmark = pytest.mark.usefixtures("one_thread")

# the speedrun preset on the CPU at 64px (the preset's tiny64 geometry whole): fused AdamW (the CPU has it),
# EMA, test-time flip, device-side augmentation parameters, sync_every 50; a few images only
# fp32 (precision=auto is bf16 on a CPU with bf16 instructions): the EMA test compares the compiled evaluation
# with the eager one for equality; the bf16 case has a test of its own below
SPEEDRUN = [
    "device=cpu",
    "optim.fused=true",
    "batch_size=8",
    "eval_batch_size=8",
    "warmup_steps=1",
    "precision=fp32",
]


@pytest.fixture(scope="module")
def cache64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes of 64px images: 16 train (2 steps of 8), 8 val (one evaluation batch)."""
    return make_tiny_cache(
        tmp_path_factory.mktemp("data") / "tiny64", size=64, train_per_class=4, val_per_class=2
    )


def _quiet(_message: str) -> None:
    pass


def _assert_two_whole_graphs(counter: CompileCounter) -> None:
    assert counter.training_graphs == 1 and counter.evaluation_graphs == 1, counter.summary()
    assert counter.breaks == 0 and counter.recompiles == [], counter.summary()


def test_the_speedrun_compiles_one_training_and_one_evaluation_graph_and_keeps_them_across_a_resume(
    cache64: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config("speedrun", None, [f"data.source={cache64}", *SPEEDRUN, "schedule.epochs=2"])
    assert cfg.compile and cfg.ema.enabled and cfg.tta == "flip" and cfg.sync_every == 50
    run_dir = tmp_path / "run"
    with counting(monkeypatch) as counter:
        # warm-up (one step, one evaluation batch), then train -> evaluate -> train -> evaluate (raw and EMA)
        summary = train(cfg, run_dir, progress=False, log=_quiet)
        assert summary["epochs"] == 2 and "ema_val_top1" in summary
        _assert_two_whole_graphs(counter)
        counter.restart()  # a resume is a new process: nothing compiled yet
        train(resume_config(run_dir, ["schedule.epochs=3"]), run_dir, resume=True, progress=False, log=_quiet)
        _assert_two_whole_graphs(counter)


@pytest.fixture(scope="module")
def compiled_run(cache64: Path) -> Iterator[tuple[Run, CompileCounter]]:
    """A speedrun `Run` warmed up (its two graphs compiled) under a CompileCounter, for the tests below."""
    cfg = load_config("speedrun", None, [f"data.source={cache64}", *SPEEDRUN])
    with pytest.MonkeyPatch.context() as patch, counting(patch) as counter:
        run = setup_run(cfg, DistContext())
        run.warm_up()
        yield run, counter


def _train_epoch(run: Run, sync_every: int | None = None) -> None:
    cfg = run.cfg if sync_every is None else dataclasses.replace(run.cfg, sync_every=sync_every)
    train_one_epoch(dataclasses.replace(run, cfg=cfg), mix=True)  # the same objects, the config changed
    run.state.epoch += 1


def test_the_ema_weights_are_evaluated_on_the_evaluation_graph(
    compiled_run: tuple[Run, CompileCounter],
) -> None:
    run, counter = compiled_run
    _train_epoch(run)  # two steps: the EMA (a copy at the first, then 0.999 of itself) trails the weights
    raw = run.evaluate("val")
    ema = run.evaluate("val", ema=True)
    _assert_two_whole_graphs(counter)
    with torch.no_grad():
        pairs = zip(run.model.parameters(), run.ema.module.parameters(), strict=True)
        assert any(not torch.equal(a, b) for a, b in pairs)
    plain = evaluate(run.ema.module, iter(run.eval_loaders["val"]), run.normalize, num_classes=4,
                     label_smoothing=run.cfg.label_smoothing, tta="flip")  # fmt: skip
    assert (ema.loss_sum, ema.correct1) == (plain.loss_sum, plain.correct1)
    assert ema.plain.loss_sum == plain.plain.loss_sum
    assert ema.loss_sum != raw.loss_sum
    again = run.evaluate("val")  # the model's own weights are back, bit for bit
    assert (again.loss_sum, again.plain.loss_sum) == (raw.loss_sum, raw.plain.loss_sum)


@pytest.mark.parametrize("sync_every", [1, 50])
def test_the_compiled_step_loop_reads_the_host_where_it_did(
    compiled_run: tuple[Run, CompileCounter], sync_every: int
) -> None:
    """Reads of tensor values on the host, counted by dispatch (the compiled graphs' operations included) and
    filed under the function that makes them: in the step loop the loss once every `sync_every` steps and
    after the last (and, with `sync_every: 1`, the skip decided on the host), and reads of CPU tensors only;
    one read of the sums per evaluation pass. Nothing from the model."""
    run, counter = compiled_run
    steps = run.iters_per_epoch
    with HostReads() as reads:
        _train_epoch(run, sync_every)
    loop = dict(reads.counts)
    with HostReads() as reads:
        run.evaluate("val")
    evaluation = dict(reads.counts)
    _assert_two_whole_graphs(counter)
    assert steps == 2
    cpu_only = {
        "augment.__call__: _local_scalar_dense": steps,  # each batch's seed, drawn from the CPU generator
        "loader._gather: numpy": 2 * steps,  # a CPU split's rows gathered by numpy (on a GPU: index_select)
    }
    loss = {"engine.read: tolist": -(-steps // sync_every)}  # the loss and non-finite counts, one transfer
    on_host = {"engine._apply_step: _local_scalar_dense": steps} if sync_every == 1 else {}
    assert loop == cpu_only | loss | on_host
    assert evaluation == {
        "loader._gather: numpy": 2,  # the one batch of val
        "evaluate.result: tolist": 2,  # the sums with the flip, and without it
        "evaluate.result: _local_scalar_dense": 2,
        "evaluate.result: cpu": 4,
        "metrics.calibration_bins: cpu": 4,
    }


def test_the_throughput_benchmark_compiles_one_graph_per_batch_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gpu_throughput.py's model (the speedrun preset's tiny64): two batch sizes, each its own compiled model,
    one training graph each, no break, no recompile (a second size in the same dynamo cache would be one)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(16, 64, 64, 3), dtype=np.uint8)
    cache = write_cache(
        tmp_path / "cache", {"train": (images, np.arange(16) % 4)}, list("abcd"), list("abcd"), "t"
    )
    gt = _load_throughput()
    traced: list[tuple[int, str]] = []
    real_run_batch_size, real_reset = gt.run_batch_size, torch._dynamo.reset

    def run_batch_size(args, batch_size, *rest):  # type: ignore[no-untyped-def]
        out = real_run_batch_size(args, batch_size, *rest)
        traced.append((batch_size, counter.summary()))
        return out

    args = ["--data", str(cache), "--batches", "4", "8", "--arms", "model", "--warmup", "1", "--steps", "1"]
    with counting(monkeypatch) as counter:
        monkeypatch.setattr(gt, "run_batch_size", run_batch_size)
        monkeypatch.setattr(torch._dynamo, "reset", lambda: (real_reset(), counter.clear()))
        assert gt.main([*args, "--device", "cpu", "--compile"]) == 0
    assert [size for size, _ in traced] == [4, 8]
    one_graph = "1 training + 0 evaluation graphs, 0 graph breaks [], 0 recompiles []"
    assert [summary for _, summary in traced] == [one_graph] * 2
    assert gt.load_config("speedrun").model.preset == "tiny64"


def test_the_counter_sees_a_graph_break_and_a_recompile(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counts above could fail: two batch sizes through one compiled model recompile, and a host read in
    the forward breaks the graph."""

    class Reads(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = super().forward(x)
            return y * 2 if bool(y.sum() > 0) else y  # a host read

    with counting(monkeypatch) as counter:
        model = torch.compile(Reads(3, 2), dynamic=False)
        model(torch.ones(4, 3))
        model(torch.ones(5, 3))
        assert counter.breaks == 2 and len(counter.recompiles) == 1, counter.summary()  # a break per trace
        assert "size mismatch" in counter.recompiles[0]


def test_a_model_holds_the_plans_of_its_size_on_its_device_before_any_forward() -> None:
    model = SwinTransformer(preset_config("tiny64"))
    sizes = [(16, 16), (8, 8), (4, 4), (2, 2)]
    blocks = [block for stage in model.stages for block in stage.blocks]
    cpu, meta = torch.device("cpu"), torch.device("meta")
    for i, stage in enumerate(model.stages):
        for block in stage.blocks:
            assert set(block._plans) == {(sizes[i], cpu)}
    model.to(meta)  # a move builds them on the new device
    assert (sizes[0], meta) in blocks[0]._plans
    for i, stage in enumerate(model.stages):
        for block in stage.blocks:
            plan = block._plans[(sizes[i], meta)]
            assert plan.index.device == meta and (plan.mask is None or plan.mask.device == meta)


@pytest.mark.slow
def test_the_speedrun_in_bf16_compiled_by_inductor_matches_eager_on_the_cpu(
    cache64: Path, tmp_path: Path
) -> None:
    """What a GPU run compiles, compiled for real on the CPU (inductor, not the counting backend): bf16
    autocast, fused AdamW, the device-side augmentation parameters, EMA, test-time flip. Two graphs, no break,
    no recompile, and the losses of the eager run (drop path off: the eager CPU path draws it otherwise)."""
    overrides = [f"data.source={cache64}", *SPEEDRUN, "precision=bf16", "schedule.epochs=1"]
    overrides += ["model.drop_path_rate=0", "evaluation.every_epochs=1"]
    cfg = load_config("speedrun", None, overrides)
    assert cfg.compile and cfg.optim.fused and build_augment_config(cfg).device_params
    counter = CompileCounter()  # its logs of breaks and recompiles; the graphs from dynamo's counters
    counter.restart()
    with counter.logging():
        compiled = train(cfg, tmp_path / "compiled", progress=False, log=_quiet)
        graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    eager = train(load_config("speedrun", None, [*overrides, "compile=false"]), tmp_path / "eager",
                  progress=False, log=_quiet)  # fmt: skip
    assert graphs == 2 and counter.breaks == 0 and counter.recompiles == [], counter.summary()
    c, e = (read_metrics(tmp_path / name / "metrics.jsonl")[0] for name in ("compiled", "eager"))
    assert math.isfinite(c["train_loss"]) and compiled["compile_seconds"] > 0
    for key in ("train_loss", "val_loss", "ema_val_loss", "val_loss_no_tta"):  # bf16 through 12 blocks
        assert c[key] == pytest.approx(e[key], rel=1e-2), key
    assert eager["epochs"] == compiled["epochs"] == 1
