"""Training metrics as JSONL (for scripts and reports), TensorBoard (for people) and the trackers of
`tracking.report_to` (wandb, MLflow, trackio: alignment/trackers.py).

One run directory holds the record of one attempt: a run that starts over moves the earlier attempt's files to
`previous/<n>/`, and a run resumed at step s drops what the earlier attempt logged from step s on (it is logged
again), so `metrics.jsonl` always describes the checkpoint beside it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

from alignment.trackers import TrackingConfig, open_trackers

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PREVIOUS_DIR = "previous"


class MetricsLogger:
    """`resume_step`: None for a run that starts over; the step a resumed run continues from otherwise.
    `records`: other JSONL files of the run, with a `step` per record, kept in step with the metrics.
    `keep`: which records of the earlier attempt a resumed run keeps (default: those before `resume_step`).
    `tracking`: TensorBoard and the other trackers (default: TensorBoard only); `run_config`: the stage's resolved
    config, which the trackers record."""

    def __init__(self, run_dir: str | Path, stage: str, resume_step: int | None = None, records: tuple[str, ...] = (),
                 keep: Callable[[dict], bool] | None = None, tracking: TrackingConfig | None = None,
                 run_config: dict | None = None):
        tracking = tracking or TrackingConfig()
        run_dir = Path(run_dir)
        self.path = run_dir / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        if resume_step is None:
            set_aside(run_dir, [METRICS_FILE, TENSORBOARD_DIR, *records])
        else:
            keep = keep or (lambda record: record.get("step", 0) < resume_step)
            for name in (METRICS_FILE, *records):
                keep_records(run_dir / name, keep)
        self._handle = self.path.open("a", encoding="utf-8")
        self._tb = None
        if "tensorboard" in tracking.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step hides the events an interrupted attempt wrote from the resumed step on.
                self._tb = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=resume_step)
            except ImportError:  # tensorboard is a dependency, but a stripped-down install should still train
                log.warning("tensorboard not installed; metrics go to %s only", self.path)
        self._trackers = open_trackers(tracking, stage, run_dir, run_config or {})

    def log(self, step: int, **metrics: float) -> None:
        self._handle.write(json.dumps({"stage": self.stage, "step": step, **metrics}) + "\n")
        self._handle.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{self.stage}/{key}", value, step)
        for tracker in self._trackers:
            tracker.log(step, metrics)

    def log_file(self, path: str | Path) -> None:
        """Hand a plot (.png: an image) or a record (eval.json, report.md) to the trackers."""
        for tracker in self._trackers:
            tracker.log_file(Path(path))

    def close(self) -> None:
        self._handle.close()
        if self._tb is not None:
            self._tb.close()
        for tracker in self._trackers:
            log.info("%s: %s run at %s", self.stage, type(tracker).__name__, tracker.finish())
        self._trackers = []


def set_aside(run_dir: Path, names: list[str]) -> Path | None:
    """Move the named files and folders an earlier attempt left in `run_dir` to `previous/<n>/`; returns where."""
    present = [run_dir / name for name in names if (run_dir / name).exists()]
    if not present:
        return None
    previous = run_dir / PREVIOUS_DIR
    previous.mkdir(exist_ok=True)
    target = previous / str(1 + sum(1 for p in previous.iterdir() if p.name.isdigit()))
    target.mkdir()
    for path in present:
        shutil.move(str(path), str(target / path.name))
    log.info("an earlier attempt's %s moved to %s", ", ".join(p.name for p in present), target)
    return target


def keep_records(path: Path, keep: Callable[[dict], bool]) -> None:
    """Keep the records of a JSONL record file that `keep` accepts (a resumed run logs the others again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and keep(json.loads(line))]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
