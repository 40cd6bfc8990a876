"""Experiment trackers (alignment/trackers.py): the choice and its checks on every stage, and, in the slow suite, a
tiny SFT run logged to wandb (offline), an MLflow file store and trackio's local store, read back from each."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from alignment.config import load_config
from alignment.trackers import MlflowRun, TrackingConfig, flat, open_trackers
from alignment.tracking import MetricsLogger
from tests.conftest import REPO, TINY_MODEL, TINY_TOKENIZER


def test_an_unknown_tracker_is_refused_naming_the_key():
    from alignment.grpo import GRPOConfig

    with pytest.raises(ValueError, match=r"tracking.*report_to.*comet"):
        load_config(GRPOConfig, None, ["tracking.report_to=[wandb, comet]"])


def test_a_tracker_that_is_not_installed_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    with pytest.raises(ImportError, match=r"mlflow, which is not installed: pip install -e '\.\[trackers\]'"):
        open_trackers(TrackingConfig(report_to=["mlflow"]), "sft", tmp_path, {})


def test_tensorboard_only_when_asked(tmp_path):
    for report_to, written in ((["tensorboard"], True), ([], False)):
        run = tmp_path / str(written)
        logger = MetricsLogger(run, "sft", tracking=TrackingConfig(report_to=report_to))
        logger.log(0, loss=1.0)
        logger.close()
        assert (run / "tensorboard").is_dir() == written
        assert json.loads((run / "metrics.jsonl").read_text())["loss"] == 1.0


def test_metric_keys_and_parameters_take_mlflows_forms():
    assert MlflowRun.metric_key("eval", "sft/accuracy@16 (think)") == "eval/sft/accuracy_16 _think_"
    assert flat({"train": {"lr": 1e-3, "betas": [0.9, 0.95]}, "seed": 0}) == {
        "train.lr": 1e-3, "train.betas": [0.9, 0.95], "seed": 0}


def test_a_pipeline_hands_its_trackers_to_default_stages_and_groups_them_all(tmp_path):
    import dataclasses

    from alignment.pipeline import _fingerprint, _track
    from alignment.sft import SFTConfig

    pipeline = TrackingConfig(report_to=["wandb"], project="p")
    default, own = load_config(SFTConfig), load_config(SFTConfig, None, ["tracking.report_to=[mlflow]"])
    before = _fingerprint(default, "")
    _track(default, pipeline, tmp_path / "run7")
    _track(own, pipeline, tmp_path / "run7")
    assert (default.tracking.report_to, default.tracking.project, default.tracking.group) == (["wandb"], "p", "run7")
    assert (own.tracking.report_to, own.tracking.group) == (["mlflow"], "run7")
    assert pipeline.group == ""  # the pipeline's own section is not changed by a stage
    assert _fingerprint(default, "") == before  # where logs go does not rerun a finished stage
    from alignment.resume import run_fingerprint

    assert run_fingerprint(default) == run_fingerprint(dataclasses.replace(default, tracking=TrackingConfig()))


def test_the_pipeline_report_gets_its_own_run_in_the_group(tmp_path, monkeypatch):
    from alignment import pipeline, trackers

    opened = []

    class Recorder:
        def __init__(self, tracking, stage, run_dir, run_config):
            self.tracking, self.stage, self.logged, self.files = tracking, stage, {}, []
            opened.append(self)

        def log(self, step, metrics):
            self.logged |= metrics

        def log_file(self, path):
            self.files.append(path.name)

        def finish(self):
            return "here"

    monkeypatch.setattr(trackers, "open_trackers", lambda *args: [Recorder(*args)])
    run_dir = tmp_path / "run3"
    (run_dir / "eval").mkdir(parents=True)
    for name in ("report.md", "metrics.json", "curves.png", "eval/accuracy_vs_budget.png"):
        (run_dir / name).write_text("x")
    config = load_config(pipeline.PipelineConfig, None, ["tracking.report_to=[wandb]"])
    pipeline.track_report(config, run_dir, {"stages": {"sft": {"accuracy_think": 0.5, "budget_sweep": []}},
                                            "seconds": {"sft": 12.0}})
    (run,) = opened
    assert (run.stage, run.tracking.group, run.tracking.report_to) == ("pipeline", "run3", ["wandb"])
    assert run.logged == {"sft/accuracy_think": 0.5, "sft/budget_sweep": [], "seconds/sft": 12.0}
    assert run.files == ["report.md", "metrics.json", "curves.png", "accuracy_vs_budget.png"]


def wandb_records(path) -> list[bytes]:
    """The records of a .wandb file: a 7-byte header (":W&B", 0xBEE1, version), then LevelDB's log format, blocks
    of 32 KiB holding chunks of [crc32, length, type: full / first / middle / last] (read here without wandb's own
    reader, which recent versions no longer ship in Python)."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pending, offset, block = [], b"", 7, 32768
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, offset)
        if kind == 0 and length == 0:  # zero fill at the end of a block or the file
            offset += block - offset % block
            continue
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def wandb_history(run_dir) -> tuple[list[dict], dict]:
    """The history rows and the config of the one offline wandb run under `run_dir`."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows, config = [], {}
    for data in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
        elif kind in ("config", "run"):  # the config comes with the run record, updates in config records
            update = record.config.update if kind == "config" else record.run.config.update
            config |= {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update}
    return rows, config


@pytest.mark.slow
def test_a_tiny_sft_run_is_logged_to_wandb_mlflow_and_trackio_and_reads_back(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # trackio reads it when first imported
    if "trackio" in sys.modules:
        pytest.fail("trackio was imported before this test could point TRACKIO_DIR at its own store")
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    pytest.importorskip("trackio")
    out, store = tmp_path / "sft", tmp_path / "mlruns"
    # MLflow 3 keeps its file store behind MLFLOW_ALLOW_FILE_STORE (its database stores need sqlalchemy).
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp_path / "trackio"),
                        "MLFLOW_ALLOW_FILE_STORE": "true", "PYTHONPATH": str(REPO)}
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    overrides = [
        f"model.name_or_path={TINY_MODEL}", f"model.tokenizer={TINY_TOKENIZER}",
        f"data.train_path={tiny_data / 'train.jsonl'}", f"data.test_path={tiny_data / 'test.jsonl'}",
        "eval.max_samples=4", "eval.max_new_tokens=16", "eval.budgets=[8]", "train.max_steps=3",
        "train.warmup_steps=1", "train.log_every=1", f"output_dir={out}", "device=cpu", "data.unpacked_paths=[]",
        "eval.tool_test_path=",
        "tracking.report_to=[tensorboard, wandb, mlflow, trackio]", "tracking.project=tiny-test",
        "tracking.group=g1", f"tracking.mlflow_tracking_uri=file:{store}",
    ]  # fmt: skip
    subprocess.run([sys.executable, "-m", "alignment.cli", "sft", str(REPO / "configs/tiny/sft.yaml"), *overrides],
                   check=True, env=env, cwd=tmp_path, timeout=600)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {record["step"]: record["loss"] for record in logged if "loss" in record}
    assert sorted(losses) == [0, 1, 2]

    rows, config = wandb_history(out)
    wandb_losses = {row["_step"]: row["sft/loss"] for row in rows if "sft/loss" in row}
    assert wandb_losses == pytest.approx(losses)
    assert config["train"]["max_steps"] == 3

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-test").experiment_id])
    assert run.info.run_name == "g1/sft" and run.data.tags["group"] == "g1" and run.data.params["train.max_steps"] == "3"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "sft/loss")}
    assert history == pytest.approx(losses)
    assert "eval.json" in {artifact.path for artifact in client.list_artifacts(run.info.run_id)}

    from trackio.sqlite_storage import SQLiteStorage

    trackio_losses = {row["step"]: row["sft/loss"] for row in SQLiteStorage.get_logs("tiny-test", "g1/sft")
                      if "sft/loss" in row}
    assert trackio_losses == pytest.approx(losses)
