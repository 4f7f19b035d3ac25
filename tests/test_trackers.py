"""Experiment trackers with the real packages, offline: MLflow's local stores and W&B's offline mode, read
back after a training and its resume; a failing or missing tracker is one warning and the training goes on."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from test_train import make_tiny_cache, tiny_overrides
from tinyswin.config import load_config
from tinyswin.plots import read_metrics
from tinyswin.rundir import RunDir
from tinyswin.train import resume_config, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_cache(tmp_path_factory.mktemp("data") / "tiny", train_per_class=16, val_per_class=4)


def _train_then_resume(cache: Path, run_dir: Path, *keys: str) -> tuple[list[str], list[dict[str, Any]]]:
    """One epoch, then a resume to two (the resume changes schedule.epochs); returns the lines said and the
    metrics of the run directory."""
    said: list[str] = []
    cfg = load_config(None, None, [*tiny_overrides(cache, epochs=1), *keys])
    train(cfg, run_dir, progress=False, log=said.append)
    train(
        resume_config(run_dir, ["schedule.epochs=2"]), run_dir, resume=True, progress=False, log=said.append
    )
    return said, read_metrics(run_dir / "metrics.jsonl")


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_mlflow_logs_config_epochs_summary_and_plots_into_one_run_across_a_resume(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    mlflow_tracking = pytest.importorskip("mlflow.tracking", reason="the [mlflow] extra is not installed")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if store == "sqlite" else (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the sqlite store keeps artifacts in ./mlruns
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store on request only
    run_dir = tmp_path / "run-a"
    said, metrics = _train_then_resume(cache, run_dir, "log.mlflow=true", "log.project=exp-a")
    assert not [line for line in said if "warning" in line]

    client = mlflow_tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("exp-a")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resume continued the same run
    run = runs[0]
    assert json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"] == run.info.run_id
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert run.data.params["model.embed_dim"] == "16" and run.data.params["batch_size"] == "16"
    history = client.get_metric_history(run.info.run_id, "val_top1")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], r["val_top1"]) for r in metrics]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.metrics["summary.val_top1"] == pytest.approx(summary["val_top1"])
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/loss.png", "plots/accuracy.png", "plots/lr.png"}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "summary.json"}


def _wandb_records(path: Path) -> list[Any]:
    """The records of a W&B run file (`run-ID.wandb`: a LevelDB-style log of protobuf records)."""
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, part, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768  # records never straddle a 32 KiB block header
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def _wandb_history(records: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in
                         record.history.item})  # fmt: skip
    return rows


def test_wandb_offline_logs_config_epochs_and_summary_into_one_run_across_a_resume(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb", reason="the [wandb] extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run-b"
    said, metrics = _train_then_resume(cache, run_dir, "log.wandb=true", "log.project=proj-b")
    assert not [line for line in said if "warning" in line]

    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"]
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2  # the resume wrote to the same run
    first, second = (_wandb_records(f) for f in files)
    run = next(r.run for r in first if r.WhichOneof("record_type") == "run")
    assert run.display_name == "run-b" and run.project == "proj-b"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model"]["embed_dim"] == 16 and config["batch_size"] == 16
    epochs = [row for row in _wandb_history(first) + _wandb_history(second) if "val_top1" in row]
    assert [(row["epoch"], row["val_top1"]) for row in epochs] == [
        (r["epoch"], r["val_top1"]) for r in metrics
    ]
    summary = json.loads((run_dir / "summary.json").read_text())
    finals = [
        json.loads(item.value_json)
        for r in second
        if r.WhichOneof("record_type") == "summary"
        for item in r.summary.update
        if item.key == "best_top1"
    ]
    assert finals == [summary["best_top1"]]
    plots = {row_key for row in _wandb_history(second) for row_key in row if row_key.startswith("plots/")}
    assert {key.split("/")[1] for key in plots} >= {"loss", "accuracy", "lr"}


def test_a_failing_tracker_is_one_warning_and_the_training_goes_on(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow.tracking", reason="the [mlflow] extra is not installed")
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")  # cannot be created
    monkeypatch.setitem(sys.modules, "wandb", None)  # as where the [wandb] extra is not installed
    said: list[str] = []
    cfg = load_config(None, None, [*tiny_overrides(cache, epochs=2), "log.mlflow=true", "log.wandb=true"])
    summary = train(cfg, tmp_path / "run", progress=False, log=said.append)
    warnings = [line for line in said if line.startswith("warning:")]
    assert len(warnings) == 2, warnings
    assert any("wandb" in w and "pip install 'tinyswin[wandb]'" in w for w in warnings)
    assert any(w.startswith("warning: mlflow logging failed") for w in warnings)
    assert summary["epochs"] == 2 and (tmp_path / "run" / "summary.json").is_file()


def test_only_the_writing_process_opens_trackers(cache: Path, tmp_path: Path) -> None:
    cfg = load_config(None, None, [*tiny_overrides(cache), "log.mlflow=true", "log.wandb=true"])
    said: list[str] = []
    other_rank = RunDir(tmp_path / "run", main=False, say=said.append)
    other_rank.start(cfg, [])
    assert other_rank.trackers is None and said == [] and not (tmp_path / "run").exists()
