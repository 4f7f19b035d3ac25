"""Fine-tuning: `init` weights (timm, official, tinyswin, safetensors), windows fitted to the resolution,
tables resized, a new head, layer-wise learning-rate decay, the `finetune` preset, and resumes that never
read the source again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tinyswin.rundir as rundir
import tinyswin.train as train_module
from tinyswin.checkpoint import load_checkpoint
from tinyswin.cli import main
from tinyswin.config import build_model_config, load_config
from tinyswin.data import write_cache
from tinyswin.data.synthetic import CLASS_NAMES, synthetic_splits
from tinyswin.export import export
from tinyswin.interop import resize_relative_position_table
from tinyswin.model import SwinTransformer
from tinyswin.model_presets import preset_config
from tinyswin.optim import WarmupCosine, build_adamw
from tinyswin.pretrained import fit_window, fit_windows, read_init
from tinyswin.runtime import DistContext
from tinyswin.train import resume_config, setup_run, train

timm = pytest.importorskip("timm")

# a timm Swin with the layout of swin_tiny_patch4_window7_224 (224px, window 7), narrow and shallow
SOURCE_ARGS = {"embed_dim": 16, "depths": (2, 1, 1, 1), "num_heads": (1, 2, 2, 4), "num_classes": 7}
TINY_RUN = [
    "batch_size=16", "eval_batch_size=64", "threads=1", "augment.preset=none", "tensorboard=false",
    "schedule.warmup_epochs=0", "schedule.mix_off_first_epochs=0", "model.drop_path_rate=0",
]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runs here are about weights; drawing their plots would take most of their time."""
    monkeypatch.setattr(rundir, "plot_run", lambda _path: [])


def _cache(root: Path, keep: list[int]) -> Path:
    """A 32px cache of the built-in shapes: 8 train and 4 val images of each class in `keep`."""
    splits = synthetic_splits(size=32, train_per_class=8, val_per_class=4, seed=5)
    out = {}
    for name, (images, labels) in splits.items():
        mask = np.isin(labels, keep)
        out[name] = (images[mask], np.searchsorted(keep, labels[mask]).astype(np.int64))
    return write_cache(root, out, [f"c{k}" for k in keep], [CLASS_NAMES[k] for k in keep], "test shapes")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cache(tmp_path_factory.mktemp("data") / "five", [0, 2, 5, 6, 8])


def _timm_source() -> torch.nn.Module:
    """The source network, random everywhere (norms, biases and tables too, so a misplaced entry shows)."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **SOURCE_ARGS)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            elif "relative_position_bias_table" in name or name.endswith("bias"):
                param.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The timm network saved as a state dict file, and that state dict."""
    state = _timm_source().state_dict()
    path = tmp_path_factory.mktemp("weights") / "swin.pth"
    torch.save(state, path)
    return path, state


def _as_timm_name(name: str) -> str:
    return name.replace("stages.", "layers.", 1)


def _assert_holds_the_source(model: SwinTransformer, state: dict[str, torch.Tensor], windows: tuple) -> None:
    """Every weight of `model` but the head is the source's, tables resized from window 7 to `windows`."""
    checked = 0
    for name, value in model.state_dict().items():
        if name.startswith("head."):
            continue
        theirs = state[_as_timm_name(name)]
        if name.endswith("relative_position_bias_table"):
            w = windows[int(name.split(".")[1])]
            theirs = resize_relative_position_table(theirs, (7, 7), (w, w))
            assert value.shape == ((2 * w - 1) ** 2, theirs.shape[1])
        torch.testing.assert_close(value, theirs, rtol=0, atol=0)
        checked += 1
    assert checked == len(state) - 2  # all but the source's head (timm keeps no buffers in its state dict)


def _fresh_head(cfg, num_classes: int, image_size: int = 32) -> torch.nn.Linear:
    """The head a model of the run's config gets from the run's seed: what a fresh run would start with."""
    torch.manual_seed(cfg.seed)
    return SwinTransformer(build_model_config(cfg, num_classes, image_size)).head


def test_windows_are_fitted_to_the_stage_grids() -> None:
    # ImageNet Swin-T (window 7) at 64px: grids 16, 8, 4, 2 -> the seed's windows, each tiling its grid
    assert fit_windows((64, 64), 4, (7, 7, 7, 7)) == (8, 8, 4, 2)
    assert fit_windows((224, 224), 4, (7, 7, 7, 7)) == (7, 7, 7, 7)  # where 7 tiles the grids, it stays
    assert fit_windows((384, 384), 4, (12, 12, 12, 12)) == (12, 12, 12, 12)
    assert fit_windows((32, 32), 4, (7, 7, 7, 7)) == (8, 4, 2, 1)
    assert fit_window((16, 16), 12) == 16  # 8 and 16 tie: the larger
    assert fit_window((6, 12), 5) == 6  # tiles 6 and 12
    assert fit_window((4, 12), 5) == 6  # covers the 4 rows, tiles the 12 columns
    assert fit_window((4, 12), 3) == 4  # 3 would leave the rows padded; 2 and 4 tie


def test_init_from_a_timm_state_dict_file(cache: Path, source) -> None:
    path, state = source
    cfg = load_config(None, None, [f"data.source={cache}", f"init={path}", *TINY_RUN])
    lines: list[str] = []
    run = setup_run(cfg, DistContext(), say=lines.append)
    config = run.model.config
    assert (config.embed_dim, config.depths, config.num_heads) == (16, (2, 1, 1, 1), (1, 2, 2, 4))
    assert (config.patch_size, config.mlp_ratio, config.patch_norm, config.qkv_bias) == (4, 4.0, True, True)
    assert config.stage_windows == (8, 4, 2, 1) and config.img_size == 32
    _assert_holds_the_source(run.model, state, (8, 4, 2, 1))
    assert run.model.head.weight.shape == (5, 128)
    head = _fresh_head(run.cfg, 5)
    torch.testing.assert_close(run.model.head.weight, head.weight, rtol=0, atol=0)
    assert not run.model.head.bias.any()
    assert run.cfg.model.overrides["window_size"] == (8, 4, 2, 1)  # recorded in the run's config
    assert any("windows 7-7-7-7 -> 8-4-2-1 at 32px; new head for 5 classes" in line for line in lines)


def test_a_window_size_the_run_sets_is_kept_and_the_tables_resized_to_it(cache: Path, source) -> None:
    path, state = source
    cfg = load_config(None, None, [f"data.source={cache}", f"init={path}", "model.window_size=4", *TINY_RUN])
    run = setup_run(cfg, DistContext(), say=lambda _line: None)
    assert run.model.config.window_size == 4 and run.model.config.embed_dim == 16
    _assert_holds_the_source(run.model, state, (4, 4, 2, 1))  # clamped to the 2x2 and 1x1 grids


def test_init_from_timm_by_name_asks_timm_for_the_pretrained_weights(
    cache: Path, source, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, state = source
    calls = []
    local = _timm_source()

    def create_model(name: str, **kwargs):
        calls.append((name, kwargs))
        return local

    monkeypatch.setattr(timm, "create_model", create_model)
    cfg = load_config(
        None, None, [f"data.source={cache}", "init=timm:swin_tiny_patch4_window7_224", *TINY_RUN]
    )
    run = setup_run(cfg, DistContext(), say=lambda _line: None)
    assert calls == [("swin_tiny_patch4_window7_224", {"pretrained": True})]
    _assert_holds_the_source(run.model, state, (8, 4, 2, 1))


def test_an_official_checkpoint_and_a_timm_model_folder_give_the_source_weights(
    tmp_path: Path, source
) -> None:
    _, state = source
    official = {}
    for key, value in state.items():  # the official layout: merges close a stage, the head is `head`
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            key = ".".join(["layers", str(int(parts[1]) - 1), *parts[2:]])
        official[key.replace("head.fc.", "head.")] = value
    torch.save({"model": official, "epoch": 300}, tmp_path / "official.pth")
    st = pytest.importorskip("safetensors.torch")
    folder = tmp_path / "hub"  # a timm model folder as model hubs hold them
    folder.mkdir()
    st.save_file(state, str(folder / "model.safetensors"))
    hub = {"architecture": "swin_tiny_patch4_window7_224", "model_args": SOURCE_ARGS}
    (folder / "config.json").write_text(json.dumps(hub))
    for weights in (read_init(str(tmp_path / "official.pth")), read_init(str(folder))):
        assert weights.windows == (7, 7, 7, 7) and not weights.shift_full_window
        assert weights.geometry["depths"] == (2, 1, 1, 1) and weights.geometry["num_heads"] == (1, 2, 2, 4)
        assert len(weights.state) == len(state) - 2 and "head.weight" not in weights.state
        for name, value in weights.state.items():
            torch.testing.assert_close(value, state[_as_timm_name(name)], rtol=0, atol=0)


def test_init_from_a_tinyswin_run_or_its_export_with_other_classes(cache: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    tiny = ["model.embed_dim=16", "model.depths=[1, 1]", "model.num_heads=[1, 2]", "model.window_size=4",
            "model.shift_full_window=true"]  # fmt: skip
    train(load_config(None, None, [f"data.source={cache}", *tiny, *TINY_RUN, "schedule.epochs=1"]), first,
          progress=False, log=lambda _line: None)  # fmt: skip
    best = load_checkpoint(first / "best.pt")
    pytest.importorskip("safetensors")
    export(first, "safetensors", tmp_path / "exported", log=lambda _line: None)
    other = _cache(tmp_path / "three", [1, 3, 9])
    for init in (first, tmp_path / "exported"):
        cfg = load_config(None, None, [f"data.source={other}", f"init={init}", *TINY_RUN])
        run = setup_run(cfg, DistContext(), say=lambda _line: None)
        config = run.model.config
        assert (config.depths, config.embed_dim, config.shift_full_window) == ((1, 1), 16, True)
        for name, value in run.model.state_dict().items():
            if not name.startswith("head."):
                torch.testing.assert_close(value, best["model"][name], rtol=0, atol=0)
        assert run.model.head.weight.shape == (3, 32)
        torch.testing.assert_close(run.model.head.weight, _fresh_head(run.cfg, 3).weight, rtol=0, atol=0)


def test_layer_decay_gives_each_depth_its_learning_rate() -> None:
    model = SwinTransformer(
        preset_config("nano", img_size=16, num_classes=3, embed_dim=8, depths=(1, 2), num_heads=(1, 2))
    )
    peak, decay = 1e-3, 0.5
    optimizer = build_adamw(model, peak, weight_decay=0.05, layer_decay=decay)
    # depth 0 the patch embedding, 1..3 the blocks (the merge with its stage's first block), 4 norm and head
    depth = {"patch_embed": 0, "stages.0.blocks.0": 1, "stages.1.downsample": 2, "stages.1.blocks.0": 2,
             "stages.1.blocks.1": 3, "norm": 4, "head": 4}  # fmt: skip
    names = {id(p): n for n, p in model.named_parameters()}
    scheduler = WarmupCosine(optimizer, peak, iters_per_epoch=10, epochs=2, warmup_epochs=0.5, min_lr=1e-5)
    for _ in range(7):
        scheduler.step()
    seen = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            prefix = next(p for p in depth if name.startswith(p + "."))
            assert group["lr"] == pytest.approx(scheduler.get_last_lr() * decay ** (4 - depth[prefix]))
            assert group["weight_decay"] == (
                0.05 if param.ndim >= 2 and "relative_position" not in name else 0.0
            )
            seen.add(name)
    assert seen == set(names.values())
    assert scheduler.get_last_lr() < peak  # the rate moved, and every group kept its scale
    plain = build_adamw(model, peak, weight_decay=0.05)
    assert [g["weight_decay"] for g in plain.param_groups] == [0.05, 0.0]
    assert all("lr_scale" not in g for g in plain.param_groups)


def test_the_finetune_preset_trains_from_init_weights(cache: Path, source, tmp_path: Path) -> None:
    path, _ = source
    preset = load_config("finetune")
    assert preset.init is None and preset.optim.layer_decay == 1.0  # the measured recipe: no layer decay
    overrides = [f"data.source={cache}", f"init={path}", "schedule.epochs=1", "batch_size=16", "threads=1"]
    cfg = load_config("finetune", None, overrides)
    lines: list[str] = []
    summary = train(cfg, tmp_path / "ft", progress=False, log=lines.append)
    ckpt = load_checkpoint(tmp_path / "ft" / "last.pt")
    config = ckpt["model_config"]
    assert (config["depths"], config["embed_dim"], config["num_heads"]) == ([2, 1, 1, 1], 16, [1, 2, 2, 4])
    # the 32px images trained at the preset's 128px: grids 32, 16, 8, 4 -> windows fitted from 7
    assert config["img_size"] == preset.augment.overrides["out_size"] == 128
    assert config["window_size"] == [8, 8, 8, 4]
    assert config["drop_path_rate"] == preset.model.overrides["drop_path_rate"]
    assert any("windows 7-7-7-7 -> 8-8-8-4 at 128px" in line for line in lines)
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] and all("lr_scale" not in g for g in groups)
    assert ckpt["train_config"]["init"] == str(path) and summary["epochs"] == 1
    assert np.isfinite(ckpt["loop"]["history"][0]["train_loss"])


def test_resume_does_not_read_the_init_weights_again(
    cache: Path, source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = source
    copy = tmp_path / "swin.pth"
    copy.write_bytes(path.read_bytes())
    run_dir = tmp_path / "run"
    cfg = load_config(None, None, [f"data.source={cache}", f"init={copy}", *TINY_RUN, "schedule.epochs=1"])
    train(cfg, run_dir, progress=False, log=lambda _line: None)
    first = load_checkpoint(run_dir / "last.pt")["model"]
    copy.unlink()  # gone: a resume that tried to read it would fail

    def no_reading(value: str):
        raise AssertionError(f"resume read the init weights {value}")

    monkeypatch.setattr(train_module, "read_init", no_reading)
    resumed = resume_config(run_dir, ["schedule.epochs=2"])
    assert resumed.init == str(copy) and resumed.model.overrides["depths"] == (2, 1, 1, 1)
    summary = train(resumed, run_dir, resume=True, progress=False, log=lambda _line: None)
    assert summary["epochs"] == 2
    second = load_checkpoint(run_dir / "last.pt")["model"]
    assert any(not torch.equal(first[k], second[k]) for k in first)  # it trained on from the checkpoint


@pytest.mark.parametrize(
    ("init", "extra", "message"),
    [
        ("{tmp}/missing.pth", [], "init weights not found: {tmp}/missing.pth"),
        ("timm:", [], "init='timm:': expected a weights file, a run or export folder, timm:NAME"),
        ("timm:swin_tiny_patch4_window7", [], "timm has no model of that name; did you mean"),
        ("{tmp}/notes.txt", [], "not a weights file torch.load can read"),
        ("{tmp}/list.pth", [], "holds no state dict (a mapping of names to tensors)"),
        ("{source}", ["model.embed_dim=32"], "model.embed_dim=32 contradicts the init weights"),
        ("{source}", ["--resume"], "--init starts a new run; --resume continues from the weights in last.pt"),
    ],
)
def test_a_bad_init_is_one_line(cache: Path, source, tmp_path: Path, capsys, init, extra, message) -> None:
    (tmp_path / "notes.txt").write_text("not weights\n")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    fill = {"tmp": tmp_path, "source": source[0]}
    argv = ["train", "--data", str(cache), "--out", str(tmp_path / "run"), "--quiet", "--init",
            init.format(**fill), *TINY_RUN, *extra]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinyswin train: error: ") and err.count("\n") == 1
    assert message.format(**fill) in err
    assert not (tmp_path / "run" / "last.pt").exists()
