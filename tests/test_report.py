"""`tinyswin report`: what it computes (against `eval` of the same weights), what the HTML shows, a run whose
data is gone, and the report of a real 200-class run opened in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from browser import find_chromium, load_page
from test_train import make_tiny_cache, tiny_overrides
from tinyswin.cli import main
from tinyswin.config import load_config
from tinyswin.data import write_cache
from tinyswin.evaluate import evaluate_checkpoint
from tinyswin.report import MISTAKES, PER_PAIR, gather, top_pairs
from tinyswin.report_html import write_report
from tinyswin.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
SCREENSHOTS = Path(
    os.environ.get("TINYSWIN_SCREENSHOTS", Path(__file__).resolve().parents[1] / "build" / "browser")
)


def _quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two short runs on a 4-class cache that differ in two keys, and that cache."""
    root = tmp_path_factory.mktemp("report")
    cache = make_tiny_cache(root / "cache", train_per_class=30, val_per_class=12)
    dirs = []
    for name, extra in (("a", ["optim.lr=3e-3"]), ("b", ["optim.lr=1e-3", "seed=1"])):
        cfg = load_config(None, None, [*tiny_overrides(cache, epochs=3), *extra])
        train(cfg, root / name, progress=False, log=_quiet)
        dirs.append(root / name)
    return dirs[0], dirs[1], cache


def test_top_pairs_are_the_largest_off_diagonal_cells() -> None:
    confusion = np.array([[5, 3, 0], [7, 1, 3], [0, 0, 9]])
    assert top_pairs(confusion) == [(1, 0, 7), (0, 1, 3), (1, 2, 3)]
    assert top_pairs(confusion, 1) == [(1, 0, 7)]
    assert top_pairs(np.eye(3, dtype=np.int64)) == []


def test_the_analysis_is_that_of_eval_on_the_same_weights(runs) -> None:
    run_a, _, _ = runs
    report = gather(run_a, log=_quiet)
    analysis = report.analysis
    assert analysis is not None and report.notes == []
    expected = evaluate_checkpoint(run_a / "best.pt", log=_quiet, progress=False)
    assert analysis.n == expected["n"] == 48
    assert analysis.top1 == expected["top1"] and analysis.ece == pytest.approx(expected["ece"], abs=1e-12)
    assert 0 < analysis.top1 < 1  # some mistakes to show
    wrong = analysis.n - int(np.trace(analysis.confusion))
    assert len(analysis.mistakes) == min(MISTAKES, wrong)
    for mistake in analysis.mistakes:
        probs = [p for _c, p in mistake.top]
        assert (
            mistake.top[0][0] != mistake.label
            and probs == sorted(probs, reverse=True)
            and sum(probs) <= 1.0001
        )
    confidences = [m.top[0][1] for m in analysis.mistakes]
    assert confidences == sorted(confidences, reverse=True)  # the most confident mistakes first
    for (t, p, count), ids in zip(analysis.pairs, analysis.pair_images.values(), strict=True):
        assert analysis.confusion[t, p] == count and len(ids) == min(PER_PAIR, count)
    shown = {m.index for m in analysis.mistakes} | {i for ids in analysis.pair_images.values() for i in ids}
    assert set(analysis.images) == shown


def test_the_html_shows_both_runs_the_differing_keys_and_each_runs_mistakes(runs, tmp_path: Path) -> None:
    run_a, run_b, _ = runs
    out, reports = write_report([run_a, run_b], tmp_path / "r.html", log=_quiet)
    text = out.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained
    config = text[text.index("<h2>Config</h2>") : text.index("</table>", text.index("<h2>Config</h2>"))]
    assert re.findall(r"<code>([^<]+)</code>", config) == ["optim.lr", "seed"]
    jpegs = text.count("src='data:image/jpeg;base64,")
    assert jpegs == sum(
        len(r.analysis.pair_images.get(k, [])) for r in reports for k in r.analysis.pair_images
    ) + sum(len(r.analysis.mistakes) for r in reports)
    assert text.count("src='data:image/png;base64,") == 4 + 2  # the curves, a reliability diagram per run
    analysis = reports[0].analysis
    full = text[text.index("classes, worst first</summary>") :]
    shown = re.findall(r"<tr><td><span title='([^']+)'", full[: full.index("</table>")])
    order = sorted(range(4), key=lambda i: (analysis.per_class[i], i))
    assert shown == [f"{analysis.class_names[i]} ({analysis.class_ids[i]})" for i in order]


def test_a_run_whose_data_is_gone_keeps_its_curves_and_tables(runs, tmp_path: Path, capsys) -> None:
    _, _, cache = runs
    moved = tmp_path / "cache"
    shutil.copytree(cache, moved)
    cfg = load_config(None, None, tiny_overrides(moved, epochs=2))
    train(cfg, tmp_path / "run", progress=False, log=_quiet)
    shutil.rmtree(moved)
    capsys.readouterr()
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r.html")]) == 0
    said = capsys.readouterr().out
    notes = [line for line in said.splitlines() if "no images" in line]
    assert len(notes) == 1 and str(moved) in notes[0] and "--data" in notes[0]
    text = (tmp_path / "r.html").read_text()
    assert "data:image/jpeg" not in text and text.count("data:image/png") == 5  # curves and reliability kept
    assert "Per-class accuracy" in text and "Most confused pairs" in text and str(moved) in text
    # --data brings the images back
    assert (
        main(["report", str(tmp_path / "run"), "--data", str(cache), "--out", str(tmp_path / "r2.html")]) == 0
    )
    assert "data:image/jpeg" in (tmp_path / "r2.html").read_text()


def test_a_path_that_is_not_a_run_is_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tinyswin report: error: {tmp_path}: no metrics.jsonl: not a tinyswin run directory"]
    assert not (tmp_path / "r.html").exists()


@pytest.fixture(scope="module")
def run_200(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real short run on 200 classes of 64px images with 2,000 val images (as Tiny ImageNet's cache)."""
    root = tmp_path_factory.mktemp("report200")
    rng = np.random.default_rng(0)

    def split(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(200), per_class)
        base = rng.integers(0, 256, (200, 8, 8, 3)).astype(np.float32)  # a colour layout per class
        coarse = base[labels] + rng.normal(0, 40, (len(labels), 8, 8, 3))
        images = np.kron(coarse, np.ones((1, 8, 8, 1))) + rng.normal(0, 20, (len(labels), 64, 64, 3))
        return np.clip(images, 0, 255).astype(np.uint8), labels

    names = [f"class {i:03d}, a long descriptive name" for i in range(200)]
    ids = [f"n{i:08d}" for i in range(200)]
    cache = write_cache(
        root / "cache", {"train": split(3), "val": split(10)}, ids, names, "200 random classes"
    )
    overrides = [
        *tiny_overrides(cache, epochs=2),
        "batch_size=50",
        "optim.lr_base_batch=50",
        "eval_batch_size=500",
    ]
    train(load_config(None, None, overrides), root / "run", progress=False, log=_quiet)
    return root / "run"


def test_the_report_of_a_200_class_run_opens_in_chromium(run_200: Path, tmp_path: Path) -> None:
    if find_chromium() is None:
        pytest.skip(
            "chromium is not installed (.ci/run installs Debian's chromium): the report is not opened"
        )
    pytest.importorskip("websockets", reason="websockets (the test extra) drives chromium: not installed")
    out, reports = write_report([run_200], tmp_path / "report.html", log=_quiet)
    analysis = reports[0].analysis
    assert analysis is not None and analysis.n == 2000 and len(analysis.class_names) == 200
    size = out.stat().st_size
    assert size < 5_000_000
    screenshot = SCREENSHOTS / "report-200-classes.png"
    page = load_page(out, screenshot)
    print(f"report of 200 classes: {size / 1e6:.2f} MB, loaded in {page.load_ms:.0f} ms; {screenshot}")
    assert page.errors == []
    expected = 4 + 1 + len(analysis.mistakes) + sum(len(ids) for ids in analysis.pair_images.values())
    assert len(page.images) == expected
    assert all(decoded and width > 0 and height > 0 for _alt, width, height, decoded in page.images), (
        page.images
    )
    assert page.load_ms < 2000
    assert screenshot.stat().st_size > 50_000 and page.height > 3000
