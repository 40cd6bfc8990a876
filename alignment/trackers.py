"""Experiment trackers beside metrics.jsonl and TensorBoard: Weights & Biases, MLflow and trackio.

`tracking.report_to` picks them on every stage (and on the pipeline, which hands its choice to its stages); the
libraries are the `trackers` extra (`pip install -e '.[trackers]'`), so a plain install trains without them. Each
class below is the one place that calls its library. What each run gets: the stage's resolved config, every
scalar the stage logs (named `<stage>/<metric>`, at the stage's step), and the files a stage or the pipeline report
hands over (plots as images; eval.json, report.md as files). Where the run went (a URL, or a local path offline) is
logged when it finishes.

A pipeline's stages are one group, named after its run directory (`tracking.group`), each run named
`<group>/<stage>`. Offline use, as the tests run them: `WANDB_MODE=offline` (wandb writes under the stage's
output directory), an MLflow file store (`tracking.mlflow_tracking_uri: file:/some/dir`, or MLFLOW_TRACKING_URI),
trackio's local SQLite store (TRACKIO_DIR, by default ~/.cache/huggingface/trackio).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignment.config import option

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
LIBRARY = {"wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


@dataclass
class TrackingConfig:
    """Where a run's metrics go besides metrics.jsonl."""

    report_to: list = option(
        ["tensorboard"], "Trackers: any of tensorboard, wandb, mlflow, trackio (the last three need the `trackers` "
        "extra). [] logs to metrics.jsonl only.",
    )
    project: str = option("hybrid-align", "wandb / trackio project, MLflow experiment.")
    group: str = option("", "Group of runs; a pipeline sets its run directory's name when this is empty.")
    run_name: str = option("", "Run name; empty: <group>/<stage>, or <stage>/<output dir name> outside a pipeline.")
    mlflow_tracking_uri: str = option("", "MLflow tracking URI (file:/dir for a local store); empty: mlflow's own "
                                          "default (MLFLOW_TRACKING_URI, else ./mlruns).")

    def validate(self) -> None:
        unknown = [name for name in self.report_to if name not in TRACKERS]
        if unknown:
            raise ValueError(f"report_to: unknown tracker(s) {unknown}; choose from {list(TRACKERS)}")


def run_name(config: TrackingConfig, stage: str, run_dir: Path) -> str:
    if config.run_name:
        return config.run_name
    return f"{config.group}/{stage}" if config.group else f"{stage}/{Path(run_dir).name}"


def open_trackers(config: TrackingConfig, stage: str, run_dir: str | Path, run_config: dict) -> list:
    """One open run per tracker of `config.report_to` (TensorBoard excepted: MetricsLogger writes it itself)."""
    trackers = []
    for name in config.report_to:
        if name == "tensorboard":
            continue
        try:
            __import__(LIBRARY[name])
        except ImportError as error:
            raise ImportError(f"tracking.report_to names {name}, which is not installed: pip install -e "
                              f"'.[trackers]' (or pip install {LIBRARY[name]})") from error
        cls = {"wandb": WandbRun, "mlflow": MlflowRun, "trackio": TrackioRun}[name]
        trackers.append(cls(config, stage, Path(run_dir), run_config))
        log.info("%s: logging %s to %s as %s", stage, name, trackers[-1].where(), run_name(config, stage, run_dir))
    return trackers


def log_finished(config: TrackingConfig, stage: str, run_dir: str | Path, run_config: dict, figures: dict,
                 files: list[Path]) -> None:
    """A run per tracker for work that is done (an evaluation, a pipeline's report): its figures at step 0 and
    those of its `files` that exist."""
    for tracker in open_trackers(config, stage, run_dir, run_config):
        tracker.log(0, figures)
        for path in files:
            if path.is_file():
                tracker.log_file(path)
        log.info("%s: %s run at %s", stage, type(tracker).__name__, tracker.finish())


def pipeline_group(config: TrackingConfig, run_dir: Path) -> str:
    """The group of a pipeline's runs: `tracking.group`, else the run directory's name."""
    return config.group or Path(run_dir).name


def flat(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: the form MLflow's parameters take."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbRun:
    def __init__(self, config: TrackingConfig, stage: str, run_dir: Path, run_config: dict):
        import wandb

        self.stage = stage
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=config.project, name=run_name(config, stage, run_dir), group=config.group or None,
                              job_type=stage, dir=str(run_dir), config=run_config, reinit="create_new")

    def where(self) -> str:
        return self.run.url or str(Path(self.run.dir).parent)

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({f"{self.stage}/{k}": v for k, v in scalars(metrics).items()}, step=step)

    def log_file(self, path: Path) -> None:
        import wandb

        if path.suffix == ".png":
            self.run.log({f"{self.stage}/{path.stem}": wandb.Image(str(path))})
        else:
            self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self) -> str:
        where = self.where()
        self.run.finish()
        return where


class MlflowRun:
    MAX_PARAM = 6000  # characters MLflow keeps of a parameter's value
    BATCH = 100  # parameters per log_batch call (MLflow's limit)

    def __init__(self, config: TrackingConfig, stage: str, run_dir: Path, run_config: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.stage = stage
        self.client = MlflowClient(tracking_uri=config.mlflow_tracking_uri or None)
        experiment = self.client.get_experiment_by_name(config.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(config.project)
        tags = {"stage": stage, "output_dir": str(run_dir)} | ({"group": config.group} if config.group else {})
        self.run_id = self.client.create_run(experiment_id, run_name=run_name(config, stage, run_dir),
                                             tags=tags).info.run_id
        params = [Param(key, str(value)[: self.MAX_PARAM]) for key, value in flat(run_config).items()]
        for start in range(0, len(params), self.BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + self.BATCH])

    @staticmethod
    def metric_key(stage: str, name: str) -> str:
        """MLflow keys take letters, digits, _ - . / and spaces only."""
        return re.sub(r"[^\w\-./ ]", "_", f"{stage}/{name}")

    def where(self) -> str:
        return f"{self.client.tracking_uri} run {self.run_id}"

    def log(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(self.metric_key(self.stage, k), v, now, step) for k, v in scalars(metrics).items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_file(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self) -> str:
        self.client.set_terminated(self.run_id)
        return self.where()


class TrackioRun:
    def __init__(self, config: TrackingConfig, stage: str, run_dir: Path, run_config: dict):
        import trackio

        self.stage, self.project = stage, config.project
        self.run = trackio.init(project=config.project, name=run_name(config, stage, run_dir),
                                group=config.group or None, config=run_config)

    def where(self) -> str:
        from trackio.sqlite_storage import SQLiteStorage

        return str(SQLiteStorage.get_project_db_path(self.project))

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({f"{self.stage}/{k}": v for k, v in scalars(metrics).items()}, step=step)

    def log_file(self, path: Path) -> None:
        import trackio

        if path.suffix == ".png":  # trackio keeps media, not arbitrary files
            self.run.log({f"{self.stage}/{path.stem}": trackio.Image(str(path))})

    def finish(self) -> str:
        where = self.where()
        self.run.finish()
        return where
