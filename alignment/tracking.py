"""Training metrics as JSONL (for scripts and reports) and TensorBoard (for people)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, run_dir: str | Path, stage: str):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self._handle = self.path.open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:  # tensorboard is a dependency, but a stripped-down install should still train
            self._tb = None
            log.warning("tensorboard not installed; metrics go to %s only", self.path)

    def log(self, step: int, **metrics: float) -> None:
        self._handle.write(json.dumps({"stage": self.stage, "step": step, **metrics}) + "\n")
        self._handle.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{self.stage}/{key}", value, step)

    def close(self) -> None:
        self._handle.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
