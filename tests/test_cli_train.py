"""`tinyswin train | eval | predict | plot` from the command line."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinyswin.cli import main
from tinyswin.data import is_cache, load_cache
from tinyswin.data.synthetic import CLASS_NAMES, synthetic_splits

TINY = [
    "model.embed_dim=16",
    "model.depths=[1, 1]",
    "model.num_heads=[1, 2]",
    "model.window_size=4",
    "tensorboard=false",
]


# the tiny model is overhead-bound: one thread is faster and steadier on a busy machine
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TINYSWIN_CACHE", str(root))
    return root


def _image_folder(root: Path) -> Path:
    """root/train/<class>/*.png and root/val/<class>/*.png from the synthetic generator (3 classes)."""
    splits = synthetic_splits(size=32, train_per_class=12, val_per_class=4, seed=5)
    for split, (images, labels) in splits.items():
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            if label < 3:
                folder = root / split / CLASS_NAMES[label].replace(" ", "_")
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A 3-epoch run from an image folder (prepared into a cache on the way), through the CLI."""
    base = tmp_path_factory.mktemp("cli")
    folder = _image_folder(base / "shapes")
    old = os.environ.get("TINYSWIN_CACHE")
    os.environ["TINYSWIN_CACHE"] = str(base / "cache")
    try:
        run_dir = base / "run"
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["train", "--data", str(folder), "--out", str(run_dir), "--epochs", "3", "--quiet",
                         "data.size=32", "batch_size=12", *TINY])  # fmt: skip
        assert code == 0, out.getvalue()
    finally:
        if old is None:
            os.environ.pop("TINYSWIN_CACHE")
        else:
            os.environ["TINYSWIN_CACHE"] = old
    return run_dir, base / "cache", out.getvalue()


def test_train_prepares_a_source_and_says_where_everything_is(cli_run) -> None:
    run_dir, cache_root, printed = cli_run
    caches = [p for p in cache_root.iterdir() if is_cache(p)]
    assert len(caches) == 1 and caches[0].name.startswith("shapes-")
    cache = load_cache(caches[0])
    assert cache.class_names == ["disc", "ring", "square"] and len(cache.split("train")[1]) == 36
    assert f"run directory: {run_dir}" in printed
    assert str(run_dir / "last.pt") in printed and str(run_dir / "best.pt") in printed
    assert str(run_dir / "plots") in printed
    assert printed.count("epoch ") >= 3  # one line per epoch without a terminal
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 3


def test_a_prepared_source_is_reused(
    cli_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run_dir, cache_root, _ = cli_run
    folder = run_dir.parent / "shapes"
    monkeypatch.setenv("TINYSWIN_CACHE", str(cache_root))
    meta = next(p for p in cache_root.iterdir() if is_cache(p)) / "meta.json"
    stamp = meta.stat().st_mtime_ns
    code = main(["train", "--data", str(folder), "--out", str(tmp_path / "again"), "--epochs", "1", "--quiet",
                 "data.size=32", "batch_size=12", *TINY])  # fmt: skip
    assert code == 0
    assert meta.stat().st_mtime_ns == stamp
    assert "preparing" not in capsys.readouterr().out


def test_eval_json_reproduces_the_best_top1(cli_run, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    run_dir, cache_root, _ = cli_run
    monkeypatch.setenv("TINYSWIN_CACHE", str(cache_root))
    capsys.readouterr()
    assert main(["eval", str(run_dir / "best.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"loss", "top1", "top5"} <= set(result)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["top1"] == summary["best_top1"] and result["n"] == 12
    assert main(["eval", str(run_dir / "last.pt"), "--split", "train"]) == 0
    assert "on train (36 images)" in capsys.readouterr().out
    assert main(["eval", str(run_dir / "last.pt"), "--split", "holdout"]) == 2
    assert "no split 'holdout'" in capsys.readouterr().err


def test_predict_prints_classes_with_probabilities(cli_run, tmp_path: Path, capsys) -> None:
    run_dir, _, _ = cli_run
    cache = load_cache(next(p for p in cli_run[1].iterdir() if is_cache(p)))
    image = np.asarray(cache.split("val")[0][0])
    Image.fromarray(image).resize((100, 70)).save(tmp_path / "big.jpg")
    capsys.readouterr()
    assert (
        main(["predict", str(run_dir / "last.pt"), str(tmp_path / "big.jpg"), "--topk", "3", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    preds = result[0]["predictions"]
    assert sorted(p["class"] for p in preds) == ["disc", "ring", "square"]
    assert sum(p["probability"] for p in preds) == pytest.approx(1.0, abs=1e-5)
    assert main(["predict", str(run_dir / "last.pt"), str(tmp_path / "big.jpg"), "--topk", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("big.jpg") and len(lines) == 3 and lines[1].strip().endswith(")")


def test_plot_redraws_the_plots(cli_run, capsys) -> None:
    run_dir, _, _ = cli_run
    for png in (run_dir / "plots").glob("*.png"):
        png.unlink()
    assert main(["plot", str(run_dir)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == ["accuracy.png", "loss.png", "lr.png"]
    for p in printed:
        with Image.open(p) as im:
            assert im.format == "PNG"
    assert main(["plot", str(run_dir / "nothere")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_resume_of_a_finished_run_trains_nothing_more(
    cli_run, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run_dir, cache_root, _ = cli_run
    before = (run_dir / "metrics.jsonl").read_text()
    monkeypatch.setenv("TINYSWIN_CACHE", str(cache_root))
    assert main(["train", "--out", str(run_dir), "--resume", "--quiet"]) == 0
    assert "resuming after epoch 3" in capsys.readouterr().out
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_bad_invocations_fail_with_one_clear_line(cli_run, cache_dir: Path, tmp_path: Path, capsys) -> None:
    run_dir, _, _ = cli_run
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "x"), "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'optim.lrr'; did you mean 'optim.lr'?" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert main(["train", "--out", str(run_dir), "--epochs", "1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["train", "--preset", "sed"]) == 2
    assert "did you mean 'seed'" in capsys.readouterr().err


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_eval_and_predict_refuse_a_checkpoint_that_runs_code(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_config": {}, "class_names": [], "x": _RunsCode(marker)}, evil)
    assert main(["eval", str(evil)]) == 2
    assert "refused" in capsys.readouterr().err
    (tmp_path / "a.png").write_bytes(b"")
    assert main(["predict", str(evil), str(tmp_path / "a.png")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_no_data_means_the_builtin_dataset_in_the_cache_folder(
    cache_dir: Path, tmp_path: Path, capsys
) -> None:
    out = str(tmp_path / "builtin")
    code = main(
        ["train", "--out", out, "--epochs", "1", "--quiet", "batch_size=500", "eval_batch_size=500", *TINY]
    )
    assert code == 0
    caches = [p for p in cache_dir.iterdir() if is_cache(p)]
    assert len(caches) == 1 and caches[0].name.startswith("synthetic-")
    cache = load_cache(caches[0])
    assert cache.class_names == list(CLASS_NAMES) and cache.splits == ("train", "val")
    assert str(caches[0]) in capsys.readouterr().out


def test_train_help_names_every_config_key(capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    from tinyswin.config import TrainConfig

    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the description
    for f in dataclasses.fields(TrainConfig):
        name = f"{f.name}.*" if dataclasses.is_dataclass(f.default_factory) else f.name
        assert name in text, name
    assert "threads" in text and "optim.*" in text
