"""The HTML of `tinyswin report`: one self-contained file (charts as inline PNG, val images as inline JPEG, no
script, no network), readable in any browser.

    curves (loss, top-1, top-5, learning rate; the runs overlaid) -> final numbers -> config keys that differ
    -> per run: per-class accuracy (worst and best first) -> most confused pairs with their images
       -> most confident mistakes with their top-3 -> reliability diagram and ECE
"""

from __future__ import annotations

import base64
import html
import io
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from tinyswin.plots import schedule_curve
from tinyswin.report import Analysis, RunReport, gather
from tinyswin.rundir import write_text_atomic
from tinyswin.version import __version__

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
SHOWN_CLASSES = 10  # worst and best classes shown before the full list
THUMB = 96  # CSS pixels of a val image
JPEG_QUALITY = 90

CSS = """

body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;
padding:0 16px;color:#1d2329;background:#fff}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d8dde3}
h3{font-size:15px;margin:18px 0 6px}.muted{color:#5d6873}
.note{background:#fff4e5;border-left:4px solid #f0a030;padding:4px 10px;margin:4px 0}
table{border-collapse:collapse;margin:6px 0}
td,th{padding:3px 8px;border-bottom:1px solid #e4e8ec;text-align:left;vertical-align:top}
th{background:#f4f6f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:8px}.charts img{width:560px;max-width:100%;height:auto}
.cols{display:flex;flex-wrap:wrap;gap:32px}
.bar{display:inline-block;height:9px;background:#4c8fd6;vertical-align:middle;margin-right:6px}
.thumbs img,.card img{width:96px;height:96px;object-fit:contain;background:#eee;border:1px solid #ccd3da}
.thumbs img{margin-right:4px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:10px}
.card{display:flex;gap:8px;border:1px solid#e4e8ec;border-radius:4px;padding:6px}
.card .text{font-size:12px;min-width:0}.card .true{font-weight:600}.card .p{overflow-wrap:anywhere}
.wrong{color:#b3261e}.right{color:#18794e}details summary{cursor:pointer;color:#2760a8}
.ece{font-size:20px;font-weight:600}
"""


def _png(fig: Figure) -> str:
    """A figure as a PNG data URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _jpeg(image: np.ndarray) -> str:
    """A uint8 (H, W, 3) image as a JPEG data URI."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure(width: float = 5.6, height: float = 3.5) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _eval_split(run: RunReport) -> str:
    """The split a run's accuracy curves show: its selection split."""
    if run.summary and run.summary.get("best_split"):
        return str(run.summary["best_split"])
    return str(run.config.get("data.val_split", "val"))


def _curve_chart(runs: Sequence[RunReport], title: str, series: Sequence[tuple[str, str, float]]) -> str:
    """One chart of `series` (metrics key, label, scale) for every run, the runs in colours, the series in
    line styles."""
    fig, ax = _figure()
    styles = ("-", "--", ":")
    for i, run in enumerate(runs):
        for j, (key, label, scale) in enumerate(series):
            key = key.format(split=_eval_split(run))
            points = [(r["epoch"], r[key] * scale) for r in run.metrics if r.get(key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                name = f"{run.name} {label.format(split=_eval_split(run))}"
                marker = "o" if len(xs) < 30 else None
                ax.plot(
                    xs,
                    ys,
                    styles[j % 3],
                    color=COLORS[i % len(COLORS)],
                    marker=marker,
                    markersize=3,
                    label=name,
                )
    ax.set_xlim(left=0)  # integer epoch ticks also for a run of one epoch
    _finish_axes(ax, title, "epoch")
    return _png(fig)


def _lr_chart(runs: Sequence[RunReport]) -> str:
    fig, ax = _figure()
    for i, run in enumerate(runs):
        curve = schedule_curve(run.metrics).get("schedule (per step)")
        if curve is None:
            points = [(r["epoch"], r["lr"]) for r in run.metrics if r.get("lr") is not None]
            curve = tuple(zip(*points, strict=True)) if points else ((), ())
        if curve[0]:
            ax.plot(curve[0], curve[1], color=COLORS[i % len(COLORS)], label=run.name)
    _finish_axes(ax, "Learning rate", "epoch")
    return _png(fig)


def _finish_axes(ax: Any, title: str, xlabel: str) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.figure.subplots_adjust(left=0.13, right=0.97, bottom=0.14, top=0.9)


def reliability_chart(analysis: Analysis) -> str:
    """Accuracy against confidence in each bin (bars), the diagonal of perfect calibration, and the share of
    images in each bin."""
    assert analysis.bins is not None
    count, conf_sum, correct = analysis.bins  # (n_bins,) each
    n_bins = len(count)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    seen = count > 0
    accuracy = np.divide(correct, count, out=np.zeros_like(correct), where=seen)
    confidence = np.divide(conf_sum, count, out=centres.copy(), where=seen)
    fig = Figure(figsize=(4.6, 4.6), dpi=100)
    FigureCanvasAgg(fig)
    ax, share = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = 1.0 / n_bins
    ax.bar(centres[seen], accuracy[seen], width=width * 0.95, color="#4c8fd6", label="accuracy")
    ax.bar(centres[seen], (confidence - accuracy)[seen], bottom=accuracy[seen], width=width * 0.95,
           color=(0.84, 0.15, 0.16, 0.15), edgecolor="#d62728", hatch="//", linewidth=0.6,
           label="gap to the mean confidence")  # fmt: skip
    ax.plot([0, 1], [0, 1], "--", color="#555", linewidth=1, label="perfect calibration")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability")
    ax.legend(fontsize=7, loc="upper left")
    share.bar(centres, count / max(count.sum(), 1), width=width * 0.95, color="#8a96a3")
    share.set_xlabel("confidence (top-1 probability)")
    share.set_ylabel("images")
    share.set_xlim(0, 1)
    fig.subplots_adjust(left=0.15, right=0.97, bottom=0.11, top=0.93, hspace=0.08)
    return _png(fig)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: Any) -> str:
    return "" if value is None else f"{100 * float(value):.2f}%"


def _short(name: str) -> str:
    """A class name's first part ('goldfish, Carassius auratus' -> 'goldfish')."""
    return name.split(",")[0].strip() or name


def _class(analysis: Analysis, index: int) -> str:
    name = analysis.class_names[index]
    ident = analysis.class_ids[index]
    extra = f" title='{_esc(name)} ({_esc(ident)})'" if ident != name else f" title='{_esc(name)}'"
    return f"<span{extra}>{_esc(_short(name))}</span>"


def _final_table(runs: Sequence[RunReport]) -> str:
    head = ["run", "epochs", "best top-1 (epoch)", "split", "top-1", "top-5", "loss", "ECE", "images/s",
            "train s"]  # fmt: skip
    rows = []
    for i, run in enumerate(runs):
        s = run.summary or {}
        split = _eval_split(run)
        last = run.metrics[-1] if run.metrics else {}
        best = f"{_pct(s['best_top1'])} ({s.get('best_epoch')})" if "best_top1" in s else ""
        cells = [
            f"<span style='color:{COLORS[i % len(COLORS)]}'>&#9632;</span> {_esc(run.name)}",
            _esc(s.get("epochs", last.get("epoch", ""))), best, split,
            _pct(s.get(f"{split}_top1", last.get(f"{split}_top1"))),
            _pct(s.get(f"{split}_top5", last.get(f"{split}_top5"))),
            f"{s.get(f'{split}_loss', last.get(f'{split}_loss', float('nan'))):.4f}",
            "" if s.get("ece") is None else f"{s['ece']:.4f}",
            f"{s['images_per_s']:.0f}" if s.get("images_per_s") else "",
            f"{s.get('train_seconds', last.get('elapsed', 0)):.0f}",
        ]  # fmt: skip
        rows.append(cells)
    return _table(head, rows, numeric=range(4, 10))


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """A table of HTML cells (`head` and `rows` are HTML already)."""
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = "".join(
            f"<td class='num'>{c}</td>" if j in numeric else f"<td>{c}</td>" for j, c in enumerate(row)
        )
        out.append(f"<tr>{cells}</tr>")
    return "".join(out) + "</table>"


def _config_section(runs: Sequence[RunReport]) -> str:
    """The config keys in which the runs differ (one run: its whole config, folded)."""
    keys = sorted(set().union(*(run.config for run in runs)))
    if len(runs) == 1:
        rows = [[f"<code>{_esc(k)}</code>", _esc(runs[0].config[k])] for k in keys]
        return (f"<details><summary>the run's config ({len(keys)} keys)</summary>"
                f"{_table(['key', 'value'], rows)}</details>")  # fmt: skip
    missing = object()
    differ = [k for k in keys if len({repr(run.config.get(k, missing)) for run in runs}) > 1]
    if not differ:
        return "<p>The runs' configs are the same in every key.</p>"
    rows = [
        [f"<code>{_esc(k)}</code>", *(_esc(run.config.get(k, "&mdash;")) for run in runs)] for k in differ
    ]
    return f"<p>{len(differ)} of {len(keys)} keys differ.</p>" + _table(
        ["key", *(_esc(r.name) for r in runs)], rows
    )


def _per_class(analysis: Analysis) -> str:
    acc = analysis.per_class
    totals = analysis.confusion.sum(axis=1)
    order = sorted((i for i in range(len(acc)) if acc[i] is not None), key=lambda i: (acc[i], i))

    def rows(indices: Sequence[int]) -> list[list[str]]:
        bar = "<span class='bar' style='width:{:.0f}px'></span>{}"
        return [
            [_class(analysis, i), bar.format(80 * acc[i], _pct(acc[i])), str(int(totals[i]))] for i in indices
        ]

    shown = min(SHOWN_CLASSES, len(order))
    worst = _table(["worst classes", "accuracy", "images"], rows(order[:shown]))
    best = _table(["best classes", "accuracy", "images"], rows(order[::-1][:shown]))
    full = _table(["class", "accuracy", "images"], rows(order))
    return (f"<div class='cols'><div>{worst}</div><div>{best}</div></div><details><summary>all {len(order)} "
            f"classes, worst first</summary>{full}</details>")  # fmt: skip


def _thumb(analysis: Analysis, index: int, caption: str) -> str:
    image = analysis.images.get(index)
    if image is None:
        return ""
    return f"<img src='{_jpeg(image)}' alt='{_esc(caption)}' title='{_esc(caption)}'>"


def _pairs(analysis: Analysis) -> str:
    if not analysis.pairs:
        return "<p>No image was misclassified.</p>"
    rows = []
    for t, p, count in analysis.pairs:
        ids = analysis.pair_images.get((t, p), [])
        thumbs = "".join(_thumb(analysis, i, f"{analysis.split} image {i}") for i in ids)
        rows.append([f"{_class(analysis, t)} &rarr; {_class(analysis, p)}", str(count),
                     f"<div class='thumbs'>{thumbs}</div>"])  # fmt: skip
    return _table(["true &rarr; predicted", "images", "examples"], rows, numeric=[1])


def _mistakes(analysis: Analysis) -> str:
    cards = []
    for m in analysis.mistakes:
        preds = "".join(
            f"<div class='p {'right' if c == m.label else 'wrong'}'>{100 * q:5.1f}% {_class(analysis, c)}"
            "</div>"
            for c, q in m.top
        )
        image = _thumb(analysis, m.index, f"{analysis.split} image {m.index}")
        true = f"<div class='true'>{_class(analysis, m.label)}</div>"
        cards.append(
            f"<div class='card'>{image}<div class='text'>{true}<div class='muted'>predicted:</div>{preds}"
            "</div></div>"
        )
    return f"<div class='grid'>{''.join(cards)}</div>"


def _analysis_section(run: RunReport, index: int) -> str:
    a = run.analysis
    mark = f"<span style='color:{COLORS[index % len(COLORS)]}'>&#9632;</span>"
    parts = [
        f"<h2>{mark} {_esc(run.name)}: what it gets wrong</h2>",
        f"<p class='muted'>{_esc(a.source if a else 'no evaluation')}</p>",
    ]
    parts += [f"<p class='note'>{_esc(note)}</p>" for note in run.notes]
    if a is None:
        return "".join(parts)
    parts.append(
        f"<p>top-1 {_pct(a.top1)} of {a.n} {_esc(a.split)} images, {len(a.class_names)} classes.</p>"
    )
    parts.append(f"<h3>Per-class accuracy</h3>{_per_class(a)}")
    parts.append(f"<h3>Most confused pairs</h3>{_pairs(a)}")
    if a.mistakes:
        parts.append(f"<h3>Misclassified {a.split} images, most confident first ({len(a.mistakes)})</h3>"
                     f"<p class='muted'>the true class, then the top-{len(a.mistakes[0].top)} predictions</p>"
                     f"{_mistakes(a)}")  # fmt: skip
    if a.bins is not None:
        chart = (
            f"<img src='{reliability_chart(a)}' alt='reliability diagram of {_esc(run.name)}' width='460'>"
        )
        text = (
            f"<p>Expected calibration error</p><p class='ece'>{a.ece:.4f}</p>"
            "<p class='muted'>the gap between "
            f"confidence and accuracy in each of {len(a.bins[0])} bins, weighted by its share of the images; "
            "bars below the diagonal: overconfident</p>"
        )
        parts.append(
            f"<h3>Calibration</h3><div class='cols'>{chart}<div style='max-width:360px'>{text}</div></div>"
        )
    return "".join(parts)


def render(runs: Sequence[RunReport]) -> str:
    """The report of `runs` as one HTML document."""
    names = ", ".join(run.name for run in runs)
    charts = [
        _curve_chart(runs, "Loss", [("train_loss", "train", 1.0), ("{split}_loss", "{split}", 1.0)]),
        _curve_chart(
            runs,
            "Top-1 (%)",
            [("{split}_top1", "{split}", 100.0), ("ema_{split}_top1", "{split} EMA", 100.0)],
        ),
        _curve_chart(runs, "Top-5 (%)", [("{split}_top5", "{split}", 100.0)]),
        _lr_chart(runs),
    ]
    titles = ("loss", "top-1", "top-5", "learning rate")
    images = "".join(f"<img src='{c}' alt='{t} curves'>" for c, t in zip(charts, titles, strict=True))
    listed = "".join(
        f"<li><b>{_esc(r.name)}</b> <span class='muted'>{_esc(r.path)}</span></li>" for r in runs
    )
    notes = "".join(f"<p class='note'>{_esc(r.name)}: {_esc(n)}</p>" for r in runs for n in r.notes)
    body = [
        f"<h1>tinyswin report: {_esc(names)}</h1>",
        f"<p class='muted'>written {time.strftime('%Y-%m-%d %H:%M')} by tinyswin {__version__}</p>",
        f"<ul>{listed}</ul>",
        notes,
        f"<h2>Learning curves</h2><div class='charts'>{images}</div>",
        f"<h2>Final numbers</h2>{_final_table(runs)}",
        f"<h2>Config</h2>{_config_section(runs)}",
        *(_analysis_section(run, i) for i, run in enumerate(runs)),
    ]
    head = (
        "<meta charset='utf-8'><meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>tinyswin report: {_esc(names)}</title><link rel='icon' href='data:,'><style>{CSS}</style>"
    )
    return f"<!DOCTYPE html><html lang='en'><head>{head}</head><body>{''.join(body)}</body></html>\n"


def write_report(
    run_dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    data: str | None = None,
    split: str | None = None,
    device: str = "cpu",
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> tuple[Path, list[RunReport]]:
    """Gather every run, render the report and write it to `out` atomically (nothing is written on an error).

    Raises:
        FileNotFoundError: a run directory is missing or is not a run.
        ValueError: a run is named twice.
    """
    paths = [Path(p) for p in run_dirs]
    if len({p.resolve() for p in paths}) != len(paths):
        raise ValueError("a run directory is named twice")
    runs = [gather(p, data=data, split=split, device=device, log=log, progress=progress) for p in paths]
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory: name the .html file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, render(runs))
    return out, runs
